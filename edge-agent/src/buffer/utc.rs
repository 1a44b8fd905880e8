//! UTC date and time text for the buffer's reports and file names, without a calendar crate.

/// `2023-11-14T22:13:20.000001Z` for microseconds since the Unix epoch.
pub(crate) fn format_micros(ts_us: i64) -> String {
    let secs = ts_us.div_euclid(1_000_000);
    let micros = ts_us.rem_euclid(1_000_000);
    let (y, m, d, hh, mm, ss) = civil(secs);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{micros:06}Z")
}

/// `20231114T221320Z`: a timestamp that sorts and fits in a file name.
pub(crate) fn file_stamp(unix_secs: i64) -> String {
    let (y, m, d, hh, mm, ss) = civil(unix_secs);
    format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
}

/// Seconds since the epoch as (year, month, day, hour, minute, second) in the proleptic
/// Gregorian calendar (Howard Hinnant's `civil_from_days`).
fn civil(secs: i64) -> (i64, i64, i64, i64, i64, i64) {
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            format_micros(1_700_000_000_000_001),
            "2023-11-14T22:13:20.000001Z"
        );
        // A leap day and the last microsecond before a new year.
        assert_eq!(
            format_micros(951_782_400_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(
            format_micros(1_735_689_599_999_999),
            "2024-12-31T23:59:59.999999Z"
        );
        assert_eq!(file_stamp(1_700_000_000), "20231114T221320Z");
    }
}
