//! Crash safety at scale: 100 rounds in which `meshca init`, `meshca issue` and
//! `meshca bundle update` run concurrently and some of them are killed with SIGKILL at a
//! random moment. Afterwards the store must be consistent: `meshca check` passes, every
//! ledger line names a certificate that was delivered complete (all three files, the
//! serial in the ledger), every command that exited 0 left its result, and no visible file
//! anywhere is partial.
//!
//! The random delays come from a seed printed at the start (`MESHCA_CRASH_SEED` replays one).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: u64 = 100;

mod common;
use common::Env;

fn spawn(env: &Env, args: &[&str]) -> Child {
    env.cmd(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// xorshift64*: deterministic delays from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Init,
    Issue,
    BundleUpdate,
}

#[test]
fn hundred_rounds_of_kill_9_across_init_issue_and_bundle_update() {
    let started = Instant::now();
    let seed = std::env::var("MESHCA_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash test seed {seed} (MESHCA_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let env = Env::new();
    env.ok(&["init", "--ca", "ca1", "--ca", "ca2", "--max-ttl", "30d"]);
    env.ok(&["bundle", "create", "mesh", "--ca", "ca1"]);
    // Calibrate the kill window to how long a command takes here: kills land anywhere from
    // before the process starts working to after it would have finished.
    let t0 = Instant::now();
    env.ok(&[
        "issue",
        "--ca",
        "ca1",
        "--dns",
        "calib.svc",
        "--name",
        "calib",
        "--out-dir",
        "out/calib",
    ]);
    let window = (t0.elapsed() * 3).as_micros().max(1000) as u64;
    eprintln!("kill window {window} µs");

    let mut finished_ok: Vec<(Kind, String)> = Vec::new();
    let mut killed = [0u32; 3];
    for round in 0..ROUNDS {
        let ca = format!("c{round}");
        let name = format!("w{round}");
        let out_dir = format!("out/{name}");
        let dns = format!("{name}.svc");
        // Alternate adding and removing ca2, so every round really rewrites the bundle.
        let bundle_args: [&str; 4] = if round % 2 == 0 {
            ["bundle", "update", "mesh", "--add-ca"]
        } else {
            ["bundle", "update", "mesh", "--remove-ca"]
        };
        let mut children = vec![
            (Kind::Init, ca.clone(), spawn(&env, &["init", "--ca", &ca])),
            (
                Kind::Issue,
                name.clone(),
                spawn(
                    &env,
                    &[
                        "issue",
                        "--ca",
                        "ca1",
                        "--dns",
                        &dns,
                        "--name",
                        &name,
                        "--out-dir",
                        &out_dir,
                    ],
                ),
            ),
            (Kind::BundleUpdate, round.to_string(), {
                let mut a = bundle_args.to_vec();
                a.push("ca2");
                spawn(&env, &a)
            }),
        ];
        // Kill some of them at a random moment of their run.
        std::thread::sleep(Duration::from_micros(rng.below(window)));
        for (i, (_, _, child)) in children.iter_mut().enumerate() {
            if rng.below(3) != 0 && child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                killed[i] += 1;
            }
        }
        for (kind, what, mut child) in children.drain(..) {
            if child.wait().unwrap().success() {
                finished_ok.push((kind, what));
            }
        }
    }
    eprintln!(
        "killed: {} init, {} issue, {} bundle update; {} commands exited 0; {:?}",
        killed[0],
        killed[1],
        killed[2],
        finished_ok.len(),
        started.elapsed()
    );
    for (i, k) in killed.iter().enumerate() {
        assert!(*k > 0, "command kind {i} was never killed mid-run");
    }

    // The store as a whole.
    let check = env.ok(&["check"]);
    assert!(check.starts_with("ok:"), "{check}");

    // Every ledger line is a certificate delivered complete.
    let ledger: Vec<meshca::issue::LedgerEntry> =
        serde_json::from_str(&env.ok(&["ledger", "-o", "json"])).unwrap();
    for e in &ledger {
        let dns = e
            .sans
            .iter()
            .find_map(|s| s.strip_prefix("DNS:"))
            .unwrap_or_else(|| panic!("ledger line without a DNS SAN: {e:?}"));
        let name = dns.trim_end_matches(".svc");
        let dir = env.path(&format!("out/{name}"));
        let chain = fs::read(dir.join(format!("{name}_cert_chain.pem")))
            .unwrap_or_else(|err| panic!("ledger names {name} but its chain is missing: {err}"));
        let certs = meshca::pemutil::parse_certs(&chain, name).unwrap();
        let leaf = meshca::x509::CertInfo::from_der(&certs[0]).unwrap();
        assert_eq!(leaf.serial_hex(), e.serial, "{name}: ledger vs chain");
        let cert = fs::read(dir.join(format!("{name}_cert.pem"))).unwrap();
        let single = meshca::pemutil::parse_certs(&cert, name).unwrap();
        assert_eq!(single[0], certs[0], "{name}: cert file vs chain file");
        let key = fs::read_to_string(dir.join(format!("{name}_key.pem"))).unwrap();
        let key = meshca::key::PrivateKey::from_pem(&key, name).unwrap();
        assert_eq!(
            key.public_key_der(),
            leaf.spki_der,
            "{name}: key matches the certificate"
        );
    }

    // What exited 0 is there.
    let cas = env.ok(&["ca", "list", "-o", "json"]);
    for (kind, what) in &finished_ok {
        match kind {
            Kind::Issue => assert!(
                ledger
                    .iter()
                    .any(|e| e.sans.contains(&format!("DNS:{what}.svc"))),
                "{what} exited 0 but is not in the ledger"
            ),
            Kind::Init => assert!(
                cas.contains(&format!("\"{what}\"")),
                "CA {what} was created (exit 0) but is not listed"
            ),
            Kind::BundleUpdate => {}
        }
    }
    let bundle = env.ok(&["bundle", "show", "mesh", "-o", "json"]);
    assert!(bundle.contains("\"ca1\""), "{bundle}");
    env.ok(&["bundle", "export", "mesh"]);

    // Every visible file is complete (killed runs leave at most hidden temp files).
    for root in [env.path("out"), env.home()] {
        for entry in walk(&root) {
            let n = entry.file_name().unwrap().to_string_lossy().to_string();
            if n.starts_with('.') {
                continue;
            }
            let text = fs::read(&entry).unwrap();
            if n.ends_with("key.pem") || n.ends_with(".key") {
                meshca::key::PrivateKey::from_pem(std::str::from_utf8(&text).unwrap(), &n)
                    .unwrap_or_else(|e| panic!("{}: {e}", entry.display()));
            } else if n.ends_with(".pem") || n.ends_with(".crt") {
                meshca::pemutil::parse_certs(&text, &n)
                    .unwrap_or_else(|e| panic!("{}: {e}", entry.display()));
            }
        }
    }

    // Two processes creating the same CA at once: exactly one creates it.
    let a = env
        .cmd(&["init", "--ca", "race"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let b = env
        .cmd(&["init", "--ca", "race"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (oa, ob) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let outs = [
        String::from_utf8_lossy(&oa.stdout).to_string(),
        String::from_utf8_lossy(&ob.stdout).to_string(),
    ];
    assert!(oa.status.success() && ob.status.success(), "{outs:?}");
    assert_eq!(
        outs.iter().filter(|o| o.contains("created")).count(),
        1,
        "{outs:?}"
    );
    assert_eq!(
        outs.iter().filter(|o| o.contains("exists")).count(),
        1,
        "{outs:?}"
    );
    env.ok(&["check"]);
    eprintln!("crash test done in {:?}", started.elapsed());
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
