//! PEM and DER decoding at every entry point: PEM blocks, certificate lists, certificate and
//! CSR DER, private keys, name constraints, chain order and path validation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshca::ca::ChainConstraints;
use meshca::pki_types::CertificateDer;
use meshca::x509::{self, CertInfo, CsrInfo};

fuzz_target!(|data: &[u8]| {
    // Raw bytes as DER of each kind.
    let _ = CertInfo::from_der(data);
    let _ = CsrInfo::from_der(data);
    let _ = x509::name_constraints(data);
    // Raw bytes as PEM text.
    let _ = meshca::pemutil::parse_blocks(data, "fuzz");
    let _ = CsrInfo::from_pem(data, "fuzz");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = meshca::key::PrivateKey::from_pem(text, "fuzz");
    }
    if let Ok(certs) = meshca::pemutil::parse_certs(data, "fuzz") {
        for c in &certs {
            let _ = CertInfo::from_der(c);
            let _ = x509::name_constraints(c);
        }
        let _ = x509::check_chain_order(&certs);
        let _ = ChainConstraints::of_chain("fuzz", &certs);
        let (leaf, rest) = certs
            .split_first()
            .expect("parse_certs returns at least one");
        let anchors: Vec<CertificateDer<'static>> = rest.last().into_iter().cloned().collect();
        let now = time::OffsetDateTime::now_utc();
        let _ = x509::verify_chain(leaf, rest, &anchors, now, x509::Usage::Server);
    }
});
