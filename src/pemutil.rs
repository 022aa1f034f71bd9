//! PEM decoding and encoding of certificates (via the `pem` crate).

use rustls_pki_types::CertificateDer;

use crate::error::{Error, Result};

/// Decodes every PEM block in `text`. Errors name the source, never the content.
pub fn parse_blocks(text: &[u8], source_name: &str) -> Result<Vec<pem::Pem>> {
    let s = std::str::from_utf8(text).map_err(|_| Error::Pem {
        source_name: source_name.to_string(),
        reason: "not PEM (input is not UTF-8 text)".into(),
    })?;
    let blocks = pem::parse_many(s).map_err(|e| Error::Pem {
        source_name: source_name.to_string(),
        reason: format!("malformed PEM ({})", pem_reason(&e)),
    })?;
    if blocks.is_empty() {
        return Err(Error::Pem {
            source_name: source_name.to_string(),
            reason: "no PEM block found".into(),
        });
    }
    Ok(blocks)
}

fn pem_reason(e: &pem::PemError) -> &'static str {
    match e {
        pem::PemError::MismatchedTags(..) => "BEGIN and END labels differ",
        pem::PemError::MalformedFraming => "broken BEGIN/END framing",
        pem::PemError::MissingBeginTag => "missing BEGIN line",
        pem::PemError::MissingEndTag => "missing END line",
        pem::PemError::MissingData => "empty body",
        pem::PemError::InvalidData(_) => "body is not valid base64",
        pem::PemError::NotUtf8(_) => "not UTF-8",
        _ => "unreadable",
    }
}

/// Decodes a file that must contain only certificates (a chain or a bundle), at least one.
/// Each certificate is also checked to be well-formed DER.
pub fn parse_certs(text: &[u8], source_name: &str) -> Result<Vec<CertificateDer<'static>>> {
    let blocks = parse_blocks(text, source_name)?;
    let mut out = Vec::with_capacity(blocks.len());
    for (i, b) in blocks.into_iter().enumerate() {
        if b.tag() != "CERTIFICATE" {
            return Err(Error::Pem {
                source_name: source_name.to_string(),
                reason: format!("block {} is a {:?}, expected CERTIFICATE", i + 1, b.tag()),
            });
        }
        let der = b.into_contents();
        x509_parser::parse_x509_certificate(&der).map_err(|_| Error::Pem {
            source_name: source_name.to_string(),
            reason: format!("certificate {} is not valid X.509 DER", i + 1),
        })?;
        out.push(CertificateDer::from(der));
    }
    Ok(out)
}

/// Encodes certificates as concatenated PEM (LF line endings, 64-column lines, one empty
/// line between blocks: the `pem` crate's `encode_many` layout, written without its
/// per-line formatting since this is on the issuance path).
pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    let mut out = String::new();
    for (i, c) in certs.into_iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        encode_block("CERTIFICATE", c.as_ref(), &mut out);
    }
    out
}

/// Appends one PEM block (`-----BEGIN <tag>-----`, base64 in 64-column lines, LF endings).
/// The intermediate base64 text is zeroized, so this is also used for private keys.
pub(crate) fn encode_block(tag: &str, der: &[u8], out: &mut String) {
    use base64::Engine;
    let b64 = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
    out.reserve(b64.len() + b64.len() / 64 + 2 * tag.len() + 34);
    out.push_str("-----BEGIN ");
    out.push_str(tag);
    out.push_str("-----\n");
    let mut i = 0;
    while i < b64.len() {
        let end = (i + 64).min(b64.len());
        // base64 text is ASCII, so every index is a character boundary.
        out.push_str(&b64[i..end]);
        out.push('\n');
        i = end;
    }
    out.push_str("-----END ");
    out.push_str(tag);
    out.push_str("-----\n");
}

/// SHA-256 of DER bytes as lower-case hex with `:` separators (the openssl style).
pub fn fingerprint_sha256(der: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    hex_colon(d.as_ref())
}

/// Bytes as upper-case hex with `:` separators.
pub fn hex_colon(bytes: &[u8]) -> String {
    // On the issuance path (serial, SKI, AKI, fingerprint), so no per-byte `format!`.
    const UPPER: &[u8; 16] = b"0123456789ABCDEF";
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push(UPPER[usize::from(b >> 4)] as char);
        s.push(UPPER[usize::from(b & 0xf)] as char);
    }
    s
}

/// Bytes as lower-case hex without separators.
pub fn hex(bytes: &[u8]) -> String {
    const LOWER: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(LOWER[usize::from(b >> 4)] as char);
        s.push(LOWER[usize::from(b & 0xf)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_encoding_matches_the_pem_crate() {
        let cfg = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
        for n in [0usize, 1, 2, 3, 47, 48, 49, 95, 96, 97, 600, 1234] {
            let a: Vec<u8> = (0..n).map(|i| (i * 31 + 7) as u8).collect();
            let b: Vec<u8> = (0..n + 5).map(|i| (i * 17 + 3) as u8).collect();
            let (ca, cb) = (
                CertificateDer::from(a.clone()),
                CertificateDer::from(b.clone()),
            );
            let want = pem::encode_many_config(
                &[
                    pem::Pem::new("CERTIFICATE", a.clone()),
                    pem::Pem::new("CERTIFICATE", b),
                ],
                cfg,
            );
            assert_eq!(certs_to_pem([&ca, &cb]), want, "n={n}");
            assert_eq!(
                certs_to_pem([&ca]),
                pem::encode_config(&pem::Pem::new("CERTIFICATE", a.clone()), cfg),
                "n={n}"
            );
            let mut key = String::new();
            encode_block("PRIVATE KEY", &a, &mut key);
            assert_eq!(
                key,
                pem::encode_config(&pem::Pem::new("PRIVATE KEY", a), cfg)
            );
        }
        assert_eq!(certs_to_pem(std::iter::empty()), "");
    }

    #[test]
    fn hex_forms() {
        assert_eq!(hex_colon(&[0x00, 0xab, 0x7f, 0x10]), "00:AB:7F:10");
        assert_eq!(hex(&[0x00, 0xab, 0x7f, 0x10]), "00ab7f10");
        assert_eq!(hex_colon(&[]), "");
        assert_eq!(hex(&[0xff]), "ff");
    }

    #[test]
    fn garbage_and_wrong_blocks_are_rejected_by_name() {
        let e = parse_certs(b"hello", "x.pem").unwrap_err().to_string();
        assert_eq!(e, "x.pem: no PEM block found");
        let e = parse_certs(
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            "x.pem",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("malformed PEM"), "{e}");
        let e = parse_certs(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "x.pem",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not valid X.509"), "{e}");
        let e = parse_certs(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "x.pem",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("expected CERTIFICATE") && !e.contains("AAAA"),
            "{e}"
        );
        assert!(parse_certs(&[0xff, 0xfe], "b")
            .unwrap_err()
            .to_string()
            .contains("UTF-8"));
    }
}
