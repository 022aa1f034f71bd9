//! The `:authority` rewriter of the SDS server's Unix listener (sds/src/authority.rs): what a
//! Unix socket client sends, in arbitrary chunks, usually behind a valid HTTP/2 preface.
//! Checks: no panic; a connection that does not start with the preface reaches h2 unchanged;
//! the output never grows past the input by more than the re-encoding allows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshca_sds::authority::AuthorityRewriter;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let mut input = Vec::new();
    if ctl & 1 == 0 {
        input.extend_from_slice(PREFACE);
    }
    input.extend_from_slice(rest);
    let chunk = 1 + (ctl >> 1) as usize;
    let mut r = AuthorityRewriter::new();
    let mut out = Vec::new();
    for c in input.chunks(chunk) {
        r.push(c, &mut out);
    }
    r.finish(&mut out);
    if !input.starts_with(PREFACE) && !PREFACE.starts_with(&input) {
        assert_eq!(out, input);
    }
    // Decoded blocks are capped at 64 KiB plus framing; the rest passes through.
    assert!(out.len() <= input.len() + 128 * 1024, "{} -> {}", input.len(), out.len());
});
