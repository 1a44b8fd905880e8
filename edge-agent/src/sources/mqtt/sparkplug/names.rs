//! Tag names from Sparkplug metric names.
//!
//! Metric names are folder paths with any characters (`Inputs/Temperature A`), while the sensor
//! map's tag names are 1 to 64 of `A-Z a-z 0-9 - _ .`, starting with a letter or digit (the
//! rule `validate` and `import-tags` apply, [`crate::config::is_safe_name`]). The mapping:
//! 1. `/` becomes `.` (`Inputs/Temperature A` → `Inputs.Temperature_A`), keeping the folders
//!    readable;
//! 2. every other character outside the set becomes `_` (one per character, so `Ü` is one `_`);
//! 3. leading characters that are not a letter or digit are dropped (`/Motor` → `Motor`);
//! 4. a name still longer than 64, or left empty, is cut to its first 55 characters (or
//!    `metric` when empty) and ends in `-` and 8 hex digits of a hash of the full metric name,
//!    so two long names that share a beginning stay apart, and the same name always gives the
//!    same tag.

use crate::config::is_safe_name;

/// The longest tag name the sensor map allows.
const MAX_TAG: usize = 64;
/// What is kept of a long name before the hash.
const KEPT_BEFORE_HASH: usize = MAX_TAG - 9;

/// The tag name of a metric name; always a legal tag name.
pub fn tag_name(metric: &str) -> String {
    let mapped: String = metric
        .chars()
        .map(|c| match c {
            '/' => '.',
            c if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') => c,
            _ => '_',
        })
        .collect();
    let trimmed = mapped.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    if is_safe_name(trimmed) {
        return trimmed.to_owned();
    }
    // Only ASCII is left, so cutting at a byte index is cutting at a character.
    let kept = &trimmed[..trimmed.len().min(KEPT_BEFORE_HASH)];
    let base = if kept.is_empty() { "metric" } else { kept };
    format!("{base}-{:08x}", fnv1a32(metric.as_bytes()))
}

/// FNV-1a, 32 bits: stable across builds and platforms, unlike the standard library's hasher.
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash: u32, b| {
        (hash ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_become_dots_and_other_characters_underscores() {
        assert_eq!(tag_name("Inputs/Temperature A"), "Inputs.Temperature_A");
        assert_eq!(tag_name("Motor/Speed (rpm)"), "Motor.Speed__rpm_");
        assert_eq!(tag_name("/Line3/Öl-Temp"), "Line3._l-Temp");
        assert_eq!(tag_name("_hidden/x"), "hidden.x");
        assert_eq!(tag_name("pressure"), "pressure");
    }

    #[test]
    fn long_or_empty_names_keep_a_stable_hash() {
        let long = format!("Area/{}", "Cell".repeat(20));
        let tag = tag_name(&long);
        assert_eq!(tag.len(), 64);
        assert!(tag.starts_with("Area.CellCell"));
        assert_eq!(tag, tag_name(&long), "the same name gives the same tag");
        let other = format!("Area/{}x", "Cell".repeat(20));
        assert_ne!(
            tag_name(&other),
            tag,
            "names that share their start stay apart"
        );
        assert_eq!(tag_name("///"), format!("metric-{:08x}", fnv1a32(b"///")));
        assert_eq!(tag_name(""), format!("metric-{:08x}", fnv1a32(b"")));
        for name in [long.as_str(), "///", "", "é", "Motor/Speed (rpm)"] {
            assert!(is_safe_name(&tag_name(name)), "{name}");
        }
    }

    #[test]
    fn the_hash_is_fnv_1a() {
        // The published FNV-1a 32-bit test vectors.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }
}
