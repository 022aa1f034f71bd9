//! `meshca ca rotate`: the three phases and `--status` through the binary, the prune guard,
//! and kill -9 between any two recorded steps followed by a re-run. openssl verifies the
//! chains (a Debian package .ci/run installs).

#[cfg(feature = "fault-injection")]
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;
use common::Env;

impl Env {
    fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "meshca {args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        err
    }
    fn status(&self, ca: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["ca", "rotate", ca, "--status", "-o", "json"])).unwrap()
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
    /// A root `root`, an intermediate `team` under it, bundle `mesh` holding `team`.
    fn mesh(&self) {
        self.ok(&["init", "--ca", "root"]);
        self.ok(&["init", "--ca", "team", "--parent", "root"]);
        self.ok(&["bundle", "create", "mesh", "--ca", "team"]);
    }
    fn issue(&self, name: &str) -> PathBuf {
        self.ok(&[
            "issue",
            "--ca",
            "team",
            "--dns",
            "a.example",
            "--out-dir",
            "certs",
            "--name",
            name,
        ]);
        self.path(&format!("certs/{name}_cert_chain.pem"))
    }
}

fn verifies(ca_file: &Path, chain: &Path) -> bool {
    // The chain file holds the leaf and the intermediate: pass the intermediate untrusted.
    let o = Command::new("openssl")
        .args(["verify", "-x509_strict", "-CAfile"])
        .arg(ca_file)
        .arg("-untrusted")
        .arg(chain)
        .arg(chain)
        .output()
        .expect("openssl must be installed (.ci/run installs it)");
    o.status.success()
}

fn certs_in(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .unwrap()
        .matches("BEGIN CERTIFICATE")
        .count()
}

#[test]
fn phases_status_and_prune_guard() {
    let e = Env::new();
    e.mesh();
    let old_chain = e.issue("old");
    let old_root = e.write("old-root.pem", &e.ok(&["bundle", "export", "mesh"]));
    assert_eq!(e.status("root")["phase"], "idle");
    assert!(e
        .fails(&["ca", "rotate", "root", "--phase", "activate"])
        .contains("no rotation in progress"));

    let out = e.ok(&[
        "ca",
        "rotate",
        "root",
        "--phase",
        "prepare",
        "--out-dir",
        "pub",
    ]);
    assert!(out.contains("prepare done"), "{out}");
    let published = e.path("pub/mesh_bundle.pem");
    assert_eq!(certs_in(&published), 2, "both roots published");
    let st = e.status("root");
    assert_eq!(st["phase"], "prepared");
    assert_eq!(st["cas"], serde_json::json!(["root", "team"]));
    assert_eq!(st["next"]["bundles"], serde_json::json!(["mesh"]));
    assert_ne!(st["next"]["sha256"], st["current"]["sha256"]);
    assert_eq!(st["next_phase"], "activate");
    // The intermediate rotates with its root, not alone.
    assert!(e
        .fails(&["ca", "rotate", "team", "--phase", "prepare"])
        .contains("rotates with root"));
    // The old CA still issues.
    let mid_chain = e.issue("mid");
    assert!(verifies(&old_root, &mid_chain));

    e.ok(&["ca", "rotate", "root", "--phase", "activate", "--now"]);
    let st = e.status("root");
    assert_eq!(st["phase"], "active");
    assert_eq!(st["renew_now"], true);
    assert!(st["next"].is_null());
    assert_eq!(st["previous"]["bundles"], serde_json::json!(["mesh"]));
    let new_chain = e.issue("new");
    let new_root = e.write("new-root.pem", &e.ok(&["ca", "show", "root", "--pem"]));
    assert!(verifies(&new_root, &new_chain), "the new CA issues");
    assert!(!verifies(&old_root, &new_chain));
    assert!(verifies(&published, &old_chain) && verifies(&published, &new_chain));
    // The ConfigMap manifest carries both roots during the overlap.
    let cm = e.ok(&["bundle", "configmap", "mesh", "--namespace", "apps"]);
    assert_eq!(cm.matches("BEGIN CERTIFICATE").count(), 2, "{cm}");

    // Prune is refused while old-CA certificates are live, naming them.
    let err = e.fails(&["ca", "rotate", "root", "--phase", "prune"]);
    assert!(
        err.contains("prune refused") && err.contains("2 unexpired"),
        "{err}"
    );
    let st = e.status("root");
    assert_eq!(st["blocking_serials"].as_array().unwrap().len(), 2);
    let ledger = e.ok(&["ledger", "-o", "json"]);
    let ledger: serde_json::Value = serde_json::from_str(&ledger).unwrap();
    for entry in ledger.as_array().unwrap().iter().take(2) {
        let serial = entry["serial"].as_str().unwrap();
        assert!(err.contains(serial), "{serial} listed in {err}");
    }
    e.ok(&[
        "ca",
        "rotate",
        "root",
        "--phase",
        "prune",
        "--force",
        "--out-dir",
        "pub",
    ]);
    assert_eq!(certs_in(&published), 1);
    assert!(verifies(&published, &new_chain));
    assert!(!verifies(&published, &old_chain), "old root gone");
    assert_eq!(e.status("root")["phase"], "idle");
    e.ok(&["check"]);
}

#[test]
fn intermediate_rotation_keeps_bundles_and_never_blocks() {
    let e = Env::new();
    e.mesh();
    let before = e.ok(&["bundle", "export", "mesh"]);
    let old_chain = e.issue("old");
    e.ok(&["ca", "rotate", "team", "--phase", "prepare"]);
    assert_eq!(
        e.ok(&["bundle", "export", "mesh"]),
        before,
        "bundles hold roots"
    );
    e.ok(&["ca", "rotate", "team", "--phase", "activate"]);
    e.ok(&["ca", "rotate", "team", "--phase", "prune"]);
    let root = e.write("root.pem", &before);
    assert!(verifies(&root, &old_chain), "still trusted: same root");
    assert!(verifies(&root, &e.issue("new")));
}

/// Starts `meshca ca rotate root --phase ...`, which hangs right after `step` is recorded
/// (the `fault-injection` hook), and returns it once it hangs.
#[cfg(feature = "fault-injection")]
fn hang_after(e: &Env, phase_args: &[&str], step: &str) -> std::process::Child {
    let mut args = vec!["ca", "rotate", "root", "--phase"];
    args.extend_from_slice(phase_args);
    let mut child = e
        .cmd(&args)
        .env("MESHCA_DANGER_HANG_AFTER_STEP", step)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("hanging after step") => break,
            Some(Ok(l)) => seen.push_str(&l),
            _ => panic!("{args:?} ended before step {step}: {seen}"),
        }
    }
    child
}

/// [`hang_after`], then SIGKILL.
#[cfg(feature = "fault-injection")]
fn kill_after(e: &Env, phase_args: &[&str], step: &str) {
    let mut child = hang_after(e, phase_args, step);
    child.kill().unwrap(); // SIGKILL
    let st = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(9),
        "killed by SIGKILL"
    );
}

/// kill -9, `meshca check`, re-run the phase, `meshca check`; returns the phase afterwards.
#[cfg(feature = "fault-injection")]
fn crash_and_rerun(e: &Env, phase_args: &[&str], step: &str) -> String {
    kill_after(e, phase_args, step);
    e.ok(&["check"]);
    let mut args = vec![
        "ca",
        "rotate",
        "root",
        "--phase",
        phase_args[0],
        "--out-dir",
        "pub",
    ];
    args.extend_from_slice(&phase_args[1..]);
    let out = e.ok(&args);
    assert!(out.contains(&format!("{} done", phase_args[0])), "{out}");
    e.ok(&["check"]);
    e.status("root")["phase"].as_str().unwrap().to_string()
}

#[cfg(feature = "fault-injection")]
#[test]
fn kill_9_between_steps_then_rerun_completes_the_phase() {
    let e = Env::new();
    e.mesh();
    e.issue("w");
    let bundle = e.path("pub/mesh_bundle.pem");
    let mut roots_before = e.write("r0.pem", &e.ok(&["bundle", "export", "mesh"]));
    // Each round kills a different step of each phase.
    let rounds: [[&str; 3]; 3] = [
        ["started", "activating", "pruning"],
        ["next-created", "previous-saved", "-"],
        ["-", "swapped:root", "-"],
    ];
    for (i, [prep, act, prune]) in rounds.into_iter().enumerate() {
        if prep == "-" {
            e.ok(&[
                "ca",
                "rotate",
                "root",
                "--phase",
                "prepare",
                "--out-dir",
                "pub",
            ]);
        } else {
            assert_eq!(crash_and_rerun(&e, &["prepare"], prep), "prepared");
        }
        assert_eq!(certs_in(&bundle), 2, "round {i}: both roots published");
        assert_eq!(crash_and_rerun(&e, &["activate"], act), "active");
        // Root and intermediate were both swapped: new certificates chain to the new root.
        let chain = e.issue(&format!("r{i}"));
        assert!(!verifies(&roots_before, &chain), "round {i}");
        assert!(verifies(&bundle, &chain), "round {i}");
        if prune == "-" {
            e.ok(&[
                "ca",
                "rotate",
                "root",
                "--phase",
                "prune",
                "--force",
                "--out-dir",
                "pub",
            ]);
        } else {
            // The ledger check passed before `pruning` was recorded: the re-run needs no
            // --force.
            kill_after(&e, &["prune", "--force"], prune);
            e.ok(&["check"]);
            e.ok(&[
                "ca",
                "rotate",
                "root",
                "--phase",
                "prune",
                "--out-dir",
                "pub",
            ]);
            e.ok(&["check"]);
        }
        assert_eq!(e.status("root")["phase"], "idle");
        assert_eq!(certs_in(&bundle), 1);
        assert!(verifies(&bundle, &chain));
        roots_before = e.write(
            &format!("r{}.pem", i + 1),
            &e.ok(&["bundle", "export", "mesh"]),
        );
    }
}

/// A phase holds the home's rotation lock throughout: a second phase started while the first
/// hangs between two steps fails at once with one line naming the holder's pid, and touches
/// nothing; once the first is killed the lock is free (flock dies with its process).
#[cfg(feature = "fault-injection")]
#[test]
fn a_second_phase_fails_naming_the_holder_while_the_first_runs() {
    let e = Env::new();
    e.mesh();
    let mut first = hang_after(&e, &["prepare"], "next-created");
    let pid = first.id();
    for args in [
        ["ca", "rotate", "root", "--phase", "prepare"],
        ["ca", "rotate", "team", "--phase", "prepare"],
    ] {
        let err = e.fails(&args);
        assert!(
            err.contains("another rotation phase holds the lock")
                && err.contains(&format!("pid {pid} on "))
                && err.contains("meshca ca rotate root --phase prepare"),
            "{err}"
        );
    }
    assert_eq!(e.status("root")["steps"].as_array().unwrap().len(), 2);
    first.kill().unwrap();
    first.wait().unwrap();
    e.ok(&["ca", "rotate", "root", "--phase", "prepare"]);
    assert_eq!(e.status("root")["phase"], "prepared");
    e.ok(&["check"]);
}

/// Two (here eight) `prepare`s racing as separate processes: each either completes or fails
/// with the one-line lock error; the result is one complete rotation (one next CA per name,
/// both roots in the bundle) and `meshca check` passes.
#[test]
fn racing_prepares_make_one_complete_rotation() {
    let e = Env::new();
    e.mesh();
    let kids: Vec<_> = (0..8)
        .map(|_| {
            e.cmd(&["ca", "rotate", "root", "--phase", "prepare", "-o", "json"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut created = 0;
    let mut ok = 0;
    for k in kids {
        let o = k.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        if o.status.success() {
            ok += 1;
            let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let steps = r["steps"].as_array().unwrap();
            if steps.iter().any(|s| s == "next-created") {
                created += 1;
            }
        } else {
            assert_eq!(o.status.code(), Some(1), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(
                err.contains("another rotation phase holds the lock"),
                "{err}"
            );
        }
    }
    assert!(ok >= 1);
    assert_eq!(created, 1, "exactly one process made the next CAs");
    let st = e.status("root");
    assert_eq!(st["phase"], "prepared");
    assert!(st["blocked_by"].as_array().unwrap().is_empty(), "{st}");
    let steps: Vec<&str> = st["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps.iter().filter(|s| **s == "started").count(),
        1,
        "{steps:?}"
    );
    assert_eq!(
        steps.iter().filter(|s| **s == "next-created").count(),
        1,
        "{steps:?}"
    );
    assert_eq!(
        e.ok(&["bundle", "export", "mesh"])
            .matches("BEGIN CERTIFICATE")
            .count(),
        2
    );
    e.ok(&["check"]);
    e.ok(&["ca", "rotate", "root", "--phase", "activate"]);
    e.ok(&["ca", "rotate", "root", "--phase", "prune", "--force"]);
    e.ok(&["check"]);
}

/// Without the `fault-injection` feature (a release build) the hang hook is compiled out: the
/// phase runs through although the variable names one of its steps.
#[cfg(not(feature = "fault-injection"))]
#[test]
fn the_hang_hook_is_compiled_out_without_the_feature() {
    let e = Env::new();
    e.mesh();
    let mut child = e
        .cmd(&["ca", "rotate", "root", "--phase", "prepare"])
        .env("MESHCA_DANGER_HANG_AFTER_STEP", "started")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("prepare hung: the hook is compiled in");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success());
    assert_eq!(e.status("root")["phase"], "prepared");
}
