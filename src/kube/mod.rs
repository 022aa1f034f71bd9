//! The Kubernetes front end (cargo feature `kube`).
//!
//! - [`store::KubeStore`]: CAs as `kubernetes.io/tls` Secrets, bundle definitions and the
//!   issuance ledger as ConfigMaps, all in one namespace.
//! - [`signer`]: a kube-runtime controller that signs `certificates.k8s.io/v1`
//!   CertificateSigningRequests whose `signerName` is `meshca.io/<ca>`.
//! - [`approver`]: the optional policy auto-approver (off by default).
//! - [`managed`]: Secrets annotated with `meshca.io/ca` are filled with `tls.crt`, `tls.key`
//!   and `ca.crt`, and renewed at 2/3 of their lifetime.
//! - [`csr_client`]: the workload side of a CSR (`sds serve --source kube-csr`): key in memory,
//!   create, watch until signed or refused, delete.
//! - [`csr_delete_guard`]: the kube-csr sidecar's start-up check that the admission policy
//!   limiting its CSR `delete` right to its own CSRs is installed and applies to it.
//! - [`trust_bundle_reader`]: a read-only watch of one signer's ClusterTrustBundles.
//! - [`bundles`]: trust-bundle ConfigMaps (key `ca.crt`) kept in sync in target namespaces.
//! - [`trust_bundles`]: one ClusterTrustBundle `meshca.io:<ca>:<suffix>` per CA.
//! - [`pcr`]: the PodCertificateRequest signer (`certificates.k8s.io` v1, v1beta1 or
//!   v1alpha1), found through discovery and skipped where the API is not served.
//! - [`discovery`]: which version of an API the cluster serves (v1 first, then older ones).
//! - [`leader`]: Lease-based leader election, so that only one replica acts.
//! - [`health`]: whether each controller of the leader has completed its first list
//!   (`/readyz`, `meshca_controller_ready`).
//! - [`live_certs`]: the certificates still in use in the cluster, which prune checks besides
//!   the ledger.
//! - [`metrics`]: `/healthz`, `/readyz` and Prometheus `/metrics`.
//! - [`ratelimit`]: a token bucket for the controller's API writes (client QPS/burst).
//! - [`run`]: wires all of the above into `meshca signer run`.
//!
//! Each kind of write has its own field manager, so that no server-side apply of one kind can
//! drop the fields another kind owns: [`FIELD_MANAGER`] (the store, CSR status and approval,
//! bundle ConfigMaps), [`FIELD_MANAGER_MANAGED`] (managed-Secret data),
//! [`FIELD_MANAGER_ERROR`] (the managed-Secret error annotation, a merge patch) and
//! [`FIELD_MANAGER_ISSUE`] (`meshca issue --secret`). Library errors are converted into a CSR
//! `Failed` condition / Secret annotation (terminal) or a retry with per-object backoff
//! (retryable, [`retryable`]) exactly once, in [`signer`] and [`managed`].

pub mod approver;
pub mod backoff;
pub mod bundles;
pub mod csr_client;
pub mod csr_delete_guard;
pub mod discovery;
pub mod health;
pub mod in_doubt;
pub mod issuers;
pub mod istio_auth;
pub mod leader;
pub mod ledger;
pub mod ledger_repair;
pub mod live_certs;
pub mod managed;
pub mod metrics;
pub mod pcr;
pub mod ratelimit;
pub mod relist;
pub mod run;
pub mod signer;
pub mod store;
pub mod store_rotation;
pub mod trust_bundle_reader;
pub mod trust_bundles;

#[cfg(test)]
mod decision_tests;

use std::path::Path;

use crate::error::{Error, Result};

/// Field manager of the store's objects, CSR status and approval writes and bundle ConfigMaps.
pub const FIELD_MANAGER: &str = "meshca";
/// Field manager of the data (`tls.crt`, `tls.key`, `ca.crt`) the managed-Secret controller
/// applies.
pub const FIELD_MANAGER_MANAGED: &str = "meshca-managed";
/// Field manager of the `meshca.io/error` annotation on managed Secrets (a merge patch of that
/// one annotation, which cannot drop any other field).
pub const FIELD_MANAGER_ERROR: &str = "meshca-managed-error";
/// Field manager of `meshca issue --secret` with the kube store
/// ([`store::KubeStore::apply_tls_secret`]).
pub const FIELD_MANAGER_ISSUE: &str = "meshca-issue";
/// Prefix of the signer names meshca serves (`meshca.io/<ca>`).
pub const SIGNER_PREFIX: &str = "meshca.io/";
/// The standard "managed by" label.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`] on everything meshca creates.
pub const MANAGED_BY: &str = "meshca";
/// Label naming the CA a Secret holds, or whose roots a ClusterTrustBundle holds.
pub const LABEL_CA: &str = "meshca.io/ca";
/// Label naming the trust bundle a ConfigMap holds.
pub const LABEL_BUNDLE: &str = "meshca.io/bundle";

/// The signer name of a CA: `meshca.io/<ca>`.
pub fn signer_name(ca: &str) -> String {
    format!("{SIGNER_PREFIX}{ca}")
}

/// The CA name in a `meshca.io/<ca>` signer name, if it is one.
pub fn ca_from_signer_name(signer: &str) -> Option<&str> {
    signer
        .strip_prefix(SIGNER_PREFIX)
        .filter(|n| !n.is_empty() && !n.contains('/'))
}

/// Server-side apply of `body` to `name` as `manager`, forced: meshca owns the fields that
/// manager writes. `what` names the write in the error message.
pub(crate) async fn apply<K>(
    api: &kube::Api<K>,
    name: &str,
    body: &serde_json::Value,
    manager: &str,
    what: &str,
) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &kube::api::PatchParams::apply(manager).force(),
        &kube::api::Patch::Apply(body),
    )
    .await
    .map(|_| ())
    .map_err(|e| kube_err(what, e))
}

/// Whether an API status code means "try again later": server trouble (5xx), throttling
/// (429), a conflict (409), and authentication or authorization failures (401/403), which an
/// operator fixes in RBAC without the request changing. 400 and 422 (the request itself is
/// invalid) and 404 are terminal.
pub fn retryable_code(code: u16) -> bool {
    code >= 500 || matches!(code, 401 | 403 | 409 | 429)
}

/// Whether a retry of the same request can help. Backend errors say so themselves; store and
/// I/O trouble is environmental; everything else (bad input, policy, an unusable CA) is not.
pub fn retryable(e: &Error) -> bool {
    match e {
        Error::Backend { retryable, .. } => *retryable,
        Error::Store(_) | Error::Io { .. } => true,
        _ => false,
    }
}

/// Converts a Kubernetes client error into the library error, once, with a one-line message.
pub(crate) fn kube_err(context: &str, e: kube::Error) -> Error {
    let retryable = match &e {
        kube::Error::Api(s) => retryable_code(s.code),
        _ => true,
    };
    let message = match &e {
        kube::Error::Api(s) => format!("{context}: {} ({} {})", s.message, s.code, s.reason),
        other => format!("{context}: {other}"),
    };
    Error::Backend {
        backend: "kubernetes",
        message,
        retryable,
    }
}

/// The HTTP status code of an API error, if the error is one.
pub fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Builds a client: from `kubeconfig` when given, else `KUBECONFIG` / `~/.kube/config`, else
/// the in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(p) => {
            // The user named this file: a missing or unreadable one is their input error.
            let kc = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| Error::invalid("kubeconfig", format!("{}: {e}", p.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| Error::Store(format!("{}: {e}", p.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::Store(format!("no Kubernetes configuration found: {e}")))?,
    };
    kube::Client::try_from(config).map_err(|e| Error::Store(format!("Kubernetes client: {e}")))
}

/// RFC 3339 "now" for condition timestamps.
pub(crate) fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// What a controller's reconcile answers when its replica does not lead at that instant.
/// Controllers run only in a leader session, so this is a Lease renewal that failed for a
/// moment (an API server restart, say) while the session went on: the object is looked at
/// again shortly. Waiting for its next change instead would leave an approved CSR unsigned
/// until something touched it again (seen once in the API server restart e2e round).
pub(crate) fn not_leading() -> kube::runtime::controller::Action {
    kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(2))
}

#[cfg(test)]
pub(crate) mod testutil {
    //! A tower-test mock API server: scripted request/response pairs.

    use http::{Request, Response};
    use kube::client::Body;
    use tower_test::mock::Handle;

    /// A request (method, path with query; JSON body, Null when empty) and its reply slot.
    pub type Next = (
        Request<()>,
        serde_json::Value,
        tower_test::mock::SendResponse<Response<Body>>,
    );

    /// A client whose requests land on the returned handle.
    pub fn mock_client() -> (kube::Client, Handle<Request<Body>, Response<Body>>) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (kube::Client::new(svc, "default"), handle)
    }

    /// A JSON response.
    pub fn json(code: u16, v: &serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(v).unwrap()))
            .unwrap()
    }

    /// A Kubernetes `Status` failure response.
    pub fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
        json(
            code,
            &serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": message, "reason": reason, "code": code
            }),
        )
    }

    /// The next request: method, path with query, and JSON body (Null when empty).
    pub async fn next(handle: &mut Handle<Request<Body>, Response<Body>>) -> Next {
        next_opt(handle).await.expect("service alive")
    }

    /// The next request, or `None` once every client is dropped.
    pub async fn next_opt(handle: &mut Handle<Request<Body>, Response<Body>>) -> Option<Next> {
        tokio::time::timeout(std::time::Duration::from_secs(10), next_untimed(handle))
            .await
            .expect("a request within 10 s")
    }

    /// The next request, waiting as long as it takes (tests on paused time, where a 10 s
    /// timeout would fire first), or `None` once every client is dropped.
    pub async fn next_untimed(handle: &mut Handle<Request<Body>, Response<Body>>) -> Option<Next> {
        let (req, send) = handle.next_request().await?;
        let (parts, body) = req.into_parts();
        let bytes = http_body_util::BodyExt::collect(body)
            .await
            .unwrap()
            .to_bytes();
        let v = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Some((Request::from_parts(parts, ()), v, send))
    }
}
