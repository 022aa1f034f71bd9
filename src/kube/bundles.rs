//! Trust-bundle ConfigMaps: `<bundle>-trust-bundle` with key `ca.crt` (PEM) in every namespace
//! a bundle targets, labelled `app.kubernetes.io/managed-by: meshca` and
//! `meshca.io/bundle: <bundle>`, written by server-side apply (field manager `meshca`).
//!
//! The signer re-reads the bundle definitions and their CAs from the store every resync
//! interval and applies the result; applying unchanged content is a no-op on the server, so a
//! CA added to or removed from a bundle reaches every namespace within one interval. A
//! namespace removed from a bundle keeps its last ConfigMap (meshca does not delete what a
//! workload may still mount); delete it by hand.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use rustls_pki_types::CertificateDer;
use serde_json::json;
use tokio::sync::watch;

use super::metrics::Metrics;
use super::ratelimit::RateLimiter;
use super::{LABEL_BUNDLE, LABEL_MANAGED_BY, MANAGED_BY};
use crate::bundle::{self, BundleSpec};
use crate::error::{Error, Result};
use crate::store::{bundle_anchors, Store};

/// The ConfigMap a bundle is published as in `namespace`.
pub fn configmap_manifest(spec: &BundleSpec, namespace: &str, pem: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": spec.configmap_name(),
            "namespace": namespace,
            "labels": { LABEL_MANAGED_BY: MANAGED_BY, LABEL_BUNDLE: spec.name },
        },
        "data": { "ca.crt": pem },
    })
}

/// Applies the bundle's ConfigMap to each namespace. Returns how many were applied.
pub async fn publish(
    client: &kube::Client,
    spec: &BundleSpec,
    anchors: &[CertificateDer<'static>],
    namespaces: &[String],
    limiter: Option<&RateLimiter>,
) -> Result<usize> {
    if anchors.is_empty() {
        return Err(Error::invalid(
            "bundle",
            format!("{} has no anchors", spec.name),
        ));
    }
    let pem = bundle::to_pem(anchors);
    let mut n = 0;
    for ns in namespaces {
        if let Some(l) = limiter {
            l.acquire().await;
        }
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        super::apply(
            &api,
            &spec.configmap_name(),
            &configmap_manifest(spec, ns, &pem),
            super::FIELD_MANAGER,
            &format!("publishing bundle {} to namespace {ns}", spec.name),
        )
        .await?;
        n += 1;
    }
    Ok(n)
}

/// One pass: publishes every stored bundle that names namespaces.
pub async fn sync_once(
    store: &dyn Store,
    client: &kube::Client,
    metrics: &Metrics,
    limiter: &RateLimiter,
) -> Result<usize> {
    let mut total = 0;
    let mut first_err = None;
    for b in store.list_bundles().await? {
        if b.namespaces.is_empty() {
            continue;
        }
        // One broken bundle (unknown CA, forbidden namespace) must not block the others.
        let r = async {
            let anchors = bundle_anchors(store, &b).await?;
            publish(client, &b, &anchors, &b.namespaces, Some(limiter)).await
        }
        .await;
        match r {
            Ok(n) => {
                metrics.bundle_applied.inc_by(n as u64);
                total += n;
            }
            Err(e) => {
                tracing::warn!(bundle = %b.name, error = %e, "publishing a trust bundle failed");
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// Syncs every `interval` while leading, and at once when the served CAs change
/// (`ca_changes`: a CA created, replaced or removed reaches the ConfigMaps together with the
/// signer), until `shutdown` flips to `true`.
#[allow(clippy::too_many_arguments)]
pub async fn sync_loop(
    store: Arc<dyn Store>,
    client: kube::Client,
    metrics: Arc<Metrics>,
    limiter: Arc<RateLimiter>,
    leader: watch::Receiver<bool>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut ca_changes: Option<super::issuers::IssuerWatch>,
) {
    loop {
        if *leader.borrow() {
            match sync_once(store.as_ref(), &client, &metrics, &limiter).await {
                Ok(n) => tracing::debug!(configmaps = n, "trust bundles synced"),
                Err(e) => {
                    tracing::warn!(error = %e, "trust bundle sync failed; retrying next interval")
                }
            }
        }
        let changed = async {
            let ok = match ca_changes.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => false,
            };
            if !ok {
                // No reloads (or the reloader stopped): only the interval.
                std::future::pending::<()>().await
            }
        };
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(interval) => {}
            _ = changed => tracing::info!("CAs changed: syncing trust bundles now"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_root, CaSpec};
    use crate::kube::testutil::{json as resp, mock_client, next};

    #[tokio::test]
    async fn publishes_ca_crt_to_each_namespace() {
        let (client, mut h) = mock_client();
        let ca = create_root(&CaSpec::root("ca1"), time::OffsetDateTime::now_utc()).unwrap();
        let spec = BundleSpec {
            name: "mesh".into(),
            cas: vec!["ca1".into()],
            file: None,
            namespaces: vec!["a".into(), "b".into()],
        };
        let anchors = bundle::assemble([&ca]);
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let (req, body, send) = next(&mut h).await;
                assert_eq!(req.method(), "PATCH");
                assert!(req.uri().query().unwrap().contains("fieldManager=meshca"));
                assert_eq!(body["metadata"]["name"], "mesh-trust-bundle");
                assert_eq!(body["metadata"]["labels"][LABEL_BUNDLE], "mesh");
                assert!(body["data"]["ca.crt"]
                    .as_str()
                    .unwrap()
                    .starts_with("-----BEGIN CERTIFICATE-----"));
                seen.push(req.uri().path().to_string());
                send.send_response(resp(200, &body));
            }
            seen
        });
        assert_eq!(
            publish(&client, &spec, &anchors, &spec.namespaces, None)
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            server.await.unwrap(),
            vec![
                "/api/v1/namespaces/a/configmaps/mesh-trust-bundle",
                "/api/v1/namespaces/b/configmaps/mesh-trust-bundle"
            ]
        );
        assert!(publish(&client, &spec, &[], &spec.namespaces, None)
            .await
            .is_err());
    }
}
