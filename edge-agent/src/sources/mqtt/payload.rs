//! Turning one MQTT message into readings: the subscription's mapping (device and tag from topic
//! levels, values by JSON pointer or a plain number, timestamp from the payload or the arrival
//! time, unit and scale).

use serde_json::Value;

use super::sparkplug::SparkplugError;
use super::topic::{Template, TopicError};
use crate::Reading;
use crate::config::{MqttSubscription, PayloadFormat, TimestampFormat, ValueType};
use crate::contract::Quality;

/// How many bytes of a bad payload a log line shows.
pub const SHOWN_PAYLOAD_BYTES: usize = 64;

/// Why (part of) a message gave no reading. Each names the topic; the subscription is named by
/// the caller, which counts these per subscription.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PayloadError {
    #[error("topic `{topic}`: payload is not JSON: {reason}")]
    NotJson { topic: String, reason: String },
    #[error("topic `{topic}`: payload is not UTF-8 text")]
    NotText { topic: String },
    #[error("topic `{topic}`: payload `{text}` is not a number")]
    NotANumber { topic: String, text: String },
    #[error("topic `{topic}`: no value at JSON pointer `{pointer}`")]
    Missing { topic: String, pointer: String },
    #[error("topic `{topic}`: the value at `{pointer}` is {found}, not a number")]
    NotNumeric {
        topic: String,
        pointer: String,
        found: String,
    },
    #[error(
        "topic `{topic}`: the value at `{pointer}` is {found}, not text (the mapping declares type = \"string\")"
    )]
    NotString {
        topic: String,
        pointer: String,
        found: String,
    },
    #[error("topic `{topic}`: the value at `{pointer}` scales to {value}, not a finite number")]
    NotFinite {
        topic: String,
        pointer: String,
        value: f64,
    },
    #[error("topic `{topic}`: the timestamp at `{pointer}` ({found}) is not {format}")]
    BadTimestamp {
        topic: String,
        pointer: String,
        found: String,
        format: &'static str,
    },
    #[error("topic `{topic}`: the {what} name is empty")]
    EmptyName { topic: String, what: &'static str },
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error(transparent)]
    Sparkplug(#[from] SparkplugError),
}

impl PayloadError {
    /// A short, fixed code for the kind of problem: the `reason` of a dead letter and of
    /// `plantline_mqtt_bad_payloads_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotJson { .. } => "not_json",
            Self::NotText { .. } => "not_text",
            Self::NotANumber { .. } => "not_a_number",
            Self::Missing { .. } => "missing_field",
            Self::NotNumeric { .. } => "not_numeric",
            Self::NotString { .. } => "not_string",
            Self::NotFinite { .. } => "not_finite",
            Self::BadTimestamp { .. } => "bad_timestamp",
            Self::EmptyName { .. } => "empty_name",
            Self::Topic(_) => "topic_level",
            Self::Sparkplug(e) => e.reason(),
        }
    }
}

/// One value of a subscription, ready to apply.
#[derive(Debug, Clone)]
struct ValueRule {
    tag: Template,
    /// JSON pointer; `None` for a `number` payload.
    pointer: Option<String>,
    /// `type = "string"`: the value is recorded as text, unscaled.
    text: bool,
    unit: Option<String>,
    scale: f64,
    offset: f64,
}

/// A subscription's mapping, with its templates parsed once.
#[derive(Debug, Clone)]
pub struct Mapping {
    format: PayloadFormat,
    device: Template,
    values: Vec<ValueRule>,
    timestamp: Option<(String, TimestampFormat)>,
}

/// What one message gave: the readings of the values that could be read, and a problem for each
/// value (or the whole message) that could not.
#[derive(Debug, Default, PartialEq)]
pub struct Mapped {
    pub readings: Vec<Reading>,
    pub problems: Vec<PayloadError>,
}

impl Mapping {
    /// Builds the mapping of a subscription that passed validation.
    pub fn new(sub: &MqttSubscription) -> Result<Self, TopicError> {
        let mut values = Vec::new();
        if sub.fields.is_empty() {
            values.push(ValueRule {
                tag: Template::parse(sub.tag.as_deref().unwrap_or_default())?,
                pointer: match sub.payload {
                    PayloadFormat::Json => Some(sub.value.clone().unwrap_or_default()),
                    // A sparkplug_b subscription is routed to its decoder, never mapped here.
                    PayloadFormat::Number | PayloadFormat::SparkplugB => None,
                },
                text: sub.value_type == ValueType::String,
                unit: sub.unit.clone(),
                scale: sub.scale,
                offset: sub.offset,
            });
        }
        for field in &sub.fields {
            values.push(ValueRule {
                tag: Template::parse(&field.tag)?,
                pointer: Some(field.value.clone()),
                text: field.value_type.unwrap_or(sub.value_type) == ValueType::String,
                unit: field.unit.clone().or_else(|| sub.unit.clone()),
                scale: field.scale.unwrap_or(sub.scale),
                offset: field.offset.unwrap_or(sub.offset),
            });
        }
        Ok(Self {
            format: sub.payload,
            device: Template::parse(&sub.device)?,
            values,
            timestamp: sub.timestamp.clone().zip(sub.timestamp_format),
        })
    }

    /// Maps one message that arrived at `arrival_us` (microseconds since the Unix epoch).
    pub fn map(&self, topic: &str, payload: &[u8], arrival_us: i64) -> Mapped {
        let mut out = Mapped::default();
        let device = match render_name(&self.device, topic, "device") {
            Ok(device) => device,
            Err(e) => {
                out.problems.push(e);
                return out;
            }
        };
        let document = match self.format {
            PayloadFormat::Json => match serde_json::from_slice::<Value>(payload) {
                Ok(doc) => Some(doc),
                Err(e) => {
                    out.problems.push(PayloadError::NotJson {
                        topic: topic.to_owned(),
                        reason: e.to_string(),
                    });
                    return out;
                }
            },
            PayloadFormat::Number | PayloadFormat::SparkplugB => None,
        };
        let ts_us = match (&document, &self.timestamp) {
            (Some(doc), Some((pointer, format))) => {
                match timestamp_at(doc, pointer, *format, topic) {
                    Ok(ts) => ts,
                    Err(e) => {
                        out.problems.push(e);
                        return out;
                    }
                }
            }
            _ => arrival_us,
        };
        for rule in &self.values {
            let result = render_name(&rule.tag, topic, "tag").and_then(|tag| {
                if rule.text
                    && let (Some(doc), Some(pointer)) = (&document, &rule.pointer)
                {
                    return Ok(Reading {
                        ts_us,
                        device: device.clone(),
                        tag,
                        value: None,
                        value_text: Some(text_at(doc, pointer, topic)?),
                        quality: Quality::Good,
                        unit: rule.unit.clone(),
                    });
                }
                let (raw, pointer) = match (&document, &rule.pointer) {
                    (Some(doc), Some(pointer)) => {
                        (number_at(doc, pointer, topic)?, pointer.as_str())
                    }
                    _ => (plain_number(payload, topic)?, ""),
                };
                let value = raw * rule.scale + rule.offset;
                if !value.is_finite() {
                    return Err(PayloadError::NotFinite {
                        topic: topic.to_owned(),
                        pointer: pointer.to_owned(),
                        value,
                    });
                }
                Ok(Reading {
                    ts_us,
                    device: device.clone(),
                    tag,
                    value: Some(value),
                    value_text: None,
                    quality: Quality::Good,
                    unit: rule.unit.clone(),
                })
            });
            match result {
                Ok(reading) => out.readings.push(reading),
                Err(e) => out.problems.push(e),
            }
        }
        out
    }
}

fn render_name(
    template: &Template,
    topic: &str,
    what: &'static str,
) -> Result<String, PayloadError> {
    let name = template.render(topic)?;
    if name.is_empty() {
        return Err(PayloadError::EmptyName {
            topic: topic.to_owned(),
            what,
        });
    }
    Ok(name)
}

/// A payload that is one number in text, surrounded by whitespace at most.
pub fn plain_number(payload: &[u8], topic: &str) -> Result<f64, PayloadError> {
    let text = std::str::from_utf8(payload).map_err(|_| PayloadError::NotText {
        topic: topic.to_owned(),
    })?;
    let trimmed = text.trim();
    match trimmed.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(PayloadError::NotANumber {
            topic: topic.to_owned(),
            text: shown(trimmed.as_bytes()),
        }),
    }
}

/// The number at a JSON pointer: a JSON number, `true`/`false` (1 and 0, as switches and door
/// contacts report), or a string holding a number (as many devices send them).
pub fn number_at(doc: &Value, pointer: &str, topic: &str) -> Result<f64, PayloadError> {
    let value = doc.pointer(pointer).ok_or_else(|| PayloadError::Missing {
        topic: topic.to_owned(),
        pointer: pointer.to_owned(),
    })?;
    let number = match value {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|v| v.is_finite()),
        _ => None,
    };
    number.ok_or_else(|| PayloadError::NotNumeric {
        topic: topic.to_owned(),
        pointer: pointer.to_owned(),
        found: describe(value),
    })
}

/// The text at a JSON pointer, for a `type = "string"` value: a JSON string as it is, a number
/// or `true`/`false` as JSON writes it (a recipe number sent as a number is still its name).
pub fn text_at(doc: &Value, pointer: &str, topic: &str) -> Result<String, PayloadError> {
    let value = doc.pointer(pointer).ok_or_else(|| PayloadError::Missing {
        topic: topic.to_owned(),
        pointer: pointer.to_owned(),
    })?;
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(_) | Value::Bool(_) => Ok(value.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => Err(PayloadError::NotString {
            topic: topic.to_owned(),
            pointer: pointer.to_owned(),
            found: describe(value),
        }),
    }
}

fn timestamp_at(
    doc: &Value,
    pointer: &str,
    format: TimestampFormat,
    topic: &str,
) -> Result<i64, PayloadError> {
    let value = doc.pointer(pointer).ok_or_else(|| PayloadError::Missing {
        topic: topic.to_owned(),
        pointer: pointer.to_owned(),
    })?;
    parse_timestamp(value, format).ok_or_else(|| PayloadError::BadTimestamp {
        topic: topic.to_owned(),
        pointer: pointer.to_owned(),
        found: describe(value),
        format: format_name(format),
    })
}

/// Microseconds since the Unix epoch, or `None` when `value` is not a time in `format` (or lies
/// outside years 1 to 9999).
pub fn parse_timestamp(value: &Value, format: TimestampFormat) -> Option<i64> {
    let per_unit: f64 = match format {
        TimestampFormat::Rfc3339 => return value.as_str().and_then(parse_rfc3339),
        TimestampFormat::EpochS => 1e6,
        TimestampFormat::EpochMs => 1e3,
        TimestampFormat::EpochUs => 1.0,
    };
    // Integers stay exact; fractions (seconds with decimals) go through f64, which keeps
    // microseconds exact for any date in this millennium.
    let as_int = match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    if let Some(i) = as_int {
        #[allow(clippy::cast_possible_truncation)] // per_unit is 1, 1e3 or 1e6
        let factor = per_unit as i64;
        return i.checked_mul(factor).filter(|us| in_range(*us));
    }
    let float = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }?;
    let us = (float * per_unit).round();
    #[allow(clippy::cast_possible_truncation)] // checked against the range first
    (us.is_finite() && us.abs() < 4e17)
        .then_some(us as i64)
        .filter(|us| in_range(*us))
}

/// Years 1 to 9999, as RFC 3339 allows.
fn in_range(us: i64) -> bool {
    (-62_135_596_800_000_000..=253_402_300_799_999_999).contains(&us)
}

/// `2024-05-01T12:00:00Z`, `2024-05-01 12:00:00.250+02:00`: RFC 3339 with `T` or a space,
/// fractions to any length (kept to microseconds), `Z` or a numeric offset.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let digits = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| std::str::from_utf8(part).ok()?.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(0, 4)?, digits(5, 2)?, digits(8, 2)?);
    let (hour, minute, second) = (digits(11, 2)?, digits(14, 2)?, digits(17, 2)?);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => return None,
    };
    // Second 60 is a leap second; it is counted as the last second of that minute.
    if year == 0 || day == 0 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut at = 19;
    let mut micros = 0;
    if b[at] == b'.' {
        at += 1;
        let start = at;
        while at < b.len() && b[at].is_ascii_digit() {
            if at - start < 6 {
                micros = micros * 10 + i64::from(b[at] - b'0');
            }
            at += 1;
        }
        let len = at - start;
        if len == 0 {
            return None;
        }
        for _ in len..6 {
            micros *= 10;
        }
    }
    let offset_secs = match b.get(at..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let hh = digits(at + 1, 2)?;
            let mm = digits(at + 4, 2)?;
            if hh > 23 || mm > 59 {
                return None;
            }
            let secs = hh * 3600 + mm * 60;
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    let secs =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second.min(59)
            - offset_secs;
    Some(secs * 1_000_000 + micros)
}

/// Days since 1970-01-01 of a date in the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn format_name(format: TimestampFormat) -> &'static str {
    match format {
        TimestampFormat::EpochS => "epoch seconds",
        TimestampFormat::EpochMs => "epoch milliseconds",
        TimestampFormat::EpochUs => "epoch microseconds",
        TimestampFormat::Rfc3339 => "an RFC 3339 time",
    }
}

/// A JSON value as a log line shows it: its type and its first bytes.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Object(_) => "an object".to_owned(),
        Value::Array(_) => "an array".to_owned(),
        other => format!("`{}`", shown(other.to_string().as_bytes())),
    }
}

/// The first [`SHOWN_PAYLOAD_BYTES`] of a payload as text, with invalid UTF-8 replaced, marked
/// with `…` when cut.
pub fn shown(payload: &[u8]) -> String {
    let cut = payload.len() > SHOWN_PAYLOAD_BYTES;
    let head = &payload[..payload.len().min(SHOWN_PAYLOAD_BYTES)];
    let mut text = String::from_utf8_lossy(head).into_owned();
    if cut {
        text.push('…');
    }
    text
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact values are the point
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::MqttField;

    fn subscription(device: &str, tag: Option<&str>, value: Option<&str>) -> MqttSubscription {
        MqttSubscription {
            topic: "plant/+/+/telemetry".to_owned(),
            qos: 1,
            payload: PayloadFormat::Json,
            device: device.to_owned(),
            tag: tag.map(str::to_owned),
            value: value.map(str::to_owned),
            fields: Vec::new(),
            timestamp: None,
            timestamp_format: None,
            unit: None,
            scale: 1.0,
            offset: 0.0,
            value_type: ValueType::Number,
            rebirth: None,
        }
    }

    fn reading(ts_us: i64, device: &str, tag: &str, value: f64, unit: Option<&str>) -> Reading {
        Reading {
            ts_us,
            device: device.to_owned(),
            tag: tag.to_owned(),
            value: Some(value),
            value_text: None,
            quality: Quality::Good,
            unit: unit.map(str::to_owned),
        }
    }

    #[test]
    fn json_pointer_finds_nested_values_and_array_items() {
        let doc =
            json!({"data": {"temp": 21.5, "list": [1, 2, 3]}, "a/b": 7, "on": true, "s": " 4.5 "});
        assert_eq!(number_at(&doc, "/data/temp", "t"), Ok(21.5));
        assert_eq!(number_at(&doc, "/data/list/2", "t"), Ok(3.0));
        assert_eq!(number_at(&doc, "/a~1b", "t"), Ok(7.0));
        assert_eq!(number_at(&doc, "/on", "t"), Ok(1.0));
        assert_eq!(number_at(&doc, "/s", "t"), Ok(4.5));
        assert_eq!(number_at(&json!(12), "", "t"), Ok(12.0));
        assert_eq!(
            number_at(&doc, "/data/pressure", "t")
                .unwrap_err()
                .to_string(),
            "topic `t`: no value at JSON pointer `/data/pressure`"
        );
        assert_eq!(
            number_at(&doc, "/data", "t").unwrap_err().to_string(),
            "topic `t`: the value at `/data` is an object, not a number"
        );
        assert_eq!(
            number_at(&json!({"v": "high"}), "/v", "t")
                .unwrap_err()
                .to_string(),
            "topic `t`: the value at `/v` is `\"high\"`, not a number"
        );
    }

    #[test]
    fn timestamps_parse_in_every_format() {
        let us = 1_714_564_800_250_000; // 2024-05-01T12:00:00.250Z
        assert_eq!(
            parse_timestamp(&json!(1_714_564_800.25), TimestampFormat::EpochS),
            Some(us)
        );
        assert_eq!(
            parse_timestamp(&json!(1_714_564_800_250_i64), TimestampFormat::EpochMs),
            Some(us)
        );
        assert_eq!(
            parse_timestamp(&json!("1714564800250"), TimestampFormat::EpochMs),
            Some(us)
        );
        assert_eq!(
            parse_timestamp(&json!(us), TimestampFormat::EpochUs),
            Some(us)
        );
        assert_eq!(
            parse_timestamp(&json!("2024-05-01T12:00:00.250Z"), TimestampFormat::Rfc3339),
            Some(us)
        );
        assert_eq!(
            parse_timestamp(
                &json!("2024-05-01 14:00:00.25+02:00"),
                TimestampFormat::Rfc3339
            ),
            Some(us)
        );
        assert_eq!(parse_rfc3339("2024-05-01T11:30:00.2500009-00:30"), Some(us));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2000-02-29T00:00:00Z"),
            Some(951_782_400_000_000)
        );
    }

    #[test]
    fn malformed_timestamps_are_rejected() {
        for text in [
            "2024-05-01",
            "2024-05-01T12:00:00",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T12:00:00.Z",
            "2024-05-01T12:00:00+2:00",
            "２024-05-01T12:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(text), None, "{text}");
        }
        assert_eq!(parse_timestamp(&json!(true), TimestampFormat::EpochS), None);
        assert_eq!(
            parse_timestamp(&json!("soon"), TimestampFormat::EpochMs),
            None
        );
        assert_eq!(
            parse_timestamp(&json!(1e300), TimestampFormat::EpochS),
            None
        );
        assert_eq!(
            parse_timestamp(&json!(i64::MAX), TimestampFormat::EpochS),
            None
        );
    }

    #[test]
    fn one_value_per_message_takes_device_and_tag_from_the_topic() {
        let mut sub = subscription("{1}", Some("{2}"), Some("/v"));
        sub.unit = Some("degC".to_owned());
        sub.scale = 0.1;
        sub.offset = -1.0;
        sub.timestamp = Some("/ts".to_owned());
        sub.timestamp_format = Some(TimestampFormat::EpochMs);
        let mapping = Mapping::new(&sub).unwrap();
        let mapped = mapping.map(
            "plant/press-3/oil/telemetry",
            br#"{"v": 250, "ts": 1700000000001}"#,
            5,
        );
        assert_eq!(
            mapped,
            Mapped {
                readings: vec![reading(
                    1_700_000_000_001_000,
                    "press-3",
                    "oil",
                    24.0,
                    Some("degC")
                )],
                problems: vec![],
            }
        );
    }

    #[test]
    fn several_fields_give_one_reading_each_and_a_problem_for_each_bad_one() {
        let mut sub = subscription("{1}", None, None);
        sub.unit = Some("degC".to_owned());
        sub.fields = vec![
            MqttField {
                tag: "temp".to_owned(),
                value: "/t".to_owned(),
                unit: None,
                scale: None,
                offset: None,
                value_type: None,
            },
            MqttField {
                tag: "rh".to_owned(),
                value: "/h".to_owned(),
                unit: Some("%".to_owned()),
                scale: Some(100.0),
                offset: None,
                value_type: None,
            },
            MqttField {
                tag: "co2".to_owned(),
                value: "/c".to_owned(),
                unit: None,
                scale: None,
                offset: None,
                value_type: None,
            },
        ];
        let mapped = Mapping::new(&sub).unwrap().map(
            "plant/room-1/x/telemetry",
            br#"{"t": 20.5, "h": 0.5}"#,
            9,
        );
        assert_eq!(
            mapped.readings,
            vec![
                reading(9, "room-1", "temp", 20.5, Some("degC")),
                reading(9, "room-1", "rh", 50.0, Some("%")),
            ]
        );
        assert_eq!(
            mapped
                .problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec!["topic `plant/room-1/x/telemetry`: no value at JSON pointer `/c`"]
        );
    }

    #[test]
    fn a_string_value_is_recorded_as_text_and_a_number_value_still_refuses_text() {
        let mut sub = subscription("{1}", None, None);
        let field = |tag: &str, value_type| MqttField {
            tag: tag.to_owned(),
            value: format!("/{tag}"),
            unit: None,
            scale: None,
            offset: None,
            value_type,
        };
        sub.fields = vec![
            field("recipe", Some(ValueType::String)),
            field("batch", Some(ValueType::String)),
            field("step", Some(ValueType::String)),
            field("speed", None),
            field("mode", None),
            field("alarm", Some(ValueType::String)),
        ];
        let mapped = Mapping::new(&sub).unwrap().map(
            "plant/press-3/x/telemetry",
            r#"{"recipe": "PX-200 \u00d6l", "batch": 4711, "step": "", "speed": 12, "mode": "auto", "alarm": null}"#.as_bytes(),
            9,
        );
        let text = |tag: &str, text: &str| Reading {
            ts_us: 9,
            device: "press-3".to_owned(),
            tag: tag.to_owned(),
            value: None,
            value_text: Some(text.to_owned()),
            quality: Quality::Good,
            unit: None,
        };
        assert_eq!(
            mapped.readings,
            vec![
                text("recipe", "PX-200 Öl"),
                text("batch", "4711"),
                text("step", ""),
                reading(9, "press-3", "speed", 12.0, None),
            ]
        );
        assert_eq!(
            mapped
                .problems
                .iter()
                .map(|p| (p.reason(), p.to_string()))
                .collect::<Vec<_>>(),
            vec![
                (
                    "not_numeric",
                    "topic `plant/press-3/x/telemetry`: the value at `/mode` is `\"auto\"`, not a number".to_owned()
                ),
                (
                    "not_string",
                    "topic `plant/press-3/x/telemetry`: the value at `/alarm` is null, not text (the mapping declares type = \"string\")".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn plain_numbers_and_garbage() {
        let mut sub = subscription("meter", Some("{1}"), None);
        sub.payload = PayloadFormat::Number;
        let mapping = Mapping::new(&sub).unwrap();
        assert_eq!(
            mapping.map("plant/kwh", b" 12.5\n", 3).readings,
            vec![reading(3, "meter", "kwh", 12.5, None)]
        );
        assert_eq!(
            mapping.map("plant/kwh", b"NaN", 3).problems[0].to_string(),
            "topic `plant/kwh`: payload `NaN` is not a number"
        );
        assert_eq!(
            mapping.map("plant/kwh", &[0xff, 0xfe], 3).problems[0].to_string(),
            "topic `plant/kwh`: payload is not UTF-8 text"
        );
        let json = Mapping::new(&subscription("{1}", Some("v"), Some("/v"))).unwrap();
        assert_eq!(
            json.map("plant/a", b"{oops", 1).problems[0].to_string(),
            "topic `plant/a`: payload is not JSON: key must be a string at line 1 column 2"
        );
        assert_eq!(
            json.map("plant/", b"{}", 1).problems[0].to_string(),
            "topic `plant/`: the device name is empty"
        );
    }

    #[test]
    fn long_payloads_are_cut_for_the_log() {
        let long = "x".repeat(100);
        assert_eq!(shown(long.as_bytes()), format!("{}…", "x".repeat(64)));
        assert_eq!(shown(b"ok"), "ok");
    }
}
