//! `meshca revoke` and `meshca crl` checked by openssl (`openssl crl -CAfile` verifies the
//! CRL's signature; `openssl verify -crl_check` refuses the revoked certificate and accepts
//! its unrevoked sibling from the same CA).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn meshca(home: &Path, dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshca"))
        .args(args)
        .env("MESHCA_HOME", home)
        .env_remove("RUST_LOG")
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl must be installed (.ci/run installs it)")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn revoked_certificate_is_in_a_verifiable_crl_and_refused() {
    let d = tempfile::tempdir().unwrap();
    let home = d.path().join("home");
    let ok = |args: &[&str]| {
        let o = meshca(&home, d.path(), args);
        assert!(o.status.success(), "meshca {args:?}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    ok(&["init", "--ca", "ca1"]);
    let issue = |name: &str| -> (PathBuf, String) {
        let out = ok(&[
            "issue",
            "--ca",
            "ca1",
            "--dns",
            "a.example",
            "--out-dir",
            ".",
            "--name",
            name,
            "-o",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        (
            d.path().join(format!("{name}_cert.pem")),
            v["serial"].as_str().unwrap().to_string(),
        )
    };
    let (bad, bad_serial) = issue("bad");
    let (good, _) = issue("good");

    // A serial that meshca never issued is refused (exit 1, one line) unless forced.
    let o = meshca(&home, d.path(), &["revoke", "0badc0de"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("not in the ledger"), "{}", text(&o));
    let o = meshca(&home, d.path(), &["revoke", "nothex"]);
    assert_eq!(o.status.code(), Some(1));
    ok(&["revoke", "0badc0de", "--force", "--ca", "ca1"]);

    ok(&["revoke", &bad_serial, "--reason", "key-compromise"]);
    let o = meshca(&home, d.path(), &["revoke", &bad_serial]);
    assert_eq!(o.status.code(), Some(1), "revoking twice: {}", text(&o));

    ok(&["crl", "ca1", "--out", "ca1.crl"]);
    let root = d.path().join("root.pem");
    std::fs::write(&root, ok(&["ca", "show", "ca1", "--pem"])).unwrap();
    let crl = d.path().join("ca1.crl");
    let (crl_s, root_s) = (crl.to_str().unwrap(), root.to_str().unwrap());
    let o = openssl(&["crl", "-in", crl_s, "-CAfile", root_s, "-noout", "-text"]);
    let t = text(&o);
    assert!(o.status.success() && t.contains("verify OK"), "{t}");
    assert!(t.contains("CRL Number") && t.contains("Next Update"), "{t}");
    assert!(t.contains("Key Compromise"), "{t}");
    assert!(t.contains("Version 2"), "{t}");
    let verify = |cert: &Path| {
        openssl(&[
            "verify",
            "-crl_check",
            "-CRLfile",
            crl_s,
            "-CAfile",
            root_s,
            cert.to_str().unwrap(),
        ])
    };
    let o = verify(&bad);
    assert!(!o.status.success(), "revoked cert verified: {}", text(&o));
    assert!(text(&o).contains("certificate revoked"), "{}", text(&o));
    let o = verify(&good);
    assert!(o.status.success(), "{}", text(&o));
    // The bundle ConfigMap can carry the CRLs as `ca.crl`.
    ok(&["bundle", "create", "b", "--ca", "ca1"]);
    let cm = ok(&["bundle", "configmap", "b", "--namespace", "apps", "--crl"]);
    let v: serde_json::Value = serde_saphyr::from_str(&cm).unwrap();
    let cm_crl = d.path().join("cm.crl");
    std::fs::write(&cm_crl, v["data"]["ca.crl"].as_str().unwrap()).unwrap();
    let o = openssl(&[
        "crl",
        "-in",
        cm_crl.to_str().unwrap(),
        "-CAfile",
        root_s,
        "-noout",
        "-text",
    ]);
    assert!(text(&o).contains("verify OK"), "{}", text(&o));
    assert!(text(&o)
        .to_lowercase()
        .contains(&bad_serial.to_lowercase().trim_start_matches('0')[..8]));
    let plain = ok(&["bundle", "configmap", "b", "--namespace", "apps"]);
    assert!(!plain.contains("ca.crl"));
    // stdout form is the same CRL format.
    assert!(ok(&["crl", "ca1"]).starts_with("-----BEGIN X509 CRL-----"));
    ok(&["check"]);
}
