//! The `gaps` table: `seq` ranges of a gateway that will never reach the readings table, with
//! the reason, so the data team can tell missing data from quiet sensors.
//!
//! # Invariants
//! - One row per (`gateway`, `first_seq`): a row is appended only when its `first_seq` is above
//!   the gateway's `txn` watermark in this table (and above its readings watermark), and the
//!   watermark moves past it in the same commit. A replayed or retried pass adds nothing twice.
//! - The collector commits a gateway's gap rows before the readings commit that closes them,
//!   so a crash in between loses none: the retry finds them decided by the watermark.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, TimestampMicrosecondType};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::DeltaTable;
use deltalake::kernel::Version;
use url::Url;

use super::commit::CommitFailure;
use super::open::TableSpec;
use super::side_table::SideTable;
use super::table::DeltaError;

/// `reason` of a jump in `seq` the collector saw and nothing explains.
pub const REASON_SEQ_JUMP: &str = "seq_jump";
/// `reason` of a range whose batch file is in the quarantine.
pub const REASON_QUARANTINED: &str = "quarantined";

/// One row of the gaps table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapRow {
    /// The gateway whose `seq` range is missing.
    pub gateway: String,
    /// First missing `seq`.
    pub first_seq: i64,
    /// Last missing `seq`.
    pub last_seq: i64,
    /// Readings lost: the agent's count for its own records, `last_seq - first_seq + 1` for
    /// ranges the collector found.
    pub readings: i64,
    /// `seq_jump`, `quarantined`, or the agent's reason (`buffer_full`, `max_age`,
    /// `damaged_buffer`, ...).
    pub reason: String,
    /// When the gap was found, microseconds since the epoch, UTC: the agent's time for its own
    /// records, the collector's otherwise.
    pub detected_at_us: i64,
    /// The raw-zone key of the batch that revealed the gap (the one after a jump, or the one
    /// carrying the agent's record); the quarantine key for `quarantined`.
    pub file_key: String,
}

/// The gaps table's columns.
pub fn gaps_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(vec![
            Field::new("gateway", DataType::Utf8, false),
            Field::new("first_seq", DataType::Int64, false),
            Field::new("last_seq", DataType::Int64, false),
            Field::new("readings", DataType::Int64, false),
            Field::new("reason", DataType::Utf8, false),
            Field::new(
                "detected_at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("file_key", DataType::Utf8, false),
        ]))
    });
    SCHEMA.clone()
}

const GAPS: TableSpec = TableSpec {
    name: "gaps",
    comment: "plantline gaps: seq ranges of a gateway that will never arrive, with the reason",
    schema: gaps_schema,
    added_columns: &[],
};

/// The gaps Delta table, loaded at its latest version.
#[derive(Debug)]
pub struct GapsTable {
    inner: SideTable,
}

impl GapsTable {
    /// Opens the table at `url`, creating it if nothing is there yet.
    pub async fn open_or_create(
        url: &Url,
        storage_options: &HashMap<String, String>,
    ) -> Result<Self, DeltaError> {
        Ok(Self {
            inner: SideTable::open_or_create(url, storage_options, GAPS).await?,
        })
    }

    /// The table URL.
    pub fn url(&self) -> &Url {
        self.inner.url()
    }

    /// The loaded table version.
    pub fn version(&self) -> Option<Version> {
        self.inner.version()
    }

    /// The underlying delta-rs table.
    pub fn delta_table(&self) -> &DeltaTable {
        self.inner.delta_table()
    }

    /// Loads the newest version.
    pub async fn reload(&mut self) -> Result<(), DeltaError> {
        self.inner.reload().await
    }

    /// The highest `first_seq` of `gateway` this table has decided (recorded or passed).
    pub async fn watermark(&self, gateway: &str) -> Result<Option<i64>, DeltaError> {
        self.inner.watermark(gateway).await
    }

    /// Appends `rows` (all of `gateway`) and moves its watermark to `watermark`.
    pub(crate) async fn commit(
        &mut self,
        gateway: &str,
        rows: &[GapRow],
        watermark: i64,
    ) -> Result<Version, CommitFailure> {
        self.inner.commit(gateway, to_batch(rows), watermark).await
    }

    /// Every gap in the latest version, sorted by gateway and `first_seq`. For small tables
    /// (tests, summaries).
    pub async fn current_gaps(&mut self) -> Result<Vec<GapRow>, DeltaError> {
        self.inner.reload().await?;
        let url = self.inner.url().to_string();
        let batches = self.inner.read_matching(None, "first_seq", None).await?;
        let mut rows = Vec::new();
        for batch in &batches {
            rows.extend(from_batch(batch).map_err(|message| DeltaError::ReadFile {
                table: url.clone(),
                file: "(a data file)".to_owned(),
                message,
            })?);
        }
        rows.sort_by(|a, b| (&a.gateway, a.first_seq).cmp(&(&b.gateway, b.first_seq)));
        Ok(rows)
    }
}

fn to_batch(rows: &[GapRow]) -> RecordBatch {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.gateway.as_str()),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.first_seq),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.last_seq),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.readings),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.reason.as_str()),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.detected_at_us))
                .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.file_key.as_str()),
        )),
    ];
    RecordBatch::try_new(gaps_schema(), columns)
        .expect("columns are built from the gaps schema, in its order and with its types")
}

fn from_batch(batch: &RecordBatch) -> Result<Vec<GapRow>, String> {
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| format!("column `{name}` is missing"))
    };
    let strings = |name: &str| -> Result<StringArray, String> {
        column(name)?
            .as_string_opt::<i32>()
            .cloned()
            .ok_or_else(|| format!("column `{name}` is not a string"))
    };
    let longs = |name: &str| -> Result<Int64Array, String> {
        column(name)?
            .as_primitive_opt::<Int64Type>()
            .cloned()
            .ok_or_else(|| format!("column `{name}` is not a long"))
    };
    let (gateway, reason, file_key) = (
        strings("gateway")?,
        strings("reason")?,
        strings("file_key")?,
    );
    let (first, last, readings) = (longs("first_seq")?, longs("last_seq")?, longs("readings")?);
    let detected = column("detected_at")?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .cloned()
        .ok_or("column `detected_at` is not a timestamp")?;
    Ok((0..batch.num_rows())
        .map(|i| GapRow {
            gateway: gateway.value(i).to_owned(),
            first_seq: first.value(i),
            last_seq: last.value(i),
            readings: readings.value(i),
            reason: reason.value(i).to_owned(),
            detected_at_us: detected.value(i),
            file_key: file_key.value(i).to_owned(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_rows_survive_a_round_trip_through_arrow() {
        let rows = vec![GapRow {
            gateway: "gw-1".into(),
            first_seq: 4,
            last_seq: 7,
            readings: 4,
            reason: REASON_SEQ_JUMP.into(),
            detected_at_us: 1_700_000_000_000_000,
            file_key: "raw/gateway=gw-1/00000000000000000008.parquet".into(),
        }];
        assert_eq!(from_batch(&to_batch(&rows)).unwrap(), rows);
    }
}
