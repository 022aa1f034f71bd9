//! The messages and service of Istio's CA API, written by hand with prost and tonic.
//!
//! Package `istio.v1.auth`, service `IstioCertificateService`, method `CreateCertificate`
//! (istio.io/api `security/v1alpha1/ca.proto`, v1.32.0): the request has `csr` = 1 (PEM),
//! `validity_duration` = 3 (seconds) and `metadata` = 4 (a `google.protobuf.Struct`); the
//! response has `cert_chain` = 1 (PEM certificates, leaf first, root last).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::google::protobuf::{value::Kind, Struct};

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// The PEM CSR.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// The requested lifetime in seconds (0: the CA's default).
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Request metadata: `ImpersonatedIdentity` (ztunnel), `CertSigner` (istio-agent).
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<Struct>,
}

impl IstioCertificateRequest {
    /// The string value of metadata field `key`, when it is a non-empty string.
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        match self.metadata.as_ref()?.fields.get(key)?.kind.as_ref()? {
            Kind::StringValue(s) if !s.is_empty() => Some(s),
            _ => None,
        }
    }
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates: leaf first, root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// The gRPC service name.
pub const SERVICE: &str = "istio.v1.auth.IstioCertificateService";
/// The one method's path.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// What the server does with one `CreateCertificate` call.
#[tonic::async_trait]
pub trait IstioCertificateService: Send + Sync + 'static {
    /// Handles one call.
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status>;
}

/// The tonic service routing `CreateCertificate` to `T`.
pub struct IstioCertificateServiceServer<T>(Arc<T>);

impl<T> IstioCertificateServiceServer<T> {
    /// Serves `inner`.
    pub fn new(inner: Arc<T>) -> Self {
        IstioCertificateServiceServer(inner)
    }
}

impl<T> Clone for IstioCertificateServiceServer<T> {
    fn clone(&self) -> Self {
        IstioCertificateServiceServer(self.0.clone())
    }
}

impl<T> tonic::server::NamedService for IstioCertificateServiceServer<T> {
    const NAME: &'static str = SERVICE;
}

struct Unary<T>(Arc<T>);

impl<T: IstioCertificateService> tonic::server::UnaryService<IstioCertificateRequest> for Unary<T> {
    type Response = IstioCertificateResponse;
    type Future = Pin<
        Box<dyn Future<Output = Result<tonic::Response<Self::Response>, tonic::Status>> + Send>,
    >;

    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.create_certificate(request).await })
    }
}

impl<T: IstioCertificateService> tonic::codegen::Service<http::Request<tonic::body::Body>>
    for IstioCertificateServiceServer<T>
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() != CREATE_CERTIFICATE {
            let path = req.uri().path().to_string();
            return Box::pin(async move {
                Ok(tonic::Status::unimplemented(format!("no method {path}")).into_http())
            });
        }
        let inner = self.0.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                .apply_max_message_size_config(Some(MAX_REQUEST), None);
            Ok(grpc.unary(Unary(inner), req).await)
        })
    }
}

/// Largest request accepted: a CSR is a few KiB.
pub const MAX_REQUEST: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Value;
    use prost::Message;

    #[test]
    fn wire_format_uses_istios_field_numbers() {
        let mut fields = std::collections::HashMap::new();
        fields.insert(
            "ImpersonatedIdentity".to_string(),
            Value {
                kind: Some(Kind::StringValue("spiffe://td/ns/a/sa/b".into())),
            },
        );
        let req = IstioCertificateRequest {
            csr: "x".into(),
            validity_duration: 7,
            metadata: Some(Struct { fields }),
        };
        let b = req.encode_to_vec();
        // Field 1 (length-delimited) "x", then field 3 (varint) 7, then field 4.
        assert_eq!(&b[..5], &[0x0a, 1, b'x', 0x18, 7]);
        assert_eq!(b[5], 0x22);
        let back = IstioCertificateRequest::decode(b.as_slice()).unwrap();
        assert_eq!(
            back.metadata_str("ImpersonatedIdentity"),
            Some("spiffe://td/ns/a/sa/b")
        );
        assert_eq!(back.metadata_str("CertSigner"), None);
        let resp = IstioCertificateResponse {
            cert_chain: vec!["a".into(), "b".into()],
        };
        assert_eq!(resp.encode_to_vec(), vec![0x0a, 1, b'a', 0x0a, 1, b'b']);
    }
}
