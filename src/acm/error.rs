//! Mapping of AWS SDK errors to one-line meshca errors.
//!
//! The SDK's `Debug` output (request IDs, raw HTTP responses, nested enums) never reaches the
//! user: every failure becomes an [`Error`] whose message says what happened in a sentence,
//! naming the operation and the CA ARN.

use aws_sdk_acmpca::config::http::HttpResponse;
use aws_sdk_acmpca::error::{ProvideErrorMetadata, SdkError};

use crate::error::Error;

/// What kind of failure an AWS call ended in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Credentials invalid or lacking IAM permission.
    AccessDenied,
    /// No credentials found anywhere in the AWS credential chain.
    NoCredentials,
    /// The CA exists but is not ACTIVE (pending, disabled, expired, deleted).
    NotActive,
    /// No CA (or certificate) with that ARN in this account and region.
    NotFound,
    /// The ARN is syntactically wrong.
    InvalidArn,
    /// ACM PCA refused the CSR.
    MalformedCsr,
    /// Rate-limited by AWS.
    Throttled,
    /// Refused by meshca's own rate limiter (the queue was too deep); no AWS call was made.
    Shed,
    /// The certificate is still being issued (GetCertificate) or the CA's CSR is not ready.
    InProgress,
    /// A quota (number of CAs or certificates) is exhausted.
    QuotaExceeded,
    /// AWS rejected an argument (validity, template, algorithm).
    InvalidArgs,
    /// The endpoint could not be reached or the call timed out.
    Unreachable,
    /// A server error without an AWS error code (e.g. HTTP 500 with an HTML body).
    ServerError,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// Classifies an AWS error code (and the HTTP status when there is no code).
    pub fn classify(code: Option<&str>, http_status: Option<u16>) -> ErrorKind {
        match code {
            Some(
                "AccessDeniedException"
                | "AccessDenied"
                | "UnrecognizedClientException"
                | "InvalidClientTokenId"
                | "ExpiredTokenException"
                | "ExpiredToken"
                | "SignatureDoesNotMatch"
                | "MissingAuthenticationToken",
            ) => ErrorKind::AccessDenied,
            Some("InvalidStateException") => ErrorKind::NotActive,
            Some("ResourceNotFoundException") => ErrorKind::NotFound,
            Some("InvalidArnException") => ErrorKind::InvalidArn,
            Some("MalformedCSRException" | "MalformedCsrException") => ErrorKind::MalformedCsr,
            Some(
                "ThrottlingException"
                | "Throttling"
                | "TooManyRequestsException"
                | "RequestLimitExceeded"
                | "ProvisionedThroughputExceededException",
            ) => ErrorKind::Throttled,
            Some("RequestInProgressException") => ErrorKind::InProgress,
            Some("LimitExceededException") => ErrorKind::QuotaExceeded,
            Some(
                "InvalidArgsException"
                | "InvalidRequestException"
                | "ValidationException"
                | "InvalidPolicyException"
                | "InvalidTagException"
                | "MalformedCertificateException"
                | "CertificateMismatchException",
            ) => ErrorKind::InvalidArgs,
            Some(_) => ErrorKind::Other,
            None => match http_status {
                Some(429) => ErrorKind::Throttled,
                Some(403) => ErrorKind::AccessDenied,
                Some(s) if s >= 500 => ErrorKind::ServerError,
                _ => ErrorKind::Other,
            },
        }
    }

    /// Whether trying again later may succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Throttled
                | ErrorKind::InProgress
                | ErrorKind::Unreachable
                | ErrorKind::ServerError
        )
    }
}

/// A classified failure of one AWS call, with its one-line message.
#[derive(Debug)]
pub struct CallError {
    /// The classification.
    pub kind: ErrorKind,
    /// The AWS error code, if any.
    pub code: Option<String>,
    /// The AWS message (or transport description), single line.
    pub detail: String,
}

/// Makes `s` one line of at most 300 characters.
pub(crate) fn one_line(s: &str) -> String {
    let mut out: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if out.len() > 300 {
        let mut cut = 297;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

/// The Display texts of `e`'s source chain, joined (transport errors hide the cause there).
fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    one_line(&parts.join(": "))
}

/// Credential-chain failures surface as dispatch or construction failures; spot them.
fn credential_kind(detail: &str) -> Option<ErrorKind> {
    if detail.contains("no credentials found") {
        Some(ErrorKind::NoCredentials)
    } else if detail.contains("credentials") || detail.contains("credential provider") {
        Some(ErrorKind::AccessDenied)
    } else {
        None
    }
}

impl CallError {
    /// Classifies an SDK error.
    pub fn from_sdk<E>(e: &SdkError<E, HttpResponse>) -> CallError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        match e {
            SdkError::ServiceError(se) => {
                let err = se.err();
                let status = se.raw().status().as_u16();
                let code = err.code().map(str::to_string);
                let kind = ErrorKind::classify(code.as_deref(), Some(status));
                let detail = match (err.message(), &code) {
                    (Some(m), _) => one_line(m),
                    (None, Some(c)) => c.clone(),
                    (None, None) => format!("HTTP {status} without an AWS error code"),
                };
                CallError { kind, code, detail }
            }
            SdkError::ResponseError(re) => {
                let status = re.raw().status().as_u16();
                CallError {
                    kind: ErrorKind::classify(None, Some(status)),
                    code: None,
                    detail: format!("HTTP {status} with a response that is not an AWS error"),
                }
            }
            SdkError::TimeoutError(_) => CallError {
                kind: ErrorKind::Unreachable,
                code: None,
                detail: "timed out".into(),
            },
            SdkError::DispatchFailure(d) => {
                let detail = match d.as_connector_error() {
                    Some(c) => chain_text(c),
                    None => chain_text(e),
                };
                // Credential-chain failures surface here too.
                let kind = credential_kind(&detail).unwrap_or(ErrorKind::Unreachable);
                CallError {
                    kind,
                    code: None,
                    detail,
                }
            }
            other => {
                let detail = chain_text(other);
                let kind = credential_kind(&detail).unwrap_or(ErrorKind::Other);
                CallError {
                    kind,
                    code: None,
                    detail,
                }
            }
        }
    }

    /// The meshca error for this failure of `op` on `arn` after `attempts` attempts.
    pub fn into_error(self, op: &str, arn: &str, attempts: u32) -> Error {
        let d = &self.detail;
        let message = match self.kind {
            ErrorKind::AccessDenied => format!(
                "access denied calling {op} on {arn}: {d} (the AWS identity needs acm-pca:{op}; check credentials, region and IAM policy)"
            ),
            ErrorKind::NoCredentials => format!(
                "no AWS credentials for {op}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or IRSA (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE)"
            ),
            ErrorKind::NotActive => format!("CA {arn} is not active, so {op} is refused: {d}"),
            ErrorKind::NotFound => {
                format!("CA not found: {arn} does not exist in this account and region ({op}: {d})")
            }
            ErrorKind::InvalidArn => format!("invalid ARN {arn} ({op}: {d})"),
            ErrorKind::MalformedCsr => return Error::Csr(format!("ACM PCA rejected the CSR for {arn}: {d}")),
            ErrorKind::Throttled => format!(
                "throttled by AWS: {op} on {arn} still rate-limited after {attempts} attempt(s) ({d}); lower the request rate or raise the quota"
            ),
            ErrorKind::Shed => d.clone(),
            ErrorKind::InProgress => format!("{op} on {arn}: still in progress ({d})"),
            ErrorKind::QuotaExceeded => format!("AWS quota exceeded: {op} on {arn}: {d}"),
            ErrorKind::InvalidArgs => format!("{op} on {arn} rejected by AWS: {d}"),
            ErrorKind::Unreachable => format!("cannot reach ACM PCA for {op} on {arn}: {d}"),
            ErrorKind::ServerError => format!("ACM PCA server error on {op} for {arn}: {d}"),
            ErrorKind::Other => match &self.code {
                Some(c) if !d.contains(c.as_str()) => format!("{op} on {arn} failed: {c}: {d}"),
                _ => format!("{op} on {arn} failed: {d}"),
            },
        };
        Error::Backend {
            backend: "acm-pca",
            message,
            retryable: self.kind.retryable(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        use ErrorKind::*;
        let cases = [
            (Some("AccessDeniedException"), None, AccessDenied),
            (Some("UnrecognizedClientException"), Some(400), AccessDenied),
            (Some("InvalidStateException"), Some(400), NotActive),
            (Some("ResourceNotFoundException"), Some(400), NotFound),
            (Some("InvalidArnException"), Some(400), InvalidArn),
            (Some("MalformedCSRException"), Some(400), MalformedCsr),
            (Some("ThrottlingException"), Some(400), Throttled),
            (Some("RequestInProgressException"), Some(400), InProgress),
            (Some("LimitExceededException"), Some(400), QuotaExceeded),
            (Some("InvalidArgsException"), Some(400), InvalidArgs),
            (Some("SomethingNew"), Some(400), Other),
            (None, Some(429), Throttled),
            (None, Some(500), ServerError),
            (None, Some(404), Other),
        ];
        for (code, status, want) in cases {
            assert_eq!(
                ErrorKind::classify(code, status),
                want,
                "{code:?} {status:?}"
            );
        }
        assert!(Throttled.retryable() && ServerError.retryable());
        assert!(!NotFound.retryable() && !AccessDenied.retryable() && !MalformedCsr.retryable());
    }

    #[test]
    fn messages_are_one_line_and_named() {
        let arn = "arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/x";
        let e = CallError {
            kind: ErrorKind::NotFound,
            code: Some("ResourceNotFoundException".into()),
            detail: one_line("Resource\n x not\tfound"),
        }
        .into_error("IssueCertificate", arn, 1);
        let s = e.to_string();
        assert!(s.starts_with("acm-pca: CA not found: arn:aws"), "{s}");
        assert!(!s.contains('\n'));
        assert!(!e.is_user_error());
        let e = CallError {
            kind: ErrorKind::MalformedCsr,
            code: None,
            detail: "bad".into(),
        }
        .into_error("IssueCertificate", arn, 1);
        assert!(matches!(e, Error::Csr(_)));
        let e = CallError {
            kind: ErrorKind::Throttled,
            code: Some("ThrottlingException".into()),
            detail: "Rate exceeded".into(),
        }
        .into_error("IssueCertificate", arn, 4);
        assert!(e.to_string().contains("after 4 attempt(s)"));
        assert!(matches!(
            e,
            Error::Backend {
                retryable: true,
                ..
            }
        ));
    }

    #[test]
    fn missing_credentials_are_named() {
        assert_eq!(
            credential_kind(
                "other: the credential provider was not enabled: no credentials found in chain"
            ),
            Some(ErrorKind::NoCredentials)
        );
        assert_eq!(
            credential_kind("tcp connect error: Connection refused"),
            None
        );
        let e = CallError {
            kind: ErrorKind::NoCredentials,
            code: None,
            detail: "no credentials found in chain".into(),
        }
        .into_error("IssueCertificate", "arn:x", 1);
        assert!(
            e.to_string()
                .contains("no AWS credentials for IssueCertificate"),
            "{e}"
        );
    }

    #[test]
    fn one_line_truncates() {
        let s = one_line(&"é".repeat(400));
        assert!(s.len() <= 300 && s.ends_with("..."));
    }
}
