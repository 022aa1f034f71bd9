//! The one status update of a PodCertificateRequest: the request as read (its
//! `metadata.resourceVersion` is the update's precondition) with either the certificate
//! (`certificateChain`, `notBefore`, `notAfter`, `beginRefreshAt` and an `Issued` condition)
//! or a `Denied` / `Failed` condition and nothing else, as
//! `ValidatePodCertificateRequestStatusUpdate` requires. Pure.

use k8s_openapi::api::certificates::v1beta1::PodCertificateRequest;
use serde_json::json;
use time::OffsetDateTime;

use super::check::{Refusal, StatusTimes};
use crate::error::{Error, Result};

/// `Issued` condition reason.
pub const REASON_ISSUED: &str = "MeshcaIssued";
/// Longest condition message written (the API allows 32768 bytes).
const MAX_MESSAGE: usize = 1000;

fn condition(
    pcr: &PodCertificateRequest,
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

fn with_status(
    pcr: &PodCertificateRequest,
    status: serde_json::Value,
) -> Result<PodCertificateRequest> {
    let mut v = serde_json::to_value(pcr)
        .map_err(|e| Error::invalid("PodCertificateRequest", e.to_string()))?;
    v["status"] = status;
    serde_json::from_value(v)
        .map_err(|e| Error::invalid("PodCertificateRequest status", e.to_string()))
}

/// The request with the issued chain (leaf first, PEM) and its times.
pub fn issued(
    pcr: &PodCertificateRequest,
    chain_pem: &str,
    times: &StatusTimes,
    message: &str,
    now: OffsetDateTime,
) -> Result<PodCertificateRequest> {
    with_status(
        pcr,
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
    pcr: &PodCertificateRequest,
    r: &Refusal,
    now: OffsetDateTime,
) -> Result<PodCertificateRequest> {
    with_status(
        pcr,
        json!({ "conditions": [condition(pcr, r.condition, r.reason, &r.message, now)] }),
    )
}
