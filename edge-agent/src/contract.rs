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
//! - `value` is null exactly when the reading carries no usable number (`quality` is `bad`).

use std::fmt;
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Version of the batch contract written into every Parquet file's key-value metadata.
pub const CONTRACT_VERSION: u32 = 1;

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
}

/// The Arrow schema of a batch. Timestamps are microseconds since the Unix epoch in UTC, which
/// maps to Delta's `timestamp` type and Snowflake's `TIMESTAMP_TZ` without loss.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
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
    ]))
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
}

/// Problems with a batch, as the consumer sees them.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ContractError {
    #[error(
        "batch schema does not match contract v{CONTRACT_VERSION}: {detail}; the producer must write the columns listed in docs/batch-contract.md"
    )]
    Schema { detail: String },
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

/// The object key of a batch: `<prefix>gateway=<id>/<first_seq as 20 digits>.parquet`.
///
/// The zero padding makes lexicographic listing order equal `seq` order, so a consumer can list
/// with `start-after` and read batches in sequence. `prefix` is used verbatim (give it a trailing
/// `/` if it names a folder).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BatchKey {
    pub gateway: String,
    pub first_seq: i64,
}

impl BatchKey {
    pub fn new(gateway: &str, first_seq: i64) -> Self {
        Self {
            gateway: gateway.to_owned(),
            first_seq,
        }
    }

    /// The folder (below the prefix) that holds all batches of one gateway.
    pub fn gateway_prefix(prefix: &str, gateway: &str) -> String {
        format!("{prefix}gateway={gateway}/")
    }

    /// The full object key below `prefix`.
    pub fn to_key(&self, prefix: &str) -> String {
        format!(
            "{}{:020}.parquet",
            Self::gateway_prefix(prefix, &self.gateway),
            self.first_seq
        )
    }

    /// Parses a full object key written by [`BatchKey::to_key`] with the same `prefix`.
    pub fn parse(prefix: &str, key: &str) -> Result<Self, ContractError> {
        let bad = || ContractError::Key(key.to_owned());
        let rest = key.strip_prefix(prefix).ok_or_else(bad)?;
        let rest = rest.strip_prefix("gateway=").ok_or_else(bad)?;
        let (gateway, file) = rest.split_once('/').ok_or_else(bad)?;
        check_gateway_id(gateway).map_err(|_| bad())?;
        let digits = file.strip_suffix(".parquet").ok_or_else(bad)?;
        if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let first_seq = digits.parse().map_err(|_| bad())?;
        Ok(Self::new(gateway, first_seq))
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
    ];
    RecordBatch::try_new(schema(), columns)
        .expect("columns are built from the contract schema, in its order and with its types")
}

/// Checks a batch's schema against the contract: same names, order, types and nullability
/// (a non-nullable column in the file where the contract allows nulls is accepted).
pub fn check_schema(found: &Schema) -> Result<(), ContractError> {
    let want = schema();
    if found.fields().len() != want.fields().len() {
        return Err(ContractError::Schema {
            detail: format!(
                "{} columns found, {} expected",
                found.fields().len(),
                want.fields().len()
            ),
        });
    }
    for (f, w) in found.fields().iter().zip(want.fields()) {
        if f.name() != w.name() {
            return Err(ContractError::Schema {
                detail: format!("column `{}` found where `{}` belongs", f.name(), w.name()),
            });
        }
        if f.data_type() != w.data_type() {
            return Err(ContractError::Schema {
                detail: format!(
                    "column `{}` has type {}, expected {}",
                    f.name(),
                    f.data_type(),
                    w.data_type()
                ),
            });
        }
        if f.is_nullable() && !w.is_nullable() {
            return Err(ContractError::Schema {
                detail: format!("column `{}` is nullable, expected non-null", f.name()),
            });
        }
    }
    Ok(())
}

/// Reads rows back from a batch, checking the schema, the sort order, the gateway and the
/// quality names on the way.
pub fn rows_from_batch(batch: &RecordBatch) -> Result<Vec<Row>, ContractError> {
    check_schema(&batch.schema())?;
    let col = |i: usize| batch.column(i).as_ref();
    let downcast_err = |name: &str| ContractError::Schema {
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
        };
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
        }
    }

    #[test]
    fn rows_survive_a_round_trip_through_arrow() {
        let rows: Vec<Row> = (1..=5).map(|s| row(s, "gw-1")).collect();
        let batch = to_record_batch(&rows);
        assert_eq!(batch.schema(), schema());
        assert_eq!(rows_from_batch(&batch).unwrap(), rows);
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
    fn foreign_keys_are_rejected() {
        for k in [
            "raw/gateway=gw-1/12.parquet",
            "raw/gateway=GW/00000000000000000002.parquet",
            "raw/other/00000000000000000002.parquet",
            "raw/gateway=gw-1/00000000000000000002.csv",
            "archive/gateway=gw-1/00000000000000000002.parquet",
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

    #[test]
    fn a_foreign_schema_is_named_in_the_error() {
        let foreign = Schema::new(vec![Field::new("seq", DataType::Utf8, false)]);
        let err = check_schema(&foreign).unwrap_err();
        assert_eq!(
            err.to_string(),
            "batch schema does not match contract v1: 1 columns found, 9 expected; the producer must write the columns listed in docs/batch-contract.md"
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
