//! Custom statuses ("In a meeting until 3 pm" 📅), validated once at the edge of the API: every
//! refusal names the field and changes nothing.
use unicode_segmentation::UnicodeSegmentation;

use super::{InvalidInput, Millis};

/// Longest custom status text, in Unicode scalar values.
pub const MAX_CUSTOM_TEXT: usize = 100;
/// Longest emoji, in bytes (one grapheme or a `:short_code:`).
pub const MAX_EMOJI_BYTES: usize = 32;
/// How far ahead an expiry may be.
const MAX_EXPIRY_AHEAD: Millis = 365 * 24 * 3600 * 1000;

/// A user's custom status. Validated: see [`CustomStatus::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CustomStatus {
    pub text: String,
    pub emoji: String,
    /// When the server clears it; None: until cleared.
    pub expires_at: Option<Millis>,
}

impl CustomStatus {
    /// Checks a custom status as a client sent it, at `now`. `Ok(None)` clears the status (empty
    /// text and emoji). `field` prefixes the names in error messages (`custom_status`).
    pub fn parse(
        field: &str,
        text: String,
        emoji: String,
        expires_at: Option<Millis>,
        now: Millis,
    ) -> Result<Option<CustomStatus>, InvalidInput> {
        let count = text.chars().count();
        if count > MAX_CUSTOM_TEXT {
            return Err(InvalidInput(format!(
                "{field}.text has {count} characters; at most {MAX_CUSTOM_TEXT} are allowed"
            )));
        }
        if let Some(c) = text.chars().find(|&c| is_forbidden_in_text(c)) {
            return Err(InvalidInput(format!(
                "{field}.text must not contain control or format characters, found U+{:04X}",
                c as u32
            )));
        }
        check_emoji(field, &emoji)?;
        if text.is_empty() && emoji.is_empty() {
            // Clearing: an expiry means nothing then, but a bad one is still a bad request.
            if let Some(at) = expires_at {
                check_expiry(field, at, now)?;
            }
            return Ok(None);
        }
        if let Some(at) = expires_at {
            check_expiry(field, at, now)?;
        }
        Ok(Some(CustomStatus {
            text,
            emoji,
            expires_at,
        }))
    }

    /// Whether it is still shown at `now`.
    pub fn is_live(&self, now: Millis) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

fn check_expiry(field: &str, at: Millis, now: Millis) -> Result<(), InvalidInput> {
    if at <= now {
        return Err(InvalidInput(format!(
            "{field}.expires_at must be in the future"
        )));
    }
    if at - now > MAX_EXPIRY_AHEAD {
        return Err(InvalidInput(format!(
            "{field}.expires_at must be at most one year ahead"
        )));
    }
    Ok(())
}

fn check_emoji(field: &str, emoji: &str) -> Result<(), InvalidInput> {
    if emoji.is_empty() {
        return Ok(());
    }
    if emoji.len() > MAX_EMOJI_BYTES {
        return Err(InvalidInput(format!(
            "{field}.emoji has {} bytes; at most {MAX_EMOJI_BYTES} are allowed",
            emoji.len()
        )));
    }
    if let Some(code) = emoji.strip_prefix(':').and_then(|e| e.strip_suffix(':')) {
        let ok = !code.is_empty()
            && code
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'+' | b'-'));
        return if ok {
            Ok(())
        } else {
            Err(InvalidInput(format!(
                "{field}.emoji short code must look like :name: with only a-z, 0-9, _, + and -"
            )))
        };
    }
    if emoji.graphemes(true).count() != 1 {
        return Err(InvalidInput(format!(
            "{field}.emoji must be a single emoji (one grapheme) or a :short_code:"
        )));
    }
    // Emoji sequences legitimately use joiners, variation selectors and tag characters; what
    // must never pass is a control character, whitespace or a bidirectional override.
    if let Some(c) = emoji
        .chars()
        .find(|&c| c.is_control() || c.is_whitespace() || is_bidi_control(c))
    {
        return Err(InvalidInput(format!(
            "{field}.emoji must not contain U+{:04X}",
            c as u32
        )));
    }
    Ok(())
}

fn is_forbidden_in_text(c: char) -> bool {
    c.is_control() || is_format_char(c) || matches!(c, '\u{2028}' | '\u{2029}')
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Unicode general category Cf (format characters): invisible characters that change how text
/// around them is shown (bidirectional overrides, zero-width spaces…).
pub(crate) fn is_format_char(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{0600}'..='\u{0605}' | '\u{061C}' | '\u{06DD}' | '\u{070F}'
        | '\u{0890}'..='\u{0891}' | '\u{08E2}' | '\u{180E}' | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}'
        | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}' | '\u{110BD}' | '\u{110CD}'
        | '\u{13430}'..='\u{1343F}' | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0001}' | '\u{E0020}'..='\u{E007F}')
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_800_000_000_000;

    fn parse(
        text: &str,
        emoji: &str,
        expires_at: Option<Millis>,
    ) -> Result<Option<CustomStatus>, InvalidInput> {
        CustomStatus::parse("custom_status", text.into(), emoji.into(), expires_at, NOW)
    }

    #[test]
    fn good_statuses_pass() {
        for (text, emoji) in [
            ("In a meeting", "📅"),
            ("", ":calendar:"),
            ("Focus", ""),
            ("家族と", "👨‍👩‍👧"),
            ("flag", "🏴󠁧󠁢󠁳󠁣󠁴󠁿"),
            ("keycap", "1️⃣"),
        ] {
            assert!(
                parse(text, emoji, Some(NOW + 60_000)).unwrap().is_some(),
                "{text:?} {emoji:?}"
            );
        }
        assert_eq!(
            parse(&"é".repeat(100), "", None)
                .unwrap()
                .unwrap()
                .text
                .chars()
                .count(),
            100
        );
    }

    #[test]
    fn empty_text_and_emoji_clear() {
        assert_eq!(parse("", "", None).unwrap(), None);
    }

    #[test]
    fn each_bad_input_is_refused_naming_its_field() {
        let cases: [(&str, &str, Option<Millis>, &str); 12] = [
            (&"a".repeat(101), "", None, "custom_status.text"),
            ("line\nbreak", "", None, "custom_status.text"),
            ("bidi \u{202E}override", "", None, "custom_status.text"),
            ("zero\u{200B}width", "", None, "custom_status.text"),
            ("", "😀😀", None, "custom_status.emoji"),
            ("", "ab", None, "custom_status.emoji"),
            ("", ":Bad Code:", None, "custom_status.emoji"),
            ("", "::", None, "custom_status.emoji"),
            ("", &"👍".repeat(9), None, "custom_status.emoji"),
            ("", "\u{202E}", None, "custom_status.emoji"),
            ("x", "", Some(NOW), "custom_status.expires_at"),
            (
                "x",
                "",
                Some(NOW + 366 * 24 * 3600 * 1000),
                "custom_status.expires_at",
            ),
        ];
        for (text, emoji, at, field) in cases {
            let e = parse(text, emoji, at).expect_err(&format!("{text:?} {emoji:?} {at:?}"));
            assert!(e.0.starts_with(field), "{field}: {e}");
        }
    }
}
