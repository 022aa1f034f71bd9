//! The CLI as packagers and terminal users meet it: shell completions and man pages checked by
//! the real bash and groff, progress drawn on a pseudo-terminal (util-linux `script`) and
//! never elsewhere, and every printed Kubernetes manifest accepted by kubernetes-validate
//! (PyPI, installed by .ci/run) and parsed back to the same keys and values.

use std::path::Path;
use std::process::{Command, Stdio};

mod common;
use common::Env;

impl Env {
    /// Runs meshca under `script`, so that its stdin, stdout and stderr are a pseudo-terminal;
    /// returns everything the terminal received.
    fn on_pty(&self, args: &[&str]) -> String {
        let line = std::iter::once(env!("CARGO_BIN_EXE_meshca"))
            .chain(args.iter().copied())
            .map(shell_quote)
            .collect::<Vec<_>>()
            .join(" ");
        let o = Command::new("script")
            .args(["-q", "-e", "-c", &line, "/dev/null"])
            .env("MESHCA_HOME", self.path("home"))
            .env("TERM", "xterm")
            .env_remove("RUST_LOG")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "meshca {args:?} on a pty failed: {text}"
        );
        text
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Whether `tool` runs. Missing: panics under `CI=true`, else prints why the test is skipped.
fn require_tool(tool: &str, args: &[&str], test: &str, install: &str) -> bool {
    let ok = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok && std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: `{tool}` does not run and CI=true ({install})");
    }
    if !ok {
        eprintln!("SKIPPED {test}: `{tool}` is not installed ({install})");
    }
    ok
}

/// The top-level subcommands as `meshca --help` lists them (clap renders that list from the
/// same command the completions and man pages are generated from).
fn help_subcommands(env: &Env) -> Vec<String> {
    let help = env.ok(&["--help"]);
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(String::from)
        .collect();
    assert!(names.len() >= 10, "{help}");
    names
}

#[test]
fn bash_completes_every_subcommand_from_the_generated_script() {
    if !require_tool("bash", &["-c", "true"], "bash completions", "Debian bash") {
        return;
    }
    let env = Env::new();
    let script = env.path("meshca.bash");
    std::fs::write(&script, env.ok(&["completions", "bash"])).unwrap();
    // What bash offers after `meshca <TAB>` and after `meshca ca <TAB>`.
    let complete = |words: &str| {
        let o = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words} ''); COMP_CWORD=${{#COMP_WORDS[@]}}; \
                 COMP_CWORD=$((COMP_CWORD-1)); COMP_LINE='{words} '; COMP_POINT=${{#COMP_LINE}}; \
                 _meshca meshca '' \"${{COMP_WORDS[COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                script.display()
            ))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let top = complete("meshca");
    for sub in help_subcommands(&env) {
        assert!(top.contains(&sub), "`meshca <TAB>` lacks {sub}: {top:?}");
    }
    let ca = complete("meshca ca");
    assert!(
        ca.contains(&"list".to_string()) && ca.contains(&"show".to_string()),
        "{ca:?}"
    );
}

#[test]
fn every_shell_gets_a_script_and_an_unknown_shell_is_refused() {
    let env = Env::new();
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let s = env.ok(&["completions", shell]);
        for sub in help_subcommands(&env) {
            assert!(s.contains(&sub), "{shell} completions lack {sub}");
        }
    }
    let o = env.run(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tcsh"), "{err}");
}

#[test]
fn man_pages_render_with_groff_and_name_every_subcommand() {
    if !require_tool("groff", &["-v"], "man page", "Debian groff-base") {
        return;
    }
    let env = Env::new();
    let render = |page: &Path| {
        let o = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww"])
            .arg(page)
            .output()
            .unwrap();
        assert!(o.status.success());
        assert!(
            o.stderr.is_empty(),
            "groff warns about {}: {}",
            page.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    std::fs::write(env.path("meshca.1"), env.ok(&["man"])).unwrap();
    let text = render(&env.path("meshca.1"));
    let subs = help_subcommands(&env);
    for sub in &subs {
        assert!(
            text.contains(&format!("meshca-{sub}(1)")),
            "meshca.1 lacks {sub}"
        );
    }
    // --out-dir: one page per subcommand, each a valid page of its own.
    let out = env.ok(&["man", "--out-dir", "man1"]);
    for sub in &subs {
        let page = env.path(&format!("man1/meshca-{sub}.1"));
        assert!(page.exists(), "no {}: {out}", page.display());
        assert!(render(&page).contains(&format!("meshca-{sub}")));
    }
    assert!(env.path("man1/meshca-ca-list.1").exists());
}

#[test]
fn rsa_4096_init_shows_progress_on_a_terminal_and_nothing_elsewhere() {
    if !require_tool("script", &["-V"], "pty progress", "Debian bsdutils") {
        return;
    }
    let env = Env::new();
    let tty = env.on_pty(&["init", "--ca", "big", "--key", "rsa-4096"]);
    assert!(
        tty.contains("generating a rsa-4096 key for CA big"),
        "no progress on the terminal: {tty:?}"
    );
    assert!(tty.contains("created"), "{tty:?}");

    // Not a terminal: stderr stays empty, stdout is only the report.
    let o = env.run(&["init", "--ca", "big2", "--key", "rsa-4096"]);
    assert!(o.status.success());
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(!out.contains("generating"), "{out}");

    // A terminal but --output json: JSON only, no progress drawn.
    let json = env.on_pty(&["init", "--ca", "big3", "--key", "rsa-4096", "-o", "json"]);
    assert!(!json.contains("generating"), "{json:?}");
    let report: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(report[0]["name"], "big3");
}

#[test]
fn init_config_counts_cas_and_workloads_on_a_terminal() {
    if !require_tool("script", &["-V"], "pty progress", "Debian bsdutils") {
        return;
    }
    let env = Env::new();
    std::fs::write(
        env.path("mesh.toml"),
        r#"
[[ca]]
name = "root"
key = "rsa-3072"

[[ca]]
name = "team"
parent = "root"

[[workload]]
name = "web"
ca = "team"
namespace = "shop"
service_account = "web"

[[workload]]
name = "db"
ca = "team"
namespace = "shop"
service_account = "db"
"#,
    )
    .unwrap();
    let tty = env.on_pty(&["init", "--config", "mesh.toml"]);
    assert!(tty.contains("2 CAs, 2 workloads"), "{tty:?}");
    assert!(tty.contains("/4"), "a bar of 4 steps: {tty:?}");
    // The same file again, not on a terminal: nothing on stderr.
    let o = env.run(&["init", "--config", "mesh.toml", "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Validates `manifest` with kubernetes-validate (strict: unknown fields are errors).
fn kubernetes_validate(env: &Env, name: &str, manifest: &str) {
    let file = env.path(name);
    std::fs::write(&file, manifest).unwrap();
    let o = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "kubernetes-validate rejects {name}: {}{}\n{manifest}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn printed_manifests_pass_kubernetes_validate_and_parse_back() {
    if !require_tool(
        "kubernetes-validate",
        &["--version"],
        "manifests",
        "pip install kubernetes-validate",
    ) {
        return;
    }
    use base64::Engine;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .map(|b| String::from_utf8(b).unwrap())
            .unwrap()
    };
    let env = Env::new();
    env.ok(&["init", "--ca", "gateway"]);
    let secret = env.ok(&[
        "issue",
        "--ca",
        "gateway",
        "--dns",
        "gw.example.com",
        "--secret",
        "istio-ingress/gateway-ca-tls",
    ]);
    kubernetes_validate(&env, "secret.yaml", &secret);
    let v: serde_json::Value = serde_saphyr::from_str(&secret).unwrap();
    assert_eq!(v["apiVersion"], "v1");
    assert_eq!(v["kind"], "Secret");
    assert_eq!(v["type"], "kubernetes.io/tls");
    assert_eq!(v["metadata"]["name"], "gateway-ca-tls");
    assert_eq!(v["metadata"]["namespace"], "istio-ingress");
    assert_eq!(
        v["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "meshca"
    );
    assert_eq!(v["metadata"]["labels"]["meshca.io/ca"], "gateway");
    let ledger: Vec<meshca::issue::LedgerEntry> =
        serde_json::from_str(&env.ok(&["ledger", "-o", "json"])).unwrap();
    assert_eq!(
        v["metadata"]["annotations"]["meshca.io/serial"],
        ledger[0].serial.as_str()
    );
    assert!(v["metadata"]["annotations"]["meshca.io/not-after"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let keys: Vec<&str> = v["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
    // Each base64 value on one line, as serde_yaml (and kubectl) printed it.
    for k in keys {
        let line = format!("\n  {k}: {}\n", v["data"][k].as_str().unwrap());
        assert!(
            secret.contains(&line),
            "{k} is not one plain line:\n{secret}"
        );
    }
    assert_eq!(
        b64(&v["data"]["ca.crt"]),
        env.ok(&["ca", "show", "gateway", "--pem"])
    );
    assert!(b64(&v["data"]["tls.crt"]).starts_with("-----BEGIN CERTIFICATE-----\n"));
    assert!(b64(&v["data"]["tls.key"]).starts_with("-----BEGIN PRIVATE KEY-----\n"));

    env.ok(&["bundle", "create", "mesh", "--ca", "gateway"]);
    let cm = env.ok(&[
        "bundle",
        "configmap",
        "mesh",
        "--namespace",
        "istio-system",
        "--configmap-name",
        "mesh-ca",
    ]);
    kubernetes_validate(&env, "configmap.yaml", &cm);
    let v: serde_json::Value = serde_saphyr::from_str(&cm).unwrap();
    assert_eq!(v["kind"], "ConfigMap");
    assert_eq!(v["metadata"]["name"], "mesh-ca");
    assert_eq!(v["metadata"]["namespace"], "istio-system");
    assert_eq!(v["metadata"]["labels"]["meshca.io/bundle"], "mesh");
    assert_eq!(
        v["data"]["ca.crt"].as_str().unwrap(),
        env.ok(&["bundle", "export", "mesh"])
    );

    // `init --config` writes a Secret manifest file for a workload with `secret`.
    std::fs::write(
        env.path("mesh.toml"),
        r#"
[[ca]]
name = "shop"

[[workload]]
name = "web"
ca = "shop"
namespace = "shop"
service_account = "web"
secret = "shop/web-tls"
"#,
    )
    .unwrap();
    env.ok(&["init", "--config", "mesh.toml"]);
    let file = std::fs::read_to_string(env.path("out/web-secret.yaml")).unwrap();
    kubernetes_validate(&env, "web-secret.yaml", &file);
    let v: serde_json::Value = serde_saphyr::from_str(&file).unwrap();
    assert_eq!(v["metadata"]["namespace"], "shop");
    assert_eq!(v["metadata"]["name"], "web-tls");
    assert_eq!(v["type"], "kubernetes.io/tls");
}
