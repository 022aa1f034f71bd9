//! Key usages: what a request asks for (a CSR's KeyUsage/ExtendedKeyUsage extensions, a
//! Kubernetes CSR's `spec.usages`) and what the workload profile grants.
//!
//! Usages are named with the Kubernetes strings (`digital signature`, `client auth`, ...).
//! meshca issues end-entity TLS certificates only: a request may name `digital signature`,
//! `key encipherment`, `server auth` and `client auth`; anything else is refused, naming it.
//! The extended key usages granted are those requested, within {serverAuth, clientAuth}; a
//! request that names no extended key usage gets the profile default (both).

use serde::Serialize;

/// The usages a request may name.
pub const ALLOWED_USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];

/// The extended key usages of a workload certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Ekus {
    /// id-kp-serverAuth.
    pub server_auth: bool,
    /// id-kp-clientAuth.
    pub client_auth: bool,
}

impl Default for Ekus {
    /// The profile default: serverAuth and clientAuth.
    fn default() -> Self {
        Ekus {
            server_auth: true,
            client_auth: true,
        }
    }
}

impl Ekus {
    const NONE: Ekus = Ekus {
        server_auth: false,
        client_auth: false,
    };

    /// The Kubernetes names, e.g. `["server auth", "client auth"]`.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.server_auth {
            v.push("server auth");
        }
        if self.client_auth {
            v.push("client auth");
        }
        v
    }

    fn is_empty(&self) -> bool {
        *self == Ekus::NONE
    }
}

/// What a request asks for, per source. `None`: the source names no usage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usages {
    /// From the CSR's own extensions (see `CsrInfo::requested_usages`).
    pub csr: Option<Vec<String>>,
    /// From a Kubernetes CSR's `spec.usages`, or `meshca policy check --usage`.
    pub kube: Option<Vec<String>>,
}

/// The extended key usages to grant, or the reason for refusing.
pub fn grant(req: &Usages) -> Result<Ekus, String> {
    let mut granted: Option<Ekus> = None;
    for (source, list) in [("the CSR", &req.csr), ("spec.usages", &req.kube)] {
        let Some(list) = list else { continue };
        let mut asked = Ekus::NONE;
        for u in list {
            match u.as_str() {
                "digital signature" | "key encipherment" => {}
                "server auth" => asked.server_auth = true,
                "client auth" => asked.client_auth = true,
                other => {
                    return Err(format!(
                        "usage {other:?} in {source} is not allowed: meshca issues end-entity TLS certificates with only {}",
                        ALLOWED_USAGES.join(", ")
                    ))
                }
            }
        }
        if asked.is_empty() {
            continue; // key usages only: the EKUs come from elsewhere or the default
        }
        granted = Some(match granted {
            None => asked,
            Some(g) => {
                let both = Ekus {
                    server_auth: g.server_auth && asked.server_auth,
                    client_auth: g.client_auth && asked.client_auth,
                };
                if both.is_empty() {
                    return Err(format!(
                        "the CSR asks for {} but spec.usages for {}: no extended key usage in common",
                        g.names().join(", "),
                        asked.names().join(", ")
                    ));
                }
                both
            }
        });
    }
    Ok(granted.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(csr: Option<&[&str]>, kube: Option<&[&str]>) -> Usages {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        Usages {
            csr: csr.map(v),
            kube: kube.map(v),
        }
    }

    #[test]
    fn requested_ekus_are_honoured_within_the_profile() {
        assert_eq!(grant(&Usages::default()).unwrap(), Ekus::default());
        let client = grant(&u(Some(&["digital signature", "client auth"]), None)).unwrap();
        assert_eq!(client.names(), ["client auth"]);
        let server = grant(&u(None, Some(&["key encipherment", "server auth"]))).unwrap();
        assert_eq!(server.names(), ["server auth"]);
        // Key usages alone leave the EKU default.
        assert_eq!(
            grant(&u(Some(&["digital signature"]), None)).unwrap(),
            Ekus::default()
        );
        // Both sources: the intersection.
        let both = grant(&u(
            Some(&["client auth"]),
            Some(&["server auth", "client auth"]),
        ))
        .unwrap();
        assert_eq!(both.names(), ["client auth"]);
        let e = grant(&u(Some(&["client auth"]), Some(&["server auth"]))).unwrap_err();
        assert!(e.contains("no extended key usage in common"), "{e}");
    }

    #[test]
    fn anything_else_is_refused_naming_it() {
        for bad in [
            "cert sign",
            "crl sign",
            "code signing",
            "any",
            "email protection",
        ] {
            let e = grant(&u(None, Some(&["digital signature", bad]))).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        let e = grant(&u(Some(&["code signing"]), None)).unwrap_err();
        assert!(e.contains("\"code signing\" in the CSR"), "{e}");
    }
}
