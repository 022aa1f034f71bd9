//! Which version of an API the cluster serves: the first of a preference list whose group
//! version lists the resource. Used for `certificates.k8s.io` PodCertificateRequests and
//! ClusterTrustBundles, which went from v1alpha1 through v1beta1 to v1 (Kubernetes 1.37), and
//! whose older versions stay served (or not) at the cluster's choice.
//!
//! A 404 for a group version, or a group version that does not list the resource, means "not
//! in this version": the next one is tried. Any other error is returned (retry later): a
//! cluster that is starting must not look like one without the API.

use kube::api::ApiResource;

use super::{api_code, kube_err};
use crate::error::Result;

/// One resource of one API group, and the versions to try, most preferred first.
#[derive(Clone, Copy, Debug)]
pub struct Wanted {
    /// The API group (`certificates.k8s.io`).
    pub group: &'static str,
    /// Versions in order of preference (`["v1", "v1beta1", "v1alpha1"]`).
    pub versions: &'static [&'static str],
    /// The plural resource name in discovery (`podcertificaterequests`).
    pub plural: &'static str,
    /// The kind (`PodCertificateRequest`).
    pub kind: &'static str,
}

impl Wanted {
    /// The [`ApiResource`] of `version`.
    pub fn resource(&self, version: &str) -> ApiResource {
        ApiResource {
            group: self.group.into(),
            version: version.into(),
            api_version: format!("{}/{version}", self.group),
            kind: self.kind.into(),
            plural: self.plural.into(),
        }
    }

    /// The group versions tried, for messages: `certificates.k8s.io v1, v1beta1 or v1alpha1`.
    pub fn describe(&self) -> String {
        let v = match self.versions {
            [] => String::new(),
            [one] => one.to_string(),
            [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
        };
        format!("{} {v} {}", self.group, self.plural)
    }
}

/// The first version of `w.versions` whose group version lists `w.plural`, or `None` when
/// none does. One discovery request per version tried, stopping at the first hit.
pub async fn first_served(client: &kube::Client, w: &Wanted) -> Result<Option<ApiResource>> {
    for v in w.versions {
        let gv = format!("{}/{v}", w.group);
        match client.list_api_group_resources(&gv).await {
            Ok(list) if list.resources.iter().any(|r| r.name == w.plural) => {
                return Ok(Some(w.resource(v)))
            }
            Ok(_) => {}
            Err(e) if api_code(&e) == Some(404) => {}
            Err(e) => return Err(kube_err(&format!("discovering {gv}"), e)),
        }
    }
    Ok(None)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kube::testutil::{json as resp, mock_client, next, status};
    use serde_json::json;

    /// The discovery answer of `gv` listing `resources`.
    pub(crate) fn resource_list(
        gv: &str,
        resources: &[&str],
    ) -> http::Response<kube::client::Body> {
        let r: Vec<serde_json::Value> = resources
            .iter()
            .map(|n| json!({"name": n, "singularName": "", "namespaced": !n.starts_with("cluster"), "kind": "X", "verbs": ["get", "list"]}))
            .collect();
        resp(
            200,
            &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": r}),
        )
    }

    const W: Wanted = Wanted {
        group: "certificates.k8s.io",
        versions: &["v1", "v1beta1", "v1alpha1"],
        plural: "podcertificaterequests",
        kind: "PodCertificateRequest",
    };

    #[test]
    fn describe_names_every_version() {
        assert_eq!(
            W.describe(),
            "certificates.k8s.io v1, v1beta1 or v1alpha1 podcertificaterequests"
        );
        let r = W.resource("v1beta1");
        assert_eq!(r.api_version, "certificates.k8s.io/v1beta1");
        assert_eq!((r.plural.as_str(), r.kind.as_str()), (W.plural, W.kind));
    }

    #[tokio::test]
    async fn stops_at_the_first_version_listing_the_resource_and_returns_other_errors() {
        let (client, mut h) = mock_client();
        let server = tokio::spawn(async move {
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.uri().path(), "/apis/certificates.k8s.io/v1");
            send.send_response(resource_list(
                "certificates.k8s.io/v1",
                &["certificatesigningrequests"],
            ));
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.uri().path(), "/apis/certificates.k8s.io/v1beta1");
            send.send_response(status(404, "NotFound", "not found"));
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.uri().path(), "/apis/certificates.k8s.io/v1alpha1");
            send.send_response(resource_list(
                "certificates.k8s.io/v1alpha1",
                &["podcertificaterequests"],
            ));
            // Then: a 503 on the first version is an error, not "absent".
            let (_, _, send) = next(&mut h).await;
            send.send_response(status(503, "ServiceUnavailable", "starting"));
        });
        let r = first_served(&client, &W).await.unwrap().unwrap();
        assert_eq!(r.version, "v1alpha1");
        let e = first_served(&client, &W).await.unwrap_err();
        assert!(crate::kube::retryable(&e), "{e}");
        assert!(e.to_string().contains("certificates.k8s.io/v1"), "{e}");
        server.await.unwrap();
    }
}
