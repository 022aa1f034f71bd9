//! # meshca
//!
//! The private PKI of a Kubernetes service mesh: named CAs (roots and intermediates), workload
//! certificates with SPIFFE IDs, trust bundles, and the stores they live in. The same model
//! serves the `meshca` CLI, the in-cluster CSR signer and the Envoy SDS server, so an issuance
//! decision never depends on which front end asked.
//!
//! ```
//! use meshca::ca::{create_root, CaSpec};
//! use meshca::identity::{Sans, SpiffeId, TrustDomain};
//! use meshca::issue::{issue_workload, LocalIssuer};
//! use meshca::key::KeyAlgorithm;
//! use meshca::x509::{verify_chain, Usage};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let now = time::OffsetDateTime::now_utc();
//! let ca = create_root(&CaSpec::root("ca1"), now)?;
//! let root = ca.cert.clone();
//! let issuer = LocalIssuer::new(ca)?;
//! let sans = Sans {
//!     spiffe_id: Some(SpiffeId::for_service_account(&TrustDomain::default(), "mesh", "blue")?),
//!     ..Sans::default()
//! };
//! let w = issue_workload(&issuer, &sans, None, KeyAlgorithm::EcdsaP256, now).await?;
//! verify_chain(&w.cert.leaf, &w.cert.intermediates, &[root], now, Usage::Server)?;
//! # Ok::<(), meshca::Error>(())
//! # }).unwrap();
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "aws-pca")]
pub mod acm;
pub mod bundle;
pub mod ca;
pub mod clock;
pub mod config;
pub mod crl;
pub mod error;
pub mod escape;
pub mod fsutil;
pub mod identity;
pub mod inspect;
pub mod issue;
pub mod istio;
pub mod key;
#[cfg(feature = "kube")]
pub mod kube;
pub mod output;
pub mod pemutil;
pub mod policy;
pub mod profile;
pub mod report;
pub mod rotation;
pub mod store;
pub mod x509;

pub use error::{Error, Result};
/// Certificate DER types used across the API (from `rustls-pki-types`).
pub use rustls_pki_types as pki_types;
