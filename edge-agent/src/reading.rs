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
    pub quality: Quality,
    pub unit: Option<String>,
}
