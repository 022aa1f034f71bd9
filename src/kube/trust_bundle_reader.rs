//! Reading a signer's roots from `certificates.k8s.io/v1beta1` ClusterTrustBundles, read-only
//! (`sds serve --source kube-csr --cluster-trust-bundle meshca.io/<ca>`).
//!
//! A background list/watch (kube-runtime `watcher` + `reflector`) keeps the bundles whose
//! `spec.signerName` is the signer (field selector, and an optional label selector) in memory;
//! [`TrustBundleReader::anchors`] turns them into one deduplicated anchor list. Bundles are
//! readable by every authenticated user unless the cluster says otherwise; the reader needs
//! `list` and `watch` on `clustertrustbundles`. Publishing them is the signer's job
//! (`meshca bundle publish --cluster-trust-bundle`).

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::certificates::v1beta1::ClusterTrustBundle;
use kube::api::Api;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use rustls_pki_types::CertificateDer;

use crate::error::{Error, Result};

/// The anchors of every bundle of `signer`, ordered by bundle name, deduplicated. A bundle that
/// does not parse is skipped with a warning (the others still count); no anchor at all is an
/// error naming the signer. Pure.
pub fn anchors_of<'a>(
    bundles: impl IntoIterator<Item = &'a ClusterTrustBundle>,
    signer: &str,
) -> Result<Vec<CertificateDer<'static>>> {
    let mut mine: Vec<&ClusterTrustBundle> = bundles
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
    store: reflector::Store<ClusterTrustBundle>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TrustBundleReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundleReader")
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

impl TrustBundleReader {
    /// Starts watching the bundles of `signer` (and `labels`, a label selector, if given) and
    /// waits up to `ready_within` for the first list.
    pub async fn start(
        client: kube::Client,
        signer: &str,
        labels: Option<&str>,
        ready_within: Duration,
    ) -> Result<Self> {
        let api: Api<ClusterTrustBundle> = Api::all(client);
        let mut cfg = watcher::Config::default().fields(&format!("spec.signerName={signer}"));
        if let Some(l) = labels {
            cfg = cfg.labels(l);
        }
        let (store, writer) = reflector::store();
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
            store,
            task,
        };
        match tokio::time::timeout(ready_within, reader.store.wait_until_ready()).await {
            Ok(Ok(())) => Ok(reader),
            _ => Err(Error::Backend {
                backend: "kubernetes",
                message: format!(
                    "ClusterTrustBundles of {signer} could not be listed within {}s (is certificates.k8s.io/v1beta1 served, and may this account list and watch clustertrustbundles?)",
                    ready_within.as_secs()
                ),
                retryable: true,
            }),
        }
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
    use crate::kube::testutil::{json as resp, mock_client, next};
    use serde_json::json;

    fn ctb(name: &str, signer: &str, pem: &str) -> serde_json::Value {
        json!({
            "apiVersion": "certificates.k8s.io/v1beta1", "kind": "ClusterTrustBundle",
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
        let bundles: Vec<ClusterTrustBundle> = [
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

    #[tokio::test]
    async fn the_reader_lists_with_the_signer_field_selector() {
        let (client, mut h) = mock_client();
        let (p1, c1) = pem_of("ca1");
        let server = tokio::spawn(async move {
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.method(), "GET");
            assert_eq!(
                req.uri().path(),
                "/apis/certificates.k8s.io/v1beta1/clustertrustbundles"
            );
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
                    "apiVersion": "certificates.k8s.io/v1beta1", "kind": "ClusterTrustBundleList",
                    "metadata": { "resourceVersion": "7" },
                    "items": [ctb("meshca.io:mesh:a", "meshca.io/mesh", &p1)],
                }),
            ));
            // The watch that follows stays open until the reader is dropped.
            let (req, _, _send) = next(&mut h).await;
            assert!(req.uri().query().unwrap().contains("watch=true"));
            h
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
        let _h = server.await.unwrap();
        drop(r);
    }
}
