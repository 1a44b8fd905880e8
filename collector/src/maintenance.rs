//! Table care: the table properties the collector keeps, expired-log cleanup, OPTIMIZE
//! (compaction of small files) and VACUUM (deleting files no version needs).
//!
//! # What always holds
//! - Checkpoints are written by the commit path every `delta.checkpointInterval` versions
//!   ([`crate::delta`]); the collector records `maintenance.checkpoint_interval` and
//!   `maintenance.log_retention` as the tables' `delta.checkpointInterval` and
//!   `delta.logRetentionDuration`, and turns delta-rs's per-commit log cleanup off
//!   (`delta.enableExpiredLogCleanup = false`): it lists the whole log on every commit and does
//!   not know what the Snowflake loader still has to read. [`tidy_logs`] cleans instead, after a
//!   pass that crossed a checkpoint, and never deletes a commit the loader has not loaded.
//! - OPTIMIZE rewrites only the readings table's files smaller than the target size, per
//!   partition (the `date` of a partitioned table), per gateway and in `seq` order, so every
//!   file still holds one day, one gateway and a contiguous `seq` range (folders keep pruning by
//!   day, file statistics keep skipping by gateway, `seq` and `ts`). Its commit adds and removes
//!   files with `dataChange = false`: readers of the change feed (the Snowflake loader) skip it,
//!   and rows are neither added nor lost. It never touches a file another writer removed: on a
//!   lost race it retries only if every file it rewrote is still in the table.
//! - VACUUM deletes files that left the table longer than the retention ago, and by default
//!   only those (`VacuumMode::Lite`): files of commits in flight are never candidates. The full
//!   mode also deletes files no commit ever referenced (attempts that lost or crashed) and needs
//!   a retention of at least [`FULL_VACUUM_MIN_RETENTION`]. Before anything is deleted the
//!   retention is checked against the Snowflake loader's lag (its control-table watermark):
//!   a file that a version Snowflake has not loaded yet added is never deleted.
//!
//! delta-rs's own OPTIMIZE (and its z-order) lives behind its `datafusion` feature, which would
//! bring DataFusion into the collector's build; the compaction here reads and writes with the
//! Parquet reader and delta-rs's writer the collector already uses. Z-ordering by device and tag
//! is not done: a gateway's files in `seq` order already cluster by time, and within a file the
//! readings of one device and tag are dictionary-encoded; Snowflake clusters its own copy.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{ArrayRef, RecordBatch, StringArray, new_null_array};
use arrow_schema::SchemaRef;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Version};
use deltalake::operations::vacuum::VacuumMode;
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::DeltaOperation;
use deltalake::table::config::TablePropertiesExt as _;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use object_store::ObjectStoreExt as _;
use tracing::{info, warn};
use url::Url;

use crate::config::{CollectorConfig, MaintenanceConfig};
use crate::delta::{Failure, Tables, backoff, checkpoint_if_due, classify, table_label};
use crate::snowflake::{
    BindValue, CONTROL_TABLE, SnowflakeClient, SnowflakeConfig, SnowflakeError,
};

/// A full VACUUM deletes files no commit references; a collector's commit in flight has
/// written its files but not yet its commit, so those must be older than any commit can take.
pub const FULL_VACUUM_MIN_RETENTION: Duration = Duration::from_hours(1);

/// Added to the Snowflake loader's lag before it is compared with the VACUUM retention: clocks
/// of the collector, the store and Snowflake differ a little, and the loader may be mid-load.
pub const SNOWFLAKE_LAG_MARGIN: Duration = Duration::from_mins(10);

/// How long OPTIMIZE keeps retrying a commit that lost the race to appends.
const OPTIMIZE_RETRY_BUDGET: Duration = Duration::from_mins(5);

/// What went wrong with table care. Every variant names the table.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error("cannot record the table properties of {table}: {source}")]
    Properties {
        table: Url,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("cannot clean the expired log of {table}: {source}")]
    LogCleanup {
        table: Url,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("OPTIMIZE of {table}: {message}")]
    Optimize { table: Url, message: String },
    #[error(
        "OPTIMIZE of {table}: another writer removed files this OPTIMIZE rewrote (another OPTIMIZE?); nothing was changed, run it again"
    )]
    OptimizeSuperseded { table: Url },
    #[error("VACUUM of {table}: {source}")]
    Vacuum {
        table: Url,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("VACUUM refused: {0}")]
    VacuumRefused(String),
    #[error(
        "VACUUM refused: cannot read the Snowflake loader's watermark ({CONTROL_TABLE}): {source}; load Snowflake once (collector run-once) or check the [snowflake] settings"
    )]
    SnowflakeWatermark {
        #[source]
        source: SnowflakeError,
    },
}

/// The table properties the collector keeps on its tables.
pub fn table_properties(config: &MaintenanceConfig) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "delta.checkpointInterval".to_owned(),
            config.checkpoint_interval.to_string(),
        ),
        (
            "delta.logRetentionDuration".to_owned(),
            format!("interval {} seconds", config.log_retention.0.as_secs()),
        ),
        (
            "delta.enableExpiredLogCleanup".to_owned(),
            "false".to_owned(),
        ),
    ])
}

/// Records [`table_properties`] on every table that does not hold them yet (one metadata
/// commit per such table). Returns the tables changed. A race with another writer is retried.
pub async fn apply_table_properties(
    tables: &mut Tables,
    config: &MaintenanceConfig,
) -> Result<Vec<Url>, MaintenanceError> {
    let want = table_properties(config);
    let mut changed = Vec::new();
    let targets = [
        (
            tables.readings.delta_table().clone(),
            tables.readings.url().clone(),
        ),
        (tables.gaps.delta_table().clone(), tables.gaps.url().clone()),
        (
            tables.quarantined_rows.delta_table().clone(),
            tables.quarantined_rows.url().clone(),
        ),
    ];
    for (table, url) in targets {
        if set_properties(table, &url, &want).await? {
            changed.push(url);
        }
    }
    if !changed.is_empty() {
        tables
            .reload()
            .await
            .map_err(|e| MaintenanceError::Properties {
                table: changed[0].clone(),
                source: Box::new(DeltaTableError::Generic(e.to_string())),
            })?;
    }
    Ok(changed)
}

async fn set_properties(
    mut table: DeltaTable,
    url: &Url,
    want: &BTreeMap<String, String>,
) -> Result<bool, MaintenanceError> {
    let err = |source| MaintenanceError::Properties {
        table: url.clone(),
        source: Box::new(source),
    };
    for attempt in 1..=5 {
        let snapshot = table.snapshot().map_err(err)?;
        let configuration = snapshot.metadata().configuration();
        let missing: HashMap<String, String> = want
            .iter()
            .filter(|(k, v)| configuration.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if missing.is_empty() {
            return Ok(attempt > 1);
        }
        let result = table
            .clone()
            .set_tbl_properties()
            .with_properties(missing.clone())
            .with_commit_properties(quiet_commit().with_max_retries(3))
            .await;
        match result {
            Ok(_) => {
                info!(component = "maintenance", table = %url, properties = ?missing, "recorded table properties");
                return Ok(true);
            }
            Err(e) if classify(&e) == Failure::Race => {
                tokio::time::sleep(backoff(attempt)).await;
                table.update_state().await.map_err(err)?;
            }
            Err(e) => return Err(err(e)),
        }
    }
    Err(err(DeltaTableError::Generic(
        "5 attempts each lost a race with another writer; the next start tries again".to_owned(),
    )))
}

/// Commit properties for maintenance commits: no delta-rs post-commit hooks (the collector
/// checkpoints and cleans the log itself).
fn quiet_commit() -> CommitProperties {
    CommitProperties::default()
        .with_create_checkpoint(false)
        .with_cleanup_expired_logs(Some(false))
}

/// Whether a checkpoint interval ends between table versions `before` (exclusive) and `after`
/// (inclusive): the commit path then wrote a checkpoint, and the log may be cleaned.
pub fn checkpoint_crossed(before: Option<Version>, after: Option<Version>, interval: u64) -> bool {
    let interval = interval.max(1);
    let Some(after) = after else { return false };
    let done = |v: Option<Version>| v.map_or(0, |v| (v + 1) / interval);
    done(Some(after)) > done(before)
}

/// Deletes commit files older than the table's `delta.logRetentionDuration` that a checkpoint
/// covers, keeping every version from `keep_from` on (the first version the Snowflake loader
/// has not loaded; `None`: no loader to wait for). Returns the files deleted.
pub async fn tidy_logs(
    table: &DeltaTable,
    url: &Url,
    keep_from: Option<Version>,
) -> Result<usize, MaintenanceError> {
    let err = |source| MaintenanceError::LogCleanup {
        table: url.clone(),
        source: Box::new(source),
    };
    let snapshot = table.snapshot().map_err(err)?;
    let latest = snapshot.version();
    let retention = snapshot.table_config().log_retention_duration();
    let cutoff = chrono::Utc::now().timestamp_millis()
        - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let keep = keep_from.map_or(latest, |k| k.min(latest));
    let removed = deltalake::checkpoints::cleanup_expired_logs_for(
        keep,
        table.log_store().as_ref(),
        cutoff,
        None,
    )
    .await
    .map_err(err)?;
    if removed > 0 {
        let label = table_label(table, url);
        crate::metrics::global().log_files_removed(&label, removed as u64);
        info!(component = "maintenance", table = %url, removed, keep_from = keep, "expired commit files deleted");
    }
    Ok(removed)
}

/// One data file OPTIMIZE may rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its path in the log.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// Its partition values as the log records them (empty in an unpartitioned table); files
    /// of different partitions are never rewritten together.
    pub partition: BTreeMap<String, Option<String>>,
    /// The gateway of its rows when its statistics say it holds one gateway only.
    pub gateway: Option<String>,
    /// Its smallest `seq`, from its statistics.
    pub min_seq: Option<i64>,
}

/// Groups the files smaller than `target` into bins to rewrite: per partition and per gateway
/// (files of several gateways, or without statistics, in a bin of their own kind), in `seq`
/// order, each bin at most `target` bytes (a bin closes when the next file would pass it). Bins
/// of one file are left out: rewriting them gains nothing.
pub fn plan_bins(files: Vec<Candidate>, target: u64) -> Vec<Vec<Candidate>> {
    type Group = (BTreeMap<String, Option<String>>, Option<String>);
    let mut groups: BTreeMap<Group, Vec<Candidate>> = BTreeMap::new();
    for file in files.into_iter().filter(|f| f.size < target) {
        groups
            .entry((file.partition.clone(), file.gateway.clone()))
            .or_default()
            .push(file);
    }
    let mut bins = Vec::new();
    for (_, mut files) in groups {
        files.sort_by(|a, b| (a.min_seq, &a.path).cmp(&(b.min_seq, &b.path)));
        let mut bin: Vec<Candidate> = Vec::new();
        let mut bytes = 0;
        for file in files {
            if !bin.is_empty() && bytes + file.size > target {
                bins.push(std::mem::take(&mut bin));
                bytes = 0;
            }
            bytes += file.size;
            bin.push(file);
        }
        bins.push(bin);
    }
    bins.retain(|b| b.len() > 1);
    bins
}

/// What one OPTIMIZE did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OptimizeReport {
    /// The version of its commit; `None` when there was nothing to compact.
    pub version: Option<Version>,
    /// Small files rewritten (removed with `dataChange = false`).
    pub files_removed: usize,
    /// Files written in their place.
    pub files_added: usize,
    /// Bytes of the files removed and added.
    pub bytes_removed: u64,
    pub bytes_added: u64,
    /// Rows rewritten (the same rows, in fewer files).
    pub rows: u64,
    /// Data files in the table after it.
    pub files_after: usize,
}

/// Compacts the readings table's small files into files of about `target_file_size` bytes,
/// in one commit with `dataChange = false`. `table` is left at the new version.
// Plan, rewrite bin by bin, commit: one operation read top to bottom.
#[allow(clippy::too_many_lines)]
pub async fn optimize(
    table: &mut DeltaTable,
    url: &Url,
    target_file_size: u64,
) -> Result<OptimizeReport, MaintenanceError> {
    let err = |message: String| MaintenanceError::Optimize {
        table: url.clone(),
        message,
    };
    table.update_state().await.map_err(|e| err(e.to_string()))?;
    let snapshot = table.snapshot().map_err(|e| err(e.to_string()))?;
    let files: Vec<Candidate> = snapshot
        .log_data()
        .iter()
        .filter(|f| f.deletion_vector_descriptor().is_none())
        .map(|f| {
            let stats = f
                .stats()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
            Candidate {
                path: f.path().into_owned(),
                size: u64::try_from(f.size()).unwrap_or(0),
                partition: f.partition_values_map().into_iter().collect(),
                gateway: stats.as_ref().and_then(single_gateway),
                min_seq: stats
                    .as_ref()
                    .and_then(|s| s.pointer("/minValues/seq"))
                    .and_then(serde_json::Value::as_i64),
            }
        })
        .collect();
    let total_files = files.len();
    let views: HashMap<String, deltalake::kernel::Remove> = snapshot
        .log_data()
        .iter()
        .map(|f| (f.path().into_owned(), f.remove_action(false)))
        .collect();
    let bins = plan_bins(files, target_file_size);
    if bins.is_empty() {
        info!(component = "maintenance", table = %url, files = total_files, "OPTIMIZE: nothing to compact");
        return Ok(OptimizeReport {
            files_after: total_files,
            ..OptimizeReport::default()
        });
    }
    let mut report = OptimizeReport::default();
    let mut actions: Vec<Action> = Vec::new();
    let mut removed_paths = HashSet::new();
    let store = table.object_store();
    for bin in &bins {
        let mut writer = RecordBatchWriter::for_table(table)
            .map_err(|e| err(e.to_string()))?
            .with_writer_properties(
                WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::default()))
                    .build(),
            )
            .with_target_file_size(target_file_size);
        let schema = writer.arrow_schema();
        for file in bin {
            let path = object_store::path::Path::parse(&file.path)
                .map_err(|e| err(format!("data file `{}`: {e}", file.path)))?;
            let bytes = store
                .get(&path)
                .await
                .map_err(|e| err(format!("reading `{}`: {e}", file.path)))?
                .bytes()
                .await
                .map_err(|e| err(format!("reading `{}`: {e}", file.path)))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .and_then(ParquetRecordBatchReaderBuilder::build)
                .map_err(|e| err(format!("decoding `{}`: {e}", file.path)))?;
            for batch in reader {
                let batch = batch.map_err(|e| err(format!("decoding `{}`: {e}", file.path)))?;
                report.rows += batch.num_rows() as u64;
                let batch = conform(&batch, &schema, &file.partition)
                    .map_err(|e| err(format!("data file `{}`: {e}", file.path)))?;
                writer
                    .write(batch)
                    .await
                    .map_err(|e| err(format!("writing: {e}")))?;
            }
            let mut remove = views
                .get(&file.path)
                .cloned()
                .ok_or_else(|| err(format!("`{}` left the snapshot", file.path)))?;
            remove.deletion_timestamp = Some(chrono::Utc::now().timestamp_millis());
            actions.push(Action::Remove(remove));
            removed_paths.insert(file.path.clone());
            report.files_removed += 1;
            report.bytes_removed += file.size;
        }
        for mut add in writer
            .flush()
            .await
            .map_err(|e| err(format!("writing: {e}")))?
        {
            add.data_change = false;
            report.files_added += 1;
            report.bytes_added += u64::try_from(add.size).unwrap_or(0);
            actions.push(Action::Add(add));
        }
    }
    let version = commit_optimize(table, url, actions, &removed_paths, target_file_size).await?;
    report.version = Some(version);
    report.files_after = total_files - report.files_removed + report.files_added;
    crate::metrics::global().optimized(report.files_removed as u64, report.files_added as u64);
    info!(
        component = "maintenance",
        table = %url,
        version,
        files_removed = report.files_removed,
        files_added = report.files_added,
        rows = report.rows,
        "OPTIMIZE committed"
    );
    Ok(report)
}

/// The gateway a file's statistics pin down, when its smallest and largest are the same.
fn single_gateway(stats: &serde_json::Value) -> Option<String> {
    let min = stats.pointer("/minValues/gateway")?.as_str()?;
    let max = stats.pointer("/maxValues/gateway")?.as_str()?;
    (min == max).then(|| min.to_owned())
}

/// `batch` in the table's `schema`: columns by name, a partition column (data files do not
/// hold them) from the file's `partition` value, a column the file predates (added later,
/// nullable) as nulls. The writer then puts the rows back into the same partition.
fn conform(
    batch: &RecordBatch,
    schema: &SchemaRef,
    partition: &BTreeMap<String, Option<String>>,
) -> Result<RecordBatch, String> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            None if partition.contains_key(field.name()) => {
                partition_column(field, partition[field.name()].as_deref(), batch.num_rows())
            }
            Some(column) if column.data_type() == field.data_type() => Ok(column.clone()),
            Some(column) => Err(format!(
                "column `{}` is {} in the file but {} in the table",
                field.name(),
                column.data_type(),
                field.data_type()
            )),
            None if field.is_nullable() => Ok(new_null_array(field.data_type(), batch.num_rows())),
            None => Err(format!("column `{}` is missing", field.name())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(Arc::clone(schema), columns).map_err(|e| e.to_string())
}

/// A column of `rows` copies of a partition value as the log records it (`2026-05-04` for a
/// date), in the field's type.
fn partition_column(
    field: &arrow_schema::Field,
    value: Option<&str>,
    rows: usize,
) -> Result<ArrayRef, String> {
    let text = StringArray::from(vec![value; rows]);
    let unreadable = |why: String| {
        format!(
            "partition value {value:?} of column `{}` does not read as {}{why}",
            field.name(),
            field.data_type()
        )
    };
    let column = deltalake::arrow::compute::cast(&text, field.data_type())
        .map_err(|e| unreadable(format!(": {e}")))?;
    // A cast that cannot parse a value yields null rather than an error.
    if value.is_some() && column.null_count() > 0 {
        return Err(unreadable(String::new()));
    }
    Ok(column)
}

async fn commit_optimize(
    table: &mut DeltaTable,
    url: &Url,
    actions: Vec<Action>,
    removed: &HashSet<String>,
    target_file_size: u64,
) -> Result<Version, MaintenanceError> {
    let err = |message: String| MaintenanceError::Optimize {
        table: url.clone(),
        message,
    };
    let label = table_label(table, url);
    let token = uuid::Uuid::new_v4().to_string();
    let started = tokio::time::Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let snapshot = table.snapshot().map_err(|e| err(e.to_string()))?;
        let base_version = snapshot.version();
        let operation = DeltaOperation::Optimize {
            predicate: None,
            target_size: i64::try_from(target_file_size).unwrap_or(i64::MAX),
        };
        let result = CommitBuilder::from(
            quiet_commit()
                .with_max_retries(0)
                .with_metadata([(crate::delta::COMMIT_ID_KEY.to_owned(), token.clone().into())]),
        )
        .with_actions(actions.clone())
        .build(Some(snapshot), table.log_store(), operation)
        .await;
        let source = match result {
            Ok(finalized) => {
                let version = finalized.version();
                table.state = Some(finalized.snapshot());
                crate::metrics::global().commit_made(&label);
                checkpoint_if_due(table, url, &label, version).await;
                return Ok(version);
            }
            Err(source) => source,
        };
        if classify(&source) == Failure::Definite {
            return Err(err(format!(
                "commit on top of version {base_version}: {source}"
            )));
        }
        table.update_state().await.map_err(|e| {
            err(format!(
                "commit outcome unknown ({source}) and the table cannot be reloaded: {e}; the files it wrote are unreferenced unless the commit landed, and VACUUM --full removes them"
            ))
        })?;
        if let Some(version) = crate::delta::find_commit(table, base_version, &token)
            .await
            .map_err(|e| err(e.to_string()))?
        {
            crate::metrics::global().commit_made(&label);
            return Ok(version);
        }
        crate::metrics::global().commit_conflict(&label);
        let active: HashSet<String> = table
            .snapshot()
            .map_err(|e| err(e.to_string()))?
            .log_data()
            .iter()
            .map(|f| f.path().into_owned())
            .collect();
        if !removed.iter().all(|p| active.contains(p)) {
            return Err(MaintenanceError::OptimizeSuperseded { table: url.clone() });
        }
        let pause = backoff(attempt);
        if started.elapsed() + pause > OPTIMIZE_RETRY_BUDGET {
            return Err(err(format!(
                "gave up after {attempt} attempts that each lost the race for a version ({source})"
            )));
        }
        warn!(component = "maintenance", table = %url, attempt, error = %source, "OPTIMIZE commit lost a race; retrying on the new version");
        tokio::time::sleep(pause).await;
    }
}

/// How VACUUM runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VacuumOptions {
    /// Files that left the table longer ago than this are deleted.
    pub retention: Duration,
    /// Also delete files no commit ever referenced (needs [`FULL_VACUUM_MIN_RETENTION`]).
    pub full: bool,
    /// Only list what would be deleted.
    pub dry_run: bool,
}

/// What VACUUM did to one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VacuumReport {
    /// The files deleted (or, in a dry run, that would be).
    pub files: Vec<String>,
    pub dry_run: bool,
}

/// How far the Snowflake loader is behind the readings table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderLag {
    /// The last version loaded (`None`: nothing loaded yet).
    pub loaded_version: Option<Version>,
    /// The table's latest version.
    pub table_version: Version,
    /// Age of the oldest version not loaded yet; zero when the loader is up to date.
    pub oldest_unloaded_age: Duration,
}

/// Reads the Snowflake loader's watermark (its control-table row for the readings table) and
/// works out how old the oldest unloaded Delta version is. Read-only in Snowflake.
pub async fn snowflake_lag(
    config: &SnowflakeConfig,
    readings: &DeltaTable,
) -> Result<LoaderLag, MaintenanceError> {
    let read = async {
        let mut client = SnowflakeClient::login(config).await?;
        let result = client
            .execute(
                &format!("SELECT MAX(LAST_VERSION) FROM {CONTROL_TABLE} WHERE TABLE_NAME = ?"),
                &[BindValue::Text(config.table_name())],
            )
            .await?;
        result.i64_at(0, 0)
    };
    let loaded = read
        .await
        .map_err(|source| MaintenanceError::SnowflakeWatermark { source })?;
    let loaded = loaded.and_then(|v| u64::try_from(v).ok());
    lag_of(readings, loaded).await
}

/// The lag of a loader whose last loaded version is `loaded`.
pub async fn lag_of(
    readings: &DeltaTable,
    loaded: Option<Version>,
) -> Result<LoaderLag, MaintenanceError> {
    let table_version = readings.version().unwrap_or(0);
    let next = loaded.map_or(0, |v| v + 1);
    if next > table_version {
        return Ok(LoaderLag {
            loaded_version: loaded,
            table_version,
            oldest_unloaded_age: Duration::ZERO,
        });
    }
    let url = readings.log_store().root_url().clone();
    let refused = |why: String| MaintenanceError::VacuumRefused(why);
    let entry = readings
        .log_store()
        .read_commit_entry(next)
        .await
        .map_err(|e| refused(format!("cannot read version {next} of {url}: {e}")))?
        .ok_or_else(|| {
            refused(format!(
                "version {next} of {url}, the first one Snowflake has not loaded, is no longer in the log; the loader cannot catch up, so reload Snowflake before vacuuming"
            ))
        })?;
    let committed_ms = commit_timestamp(&entry).ok_or_else(|| {
        refused(format!(
            "version {next} of {url} has no commit timestamp to measure the loader's lag by"
        ))
    })?;
    let age_ms = chrono::Utc::now().timestamp_millis() - committed_ms;
    Ok(LoaderLag {
        loaded_version: loaded,
        table_version,
        oldest_unloaded_age: Duration::from_millis(u64::try_from(age_ms).unwrap_or(0)),
    })
}

/// `commitInfo.timestamp` (or its in-commit timestamp) of a commit file.
fn commit_timestamp(commit: &[u8]) -> Option<i64> {
    String::from_utf8_lossy(commit).lines().find_map(|line| {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        let info = value.get("commitInfo")?;
        info.get("inCommitTimestamp")
            .or_else(|| info.get("timestamp"))
            .and_then(serde_json::Value::as_i64)
    })
}

/// Refuses a retention that could delete files Snowflake still has to load, or a full VACUUM
/// with a retention that could delete files of a commit in flight. `lag`: `None` when the
/// operator turned the Snowflake check off.
pub fn check_retention(
    options: &VacuumOptions,
    lag: Option<&LoaderLag>,
) -> Result<(), MaintenanceError> {
    if options.full && options.retention < FULL_VACUUM_MIN_RETENTION {
        return Err(MaintenanceError::VacuumRefused(format!(
            "a full VACUUM deletes files no commit references, which includes the files of a commit in flight; use a retention of at least {}s, or leave --full out",
            FULL_VACUUM_MIN_RETENTION.as_secs()
        )));
    }
    if let Some(lag) = lag
        && !lag.oldest_unloaded_age.is_zero()
    {
        let needed = lag.oldest_unloaded_age + SNOWFLAKE_LAG_MARGIN;
        if options.retention < needed {
            return Err(MaintenanceError::VacuumRefused(format!(
                "Snowflake has loaded up to version {} of {} and the oldest version it has not loaded is {}s old, so a retention of {}s could delete files it still has to load; use a retention of at least {}s (lag plus {}s margin) or load Snowflake first",
                lag.loaded_version
                    .map_or_else(|| "none".to_owned(), |v| v.to_string()),
                lag.table_version,
                lag.oldest_unloaded_age.as_secs(),
                options.retention.as_secs(),
                needed.as_secs(),
                SNOWFLAKE_LAG_MARGIN.as_secs()
            )));
        }
    }
    Ok(())
}

/// VACUUMs one table with `options` (checked with [`check_retention`] by the caller). `table`
/// is left at the latest version.
pub async fn vacuum(
    table: &mut DeltaTable,
    url: &Url,
    options: &VacuumOptions,
) -> Result<VacuumReport, MaintenanceError> {
    let err = |source| MaintenanceError::Vacuum {
        table: url.clone(),
        source: Box::new(source),
    };
    table.update_state().await.map_err(err)?;
    let retention = chrono::Duration::from_std(options.retention)
        .map_err(|e| err(DeltaTableError::Generic(e.to_string())))?;
    let (vacuumed, metrics) = table
        .clone()
        .vacuum()
        .with_retention_period(retention)
        // The retention was checked against the Snowflake loader and commits in flight above;
        // the table's delta.deletedFileRetentionDuration is for engines without those checks.
        .with_enforce_retention_duration(false)
        .with_mode(if options.full {
            VacuumMode::Full
        } else {
            VacuumMode::Lite
        })
        .with_dry_run(options.dry_run)
        .with_commit_properties(quiet_commit())
        .await
        .map_err(err)?;
    *table = vacuumed;
    if !options.dry_run {
        crate::metrics::global().vacuumed(metrics.files_deleted.len() as u64);
    }
    info!(
        component = "maintenance",
        table = %url,
        files = metrics.files_deleted.len(),
        dry_run = options.dry_run,
        "VACUUM done"
    );
    Ok(VacuumReport {
        files: metrics.files_deleted,
        dry_run: options.dry_run,
    })
}

/// `collector optimize`: compacts the readings table named by `config`.
pub async fn optimize_readings(
    config: &CollectorConfig,
) -> Result<OptimizeReport, crate::CollectorError> {
    let (_, tables) = crate::open_tables(config).await?;
    let url = tables.readings.url().clone();
    let mut table = tables.readings.delta_table().clone();
    let report = optimize(&mut table, &url, config.maintenance.target_file_size()).await;
    crate::metrics::global().maintenance_run("optimize", report.is_ok());
    Ok(report?)
}

/// `collector vacuum`: checks `options` against the Snowflake loader's lag (unless
/// `snowflake_check` is false) and vacuums the readings, gaps and quarantined-rows tables.
pub async fn vacuum_tables(
    config: &CollectorConfig,
    options: &VacuumOptions,
    snowflake_check: bool,
) -> Result<Vec<(Url, VacuumReport)>, crate::CollectorError> {
    let result = vacuum_tables_inner(config, options, snowflake_check).await;
    crate::metrics::global().maintenance_run("vacuum", result.is_ok());
    result
}

async fn vacuum_tables_inner(
    config: &CollectorConfig,
    options: &VacuumOptions,
    snowflake_check: bool,
) -> Result<Vec<(Url, VacuumReport)>, crate::CollectorError> {
    let (_, tables) = crate::open_tables(config).await?;
    let lag = if snowflake_check {
        let Some(snowflake) = &config.snowflake else {
            return Err(MaintenanceError::VacuumRefused(
                "there is no [snowflake] section to read the loader's watermark from, so VACUUM cannot tell which files Snowflake still has to load; add the section, or pass --no-snowflake-check (maintenance.snowflake_check = false for the schedule) when no Snowflake loads from this table".to_owned(),
            )
            .into());
        };
        let lag = snowflake_lag(snowflake, tables.readings.delta_table()).await?;
        info!(
            component = "maintenance",
            loaded_version = ?lag.loaded_version,
            table_version = lag.table_version,
            oldest_unloaded_age_s = lag.oldest_unloaded_age.as_secs(),
            "Snowflake loader lag read for VACUUM"
        );
        Some(lag)
    } else {
        None
    };
    check_retention(options, lag.as_ref())?;
    let mut reports = Vec::new();
    for (table, url) in [
        (tables.readings.delta_table(), tables.readings.url()),
        (tables.gaps.delta_table(), tables.gaps.url()),
        (
            tables.quarantined_rows.delta_table(),
            tables.quarantined_rows.url(),
        ),
    ] {
        let mut table = table.clone();
        let report = vacuum(&mut table, url, options).await?;
        reports.push((url.clone(), report));
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64, gateway: Option<&str>, min_seq: i64) -> Candidate {
        Candidate {
            path: path.into(),
            size,
            partition: BTreeMap::new(),
            gateway: gateway.map(str::to_owned),
            min_seq: Some(min_seq),
        }
    }

    fn paths(bins: &[Vec<Candidate>]) -> Vec<Vec<&str>> {
        bins.iter()
            .map(|b| b.iter().map(|f| f.path.as_str()).collect())
            .collect()
    }

    #[test]
    fn bins_hold_one_gateway_in_seq_order_up_to_the_target() {
        let bins = plan_bins(
            vec![
                file("a3", 40, Some("gw-a"), 30),
                file("a1", 40, Some("gw-a"), 10),
                file("a2", 40, Some("gw-a"), 20),
                file("big", 100, Some("gw-a"), 40),
                file("b1", 10, Some("gw-b"), 1),
                file("b2", 10, Some("gw-b"), 5),
                file("c1", 10, Some("gw-c"), 1),
                file("m1", 10, None, 1),
                file("m2", 10, None, 9),
            ],
            100,
        );
        // gw-a: a1+a2 fill 80, a3 would pass 100 and stays alone (left out); `big` is at the
        // target; gw-c has one small file only.
        assert_eq!(
            paths(&bins),
            vec![vec!["m1", "m2"], vec!["a1", "a2"], vec!["b1", "b2"]]
        );
    }

    #[test]
    fn bins_never_mix_partitions() {
        let day = |path: &str, date: &str, seq: i64| Candidate {
            partition: BTreeMap::from([("date".to_owned(), Some(date.to_owned()))]),
            ..file(path, 10, Some("gw-a"), seq)
        };
        let bins = plan_bins(
            vec![
                day("d1-a", "2026-05-03", 1),
                day("d2-a", "2026-05-04", 3),
                day("d1-b", "2026-05-03", 2),
                day("d2-b", "2026-05-04", 4),
                day("d3", "2026-05-05", 5),
            ],
            100,
        );
        assert_eq!(
            paths(&bins),
            vec![vec!["d1-a", "d1-b"], vec!["d2-a", "d2-b"]]
        );
    }

    #[test]
    fn a_partition_value_is_read_back_in_the_column_type() {
        let date = arrow_schema::Field::new("date", arrow_schema::DataType::Date32, false);
        let column = partition_column(&date, Some("2026-01-01"), 2).unwrap();
        let days = column
            .as_any()
            .downcast_ref::<arrow_array::Date32Array>()
            .unwrap();
        // 2026-01-01 is 20,454 days after 1970-01-01.
        assert_eq!(days.values().to_vec(), vec![20_454, 20_454]);
        assert!(
            partition_column(&date, Some("May 4th"), 1)
                .unwrap_err()
                .contains("partition value Some(\"May 4th\") of column `date`")
        );
    }

    #[test]
    fn a_checkpoint_boundary_is_seen_between_two_versions() {
        assert!(!checkpoint_crossed(Some(5), Some(10), 100));
        assert!(checkpoint_crossed(Some(98), Some(99), 100));
        assert!(!checkpoint_crossed(Some(99), Some(150), 100));
        assert!(checkpoint_crossed(None, Some(99), 100));
        assert!(!checkpoint_crossed(Some(3), None, 100));
        assert!(checkpoint_crossed(Some(0), Some(1), 1));
    }

    #[test]
    fn the_retention_must_cover_the_snowflake_lag_and_commits_in_flight() {
        let options = |secs: u64, full: bool| VacuumOptions {
            retention: Duration::from_secs(secs),
            full,
            dry_run: false,
        };
        let behind = LoaderLag {
            loaded_version: Some(4),
            table_version: 9,
            oldest_unloaded_age: Duration::from_hours(1),
        };
        let err = check_retention(&options(3600, false), Some(&behind))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "VACUUM refused: Snowflake has loaded up to version 4 of 9 and the oldest version it has not loaded is 3600s old, so a retention of 3600s could delete files it still has to load; use a retention of at least 4200s (lag plus 600s margin) or load Snowflake first"
        );
        assert!(check_retention(&options(4200, false), Some(&behind)).is_ok());
        let current = LoaderLag {
            loaded_version: Some(9),
            table_version: 9,
            oldest_unloaded_age: Duration::ZERO,
        };
        assert!(check_retention(&options(0, false), Some(&current)).is_ok());
        assert!(check_retention(&options(0, false), None).is_ok());
        assert!(
            check_retention(&options(600, true), None)
                .unwrap_err()
                .to_string()
                .contains("use a retention of at least 3600s, or leave --full out")
        );
    }

    #[test]
    fn commit_timestamps_are_read_from_commit_info() {
        let commit =
            b"{\"commitInfo\":{\"timestamp\":1700000000123,\"operation\":\"WRITE\"}}\n{\"add\":{}}";
        assert_eq!(commit_timestamp(commit), Some(1_700_000_000_123));
        assert_eq!(commit_timestamp(b"{\"add\":{}}"), None);
    }

    #[test]
    fn the_collector_records_its_checkpoint_and_retention_settings() {
        let props = table_properties(&MaintenanceConfig::default());
        assert_eq!(props["delta.checkpointInterval"], "100");
        assert_eq!(
            props["delta.logRetentionDuration"],
            "interval 2592000 seconds"
        );
        assert_eq!(props["delta.enableExpiredLogCleanup"], "false");
    }
}
