//! A thin ACM PCA client: AWS configuration, bounded retries on throttling only, the
//! per-CA rate limiter, and polling of asynchronous results.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_acmpca::config::http::HttpResponse;
use aws_sdk_acmpca::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_acmpca::primitives::Blob;
use aws_sdk_acmpca::types::{ApiPassthrough, SigningAlgorithm, Validity, ValidityPeriodType};

use super::error::{CallError, ErrorKind};
use super::limiter::{LimiterConfig, RateLimiter};
use super::Arn;
use crate::error::{Error, Result};

/// Default number of retries of a throttled call (so at most 4 attempts).
pub const DEFAULT_THROTTLE_RETRIES: u32 = 3;
/// Default deadline for an asynchronous result (GetCertificate, CA CSR) to become ready.
pub const DEFAULT_POLL_DEADLINE: Duration = Duration::from_secs(60);

/// How meshca talks to ACM PCA.
#[derive(Clone, Debug)]
pub struct PcaOptions {
    /// AWS region; default: the CA ARN's region, else the standard chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// Custom endpoint (private endpoints, tests). Without it the SDK also honours
    /// `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_ACM_PCA`.
    pub endpoint: Option<String>,
    /// The per-CA IssueCertificate rate limiter.
    pub limiter: LimiterConfig,
    /// Retries of a throttled call (with full-jitter exponential backoff). Other errors are
    /// never retried by meshca, and the SDK's own retries are switched off.
    pub throttle_retries: u32,
    /// First backoff step after a throttled call (doubles per retry, capped at 20 s).
    pub throttle_backoff: Duration,
    /// Deadline for GetCertificate / GetCertificateAuthorityCsr to stop answering
    /// RequestInProgressException.
    pub poll_deadline: Duration,
    /// Timeout of one HTTP attempt.
    pub attempt_timeout: Duration,
}

impl Default for PcaOptions {
    fn default() -> Self {
        PcaOptions {
            region: None,
            endpoint: None,
            limiter: LimiterConfig::default(),
            throttle_retries: DEFAULT_THROTTLE_RETRIES,
            throttle_backoff: Duration::from_millis(250),
            poll_deadline: DEFAULT_POLL_DEADLINE,
            attempt_timeout: Duration::from_secs(20),
        }
    }
}

/// An ACM PCA client with meshca's retry policy. Counts the HTTP calls it makes.
#[derive(Debug)]
pub struct PcaClient {
    client: aws_sdk_acmpca::Client,
    opts: PcaOptions,
    calls: AtomicU64,
}

/// A uniformly random duration in `[0, max]` (full jitter).
pub(crate) fn jitter(max: Duration) -> Duration {
    let mut b = [0u8; 4];
    if aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b).is_err() {
        return max / 2;
    }
    max.mul_f64(f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX))
}

/// Backoff ceiling of retry number `n` (1-based): `base * 2^(n-1)`, capped at 20 s.
pub(crate) fn backoff_ceiling(base: Duration, n: u32) -> Duration {
    base.saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(Duration::from_secs(20))
}

/// A PEM CSR body from DER.
pub(crate) fn csr_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der.to_vec()))
}

fn absolute(t: time::OffsetDateTime) -> Result<Validity> {
    Validity::builder()
        .r#type(ValidityPeriodType::Absolute)
        .value(t.unix_timestamp())
        .build()
        .map_err(|e| Error::Build(format!("validity: {e}")))
}

/// What IssueCertificate is asked to do.
#[derive(Clone, Debug)]
pub struct IssueParams<'a> {
    /// Issuing CA.
    pub ca_arn: &'a str,
    /// DER CSR.
    pub csr_der: &'a [u8],
    /// Template ARN.
    pub template_arn: String,
    /// Signing algorithm (matches the CA's key).
    pub signing: SigningAlgorithm,
    /// notBefore.
    pub not_before: time::OffsetDateTime,
    /// notAfter.
    pub not_after: time::OffsetDateTime,
    /// Idempotency token.
    pub token: String,
    /// Extensions for APIPassthrough templates.
    pub passthrough: Option<ApiPassthrough>,
}

impl PcaClient {
    /// Loads the AWS configuration (environment, shared profile, IRSA web identity, ECS/EC2
    /// metadata) and builds a client for the CA `arn` (its region is the default region).
    pub async fn connect(arn: Option<&Arn>, opts: &PcaOptions) -> Result<PcaClient> {
        opts.limiter.validate()?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(opts.attempt_timeout)
                    .build(),
            );
        if let Some(r) = opts
            .region
            .clone()
            .or_else(|| arn.map(|a| a.region.clone()))
        {
            loader = loader.region(Region::new(r));
        }
        if let Some(e) = &opts.endpoint {
            loader = loader.endpoint_url(e);
        }
        let conf = loader.load().await;
        if conf.region().is_none() {
            return Err(Error::invalid(
                "AWS region",
                "none configured: set AWS_REGION or a profile region, or give the CA's full ARN",
            ));
        }
        Ok(PcaClient {
            client: aws_sdk_acmpca::Client::new(&conf),
            opts: opts.clone(),
            calls: AtomicU64::new(0),
        })
    }

    /// The SDK client.
    pub fn sdk(&self) -> &aws_sdk_acmpca::Client {
        &self.client
    }

    /// The options.
    pub fn options(&self) -> &PcaOptions {
        &self.opts
    }

    /// HTTP calls made so far (every attempt counts).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Runs one AWS operation: waits for the limiter (when given) before *every* attempt,
    /// retries throttling only, with full-jitter backoff, at most `throttle_retries` times.
    pub(crate) async fn try_call<T, E, F, Fut>(
        &self,
        limiter: Option<&RateLimiter>,
        what: &str,
        mut f: F,
    ) -> std::result::Result<T, (CallError, u32)>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if let Some(l) = limiter {
                if let Err(e) = l.acquire(what).await {
                    return Err((
                        CallError {
                            kind: ErrorKind::Shed,
                            code: None,
                            detail: match e {
                                Error::Backend { message, .. } => message,
                                other => other.to_string(),
                            },
                        },
                        attempt,
                    ));
                }
            }
            self.calls.fetch_add(1, Ordering::Relaxed);
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let ce = CallError::from_sdk(&e);
                    if ce.kind == ErrorKind::Throttled && attempt <= self.opts.throttle_retries {
                        tracing::debug!(what, attempt, "throttled by AWS; backing off");
                        tokio::time::sleep(jitter(backoff_ceiling(
                            self.opts.throttle_backoff,
                            attempt,
                        )))
                        .await;
                        continue;
                    }
                    return Err((ce, attempt));
                }
            }
        }
    }

    /// [`PcaClient::try_call`] with the error mapped for `op` on `arn`.
    pub(crate) async fn call<T, E, F, Fut>(
        &self,
        op: &str,
        arn: &str,
        limiter: Option<&RateLimiter>,
        f: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        self.try_call(limiter, arn, f)
            .await
            .map_err(|(ce, n)| ce.into_error(op, arn, n))
    }

    /// Polls `f` while it answers RequestInProgressException, with backoff (100 ms doubling
    /// to 2 s) until `poll_deadline`.
    pub(crate) async fn poll<T, E, F, Fut>(&self, op: &str, arn: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let deadline = tokio::time::Instant::now() + self.opts.poll_deadline;
        let mut delay = Duration::from_millis(100);
        loop {
            match self.try_call(None, arn, &mut f).await {
                Ok(v) => return Ok(v),
                Err((ce, _)) if ce.kind == ErrorKind::InProgress => {
                    let now = tokio::time::Instant::now();
                    if now + delay > deadline {
                        return Err(Error::Backend {
                            backend: "acm-pca",
                            message: format!(
                                "{op} on {arn}: still in progress after {}s (deadline); retry later",
                                self.opts.poll_deadline.as_secs()
                            ),
                            retryable: true,
                        });
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err((ce, n)) => return Err(ce.into_error(op, arn, n)),
            }
        }
    }

    /// IssueCertificate through `limiter`; returns the certificate ARN.
    pub async fn issue_certificate(
        &self,
        p: &IssueParams<'_>,
        limiter: &RateLimiter,
    ) -> Result<String> {
        let csr = csr_pem(p.csr_der);
        let validity = absolute(p.not_after)?;
        let not_before = absolute(p.not_before)?;
        let out = self
            .call("IssueCertificate", p.ca_arn, Some(limiter), || {
                self.client
                    .issue_certificate()
                    .certificate_authority_arn(p.ca_arn)
                    .csr(Blob::new(csr.as_bytes()))
                    .signing_algorithm(p.signing.clone())
                    .template_arn(&p.template_arn)
                    .validity(validity.clone())
                    .validity_not_before(not_before.clone())
                    .idempotency_token(&p.token)
                    .set_api_passthrough(p.passthrough.clone())
                    .send()
            })
            .await?;
        out.certificate_arn()
            .map(str::to_string)
            .ok_or_else(|| Error::Backend {
                backend: "acm-pca",
                message: format!(
                    "IssueCertificate on {} returned no certificate ARN",
                    p.ca_arn
                ),
                retryable: false,
            })
    }

    /// GetCertificate, waiting while it is in progress. Returns (certificate PEM, chain PEM).
    pub async fn get_certificate(
        &self,
        ca_arn: &str,
        cert_arn: &str,
    ) -> Result<(String, Option<String>)> {
        let out = self
            .poll("GetCertificate", ca_arn, || {
                self.client
                    .get_certificate()
                    .certificate_authority_arn(ca_arn)
                    .certificate_arn(cert_arn)
                    .send()
            })
            .await?;
        let cert = out
            .certificate()
            .map(str::to_string)
            .ok_or_else(|| Error::Backend {
                backend: "acm-pca",
                message: format!("GetCertificate for {cert_arn} returned no certificate"),
                retryable: false,
            })?;
        Ok((
            cert,
            out.certificate_chain()
                .filter(|c| !c.trim().is_empty())
                .map(str::to_string),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        let b = Duration::from_millis(250);
        assert_eq!(backoff_ceiling(b, 1), b);
        assert_eq!(backoff_ceiling(b, 3), Duration::from_secs(1));
        assert_eq!(backoff_ceiling(b, 40), Duration::from_secs(20));
        for _ in 0..100 {
            assert!(jitter(Duration::from_secs(1)) <= Duration::from_secs(1));
        }
    }
}
