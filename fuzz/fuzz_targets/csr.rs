//! CSR parse + check: DER or PEM bytes through the same checks `meshca issue --csr`, the
//! Kubernetes signer and the approver run, against a fixed local CA. Must never panic; an
//! accepted CSR must carry a verified signature and SANs the policy allowed.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshca::ca::{create_root, CaSpec};
use meshca::issue::{check_csr, parse_csr_checked, CsrOptions, LocalIssuer};
use meshca::x509::CsrInfo;

fn issuer() -> &'static LocalIssuer {
    static ISSUER: OnceLock<LocalIssuer> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let now = time::OffsetDateTime::now_utc();
        let mut spec = CaSpec::root("fuzz");
        spec.permitted_dns = vec!["svc".into(), "example.com".into()];
        LocalIssuer::new(create_root(&spec, now).expect("root")).expect("issuer")
    })
}

fuzz_target!(|data: &[u8]| {
    let der = match CsrInfo::from_pem(data, "fuzz") {
        Ok(_) => pem_contents(data),
        Err(_) => Some(data.to_vec()),
    };
    let Some(der) = der else { return };
    let _ = CsrInfo::from_der(&der);
    if let Ok(info) = parse_csr_checked("fuzz", &der) {
        assert!(info.signature_valid);
        if let Ok(req) = check_csr(issuer(), &der, &CsrOptions::default()) {
            // What passed policy is exactly what the CSR asked for, and the local CA signs it.
            assert_eq!(info.sans.to_sans().expect("checked SANs"), req.sans);
            let _ = issuer().sign_now(&req, time::OffsetDateTime::now_utc());
        }
    }
});

fn pem_contents(data: &[u8]) -> Option<Vec<u8>> {
    meshca::pemutil::parse_blocks(data, "fuzz")
        .ok()?
        .into_iter()
        .find(|b| b.tag().ends_with("CERTIFICATE REQUEST"))
        .map(|b| b.into_contents())
}
