//! The agent's own gap records: a JSON array in the Parquet footer's key-value metadata under
//! [`METADATA_KEY`], one object per `seq` range the gateway knows it lost:
//!
//! ```json
//! [{"first_seq":1,"last_seq":9,"readings":9,"reason":"buffer_full","detected_at_us":1700000000000000}]
//! ```
//!
//! The agent's reasons today are `buffer_full`, `max_age` and `damaged_buffer`; any other reason
//! of lowercase letters, digits and `_` is recorded as given, so a newer agent's reason is not
//! lost on an older collector. Unknown fields in a record are ignored for the same reason.

use serde::Deserialize;

/// The footer key that carries the agent's gap records.
pub const METADATA_KEY: &str = "plantline.gaps";

/// Reasons the agent documents; others are accepted (and logged) as they come.
pub const KNOWN_REASONS: [&str; 3] = ["buffer_full", "max_age", "damaged_buffer"];

/// One gap record of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentGap {
    /// First lost `seq`.
    pub first_seq: i64,
    /// Last lost `seq`.
    pub last_seq: i64,
    /// Readings lost (at most the width of the range).
    pub readings: i64,
    /// Why the gateway lost them.
    pub reason: String,
    /// When the gateway noticed, microseconds since the epoch, UTC.
    pub detected_at_us: i64,
}

/// Parses and checks the value of [`METADATA_KEY`]. The error says which record is wrong and
/// how.
pub fn parse(value: &str) -> Result<Vec<AgentGap>, String> {
    let records: Vec<AgentGap> = serde_json::from_str(value).map_err(|e| {
        format!(
            "is not a JSON array of gap records ({e}); expected [{{\"first_seq\":1,\"last_seq\":9,\"readings\":9,\"reason\":\"buffer_full\",\"detected_at_us\":1700000000000000}}]"
        )
    })?;
    for (i, r) in records.iter().enumerate() {
        let problem = if r.first_seq < 0 {
            Some(format!("first_seq {} is negative", r.first_seq))
        } else if r.last_seq < r.first_seq {
            Some(format!(
                "last_seq {} is below first_seq {}",
                r.last_seq, r.first_seq
            ))
        } else if r.readings < 0 {
            Some(format!("readings {} is negative", r.readings))
        } else if r.readings > r.last_seq - r.first_seq + 1 {
            Some(format!(
                "readings {} is more than the {} seqs of {}..={}",
                r.readings,
                r.last_seq - r.first_seq + 1,
                r.first_seq,
                r.last_seq
            ))
        } else if !valid_reason(&r.reason) {
            Some(format!(
                "reason `{}` is not a reason name (1-64 lowercase letters, digits and `_`, like `buffer_full`)",
                r.reason
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(format!("record {i}: {problem}"));
        }
    }
    Ok(records)
}

fn valid_reason(reason: &str) -> bool {
    (1..=64).contains(&reason.len())
        && reason
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let records = parse(
            r#"[{"first_seq":1,"last_seq":9,"readings":9,"reason":"buffer_full","detected_at_us":1700000000000000}]"#,
        )
        .unwrap();
        assert_eq!(
            records,
            vec![AgentGap {
                first_seq: 1,
                last_seq: 9,
                readings: 9,
                reason: "buffer_full".into(),
                detected_at_us: 1_700_000_000_000_000
            }]
        );
        assert_eq!(parse("[]").unwrap(), vec![]);
        // A newer agent's extra field and reason are kept, not refused.
        let newer = parse(
            r#"[{"first_seq":3,"last_seq":3,"readings":1,"reason":"operator_purge","detected_at_us":1,"note":"x"}]"#,
        )
        .unwrap();
        assert_eq!(newer[0].reason, "operator_purge");
    }

    #[test]
    fn malformed_records_name_the_record_and_the_problem() {
        let err = |v: &str| parse(v).unwrap_err();
        assert!(err("{}").starts_with("is not a JSON array of gap records ("));
        assert!(err(r#"[{"first_seq":1}]"#).contains("missing field `last_seq`"));
        assert_eq!(
            err(
                r#"[{"first_seq":1,"last_seq":2,"readings":2,"reason":"max_age","detected_at_us":1},{"first_seq":9,"last_seq":1,"readings":0,"reason":"max_age","detected_at_us":1}]"#
            ),
            "record 1: last_seq 1 is below first_seq 9"
        );
        assert_eq!(
            err(
                r#"[{"first_seq":1,"last_seq":2,"readings":3,"reason":"max_age","detected_at_us":1}]"#
            ),
            "record 0: readings 3 is more than the 2 seqs of 1..=2"
        );
        assert!(
            err(
                r#"[{"first_seq":1,"last_seq":2,"readings":2,"reason":"Buffer Full","detected_at_us":1}]"#
            )
            .starts_with("record 0: reason `Buffer Full` is not a reason name")
        );
    }
}
