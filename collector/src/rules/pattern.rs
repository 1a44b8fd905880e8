//! Tag patterns of the row-level rules: a glob on the tag name, or on `device/tag` when the
//! pattern holds a `/`.
//!
//! `*` matches any run of characters (also none), `?` exactly one character; every other
//! character matches itself. In a `device/tag` pattern the part before the `/` is matched
//! against the device name and the part after against the tag name. `*` alone matches every
//! reading.

/// One compiled tag pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagPattern {
    text: String,
    /// True when the pattern names the device too (`press-*/oil_temp`).
    on_path: bool,
}

impl TagPattern {
    /// Compiles a pattern; the error says what is wrong and how to write it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err(
                "is empty; write a tag name like \"oil_temp\", a glob like \"*_temp\" or \"press-*/oil_temp\", or \"*\" for every tag".to_owned(),
            );
        }
        if text != text.trim() {
            return Err(format!(
                "`{text}` starts or ends with a space, which no tag name does; remove it"
            ));
        }
        if text.matches('/').count() > 1 {
            return Err(format!(
                "`{text}` has more than one `/`; write `<device>/<tag>` like \"press-*/oil_temp\""
            ));
        }
        Ok(Self {
            text: text.to_owned(),
            on_path: text.contains('/'),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the reading of `tag` on `device` matches.
    pub fn matches(&self, device: &str, tag: &str) -> bool {
        if self.on_path {
            let (device_pattern, tag_pattern) = self
                .text
                .split_once('/')
                .expect("on_path patterns hold exactly one `/`");
            glob(device_pattern.as_bytes(), device.as_bytes())
                && glob(tag_pattern.as_bytes(), tag.as_bytes())
        } else {
            glob(self.text.as_bytes(), tag.as_bytes())
        }
    }
}

/// Glob match with `*` and `?`, linear in practice: on a mismatch it backtracks only to the
/// last `*`.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, device: &str, tag: &str) -> bool {
        TagPattern::parse(pattern).unwrap().matches(device, tag)
    }

    #[test]
    fn patterns_match_the_tag_or_the_device_and_tag() {
        assert!(m("oil_temp", "press-3", "oil_temp"));
        assert!(!m("oil_temp", "press-3", "oil_temp_2"));
        assert!(m("*_temp", "press-3", "oil_temp"));
        assert!(m("*", "press-3", "anything"));
        assert!(m("press-*/oil_temp", "press-3", "oil_temp"));
        assert!(!m("press-*/oil_temp", "pump-1", "oil_temp"));
        assert!(m("*/*", "d", "t"));
        assert!(m("press-?/*temp*", "press-3", "oil_temp_raw"));
        assert!(!m("press-?/*", "press-33", "x"));
        assert!(m("a*b*c", "d", "aXXbYYbZc"));
        assert!(!m("a*b*c", "d", "aXXbYYbZ"));
        // A pattern without `/` never looks at the device.
        assert!(!m("press-3", "press-3", "oil_temp"));
    }

    #[test]
    fn bad_patterns_say_how_to_write_them() {
        assert!(TagPattern::parse("").unwrap_err().starts_with("is empty;"));
        assert_eq!(
            TagPattern::parse("a/b/c").unwrap_err(),
            "`a/b/c` has more than one `/`; write `<device>/<tag>` like \"press-*/oil_temp\""
        );
        assert!(TagPattern::parse(" x").is_err());
    }
}
