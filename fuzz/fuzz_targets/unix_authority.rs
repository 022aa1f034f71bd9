//! The `:authority` rewriter of the SDS server's Unix listener (sds/src/authority.rs): what a
//! Unix socket client sends, in arbitrary chunks, usually behind a valid HTTP/2 preface.
//! Checks: no panic; a connection that does not start with the preface reaches h2 unchanged;
//! one push never outputs much more than the bound (HPACK expansion is capped per push).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshca_sds::authority::AuthorityRewriter;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The high-water mark plus one re-encoded block (64 KiB decoded, in 16 KiB frames) plus a
/// chunk passed through.
const BOUND: usize = meshca_sds::authority::OUT_HIGH_WATER + 64 * 1024 + 1024 + 64 * 1024;

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
        let mut o = Vec::new();
        r.push(c, &mut o);
        while !o.is_empty() {
            assert!(o.len() <= BOUND, "{} bytes from one push", o.len());
            out.extend_from_slice(&o);
            o.clear();
            r.push(&[], &mut o);
        }
    }
    r.finish(&mut out);
    if !input.starts_with(PREFACE) && !PREFACE.starts_with(&input) {
        assert_eq!(out, input);
    }
});
