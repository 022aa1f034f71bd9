//! The ACM Private CA part of `meshca init`: `--backend acm-pca` with `--pca-arn` (register
//! an existing PCA) or `--create` (create and activate a root PCA, or a subordinate of
//! `--parent`, signed locally or by the parent PCA).

use clap::{Args, ValueEnum};
use meshca::acm::{create_root_pca, create_subordinate_pca, register_pca, PcaCaSpec, PcaOptions};
use meshca::ca::{CaMaterial, CaSpec};
use time::OffsetDateTime;

use crate::common::{usage, Ctx};
use crate::progress::Progress;

/// Where a new CA's key lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// meshca generates and stores the key.
    #[default]
    Local,
    /// AWS ACM Private CA holds the key; meshca stores the certificate and ARN.
    AcmPca,
}

/// `meshca init` flags for the ACM PCA backend.
#[derive(Args, Debug, Default)]
pub struct AwsInitArgs {
    /// Where the CA key lives: local, or acm-pca (AWS ACM Private CA).
    #[arg(long, value_enum, default_value_t = BackendKind::Local, conflicts_with = "config")]
    pub backend: BackendKind,
    /// acm-pca: register this existing, active PCA under the --ca name.
    #[arg(long, value_name = "ARN", conflicts_with_all = ["create", "config"])]
    pub pca_arn: Option<String>,
    /// acm-pca: create a new PCA (a root, or with --parent a subordinate) and activate it.
    #[arg(long, conflicts_with = "config")]
    pub create: bool,
    /// acm-pca: AWS endpoint URL (private endpoints, tests); stored with the CA.
    /// Without it AWS_ENDPOINT_URL and the usual AWS configuration apply.
    #[arg(long, value_name = "URL")]
    pub aws_endpoint: Option<String>,
    /// acm-pca: AWS region [default: the ARN's region, else AWS_REGION / the profile's].
    #[arg(long, value_name = "REGION")]
    pub aws_region: Option<String>,
}

impl AwsInitArgs {
    /// Whether the PCA path applies; checks the flag combination.
    pub fn is_pca(&self, names: &[String]) -> anyhow::Result<bool> {
        if self.backend == BackendKind::Local {
            if self.pca_arn.is_some()
                || self.create
                || self.aws_endpoint.is_some()
                || self.aws_region.is_some()
            {
                return Err(usage(
                    "--pca-arn, --create, --aws-endpoint and --aws-region need --backend acm-pca",
                ));
            }
            return Ok(false);
        }
        if self.pca_arn.is_none() && !self.create {
            return Err(usage(
                "--backend acm-pca needs --pca-arn ARN (register) or --create",
            ));
        }
        if self.pca_arn.is_some() && names.len() > 1 {
            return Err(usage("--pca-arn registers one CA; give a single --ca"));
        }
        Ok(true)
    }

    fn options(&self) -> PcaOptions {
        PcaOptions {
            region: self.aws_region.clone(),
            endpoint: self.aws_endpoint.clone(),
            ..PcaOptions::default()
        }
    }
}

/// Registers or creates the PCA-backed CA described by `spec` (under `parent` if given).
pub async fn init_pca(
    ctx: &Ctx,
    a: &AwsInitArgs,
    spec: &CaSpec,
    parent: Option<&CaMaterial>,
    now: OffsetDateTime,
) -> anyhow::Result<CaMaterial> {
    let opts = a.options();
    if let Some(arn) = &a.pca_arn {
        let pspec = PcaCaSpec {
            trust_domain: spec.trust_domain.clone(),
            policy: spec.policy.clone(),
            parent: parent.map(|p| p.meta.name.clone()),
        };
        tracing::info!(ca = %spec.name, arn, "registering ACM PCA");
        let ca = register_pca(&spec.name, arn, &pspec, &opts, now).await?;
        if let Some(p) = parent {
            if ca.parents != p.chain() {
                return Err(usage(format!(
                    "PCA {arn} is not a subordinate of CA {} (its chain differs)",
                    p.meta.name
                )));
            }
        }
        return Ok(ca);
    }
    let started = std::time::Instant::now();
    let ca = match parent {
        None => {
            let _p = Progress::notice(
                ctx,
                format!(
                    "creating root ACM PCA for CA {} and waiting until it is active (this can take a minute)",
                    spec.name
                ),
            );
            create_root_pca(spec, &opts, now).await?
        }
        Some(p) => {
            let _p = Progress::notice(
                ctx,
                format!(
                    "creating subordinate ACM PCA for CA {} under {} and waiting until it is active (this can take a minute)",
                    spec.name, p.meta.name
                ),
            );
            create_subordinate_pca(spec, p, &opts, now).await?
        }
    };
    tracing::info!(ca = %spec.name, secs = started.elapsed().as_secs_f64(), "ACM PCA active");
    Ok(ca)
}
