//! Output layouts users already know: App Mesh-style files and Kubernetes manifests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::fsutil::{self, KEY_MODE, PUBLIC_MODE};
use crate::issue::{IssuedCert, Workload};

/// Paths written for a workload.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct WorkloadFiles {
    /// `<name>_cert.pem`: the leaf.
    pub cert: PathBuf,
    /// `<name>_key.pem`: the private key (0600).
    pub key: PathBuf,
    /// `<name>_cert_chain.pem`: leaf and intermediates.
    pub chain: PathBuf,
}

/// The file names of a workload in `dir`.
pub fn workload_paths(dir: &Path, name: &str) -> WorkloadFiles {
    WorkloadFiles {
        cert: dir.join(format!("{name}_cert.pem")),
        key: dir.join(format!("{name}_key.pem")),
        chain: dir.join(format!("{name}_cert_chain.pem")),
    }
}

/// Validates a workload name used in file names.
pub fn validate_workload_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "workload name",
            format!("{name:?}: use letters, digits, '-', '_' and '.'"),
        ))
    }
}

/// Writes the three App Mesh-style files for a workload as one atomic set.
pub fn write_workload_files(dir: &Path, name: &str, w: &Workload) -> Result<WorkloadFiles> {
    validate_workload_name(name)?;
    if !dir.exists() {
        fsutil::create_private_dir(dir)?;
    }
    let paths = workload_paths(dir, name);
    let key = w.key.to_pkcs8_pem();
    fsutil::write_set_atomic(&[
        (paths.key.clone(), key.as_bytes().to_vec(), KEY_MODE),
        (
            paths.cert.clone(),
            w.cert.leaf_pem().into_bytes(),
            PUBLIC_MODE,
        ),
        (
            paths.chain.clone(),
            w.cert.chain_pem().into_bytes(),
            PUBLIC_MODE,
        ),
    ])?;
    Ok(paths)
}

/// Writes a certificate chain (CSR mode: no key) to `<name>_cert.pem` and `<name>_cert_chain.pem`.
pub fn write_cert_files(dir: &Path, name: &str, c: &IssuedCert) -> Result<WorkloadFiles> {
    validate_workload_name(name)?;
    if !dir.exists() {
        fsutil::create_private_dir(dir)?;
    }
    let paths = workload_paths(dir, name);
    fsutil::write_set_atomic(&[
        (paths.cert.clone(), c.leaf_pem().into_bytes(), PUBLIC_MODE),
        (paths.chain.clone(), c.chain_pem().into_bytes(), PUBLIC_MODE),
    ])?;
    Ok(paths)
}

/// `NAMESPACE/NAME` of a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::str::FromStr for ObjectRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (ns, name) = s.split_once('/').ok_or_else(|| {
            Error::invalid("object reference", format!("{s:?} must be NAMESPACE/NAME"))
        })?;
        for part in [ns, name] {
            let ok = !part.is_empty()
                && part.len() <= 253
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
                && !part.starts_with(['-', '.'])
                && !part.ends_with(['-', '.']);
            if !ok {
                return Err(Error::invalid(
                    "object reference",
                    format!("{part:?} in {s:?} is not a valid Kubernetes name"),
                ));
            }
        }
        Ok(ObjectRef {
            namespace: ns.into(),
            name: name.into(),
        })
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest<'a> {
    api_version: &'a str,
    kind: &'a str,
    metadata: Metadata<'a>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    type_: Option<&'a str>,
    data: BTreeMap<&'a str, String>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    name: &'a str,
    namespace: &'a str,
    labels: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<&'a str, String>,
}

fn to_yaml(m: &Manifest<'_>) -> Result<String> {
    // Long single-line values (base64 Secret data) stay plain scalars on one line, as
    // kubectl prints them; multi-line values (PEM) are literal blocks.
    let options = serde_saphyr::ser_options! { folded_wrap_chars: 1 << 20 };
    serde_saphyr::to_string_with_options(m, options)
        .map_err(|e| Error::Build(format!("YAML encoding: {e}")))
}

/// A `kubernetes.io/tls` Secret with `tls.crt` (leaf + intermediates), `tls.key` and
/// `ca.crt` (the trust bundle): the Istio ingress gateway credential format.
pub fn tls_secret_manifest(
    at: &ObjectRef,
    ca: &str,
    w: &Workload,
    ca_crt_pem: &str,
) -> Result<String> {
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let key = w.key.to_pkcs8_pem();
    let mut data = BTreeMap::new();
    data.insert("tls.crt", b64(w.cert.chain_pem().as_bytes()));
    data.insert("tls.key", b64(key.as_bytes()));
    data.insert("ca.crt", b64(ca_crt_pem.as_bytes()));
    let mut annotations = BTreeMap::new();
    annotations.insert("meshca.io/serial", w.cert.info.serial_hex());
    annotations.insert(
        "meshca.io/not-after",
        w.cert
            .info
            .not_after
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    );
    to_yaml(&Manifest {
        api_version: "v1",
        kind: "Secret",
        metadata: Metadata {
            name: &at.name,
            namespace: &at.namespace,
            labels: BTreeMap::from([
                ("app.kubernetes.io/managed-by", "meshca"),
                ("meshca.io/ca", ca),
            ]),
            annotations,
        },
        type_: Some("kubernetes.io/tls"),
        data,
    })
}

/// A `kubernetes.io/tls` Secret holding a CA: `tls.crt` is the CA certificate (and the
/// intermediates above it), `ca.crt` the CA's trust anchors (both roots during a rotation).
/// `tls.key` is the CA key only when `key_pem` is given (cert-manager's CA issuer reads it);
/// otherwise it is empty, because the type requires the key to be present.
pub fn ca_secret_manifest(
    at: &ObjectRef,
    ca: &str,
    tls_crt_pem: &str,
    key_pem: Option<&str>,
    ca_crt_pem: &str,
) -> Result<String> {
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let data = BTreeMap::from([
        ("tls.crt", b64(tls_crt_pem.as_bytes())),
        ("tls.key", b64(key_pem.unwrap_or_default().as_bytes())),
        ("ca.crt", b64(ca_crt_pem.as_bytes())),
    ]);
    to_yaml(&Manifest {
        api_version: "v1",
        kind: "Secret",
        metadata: Metadata {
            name: &at.name,
            namespace: &at.namespace,
            labels: BTreeMap::from([
                ("app.kubernetes.io/managed-by", "meshca"),
                ("meshca.io/ca", ca),
            ]),
            annotations: BTreeMap::new(),
        },
        type_: Some("kubernetes.io/tls"),
        data,
    })
}

/// A ConfigMap carrying a trust bundle under key `ca.crt`.
pub fn bundle_configmap_manifest(at: &ObjectRef, bundle: &str, ca_crt_pem: &str) -> Result<String> {
    bundle_configmap_manifest_with_crl(at, bundle, ca_crt_pem, None)
}

/// [`bundle_configmap_manifest`], plus the bundle CAs' CRLs under key `ca.crl` when given.
pub fn bundle_configmap_manifest_with_crl(
    at: &ObjectRef,
    bundle: &str,
    ca_crt_pem: &str,
    ca_crl_pem: Option<&str>,
) -> Result<String> {
    let mut data = BTreeMap::from([("ca.crt", ca_crt_pem.to_string())]);
    if let Some(crl) = ca_crl_pem {
        data.insert("ca.crl", crl.to_string());
    }
    to_yaml(&Manifest {
        api_version: "v1",
        kind: "ConfigMap",
        metadata: Metadata {
            name: &at.name,
            namespace: &at.namespace,
            labels: BTreeMap::from([
                ("app.kubernetes.io/managed-by", "meshca"),
                ("meshca.io/bundle", bundle),
            ]),
            annotations: BTreeMap::new(),
        },
        type_: None,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_refs() {
        let r: ObjectRef = "istio-ingress/gateway-ca-tls".parse().unwrap();
        assert_eq!(r.to_string(), "istio-ingress/gateway-ca-tls");
        for bad in ["noslash", "/x", "x/", "Upper/x", "a/b/c", "a/-b"] {
            assert!(bad.parse::<ObjectRef>().is_err(), "{bad}");
        }
    }

    /// The ConfigMap is byte for byte what serde_yaml 0.9 printed before (compared when
    /// serde_yaml was replaced), so diffs and GitOps repositories see no change.
    #[test]
    fn configmap_manifest_is_unchanged() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIQ\n-----END CERTIFICATE-----\n\
                   -----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let at: ObjectRef = "istio-system/mesh-ca".parse().unwrap();
        let yaml = bundle_configmap_manifest(&at, "frontend", pem).unwrap();
        assert_eq!(
            yaml,
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: mesh-ca\n  namespace: istio-system\n  \
             labels:\n    app.kubernetes.io/managed-by: meshca\n    meshca.io/bundle: frontend\n\
             data:\n  ca.crt: |\n    -----BEGIN CERTIFICATE-----\n    MIIBszCCAVmgAwIBAgIQ\n    \
             -----END CERTIFICATE-----\n    -----BEGIN CERTIFICATE-----\n    MIIB\n    \
             -----END CERTIFICATE-----\n"
        );
    }

    /// YAML 1.1 readers (PyYAML, so kubernetes-validate and Ansible) take a plain RFC 3339
    /// time for a timestamp and `12:34:56` for a base-60 number; annotation values must
    /// stay strings. serde_yaml printed both plain.
    #[test]
    fn yaml_1_1_lookalikes_are_quoted() {
        let m = Manifest {
            api_version: "v1",
            kind: "Secret",
            metadata: Metadata {
                name: "n",
                namespace: "ns",
                labels: BTreeMap::from([("a", "yes")]),
                annotations: BTreeMap::from([
                    ("meshca.io/not-after", "2026-12-02T07:00:00Z".to_string()),
                    ("meshca.io/serial", "12:34:56".to_string()),
                ]),
            },
            type_: Some("kubernetes.io/tls"),
            data: BTreeMap::from([("tls.crt", "QUJD".repeat(100))]),
        };
        let yaml = to_yaml(&m).unwrap();
        assert!(
            yaml.contains(&format!("  tls.crt: {}\n", "QUJD".repeat(100))),
            "{yaml}"
        );
        assert!(
            yaml.contains("meshca.io/not-after: \"2026-12-02T07:00:00Z\"\n"),
            "{yaml}"
        );
        assert!(yaml.contains("meshca.io/serial: \"12:34:56\"\n"), "{yaml}");
        assert!(yaml.contains("a: \"yes\"\n"), "{yaml}");
        assert!(yaml.contains("type: kubernetes.io/tls\n"), "{yaml}");
    }

    #[test]
    fn workload_names() {
        validate_workload_name("frontend").unwrap();
        for bad in ["", "../x", ".hidden", "a/b", "a b"] {
            assert!(validate_workload_name(bad).is_err(), "{bad:?}");
        }
    }
}
