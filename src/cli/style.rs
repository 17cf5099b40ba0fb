//! Colour on a terminal only, and never when `NO_COLOR` is set (no-color.org):
//! escape codes in a log file or a pipe are noise.

use std::io::IsTerminal;

/// Whether to colour output written to `stream`.
pub fn colour(stream: &impl IsTerminal) -> bool {
    stream.is_terminal() && !no_color(std::env::var_os("NO_COLOR"))
}

/// `NO_COLOR` counts when it is set to anything but the empty string.
fn no_color(value: Option<std::ffi::OsString>) -> bool {
    value.is_some_and(|v| !v.is_empty())
}

/// `text` in the SGR colour `code` when colouring `stream`.
pub fn paint(stream: &impl IsTerminal, code: &str, text: &str) -> String {
    if colour(stream) {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// The prefix of error messages on stderr.
pub fn error_label() -> String {
    paint(&std::io::stderr(), "1;31", "tempalias")
}

/// A warning line's label on stderr.
pub fn warning_label() -> String {
    paint(&std::io::stderr(), "1;33", "note")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_color_counts_when_not_empty() {
        assert!(!no_color(None));
        assert!(!no_color(Some("".into())));
        assert!(no_color(Some("1".into())));
    }
}
