//! The container image: built without a Docker daemon by `deploy/image/build.sh image` (an OCI
//! image layout written by umoci, from a static binary), and `deploy/Dockerfile`, which no test
//! here can build (there is no daemon) but whose final stage is checked against the image.
//!
//! Peers: the image that `.ci/run` builds (`MESHCA_IMAGE_DIR`), the umoci it built it with
//! (`MESHCA_UMOCI_BIN`) and the control plane of tests/cluster/cluster.sh (`MESHCA_E2E_*`).
//! Without them the image tests print why and return; with `CI=true` they fail. The layout is read here, not through umoci: blobs checked against their digests, the
//! layer unpacked with GNU tar (which rejects a truncated archive), and the entrypoint run in a
//! chroot of that root filesystem, as user 65532 when the test runs as root.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use cluster::{repo, text, Cluster};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn image_dir() -> Option<PathBuf> {
    common::peer(
        "MESHCA_IMAGE_DIR",
        "export MESHCA_IMAGE_DIR=/tmp/meshca-image; bash deploy/image/build.sh image $MESHCA_IMAGE_DIR",
    )
}

fn umoci_bin() -> Option<PathBuf> {
    common::peer(
        "MESHCA_UMOCI_BIN",
        "export MESHCA_UMOCI_BIN=$(bash deploy/image/build.sh umoci)",
    )
}

/// What the final stage of deploy/Dockerfile sets, with its ARG defaults substituted.
#[derive(Debug, PartialEq)]
struct Stage {
    from: String,
    copies: Vec<String>,
    runs: Vec<String>,
    user: Option<String>,
    entrypoint: Option<Value>,
    cmd: Option<Value>,
    args: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
}

/// deploy/Dockerfile's stages: instructions joined across `\` continuations, comments dropped.
fn dockerfile() -> Vec<Stage> {
    let src = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in src.lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(
        current.is_empty(),
        "deploy/Dockerfile ends inside a continuation"
    );
    let mut stages: Vec<Stage> = Vec::new();
    for ins in instructions {
        let (op, rest) = ins.split_once(char::is_whitespace).unwrap_or((&ins, ""));
        let rest = rest.trim().to_string();
        let op = op.to_ascii_uppercase();
        if op == "FROM" {
            stages.push(Stage {
                from: rest,
                copies: vec![],
                runs: vec![],
                user: None,
                entrypoint: None,
                cmd: None,
                args: BTreeMap::new(),
                labels: BTreeMap::new(),
            });
            continue;
        }
        let stage = stages
            .last_mut()
            .expect("an instruction before the first FROM");
        let json = |s: &str| -> Value {
            serde_json::from_str(s).unwrap_or_else(|e| panic!("{op} {s}: not a JSON array: {e}"))
        };
        match op.as_str() {
            "COPY" => stage.copies.push(rest),
            "RUN" => stage.runs.push(rest),
            "WORKDIR" => {}
            "USER" => stage.user = Some(rest),
            "ENTRYPOINT" => stage.entrypoint = Some(json(&rest)),
            "CMD" => stage.cmd = Some(json(&rest)),
            "ARG" => {
                let (k, v) = rest.split_once('=').unwrap_or((&rest, ""));
                stage.args.insert(k.to_string(), v.to_string());
            }
            "LABEL" => {
                for pair in rest.split_whitespace() {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("LABEL {pair}: not key=value"));
                    let v = match v.strip_prefix('$') {
                        Some(arg) => stage
                            .args
                            .get(arg)
                            .unwrap_or_else(|| panic!("LABEL {k}=${arg}: no ARG {arg} before it"))
                            .clone(),
                        None => v.to_string(),
                    };
                    stage.labels.insert(k.to_string(), v);
                }
            }
            other => panic!("deploy/Dockerfile: {other} is not an instruction this test knows"),
        }
    }
    stages
}

/// The OCI image layout that build.sh wrote: the manifest tagged with the crate version.
struct Layout {
    dir: PathBuf,
    manifest_digest: String,
    manifest: Value,
    config: Value,
}

impl Layout {
    fn open(dir: &Path) -> Layout {
        let layout: Value = read_json(&dir.join("oci-layout"));
        assert_eq!(layout["imageLayoutVersion"], "1.0.0", "{layout}");
        let index: Value = read_json(&dir.join("index.json"));
        let tagged: Vec<&Value> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["annotations"]["org.opencontainers.image.ref.name"] == VERSION)
            .collect();
        assert_eq!(tagged.len(), 1, "one manifest tagged {VERSION}: {index}");
        let desc = tagged[0];
        assert_eq!(
            desc["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        let mut l = Layout {
            dir: dir.to_path_buf(),
            manifest_digest: desc["digest"].as_str().unwrap().to_string(),
            manifest: Value::Null,
            config: Value::Null,
        };
        l.manifest = serde_json::from_slice(&l.blob(desc)).unwrap();
        l.config = serde_json::from_slice(&l.blob(&l.manifest["config"].clone())).unwrap();
        l
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.dir.join("blobs/sha256").join(hex)
    }

    /// A blob, checked against its descriptor's digest and size.
    fn blob(&self, desc: &Value) -> Vec<u8> {
        let digest = desc["digest"].as_str().unwrap();
        let path = self.blob_path(digest);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(Some(bytes.len() as u64), desc["size"].as_u64(), "{digest}");
        assert_eq!(sha256_file(&path), digest, "{}", path.display());
        bytes
    }
}

/// A program's full path on this process's PATH (the child runs with no environment).
fn on_path(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not on PATH"))
}

/// The image's entrypoint with ARGS, run in a chroot of ROOTFS with only ENV for environment
/// (the program is found here; the entrypoint sees nothing of ours). As root, `chroot
/// --userspec` runs it as the image's user; otherwise a user namespace (`unshare -r`) gives the
/// chroot, as the namespace's root.
fn in_chroot(image: &Layout, rootfs: &Path, env: &[(&str, &str)], args: &[&str]) -> Command {
    let entrypoint: Vec<String> =
        serde_json::from_value(image.config["config"]["Entrypoint"].clone()).unwrap();
    in_chroot_run(image, rootfs, env, &entrypoint, args)
}

/// PROGRAM (a path in the image) with ARGS in a chroot of ROOTFS, as [`in_chroot`] runs the
/// entrypoint.
fn in_chroot_run(
    image: &Layout,
    rootfs: &Path,
    env: &[(&str, &str)],
    program: &[String],
    args: &[&str],
) -> Command {
    let user = image.config["config"]["User"].as_str().unwrap();
    let euid = Command::new("id").arg("-u").output().unwrap();
    let mut cmd = if String::from_utf8_lossy(&euid.stdout).trim() == "0" {
        let mut c = Command::new(on_path("chroot"));
        c.arg(format!("--userspec={user}"));
        c
    } else {
        let mut c = Command::new(on_path("unshare"));
        c.args(["--user", "--map-root-user", "chroot"]);
        c
    };
    cmd.env_clear()
        .envs(env.iter().copied())
        .arg(rootfs)
        .args(program)
        .args(args);
    cmd
}

/// The image's one layer unpacked with GNU tar into a fresh directory (kept while the TempDir
/// lives): a truncated or corrupt layer fails here.
fn unpack(image: &Layout) -> (tempfile::TempDir, PathBuf) {
    let layer_desc = &image.manifest["layers"][0];
    image.blob(layer_desc);
    let layer = image.blob_path(layer_desc["digest"].as_str().unwrap());
    let root = tempfile::tempdir().unwrap();
    let rootfs = root.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let o = Command::new("tar")
        .args(["--numeric-owner", "-xzf"])
        .arg(&layer)
        .arg("-C")
        .arg(&rootfs)
        .output()
        .unwrap();
    assert!(o.status.success(), "tar -x: {}", text(&o));
    (root, rootfs)
}

fn read_json(p: &Path) -> Value {
    let s = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_slice(&s).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `sha256:<hex>` of a file or of a shell pipeline's output (coreutils sha256sum).
fn sha256_of(script: &str) -> String {
    let o = Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .output()
        .unwrap();
    assert!(o.status.success(), "{script}: {}", text(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    format!("sha256:{}", out.split_whitespace().next().unwrap())
}

fn sha256_file(p: &Path) -> String {
    sha256_of(&format!("sha256sum '{}'", p.display()))
}

#[test]
fn the_image_config_is_what_the_dockerfile_says() {
    let Some(dir) = image_dir() else { return };
    let image = Layout::open(&dir);
    let stages = dockerfile();
    let last = stages.last().unwrap();
    let c = &image.config;
    assert_eq!(c["os"], "linux");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    assert_eq!(c["architecture"], arch);
    let cfg = &c["config"];
    assert_eq!(cfg["User"], last.user.as_deref().unwrap(), "{cfg}");
    assert_eq!(
        &cfg["Entrypoint"],
        last.entrypoint.as_ref().unwrap(),
        "{cfg}"
    );
    assert_eq!(&cfg["Cmd"], last.cmd.as_ref().unwrap(), "{cfg}");
    // No environment, no working directory, no exposed ports beyond what the Dockerfile sets
    // (it sets none of them).
    for key in ["Env", "WorkingDir", "ExposedPorts", "Volumes"] {
        assert!(cfg.get(key).is_none_or(Value::is_null), "{key}: {cfg}");
    }
    let labels: BTreeMap<String, String> = serde_json::from_value(cfg["Labels"].clone()).unwrap();
    assert_eq!(
        labels.keys().collect::<Vec<_>>(),
        last.labels.keys().collect::<Vec<_>>(),
        "label names"
    );
    for (k, v) in &last.labels {
        if k == "org.opencontainers.image.revision" {
            // The Dockerfile's is a build argument; the image has the commit it was built from.
            let rev = &labels[k];
            assert!(
                rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()),
                "{k}={rev}"
            );
        } else {
            assert_eq!(&labels[k], v, "label {k}");
        }
    }
    // One layer, gzip, whose uncompressed digest is the config's diff_id; reproducible dates.
    let layers = image.manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{}", image.manifest);
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer = image.blob_path(layers[0]["digest"].as_str().unwrap());
    image.blob(&layers[0]);
    assert_eq!(
        c["rootfs"]["diff_ids"],
        serde_json::json!([sha256_of(&format!(
            "gzip -dc '{}' | sha256sum",
            layer.display()
        ))])
    );
    let created = c["created"].as_str().unwrap();
    for h in c["history"].as_array().unwrap() {
        assert_eq!(h["created"], created, "history dated like the image: {h}");
    }
}

#[test]
fn the_unpacked_image_runs_its_entrypoint_with_nothing_else_inside() {
    let Some(dir) = image_dir() else { return };
    let image = Layout::open(&dir);
    let (_root, rootfs) = unpack(&image);
    let layer = image.blob_path(image.manifest["layers"][0]["digest"].as_str().unwrap());

    // Every entry, as GNU tar lists it: owner 0:0, the binary and its directories only (no
    // shell, no /etc/passwd, no libc).
    let o = Command::new("tar")
        .args(["--numeric-owner", "-tvzf"])
        .arg(&layer)
        .output()
        .unwrap();
    assert!(o.status.success(), "tar -t: {}", text(&o));
    let listing = String::from_utf8(o.stdout).unwrap();
    let entries: Vec<(String, String, String)> = listing
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[1].to_string(), f[5].to_string())
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("drwxr-xr-x", "0/0", "usr/"),
            ("drwxr-xr-x", "0/0", "usr/local/"),
            ("drwxr-xr-x", "0/0", "usr/local/bin/"),
            ("-rwxr-xr-x", "0/0", "usr/local/bin/meshca"),
            ("-rwxr-xr-x", "0/0", "usr/local/bin/meshca-sds"),
        ]
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())),
        "{listing}"
    );
    for absent in ["bin/sh", "etc/passwd", "lib64", "lib"] {
        assert!(!rootfs.join(absent).exists(), "/{absent} is in the image");
    }

    // The entrypoint in a chroot of the rootfs: a dynamically linked binary would find no ELF
    // interpreter there.
    let run = |args: &[&str]| -> Output { in_chroot(&image, &rootfs, &[], args).output().unwrap() };
    let o = run(&["--version"]);
    assert!(o.status.success(), "--version: {}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("meshca {VERSION}\n")
    );
    // The sidecar binary runs there too, and `serve` fails with its one-line error (no home).
    let sidecar = ["/usr/local/bin/meshca-sds".to_string()];
    let o = in_chroot_run(&image, &rootfs, &[], &sidecar, &["--version"])
        .output()
        .unwrap();
    assert!(o.status.success(), "meshca-sds --version: {}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("meshca-sds {VERSION}\n")
    );
    let o = in_chroot_run(
        &image,
        &rootfs,
        &[],
        &sidecar,
        &[
            "serve",
            "--ca",
            "ca1",
            "--namespace",
            "mesh",
            "--service-account",
            "web",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "meshca-sds: error: no home directory: pass --home or set MESHCA_HOME\n"
    );
    let cmd: Vec<String> = serde_json::from_value(image.config["config"]["Cmd"].clone()).unwrap();
    let mut help: Vec<&str> = cmd.iter().map(String::as_str).collect();
    help.push("--help");
    let o = run(&help);
    assert!(o.status.success(), "{help:?}: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Usage: meshca signer run"), "{out}");
    assert!(out.contains("--lease-name"), "{out}");
    // The image's default command starts and stops with a one-line error, not a loader, libc
    // or panic message: alone it has no store (no home directory in the image), with
    // deploy/base's --store=kube:meshca it finds no cluster outside a pod.
    let mut signer: Vec<&str> = cmd.iter().map(String::as_str).collect();
    for (extra, code, want) in [
        (
            None,
            1,
            "meshca: error: no home directory: pass --home or set MESHCA_HOME",
        ),
        (
            Some("--store=kube:meshca"),
            2,
            "meshca: error: store: no Kubernetes configuration found",
        ),
    ] {
        signer.extend(extra);
        let o = run(&signer);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{signer:?}: {}", text(&o));
        assert!(
            err.starts_with(want) && err.trim_end().lines().count() == 1,
            "{signer:?}: {err}"
        );
    }
}

/// The image's signer, run from its unpacked root filesystem as its user with nothing else in
/// that root (no /dev, no /etc), against the real API server of `.ci/run`: it creates a CA over
/// TLS, takes the Lease, gets ready (every controller listed), and stops cleanly on SIGTERM.
#[test]
fn the_image_signer_runs_from_its_rootfs_against_a_real_api_server() {
    let Some(dir) = image_dir() else { return };
    let Some(cluster) = Cluster::from_env("the image's signer on a real API server") else {
        return;
    };
    let image = Layout::open(&dir);
    let (root, rootfs) = unpack(&image);
    let ns = format!("image-{}", std::process::id());
    cluster.kubectl(&["create", "namespace", &ns]);
    // The admin's kubeconfig with its certificates inline, readable by the image's user.
    let kubeconfig = cluster.kubectl(&["config", "view", "--flatten", "--raw"]);
    std::fs::write(rootfs.join("kubeconfig"), kubeconfig).unwrap();
    let o = Command::new("chmod")
        .args(["0644"])
        .arg(rootfs.join("kubeconfig"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let env = [("KUBECONFIG", "/kubeconfig"), ("POD_NAME", "image-0")];
    let store = format!("kube:{ns}");

    let o = in_chroot(
        &image,
        &rootfs,
        &env,
        &["--store", &store, "init", "--ca", "mesh"],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "init: {}", text(&o));

    let port = common::free_port();
    let metrics = format!("--metrics-addr=127.0.0.1:{port}");
    let log = root.path().join("signer.log");
    let mut signer = in_chroot(
        &image,
        &rootfs,
        &env,
        &[
            "signer",
            "run",
            &format!("--store={store}"),
            &metrics,
            "--lease-name=image-signer",
            "--lease-namespace",
            &ns,
        ],
    )
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    loop {
        let o = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &readyz])
            .output()
            .unwrap();
        if o.stdout == b"200" {
            break;
        }
        if let Some(st) = signer.try_wait().unwrap() {
            panic!(
                "the signer exited ({st}) before it was ready: {}",
                log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "not ready in 60 s: {}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let holder = cluster.kubectl(&[
        "-n",
        &ns,
        "get",
        "lease",
        "image-signer",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder, "image-0");
    // Still up a moment later (a task that panics after the first list shows here).
    std::thread::sleep(Duration::from_secs(2));
    assert!(signer.try_wait().unwrap().is_none(), "{}", log_text());

    let o = Command::new("kill")
        .args(["-TERM", &signer.id().to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = signer.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            signer.kill().unwrap();
            panic!("still running 30 s after SIGTERM: {}", log_text());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = log_text();
    assert!(status.success(), "{status}: {log}");
    assert!(!log.contains("panicked"), "{log}");
    // No controller-manager finalizes it; the Secrets and Lease in it go with the etcd data.
    cluster.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

#[test]
fn the_image_build_is_reproducible() {
    let (Some(dir), Some(umoci)) = (image_dir(), umoci_bin()) else {
        return;
    };
    let image = Layout::open(&dir);
    let layer = image.blob_path(image.manifest["layers"][0]["digest"].as_str().unwrap());
    let work = tempfile::tempdir().unwrap();
    // The binary out of the image, packed again: the same bytes dated the same give the same
    // manifest digest.
    let o = Command::new("tar")
        .args(["-xzf"])
        .arg(&layer)
        .arg("-C")
        .arg(work.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let created = image.config["created"].as_str().unwrap();
    let epoch = Command::new("date")
        .args(["-u", "-d", created, "+%s"])
        .output()
        .unwrap();
    assert!(epoch.status.success(), "{}", text(&epoch));
    let out = work.path().join("again");
    let label = |name: &str| {
        image.config["config"]["Labels"][format!("org.opencontainers.image.{name}")]
            .as_str()
            .unwrap()
            .to_string()
    };
    let o = Command::new("bash")
        .arg(repo().join("deploy/image/build.sh"))
        .args(["image", "--binary"])
        .arg(work.path().join("usr/local/bin/meshca"))
        .arg(&out)
        .env("UMOCI", &umoci)
        .env("MESHCA_IMAGE_REVISION", label("revision"))
        .env("MESHCA_IMAGE_SOURCE", label("source"))
        .env(
            "SOURCE_DATE_EPOCH",
            String::from_utf8_lossy(&epoch.stdout).trim(),
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "build.sh image: {}", text(&o));
    let printed = String::from_utf8_lossy(&o.stdout);
    assert_eq!(printed.trim(), image.manifest_digest, "{}", text(&o));
    assert_eq!(Layout::open(&out).config, image.config);
}

#[test]
fn a_dynamic_binary_is_refused_and_leaves_no_image() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("oci");
    // /bin/sh: dynamically linked on every Debian; the image has no libc for it.
    let o = Command::new("bash")
        .arg(repo().join("deploy/image/build.sh"))
        .args(["image", "--binary", "/bin/sh"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.trim_end().ends_with(
            "image build.sh: /bin/sh is dynamically linked: the image has no libc (build it with: build.sh binary DEST)"
        ),
        "{err}"
    );
    assert!(o.stdout.is_empty());
    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Checks that need no image: the Dockerfile builds with the daemonless script, from no base
/// image in its final stage, and its config is the script's.
#[test]
fn the_dockerfile_builds_the_binary_with_the_daemonless_script() {
    let stages = dockerfile();
    assert_eq!(stages.len(), 2, "{stages:#?}");
    let (build, last) = (&stages[0], &stages[1]);
    assert!(build.from.ends_with(" AS build"), "{}", build.from);
    assert_eq!(
        build.runs.len(),
        1,
        "one RUN, the script's binary step: {:?}",
        build.runs
    );
    assert!(
        build.runs[0].ends_with("bash deploy/image/build.sh binary /out/meshca"),
        "{}",
        build.runs[0]
    );
    assert_eq!(last.from, "scratch");
    assert!(last.runs.is_empty(), "a RUN needs a shell: {:?}", last.runs);

    // The script's own configuration (deploy/image/build.sh's ENTRYPOINT, CMD, USER_ID).
    let script = std::fs::read_to_string(repo().join("deploy/image/build.sh")).unwrap();
    let var = |name: &str| -> String {
        let prefix = format!("{name}=");
        script
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("build.sh sets no {name}"))
            .to_string()
    };
    let entrypoint = var("ENTRYPOINT");
    assert_eq!(
        last.copies,
        [
            format!("--from=build /out/meshca {entrypoint}"),
            format!("--from=build /out/meshca-sds {}", var("SIDECAR")),
        ]
    );
    assert_eq!(last.entrypoint, Some(serde_json::json!([entrypoint])));
    let cmd: Vec<String> = var("CMD")
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(last.cmd, Some(serde_json::json!(cmd)));
    assert_eq!(last.user.as_deref(), Some(var("USER_ID").as_str()));
    assert_eq!(last.user.as_deref(), Some("65532:65532"));

    // Labels: the defaults are the workspace's (the revision is a build argument).
    let repository = workspace_repository();
    let want: BTreeMap<String, String> = [
        ("org.opencontainers.image.source", repository.as_str()),
        ("org.opencontainers.image.version", VERSION),
        ("org.opencontainers.image.revision", "unknown"),
        ("org.opencontainers.image.title", "meshca"),
        (
            "org.opencontainers.image.licenses",
            env!("CARGO_PKG_LICENSE"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(last.labels, want);
}

/// `[workspace.package] repository` of the root Cargo.toml (the CLI crate does not inherit it).
fn workspace_repository() -> String {
    let toml = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let section = toml
        .split("\n[")
        .find(|s| s.starts_with("workspace.package]"))
        .expect("Cargo.toml has [workspace.package]");
    let line = section
        .lines()
        .find_map(|l| l.strip_prefix("repository = "))
        .expect("[workspace.package] has a repository");
    line.trim_matches('"').to_string()
}

/// The image tag is one value everywhere: the crate version, the chart's appVersion and
/// deploy/base's kustomize `images:` entry, under the chart's repository.
#[test]
fn the_image_tag_is_the_chart_app_version_and_the_kustomize_tag() {
    let yaml = |p: &str| -> serde_json::Value {
        let s = std::fs::read_to_string(repo().join(p)).unwrap();
        serde_saphyr::from_str(&s).unwrap_or_else(|e| panic!("{p}: {e}"))
    };
    let chart = yaml("deploy/helm/meshca/Chart.yaml");
    assert_eq!(chart["appVersion"], VERSION, "Chart.yaml appVersion");
    let values = yaml("deploy/helm/meshca/values.yaml");
    let kustomize = yaml("deploy/base/kustomization.yaml");
    let images = kustomize["images"].as_array().expect("deploy/base images:");
    assert_eq!(
        images,
        &[serde_json::json!({
            "name": "meshca",
            "newName": values["image"]["repository"],
            "newTag": VERSION,
        })]
    );
    // deploy/base's Deployment names the image `meshca`, which that entry rewrites.
    let deployment = yaml("deploy/base/deployment.yaml");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "meshca"
    );
}
