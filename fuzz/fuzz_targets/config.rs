//! `meshca.toml` parsing: never a panic, and no error message carries a control character.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match meshca::config::MeshConfig::parse(text, "fuzz.toml") {
        Ok(cfg) => {
            for ca in &cfg.cas {
                let _ = ca.policy.validate();
            }
            for w in &cfg.workloads {
                let _ = w.sans(&meshca::identity::TrustDomain::default());
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                !msg.chars().any(|c| c.is_control()),
                "error messages carry no control character: {msg:?}"
            );
        }
    }
});
