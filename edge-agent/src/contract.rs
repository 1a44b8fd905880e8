//! The batch contract between `edge-agent` (producer) and `collector` (consumer).
//!
//! This module is the single definition of what a batch in the raw zone is. It compiles with the
//! agent's `runtime` feature off, so the collector imports it without the agent's dependencies.
//! The human-readable version of this contract is `docs/batch-contract.md`; both must change
//! together, and [`CONTRACT_VERSION`] goes up with any change a consumer could notice.
//!
//! # Invariants
//! - A batch holds readings of exactly one gateway, sorted by `seq`, with no `seq` twice.
//! - `seq` is assigned by the gateway's buffer, strictly increasing over the gateway's lifetime.
//!   Gaps are allowed (readings dropped by policy); reuse is not.
//! - A batch is a contiguous range of the buffer: every reading the buffer held with
//!   `first_seq <= seq <= last_seq` is in the batch.
//! - The object key depends only on the gateway and the batch's first `seq`, and keys sort in
//!   `seq` order as plain strings. A retried upload writes the same key with the same bytes.
//! - A reading carries at most one of `value` (a number) and `value_text` (the text of a string
//!   tag, contract v2); both are null exactly when it carries no usable value (`quality` is
//!   `bad`). A consumer refuses a batch with both set in one row.
//! - Columns are only ever added at the end, nullable, with a new version: a file of an older
//!   version is the newer schema with the added columns null ([`upgrade`] does that), so every
//!   version a consumer accepts reads into the current [`schema`].
//! - A `seq` the gateway handed out but will never deliver is either explained by a [`Gap`] in
//!   the `plantline.gaps` metadata of a later batch of the same gateway, or (only after a loss
//!   of the buffer together with its high-water file) not explained at all. A gap never covers a
//!   `seq` that is in a batch, except a `damaged_buffer` gap whose start the gateway could not
//!   know (see [`GapReason::DamagedBuffer`]).

use std::fmt::{self, Write as _};
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Version of the batch contract written into every Parquet file's key-value metadata.
///
/// - v1: the nine columns `seq` to `unit`.
/// - v2: adds the nullable `value_text` column at the end, for string tags.
/// - v3: the columns of v2; adds the fresh lane ([`Lane::Fresh`]): during a backlog the gateway
///   also uploads copies of its newest readings under `gateway=<id>/fresh/`, footer
///   `plantline.lane = fresh`. A file names the lowest version that describes it, so main-lane
///   files still carry `2` and only fresh-lane files carry `3`.
pub const CONTRACT_VERSION: u32 = 3;

/// The version a main-lane file carries: its columns and meaning are those of v2.
pub const MAIN_LANE_VERSION: u32 = 2;

/// The oldest contract version a consumer of this crate still accepts.
pub const OLDEST_READABLE_VERSION: u32 = 1;

/// Parquet key-value metadata keys written by the producer.
pub mod metadata {
    /// The contract version the file was written against.
    pub const CONTRACT_VERSION: &str = "plantline.contract_version";
    /// The gateway that produced the batch.
    pub const GATEWAY: &str = "plantline.gateway";
    /// First `seq` in the batch.
    pub const FIRST_SEQ: &str = "plantline.first_seq";
    /// Last `seq` in the batch.
    pub const LAST_SEQ: &str = "plantline.last_seq";
    /// Readings the gateway knows it lost before this batch, as a JSON array of [`Gap`]s
    /// (see [`gaps_to_json`]). Optional: written only when there are gaps to report.
    ///
    /// [`Gap`]: super::Gap
    /// [`gaps_to_json`]: super::gaps_to_json
    pub const GAPS: &str = "plantline.gaps";
    /// Contract v3: `fresh` on a fresh-lane file (see [`Lane`]); absent on a main-lane file.
    ///
    /// [`Lane`]: super::Lane
    pub const LANE: &str = "plantline.lane";
}

/// Column names, in schema order.
pub mod column {
    pub const SEQ: &str = "seq";
    pub const TS: &str = "ts";
    pub const SITE: &str = "site";
    pub const GATEWAY: &str = "gateway";
    pub const DEVICE: &str = "device";
    pub const TAG: &str = "tag";
    pub const VALUE: &str = "value";
    pub const QUALITY: &str = "quality";
    pub const UNIT: &str = "unit";
    /// Contract v2: the text of a string tag (null for numbers and for bad readings).
    pub const VALUE_TEXT: &str = "value_text";
}

/// The columns of contract v1, which every later version starts with.
fn v1_fields() -> Vec<Field> {
    vec![
        Field::new(column::SEQ, DataType::Int64, false),
        Field::new(
            column::TS,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new(column::SITE, DataType::Utf8, false),
        Field::new(column::GATEWAY, DataType::Utf8, false),
        Field::new(column::DEVICE, DataType::Utf8, false),
        Field::new(column::TAG, DataType::Utf8, false),
        Field::new(column::VALUE, DataType::Float64, true),
        Field::new(column::QUALITY, DataType::Utf8, false),
        Field::new(column::UNIT, DataType::Utf8, true),
    ]
}

/// The Arrow schema of a batch ([`CONTRACT_VERSION`]). Timestamps are microseconds since the
/// Unix epoch in UTC, which maps to Delta's `timestamp` type and Snowflake's `TIMESTAMP_TZ`
/// without loss.
pub fn schema() -> SchemaRef {
    let mut fields = v1_fields();
    fields.push(Field::new(column::VALUE_TEXT, DataType::Utf8, true));
    Arc::new(Schema::new(fields))
}

/// The Arrow schema of contract `version`, or `None` for a version that does not exist or is
/// newer than this crate.
pub fn schema_of_version(version: u32) -> Option<SchemaRef> {
    match version {
        1 => Some(Arc::new(Schema::new(v1_fields()))),
        // v3 changed keys and metadata, not columns.
        2 | 3 => Some(schema()),
        _ => None,
    }
}

/// How trustworthy a reading is. Stored as its lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quality {
    /// The device answered and the value decoded.
    Good,
    /// No usable value: the device did not answer, refused the request or sent garbage.
    Bad,
    /// A value exists but should not be trusted blindly (for example stale or out of range).
    Uncertain,
}

impl Quality {
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Good => "good",
            Quality::Bad => "bad",
            Quality::Uncertain => "uncertain",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "good" => Some(Quality::Good),
            "bad" => Some(Quality::Bad),
            "uncertain" => Some(Quality::Uncertain),
            _ => None,
        }
    }
}

impl fmt::Display for Quality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reading as it travels in a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub seq: i64,
    /// Microseconds since the Unix epoch, UTC.
    pub ts_us: i64,
    pub site: String,
    pub gateway: String,
    pub device: String,
    pub tag: String,
    pub value: Option<f64>,
    pub quality: Quality,
    pub unit: Option<String>,
    /// The text of a string tag (v2); `None` for numbers and bad readings, and in v1 files.
    pub value_text: Option<String>,
}

/// Problems with a batch, as the consumer sees them.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ContractError {
    #[error(
        "batch schema does not match contract v{version}: {detail}; the producer must write the columns listed in docs/batch-contract.md"
    )]
    Schema { version: u32, detail: String },
    #[error("batch is not sorted by seq: seq {next} follows {prev}")]
    Unsorted { prev: i64, next: i64 },
    #[error("batch mixes gateways: expected `{expected}`, found `{found}`")]
    MixedGateway { expected: String, found: String },
    #[error("column `{column}` has an unknown value `{value}` at row {row}")]
    BadValue {
        column: &'static str,
        value: String,
        row: usize,
    },
    #[error(
        "row {row} (seq {seq}) has both a number in `value` and text in `value_text`; a reading carries one or the other"
    )]
    ValueAndText { row: usize, seq: i64 },
    #[error(
        "gateway id `{0}` is not allowed: use 1-64 characters of lowercase letters, digits, `-` and `_`, starting with a letter or digit"
    )]
    GatewayId(String),
    #[error(
        "object key `{0}` is not a batch key; expected `<prefix>gateway=<id>/<first seq, 20 digits>.parquet`"
    )]
    Key(String),
}

/// Checks that a gateway id is safe in object keys, Delta app ids and SQL literals.
pub fn check_gateway_id(id: &str) -> Result<(), ContractError> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && id
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ContractError::GatewayId(id.to_owned()))
    }
}

/// Which of a gateway's two upload lanes a batch belongs to (contract v3).
///
/// The **main** lane carries every reading exactly once, in `seq` order, one batch at a time;
/// rows leave the gateway's buffer only through it. The **fresh** lane exists so that fresh
/// readings reach the raw zone within `batch.max_age` while a backlog drains: during a backlog
/// the gateway also uploads its newest readings as fresh-lane batches. Their rows are copies: the
/// same readings (same `seq`, same content) go up again later in the main lane. Fresh-lane
/// batches of a gateway never go backwards (each starts after the last one confirmed, or repeats
/// it with more rows after a crash), and a fresh lane jumps ahead (starts a new range that is not
/// contiguous with the last) only once the main lane has uploaded everything up to the end of the
/// previous range. A consumer that ignores the fresh lane loses nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Lane {
    #[default]
    Main,
    Fresh,
}

impl Lane {
    /// The folder below `gateway=<id>/` that holds the lane's batches (`""` for the main lane).
    pub fn folder(self) -> &'static str {
        match self {
            Lane::Main => "",
            Lane::Fresh => "fresh/",
        }
    }

    /// The value of the `plantline.lane` footer entry (`None` for the main lane, which has none).
    pub fn metadata_value(self) -> Option<&'static str> {
        match self {
            Lane::Main => None,
            Lane::Fresh => Some("fresh"),
        }
    }

    /// The contract version a file of this lane carries.
    pub fn contract_version(self) -> u32 {
        match self {
            Lane::Main => MAIN_LANE_VERSION,
            Lane::Fresh => CONTRACT_VERSION,
        }
    }
}

/// The object key of a batch: `<prefix>gateway=<id>/<first_seq as 20 digits>.parquet` in the
/// main lane, `<prefix>gateway=<id>/fresh/<first_seq as 20 digits>.parquet` in the fresh lane.
///
/// The zero padding makes lexicographic listing order equal `seq` order, so a consumer can list
/// with `start-after` and read batches in sequence. `prefix` is used verbatim (give it a trailing
/// `/` if it names a folder).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BatchKey {
    pub gateway: String,
    pub first_seq: i64,
    pub lane: Lane,
}

impl BatchKey {
    /// The key of a main-lane batch.
    pub fn new(gateway: &str, first_seq: i64) -> Self {
        Self {
            gateway: gateway.to_owned(),
            first_seq,
            lane: Lane::Main,
        }
    }

    /// The key of a fresh-lane batch.
    pub fn fresh(gateway: &str, first_seq: i64) -> Self {
        Self {
            lane: Lane::Fresh,
            ..Self::new(gateway, first_seq)
        }
    }

    /// The folder (below the prefix) that holds all batches of one gateway, both lanes.
    pub fn gateway_prefix(prefix: &str, gateway: &str) -> String {
        format!("{prefix}gateway={gateway}/")
    }

    /// The folder (below the prefix) that holds one lane of one gateway. The main lane's folder is
    /// the gateway's folder, so list it with a `/` delimiter to see only main-lane batches.
    pub fn lane_prefix(prefix: &str, gateway: &str, lane: Lane) -> String {
        format!("{prefix}gateway={gateway}/{}", lane.folder())
    }

    /// The full object key below `prefix`.
    pub fn to_key(&self, prefix: &str) -> String {
        format!(
            "{}{:020}.parquet",
            Self::lane_prefix(prefix, &self.gateway, self.lane),
            self.first_seq
        )
    }

    /// Parses a full object key written by [`BatchKey::to_key`] with the same `prefix`, in
    /// either lane.
    pub fn parse(prefix: &str, key: &str) -> Result<Self, ContractError> {
        let bad = || ContractError::Key(key.to_owned());
        let rest = key.strip_prefix(prefix).ok_or_else(bad)?;
        let rest = rest.strip_prefix("gateway=").ok_or_else(bad)?;
        let (gateway, file) = rest.split_once('/').ok_or_else(bad)?;
        check_gateway_id(gateway).map_err(|_| bad())?;
        let (lane, file) = match file.strip_prefix(Lane::Fresh.folder()) {
            Some(file) => (Lane::Fresh, file),
            None => (Lane::Main, file),
        };
        let digits = file.strip_suffix(".parquet").ok_or_else(bad)?;
        if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let first_seq = digits.parse().map_err(|_| bad())?;
        Ok(Self {
            gateway: gateway.to_owned(),
            first_seq,
            lane,
        })
    }
}

/// Why a gateway lost readings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GapReason {
    /// The buffer reached its size bound (`buffer.max_bytes`) with `on_full = "drop_oldest"` and
    /// dropped its oldest readings. The range is exact and `readings` is exact.
    BufferFull,
    /// The readings waited longer than `buffer.max_age` in the buffer and were dropped. The
    /// range is exact and `readings` is exact.
    MaxAge,
    /// The buffer file was damaged and these readings could not be read back. `readings` is the
    /// width of the range (an upper bound: the damaged file cannot tell which `seq` values held
    /// readings). When the gateway could not know where the lost range started (its buffer and
    /// its high-water file were both lost), `first_seq` is 1 and the range may include `seq`
    /// values delivered before: only the values a reader does not have are lost.
    DamagedBuffer,
    /// A reason written by a newer producer; kept as written so a reader can still report it.
    Other(String),
}

impl GapReason {
    pub fn as_str(&self) -> &str {
        match self {
            GapReason::BufferFull => "buffer_full",
            GapReason::MaxAge => "max_age",
            GapReason::DamagedBuffer => "damaged_buffer",
            GapReason::Other(other) => other,
        }
    }

    /// The reason named `s`; a name this version does not know becomes [`GapReason::Other`].
    pub fn parse(s: &str) -> Self {
        match s {
            "buffer_full" => GapReason::BufferFull,
            "max_age" => GapReason::MaxAge,
            "damaged_buffer" => GapReason::DamagedBuffer,
            other => GapReason::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for GapReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A range of `seq` values whose readings the gateway knows it lost, as carried in a batch's
/// `plantline.gaps` metadata. `seq` stays monotonic per gateway: lost values are simply absent
/// from every batch, and the gap record says why.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Gap {
    /// First lost `seq` (inclusive).
    pub first_seq: i64,
    /// Last lost `seq` (inclusive).
    pub last_seq: i64,
    /// How many readings were lost in the range (see [`GapReason`] for how exact it is).
    pub readings: u64,
    pub reason: GapReason,
    /// When the gateway lost them, microseconds since the Unix epoch (UTC, gateway clock).
    pub detected_at_us: i64,
}

/// Problems with the `plantline.gaps` metadata of a batch.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "`plantline.gaps` metadata is not a valid gap list: {detail}; see docs/batch-contract.md for its format"
)]
pub struct GapsError {
    pub detail: String,
}

/// The `plantline.gaps` value for `gaps`: a compact JSON array, fields in a fixed order, so a
/// batch's bytes depend only on its content.
///
/// `[{"first_seq":5,"last_seq":9,"readings":5,"reason":"buffer_full","detected_at_us":1700000000000000}]`
pub fn gaps_to_json(gaps: &[Gap]) -> String {
    let mut out = String::from("[");
    for (i, gap) in gaps.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "{{\"first_seq\":{},\"last_seq\":{},\"readings\":{},\"reason\":",
            gap.first_seq, gap.last_seq, gap.readings
        );
        json::write_string(&mut out, gap.reason.as_str());
        let _ = write!(out, ",\"detected_at_us\":{}}}", gap.detected_at_us);
    }
    out.push(']');
    out
}

/// Reads a `plantline.gaps` value. Fields may come in any order and unknown fields are ignored
/// (a later producer may add some); each gap must have the five fields of [`Gap`], with
/// `1 <= first_seq <= last_seq` and `readings` at most the width of the range.
pub fn gaps_from_json(text: &str) -> Result<Vec<Gap>, GapsError> {
    let err = |detail: String| GapsError { detail };
    let value = json::parse(text).map_err(err)?;
    let json::Value::Array(items) = value else {
        return Err(err("expected a JSON array".to_owned()));
    };
    let mut gaps = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let json::Value::Object(fields) = item else {
            return Err(err(format!("gap {i} is not a JSON object")));
        };
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v)
                .ok_or_else(|| err(format!("gap {i} has no `{name}`")))
        };
        let int = |name: &str| -> Result<i64, GapsError> {
            match field(name)? {
                json::Value::Number(n) => n
                    .parse::<i64>()
                    .map_err(|_| err(format!("gap {i}: `{name}` = {n} is not a whole number"))),
                _ => Err(err(format!("gap {i}: `{name}` is not a number"))),
            }
        };
        let first_seq = int("first_seq")?;
        let last_seq = int("last_seq")?;
        let readings = int("readings")?;
        let detected_at_us = int("detected_at_us")?;
        let reason = match field("reason")? {
            json::Value::String(s) => GapReason::parse(s),
            _ => return Err(err(format!("gap {i}: `reason` is not a string"))),
        };
        if first_seq < 1 || first_seq > last_seq {
            return Err(err(format!(
                "gap {i}: seq range {first_seq}..={last_seq} is empty or starts below 1"
            )));
        }
        let width = u64::try_from(last_seq - first_seq).unwrap_or(u64::MAX - 1) + 1;
        let readings = u64::try_from(readings)
            .ok()
            .filter(|&n| n <= width)
            .ok_or_else(|| {
                err(format!(
                    "gap {i}: {readings} readings do not fit the seq range {first_seq}..={last_seq}"
                ))
            })?;
        gaps.push(Gap {
            first_seq,
            last_seq,
            readings,
            reason,
            detected_at_us,
        });
    }
    Ok(gaps)
}

/// Just enough JSON for the gap list, without a JSON library in the contract's dependencies.
mod json {
    use std::fmt::Write as _;

    /// A parsed JSON value; numbers keep their text so integers are read without going
    /// through a float.
    #[derive(Debug, PartialEq)]
    pub(super) enum Value {
        Null,
        Bool(bool),
        Number(String),
        String(String),
        Array(Vec<Value>),
        Object(Vec<(String, Value)>),
    }

    /// Deeper nesting than this is refused rather than risking the stack on hostile input.
    const MAX_DEPTH: usize = 64;

    pub(super) fn write_string(out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if u32::from(c) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", u32::from(c));
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    pub(super) fn parse(text: &str) -> Result<Value, String> {
        let mut p = Parser {
            bytes: text.as_bytes(),
            pos: 0,
        };
        let value = p.value(0)?;
        p.skip_ws();
        if p.pos != p.bytes.len() {
            return Err(format!("unexpected text after the value at byte {}", p.pos));
        }
        Ok(value)
    }

    struct Parser<'a> {
        bytes: &'a [u8],
        pos: usize,
    }

    impl Parser<'_> {
        fn skip_ws(&mut self) {
            while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.pos) {
                self.pos += 1;
            }
        }

        fn expect(&mut self, b: u8) -> Result<(), String> {
            self.skip_ws();
            if self.bytes.get(self.pos) == Some(&b) {
                self.pos += 1;
                Ok(())
            } else {
                Err(format!("expected `{}` at byte {}", b as char, self.pos))
            }
        }

        fn literal(&mut self, word: &str, value: Value) -> Result<Value, String> {
            if self.bytes[self.pos..].starts_with(word.as_bytes()) {
                self.pos += word.len();
                Ok(value)
            } else {
                Err(format!("unexpected character at byte {}", self.pos))
            }
        }

        fn value(&mut self, depth: usize) -> Result<Value, String> {
            if depth > MAX_DEPTH {
                return Err(format!("nested deeper than {MAX_DEPTH} levels"));
            }
            self.skip_ws();
            match self.bytes.get(self.pos) {
                None => Err("unexpected end of the text".to_owned()),
                Some(b'[') => {
                    self.pos += 1;
                    let mut items = Vec::new();
                    self.skip_ws();
                    if self.bytes.get(self.pos) == Some(&b']') {
                        self.pos += 1;
                        return Ok(Value::Array(items));
                    }
                    loop {
                        items.push(self.value(depth + 1)?);
                        self.skip_ws();
                        match self.bytes.get(self.pos) {
                            Some(b',') => self.pos += 1,
                            Some(b']') => {
                                self.pos += 1;
                                return Ok(Value::Array(items));
                            }
                            _ => return Err(format!("expected `,` or `]` at byte {}", self.pos)),
                        }
                    }
                }
                Some(b'{') => {
                    self.pos += 1;
                    let mut fields = Vec::new();
                    self.skip_ws();
                    if self.bytes.get(self.pos) == Some(&b'}') {
                        self.pos += 1;
                        return Ok(Value::Object(fields));
                    }
                    loop {
                        self.skip_ws();
                        if self.bytes.get(self.pos) != Some(&b'"') {
                            return Err(format!("expected a field name at byte {}", self.pos));
                        }
                        let name = self.string()?;
                        self.expect(b':')?;
                        let value = self.value(depth + 1)?;
                        fields.push((name, value));
                        self.skip_ws();
                        match self.bytes.get(self.pos) {
                            Some(b',') => self.pos += 1,
                            Some(b'}') => {
                                self.pos += 1;
                                return Ok(Value::Object(fields));
                            }
                            _ => return Err(format!("expected `,` or `}}` at byte {}", self.pos)),
                        }
                    }
                }
                Some(b'"') => self.string().map(Value::String),
                Some(b't') => self.literal("true", Value::Bool(true)),
                Some(b'f') => self.literal("false", Value::Bool(false)),
                Some(b'n') => self.literal("null", Value::Null),
                Some(b'-' | b'0'..=b'9') => {
                    let start = self.pos;
                    while let Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') =
                        self.bytes.get(self.pos)
                    {
                        self.pos += 1;
                    }
                    let text = std::str::from_utf8(&self.bytes[start..self.pos])
                        .map_err(|_| format!("bad number at byte {start}"))?;
                    Ok(Value::Number(text.to_owned()))
                }
                Some(_) => Err(format!("unexpected character at byte {}", self.pos)),
            }
        }

        /// A string starting at the opening quote.
        fn string(&mut self) -> Result<String, String> {
            let start = self.pos;
            self.pos += 1;
            let mut out = Vec::new();
            loop {
                let Some(&b) = self.bytes.get(self.pos) else {
                    return Err(format!("the string at byte {start} does not end"));
                };
                self.pos += 1;
                match b {
                    b'"' => break,
                    b'\\' => {
                        let Some(&e) = self.bytes.get(self.pos) else {
                            return Err(format!("the string at byte {start} does not end"));
                        };
                        self.pos += 1;
                        let c = match e {
                            b'"' => '"',
                            b'\\' => '\\',
                            b'/' => '/',
                            b'b' => '\u{8}',
                            b'f' => '\u{c}',
                            b'n' => '\n',
                            b'r' => '\r',
                            b't' => '\t',
                            b'u' => self.unicode_escape()?,
                            _ => return Err(format!("bad escape at byte {}", self.pos - 1)),
                        };
                        let mut buf = [0; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                    b if b < 0x20 => {
                        return Err(format!("control character in the string at byte {start}"));
                    }
                    b => out.push(b),
                }
            }
            String::from_utf8(out).map_err(|_| format!("the string at byte {start} is not UTF-8"))
        }

        fn hex4(&mut self) -> Result<u32, String> {
            let digits = self
                .bytes
                .get(self.pos..self.pos + 4)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| u32::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("bad \\u escape at byte {}", self.pos))?;
            self.pos += 4;
            Ok(digits)
        }

        /// The character of a `\uXXXX` escape (after the `u`), joining a surrogate pair.
        fn unicode_escape(&mut self) -> Result<char, String> {
            let high = self.hex4()?;
            let code = if (0xD800..0xDC00).contains(&high) {
                if !self.bytes[self.pos..].starts_with(b"\\u") {
                    return Err(format!("lone surrogate at byte {}", self.pos));
                }
                self.pos += 2;
                let low = self.hex4()?;
                if !(0xDC00..0xE000).contains(&low) {
                    return Err(format!("bad surrogate pair at byte {}", self.pos));
                }
                0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
            } else {
                high
            };
            char::from_u32(code).ok_or_else(|| format!("bad \\u escape at byte {}", self.pos))
        }
    }
}

/// Builds the Arrow batch for rows that are already sorted by `seq`.
pub fn to_record_batch(rows: &[Row]) -> RecordBatch {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(rows.iter().map(|r| r.seq).collect::<Int64Array>()),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.ts_us))
                .with_timezone("UTC"),
        ),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.site.as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.gateway.as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.device.as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.tag.as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(rows.iter().map(|r| r.value).collect::<Float64Array>()),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.quality.as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            rows.iter()
                .map(|r| r.unit.as_deref())
                .collect::<StringArray>(),
        ),
        Arc::new(
            rows.iter()
                .map(|r| r.value_text.as_deref())
                .collect::<StringArray>(),
        ),
    ];
    RecordBatch::try_new(schema(), columns)
        .expect("columns are built from the contract schema, in its order and with its types")
}

/// Checks a batch's schema against the contract version its column count names (v1 has 9
/// columns, v2 and v3 10) and returns that version (2 for 10 columns). Same names, order, types and nullability are
/// required (a non-nullable column in the file where the contract allows nulls is accepted).
pub fn check_schema(found: &Schema) -> Result<u32, ContractError> {
    let v1_columns = v1_fields().len();
    let version = if found.fields().len() == v1_columns {
        1
    } else {
        MAIN_LANE_VERSION
    };
    check_schema_of_version(found, version)?;
    Ok(version)
}

/// Checks a batch's schema against contract `version` exactly (a file whose footer names its
/// version must have that version's columns).
pub fn check_schema_of_version(found: &Schema, version: u32) -> Result<(), ContractError> {
    let schema_err = |detail: String| ContractError::Schema { version, detail };
    let want = schema_of_version(version).ok_or_else(|| {
        schema_err(format!(
            "this reader knows contract versions {OLDEST_READABLE_VERSION} to {CONTRACT_VERSION}"
        ))
    })?;
    if found.fields().len() != want.fields().len() {
        let mut detail = format!(
            "{} columns found, {} expected",
            found.fields().len(),
            want.fields().len()
        );
        // A column the version does not have, or one it misses, is worth naming.
        if let Some(extra) = found
            .fields()
            .iter()
            .find(|f| want.field_with_name(f.name()).is_err())
        {
            let _ = write!(detail, " (`{}` is not a v{version} column)", extra.name());
        } else if let Some(missing) = want
            .fields()
            .iter()
            .find(|w| found.field_with_name(w.name()).is_err())
        {
            let _ = write!(detail, " (`{}` is missing)", missing.name());
        }
        return Err(schema_err(detail));
    }
    for (f, w) in found.fields().iter().zip(want.fields()) {
        if f.name() != w.name() {
            return Err(schema_err(format!(
                "column `{}` found where `{}` belongs",
                f.name(),
                w.name()
            )));
        }
        if f.data_type() != w.data_type() {
            return Err(schema_err(format!(
                "column `{}` has type {}, expected {}",
                f.name(),
                f.data_type(),
                w.data_type()
            )));
        }
        if f.is_nullable() && !w.is_nullable() {
            return Err(schema_err(format!(
                "column `{}` is nullable, expected non-null",
                f.name()
            )));
        }
    }
    Ok(())
}

/// A batch of any accepted contract version in the current [`schema`]: the columns a later
/// version added are appended as nulls (a v1 batch gets a null `value_text`), and schema
/// metadata the file carried is dropped. Checks the schema on the way.
pub fn upgrade(batch: &RecordBatch) -> Result<RecordBatch, ContractError> {
    let version = check_schema(&batch.schema())?;
    let mut columns = batch.columns().to_vec();
    if version == 1 {
        columns.push(Arc::new(StringArray::new_null(batch.num_rows())));
    }
    RecordBatch::try_new(schema(), columns).map_err(|e| ContractError::Schema {
        version,
        detail: e.to_string(),
    })
}

/// Reads rows back from a batch of any accepted contract version, checking the schema, the
/// sort order, the gateway, the quality names and that no row carries both a number and a
/// text on the way.
pub fn rows_from_batch(batch: &RecordBatch) -> Result<Vec<Row>, ContractError> {
    let batch = &upgrade(batch)?;
    let col = |i: usize| batch.column(i).as_ref();
    let downcast_err = |name: &str| ContractError::Schema {
        version: CONTRACT_VERSION,
        detail: format!("column `{name}` could not be read as its contract type"),
    };
    let seq = col(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .ok_or_else(|| downcast_err(column::SEQ))?;
    let ts = col(1)
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .ok_or_else(|| downcast_err(column::TS))?;
    let strings = |i: usize, name: &str| {
        col(i)
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| downcast_err(name))
    };
    let site = strings(2, column::SITE)?;
    let gateway = strings(3, column::GATEWAY)?;
    let device = strings(4, column::DEVICE)?;
    let tag = strings(5, column::TAG)?;
    let value = col(6)
        .as_any()
        .downcast_ref::<Float64Array>()
        .ok_or_else(|| downcast_err(column::VALUE))?;
    let quality = strings(7, column::QUALITY)?;
    let unit = strings(8, column::UNIT)?;
    let value_text = strings(9, column::VALUE_TEXT)?;

    let mut rows = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let q = quality.value(i);
        let quality = Quality::parse(q).ok_or_else(|| ContractError::BadValue {
            column: column::QUALITY,
            value: q.to_owned(),
            row: i,
        })?;
        let row = Row {
            seq: seq.value(i),
            ts_us: ts.value(i),
            site: site.value(i).to_owned(),
            gateway: gateway.value(i).to_owned(),
            device: device.value(i).to_owned(),
            tag: tag.value(i).to_owned(),
            value: (!value.is_null(i)).then(|| value.value(i)),
            quality,
            unit: (!unit.is_null(i)).then(|| unit.value(i).to_owned()),
            value_text: (!value_text.is_null(i)).then(|| value_text.value(i).to_owned()),
        };
        if row.value.is_some() && row.value_text.is_some() {
            return Err(ContractError::ValueAndText {
                row: i,
                seq: row.seq,
            });
        }
        if let Some(prev) = rows.last() {
            let prev: &Row = prev;
            if row.seq <= prev.seq {
                return Err(ContractError::Unsorted {
                    prev: prev.seq,
                    next: row.seq,
                });
            }
            if row.gateway != prev.gateway {
                return Err(ContractError::MixedGateway {
                    expected: prev.gateway.clone(),
                    found: row.gateway,
                });
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, gateway: &str) -> Row {
        Row {
            seq,
            ts_us: 1_700_000_000_000_000 + seq,
            site: "plant-a".into(),
            gateway: gateway.into(),
            device: "press-3".into(),
            tag: "oil_temp".into(),
            value: (seq % 2 == 0).then_some(seq as f64 * 0.5),
            quality: if seq % 2 == 0 {
                Quality::Good
            } else {
                Quality::Bad
            },
            unit: Some("degC".into()),
            value_text: None,
        }
    }

    /// A string tag's reading: text in `value_text`, `value` null.
    fn text_row(seq: i64, text: &str) -> Row {
        Row {
            tag: "recipe".into(),
            value: None,
            quality: Quality::Good,
            unit: None,
            value_text: Some(text.into()),
            ..row(seq, "gw-1")
        }
    }

    #[test]
    fn rows_survive_a_round_trip_through_arrow() {
        let mut rows: Vec<Row> = (1..=5).map(|s| row(s, "gw-1")).collect();
        rows.push(text_row(6, "PN-4471 rev B"));
        rows.push(text_row(7, ""));
        let batch = to_record_batch(&rows);
        assert_eq!(batch.schema(), schema());
        assert_eq!(check_schema(&batch.schema()), Ok(2));
        assert_eq!(rows_from_batch(&batch).unwrap(), rows);
    }

    #[test]
    fn v2_adds_value_text_as_the_last_nullable_column() {
        let v1 = schema_of_version(1).unwrap();
        let v2 = schema();
        assert_eq!(v1.fields().len() + 1, v2.fields().len());
        // Every v1 column keeps its position, so positional v1 readers still find them.
        for (a, b) in v1.fields().iter().zip(v2.fields()) {
            assert_eq!(a, b);
        }
        let last = v2.field(v2.fields().len() - 1);
        assert_eq!(
            (last.name().as_str(), last.data_type(), last.is_nullable()),
            (column::VALUE_TEXT, &DataType::Utf8, true)
        );
        assert_eq!(schema_of_version(CONTRACT_VERSION), Some(schema()));
        assert_eq!(schema_of_version(0), None);
        assert_eq!(
            schema_of_version(3),
            Some(schema()),
            "v3 changed keys, not columns"
        );
        assert_eq!(schema_of_version(4), None);
    }

    /// A v1 batch as a v1 producer wrote it: the nine columns, no `value_text`.
    fn v1_batch(rows: &[Row]) -> RecordBatch {
        let current = to_record_batch(rows);
        let columns = current.columns()[..9].to_vec();
        RecordBatch::try_new(schema_of_version(1).unwrap(), columns).unwrap()
    }

    #[test]
    fn v1_batches_stay_valid_and_read_with_a_null_value_text() {
        let rows: Vec<Row> = (1..=4).map(|s| row(s, "gw-1")).collect();
        let old = v1_batch(&rows);
        assert_eq!(check_schema(&old.schema()), Ok(1));
        assert_eq!(rows_from_batch(&old).unwrap(), rows);
        let upgraded = upgrade(&old).unwrap();
        assert_eq!(upgraded.schema(), schema());
        assert_eq!(upgraded.column(9).null_count(), 4);
        assert_eq!(upgraded, to_record_batch(&rows));
    }

    #[test]
    fn a_schema_must_match_the_version_its_footer_names() {
        let rows = [row(1, "gw-1")];
        assert_eq!(
            check_schema_of_version(&v1_batch(&rows).schema(), 1),
            Ok(())
        );
        assert_eq!(
            check_schema_of_version(&to_record_batch(&rows).schema(), 1)
                .unwrap_err()
                .to_string(),
            "batch schema does not match contract v1: 10 columns found, 9 expected (`value_text` is not a v1 column); the producer must write the columns listed in docs/batch-contract.md"
        );
        assert_eq!(
            check_schema_of_version(&v1_batch(&rows).schema(), 2)
                .unwrap_err()
                .to_string(),
            "batch schema does not match contract v2: 9 columns found, 10 expected (`value_text` is missing); the producer must write the columns listed in docs/batch-contract.md"
        );
        // `value_text` in place of `unit`: same count, wrong names.
        let mut fields: Vec<Field> = schema().fields().iter().map(|f| (**f).clone()).collect();
        fields.swap(8, 9);
        assert!(
            check_schema(&Schema::new(fields))
                .unwrap_err()
                .to_string()
                .contains("column `value_text` found where `unit` belongs")
        );
    }

    #[test]
    fn a_row_with_both_a_number_and_a_text_is_refused() {
        let both = Row {
            value: Some(1.0),
            ..text_row(3, "A")
        };
        let batch = to_record_batch(&[row(2, "gw-1"), both]);
        let err = rows_from_batch(&batch).unwrap_err();
        assert_eq!(err, ContractError::ValueAndText { row: 1, seq: 3 });
        assert_eq!(
            err.to_string(),
            "row 1 (seq 3) has both a number in `value` and text in `value_text`; a reading carries one or the other"
        );
    }

    #[test]
    fn keys_sort_in_seq_order_and_parse_back() {
        let keys: Vec<String> = [9, 10, 100, 2]
            .iter()
            .map(|s| BatchKey::new("gw-1", *s).to_key("raw/"))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            vec![
                "raw/gateway=gw-1/00000000000000000002.parquet",
                "raw/gateway=gw-1/00000000000000000009.parquet",
                "raw/gateway=gw-1/00000000000000000010.parquet",
                "raw/gateway=gw-1/00000000000000000100.parquet",
            ]
        );
        for k in &keys {
            assert_eq!(BatchKey::parse("raw/", k).unwrap().to_key("raw/"), *k);
        }
    }

    #[test]
    fn fresh_lane_keys_live_in_their_own_folder_and_parse_back() {
        let key = BatchKey::fresh("gw-1", 4097);
        let text = key.to_key("raw/");
        assert_eq!(text, "raw/gateway=gw-1/fresh/00000000000000004097.parquet");
        assert_eq!(BatchKey::parse("raw/", &text).unwrap(), key);
        assert_eq!(BatchKey::parse("raw/", &text).unwrap().lane, Lane::Fresh);
        let main = BatchKey::new("gw-1", 4097).to_key("raw/");
        assert_eq!(BatchKey::parse("raw/", &main).unwrap().lane, Lane::Main);
        assert_eq!(
            BatchKey::lane_prefix("raw/", "gw-1", Lane::Fresh),
            "raw/gateway=gw-1/fresh/"
        );
        assert_eq!(Lane::Fresh.contract_version(), 3);
        assert_eq!(Lane::Main.contract_version(), 2);
        assert!(schema_of_version(3).is_some());
        assert!(schema_of_version(4).is_none());
    }

    #[test]
    fn foreign_keys_are_rejected() {
        for k in [
            "raw/gateway=gw-1/12.parquet",
            "raw/gateway=GW/00000000000000000002.parquet",
            "raw/other/00000000000000000002.parquet",
            "raw/gateway=gw-1/00000000000000000002.csv",
            "archive/gateway=gw-1/00000000000000000002.parquet",
            "raw/gateway=gw-1/fresh/12.parquet",
            "raw/gateway=gw-1/stale/00000000000000000002.parquet",
            "raw/gateway=gw-1/fresh/fresh/00000000000000000002.parquet",
        ] {
            assert_eq!(
                BatchKey::parse("raw/", k),
                Err(ContractError::Key(k.into())),
                "{k}"
            );
        }
    }

    #[test]
    fn gateway_ids_must_be_key_safe() {
        assert!(check_gateway_id("gw-line1_a").is_ok());
        for bad in ["", "-gw", "Gw", "gw/1", "gw 1", "gw'1", &"g".repeat(65)] {
            assert!(check_gateway_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unsorted_and_mixed_batches_are_refused() {
        let batch = to_record_batch(&[row(2, "gw-1"), row(1, "gw-1")]);
        assert_eq!(
            rows_from_batch(&batch),
            Err(ContractError::Unsorted { prev: 2, next: 1 })
        );
        let batch = to_record_batch(&[row(1, "gw-1"), row(2, "gw-2")]);
        assert!(matches!(
            rows_from_batch(&batch),
            Err(ContractError::MixedGateway { .. })
        ));
    }

    fn gap(first_seq: i64, last_seq: i64, readings: u64, reason: GapReason) -> Gap {
        Gap {
            first_seq,
            last_seq,
            readings,
            reason,
            detected_at_us: 1_700_000_000_123_456,
        }
    }

    #[test]
    fn gaps_are_written_in_the_documented_form_and_read_back() {
        let gaps = vec![
            gap(5, 9, 5, GapReason::BufferFull),
            gap(12, 12, 1, GapReason::MaxAge),
            gap(20, 29, 10, GapReason::DamagedBuffer),
        ];
        let text = gaps_to_json(&gaps);
        assert_eq!(
            text,
            "[{\"first_seq\":5,\"last_seq\":9,\"readings\":5,\"reason\":\"buffer_full\",\"detected_at_us\":1700000000123456},\
             {\"first_seq\":12,\"last_seq\":12,\"readings\":1,\"reason\":\"max_age\",\"detected_at_us\":1700000000123456},\
             {\"first_seq\":20,\"last_seq\":29,\"readings\":10,\"reason\":\"damaged_buffer\",\"detected_at_us\":1700000000123456}]"
        );
        assert_eq!(gaps_from_json(&text).unwrap(), gaps);
        assert_eq!(gaps_to_json(&[]), "[]");
        assert_eq!(gaps_from_json("[]").unwrap(), []);
    }

    #[test]
    fn gap_readers_accept_any_field_order_spacing_and_unknown_fields_and_reasons() {
        let text = r#" [ { "reason" : "sensor_\u0066ault\n", "detected_at_us": -1,
            "extra": {"nested": [1, 2.5e3, null, true]}, "readings": 2, "last_seq": 7,
            "first_seq": 3 } ] "#;
        assert_eq!(
            gaps_from_json(text).unwrap(),
            vec![Gap {
                first_seq: 3,
                last_seq: 7,
                readings: 2,
                reason: GapReason::Other("sensor_fault\n".into()),
                detected_at_us: -1,
            }]
        );
        // A reason that needs escaping survives the round trip.
        let odd = vec![gap(1, 1, 1, GapReason::Other("a \"b\"\\\t\u{1}é".into()))];
        assert_eq!(gaps_from_json(&gaps_to_json(&odd)).unwrap(), odd);
    }

    #[test]
    fn malformed_gap_lists_name_the_gap_and_the_field() {
        let cases = [
            ("{}", "expected a JSON array"),
            ("[1]", "gap 0 is not a JSON object"),
            (
                r#"[{"first_seq":1,"last_seq":2,"readings":2,"reason":"max_age"}]"#,
                "gap 0 has no `detected_at_us`",
            ),
            (
                r#"[{"first_seq":1.5,"last_seq":2,"readings":1,"reason":"max_age","detected_at_us":0}]"#,
                "gap 0: `first_seq` = 1.5 is not a whole number",
            ),
            (
                r#"[{"first_seq":4,"last_seq":2,"readings":1,"reason":"max_age","detected_at_us":0}]"#,
                "gap 0: seq range 4..=2 is empty or starts below 1",
            ),
            (
                r#"[{"first_seq":1,"last_seq":2,"readings":3,"reason":"max_age","detected_at_us":0}]"#,
                "gap 0: 3 readings do not fit the seq range 1..=2",
            ),
            (
                r#"[{"first_seq":1,"last_seq":2,"readings":2,"reason":7,"detected_at_us":0}]"#,
                "gap 0: `reason` is not a string",
            ),
            ("[{\"first_seq\":1", "expected `,` or `}` at byte 15"),
            ("[] x", "unexpected text after the value at byte 3"),
        ];
        for (text, detail) in cases {
            assert_eq!(
                gaps_from_json(text),
                Err(GapsError {
                    detail: detail.to_owned()
                }),
                "{text}"
            );
        }
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert!(gaps_from_json(&deep).is_err());
        assert_eq!(
            GapsError {
                detail: "gap 0 is not a JSON object".into()
            }
            .to_string(),
            "`plantline.gaps` metadata is not a valid gap list: gap 0 is not a JSON object; see docs/batch-contract.md for its format"
        );
    }

    #[test]
    fn a_foreign_schema_is_named_in_the_error() {
        let foreign = Schema::new(vec![Field::new("seq", DataType::Utf8, false)]);
        let err = check_schema(&foreign).unwrap_err();
        assert_eq!(
            err.to_string(),
            "batch schema does not match contract v2: 1 columns found, 10 expected (`ts` is missing); the producer must write the columns listed in docs/batch-contract.md"
        );
        let mut fields: Vec<Field> = schema().fields().iter().map(|f| (**f).clone()).collect();
        fields[6] = Field::new("value", DataType::Utf8, true);
        let err = check_schema(&Schema::new(fields)).unwrap_err();
        assert!(
            err.to_string()
                .contains("column `value` has type Utf8, expected Float64"),
            "{err}"
        );
    }
}
