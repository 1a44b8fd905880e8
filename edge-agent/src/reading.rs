use crate::contract::Quality;

/// One reading as a source produces it, before the buffer gives it a `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// When the value was read, microseconds since the Unix epoch (UTC).
    pub ts_us: i64,
    pub device: String,
    pub tag: String,
    /// The scaled value; `None` when `quality` is bad.
    pub value: Option<f64>,
    /// The text of a string tag (contract v2 `value_text`); `None` for numeric tags, and for a string
    /// tag whose read failed. A reading never carries both `value` and `value_text`.
    pub value_text: Option<String>,
    pub quality: Quality,
    pub unit: Option<String>,
}
