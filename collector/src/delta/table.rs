//! Opening (or creating) the readings table and appending one gateway's rows together with its
//! new watermark in a single commit.

use std::collections::HashMap;
use std::time::Duration;

use arrow_array::{Array, Int64Array, RecordBatch};
use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake::kernel::transaction::{CommitBuilder, TransactionError};
use deltalake::kernel::{Action, StructType, Version};
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use edge_agent::contract;
use tracing::{debug, info, warn};
use url::Url;

use super::watermark;

/// Name recorded in the table's metadata when the collector creates it.
const TABLE_NAME: &str = "readings";

/// What went wrong with the Delta table. Every variant names the table URL or the gateway (and
/// the table version where one is known).
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("cannot open Delta table {url}: {source}")]
    Open {
        url: Url,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("cannot create Delta table {url} with the batch contract's schema: {source}")]
    Create {
        url: Url,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("cannot create the local folder {path} for the Delta table: {source}")]
    CreateFolder {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Delta table {url} has a schema that differs from batch contract v{}: {detail}; point `delta.url` at a table written by this collector",
        contract::CONTRACT_VERSION
    )]
    Schema { url: Url, detail: String },
    #[error("cannot reload Delta table {url}: {source}")]
    Reload {
        url: Url,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error(
        "cannot read the watermark of gateway `{gateway}` at table version {version}: {source}"
    )]
    Watermark {
        gateway: String,
        version: Version,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("cannot write data files for gateway `{gateway}`: {source}")]
    Write {
        gateway: String,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("cannot commit gateway `{gateway}` on top of table version {base_version}: {source}")]
    Commit {
        gateway: String,
        base_version: Version,
        #[source]
        source: Box<DeltaTableError>,
    },
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
}

impl ReadingsTable {
    /// Opens the table at `url`, creating it with the contract schema if nothing is there yet.
    /// A local folder is created if missing. Works when another collector creates the table at
    /// the same moment.
    pub async fn open_or_create(
        url: &Url,
        storage_options: HashMap<String, String>,
    ) -> Result<Self, DeltaError> {
        if url.scheme() == "file"
            && let Ok(path) = url.to_file_path()
        {
            std::fs::create_dir_all(&path).map_err(|source| DeltaError::CreateFolder {
                path: path.display().to_string(),
                source,
            })?;
        }
        let open = |url: &Url| {
            DeltaTableBuilder::from_url(url.clone())
                .and_then(|b| b.with_storage_options(storage_options.clone()).build())
                .map_err(|source| DeltaError::Open {
                    url: url.clone(),
                    source: Box::new(source),
                })
        };
        let mut table = open(url)?;
        match table.load().await {
            Ok(()) => {}
            Err(DeltaTableError::NotATable(_)) => {
                let schema =
                    StructType::try_from_arrow(contract::schema().as_ref()).map_err(|e| {
                        DeltaError::Create {
                            url: url.clone(),
                            source: Box::new(DeltaTableError::Generic(e.to_string())),
                        }
                    })?;
                let created = table
                    .create()
                    .with_table_name(TABLE_NAME)
                    .with_comment(format!(
                        "plantline readings, batch contract v{}",
                        contract::CONTRACT_VERSION
                    ))
                    .with_columns(schema.fields().cloned())
                    .with_save_mode(SaveMode::Ignore)
                    .await;
                table = match created {
                    Ok(t) => {
                        info!(component = "delta", table = %url, "created the readings table");
                        t
                    }
                    Err(create_err) => {
                        // Another collector may have won the race to version 0: use its table.
                        let mut t = open(url)?;
                        t.load().await.map_err(|_| DeltaError::Create {
                            url: url.clone(),
                            source: Box::new(create_err),
                        })?;
                        t
                    }
                };
            }
            Err(source) => {
                return Err(DeltaError::Open {
                    url: url.clone(),
                    source: Box::new(source),
                });
            }
        }
        let this = Self {
            table,
            url: url.clone(),
            commit_attempts: 5,
        };
        this.check_schema()?;
        Ok(this)
    }

    /// How many times a commit that lost a race on the same gateway is re-filtered and retried.
    #[must_use]
    pub fn with_commit_attempts(mut self, attempts: u32) -> Self {
        self.commit_attempts = attempts.max(1);
        self
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
        self.table
            .update_state()
            .await
            .map_err(|source| DeltaError::Reload {
                url: self.url.clone(),
                source: Box::new(source),
            })
    }

    /// The last `seq` of `gateway` in the loaded version, `None` if it never had rows applied.
    pub async fn watermark(&self, gateway: &str) -> Result<Option<i64>, DeltaError> {
        watermark::read(&self.table, gateway).await
    }

    /// Appends the rows of `batches` (one gateway's batches, each sorted by `seq`, given in
    /// `seq` order of their first row) whose `seq` is above the gateway's watermark and above
    /// every `seq` taken from an earlier batch, and moves the watermark to the last appended
    /// `seq`, all in one commit.
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
            let watermark_before = self.watermark(gateway).await?;
            let (fresh, watermark_after, rows_skipped) = filter_above(batches, watermark_before);
            let rows_applied: usize = fresh.iter().map(RecordBatch::num_rows).sum();
            if rows_applied == 0 {
                return Ok(ApplyOutcome {
                    version: None,
                    rows_applied,
                    rows_skipped,
                    watermark_before,
                    watermark_after: watermark_before,
                    conflicts,
                });
            }
            let last_seq = watermark_after.expect("rows were kept, so a last seq exists");
            match self.commit(gateway, fresh, last_seq).await {
                Ok(version) => {
                    debug!(
                        component = "delta",
                        gateway, version, rows_applied, last_seq, "committed"
                    );
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
                    let pause = backoff(conflicts);
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

    async fn commit(
        &mut self,
        gateway: &str,
        batches: Vec<RecordBatch>,
        last_seq: i64,
    ) -> Result<Version, CommitFailure> {
        let write_err = |source| {
            CommitFailure::Other(DeltaError::Write {
                gateway: gateway.to_owned(),
                source: Box::new(source),
            })
        };
        let mut writer = RecordBatchWriter::for_table(&self.table)
            .map_err(write_err)?
            .with_writer_properties(writer_properties());
        for batch in batches {
            writer.write(batch).await.map_err(write_err)?;
        }
        let adds = writer.flush().await.map_err(write_err)?;

        let snapshot = self.table.snapshot().map_err(write_err)?;
        let base_version = snapshot.version();
        let mut actions: Vec<Action> = adds.into_iter().map(Action::Add).collect();
        actions.push(Action::Txn(watermark::action(gateway, last_seq)));
        let app_metadata = HashMap::from([
            ("plantline.gateway".to_owned(), gateway.into()),
            ("plantline.last_seq".to_owned(), last_seq.into()),
        ]);
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: None,
            predicate: None,
        };
        let committed = CommitBuilder::default()
            .with_actions(actions)
            .with_app_metadata(app_metadata)
            .build(Some(snapshot), self.table.log_store(), operation)
            .await;
        match committed {
            Ok(finalized) => {
                let version = finalized.version();
                self.table.state = Some(finalized.snapshot());
                Ok(version)
            }
            Err(source) if is_conflict(&source) => Err(CommitFailure::Conflict(Box::new(source))),
            Err(source) => Err(CommitFailure::Other(DeltaError::Commit {
                gateway: gateway.to_owned(),
                base_version,
                source: Box::new(source),
            })),
        }
    }

    /// Every row of the table's latest version, read from its data files and sorted by
    /// gateway and `seq`. Meant for summaries and checks of small tables (the demo, tests), not
    /// for analytics: it holds the whole table in memory.
    pub async fn current_rows(&mut self) -> Result<Vec<contract::Row>, DeltaError> {
        use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        use object_store::ObjectStoreExt;
        self.reload().await?;
        let Ok(snapshot) = self.table.snapshot() else {
            return Ok(Vec::new());
        };
        let store = self.table.object_store();
        let mut rows = Vec::new();
        for file in snapshot.log_data() {
            let path = file.object_store_path();
            let read_err = |message: String| DeltaError::ReadFile {
                table: self.url.to_string(),
                file: path.to_string(),
                message,
            };
            let bytes = store
                .get(&path)
                .await
                .map_err(|e| read_err(e.to_string()))?
                .bytes()
                .await
                .map_err(|e| read_err(e.to_string()))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .and_then(
                    deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::build,
                )
                .map_err(|e| read_err(e.to_string()))?;
            for batch in reader {
                let batch = batch.map_err(|e| read_err(e.to_string()))?;
                rows.extend(
                    contract::rows_from_batch(&batch).map_err(|e| read_err(e.to_string()))?,
                );
            }
        }
        rows.sort_by(|a, b| (&a.gateway, a.seq).cmp(&(&b.gateway, b.seq)));
        Ok(rows)
    }

    fn check_schema(&self) -> Result<(), DeltaError> {
        let schema_err = |detail: String| DeltaError::Schema {
            url: self.url.clone(),
            detail,
        };
        let snapshot = self
            .table
            .snapshot()
            .map_err(|e| schema_err(e.to_string()))?;
        let want = StructType::try_from_arrow(contract::schema().as_ref())
            .map_err(|e| schema_err(e.to_string()))?;
        let found = snapshot.schema();
        let names = |s: &StructType| {
            s.fields()
                .map(|f| format!("{} {}", f.name(), f.data_type()))
                .collect::<Vec<_>>()
        };
        if names(found.as_ref()) == names(&want) {
            Ok(())
        } else {
            Err(schema_err(format!(
                "found columns [{}], expected [{}]",
                names(found.as_ref()).join(", "),
                names(&want).join(", ")
            )))
        }
    }
}

enum CommitFailure {
    Conflict(Box<DeltaTableError>),
    Other(DeltaError),
}

/// A lost race: another writer committed the same version or touched this gateway's app id.
fn is_conflict(e: &DeltaTableError) -> bool {
    matches!(
        e,
        DeltaTableError::VersionAlreadyExists(_)
            | DeltaTableError::Transaction {
                source: TransactionError::CommitConflict(_)
                    | TransactionError::MaxCommitAttempts(_)
            }
    )
}

/// Capped exponential backoff with jitter, so racing collectors spread out.
fn backoff(attempt: u32) -> Duration {
    let base_ms = 100u64 << attempt.min(5);
    let jitter_ms = u64::try_from(uuid::Uuid::new_v4().as_u128() % u128::from(base_ms))
        .expect("the remainder is below base_ms, which fits in u64");
    Duration::from_millis(base_ms + jitter_ms)
}

/// zstd like the raw zone; statistics stay on so readers can skip files by `seq` and `ts`.
fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build()
}

/// Keeps the rows of each batch whose `seq` is above `watermark` and above every `seq` already
/// kept, so overlapping batches contribute each `seq` once. Returns the kept slices, the new
/// watermark and the number of rows dropped.
///
/// Every batch must be sorted by `seq` (checked by the raw zone before it gets here).
fn filter_above(
    batches: &[RecordBatch],
    watermark: Option<i64>,
) -> (Vec<RecordBatch>, Option<i64>, usize) {
    let mut high = watermark;
    let mut kept = Vec::with_capacity(batches.len());
    let mut skipped = 0;
    for batch in batches {
        let seq = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("batches are validated against the contract, whose first column is seq: Int64");
        let start = match high {
            None => 0,
            Some(h) => seq.values().partition_point(|&s| s <= h),
        };
        skipped += start;
        if start < batch.num_rows() {
            kept.push(batch.slice(start, batch.num_rows() - start));
            high = Some(seq.value(seq.len() - 1));
        }
    }
    (kept, high, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::contract::{Quality, Row};

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
            })
            .collect();
        contract::to_record_batch(&rows)
    }

    fn seqs(batches: &[RecordBatch]) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|b| {
                let a = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                a.values().to_vec()
            })
            .collect()
    }

    #[test]
    fn overlapping_batches_contribute_each_seq_once() {
        let input = [batch(1..=4), batch(3..=6), batch(5..=5), batch(9..=10)];
        let (kept, high, skipped) = filter_above(&input, Some(1));
        assert_eq!(seqs(&kept), vec![2, 3, 4, 5, 6, 9, 10]);
        assert_eq!(high, Some(10));
        assert_eq!(skipped, 1 + 2 + 1);
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
    fn backoff_grows_and_is_capped() {
        for attempt in 0..10 {
            let d = backoff(attempt).as_millis();
            let base = 100u128 << attempt.min(5);
            assert!((base..2 * base).contains(&d), "{attempt}: {d}");
        }
    }
}
