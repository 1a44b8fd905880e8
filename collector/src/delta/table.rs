//! The readings table: opening (or creating, or evolving) it and appending one gateway's rows
//! together with its new watermark in a single commit.
//!
//! # Partitioning by date
//! A readings table this collector creates is partitioned by [`DATE_COLUMN`], the UTC calendar
//! day of `ts` (Delta type `date`), so readers that filter by time skip whole folders
//! (`date=2026-05-04/`). The collector derives the column while committing: the agent's batches
//! do not carry it, and the data files do not either (Delta keeps partition values in the log).
//! One batch whose readings straddle midnight UTC becomes one file per day in the same commit.
//! A table created before partitioning (no partition columns) is written as it is, without the
//! column; a table partitioned by anything else is refused. Moving an old table to the
//! partitioned layout is a new table plus a backfill (docs/collector-operations.md).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use arrow_array::{
    Array, ArrayRef, Date32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    new_null_array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use deltalake::kernel::Version;
use deltalake::{DeltaTable, DeltaTableError};
use edge_agent::contract;
use tracing::{debug, warn};
use url::Url;

use super::commit::{self, CommitFailure, MarkUpdate};
use super::open::{self, TableSpec};
use super::watermark::{self, FreshRange, Marks};

/// The nullable column the row-level `flag` rules write: the names of the rules a kept row
/// broke, comma-separated in config order; null when it broke none.
pub const DQ_FLAGS_COLUMN: &str = "dq_flags";

/// The nullable column holding a string tag's text: batch contract v2's `value_text`, null for
/// numbers, for bad readings and for every row that came in a v1 batch.
pub const VALUE_TEXT_COLUMN: &str = contract::column::VALUE_TEXT;

/// The readings table's columns in the order a table gets them over its life (Delta adds a
/// column at the end): batch contract v1's, then [`DQ_FLAGS_COLUMN`], then [`VALUE_TEXT_COLUMN`].
/// A new table is created with the same order, so every readings table looks alike. Readers
/// go by name.
pub fn readings_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let v1 = contract::schema_of_version(1).expect("contract v1 exists");
        let mut fields: Vec<Field> = v1.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(DQ_FLAGS_COLUMN, DataType::Utf8, true));
        let current = contract::schema();
        let value_text = current
            .field_with_name(VALUE_TEXT_COLUMN)
            .expect("the contract has value_text since v2");
        fields.push(value_text.clone());
        Arc::new(Schema::new(fields))
    });
    SCHEMA.clone()
}

/// The partition column of readings tables created by this collector: the UTC calendar day of
/// `ts`, derived while writing (see the module doc).
pub const DATE_COLUMN: &str = "date";

/// [`DATE_COLUMN`] as an Arrow field: Delta type `date`, never null (`ts` never is).
pub fn date_field() -> Field {
    Field::new(DATE_COLUMN, DataType::Date32, false)
}

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// `batch` (in [`readings_schema`]) with [`DATE_COLUMN`] appended: the UTC day of each `ts`.
pub(crate) fn with_date(batch: &RecordBatch) -> RecordBatch {
    let ts = batch
        .column_by_name(contract::column::TS)
        .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
        .expect("readings batches carry the contract's ts: Timestamp(µs, UTC)");
    // Days since the epoch; `div_euclid` puts readings before 1970 on the right day too.
    let days: Date32Array = ts
        .values()
        .iter()
        .map(|&us| {
            i32::try_from(us.div_euclid(MICROS_PER_DAY))
                .expect("a µs timestamp in i64 spans under 2^31 days either way")
        })
        .collect::<Vec<_>>()
        .into();
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(date_field());
    let mut columns = batch.columns().to_vec();
    columns.push(Arc::new(days));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .expect("one non-null date per row appended to a valid batch")
}

const READINGS: TableSpec = TableSpec {
    name: "readings",
    comment: "plantline readings: the batch contract's columns plus dq_flags",
    schema: readings_schema,
    added_columns: &[DQ_FLAGS_COLUMN, VALUE_TEXT_COLUMN],
};

/// What went wrong with a Delta table. Every variant names the table URL or the gateway (and
/// the table version where one is known).
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("cannot open Delta table {url}: {source}")]
    Open {
        url: Url,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("cannot create Delta table {url} with the collector's schema: {source}")]
    Create {
        url: Url,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("cannot create the local folder {path} for a Delta table: {source}")]
    CreateFolder {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `detail` starts with the table's role (`readings`, `gaps`, `quarantined_rows`).
    #[error(
        "Delta table {url} has a schema that differs from the collector's: {detail}; point the setting at a table written by this collector (readings: the batch contract's columns plus `dq_flags`)"
    )]
    Schema { url: Url, detail: String },
    #[error("cannot add the nullable column(s) {columns} to Delta table {url}: {source}")]
    Evolve {
        url: Url,
        /// The columns that were to be added and the table's role:
        /// `dq_flags, value_text (readings table)`.
        columns: String,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("cannot reload Delta table {url}: {source}")]
    Reload {
        url: Url,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error(
        "cannot read the watermark of gateway `{gateway}` in {table} at table version {version}: {source}"
    )]
    Watermark {
        table: String,
        gateway: String,
        version: Version,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("cannot write data files to {table} for gateway `{gateway}`: {source}")]
    Write {
        table: String,
        gateway: String,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error(
        "cannot commit gateway `{gateway}` to {table} on top of table version {base_version}: {source}"
    )]
    Commit {
        table: String,
        gateway: String,
        base_version: Version,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error(
        "Delta table {url} is partitioned by [{found}]; the collector writes readings tables partitioned by `date` (the UTC day of `ts`) or not partitioned; point [delta] url at a table this collector created, or create a new one and backfill it"
    )]
    Partitioning { url: Url, found: String },
    #[error(
        "gateway `{gateway}`: gave up after {attempts} commit attempts that each lost a race with another writer of the same gateway; it is retried on the next pass"
    )]
    Contended { gateway: String, attempts: u32 },
    #[error("cannot read data file {file} of Delta table {table}: {message}")]
    ReadFile {
        table: String,
        file: String,
        message: String,
    },
}

/// The result of [`ReadingsTable::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// The table version that holds the rows, or `None` if nothing was new (no commit made).
    pub version: Option<Version>,
    /// Rows appended.
    pub rows_applied: usize,
    /// Rows dropped because their `seq` was at or below the watermark (replays and overlaps).
    pub rows_skipped: usize,
    /// The gateway's watermark before this apply (`None` if it never had rows applied).
    pub watermark_before: Option<i64>,
    /// The gateway's watermark afterwards.
    pub watermark_after: Option<i64>,
    /// Commits that lost a race and were re-filtered and retried.
    pub conflicts: u32,
}

/// The readings Delta table, loaded at its latest version.
#[derive(Debug)]
pub struct ReadingsTable {
    table: DeltaTable,
    url: Url,
    commit_attempts: u32,
    /// Whether the table is partitioned by [`DATE_COLUMN`] (created by this collector) or not
    /// at all (created before partitioning); read from its metadata on open.
    by_date: bool,
}

impl ReadingsTable {
    /// Opens the table at `url`, creating it if nothing is there yet. A table written before the
    /// `dq_flags` or `value_text` column existed gets what it lacks added (a metadata-only
    /// commit; no data file is rewritten, old rows read them as null). A local folder is
    /// created if missing. Works when another collector creates or evolves the table at the
    /// same moment.
    pub async fn open_or_create(
        url: &Url,
        storage_options: HashMap<String, String>,
    ) -> Result<Self, DeltaError> {
        let table =
            open::open_or_create_partitioned(url, &storage_options, &READINGS, Some(&date_field()))
                .await?;
        let by_date = partitioned_by_date(&table, url)?;
        let mut this = Self {
            table,
            url: url.clone(),
            commit_attempts: 5,
            by_date,
        };
        this.evolve_schema().await?;
        Ok(this)
    }

    /// The table's partition columns: `["date"]` for a table this collector created, none for
    /// one created before partitioning.
    pub fn partition_columns(&self) -> Vec<String> {
        if self.by_date {
            vec![DATE_COLUMN.to_owned()]
        } else {
            Vec::new()
        }
    }

    /// How many times a commit that lost a race on the same gateway is re-filtered and retried.
    #[must_use]
    pub fn with_commit_attempts(mut self, attempts: u32) -> Self {
        self.commit_attempts = attempts.max(1);
        self
    }

    /// How many times a lost commit race is retried.
    pub fn commit_attempts(&self) -> u32 {
        self.commit_attempts
    }

    /// The loaded table version.
    pub fn version(&self) -> Option<Version> {
        self.table.version()
    }

    /// The table URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The underlying delta-rs table, for readers (the Snowflake loader, tests).
    pub fn delta_table(&self) -> &DeltaTable {
        &self.table
    }

    /// Loads the newest version of the table.
    pub async fn reload(&mut self) -> Result<(), DeltaError> {
        commit::reload(&mut self.table, &self.url).await
    }

    /// The last `seq` of `gateway` in the loaded version, `None` if it never had rows applied.
    pub async fn watermark(&self, gateway: &str) -> Result<Option<i64>, DeltaError> {
        watermark::read(&self.table, &self.url, gateway).await
    }

    /// The watermark of `gateway` and its fresh range (batch contract v3's fresh lane) in the
    /// loaded version.
    pub async fn marks(&self, gateway: &str) -> Result<Marks, DeltaError> {
        watermark::read_marks(&self.table, &self.url, gateway, true).await
    }

    /// Appends the rows of `batches` (one gateway's batches in the contract's schema, each
    /// sorted by `seq`, given in `seq` order of their first row) whose `seq` is above the
    /// gateway's watermark and above every `seq` taken from an earlier batch, and moves the
    /// watermark to the last appended `seq`, all in one commit. No data-quality rule is applied
    /// and no gap is recorded: the pass ([`crate::ingest`]) does that.
    ///
    /// If another writer commits rows of the same gateway first, the table is reloaded, the
    /// watermark re-read and the rows re-filtered, with backoff, up to the configured attempts.
    /// Data files written for a lost attempt stay unreferenced until `VACUUM` removes them.
    pub async fn apply(
        &mut self,
        gateway: &str,
        batches: &[RecordBatch],
    ) -> Result<ApplyOutcome, DeltaError> {
        let mut conflicts = 0;
        loop {
            let marks = self.marks(gateway).await?;
            let watermark_before = marks.watermark;
            let (above, watermark_after, skipped) = filter_above(batches, watermark_before);
            // Rows the fresh lane put in already are skipped like replays.
            let (fresh, in_range) = without_range(above, marks.fresh);
            let rows_skipped = skipped + in_range;
            let rows_applied: usize = fresh.iter().map(|(_, b)| b.num_rows()).sum();
            if watermark_after == watermark_before {
                return Ok(ApplyOutcome {
                    version: None,
                    rows_applied,
                    rows_skipped,
                    watermark_before,
                    watermark_after: watermark_before,
                    conflicts,
                });
            }
            let last_seq = watermark_after.expect("the watermark moved, so a last seq exists");
            let data = fresh.iter().map(|(_, b)| with_flags(b, None)).collect();
            match self.commit_rows(gateway, data, last_seq).await {
                Ok(version) => {
                    return Ok(ApplyOutcome {
                        version: Some(version),
                        rows_applied,
                        rows_skipped,
                        watermark_before,
                        watermark_after,
                        conflicts,
                    });
                }
                Err(CommitFailure::Conflict(source)) => {
                    conflicts += 1;
                    if conflicts >= self.commit_attempts {
                        return Err(DeltaError::Contended {
                            gateway: gateway.to_owned(),
                            attempts: conflicts,
                        });
                    }
                    let pause = commit::backoff(conflicts);
                    warn!(
                        component = "delta",
                        gateway,
                        attempt = conflicts,
                        pause_ms = pause.as_millis(),
                        error = %source,
                        "commit lost a race with another writer of this gateway; re-filtering"
                    );
                    tokio::time::sleep(pause).await;
                    self.reload().await?;
                }
                Err(CommitFailure::Other(e)) => return Err(e),
            }
        }
    }

    /// Commits `batches` (in [`readings_schema`]) with the gateway's watermark moved to
    /// `last_seq`; with no batches, only the watermark moves. Lands only if neither the
    /// watermark nor the fresh range moved since the rows were filtered.
    pub(crate) async fn commit_rows(
        &mut self,
        gateway: &str,
        batches: Vec<RecordBatch>,
        last_seq: i64,
    ) -> Result<Version, CommitFailure> {
        let batches = self.dated(batches);
        let version = commit::commit_with_marks(
            &mut self.table,
            &self.url,
            gateway,
            batches,
            MarkUpdate::Watermark(last_seq),
            true,
        )
        .await?;
        debug!(
            component = "delta",
            gateway, version, last_seq, "committed readings"
        );
        Ok(version)
    }

    /// Commits fresh-lane `batches` (in [`readings_schema`]) with the gateway's fresh range set
    /// to `range`; the watermark stays. Lands only if neither the watermark nor the fresh range
    /// moved since the rows were filtered.
    pub(crate) async fn commit_fresh(
        &mut self,
        gateway: &str,
        batches: Vec<RecordBatch>,
        range: FreshRange,
    ) -> Result<Version, CommitFailure> {
        let batches = self.dated(batches);
        let version = commit::commit_with_marks(
            &mut self.table,
            &self.url,
            gateway,
            batches,
            MarkUpdate::Fresh(range),
            true,
        )
        .await?;
        debug!(
            component = "delta",
            gateway,
            version,
            fresh_first = range.first,
            fresh_last = range.last,
            "committed fresh-lane readings"
        );
        Ok(version)
    }

    fn dated(&self, batches: Vec<RecordBatch>) -> Vec<RecordBatch> {
        if self.by_date {
            batches.iter().map(with_date).collect()
        } else {
            batches
        }
    }

    /// Every row of the table's latest version, read from its data files and sorted by
    /// gateway and `seq`, in the contract's columns. Meant for summaries and checks of small
    /// tables (the demo, tests), not for analytics: it holds the whole table in memory.
    pub async fn current_rows(&mut self) -> Result<Vec<contract::Row>, DeltaError> {
        Ok(self
            .current_rows_with_flags()
            .await?
            .into_iter()
            .map(|(row, _)| row)
            .collect())
    }

    /// [`ReadingsTable::current_rows`] with each row's `dq_flags`.
    pub async fn current_rows_with_flags(
        &mut self,
    ) -> Result<Vec<(contract::Row, Option<String>)>, DeltaError> {
        self.reload().await?;
        let batches = commit::read_files(&self.table, &self.url, |_| true).await?;
        let mut rows = Vec::new();
        for batch in batches {
            let read_err = |message: String| DeltaError::ReadFile {
                table: self.url.to_string(),
                file: "(a data file)".to_owned(),
                message,
            };
            let contract_batch = contract_columns(&batch).map_err(read_err)?;
            let parsed =
                contract::rows_from_batch(&contract_batch).map_err(|e| read_err(e.to_string()))?;
            let flags = batch
                .column_by_name(DQ_FLAGS_COLUMN)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
            for (i, row) in parsed.into_iter().enumerate() {
                let flag = flags
                    .as_ref()
                    .filter(|f| !f.is_null(i))
                    .map(|f| f.value(i).to_owned());
                rows.push((row, flag));
            }
        }
        rows.sort_by(|(a, _), (b, _)| (&a.gateway, a.seq).cmp(&(&b.gateway, b.seq)));
        Ok(rows)
    }

    /// Accepts the collector's schema; adds what it lacks of `dq_flags` and `value_text` to a
    /// table an earlier collector wrote; refuses anything else ([`open::evolve`]).
    async fn evolve_schema(&mut self) -> Result<(), DeltaError> {
        open::evolve(&mut self.table, &self.url, &READINGS, self.commit_attempts).await
    }
}

/// Whether the table at `url` is partitioned by a `date` column of Delta type `date` (true) or
/// not partitioned (false); an error for any other partitioning.
fn partitioned_by_date(table: &DeltaTable, url: &Url) -> Result<bool, DeltaError> {
    let snapshot = table.snapshot().map_err(|e| DeltaError::Schema {
        url: url.clone(),
        detail: format!("readings table: {e}"),
    })?;
    let partitions = snapshot.metadata().partition_columns();
    if partitions.is_empty() {
        return Ok(false);
    }
    let date_typed = snapshot.schema().field(DATE_COLUMN).is_some_and(|f| {
        *f.data_type()
            == deltalake::kernel::DataType::Primitive(deltalake::kernel::PrimitiveType::Date)
    });
    if partitions.len() == 1 && partitions[0] == DATE_COLUMN && date_typed {
        return Ok(true);
    }
    Err(DeltaError::Partitioning {
        url: url.clone(),
        found: partitions
            .iter()
            .map(|p| {
                let kind = snapshot
                    .schema()
                    .field(p)
                    .map_or_else(|| "?".to_owned(), |f| f.data_type().to_string());
                format!("{p} {kind}")
            })
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// `batch` (in the contract's current schema) as a row of the readings table, with `flags` in
/// `dq_flags` (all null without).
pub(crate) fn with_flags(batch: &RecordBatch, flags: Option<StringArray>) -> RecordBatch {
    let mut flags: Option<ArrayRef> = Some(Arc::new(
        flags.unwrap_or_else(|| StringArray::new_null(batch.num_rows())),
    ));
    let schema = readings_schema();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| {
            if f.name() == DQ_FLAGS_COLUMN {
                flags.take().expect("the readings schema has dq_flags once")
            } else {
                batch
                    .column_by_name(f.name())
                    .expect("every readings column but dq_flags is a contract column")
                    .clone()
            }
        })
        .collect();
    RecordBatch::try_new(schema, columns)
        .expect("the contract's columns plus dq_flags, in the readings schema's order")
}

/// The contract's columns of a readings data file, by name. A file written before a nullable
/// column was added to the table (`value_text`) reads it as null, as Delta readers do.
pub(crate) fn contract_columns(batch: &RecordBatch) -> Result<RecordBatch, String> {
    let schema = contract::schema();
    let columns = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(column) => Ok(column.clone()),
            None if f.is_nullable() => Ok(new_null_array(f.data_type(), batch.num_rows())),
            None => Err(format!("column `{}` is missing", f.name())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema, columns).map_err(|e| e.to_string())
}

/// The `seq` column of a batch in the contract's (or readings) schema.
pub(crate) fn seq_column(batch: &RecordBatch) -> &Int64Array {
    batch
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("batches are validated against the contract, whose first column is seq: Int64")
}

/// Keeps the rows of each batch whose `seq` is above `watermark` and above every `seq` already
/// kept, so overlapping batches contribute each `seq` once. Returns the kept slices with the
/// index of the batch each came from, the new watermark and the number of rows dropped.
///
/// Every batch must be sorted by `seq` (checked by the raw zone before it gets here).
pub(crate) fn filter_above(
    batches: &[RecordBatch],
    watermark: Option<i64>,
) -> (Vec<(usize, RecordBatch)>, Option<i64>, usize) {
    let mut high = watermark;
    let mut kept = Vec::with_capacity(batches.len());
    let mut skipped = 0;
    for (index, batch) in batches.iter().enumerate() {
        let seq = seq_column(batch);
        let start = match high {
            None => 0,
            Some(h) => seq.values().partition_point(|&s| s <= h),
        };
        skipped += start;
        if start < batch.num_rows() {
            kept.push((index, batch.slice(start, batch.num_rows() - start)));
            high = Some(seq.value(seq.len() - 1));
        }
    }
    (kept, high, skipped)
}

/// `slices` (each sorted by `seq`, tagged with the batch it came from) without the rows inside
/// `range`, and how many rows that took out. The main lane skips these: the fresh lane put them
/// in the table already.
pub(crate) fn without_range(
    slices: Vec<(usize, RecordBatch)>,
    range: Option<FreshRange>,
) -> (Vec<(usize, RecordBatch)>, usize) {
    let Some(range) = range else {
        return (slices, 0);
    };
    let mut kept = Vec::with_capacity(slices.len());
    let mut dropped = 0;
    for (index, batch) in slices {
        let seq = seq_column(&batch).values();
        let lo = seq.partition_point(|&s| s < range.first);
        let hi = seq.partition_point(|&s| s <= range.last);
        dropped += hi - lo;
        if lo == hi {
            kept.push((index, batch));
            continue;
        }
        if lo > 0 {
            kept.push((index, batch.slice(0, lo)));
        }
        if hi < batch.num_rows() {
            kept.push((index, batch.slice(hi, batch.num_rows() - hi)));
        }
    }
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::contract::{Quality, Row};

    #[test]
    fn rows_inside_the_fresh_range_are_taken_out_of_every_batch() {
        let input = vec![(0, batch(1..=4)), (1, batch(5..=9)), (2, batch(12..=13))];
        let range = FreshRange { first: 3, last: 6 };
        let (kept, dropped) = without_range(input.clone(), Some(range));
        assert_eq!(seqs(&kept), vec![1, 2, 7, 8, 9, 12, 13]);
        assert_eq!(
            kept.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(dropped, 4);
        let (all, none) = without_range(input, None);
        assert_eq!((seqs(&all).len(), none), (11, 0));
        let (kept, dropped) = without_range(
            vec![(0, batch(5..=6))],
            Some(FreshRange { first: 1, last: 9 }),
        );
        assert!(kept.is_empty());
        assert_eq!(dropped, 2);
    }

    fn batch(seqs: std::ops::RangeInclusive<i64>) -> RecordBatch {
        let rows: Vec<Row> = seqs
            .map(|seq| Row {
                seq,
                ts_us: seq,
                site: "s".into(),
                gateway: "gw".into(),
                device: "d".into(),
                tag: "t".into(),
                value: Some(1.0),
                quality: Quality::Good,
                unit: None,
                value_text: None,
            })
            .collect();
        contract::to_record_batch(&rows)
    }

    fn seqs(batches: &[(usize, RecordBatch)]) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|(_, b)| seq_column(b).values().to_vec())
            .collect()
    }

    #[test]
    fn overlapping_batches_contribute_each_seq_once() {
        let input = [batch(1..=4), batch(3..=6), batch(5..=5), batch(9..=10)];
        let (kept, high, skipped) = filter_above(&input, Some(1));
        assert_eq!(seqs(&kept), vec![2, 3, 4, 5, 6, 9, 10]);
        assert_eq!(
            kept.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![0, 1, 3]
        );
        assert_eq!(high, Some(10));
        assert_eq!(skipped, 1 + 2 + 1);
    }

    #[test]
    fn the_date_column_is_the_utc_day_of_ts_on_both_sides_of_midnight() {
        // 2026-01-01T00:00:00Z and the µs around it, plus one reading before 1970.
        let midnight = 1_767_225_600_000_000;
        let mut input = with_flags(&batch(1..=4), None);
        let ts = TimestampMicrosecondArray::from(vec![
            midnight - 1,
            midnight,
            midnight + MICROS_PER_DAY - 1,
            -1,
        ])
        .with_timezone("UTC");
        let index = input.schema().index_of("ts").unwrap();
        let mut columns = input.columns().to_vec();
        columns[index] = Arc::new(ts);
        input = RecordBatch::try_new(input.schema(), columns).unwrap();
        let dated = with_date(&input);
        assert_eq!(dated.schema().field(11), &date_field());
        let days = dated
            .column(11)
            .as_any()
            .downcast_ref::<Date32Array>()
            .unwrap();
        assert_eq!(days.values().to_vec(), vec![20_453, 20_454, 20_454, -1]);
        assert_eq!(
            contract_columns(&dated).unwrap(),
            contract_columns(&input).unwrap()
        );
    }

    #[test]
    fn everything_at_or_below_the_watermark_is_dropped() {
        let (kept, high, skipped) = filter_above(&[batch(1..=3)], Some(3));
        assert!(kept.is_empty());
        assert_eq!(high, Some(3));
        assert_eq!(skipped, 3);
        let (kept, high, skipped) = filter_above(&[batch(0..=2)], None);
        assert_eq!(seqs(&kept), vec![0, 1, 2]);
        assert_eq!((high, skipped), (Some(2), 0));
    }

    #[test]
    fn readings_rows_carry_a_nullable_flags_column_after_the_contract_columns() {
        let schema = readings_schema();
        assert_eq!(schema.fields().len(), contract::schema().fields().len() + 1);
        let flags = schema.field(9);
        assert_eq!(
            (flags.name().as_str(), flags.is_nullable()),
            (DQ_FLAGS_COLUMN, true)
        );
        let b = with_flags(&batch(1..=2), None);
        assert_eq!(b.column(9).null_count(), 2);
        assert_eq!(contract_columns(&b).unwrap(), batch(1..=2));
    }

    #[test]
    fn value_text_follows_dq_flags_as_a_table_evolved_from_v1_has_it() {
        let schema = readings_schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            [
                "seq",
                "ts",
                "site",
                "gateway",
                "device",
                "tag",
                "value",
                "quality",
                "unit",
                DQ_FLAGS_COLUMN,
                VALUE_TEXT_COLUMN
            ]
        );
        let text = Row {
            seq: 3,
            ts_us: 3,
            site: "s".into(),
            gateway: "gw".into(),
            device: "d".into(),
            tag: "recipe".into(),
            value: None,
            quality: Quality::Good,
            unit: None,
            value_text: Some("MIX-7".into()),
        };
        let contract_batch = contract::to_record_batch(std::slice::from_ref(&text));
        let flags = StringArray::from(vec![Some("f")]);
        let b = with_flags(&contract_batch, Some(flags));
        assert_eq!(
            b.column(9)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .value(0),
            "f"
        );
        assert_eq!(
            b.column(10)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .value(0),
            "MIX-7"
        );
        assert_eq!(contract_columns(&b).unwrap(), contract_batch);
        // A data file written before value_text existed reads it as null.
        let old = b.project(&(0..10).collect::<Vec<_>>()).unwrap();
        let read = contract_columns(&old).unwrap();
        assert_eq!(read.column(9).null_count(), 1);
        assert_eq!(read.column(0), contract_batch.column(0));
    }
}
