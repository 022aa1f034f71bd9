//! ClusterTrustBundles (`certificates.k8s.io`: v1, GA and on by default since Kubernetes
//! 1.37; v1beta1 since 1.33; v1alpha1 before): one per CA, named `meshca.io:<ca>:<suffix>`,
//! with `spec.signerName` `meshca.io/<ca>` and `spec.trustBundle` the CA's roots (both roots
//! while a rotation is prepared or active, from [`crate::store::ca_anchors`]).
//!
//! - Pure: [`bundle_name`], [`desired`], [`manifest`] and [`plan`] (what to apply, what to
//!   delete, from the desired objects and the listed ones).
//! - I/O: [`detect`] (discovery: v1, then v1beta1, then v1alpha1; the first that lists
//!   `clustertrustbundles` is used for every request, and logged once), [`sync`] (one list,
//!   then a server-side apply per changed object and a delete per stale one), [`sync_loop`]
//!   (the signer's loop: while leading, every interval and at once when the served CAs
//!   change). The objects are the same in every version (`spec.signerName`,
//!   `spec.trustBundle`), so only the `apiVersion` and the paths differ.
//!
//! API server rules this follows (kubernetes `pkg/apis/certificates/validation/validation.go`,
//! `ValidateClusterTrustBundle`, and `pkg/apis/core/validation/names.go`,
//! `ValidateClusterTrustBundleName`): with a signer name set, the object's name must start
//! with the signer name with `/` replaced by `:` followed by `:`, and the rest must be a DNS
//! subdomain; the trust bundle holds only `CERTIFICATE` PEM blocks without headers, each a CA
//! certificate with valid basic constraints, no duplicates, at least one. The
//! `ClusterTrustBundleAttest` admission plugin (`plugin/pkg/admission/certificates/ctbattest`)
//! requires `attest` on `certificates.k8s.io` `signers` for the signer name (or
//! `meshca.io/*`) on create and update.
//!
//! Every object carries `app.kubernetes.io/managed-by: meshca` and `meshca.io/ca: <ca>`. A
//! sync deletes only objects with both labels whose CA is one it publishes, whose
//! `spec.signerName` is that CA's (`meshca.io/<ca>`) and whose name starts with
//! `meshca.io:<ca>:`, and only those it no longer wants (an old suffix) ([`owned_by`]):
//! another deployment's CAs, other signers' bundles and hand-made bundles are never touched,
//! even when they carry meshca's labels. A CA that is no longer served keeps its last ClusterTrustBundle (workloads may
//! still trust it); delete it by hand.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams};
use tokio::sync::watch;

use super::discovery::{first_served, Wanted};
use super::issuers::IssuerWatch;
use super::ratelimit::RateLimiter;
use super::{kube_err, LABEL_CA, LABEL_MANAGED_BY, MANAGED_BY};
use crate::error::{Error, Result};
use crate::store::{ca_anchors, Store};

mod plan;
pub use plan::*;

/// The ClusterTrustBundle API, for discovery.
pub const WANTED: Wanted = Wanted {
    group: GROUP,
    versions: &VERSIONS,
    plural: PLURAL,
    kind: KIND,
};

/// The ClusterTrustBundle API the cluster serves: the first of v1, v1beta1 and v1alpha1
/// ([`VERSIONS`]) that lists `clustertrustbundles`, else `None` (the cluster predates the API,
/// or has it turned off). Any error other than 404 is returned (retry later).
pub async fn detect(client: &kube::Client) -> Result<Option<ApiResource>> {
    first_served(client, &WANTED).await
}

/// What [`sync`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    /// Names applied (created or updated).
    pub applied: Vec<String>,
    /// Names deleted as stale.
    pub deleted: Vec<String>,
    /// Objects that were already as wanted.
    pub unchanged: usize,
}

/// The label selector of meshca's ClusterTrustBundles.
pub fn selector() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_CA}")
}

/// Lists meshca's ClusterTrustBundles once, applies the missing or changed ones of
/// `desired` (server-side apply, field manager `meshca`, forced) and deletes the stale ones
/// of the same CAs. Writes go through `limiter` when given.
pub async fn sync(
    client: &kube::Client,
    ar: &ApiResource,
    desired: &[Desired],
    limiter: Option<&RateLimiter>,
) -> Result<SyncReport> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), ar);
    let listed = api
        .list(&ListParams::default().labels(&selector()))
        .await
        .map_err(|e| kube_err("listing ClusterTrustBundles", e))?;
    let existing: Vec<Existing> = listed.items.iter().map(Existing::from_object).collect();
    let p = plan(desired, &existing);
    let mut report = SyncReport {
        unchanged: p.unchanged,
        ..Default::default()
    };
    for d in &p.apply {
        if let Some(l) = limiter {
            l.acquire().await;
        }
        super::apply(
            &api,
            &d.name,
            &manifest(d, &ar.api_version),
            super::FIELD_MANAGER,
            &format!("applying ClusterTrustBundle {}", d.name),
        )
        .await?;
        tracing::info!(name = %d.name, ca = %d.ca, anchors = d.anchors, "ClusterTrustBundle applied");
        report.applied.push(d.name.clone());
    }
    for name in &p.delete {
        if let Some(l) = limiter {
            l.acquire().await;
        }
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if super::api_code(&e) == Some(404) => {}
            Err(e) => return Err(kube_err(&format!("deleting ClusterTrustBundle {name}"), e)),
        }
        tracing::info!(%name, "stale ClusterTrustBundle deleted");
        report.deleted.push(name.clone());
    }
    Ok(report)
}

/// The desired ClusterTrustBundles of `cas`, from the store (each CA's roots, both sides of
/// a rotation in progress). A CA whose roots cannot be read is logged and left out, so its
/// objects are neither rewritten nor pruned; the first such error is returned beside the
/// others.
pub async fn desired_from_store(
    store: &dyn Store,
    cas: &[String],
    suffix: &str,
) -> (Vec<Desired>, Option<Error>) {
    let mut out = Vec::new();
    let mut first_err = None;
    for ca in cas {
        let r = async { desired(ca, &ca_anchors(store, ca).await?, suffix) }.await;
        match r {
            Ok(d) => out.push(d),
            Err(e) => {
                tracing::warn!(%ca, error = %e, "ClusterTrustBundle of this CA skipped");
                first_err.get_or_insert(e);
            }
        }
    }
    (out, first_err)
}

/// Settings of [`sync_loop`].
#[derive(Clone, Debug)]
pub struct LoopConfig {
    /// Name suffix ([`DEFAULT_SUFFIX`]).
    pub suffix: String,
    /// Re-sync interval.
    pub interval: Duration,
    /// First wait after a failed pass (doubling up to `interval`).
    pub retry_base: Duration,
}

/// The signer's ClusterTrustBundle sync: while leading, detects the API once (absent: one
/// log line and the loop ends), then publishes the served CAs' bundles every
/// `cfg.interval`, at once when the served CAs change, and after a failure again after a
/// backoff (`retry_base` doubling, with jitter, at most `interval`). Ends when `shutdown`
/// flips to `true`.
#[allow(clippy::too_many_arguments)]
pub async fn sync_loop(
    store: Arc<dyn Store>,
    client: kube::Client,
    limiter: Arc<RateLimiter>,
    leader: watch::Receiver<bool>,
    mut issuers: IssuerWatch,
    cfg: LoopConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut api: Option<ApiResource> = None;
    let mut failures: u32 = 0;
    loop {
        let mut failed = false;
        if *leader.borrow() {
            if api.is_none() {
                match detect(&client).await {
                    Ok(Some(ar)) => {
                        tracing::info!(api = %ar.api_version, "publishing ClusterTrustBundles");
                        api = Some(ar);
                    }
                    Ok(None) => {
                        tracing::info!(
                            "the cluster serves no ClusterTrustBundle API ({}): ClusterTrustBundles skipped",
                            WANTED.describe()
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ClusterTrustBundle discovery failed; retrying");
                        failed = true;
                    }
                }
            }
            if let Some(ar) = &api {
                let cas = issuers.borrow_and_update().names();
                let (want, err) = desired_from_store(store.as_ref(), &cas, &cfg.suffix).await;
                match sync(&client, ar, &want, Some(&limiter)).await {
                    Ok(r) => tracing::debug!(
                        applied = r.applied.len(),
                        deleted = r.deleted.len(),
                        unchanged = r.unchanged,
                        "ClusterTrustBundles synced"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "ClusterTrustBundle sync failed; retrying");
                        failed = true;
                    }
                }
                failed |= err.is_some();
            }
        }
        let wait = if failed {
            failures = failures.saturating_add(1);
            let d = cfg
                .retry_base
                .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
                .min(cfg.interval);
            super::backoff::jitter(d, super::backoff::random_unit())
        } else {
            failures = 0;
            cfg.interval
        };
        let changed = async {
            if issuers.changed().await.is_err() {
                // No more reloads (fixed CAs, or the reloader stopped): only the timer.
                std::future::pending::<()>().await
            }
        };
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(wait) => {}
            _ = changed => tracing::debug!("CAs changed: syncing ClusterTrustBundles now"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ca::{create_root, CaMaterial, CaSpec};
    use crate::kube::discovery::tests::resource_list;
    use crate::kube::testutil::{json as resp, mock_client, next, status};
    use crate::store::{LocalStore, Slot};
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;
    use tower_test::mock::Handle;

    type H = Handle<Request<Body>, Response<Body>>;

    const BETA: &str = "certificates.k8s.io/v1beta1";
    const V1: &str = "certificates.k8s.io/v1";
    const LIST_PATH: &str = "/apis/certificates.k8s.io/v1beta1/clustertrustbundles";
    const V1_LIST_PATH: &str = "/apis/certificates.k8s.io/v1/clustertrustbundles";
    const LIST_QUERY: &str =
        "&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dmeshca%2Cmeshca.io%2Fca";

    fn beta() -> ApiResource {
        ApiResource {
            group: GROUP.into(),
            version: "v1beta1".into(),
            api_version: BETA.into(),
            kind: KIND.into(),
            plural: PLURAL.into(),
        }
    }

    async fn store_with(cas: &[&str]) -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::create(dir.path().join("home")).unwrap();
        for c in cas {
            let ca = create_root(&CaSpec::root(c), time::OffsetDateTime::now_utc()).unwrap();
            s.save_ca(&ca, false).await.unwrap();
        }
        (dir, s)
    }

    /// Answers discovery as a cluster before 1.37 with the API on: v1 lists CSRs only,
    /// v1beta1 lists ClusterTrustBundles.
    async fn v1beta1_only(h: &mut H) {
        let (req, _, send) = next(h).await;
        assert_eq!(req.uri().path(), "/apis/certificates.k8s.io/v1");
        send.send_response(resource_list(V1, &["certificatesigningrequests"]));
        let (req, _, send) = next(h).await;
        assert_eq!(req.uri().path(), "/apis/certificates.k8s.io/v1beta1");
        send.send_response(resource_list(BETA, &["clustertrustbundles"]));
    }

    fn object(name: &str, ca: &str, managed: bool, pem: &str) -> serde_json::Value {
        json!({
            "apiVersion": BETA, "kind": KIND,
            "metadata": {"name": name, "resourceVersion": "7", "labels": {
                LABEL_MANAGED_BY: if managed { MANAGED_BY } else { "someone-else" }, LABEL_CA: ca}},
            "spec": {"signerName": format!("meshca.io/{ca}"), "trustBundle": pem},
        })
    }

    fn list(items: Vec<serde_json::Value>) -> Response<Body> {
        resp(
            200,
            &json!({"apiVersion": BETA, "kind": "ClusterTrustBundleList",
                    "metadata": {"resourceVersion": "9"}, "items": items}),
        )
    }

    /// Answers the LIST of meshca's bundles after checking its method, path and query.
    async fn expect_list(h: &mut H, items: Vec<serde_json::Value>) {
        expect_list_at(h, LIST_PATH, items).await
    }

    /// [`expect_list`] at `path` (the collection of one version).
    async fn expect_list_at(h: &mut H, path: &str, items: Vec<serde_json::Value>) {
        let (req, body, send) = next(h).await;
        assert_eq!(req.method(), "GET");
        assert_eq!(req.uri().path(), path);
        assert_eq!(req.uri().query(), Some(LIST_QUERY));
        assert!(body.is_null());
        send.send_response(list(items));
    }

    /// Checks a server-side apply of `name` and returns its body.
    async fn expect_apply(h: &mut H, name: &str, code: u16) -> serde_json::Value {
        expect_apply_at(h, LIST_PATH, name, code).await
    }

    /// [`expect_apply`] under the collection `path`.
    async fn expect_apply_at(h: &mut H, path: &str, name: &str, code: u16) -> serde_json::Value {
        let (req, body, send) = next(h).await;
        assert_eq!(req.method(), "PATCH");
        assert_eq!(req.uri().path(), format!("{path}/{name}"));
        assert_eq!(req.uri().query(), Some("&force=true&fieldManager=meshca"));
        assert_eq!(
            req.headers()["content-type"],
            "application/apply-patch+yaml"
        );
        if code == 200 {
            send.send_response(resp(200, &body));
        } else {
            send.send_response(status(code, "InternalError", "etcd is sad"));
        }
        body
    }

    /// The certificates of a trustBundle, checked to be headerless CERTIFICATE blocks.
    fn certs(pem: &str) -> Vec<Vec<u8>> {
        let blocks = ::pem::parse_many(pem).unwrap();
        assert!(!blocks.is_empty());
        blocks
            .iter()
            .map(|b| {
                assert_eq!(b.tag(), "CERTIFICATE");
                assert!(b.headers().iter().next().is_none());
                b.contents().to_vec()
            })
            .collect()
    }

    /// After the client is gone, no request was left unanswered.
    async fn no_more_requests(mut h: H) {
        let r = tokio::time::timeout(Duration::from_secs(5), h.next_request())
            .await
            .expect("the client is dropped");
        assert!(
            r.is_none(),
            "an unexpected request: {:?}",
            r.map(|r| r.0.uri().clone())
        );
    }

    fn root(s: &CaMaterial) -> Vec<u8> {
        s.root().as_ref().to_vec()
    }

    #[test]
    fn names_suffixes_and_the_desired_object() {
        assert_eq!(bundle_name("ca1", "roots"), "meshca.io:ca1:roots");
        for ok in ["roots", "v2", "a.b-c", "x"] {
            validate_suffix(ok).unwrap();
        }
        for bad in [
            "",
            "Roots",
            "a:b",
            "-a",
            "a-",
            "a..b",
            "a/b",
            &"x".repeat(254),
        ] {
            let e = validate_suffix(bad).unwrap_err().to_string();
            assert!(e.contains("suffix"), "{bad:?}: {e}");
        }
        let ca = create_root(&CaSpec::root("ca1"), time::OffsetDateTime::now_utc()).unwrap();
        let e = desired("ca1", &[], "roots").unwrap_err().to_string();
        assert!(e.contains("CA ca1 has no root"), "{e}");
        // A duplicated root is published once (the API server refuses duplicates).
        let d = desired("ca1", &[ca.cert.clone(), ca.cert.clone()], "roots").unwrap();
        assert_eq!(d.anchors, 1);
        assert_eq!(certs(&d.pem), vec![root(&ca)]);
        assert_eq!(d.signer, "meshca.io/ca1");
        let m = manifest(&d, BETA);
        assert_eq!(m["metadata"]["name"], "meshca.io:ca1:roots");
        assert_eq!(m["metadata"]["labels"]["meshca.io/ca"], "ca1");
        assert_eq!(
            m["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "meshca"
        );
        assert_eq!(m["spec"]["signerName"], "meshca.io/ca1");
        assert!(desired("ca1", std::slice::from_ref(&ca.cert), "Bad").is_err());
    }

    #[test]
    fn plan_applies_changes_and_prunes_only_its_own_cas() {
        let ca = create_root(&CaSpec::root("ca1"), time::OffsetDateTime::now_utc()).unwrap();
        let d = desired("ca1", std::slice::from_ref(&ca.cert), "roots").unwrap();
        let e = |name: &str, ca: &str, managed: bool, pem: &str| Existing {
            name: name.into(),
            ca: Some(ca.into()),
            managed,
            signer: Some(format!("meshca.io/{ca}")),
            pem: Some(pem.into()),
        };
        let same = e(&d.name, "ca1", true, &d.pem);
        let p = plan(std::slice::from_ref(&d), std::slice::from_ref(&same));
        assert_eq!((p.apply.len(), p.delete.len(), p.unchanged), (0, 0, 1));
        let p = plan(std::slice::from_ref(&d), &[e(&d.name, "ca1", true, "old")]);
        assert_eq!(p.apply, vec![d.clone()]);
        let p = plan(
            std::slice::from_ref(&d),
            &[
                same,
                e("meshca.io:ca1:old", "ca1", true, "x"),
                e("meshca.io:ca1:hand", "ca1", false, "x"),
                e("meshca.io:other:roots", "other", true, "x"),
            ],
        );
        assert_eq!(p.delete, vec!["meshca.io:ca1:old".to_string()]);
        assert!(p.apply.is_empty());
    }

    /// Issue 17: prune deleted any bundle carrying meshca's labels, whatever its signer name
    /// or object name. Both must be the CA's own.
    #[test]
    fn prune_checks_the_signer_name_and_the_name_prefix_not_only_labels() {
        let ca = create_root(&CaSpec::root("ca1"), time::OffsetDateTime::now_utc()).unwrap();
        let d = desired("ca1", std::slice::from_ref(&ca.cert), "roots").unwrap();
        let e = |name: &str, signer: Option<&str>| Existing {
            name: name.into(),
            ca: Some("ca1".into()),
            managed: true,
            signer: signer.map(str::to_string),
            pem: Some("x".into()),
        };
        let p = plan(
            std::slice::from_ref(&d),
            &[
                // Labelled ca1, but another signer's bundle (or none).
                e("example.com:team:roots", Some("example.com/team")),
                e("meshca.io:ca10:roots", Some("meshca.io/ca10")),
                e("cluster-roots", None),
                // The signer matches, the name does not carry the prefix.
                e("ca1-roots", Some("meshca.io/ca1")),
                e("meshca.io:ca1", Some("meshca.io/ca1")),
                // Its own, stale: deleted.
                e("meshca.io:ca1:old", Some("meshca.io/ca1")),
            ],
        );
        assert_eq!(p.delete, vec!["meshca.io:ca1:old".to_string()]);
    }

    #[tokio::test]
    async fn a_missing_bundle_is_created_by_server_side_apply() {
        let (_d, store) = store_with(&["ca1"]).await;
        let ca = store.load_ca("ca1").await.unwrap();
        let (client, mut h) = mock_client();
        // Kubernetes 1.37: v1 serves them (beside CSRs and PodCertificateRequests), and is
        // used for the list and the apply; no other version is asked about.
        let server = tokio::spawn(async move {
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.method(), "GET");
            assert_eq!(req.uri().path(), "/apis/certificates.k8s.io/v1");
            send.send_response(resource_list(
                V1,
                &[
                    "certificatesigningrequests",
                    "clustertrustbundles",
                    "podcertificaterequests",
                ],
            ));
            expect_list_at(&mut h, V1_LIST_PATH, vec![]).await;
            let body = expect_apply_at(&mut h, V1_LIST_PATH, "meshca.io:ca1:roots", 200).await;
            (h, body)
        });
        let ar = detect(&client).await.unwrap().expect("v1 detected");
        assert_eq!(ar.api_version, V1);
        let (want, err) = desired_from_store(&store, &["ca1".into()], DEFAULT_SUFFIX).await;
        assert!(err.is_none());
        let r = sync(&client, &ar, &want, None).await.unwrap();
        assert_eq!(r.applied, vec!["meshca.io:ca1:roots".to_string()]);
        drop(client);
        let (h, body) = server.await.unwrap();
        assert_eq!(body["apiVersion"], V1);
        assert_eq!(body["kind"], "ClusterTrustBundle");
        assert_eq!(body["metadata"]["name"], "meshca.io:ca1:roots");
        assert_eq!(
            body["metadata"]["labels"],
            json!({"app.kubernetes.io/managed-by": "meshca", "meshca.io/ca": "ca1"})
        );
        assert_eq!(body["spec"]["signerName"], "meshca.io/ca1");
        assert_eq!(
            certs(body["spec"]["trustBundle"].as_str().unwrap()),
            vec![root(&ca)]
        );
        no_more_requests(h).await;
    }

    #[tokio::test]
    async fn a_prepared_rotation_publishes_both_roots() {
        let (_d, store) = store_with(&["ca1"]).await;
        let old = store.load_ca("ca1").await.unwrap();
        let (before, _) = desired_from_store(&store, &["ca1".into()], "roots").await;
        crate::store::rotate::run_phase(
            &store,
            "ca1",
            crate::rotation::Request::Prepare,
            &Default::default(),
            time::OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
        let next_root = root(&store.load_rotation_cas("ca1", Slot::Next).await.unwrap()[0]);
        assert_ne!(next_root, root(&old));
        let (client, mut h) = mock_client();
        let old_pem = before[0].pem.clone();
        let server = tokio::spawn(async move {
            expect_list(
                &mut h,
                vec![object("meshca.io:ca1:roots", "ca1", true, &old_pem)],
            )
            .await;
            let body = expect_apply(&mut h, "meshca.io:ca1:roots", 200).await;
            (h, body)
        });
        let (want, _) = desired_from_store(&store, &["ca1".into()], "roots").await;
        let r = sync(&client, &beta(), &want, None).await.unwrap();
        assert_eq!(r.applied.len(), 1);
        drop(client);
        let (h, body) = server.await.unwrap();
        let got = certs(body["spec"]["trustBundle"].as_str().unwrap());
        assert_eq!(
            got,
            vec![root(&old), next_root],
            "the active and the prepared root"
        );
        no_more_requests(h).await;
    }

    #[tokio::test]
    async fn an_unchanged_bundle_is_not_written() {
        let (_d, store) = store_with(&["ca1"]).await;
        let (want, _) = desired_from_store(&store, &["ca1".into()], "roots").await;
        let (client, mut h) = mock_client();
        let pem = want[0].pem.clone();
        let server = tokio::spawn(async move {
            expect_list(
                &mut h,
                vec![object("meshca.io:ca1:roots", "ca1", true, &pem)],
            )
            .await;
            h
        });
        let r = sync(&client, &beta(), &want, None).await.unwrap();
        assert_eq!(
            r,
            SyncReport {
                unchanged: 1,
                ..Default::default()
            }
        );
        drop(client);
        no_more_requests(server.await.unwrap()).await;
    }

    #[tokio::test]
    async fn stale_bundles_of_its_cas_are_deleted_and_others_kept() {
        let (_d, store) = store_with(&["ca1"]).await;
        let (want, _) = desired_from_store(&store, &["ca1".into()], "v2").await;
        let (client, mut h) = mock_client();
        let pem = want[0].pem.clone();
        let server = tokio::spawn(async move {
            expect_list(
                &mut h,
                vec![
                    object("meshca.io:ca1:v2", "ca1", true, &pem),
                    object("meshca.io:ca1:roots", "ca1", true, &pem),
                    object("meshca.io:ca1:by-hand", "ca1", false, &pem),
                    object("meshca.io:other:roots", "other", true, &pem),
                    // Issue 17: labelled as ca1's, but another signer's, or not named
                    // meshca.io:ca1:<suffix>.
                    {
                        let mut o = object("example.com:team:roots", "ca1", true, &pem);
                        o["spec"]["signerName"] = json!("example.com/team");
                        o
                    },
                    {
                        let mut o = object("team-roots", "ca1", true, &pem);
                        o["spec"].as_object_mut().unwrap().remove("signerName");
                        o
                    },
                    object("ca1-roots", "ca1", true, &pem),
                ],
            )
            .await;
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "DELETE");
            assert_eq!(req.uri().path(), format!("{LIST_PATH}/meshca.io:ca1:roots"));
            // A plain delete: no options, no dry run.
            assert_eq!(body, json!({}));
            assert_eq!(req.uri().query().unwrap_or(""), "");
            send.send_response(resp(
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
            ));
            h
        });
        // A delete the mock does not expect would wait for an answer forever.
        let r = tokio::time::timeout(Duration::from_secs(10), sync(&client, &beta(), &want, None))
            .await
            .expect("no request beyond the one delete (a bundle it does not own was deleted?)")
            .unwrap();
        assert_eq!(r.deleted, vec!["meshca.io:ca1:roots".to_string()]);
        assert_eq!(r.unchanged, 1);
        drop(client);
        no_more_requests(server.await.unwrap()).await;
    }

    async fn issuers_of(store: &LocalStore, names: &[&str]) -> IssuerWatch {
        let mut m: BTreeMap<String, Arc<dyn crate::issue::Issuer>> = BTreeMap::new();
        for n in names {
            let ca = store.load_ca(n).await.unwrap();
            m.insert(
                n.to_string(),
                Arc::new(crate::issue::LocalIssuer::new(ca).unwrap()),
            );
        }
        super::super::issuers::IssuerSet::watch_fixed(m)
    }

    /// The loop over a store with CA `ca1`, always leading, 1 h interval, 50 ms first retry.
    async fn start_loop() -> (
        tempfile::TempDir,
        tokio::task::JoinHandle<()>,
        H,
        watch::Sender<bool>,
    ) {
        let (d, store) = store_with(&["ca1"]).await;
        let issuers = issuers_of(&store, &["ca1"]).await;
        let (client, h) = mock_client();
        let (stop_tx, stop_rx) = watch::channel(false);
        let cfg = LoopConfig {
            suffix: DEFAULT_SUFFIX.into(),
            interval: Duration::from_secs(3600),
            retry_base: Duration::from_millis(50),
        };
        let task = tokio::spawn(sync_loop(
            Arc::new(store),
            client,
            Arc::new(RateLimiter::new(0.0, 1)),
            crate::kube::leader::always_leader(),
            issuers,
            cfg,
            stop_rx,
        ));
        (d, task, h, stop_tx)
    }

    #[tokio::test]
    async fn an_absent_api_is_skipped_after_discovery() {
        let (_d, task, mut h, _stop_tx) = start_loop().await;
        // v1 lists only CSRs (a cluster before 1.37); v1beta1 and v1alpha1 are off.
        let (req, _, send) = next(&mut h).await;
        assert_eq!(
            (req.method().as_str(), req.uri().path()),
            ("GET", "/apis/certificates.k8s.io/v1")
        );
        send.send_response(resource_list(V1, &["certificatesigningrequests"]));
        for path in [
            "/apis/certificates.k8s.io/v1beta1",
            "/apis/certificates.k8s.io/v1alpha1",
        ] {
            let (req, _, send) = next(&mut h).await;
            assert_eq!((req.method().as_str(), req.uri().path()), ("GET", path));
            send.send_response(status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the loop ends when the API is absent")
            .unwrap();
        no_more_requests(h).await;
    }

    #[tokio::test]
    async fn v1beta1_is_used_when_v1_does_not_serve_bundles() {
        let (client, mut h) = mock_client();
        let server = tokio::spawn(async move {
            v1beta1_only(&mut h).await;
            h
        });
        let ar = detect(&client).await.unwrap().unwrap();
        assert_eq!(ar.api_version, BETA);
        assert_eq!(ar.version, "v1beta1");
        drop(client);
        no_more_requests(server.await.unwrap()).await;
    }

    #[tokio::test]
    async fn v1alpha1_is_used_when_neither_v1_nor_v1beta1_serves_bundles() {
        let (client, mut h) = mock_client();
        let server = tokio::spawn(async move {
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.uri().path(), "/apis/certificates.k8s.io/v1");
            send.send_response(status(404, "NotFound", "not found"));
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.uri().path(), "/apis/certificates.k8s.io/v1beta1");
            send.send_response(resource_list(BETA, &["podcertificaterequests"]));
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.uri().path(), "/apis/certificates.k8s.io/v1alpha1");
            send.send_response(resource_list(
                "certificates.k8s.io/v1alpha1",
                &["clustertrustbundles"],
            ));
            h
        });
        let ar = detect(&client).await.unwrap().unwrap();
        assert_eq!(ar.api_version, "certificates.k8s.io/v1alpha1");
        assert_eq!(ar.plural, "clustertrustbundles");
        drop(client);
        no_more_requests(server.await.unwrap()).await;
        // A discovery error other than 404 is not "absent".
        let (client, mut h) = mock_client();
        let server = tokio::spawn(async move {
            let (_, _, send) = next(&mut h).await;
            send.send_response(status(503, "ServiceUnavailable", "try later"));
            h
        });
        let e = detect(&client).await.unwrap_err();
        assert!(crate::kube::retryable(&e), "{e}");
        drop(client);
        no_more_requests(server.await.unwrap()).await;
    }

    #[tokio::test]
    async fn a_failed_write_is_retried_after_a_backoff() {
        let (_d, task, mut h, stop_tx) = start_loop().await;
        v1beta1_only(&mut h).await;
        expect_list(&mut h, vec![]).await;
        let first = expect_apply(&mut h, "meshca.io:ca1:roots", 500).await;
        // Discovery is not repeated; the whole pass is, well before the 1 h interval.
        let t = std::time::Instant::now();
        expect_list(&mut h, vec![]).await;
        assert!(t.elapsed() < Duration::from_secs(5));
        let second = expect_apply(&mut h, "meshca.io:ca1:roots", 200).await;
        assert_eq!(first, second);
        // Then it waits for the interval: nothing more until stopped.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), h.next_request())
                .await
                .is_err(),
            "no request after a successful pass"
        );
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops")
            .unwrap();
    }

    /// `run()` (what `meshca signer run` calls) publishes the served CA's bundle when
    /// `cluster_trust_bundles` is set, beside the CSR controller.
    #[tokio::test]
    async fn the_signer_run_loop_publishes_the_served_cas_bundle() {
        let (_d, store) = store_with(&["ca1"]).await;
        let ca = store.load_ca("ca1").await.unwrap();
        let (client, mut h) = mock_client();
        let mut cfg = crate::kube::run::RunConfig::new(Arc::new(store));
        cfg.cluster_trust_bundles = Some("roots".into());
        cfg.ledger = None;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(crate::kube::run::run(client, cfg, async move {
            let _ = stopped.await;
        }));
        let mut parked = Vec::new();
        let body = loop {
            let (req, body, send) = next(&mut h).await;
            let (path, q) = (
                req.uri().path().to_string(),
                req.uri().query().unwrap_or("").to_string(),
            );
            match (req.method().as_str(), path.as_str()) {
                ("GET", "/apis/certificates.k8s.io/v1/certificatesigningrequests") if q.contains("watch=true") => parked.push(send),
                ("GET", "/apis/certificates.k8s.io/v1/certificatesigningrequests") => send.send_response(resp(
                    200,
                    &json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequestList",
                            "metadata": {"resourceVersion": "1"}, "items": []}),
                )),
                ("GET", "/apis/certificates.k8s.io/v1") => send.send_response(resource_list(
                    V1,
                    &["certificatesigningrequests", "clustertrustbundles"],
                )),
                ("GET", V1_LIST_PATH) => {
                    assert_eq!(q, LIST_QUERY);
                    send.send_response(list(vec![]))
                }
                ("PATCH", p) if p == format!("{V1_LIST_PATH}/meshca.io:ca1:roots") => {
                    assert_eq!(q, "&force=true&fieldManager=meshca");
                    send.send_response(resp(200, &body));
                    break body;
                }
                (m, p) => panic!("unexpected {m} {p}?{q}"),
            }
        };
        assert_eq!(body["spec"]["signerName"], "meshca.io/ca1");
        assert_eq!(
            certs(body["spec"]["trustBundle"].as_str().unwrap()),
            vec![root(&ca)]
        );
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("stops")
            .unwrap()
            .unwrap();
        drop(parked);
    }
}
