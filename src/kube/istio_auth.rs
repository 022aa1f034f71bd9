//! Authentication for `meshca istio-ca serve` through the Kubernetes API: ServiceAccount
//! tokens checked with TokenReview (behind a short [`TokenCache`]), and the pod lookup that
//! ztunnel impersonation needs.
//!
//! RBAC: `create` on `authentication.k8s.io/tokenreviews`, and `list` on `pods` (only when a
//! CA lists `istio_node_agents`). See `deploy/components/istio-ca`.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::Api;

use crate::istio::{
    AuthError, Caller, PodDirectory, TokenAuthenticator, TokenCache, TokenHash, TOKEN_CACHE_ENTRIES,
};

/// TokenReview and pod lookups through one client.
pub struct KubeIstioAuth {
    client: kube::Client,
    cache: TokenCache,
}

impl std::fmt::Debug for KubeIstioAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeIstioAuth")
            .field("cached_reviews", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl KubeIstioAuth {
    /// Reviews through `client`, reusing a successful review for `cache_ttl` (zero: never).
    pub fn new(client: kube::Client, cache_ttl: Duration) -> Self {
        KubeIstioAuth {
            client,
            cache: TokenCache::new(cache_ttl, TOKEN_CACHE_ENTRIES),
        }
    }
}

#[async_trait]
impl TokenAuthenticator for KubeIstioAuth {
    async fn review(&self, token: &str, audience: &str) -> Result<Caller, AuthError> {
        let hash = TokenHash::of(token);
        if let Some(c) = self.cache.get(&hash, audience, Instant::now()) {
            return Ok(c);
        }
        let tr = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![audience.to_string()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let out = api
            .create(&PostParams::default(), &tr)
            .await
            .map_err(|e| AuthError::Unavailable(format!("TokenReview: {e}")))?;
        let status = out.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".to_string());
            tracing::debug!(token = ?hash, error = %why, "token review refused");
            return Err(AuthError::Rejected(format!(
                "the API server did not authenticate the token for audience {audience:?}: {why}"
            )));
        }
        if let Some(aud) = &status.audiences {
            if !aud.iter().any(|a| a == audience) {
                return Err(AuthError::Rejected(format!(
                    "the token is not for audience {audience:?} (it is for {aud:?})"
                )));
            }
        }
        let user = status.user.unwrap_or_default();
        let caller = Caller::from_review(
            user.username.as_deref().unwrap_or(""),
            &user
                .extra
                .unwrap_or_default()
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        )
        .map_err(AuthError::Rejected)?;
        self.cache
            .put(hash, audience, caller.clone(), Instant::now());
        Ok(caller)
    }
}

#[async_trait]
impl PodDirectory for KubeIstioAuth {
    async fn pod_on_node(
        &self,
        namespace: &str,
        sa: &str,
        node: &str,
    ) -> Result<Option<String>, String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let pods = api.list(&lp).await.map_err(|e| {
            format!("listing pods of namespace {namespace:?} on node {node:?}: {e}")
        })?;
        Ok(pods.items.into_iter().find_map(|p| {
            let spec = p.spec.as_ref()?;
            let sa_name = spec.service_account_name.as_deref().unwrap_or("default");
            let finished = matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            (sa_name == sa
                && spec.node_name.as_deref() == Some(node)
                && !finished
                && p.metadata.deletion_timestamp.is_none())
            .then(|| p.metadata.name.clone())
            .flatten()
        }))
    }
}
