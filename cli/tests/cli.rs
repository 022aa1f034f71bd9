//! End-to-end tests of the `meshca` binary: happy paths, every bad input the issue lists, and
//! crash safety. openssl (a Debian package .ci/run installs) makes the external CSRs.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use meshca::report::IssueReport;

mod common;
use common::{openssl, openssl_csr, Env, P256};

impl Env {
    /// Runs a command that must fail with exit 1 and one clear stderr line; returns that line.
    fn fails(&self, args: &[&str]) -> String {
        self.fails_with(1, args)
    }
    /// Like [`Env::fails`] with exit `code` (2: not the user's fault, e.g. an unusable store).
    fn fails_with(&self, code: i32, args: &[&str]) -> String {
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(
            o.status.code(),
            Some(code),
            "meshca {args:?}: expected exit {code}, stderr: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        let lines: Vec<_> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr, got: {err}");
        assert!(lines[0].starts_with("meshca: error: "), "{err}");
        lines[0].to_string()
    }
    /// Signing `csr` with `ca` must fail cleanly; returns the error line.
    fn csr_fails(&self, ca: &str, csr: &str) -> String {
        self.fails(&["issue", "--ca", ca, "--csr", csr, "--out-dir", "x"])
    }
    fn ledger_len(&self) -> usize {
        fs::read_to_string(self.home().join("ledger.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
    fn init_mesh(&self) {
        self.ok(&["init", "--ca", "ca1", "--ca", "ca2", "--max-ttl", "30d"]);
    }
}

#[test]
fn init_is_idempotent_and_keys_are_private() {
    let env = Env::new();
    let out = env.ok(&["init", "--ca", "ca1", "--ca", "ca2"]);
    assert!(out.contains("ca1") && out.contains("created"), "{out}");
    let again = env.ok(&["init", "--ca", "ca1", "--ca", "ca2"]);
    assert_eq!(again.matches("exists").count(), 2, "{again}");
    let key = env.home().join("cas/ca1/ca.key");
    assert_eq!(fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
    assert_eq!(fs::metadata(env.home()).unwrap().mode() & 0o777, 0o700);
    let before = fs::read(env.home().join("cas/ca1/ca.crt")).unwrap();
    env.ok(&["init", "--ca", "ca1", "--force"]);
    assert_ne!(
        fs::read(env.home().join("cas/ca1/ca.crt")).unwrap(),
        before,
        "--force replaces"
    );
    // Intermediates and every key type.
    env.ok(&[
        "init",
        "--ca",
        "team",
        "--parent",
        "ca1",
        "--key",
        "ecdsa-p384",
    ]);
    env.ok(&["init", "--ca", "ed", "--key", "ed25519"]);
    env.ok(&["init", "--ca", "rsa", "--key", "rsa-3072"]);
    let list: Vec<meshca::report::CaSummary> =
        serde_json::from_str(&env.ok(&["ca", "list", "-o", "json"])).unwrap();
    let kinds: Vec<_> = list
        .iter()
        .map(|c| (c.name.as_str(), c.kind.as_str(), c.key.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("ca1", "root", "ecdsa-p256"),
            ("ca2", "root", "ecdsa-p256"),
            ("ed", "root", "ed25519"),
            ("rsa", "root", "rsa-3072"),
            ("team", "intermediate", "ecdsa-p384")
        ]
    );
}

#[test]
fn issue_files_json_and_secret() {
    let env = Env::new();
    env.init_mesh();
    env.ok(&[
        "bundle",
        "create",
        "frontend",
        "--ca",
        "ca1",
        "--ca",
        "ca2",
        "--file",
        "ca_1_ca_2_bundle.pem",
    ]);
    let out = env.ok(&[
        "issue",
        "--ca",
        "ca1",
        "--namespace",
        "mesh",
        "--service-account",
        "frontend",
        "--dns",
        "frontend.mesh.svc",
        "--out-dir",
        "certs",
        "--bundle",
        "frontend",
        "-o",
        "json",
    ]);
    let r: IssueReport = serde_json::from_str(&out).unwrap();
    assert_eq!(
        r.sans,
        [
            "URI:spiffe://cluster.local/ns/mesh/sa/frontend",
            "DNS:frontend.mesh.svc"
        ]
    );
    let files = r.files.unwrap();
    assert_eq!(files.key, Path::new("certs/frontend_key.pem"));
    assert_eq!(
        fs::metadata(env.path("certs/frontend_key.pem"))
            .unwrap()
            .mode()
            & 0o777,
        0o600
    );
    assert!(env.path("certs/frontend_cert_chain.pem").exists());
    let bundle = fs::read_to_string(env.path("certs/ca_1_ca_2_bundle.pem")).unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
    let o = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            "certs/ca_1_ca_2_bundle.pem",
            "certs/frontend_cert_chain.pem",
        ])
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));

    // JSON to stdout carries the PEMs when no directory is given.
    let r: IssueReport = serde_json::from_str(&env.ok(&[
        "issue",
        "--ca",
        "ca2",
        "--dns",
        "green.mesh.svc",
        "-o",
        "json",
    ]))
    .unwrap();
    assert!(r
        .certificate_chain_pem
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert!(r.private_key_pem.unwrap().contains("BEGIN PRIVATE KEY"));
    assert!(r.ca_pem.unwrap().contains("BEGIN CERTIFICATE"));

    // Gateway flow: a kubernetes.io/tls Secret manifest whose ca.crt is the gateway root.
    env.ok(&["init", "--ca", "gateway"]);
    let yaml = env.ok(&[
        "issue",
        "--ca",
        "gateway",
        "--dns",
        "tenanta.example.com",
        "--dns",
        "tenantb.example.com",
        "--secret",
        "istio-ingress/gateway-ca-tls",
    ]);
    let v: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(v["type"], "kubernetes.io/tls");
    assert_eq!(v["metadata"]["namespace"], "istio-ingress");
    assert_eq!(v["metadata"]["name"], "gateway-ca-tls");
    for k in ["tls.crt", "tls.key", "ca.crt"] {
        assert!(v["data"][k].as_str().is_some_and(|s| !s.is_empty()), "{k}");
    }
    let root = env.ok(&["ca", "show", "gateway", "--pem"]);
    use base64::Engine;
    let ca_crt = base64::engine::general_purpose::STANDARD
        .decode(v["data"]["ca.crt"].as_str().unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(ca_crt).unwrap(), root);
    assert_eq!(env.ledger_len(), 3);
    let ledger: Vec<meshca::issue::LedgerEntry> =
        serde_json::from_str(&env.ok(&["ledger", "-o", "json"])).unwrap();
    assert_eq!(ledger[2].ca, "gateway");
}

#[test]
fn external_csr_is_signed_with_its_sans_or_overrides() {
    let env = Env::new();
    env.init_mesh();
    let csr = openssl_csr(
        &env,
        "ok",
        P256,
        &["subjectAltName=URI:spiffe://cluster.local/ns/a/sa/b,DNS:b.a.svc"],
    );
    let out = env.ok(&[
        "issue",
        "--ca",
        "ca1",
        "--csr",
        csr.to_str().unwrap(),
        "--name",
        "ext",
        "--out-dir",
        "o",
        "-o",
        "json",
    ]);
    let r: IssueReport = serde_json::from_str(&out).unwrap();
    assert_eq!(
        r.sans,
        ["URI:spiffe://cluster.local/ns/a/sa/b", "DNS:b.a.svc"]
    );
    assert!(!env.path("o/ext_key.pem").exists(), "no key for a CSR");
    // The certificate carries the CSR's key.
    let cert_pub = openssl(&[
        "x509",
        "-in",
        env.path("o/ext_cert.pem").to_str().unwrap(),
        "-noout",
        "-pubkey",
    ])
    .stdout;
    let key_pub = openssl(&[
        "pkey",
        "-in",
        env.path("ok.key").to_str().unwrap(),
        "-pubout",
    ])
    .stdout;
    assert_eq!(cert_pub, key_pub);
    let out = env.ok(&[
        "issue",
        "--ca",
        "ca1",
        "--csr",
        csr.to_str().unwrap(),
        "--dns",
        "other.svc",
        "-o",
        "json",
    ]);
    let r: IssueReport = serde_json::from_str(&out).unwrap();
    assert_eq!(r.sans, ["DNS:other.svc"]);
    // inspect reports the CSR and its valid signature.
    let ins = env.ok(&["inspect", csr.to_str().unwrap()]);
    assert!(
        ins.contains("certificate request") && ins.contains("signature    valid"),
        "{ins}"
    );
}

#[test]
fn bad_inputs_fail_cleanly_without_changing_state() {
    let env = Env::new();
    env.init_mesh();
    env.ok(&[
        "issue",
        "--ca",
        "ca1",
        "--dns",
        "seed.svc",
        "--out-dir",
        "seed",
    ]);
    let ledger_before = env.ledger_len();
    let home_before = snapshot(&env.home());

    // Garbage and malformed PEM.
    fs::write(env.path("garbage.pem"), b"this is not pem\n").unwrap();
    let e = env.fails(&["inspect", "garbage.pem"]);
    assert!(e.contains("no PEM block"), "{e}");
    fs::write(
        env.path("broken.pem"),
        b"-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(env
        .fails(&["inspect", "broken.pem"])
        .contains("malformed PEM"));
    assert!(env.csr_fails("ca1", "garbage.pem").contains("no PEM block"));
    fs::write(
        env.path("notcsr.pem"),
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    )
    .unwrap();
    assert!(env.csr_fails("ca1", "notcsr.pem").contains("PKCS#10"));

    // A CSR whose signature does not match (one bit flipped in the signature).
    let good = openssl_csr(&env, "tamper", P256, &["subjectAltName=DNS:t.svc"]);
    let mut der = pem::parse(fs::read(&good).unwrap())
        .unwrap()
        .into_contents();
    let n = der.len();
    der[n - 3] ^= 0x01;
    fs::write(
        env.path("badsig.csr"),
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der)),
    )
    .unwrap();
    let e = env.csr_fails("ca1", "badsig.csr");
    assert!(e.contains("proof of possession"), "{e}");

    // A CSR asking for CA:TRUE.
    let ca_csr = openssl_csr(
        &env,
        "isca",
        P256,
        &[
            "basicConstraints=critical,CA:TRUE",
            "subjectAltName=DNS:x.svc",
        ],
    );
    let e = env.csr_fails("ca1", ca_csr.to_str().unwrap());
    assert!(e.contains("CA:TRUE"), "{e}");

    // A disallowed SAN (the CA only allows *.svc names here).
    env.ok(&["init", "--ca", "strict", "--allow-dns", "*.svc"]);
    let evil = openssl_csr(&env, "evil", P256, &["subjectAltName=DNS:evil.example.com"]);
    let e = env.csr_fails("strict", evil.to_str().unwrap());
    assert!(
        e.contains("evil.example.com") && e.contains("denies"),
        "{e}"
    );
    let e = env.fails(&[
        "issue",
        "--ca",
        "strict",
        "--dns",
        "*.svc",
        "--out-dir",
        "x",
    ]);
    assert!(e.contains("wildcard"), "{e}");

    // Unknown CA.
    assert!(env
        .fails(&["issue", "--ca", "nope", "--dns", "a.svc"])
        .contains("unknown CA \"nope\""));
    // RSA under 2048 bits: as a CA key, as a workload key, and in a CSR.
    assert!(env
        .fails(&["init", "--ca", "weak", "--key", "rsa-1024"])
        .contains("under 2048"));
    assert!(env
        .fails(&["issue", "--ca", "ca1", "--dns", "a.svc", "--key", "rsa-1024"])
        .contains("under 2048"));
    let weak = openssl_csr(
        &env,
        "weak",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
        &["subjectAltName=DNS:w.svc"],
    );
    assert!(env
        .csr_fails("ca1", weak.to_str().unwrap())
        .contains("1024 bits"));
    // TTL over the policy maximum (30d).
    assert!(env
        .fails(&["issue", "--ca", "ca1", "--dns", "a.svc", "--ttl", "31d"])
        .contains("over the maximum"));
    // Oversized input.
    fs::write(env.path("huge.pem"), vec![b'A'; 2 * 1024 * 1024]).unwrap();
    assert!(env
        .fails(&["inspect", "huge.pem"])
        .contains("over the 1048576-byte limit"));
    assert!(env.csr_fails("ca1", "huge.pem").contains("limit"));
    // Missing file.
    assert!(env
        .fails(&["issue", "--ca", "ca1", "--csr", "missing.csr"])
        .contains("missing.csr"));
    assert!(env
        .fails(&["inspect", "missing.pem"])
        .contains("No such file"));
    // Bad flags and identities.
    assert!(env
        .fails(&["issue", "--ca", "ca1", "--spiffe-id", "http://x/y"])
        .contains("spiffe://"));
    assert!(env
        .fails(&["issue", "--ca", "ca1", "--dns", "bad name"])
        .contains("DNS name"));
    assert!(env.fails(&["issue", "--ca", "ca1"]).contains("no SAN"));
    assert!(env
        .fails(&[
            "issue",
            "--ca",
            "ca1",
            "--dns",
            "a.svc",
            "--name",
            "../escape"
        ])
        .contains("workload name"));
    assert!(env
        .fails(&["bundle", "create", "b", "--ca", "nope"])
        .contains("unknown CA"));

    // Nothing was written by any failure: no output directory, no ledger line, same home.
    assert!(!env.path("x").exists(), "no partial output directory");
    assert_eq!(env.ledger_len(), ledger_before);
    let mut after = snapshot(&env.home());
    after.retain(|(p, _)| !p.starts_with("cas/strict"));
    assert_eq!(after, home_before, "the home is unchanged by failures");
}

#[test]
fn missing_or_unwritable_home() {
    let env = Env::new();
    // An unusable store exits 2 (store errors are not input errors), still with one line.
    let e = env.fails_with(2, &["issue", "--ca", "ca1", "--dns", "a.svc"]);
    assert!(
        e.contains("no meshca home") && e.contains("meshca init"),
        "{e}"
    );
    fs::write(env.path("file"), b"x").unwrap();
    let bad = env.path("file").join("home");
    let e = env.fails(&["--home", bad.to_str().unwrap(), "init", "--ca", "ca1"]);
    assert!(
        e.contains("Not a directory") || e.contains("not a directory"),
        "{e}"
    );
    let e = env.fails_with(
        2,
        &[
            "--home",
            env.dir.path().to_str().unwrap(),
            "init",
            "--ca",
            "ca1",
        ],
    );
    assert!(e.contains("not a meshca home"), "{e}");
}

#[test]
fn usage_errors_exit_1_and_internal_help_exits_0() {
    let env = Env::new();
    let e = env.fails(&["issue", "--bogus"]);
    assert!(e.contains("--bogus"), "{e}");
    let e = env.fails(&["issue", "--dns", "a.svc"]);
    assert!(e.contains("--ca"), "{e}");
    let o = env.run(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Usage"));
}

#[test]
fn bundle_commands() {
    let env = Env::new();
    env.init_mesh();
    env.ok(&[
        "bundle",
        "create",
        "frontend",
        "--ca",
        "ca1",
        "--namespace",
        "mesh",
    ]);
    assert!(env
        .fails(&["bundle", "create", "frontend", "--ca", "ca2"])
        .contains("already exists"));
    let r: meshca::report::BundleReport = serde_json::from_str(&env.ok(&[
        "bundle", "update", "frontend", "--add-ca", "ca2", "-o", "json",
    ]))
    .unwrap();
    assert_eq!(r.cas, ["ca1", "ca2"]);
    assert_eq!(r.anchors.len(), 2);
    let pem = env.ok(&["bundle", "export", "frontend"]);
    assert_eq!(pem, r.pem);
    let cm: serde_json::Value =
        serde_saphyr::from_str(&env.ok(&["bundle", "configmap", "frontend"])).unwrap();
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["namespace"], "mesh");
    assert_eq!(cm["data"]["ca.crt"].as_str().unwrap(), r.pem);
    let r: meshca::report::BundleReport = serde_json::from_str(&env.ok(&[
        "bundle",
        "update",
        "frontend",
        "--remove-ca",
        "ca1",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(r.cas, ["ca2"]);
    assert!(env
        .fails(&["bundle", "show", "nope"])
        .contains("unknown trust bundle"));
}

#[test]
fn inspect_and_verify_against_bundles() {
    let env = Env::new();
    env.init_mesh();
    env.ok(&["bundle", "create", "both", "--ca", "ca1", "--ca", "ca2"]);
    env.ok(&["bundle", "create", "one", "--ca", "ca1"]);
    env.ok(&[
        "issue",
        "--ca",
        "ca2",
        "--namespace",
        "mesh",
        "--service-account",
        "green",
        "--out-dir",
        "o",
    ]);
    let ins: meshca::inspect::Inspection = serde_json::from_str(&env.ok(&[
        "inspect",
        "o/green_cert_chain.pem",
        "--bundle",
        "both",
        "-o",
        "json",
    ]))
    .unwrap();
    let v = ins.verification.unwrap();
    assert!(v.valid_for_server && v.valid_for_client);
    let ins: meshca::inspect::Inspection = serde_json::from_str(&env.ok(&[
        "inspect",
        "o/green_cert_chain.pem",
        "--bundle",
        "one",
        "-o",
        "json",
    ]))
    .unwrap();
    assert!(ins
        .verification
        .unwrap()
        .error
        .unwrap()
        .contains("unknown issuer"));
    env.ok(&["verify", "o/green_cert_chain.pem", "--bundle", "both"]);
    assert!(env
        .fails(&["verify", "o/green_cert_chain.pem", "--bundle", "one"])
        .contains("does not verify"));
    // A private key file is described, never printed.
    let key_text = fs::read_to_string(env.path("o/green_key.pem")).unwrap();
    let out = env.ok(&["inspect", "o/green_key.pem"]);
    assert!(out.contains("content not shown"), "{out}");
    let body = key_text.lines().nth(1).unwrap();
    assert!(!out.contains(body));
}

/// Issue 9: an intermediate is created within its parent's name constraints, and issuance
/// checks the constraints of every CA on the chain, not only the issuing one.
#[test]
fn name_constraints_hold_down_the_chain() {
    let env = Env::new();
    env.ok(&[
        "init",
        "--ca",
        "corp",
        "--permit-dns",
        "example.com",
        "--exclude-dns",
        "secret.example.com",
    ]);
    let e = env.fails(&[
        "init",
        "--ca",
        "team",
        "--parent",
        "corp",
        "--permit-dns",
        "other.org",
    ]);
    assert!(
        e.contains("other.org") && e.contains("example.com") && e.contains("corp"),
        "{e}"
    );
    assert!(
        !env.home().join("cas/team").exists(),
        "nothing is stored for the refused intermediate"
    );
    // Within the root's subtree but not its exclusion: created; the root's exclusion still
    // holds for what it issues.
    env.ok(&[
        "init",
        "--ca",
        "team",
        "--parent",
        "corp",
        "--permit-dns",
        "example.com",
    ]);
    env.ok(&[
        "issue",
        "--ca",
        "team",
        "--dns",
        "api.example.com",
        "--out-dir",
        "ok",
    ]);
    let ledger = env.ledger_len();
    for bad in ["api.other.org", "api.secret.example.com"] {
        let e = env.fails(&["issue", "--ca", "team", "--dns", bad, "--out-dir", "bad"]);
        assert!(e.contains(bad) && e.contains("name constraints"), "{e}");
    }
    assert_eq!(env.ledger_len(), ledger, "refusals leave no ledger line");
    assert!(!env.path("bad").exists());
    // No --permit-dns: the intermediate inherits its parent's permitted subtrees.
    env.ok(&["init", "--ca", "team2", "--parent", "corp"]);
    let e = env.fails(&[
        "issue",
        "--ca",
        "team2",
        "--dns",
        "api.other.org",
        "--out-dir",
        "bad",
    ]);
    assert!(e.contains("api.other.org"), "{e}");
}

/// Issue 9: errors quote input with control characters escaped. TOML with a vertical tab,
/// ESC and the 0x1c-0x1e separators, PEM and CSRs carrying them, and a file name with ESC:
/// every failure is one line on stderr without a control byte.
#[test]
fn errors_never_echo_control_characters() {
    let env = Env::new();
    env.init_mesh();
    let controls = [0x0bu8, 0x1b, 0x1c, 0x1d, 0x1e];
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("vt.toml", b"trust_domain = \"a\x0bb\"\n".to_vec()),
        ("esc.toml", b"\x1b[31m = 1\n".to_vec()),
        ("sep.toml", b"[[ca]]\nname = \"ca\x1c\x1d\x1e\"\n".to_vec()),
        ("bare.toml", b"[[ca]]\nname = ca\x1b[2J\n".to_vec()),
        (
            "escaped.toml",
            b"[[ca]]\nname = \"c\\u001b[2Ja\"\n".to_vec(),
        ),
        (
            "unknown.toml",
            b"[[ca]]\nname = \"c\"\n\"x\\u001b[2J\" = 1\n".to_vec(),
        ),
    ];
    for (i, c) in controls.iter().enumerate() {
        let mut toml = format!("[[ca]]\nname = \"x{i}\"\nkey = \"").into_bytes();
        toml.push(*c);
        toml.extend_from_slice(b"\"\n");
        files.push((
            ["k0.toml", "k1.toml", "k2.toml", "k3.toml", "k4.toml"][i],
            toml,
        ));
    }
    let mut pem =
        b"-----BEGIN CERTIFICATE\x1b[31m-----\nAAAA\n-----END CERTIFICATE\x1b[31m-----\n".to_vec();
    files.push(("label.pem", pem.clone()));
    pem.extend_from_slice(b"\x0b\x1c\x1d\x1e");
    files.push(("tail.pem", pem));
    files.push((
        "body.pem",
        b"-----BEGIN CERTIFICATE-----\nAA\x1bAA\x0b\n-----END CERTIFICATE-----\n".to_vec(),
    ));
    for (name, bytes) in &files {
        fs::write(env.path(name), bytes).unwrap();
    }
    let esc_name = "no\x1b[2Jsuch\x0bfile.pem";
    let mut runs: Vec<Vec<String>> = Vec::new();
    for (name, _) in &files {
        if name.ends_with(".toml") {
            runs.push(vec!["init".into(), "--config".into(), name.to_string()]);
        } else {
            runs.push(vec!["inspect".into(), name.to_string()]);
            runs.push(
                ["issue", "--ca", "ca1", "--csr", name, "--out-dir", "x"]
                    .map(String::from)
                    .to_vec(),
            );
            runs.push(
                ["verify", name, "--bundle", name]
                    .map(String::from)
                    .to_vec(),
            );
        }
    }
    runs.push(vec!["inspect".into(), esc_name.into()]);
    runs.push(vec!["init".into(), "--config".into(), esc_name.into()]);
    for args in &runs {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = env.run(&args);
        for (what, out) in [("stderr", &o.stderr), ("stdout", &o.stdout)] {
            let bad: Vec<u8> = out
                .iter()
                .copied()
                .filter(|b| (*b < 0x20 && *b != b'\n') || *b == 0x7f)
                .collect();
            assert!(
                bad.is_empty(),
                "meshca {args:?}: control bytes {bad:x?} on {what}: {:?}",
                String::from_utf8_lossy(out)
            );
        }
        // `inspect` shows a PEM block of an unknown label instead of failing; everything else fails
        // with one line.
        let shows_label = args[0] == "inspect" && ["label.pem", "tail.pem"].contains(&args[1]);
        if !shows_label {
            assert_eq!(o.status.code(), Some(1), "meshca {args:?}");
            let lines = o.stderr.iter().filter(|b| **b == b'\n').count();
            assert_eq!(lines, 1, "{args:?}");
        }
    }
}

/// Issue 9: SANs of forms meshca does not check (otherName, directoryName, registeredID)
/// are refused with their name instead of being dropped silently.
#[test]
fn csr_with_unchecked_san_forms_is_refused() {
    let env = Env::new();
    env.init_mesh();
    for (i, ext) in [
        "subjectAltName=DNS:a.svc,otherName:1.3.6.1.4.1.311.20.2.3;UTF8:admin@corp",
        "subjectAltName=DNS:a.svc,dirName:dir_sect",
        "subjectAltName=DNS:a.svc,RID:1.2.3.4",
    ]
    .iter()
    .enumerate()
    {
        let csr = if ext.contains("dirName") {
            // openssl reads a dirName from a config section.
            let cnf = env.path("dir.cnf");
            fs::write(
                &cnf,
                "[req]\ndistinguished_name=dn\n[dn]\n[dir_sect]\nCN=root\n",
            )
            .unwrap();
            let key = env.path("dir.key");
            openssl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                key.to_str().unwrap(),
            ]);
            let csr = env.path("dir.csr");
            openssl(&[
                "req",
                "-new",
                "-config",
                cnf.to_str().unwrap(),
                "-key",
                key.to_str().unwrap(),
                "-subj",
                "/CN=ext",
                "-addext",
                ext,
                "-out",
                csr.to_str().unwrap(),
            ]);
            csr
        } else {
            openssl_csr(&env, &format!("odd{i}"), P256, &[ext])
        };
        let e = env.csr_fails("ca1", csr.to_str().unwrap());
        let form = ["otherName", "directoryName", "registeredID"][i];
        assert!(e.contains(form), "{ext}: {e}");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// (relative path, content) of every file under `root`, sorted.
fn snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = walk(root)
        .into_iter()
        .filter(|p| p.file_name().unwrap() != ".lock")
        .map(|p| {
            (
                p.strip_prefix(root).unwrap().to_path_buf(),
                fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}
