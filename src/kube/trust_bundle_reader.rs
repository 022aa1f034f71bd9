//! Reading a signer's roots from `certificates.k8s.io` ClusterTrustBundles, read-only
//! (`sds serve --source kube-csr --cluster-trust-bundle meshca.io/<ca>`).
//!
//! The version is found through discovery, as the publisher finds it
//! ([`super::trust_bundles::detect`]: v1, GA and on by default since Kubernetes 1.37, then
//! v1beta1, then v1alpha1), and logged once; a cluster that serves none is an error naming
//! the versions tried. Bundles are read into one model, [`Ctb`], whatever the version (their
//! spec is the same in all three).
//!
//! A background list/watch (kube-runtime `watcher` + `reflector`) keeps the bundles whose
//! `spec.signerName` is the signer (field selector, and an optional label selector) in memory;
//! [`TrustBundleReader::anchors`] turns them into one deduplicated anchor list. Bundles are
//! readable by every authenticated user unless the cluster says otherwise; the reader needs
//! `list` and `watch` on `clustertrustbundles`. Publishing them is the signer's job
//! (`meshca bundle publish --cluster-trust-bundle`).

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::certificates::v1::ClusterTrustBundleSpec;
use kube::api::Api;
use kube::core::{NotUsed, Object};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use rustls_pki_types::CertificateDer;

use super::trust_bundles;
use crate::error::{Error, Result};

/// A ClusterTrustBundle as the reader holds it, whatever the served version (v1, v1beta1 and
/// v1alpha1 have the same spec and no status). Read through the discovered version's
/// `ApiResource`, so no `apiVersion` is checked on the way in.
pub type Ctb = Object<ClusterTrustBundleSpec, NotUsed>;

/// The anchors of every bundle of `signer`, ordered by bundle name, deduplicated. A bundle that
/// does not parse is skipped with a warning (the others still count); no anchor at all is an
/// error naming the signer. Pure.
pub fn anchors_of<'a>(
    bundles: impl IntoIterator<Item = &'a Ctb>,
    signer: &str,
) -> Result<Vec<CertificateDer<'static>>> {
    let mut mine: Vec<&Ctb> = bundles
        .into_iter()
        .filter(|b| b.spec.signer_name.as_deref() == Some(signer))
        .collect();
    mine.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut out: Vec<CertificateDer<'static>> = Vec::new();
    for b in mine {
        let name = b.metadata.name.as_deref().unwrap_or_default();
        match crate::pemutil::parse_certs(
            b.spec.trust_bundle.as_bytes(),
            &format!("ClusterTrustBundle {name}"),
        ) {
            Ok(certs) => {
                for c in certs {
                    if !out.contains(&c) {
                        out.push(c);
                    }
                }
            }
            Err(e) => tracing::warn!(bundle = name, error = %e, "ClusterTrustBundle skipped"),
        }
    }
    if out.is_empty() {
        return Err(Error::Store(format!(
            "no ClusterTrustBundle with spec.signerName {signer} holds a certificate"
        )));
    }
    Ok(out)
}

/// A live, read-only view of one signer's ClusterTrustBundles.
pub struct TrustBundleReader {
    signer: String,
    api_version: String,
    store: reflector::Store<Ctb>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TrustBundleReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundleReader")
            .field("signer", &self.signer)
            .field("api_version", &self.api_version)
            .finish_non_exhaustive()
    }
}

impl TrustBundleReader {
    /// Finds the served version ([`trust_bundles::detect`]), starts watching the bundles of
    /// `signer` (and `labels`, a label selector, if given) through it, and waits up to
    /// `ready_within` for the first list. A cluster that serves no version is an
    /// [`Error::Unsupported`] naming the versions tried; a discovery failure is retryable.
    pub async fn start(
        client: kube::Client,
        signer: &str,
        labels: Option<&str>,
        ready_within: Duration,
    ) -> Result<Self> {
        let Some(ar) = trust_bundles::detect(&client).await? else {
            return Err(Error::Unsupported(format!(
                "ClusterTrustBundles of {signer}: the cluster serves no {} (Kubernetes 1.37 serves v1 by default; before that, enable the ClusterTrustBundle feature gate and the API version)",
                trust_bundles::WANTED.describe()
            )));
        };
        tracing::info!(signer = %signer, api = %ar.api_version, "reading ClusterTrustBundles");
        let api: Api<Ctb> = Api::all_with(client, &ar);
        let mut cfg = watcher::Config::default().fields(&format!("spec.signerName={signer}"));
        if let Some(l) = labels {
            cfg = cfg.labels(l);
        }
        let writer = reflector::store::Writer::new(ar.clone());
        let store = writer.as_reader();
        let stream = reflector(writer, watcher(api, cfg).default_backoff()).touched_objects();
        let signer_name = signer.to_string();
        let task = tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                if let Err(e) = ev {
                    tracing::warn!(signer = %signer_name, error = %e, "watching ClusterTrustBundles failed; retrying");
                }
            }
        });
        let reader = TrustBundleReader {
            signer: signer.to_string(),
            api_version: ar.api_version.clone(),
            store,
            task,
        };
        match tokio::time::timeout(ready_within, reader.store.wait_until_ready()).await {
            Ok(Ok(())) => Ok(reader),
            _ => Err(Error::Backend {
                backend: "kubernetes",
                message: format!(
                    "ClusterTrustBundles of {signer} could not be listed through {} within {}s (may this account list and watch clustertrustbundles?)",
                    ar.api_version,
                    ready_within.as_secs()
                ),
                retryable: true,
            }),
        }
    }

    /// The API version read through (`certificates.k8s.io/v1`, ...).
    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    /// The anchors now.
    pub fn anchors(&self) -> Result<Vec<CertificateDer<'static>>> {
        let state = self.store.state();
        anchors_of(state.iter().map(|b| b.as_ref()), &self.signer)
    }
}

impl Drop for TrustBundleReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_root, CaSpec};
    use crate::kube::discovery::tests::resource_list;
    use crate::kube::testutil::{json as resp, mock_client, next, status};
    use serde_json::json;

    fn ctb(name: &str, signer: &str, pem: &str) -> serde_json::Value {
        json!({
            "apiVersion": "certificates.k8s.io/v1", "kind": "ClusterTrustBundle",
            "metadata": { "name": name, "resourceVersion": "5" },
            "spec": { "signerName": signer, "trustBundle": pem },
        })
    }

    fn pem_of(name: &str) -> (String, CertificateDer<'static>) {
        let ca = create_root(&CaSpec::root(name), time::OffsetDateTime::now_utc()).unwrap();
        (
            crate::bundle::to_pem(std::slice::from_ref(&ca.cert)),
            ca.cert,
        )
    }

    #[test]
    fn anchors_are_the_signers_deduplicated_in_name_order() {
        let (p1, c1) = pem_of("ca1");
        let (p2, c2) = pem_of("ca2");
        let bundles: Vec<Ctb> = [
            ctb("meshca.io:mesh:b", "meshca.io/mesh", &format!("{p2}{p1}")),
            ctb("meshca.io:mesh:a", "meshca.io/mesh", &p1),
            ctb("other", "example.com/other", &p2),
            ctb("meshca.io:mesh:broken", "meshca.io/mesh", "not pem"),
        ]
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
        assert_eq!(
            anchors_of(&bundles, "meshca.io/mesh").unwrap(),
            vec![c1, c2]
        );
        let e = anchors_of(&bundles, "meshca.io/none").unwrap_err();
        assert!(e.to_string().contains("meshca.io/none"), "{e}");
    }

    type Answers = Vec<(&'static str, http::Response<kube::client::Body>)>;

    /// Starts a reader of `meshca.io/mesh` against a mock whose discovery answers `answers`
    /// (version, response) in order, then expects the list and the watch through `want`.
    async fn start_with(answers: Answers, want: &'static str) -> TrustBundleReader {
        let (client, mut h) = mock_client();
        let (p1, c1) = pem_of("ca1");
        let server = tokio::spawn(async move {
            for (v, response) in answers {
                let (req, _, send) = next(&mut h).await;
                assert_eq!(req.method(), "GET");
                assert_eq!(req.uri().path(), format!("/apis/certificates.k8s.io/{v}"));
                send.send_response(response);
            }
            let path = format!("/apis/certificates.k8s.io/{want}/clustertrustbundles");
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.method(), "GET");
            assert_eq!(req.uri().path(), path);
            let q = req.uri().query().unwrap();
            assert!(
                q.contains("fieldSelector=spec.signerName%3Dmeshca.io%2Fmesh"),
                "{q}"
            );
            assert!(q.contains("labelSelector=meshca.io%2Fbundle%3Dmesh"), "{q}");
            assert!(!q.contains("watch=true"), "{q}");
            send.send_response(resp(
                200,
                &json!({
                    "apiVersion": format!("certificates.k8s.io/{want}"), "kind": "ClusterTrustBundleList",
                    "metadata": { "resourceVersion": "7" },
                    "items": [ctb("meshca.io:mesh:a", "meshca.io/mesh", &p1)],
                }),
            ));
            // The watch that follows stays open until the reader is dropped.
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.uri().path(), path);
            assert!(req.uri().query().unwrap().contains("watch=true"));
            (h, send)
        });
        let r = TrustBundleReader::start(
            client,
            "meshca.io/mesh",
            Some("meshca.io/bundle=mesh"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(r.anchors().unwrap(), vec![c1]);
        assert_eq!(r.api_version(), format!("certificates.k8s.io/{want}"));
        let _parked = server.await.unwrap();
        r
    }

    fn v1_without_bundles() -> http::Response<kube::client::Body> {
        resource_list("certificates.k8s.io/v1", &["certificatesigningrequests"])
    }

    #[tokio::test]
    async fn the_reader_uses_v1_when_served() {
        start_with(
            vec![(
                "v1",
                resource_list(
                    "certificates.k8s.io/v1",
                    &["certificatesigningrequests", "clustertrustbundles"],
                ),
            )],
            "v1",
        )
        .await;
    }

    #[tokio::test]
    async fn the_reader_falls_back_to_v1beta1_then_v1alpha1() {
        start_with(
            vec![
                ("v1", v1_without_bundles()),
                (
                    "v1beta1",
                    resource_list("certificates.k8s.io/v1beta1", &["clustertrustbundles"]),
                ),
            ],
            "v1beta1",
        )
        .await;
        start_with(
            vec![
                ("v1", v1_without_bundles()),
                ("v1beta1", status(404, "NotFound", "not found")),
                (
                    "v1alpha1",
                    resource_list("certificates.k8s.io/v1alpha1", &["clustertrustbundles"]),
                ),
            ],
            "v1alpha1",
        )
        .await;
    }

    #[tokio::test]
    async fn a_cluster_without_the_api_is_an_error_naming_the_versions_tried() {
        let (client, mut h) = mock_client();
        let server = tokio::spawn(async move {
            let (_, _, send) = next(&mut h).await;
            send.send_response(v1_without_bundles());
            for _ in 0..2 {
                let (_, _, send) = next(&mut h).await;
                send.send_response(status(404, "NotFound", "not found"));
            }
            h
        });
        let e = TrustBundleReader::start(client, "meshca.io/mesh", None, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
        assert!(e.is_user_error());
        let m = e.to_string();
        assert!(
            m.contains("meshca.io/mesh")
                && m.contains("certificates.k8s.io v1, v1beta1 or v1alpha1 clustertrustbundles"),
            "{m}"
        );
        let _h = server.await.unwrap();
        // A discovery failure is retryable, not "absent".
        let (client, mut h) = mock_client();
        let server = tokio::spawn(async move {
            let (_, _, send) = next(&mut h).await;
            send.send_response(status(503, "ServiceUnavailable", "starting"));
            h
        });
        let e = TrustBundleReader::start(client, "meshca.io/mesh", None, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(crate::kube::retryable(&e), "{e}");
        let _h = server.await.unwrap();
    }
}
