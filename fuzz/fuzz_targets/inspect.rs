//! `meshca inspect` on arbitrary bytes: the library's inspection and its JSON shape.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = time::OffsetDateTime::now_utc();
    if let Ok(ins) = meshca::inspect::inspect(data, "fuzz", now) {
        let json = serde_json::to_string(&ins).expect("an inspection serializes");
        assert!(!json.contains('\u{1b}'), "JSON escapes control characters");
        if let Ok(certs) = meshca::pemutil::parse_certs(data, "fuzz") {
            let _ = meshca::inspect::verify(&certs, &certs, "fuzz", now);
        }
    }
    if let Err(e) = meshca::inspect::inspect(data, "fuzz", now) {
        let msg = e.to_string();
        assert!(
            !msg.chars().any(|c| c.is_control()),
            "error messages carry no control character: {msg:?}"
        );
    }
});
