//! Escaping of untrusted text quoted in messages.
//!
//! Errors quote what they refuse: a TOML line, a PEM label, a certificate subject, a file
//! name. That text may carry control characters (a vertical tab, `ESC` starting a terminal
//! sequence, the 0x1c-0x1f separators) which would reach a terminal, a log line, a gRPC
//! status or a Kubernetes condition as they are. [`escape_controls`] replaces every control
//! character, and the Unicode bidirectional overrides that reorder what a reader sees, with a
//! visible `\u{..}` escape; everything else is kept as it is.
//!
//! The escape is idempotent (its output holds no control character), so a message escaped
//! where it is built and again where it is printed reads the same.

use std::borrow::Cow;
use std::fmt;

/// Whether `c` must not appear raw in a message: C0 and C1 control characters, DEL, and the
/// bidirectional embedding/override/isolate characters.
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character written as `\u{hex}` (newline and tab too: a quoted
/// value stays on one line).
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Multi-line text (a report for the terminal) with every line escaped: newlines are kept,
/// every other control character is escaped.
pub fn escape_lines(s: &str) -> String {
    s.split('\n')
        .map(escape_controls)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Displays a string through [`escape_controls`] (for `format!` arguments and error
/// attributes).
#[derive(Clone, Copy, Debug)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape_controls(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_visible_escapes() {
        assert!(matches!(escape_controls("plain text é"), Cow::Borrowed(_)));
        assert_eq!(
            escape_controls("a\x0bb\x1b[31mc\x1c\x1d\x1e\x7f\u{85}\u{202e}"),
            "a\\u{b}b\\u{1b}[31mc\\u{1c}\\u{1d}\\u{1e}\\u{7f}\\u{85}\\u{202e}"
        );
        assert_eq!(escape_controls("line\nnext\t"), "line\\u{a}next\\u{9}");
        assert_eq!(Escaped("\x1b").to_string(), "\\u{1b}");
        assert_eq!(escape_lines("a\x1b\nb\n"), "a\\u{1b}\nb\n");
    }

    #[test]
    fn escaping_is_idempotent_and_leaves_no_control_character() {
        for s in [
            "\x00\x01\x1f",
            "x\u{9b}y",
            "ok",
            "\\u{1b}",
            "\u{2066}\u{2069}",
        ] {
            let once = escape_controls(s).into_owned();
            assert!(!once.chars().any(needs_escape), "{once:?}");
            assert_eq!(escape_controls(&once), once);
        }
    }
}
