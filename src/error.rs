//! The library's one error type.
//!
//! Variants are named after what failed. Messages are single lines and never contain key
//! material. Text taken from input (reasons, names, paths) is shown through
//! [`crate::escape::Escaped`], so no control character from a file reaches a terminal, a log,
//! a gRPC status or a CSR condition. Front ends convert an [`Error`] exactly once: into an
//! exit code (CLI), a gRPC status (SDS) or a `Failed` CSR condition (signer).
//! [`Error::is_user_error`] tells them whether the caller's input or policy was at fault.

use std::path::PathBuf;

use crate::escape::Escaped;

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in meshca.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A value supplied by the user did not parse or is out of range.
    #[error("invalid {what}: {}", Escaped(.reason))]
    Invalid {
        /// What was being parsed (e.g. "SPIFFE ID").
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// Input was not valid PEM or held no object of the expected kind.
    #[error("{}: {}", Escaped(.source_name), Escaped(.reason))]
    Pem {
        /// The file or field the input came from.
        source_name: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A CSR failed to parse or its signature did not verify.
    #[error("CSR rejected: {}", Escaped(.0))]
    Csr(String),
    /// The issuing CA's policy refuses the request.
    #[error("policy of CA {ca:?} denies the request: {}", Escaped(.reason))]
    PolicyDenied {
        /// The CA whose policy refused.
        ca: String,
        /// The first rule that failed, naming the offending value.
        reason: String,
    },
    /// No CA of that name exists in the store.
    #[error("unknown CA {0:?}")]
    UnknownCa(String),
    /// No trust bundle of that name exists in the store.
    #[error("unknown trust bundle {0:?}")]
    UnknownBundle(String),
    /// Input exceeded a size limit.
    #[error("{} is {size} bytes, over the {limit}-byte limit", Escaped(.what))]
    TooLarge {
        /// What was too large.
        what: String,
        /// Its size in bytes.
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// A file-system operation failed.
    #[error("{}: {source}", Escaped(&.path.to_string_lossy()))]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The store holds data that does not parse (a damaged or foreign home directory).
    #[error("store is inconsistent: {}", Escaped(.0))]
    Corrupt(String),
    /// The store was not usable (missing, unwritable, unreachable).
    #[error("store: {}", Escaped(.0))]
    Store(String),
    /// Building or signing a certificate failed.
    #[error("certificate building failed: {}", Escaped(.0))]
    Build(String),
    /// A chain did not validate.
    #[error("chain verification failed: {}", Escaped(.0))]
    Verify(String),
    /// An object already exists and overwriting was not requested.
    #[error("{} already exists (use --force to replace it)", Escaped(.0))]
    AlreadyExists(String),
    /// A remote backend (Kubernetes, ACM PCA) failed.
    #[error("{backend}: {}", Escaped(.message))]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// A one-line, human readable message.
        message: String,
        /// Whether retrying later may help.
        retryable: bool,
    },
    /// The requested feature is not available in this build or on this backend.
    #[error("not supported: {}", Escaped(.0))]
    Unsupported(String),
}

impl Error {
    /// Whether the error is the caller's (bad input, policy, unknown name) rather than an
    /// internal or environmental failure. The CLI maps this to exit code 1, others to 2.
    /// An unusable store ([`Error::Store`]) and an I/O failure ([`Error::Io`]: EIO, a full
    /// disk, a read-only file system) are not the caller's fault and exit 2; only an I/O error
    /// that is about the path the caller named (it does not exist, is not a directory, is a
    /// directory, may not be accessed) is theirs.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::Invalid { .. }
                | Error::Pem { .. }
                | Error::Csr(_)
                | Error::PolicyDenied { .. }
                | Error::UnknownCa(_)
                | Error::UnknownBundle(_)
                | Error::TooLarge { .. }
                | Error::Verify(_)
                | Error::AlreadyExists(_)
                | Error::Unsupported(_)
        ) || matches!(self, Error::Io { source, .. } if io_is_users(source))
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what,
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Whether an I/O error is about the path itself (the caller's input) rather than the system.
fn io_is_users(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::NotFound | K::PermissionDenied | K::NotADirectory | K::IsADirectory | K::AlreadyExists
    )
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        // rcgen's messages name algorithms and encodings, never key bytes.
        Error::Build(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defect: I/O and store failures counted as the user's fault, so an EIO exited 1
    /// (user error) instead of 2 (unexpected).
    #[test]
    fn io_and_store_failures_are_not_the_users_fault() {
        let eio = Error::io("/home/x/ca.pem", std::io::Error::from_raw_os_error(5));
        assert!(!eio.is_user_error(), "{eio}");
        let enospc = Error::io("/home/x/ca.pem", std::io::Error::from_raw_os_error(28));
        assert!(!enospc.is_user_error(), "{enospc}");
        // A path the caller named that does not exist is their input.
        let enoent = Error::io("missing.csr", std::io::Error::from_raw_os_error(2));
        assert!(enoent.is_user_error(), "{enoent}");
        assert!(!Error::Store("kube:meshca: connection refused".into()).is_user_error());
        assert!(!Error::Corrupt("bad".into()).is_user_error());
        assert!(!Error::Build("x".into()).is_user_error());
        for user in [
            Error::invalid("SPIFFE ID", "x"),
            Error::Csr("x".into()),
            Error::PolicyDenied {
                ca: "mesh".into(),
                reason: "x".into(),
            },
            Error::UnknownCa("x".into()),
            Error::AlreadyExists("CA x".into()),
        ] {
            assert!(user.is_user_error(), "{user}");
        }
    }
}
