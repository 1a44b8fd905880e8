//! Human-friendly durations in config files: `"250ms"`, `"5s"`, `"2m"`, `"1h"`.
//!
//! Compiled without the agent's runtime so the collector's config files read durations the same
//! way.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, de};

/// A duration written as a number followed by `ms`, `s`, `m` or `h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    pub const fn from_secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
            format!("`{s}` has no unit; write it like \"500ms\", \"5s\", \"2m\" or \"1h\"")
        })?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("`{s}` does not start with a whole number; write it like \"500ms\" or \"5s\"")
        })?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => {
                return Err(format!(
                    "`{s}` has an unknown unit `{unit}`; use ms, s, m or h"
                ));
            }
        };
        Ok(Self(d))
    }
}

impl fmt::Display for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(3_600_000) && ms > 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(de::Error::custom)
    }
}

/// For `#[serde(deserialize_with = "...")]` on a plain [`Duration`] field.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    ConfigDuration::deserialize(d).map(|c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_prints_it_back() {
        for (text, ms) in [
            ("250ms", 250),
            ("5s", 5000),
            ("2m", 120_000),
            ("1h", 3_600_000),
        ] {
            let d = ConfigDuration::parse(text).unwrap();
            assert_eq!(d.0, Duration::from_millis(ms));
            assert_eq!(d.to_string(), text);
        }
    }

    #[test]
    fn explains_what_is_wrong() {
        assert_eq!(
            ConfigDuration::parse("5").unwrap_err(),
            "`5` has no unit; write it like \"500ms\", \"5s\", \"2m\" or \"1h\""
        );
        assert_eq!(
            ConfigDuration::parse("5d").unwrap_err(),
            "`5d` has an unknown unit `d`; use ms, s, m or h"
        );
        assert!(ConfigDuration::parse("s").is_err());
    }
}
