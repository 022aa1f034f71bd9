//! Envoy SDS server for meshca (see issue "Envoy SDS server").
#![forbid(unsafe_code)]
