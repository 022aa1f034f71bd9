//! The one status update of a PodCertificateRequest: the request as read (its
//! `metadata.resourceVersion` is the update's precondition) with either the certificate
//! (`certificateChain`, `notBefore`, `notAfter`, `beginRefreshAt` and an `Issued` condition)
//! or a `Denied` / `Failed` condition and nothing else, as
//! `ValidatePodCertificateRequestStatusUpdate` requires. Pure.
//!
//! The body is for the version the request is written through: `apiVersion` is that
//! version's, and the spec is the one read, except that an empty `stubPKCS10Request` (which
//! the [`Pcr`] model always has, and which v1alpha1 and the 1.35 v1beta1 do not know) is
//! left out. The API server ignores the spec of a `/status` update, but decodes it.

use kube::api::{ApiResource, DynamicObject};
use serde_json::json;
use time::OffsetDateTime;

use super::check::{Refusal, StatusTimes};
use super::Pcr;
use crate::error::{Error, Result};

/// `Issued` condition reason.
pub const REASON_ISSUED: &str = "MeshcaIssued";
/// Longest condition message written (the API allows 32768 bytes).
const MAX_MESSAGE: usize = 1000;

fn condition(
    pcr: &Pcr,
    ty: &str,
    reason: &str,
    message: &str,
    now: OffsetDateTime,
) -> serde_json::Value {
    let mut c = json!({
        "type": ty,
        "status": "True",
        "reason": reason,
        "message": super::super::signer::truncate(message, MAX_MESSAGE),
        "lastTransitionTime": super::super::rfc3339(now),
    });
    if let Some(g) = pcr.metadata.generation {
        c["observedGeneration"] = json!(g);
    }
    c
}

fn with_status(pcr: &Pcr, ar: &ApiResource, status: serde_json::Value) -> Result<DynamicObject> {
    let mut v = serde_json::to_value(pcr)
        .map_err(|e| Error::invalid("PodCertificateRequest", e.to_string()))?;
    v["apiVersion"] = json!(ar.api_version);
    v["kind"] = json!(ar.kind);
    if let Some(spec) = v.get_mut("spec").and_then(|s| s.as_object_mut()) {
        if spec.get("stubPKCS10Request").and_then(|x| x.as_str()) == Some("") {
            spec.remove("stubPKCS10Request");
        }
    }
    v["status"] = status;
    serde_json::from_value(v)
        .map_err(|e| Error::invalid("PodCertificateRequest status", e.to_string()))
}

/// The request with the issued chain (leaf first, PEM) and its times.
pub fn issued(
    pcr: &Pcr,
    ar: &ApiResource,
    chain_pem: &str,
    times: &StatusTimes,
    message: &str,
    now: OffsetDateTime,
) -> Result<DynamicObject> {
    with_status(
        pcr,
        ar,
        json!({
            "conditions": [condition(pcr, "Issued", REASON_ISSUED, message, now)],
            "certificateChain": chain_pem,
            "notBefore": super::super::rfc3339(times.not_before),
            "notAfter": super::super::rfc3339(times.not_after),
            "beginRefreshAt": super::super::rfc3339(times.begin_refresh_at),
        }),
    )
}

/// The request with a `Denied` or `Failed` condition and no other status field.
pub fn refused(
    pcr: &Pcr,
    ar: &ApiResource,
    r: &Refusal,
    now: OffsetDateTime,
) -> Result<DynamicObject> {
    with_status(
        pcr,
        ar,
        json!({ "conditions": [condition(pcr, r.condition, r.reason, &r.message, now)] }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::pcr::check::tests::{key_and_pop, pcr, stub_csr, stub_pcr};
    use crate::kube::pcr::{VERSIONS, WANTED};

    const UID: &str = "0b1e7a0c-5d0e-4f4e-9a57-7d8f0c1e2a3b";

    #[test]
    fn the_body_speaks_the_written_version_and_keeps_the_spec_read() {
        let now = OffsetDateTime::now_utc();
        let r = Refusal::denied("X", "no");
        // A v1beta1/v1alpha1 request with pkixPublicKey: no stubPKCS10Request is sent (an
        // unknown field to v1alpha1 and the 1.35 v1beta1).
        let (spki, pop) = key_and_pop("p256", UID);
        let p = pcr("app", "web", "meshca.io/mesh", &spki, &pop, UID, None);
        for v in ["v1beta1", "v1alpha1"] {
            let body =
                serde_json::to_value(refused(&p, &WANTED.resource(v), &r, now).unwrap()).unwrap();
            assert_eq!(body["apiVersion"], format!("certificates.k8s.io/{v}"));
            assert_eq!(body["kind"], "PodCertificateRequest");
            let spec = body["spec"].as_object().unwrap();
            assert!(!spec.contains_key("stubPKCS10Request"), "{spec:?}");
            assert_eq!(
                spec["pkixPublicKey"],
                serde_json::to_value(&p).unwrap()["spec"]["pkixPublicKey"]
            );
            assert_eq!(body["metadata"]["resourceVersion"], "7");
            assert_eq!(body["status"]["conditions"][0]["type"], "Denied");
        }
        // A v1 request: the stub is sent back as read, and no field v1 lacks appears.
        let (csr, _) = stub_csr("p256");
        let p = stub_pcr("app", "web", "meshca.io/mesh", &csr, None, UID);
        let body =
            serde_json::to_value(refused(&p, &WANTED.resource(VERSIONS[0]), &r, now).unwrap())
                .unwrap();
        assert_eq!(body["apiVersion"], "certificates.k8s.io/v1");
        let spec = body["spec"].as_object().unwrap();
        assert_eq!(
            spec["stubPKCS10Request"],
            serde_json::to_value(&p).unwrap()["spec"]["stubPKCS10Request"]
        );
        for absent in ["pkixPublicKey", "proofOfPossession"] {
            assert!(!spec.contains_key(absent), "{absent}: {spec:?}");
        }
    }
}
