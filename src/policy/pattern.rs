//! Pure pattern matching of SPIFFE IDs and DNS names against policy patterns.
//!
//! - SPIFFE patterns match path segment by segment, left to right: `*` is one segment, a final
//!   `**` one or more, `{ns}`/`{sa}`/`{td}` the bound namespace, service account and trust
//!   domain. Path literals match case-sensitively; the trust domain case-insensitively.
//! - DNS patterns match label by label, right to left: `*` is one label, a leading `**` one
//!   or more, `{ns}`/`{sa}`/`{td}` as above. Literals match case-insensitively.
//!
//! Matching allocates nothing: it walks the pattern and the value in lockstep. A placeholder
//! that is not bound never matches. [`check_spiffe`] and [`check_dns`] reject malformed
//! patterns (unknown placeholders such as `{namespace}`, a misplaced `**`) when a policy is
//! loaded; the matchers return the same error if one slips through.

/// What `{ns}`, `{sa}` and `{td}` stand for in one decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bindings<'a> {
    /// The namespace, when the requester binds one.
    pub ns: Option<&'a str>,
    /// The service account, when the requester binds one.
    pub sa: Option<&'a str>,
    /// The CA's trust domain.
    pub td: &'a str,
}

/// The placeholders a pattern may use.
pub const PLACEHOLDERS: [&str; 3] = ["{ns}", "{sa}", "{td}"];

/// One pattern segment (SPIFFE path segment or DNS label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seg<'p> {
    One,
    Many,
    Ns,
    Sa,
    Td,
    Lit(&'p str),
}

fn seg(s: &str) -> Result<Seg<'_>, String> {
    Ok(match s {
        "*" => Seg::One,
        "**" => Seg::Many,
        "{ns}" => Seg::Ns,
        "{sa}" => Seg::Sa,
        "{td}" => Seg::Td,
        lit if lit.bytes().any(|c| c == b'{' || c == b'}') => {
            let start = lit.find('{');
            let end = lit.find('}');
            return Err(match (start, end) {
                (Some(a), Some(b)) if a < b => {
                    let ph = &lit[a..=b];
                    if PLACEHOLDERS.contains(&ph) {
                        format!("placeholder {ph} must be a whole segment, not part of {lit:?}")
                    } else {
                        format!(
                            "unknown placeholder {ph} (known: {})",
                            PLACEHOLDERS.join(", ")
                        )
                    }
                }
                _ => format!("unbalanced brace in {lit:?}"),
            });
        }
        "" => return Err("empty segment".into()),
        lit => Seg::Lit(lit),
    })
}

fn bound(b: Option<&str>, v: &str, case_sensitive: bool) -> bool {
    match b {
        Some(b) if case_sensitive => b == v,
        Some(b) => b.eq_ignore_ascii_case(v),
        None => false,
    }
}

fn seg_matches(p: Seg<'_>, v: &str, b: &Bindings<'_>, case_sensitive: bool) -> bool {
    match p {
        Seg::One | Seg::Many => !v.is_empty(),
        Seg::Ns => bound(b.ns, v, case_sensitive),
        Seg::Sa => bound(b.sa, v, case_sensitive),
        Seg::Td => b.td.eq_ignore_ascii_case(v),
        Seg::Lit(l) if case_sensitive => l == v,
        Seg::Lit(l) => l.eq_ignore_ascii_case(v),
    }
}

/// Walks pattern and value segments in lockstep; `**` must be the last pattern segment and
/// matches one or more remaining value segments. `first_ci`: the first segment compares
/// case-insensitively even when the rest does not (the SPIFFE trust domain).
fn walk<'p, 'v>(
    mut pat: impl Iterator<Item = &'p str>,
    mut val: impl Iterator<Item = &'v str>,
    b: &Bindings<'_>,
    case_sensitive: bool,
    first_ci: bool,
) -> Result<bool, String> {
    let mut first = true;
    let mut ok = true;
    loop {
        match (pat.next(), val.next()) {
            (None, None) => return Ok(ok),
            (Some(p), v) => {
                let s = seg(p)?;
                if s == Seg::Many {
                    if pat.next().is_some() {
                        return Err("** may only be the last segment".into());
                    }
                    // One or more segments, each non-empty.
                    let Some(v) = v else { return Ok(false) };
                    return Ok(ok && !v.is_empty() && val.all(|v| !v.is_empty()));
                }
                let Some(v) = v else {
                    // Value too short: keep parsing the pattern so a bad one still errors.
                    ok = false;
                    first = false;
                    continue;
                };
                let cs = case_sensitive && !(first && first_ci);
                ok &= seg_matches(s, v, b, cs);
            }
            (None, Some(_)) => return Ok(false),
        }
        first = false;
    }
}

/// Whether SPIFFE ID `id` (`spiffe://td/path`) matches `pattern`.
pub fn spiffe_matches(pattern: &str, id: &str, b: &Bindings<'_>) -> Result<bool, String> {
    let Some(v) = id.strip_prefix("spiffe://") else {
        // Still report a malformed pattern.
        return spiffe_segments_match(pattern, "".split('/'), b).map(|_| false);
    };
    spiffe_segments_match(pattern, v.split('/'), b)
}

/// Whether a parsed SPIFFE ID matches `pattern` (no string is built).
pub fn spiffe_id_matches(
    pattern: &str,
    id: &crate::identity::SpiffeId,
    b: &Bindings<'_>,
) -> Result<bool, String> {
    let path = id.path().strip_prefix('/').unwrap_or(id.path());
    let segs = std::iter::once(id.trust_domain().as_str()).chain(path.split('/'));
    spiffe_segments_match(pattern, segs, b)
}

fn spiffe_segments_match<'v>(
    pattern: &str,
    v: impl Iterator<Item = &'v str>,
    b: &Bindings<'_>,
) -> Result<bool, String> {
    let p = pattern
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("SPIFFE pattern {pattern:?} must start with spiffe://"))?;
    if p.split('/').next() == Some("**") {
        return Err(format!(
            "SPIFFE pattern {pattern:?}: ** cannot stand for the trust domain"
        ));
    }
    walk(p.split('/'), v, b, true, true).map_err(|e| format!("SPIFFE pattern {pattern:?}: {e}"))
}

/// Whether DNS name `name` matches `pattern`.
pub fn dns_matches(pattern: &str, name: &str, b: &Bindings<'_>) -> Result<bool, String> {
    if pattern.split('.').skip(1).any(|l| l == "**") {
        return Err(format!(
            "DNS pattern {pattern:?}: ** may only be the first label"
        ));
    }
    walk(pattern.rsplit('.'), name.rsplit('.'), b, false, false)
        .map_err(|e| format!("DNS pattern {pattern:?}: {e}"))
}

/// Whether the pattern uses `{ns}` or `{sa}` (binds to the requester).
pub fn binds_requester(pattern: &str) -> bool {
    pattern
        .split(['/', '.'])
        .any(|s| s == "{ns}" || s == "{sa}")
}

/// Checks a SPIFFE pattern is well formed.
pub fn check_spiffe(pattern: &str) -> Result<(), String> {
    if pattern.contains(char::is_whitespace) {
        return Err(format!("SPIFFE pattern {pattern:?} has spaces"));
    }
    let p = pattern
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("SPIFFE pattern {pattern:?} must start with spiffe://"))?;
    if !p.contains('/') {
        return Err(format!("SPIFFE pattern {pattern:?} has no path"));
    }
    spiffe_matches(pattern, "spiffe://", &Bindings::default()).map(|_| ())?;
    // Walk every segment (the value above is empty, so later ones may not be reached).
    for s in p.split('/') {
        seg(s).map_err(|e| format!("SPIFFE pattern {pattern:?}: {e}"))?;
    }
    Ok(())
}

/// Checks a DNS pattern is well formed.
pub fn check_dns(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() || pattern.contains(char::is_whitespace) {
        return Err(format!("DNS pattern {pattern:?} is empty or has spaces"));
    }
    if pattern == "**" {
        return Err(format!("DNS pattern {pattern:?} matches every name"));
    }
    dns_matches(pattern, "", &Bindings::default()).map(|_| ())?;
    for s in pattern.split('.') {
        seg(s).map_err(|e| format!("DNS pattern {pattern:?}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    fn b<'a>(ns: Option<&'a str>, sa: Option<&'a str>) -> Bindings<'a> {
        Bindings { ns, sa, td: TD }
    }

    #[test]
    fn spiffe_globs_and_templates() {
        let id = "spiffe://cluster.local/ns/a/sa/b";
        let none = b(None, None);
        assert!(spiffe_matches("spiffe://cluster.local/ns/*/sa/*", id, &none).unwrap());
        assert!(spiffe_matches("spiffe://cluster.local/**", id, &none).unwrap());
        assert!(spiffe_matches("spiffe://{td}/ns/a/**", id, &none).unwrap());
        assert!(!spiffe_matches("spiffe://cluster.local/ns/*", id, &none).unwrap());
        assert!(!spiffe_matches("spiffe://other/ns/*/sa/*", id, &none).unwrap());
        assert!(!spiffe_matches("spiffe://{td}/ns/{ns}/sa/{sa}", id, &none).unwrap());
        assert!(spiffe_matches(
            "spiffe://{td}/ns/{ns}/sa/{sa}",
            id,
            &b(Some("a"), Some("b"))
        )
        .unwrap());
        assert!(!spiffe_matches(
            "spiffe://{td}/ns/{ns}/sa/{sa}",
            id,
            &b(Some("a"), Some("c"))
        )
        .unwrap());
        // Path literals are case-sensitive, the trust domain is not.
        assert!(!spiffe_matches("spiffe://cluster.local/ns/A/sa/*", id, &none).unwrap());
        assert!(spiffe_matches("spiffe://Cluster.Local/ns/a/sa/*", id, &none).unwrap());
    }

    #[test]
    fn dns_globs_and_templates() {
        let none = b(None, None);
        let blue = b(Some("app"), Some("blue"));
        assert!(dns_matches("{sa}.{ns}.svc", "blue.app.svc", &blue).unwrap());
        assert!(!dns_matches("{sa}.{ns}.svc", "green.app.svc", &blue).unwrap());
        assert!(!dns_matches("{sa}.{ns}.svc", "blue.app.svc", &none).unwrap());
        assert!(dns_matches("**.example.com", "a.b.example.com", &none).unwrap());
        assert!(!dns_matches("**.example.com", "example.com", &none).unwrap());
        assert!(dns_matches("*.Example.COM", "api.example.com", &none).unwrap());
        assert!(!dns_matches("*.example.com", "a.b.example.com", &none).unwrap());
        assert!(!dns_matches("api.example.com", "api.example.com.", &none).unwrap());
    }

    #[test]
    fn malformed_patterns_are_refused_naming_the_problem() {
        let e = check_spiffe("spiffe://{td}/ns/{namespace}/sa/{sa}").unwrap_err();
        assert!(e.contains("unknown placeholder {namespace}"), "{e}");
        let e = check_dns("{service}.svc").unwrap_err();
        assert!(e.contains("unknown placeholder {service}"), "{e}");
        let e = check_dns("x-{ns}.svc").unwrap_err();
        assert!(e.contains("whole segment"), "{e}");
        assert!(check_spiffe("spiffe://{td}/**/x").is_err());
        assert!(check_spiffe("spiffe://**").is_err());
        assert!(check_spiffe("http://x/y").is_err());
        assert!(check_dns("a.**.com").is_err());
        assert!(check_dns("**").is_err());
        assert!(check_dns("a..com").is_err());
        check_spiffe("spiffe://{td}/ns/{ns}/sa/{sa}").unwrap();
        check_spiffe("spiffe://example.org/**").unwrap();
        check_dns("**.example.com").unwrap();
        check_dns("{sa}.{ns}.svc.cluster.local").unwrap();
        // A malformed pattern errors at match time too, whatever the value.
        assert!(spiffe_matches(
            "spiffe://{td}/{x}",
            "spiffe://cluster.local/a/b",
            &b(None, None)
        )
        .is_err());
    }

    #[test]
    fn binds_requester_sees_ns_and_sa_only() {
        assert!(binds_requester("{sa}.{ns}.svc"));
        assert!(binds_requester("spiffe://{td}/ns/{ns}/sa/*"));
        assert!(!binds_requester("spiffe://{td}/ns/x/sa/*"));
        assert!(!binds_requester("**.example.com"));
    }
}

/// Property tests (issue 9 item 6): a generated identity always matches the pattern it was
/// generated from; a mutated one never does.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Piece {
        Lit(String),
        One,
        Ns,
        Sa,
    }

    const NS: &str = "team-a";
    const SA: &str = "web";
    const TD: &str = "example.org";

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?"
    }

    fn piece() -> impl Strategy<Value = Piece> {
        prop_oneof![
            3 => label().prop_map(Piece::Lit),
            1 => Just(Piece::One),
            1 => Just(Piece::Ns),
            1 => Just(Piece::Sa),
        ]
    }

    /// Pattern text and one value generated from it.
    fn render(pieces: &[Piece], fills: &[String], sep: &str) -> (Vec<String>, Vec<String>) {
        let mut pat = Vec::new();
        let mut val = Vec::new();
        for (p, f) in pieces.iter().zip(fills) {
            let (ps, vs) = match p {
                Piece::Lit(l) => (l.clone(), l.clone()),
                Piece::One => ("*".into(), f.clone()),
                Piece::Ns => ("{ns}".into(), NS.into()),
                Piece::Sa => ("{sa}".into(), SA.into()),
            };
            pat.push(ps);
            val.push(vs);
        }
        let _ = sep;
        (pat, val)
    }

    fn bindings() -> Bindings<'static> {
        Bindings {
            ns: Some(NS),
            sa: Some(SA),
            td: TD,
        }
    }

    /// A SPIFFE case: pattern, matching ID, and which path segments are fixed values.
    fn spiffe_case() -> impl Strategy<Value = (String, Vec<String>, Vec<bool>, bool)> {
        (
            prop::collection::vec((piece(), label()), 1..5),
            any::<bool>(),
            prop::collection::vec(label(), 1..3),
        )
            .prop_map(|(pf, many, tail)| {
                let (pieces, fills): (Vec<_>, Vec<_>) = pf.into_iter().unzip();
                let (mut pat, mut val) = render(&pieces, &fills, "/");
                let fixed: Vec<bool> = pieces.iter().map(|p| !matches!(p, Piece::One)).collect();
                if many {
                    pat.push("**".into());
                    val.extend(tail);
                }
                let pattern = format!("spiffe://{TD}/{}", pat.join("/"));
                (pattern, val, fixed, many)
            })
    }

    fn dns_case() -> impl Strategy<Value = (String, Vec<String>, Vec<bool>, bool)> {
        (
            prop::collection::vec((piece(), label()), 1..5),
            any::<bool>(),
            prop::collection::vec(label(), 1..3),
        )
            .prop_map(|(pf, many, head)| {
                let (pieces, fills): (Vec<_>, Vec<_>) = pf.into_iter().unzip();
                let (mut pat, mut val) = render(&pieces, &fills, ".");
                let fixed: Vec<bool> = pieces.iter().map(|p| !matches!(p, Piece::One)).collect();
                let mut pre = Vec::new();
                if many {
                    pat.insert(0, "**".into());
                    pre = head;
                }
                pre.append(&mut val);
                (pat.join("."), pre, fixed, many)
            })
    }

    fn percent(seg: &str) -> String {
        let c = seg.as_bytes()[0];
        format!("%{c:02X}{}", &seg[1..])
    }

    proptest! {
        #[test]
        fn spiffe_generated_ids_match_and_mutants_do_not(
            (pattern, path, fixed, many) in spiffe_case(),
            pick in any::<prop::sample::Index>(),
            kind in 0..4usize,
        ) {
            check_spiffe(&pattern).unwrap();
            let b = bindings();
            let id = |p: &[String]| format!("spiffe://{TD}/{}", p.join("/"));
            prop_assert!(spiffe_matches(&pattern, &id(&path), &b).unwrap(), "{pattern} vs {}", id(&path));
            // The trust domain is case-insensitive.
            let upper_td = format!("spiffe://{}/{}", TD.to_uppercase(), path.join("/"));
            prop_assert!(spiffe_matches(&pattern, &upper_td, &b).unwrap(), "{}", upper_td);
            let fixed_at: Vec<usize> = (0..fixed.len()).filter(|&i| fixed[i]).collect();
            let mut m = path.clone();
            match kind {
                // Another value in a fixed segment.
                0 if !fixed_at.is_empty() => { let i = fixed_at[pick.index(fixed_at.len())]; m[i] = format!("{}x", m[i]); }
                // Case of a fixed path segment (path literals are case-sensitive).
                1 if !fixed_at.is_empty() => { let i = fixed_at[pick.index(fixed_at.len())]; m[i] = m[i].to_uppercase(); if m[i] == path[i] { m[i] = format!("{}X", m[i]); } }
                // Percent-encoding of a fixed segment.
                2 if !fixed_at.is_empty() => { let i = fixed_at[pick.index(fixed_at.len())]; m[i] = percent(&m[i]); }
                // An extra segment (without a trailing **), or one fewer.
                _ if !many => m.push("extra".into()),
                _ => { m.truncate(fixed.len()); }
            }
            prop_assert!(!spiffe_matches(&pattern, &id(&m), &b).unwrap(), "{pattern} matched mutant {}", id(&m));
            // Another trust domain never matches.
            let other_td = format!("spiffe://other.org/{}", path.join("/"));
            prop_assert!(!spiffe_matches(&pattern, &other_td, &b).unwrap(), "{}", other_td);
        }

        #[test]
        fn dns_generated_names_match_and_mutants_do_not(
            (pattern, labels, fixed, many) in dns_case(),
            pick in any::<prop::sample::Index>(),
            kind in 0..4usize,
        ) {
            check_dns(&pattern).unwrap();
            let b = bindings();
            let name = labels.join(".");
            prop_assert!(dns_matches(&pattern, &name, &b).unwrap(), "{pattern} vs {name}");
            // DNS names are case-insensitive.
            let upper = name.to_uppercase();
            prop_assert!(dns_matches(&pattern, &upper, &b).unwrap(), "{}", upper);
            let off = labels.len() - fixed.len();
            let fixed_at: Vec<usize> = (0..fixed.len()).filter(|&i| fixed[i]).map(|i| i + off).collect();
            let mut m = labels.clone();
            let mutant = match kind {
                0 if !fixed_at.is_empty() => { let i = fixed_at[pick.index(fixed_at.len())]; m[i] = format!("{}x", m[i]); m.join(".") }
                1 if !fixed_at.is_empty() => { let i = fixed_at[pick.index(fixed_at.len())]; m[i] = percent(&m[i]); m.join(".") }
                // A trailing dot.
                2 => format!("{name}."),
                // An extra label (without a leading **), or none where ** needs one.
                _ if !many => format!("extra.{name}"),
                _ => m[off..].join("."),
            };
            prop_assert!(!dns_matches(&pattern, &mutant, &b).unwrap(), "{pattern} matched mutant {mutant}");
        }
    }
}
