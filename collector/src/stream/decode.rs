//! Decoding the agent's Kinesis records (`edge_agent::sinks::kinesis`): JSON lines, one reading
//! per line, several readings of one device per record.
//!
//! A record is decoded whole or not at all: one bad line makes the record bad, so a row never
//! lands without the other readings the agent sent with it.

use edge_agent::contract::{self, Quality, Row};
use serde::Deserialize;

/// One line of a record, as the agent writes it. Keys a later agent adds are ignored: the live
/// format only grows, like the batch contract.
#[derive(Deserialize)]
struct Line {
    gateway: String,
    seq: i64,
    device: String,
    tag: String,
    ts: i64,
    value: Option<f64>,
    quality: String,
    unit: Option<String>,
    #[serde(default)]
    value_text: Option<String>,
}

/// Why a record could not be decoded. `line` counts from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the record holds no reading")]
    Empty,
    #[error("line {line} is not UTF-8 text")]
    NotText { line: usize },
    #[error("line {line} is not a reading of the agent's live format: {message}")]
    Json { line: usize, message: String },
    #[error("line {line}: {message}")]
    Invalid { line: usize, message: String },
}

impl DecodeError {
    /// The kind of problem, as `plantline_collector_stream_bad_records_total` labels it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::NotText { .. } => "not_utf8",
            Self::Json { .. } => "not_json",
            Self::Invalid { .. } => "invalid_reading",
        }
    }
}

/// The readings of one record, in the record's order. The live records do not carry the
/// gateway's site, so `site` is empty (the batches, not the live path, carry it).
pub fn decode(data: &[u8]) -> Result<Vec<Row>, DecodeError> {
    let mut rows = Vec::new();
    for (index, raw) in data.split(|b| *b == b'\n').enumerate() {
        let line = index + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let text = std::str::from_utf8(raw).map_err(|_| DecodeError::NotText { line })?;
        let parsed: Line = serde_json::from_str(text).map_err(|e| DecodeError::Json {
            line,
            message: e.to_string(),
        })?;
        let invalid = |message: String| DecodeError::Invalid { line, message };
        contract::check_gateway_id(&parsed.gateway).map_err(|e| invalid(e.to_string()))?;
        let quality = Quality::parse(&parsed.quality).ok_or_else(|| {
            invalid(format!(
                "quality `{}` is not good, bad or uncertain",
                parsed.quality
            ))
        })?;
        if parsed.value.is_some() && parsed.value_text.is_some() {
            return Err(invalid(format!(
                "seq {} has both `value` and `value_text`; a reading carries one or the other",
                parsed.seq
            )));
        }
        rows.push(Row {
            seq: parsed.seq,
            ts_us: parsed.ts,
            site: String::new(),
            gateway: parsed.gateway,
            device: parsed.device,
            tag: parsed.tag,
            value: parsed.value,
            quality,
            unit: parsed.unit,
            value_text: parsed.value_text,
        });
    }
    if rows.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_json_lines_decode_into_rows() {
        let data = b"{\"gateway\":\"gw-1\",\"seq\":1,\"device\":\"press-3\",\"tag\":\"oil_temp\",\"ts\":1700000000001001,\"value\":123.5,\"quality\":\"good\",\"unit\":\"degC\"}\n\
{\"gateway\":\"gw-1\",\"seq\":4,\"device\":\"press-3\",\"tag\":\"recipe\",\"ts\":1700000000001004,\"value\":null,\"quality\":\"good\",\"unit\":null,\"value_text\":\"MIX-7\"}\n";
        let rows = decode(data).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].seq, rows[0].value, rows[0].unit.as_deref()),
            (1, Some(123.5), Some("degC"))
        );
        assert_eq!(rows[1].value_text.as_deref(), Some("MIX-7"));
        assert_eq!(rows[1].site, "");
    }

    #[test]
    fn one_bad_line_makes_the_whole_record_bad() {
        let good = "{\"gateway\":\"gw-1\",\"seq\":1,\"device\":\"d\",\"tag\":\"t\",\"ts\":1,\"value\":1.0,\"quality\":\"good\",\"unit\":null}";
        assert_eq!(
            decode(format!("{good}\n{{\"gateway\":\"gw-1\"}}\n").as_bytes()).map_err(|e| match e {
                DecodeError::Json { line, .. } => line,
                other => panic!("{other:?}"),
            }),
            Err(2)
        );
        assert_eq!(
            decode(good.replace("good", "fine").as_bytes())
                .unwrap_err()
                .to_string(),
            "line 1: quality `fine` is not good, bad or uncertain"
        );
        assert_eq!(
            decode(b"\xff\xfe").unwrap_err(),
            DecodeError::NotText { line: 1 }
        );
        assert_eq!(decode(b"\n").unwrap_err(), DecodeError::Empty);
        assert!(matches!(
            decode(good.replace("gw-1", "GW 1").as_bytes()),
            Err(DecodeError::Invalid { line: 1, .. })
        ));
    }
}
