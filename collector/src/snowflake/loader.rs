//! Follows Delta tables' versions into Snowflake, exactly once: the readings table, the two
//! data-quality tables (gaps, quarantined rows) and the tags dimension, each with its own
//! watermark row.
//!
//! For every Delta version after the one recorded in the control table, the files the version
//! added with `dataChange = true` are read and, in one Snowflake transaction, staged in a
//! temporary table, inserted into the target where the merge key is new, and the control row
//! is moved to that version. Small versions share a transaction.
//!
//! With `load_mode = "internal_stage"` or `"external_stage"` the readings table's rows are not
//! read here: Snowflake loads the added files with `COPY INTO` from a stage (see `stage`), and
//! the same insert, watermark and transaction follow. The gaps and quarantined-rows tables are
//! always loaded as rows.
//!
//! The insert is `INSERT ... SELECT ... WHERE NOT EXISTS`, which is exactly `MERGE ... WHEN NOT
//! MATCHED THEN INSERT` on the merge key; it is written that way because it behaves the same
//! in every SQL engine that speaks the protocol, including local stand-ins whose `MERGE` cannot
//! run inside an explicit transaction. Concurrent loaders are kept apart by the control-table
//! update that opens each transaction (see the module invariants in `snowflake`).
//!
//! # The tags dimension
//! The tags table is type-2 history: a catalog that changes or drops a tag closes its row
//! (sets `valid_to`) by rewriting the file that holds it, so a version's added files carry
//! edited copies of rows Snowflake already has. Inserting the added rows whose key is new would
//! miss every close. The tags table is instead loaded as a snapshot: when its latest version is
//! above the watermark, one transaction moves the watermark (the same compare-and-set), deletes
//! every row of the Snowflake table and inserts the whole snapshot at that version. The table is
//! small (it grows only when sensor maps change), so reading all of it on each change is cheap,
//! and a load with no new version reads nothing but its log. A missing tags table (no catalog
//! was ever applied) is skipped.
//!
//! # Outages
//! A transaction that fails on a timeout, a broken connection, a 5xx/429 answer or a lost
//! session is retried as a whole in a new session, up to `retry_attempts` times with backoff.
//! Before the retry the watermark is read again: if it already shows the group's last version,
//! the earlier `COMMIT` went through and only its answer was lost, so nothing is redone. Either
//! way no row is lost or inserted twice; a longer outage ends the load with the error, and the
//! next load starts from the watermark.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use deltalake::kernel::Action;
use deltalake::logstore::object_store::ObjectStoreExt as _;
use deltalake::{
    DeltaTable, DeltaTableBuilder, DeltaTableError, ObjectStore, ObjectStoreError, Path,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::errors::ParquetError;
use tracing::{info, warn};

use super::client::{BindValue, SnowflakeClient, SnowflakeError};
use super::config::{CONTROL_TABLE, LoadMode, SnowflakeConfig};
use super::ddl::{
    Column, GAPS, Kind, Presence, QUARANTINED_ROWS, READINGS, TAGS, TableDef, create_control_table,
};
use super::init::TAGS_TABLE;
use super::stage::{self, AddedFile};
use crate::delta::{TAGS_SUFFIX, Tables, sibling};

/// Why a load stopped. Everything loaded before the failing transaction stays loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("snowflake settings are not usable: {}", problems.join("; "))]
    Config { problems: Vec<String> },
    #[error(transparent)]
    Snowflake(#[from] SnowflakeError),
    #[error("reading the Delta table at {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: DeltaTableError,
    },
    #[error(
        "Delta version {version} of {table} is no longer in the log (log retention removed it); reload the Snowflake table from a full scan"
    )]
    MissingVersion { table: String, version: u64 },
    #[error(
        "Delta version {version} adds `{file}` with a deletion vector, which the loader does not apply"
    )]
    DeletionVector { version: u64, file: String },
    #[error("reading `{file}` of Delta version {version}: {source}")]
    ReadFile {
        version: u64,
        file: String,
        #[source]
        source: ObjectStoreError,
    },
    #[error("decoding `{file}` of Delta version {version}: {source}")]
    Parquet {
        version: u64,
        file: String,
        #[source]
        source: ParquetError,
    },
    #[error("`{file}` of Delta version {version}: column `{column}` {problem}")]
    Column {
        version: u64,
        file: String,
        column: &'static str,
        problem: String,
    },
    #[error(
        "COPY INTO from {from} did not load what it was given: {detail}; nothing of these versions was applied"
    )]
    Copy { from: String, detail: String },
    #[error(
        "another loader moved {table}'s load watermark away from version {expected} while this one was loading; nothing was applied, run the load again"
    )]
    Conflict { table: String, expected: i64 },
    #[error(
        "adding column {column} to {table} failed: {source}; a loading role may not alter a table it does not own: run `collector snowflake init --apply` (or the ALTER TABLE it prints) as the table's owner"
    )]
    AddColumn {
        table: String,
        column: &'static str,
        #[source]
        source: Box<SnowflakeError>,
    },
    #[error(
        "loading {table} (Delta versions {first}..={last}) failed after {attempts} attempts: {source}; nothing of these versions was applied, the next load retries them"
    )]
    Outage {
        table: String,
        first: u64,
        last: u64,
        attempts: u32,
        #[source]
        source: Box<SnowflakeError>,
    },
}

/// What one load of one table did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadReport {
    /// The Snowflake table loaded (`READINGS`, `PLANTLINE_GAPS`, ...).
    pub table: String,
    /// The last Delta version loaded before this call; `None` when nothing was loaded yet.
    pub previous_version: Option<u64>,
    /// The last Delta version loaded after this call.
    pub loaded_version: Option<u64>,
    /// Delta versions applied by this call (versions that added no data included).
    pub versions_loaded: u64,
    /// Snowflake transactions committed.
    pub transactions: u64,
    /// Rows read from the added files.
    pub rows_read: u64,
    /// Rows inserted into the table; rows already there (replays) are not counted, nor are the
    /// rows of a transaction whose `COMMIT` answer was lost (its watermark shows it applied).
    pub rows_inserted: u64,
    /// Columns this load added to the Snowflake table (`ALTER TABLE ... ADD COLUMN`).
    pub columns_added: Vec<String>,
    /// Transactions that were retried after a transient failure.
    pub retries: u32,
    /// Stage modes: `COPY INTO` statements run by committed transactions.
    pub copy_statements: u64,
    /// `internal_stage`: files uploaded with `PUT`, retried attempts included.
    pub files_uploaded: u64,
    /// The tables loaded after the readings table by [`load_tables`] (gaps, quarantined rows,
    /// then tags); empty for [`load`]. For tags, `rows_read` and `rows_inserted` count the
    /// snapshot that replaced the table's rows.
    pub side_tables: Vec<LoadReport>,
}

/// A merge-key part: the key columns are whole numbers or strings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum KeyPart {
    Int(i64),
    Text(String),
}

/// Delta versions waiting for one transaction, keyed by the merge key so a row that two
/// versions both carry is staged once.
#[derive(Default)]
struct Group {
    versions: Option<RangeInclusive<u64>>,
    rows: BTreeMap<Vec<KeyPart>, Vec<BindValue>>,
    rows_read: u64,
    /// Stage modes: the files to load, instead of `rows`.
    files: Vec<AddedFile>,
    /// Stage modes: rows in `files` as the Delta statistics count them (0 without them).
    estimated_rows: u64,
}

impl Group {
    fn size(&self) -> u64 {
        self.rows.len() as u64 + self.estimated_rows
    }
}

/// What one attempt at a group applied.
#[derive(Default)]
struct Applied {
    rows_read: u64,
    rows_inserted: u64,
    copy_statements: u64,
}

/// One target: a Snowflake table filled from a Delta table.
struct Target<'a> {
    def: &'a TableDef,
    /// The Snowflake table name (unqualified, upper case).
    name: String,
    key_indexes: Vec<usize>,
    /// Rows, or files through a stage.
    mode: LoadMode,
    /// Replace every row with the Delta table's snapshot instead of inserting new keys (tags).
    snapshot: bool,
}

impl<'a> Target<'a> {
    fn new(def: &'a TableDef, name: String) -> Self {
        let key_indexes = def
            .key
            .iter()
            .map(|k| {
                def.columns
                    .iter()
                    .position(|c| c.name == *k)
                    .expect("every key column is a column of its table (ddl tests)")
            })
            .collect();
        Self {
            def,
            name,
            key_indexes,
            mode: LoadMode::Rows,
            snapshot: false,
        }
    }

    fn key_of(&self, row: &[BindValue]) -> Vec<KeyPart> {
        self.key_indexes
            .iter()
            .map(|&i| match &row[i] {
                BindValue::Fixed(v) | BindValue::TimestampTzMicros(v) => KeyPart::Int(*v),
                BindValue::Text(t) => KeyPart::Text(t.clone()),
                // key columns are required, so a row never gets here with another value
                other => KeyPart::Text(format!("{other:?}")),
            })
            .collect()
    }
}

/// Loads every Delta version of the readings `table` that Snowflake does not hold yet.
///
/// `table` may be stale: the loader reads the log up to its latest version. Creates the readings
/// table and the control table when they are missing, and adds columns the table lacks.
pub async fn load(
    client: &mut SnowflakeClient,
    table: &DeltaTable,
    cfg: &SnowflakeConfig,
) -> Result<LoadReport, LoadError> {
    let problems = cfg.problems();
    if !problems.is_empty() {
        return Err(LoadError::Config { problems });
    }
    let mut target = Target::new(&READINGS, cfg.table_name());
    target.mode = cfg.load_mode;
    load_one(client, table, cfg, &target).await
}

/// Loads the readings table, then the gaps and the quarantined-rows tables, then the tags
/// dimension (beside the readings table, `<readings>_tags`; skipped while it does not exist),
/// each from its own watermark. The returned report is the readings table's, with the other
/// three in [`LoadReport::side_tables`]. A failure stops the load; what was committed stays.
pub async fn load_tables(
    client: &mut SnowflakeClient,
    tables: &Tables,
    cfg: &SnowflakeConfig,
) -> Result<LoadReport, LoadError> {
    let mut report = load(client, tables.readings.delta_table(), cfg).await?;
    let gaps = Target::new(&GAPS, cfg.gaps_table_name());
    report
        .side_tables
        .push(load_one(client, tables.gaps.delta_table(), cfg, &gaps).await?);
    let quarantined = Target::new(&QUARANTINED_ROWS, cfg.quarantined_rows_table_name());
    report.side_tables.push(
        load_one(
            client,
            tables.quarantined_rows.delta_table(),
            cfg,
            &quarantined,
        )
        .await?,
    );
    report
        .side_tables
        .push(load_tags(client, tables, cfg).await?);
    Ok(report)
}

/// Replaces the Snowflake tags table with the tags Delta table's snapshot when the Delta table
/// has a version the watermark does not cover (see the module doc).
async fn load_tags(
    client: &mut SnowflakeClient,
    tables: &Tables,
    cfg: &SnowflakeConfig,
) -> Result<LoadReport, LoadError> {
    let mut target = Target::new(&TAGS, TAGS_TABLE.to_owned());
    target.snapshot = true;
    let columns_added = create_tables(client, &target).await?;
    let previous = read_watermark(client, &target.name).await?;
    let mut report = LoadReport {
        table: target.name.clone(),
        previous_version: u64::try_from(previous).ok(),
        loaded_version: u64::try_from(previous).ok(),
        columns_added,
        ..LoadReport::default()
    };
    let Some(table) = open_tags(tables).await? else {
        return Ok(report);
    };
    let Some(latest) = table.version() else {
        return Ok(report);
    };
    let first = u64::try_from(previous + 1).expect("the watermark is -1 or a Delta version");
    if first > latest {
        return Ok(report);
    }
    let table_uri = table.log_store().root_url().to_string();
    let snapshot = table.snapshot().map_err(|source| LoadError::Delta {
        table: table_uri.clone(),
        source,
    })?;
    // Collected before the first read: the snapshot's file iterator is not `Send`.
    let files: Vec<_> = snapshot
        .log_data()
        .iter()
        .map(|file| {
            (
                file.object_store_path(),
                file.partition_values_map(),
                file.deletion_vector_descriptor().is_some(),
            )
        })
        .collect();
    let store = table.log_store().object_store(None);
    let mut group = Group::default();
    for (path, partition_values, deletion_vector) in files {
        if deletion_vector {
            return Err(LoadError::DeletionVector {
                version: latest,
                file: path.to_string(),
            });
        }
        let rows = read_object(
            store.as_ref(),
            target.def,
            latest,
            path.as_ref(),
            &path,
            &partition_values,
        )
        .await?;
        group.rows_read += rows.len() as u64;
        for row in rows {
            group.rows.entry(target.key_of(&row)).or_insert(row);
        }
    }
    group.versions = Some(first..=latest);
    let watermark = apply_group(
        client,
        cfg,
        (&target, store.as_ref()),
        previous,
        group,
        &mut report,
    )
    .await?;
    report.loaded_version = u64::try_from(watermark).ok();
    Ok(report)
}

/// The tags Delta table beside the readings table, loaded at its latest version, with the
/// readings table's storage options; `None` while nothing is there (no catalog applied yet).
/// Opened here rather than with the pass's tables so the loader never creates it.
async fn open_tags(tables: &Tables) -> Result<Option<DeltaTable>, LoadError> {
    let readings = tables.readings.url();
    let url = sibling(readings, TAGS_SUFFIX).map_err(|problem| LoadError::Delta {
        table: readings.to_string(),
        source: DeltaTableError::InvalidTableLocation(problem),
    })?;
    let delta_err = |source| LoadError::Delta {
        table: url.to_string(),
        source,
    };
    // A local store refuses a folder that does not exist.
    if url.scheme() == "file" && url.to_file_path().is_ok_and(|p| !p.exists()) {
        return Ok(None);
    }
    let options: HashMap<String, String> = tables
        .readings
        .delta_table()
        .log_store()
        .config()
        .options()
        .raw
        .clone();
    let mut table = DeltaTableBuilder::from_url(url.clone())
        .and_then(|b| b.with_storage_options(options).build())
        .map_err(delta_err)?;
    match table.load().await {
        Ok(()) => Ok(Some(table)),
        Err(DeltaTableError::NotATable(_)) => Ok(None),
        Err(source) => Err(delta_err(source)),
    }
}

async fn load_one(
    client: &mut SnowflakeClient,
    table: &DeltaTable,
    cfg: &SnowflakeConfig,
    target: &Target<'_>,
) -> Result<LoadReport, LoadError> {
    let table_uri = table.log_store().root_url().to_string();
    let delta_err = |source| LoadError::Delta {
        table: table_uri.clone(),
        source,
    };

    let columns_added = create_tables(client, target).await?;
    let previous = read_watermark(client, &target.name).await?;

    let mut latest_table = table.clone();
    latest_table.load().await.map_err(delta_err)?;
    let latest = latest_table.version();

    let mut report = LoadReport {
        table: target.name.clone(),
        previous_version: u64::try_from(previous).ok(),
        loaded_version: u64::try_from(previous).ok(),
        columns_added,
        ..LoadReport::default()
    };
    let Some(latest) = latest else {
        return Ok(report);
    };
    let first = u64::try_from(previous + 1).expect("the watermark is -1 or a Delta version");
    if first > latest {
        return Ok(report);
    }

    let log_store = latest_table.log_store();
    let store = log_store.object_store(None);
    let mut watermark = previous;
    let mut group = Group::default();
    for version in first..=latest {
        let commit = log_store
            .read_commit_entry(version)
            .await
            .map_err(delta_err)?
            .ok_or_else(|| LoadError::MissingVersion {
                table: table_uri.clone(),
                version,
            })?;
        let actions = deltalake::logstore::get_actions(version, &commit).map_err(delta_err)?;
        for action in actions {
            let Action::Add(add) = action else { continue };
            if !add.data_change {
                continue;
            }
            if add.deletion_vector.is_some() {
                return Err(LoadError::DeletionVector {
                    version,
                    file: add.path,
                });
            }
            if target.mode != LoadMode::Rows {
                group.estimated_rows += records_in(add.stats.as_deref());
                group.files.push(AddedFile {
                    version,
                    path: add.path,
                    partition_values: add.partition_values,
                });
                continue;
            }
            let rows = read_file(
                store.as_ref(),
                target.def,
                version,
                &add.path,
                &add.partition_values,
            )
            .await?;
            group.rows_read += rows.len() as u64;
            for row in rows {
                group.rows.entry(target.key_of(&row)).or_insert(row);
            }
        }
        group.versions = Some(match group.versions.take() {
            Some(range) => *range.start()..=version,
            None => version..=version,
        });
        if group.size() >= cfg.rows_per_transaction as u64 || version == latest {
            let applied = std::mem::take(&mut group);
            watermark = apply_group(
                client,
                cfg,
                (target, store.as_ref()),
                watermark,
                applied,
                &mut report,
            )
            .await?;
        }
    }
    report.loaded_version = u64::try_from(watermark).ok();
    Ok(report)
}

/// Creates the target and the control table when missing, adds the target's columns it lacks
/// and its control row. Returns the columns added.
async fn create_tables(
    client: &mut SnowflakeClient,
    target: &Target<'_>,
) -> Result<Vec<String>, LoadError> {
    // `collector snowflake init` creates the same tables from the same definitions.
    client
        .execute(&target.def.create(&target.name), &[])
        .await?;
    let existing = client
        .execute(
            "SELECT COLUMN_NAME FROM INFORMATION_SCHEMA.COLUMNS WHERE TABLE_SCHEMA = CURRENT_SCHEMA() AND TABLE_NAME = ?",
            &[BindValue::Text(target.name.clone())],
        )
        .await?;
    let mut present = Vec::with_capacity(existing.num_rows());
    for row in 0..existing.num_rows() {
        if let Some(name) = existing.text_at(row, 0)? {
            present.push(name.to_ascii_uppercase());
        }
    }
    let mut added = Vec::new();
    for column in target.def.columns {
        if present.iter().any(|p| p == column.name) {
            continue;
        }
        client
            .execute(&TableDef::add_column(&target.name, column), &[])
            .await
            .map_err(|source| LoadError::AddColumn {
                table: target.name.clone(),
                column: column.name,
                source: Box::new(source),
            })?;
        info!(
            component = "snowflake",
            table = %target.name,
            column = column.name,
            "added a column the table lacked (nullable; earlier rows read it as null)"
        );
        added.push(column.name.to_owned());
    }
    client
        .execute(&create_control_table(CONTROL_TABLE), &[])
        .await?;
    // Snowflake does not enforce primary keys, so the row is only added when it is missing.
    client
        .execute(
            &format!(
                "INSERT INTO {CONTROL_TABLE} (TABLE_NAME, LAST_VERSION, LOADED_AT) SELECT ?, -1, SYSDATE() WHERE NOT EXISTS (SELECT 1 FROM {CONTROL_TABLE} WHERE TABLE_NAME = ?)"
            ),
            &[
                BindValue::Text(target.name.clone()),
                BindValue::Text(target.name.clone()),
            ],
        )
        .await?;
    Ok(added)
}

async fn read_watermark(client: &mut SnowflakeClient, target: &str) -> Result<i64, SnowflakeError> {
    let result = client
        .execute(
            &format!("SELECT MAX(LAST_VERSION) FROM {CONTROL_TABLE} WHERE TABLE_NAME = ?"),
            &[BindValue::Text(target.to_owned())],
        )
        .await?;
    Ok(result.i64_at(0, 0)?.unwrap_or(-1))
}

/// True for failures a new session and another try may get past.
fn is_retryable(e: &LoadError) -> bool {
    matches!(e, LoadError::Snowflake(e) if e.is_transient() || e.is_session_gone())
}

/// Applies one group in one transaction, retrying the whole transaction in a new session after
/// transient failures, and returns the new watermark.
async fn apply_group(
    client: &mut SnowflakeClient,
    cfg: &SnowflakeConfig,
    (target, store): (&Target<'_>, &dyn ObjectStore),
    watermark: i64,
    group: Group,
    report: &mut LoadReport,
) -> Result<i64, LoadError> {
    let versions = group
        .versions
        .clone()
        .expect("a group is applied only after a version joined it");
    let last = i64::try_from(*versions.end()).expect("Delta versions stay far below i64::MAX");
    let policy = client.retry_policy();
    let mut attempt = 1;
    let mut recovering = false;
    loop {
        let result = if recovering {
            match recover(client, target, watermark, last).await {
                Ok(true) => {
                    warn!(
                        component = "snowflake",
                        table = %target.name,
                        last_version = last,
                        "the watermark shows the earlier attempt committed; nothing redone"
                    );
                    Ok(Applied::default())
                }
                Ok(false) => {
                    try_group(
                        client,
                        cfg,
                        (target, store),
                        watermark,
                        last,
                        &group,
                        report,
                    )
                    .await
                }
                Err(e) => Err(e),
            }
        } else {
            try_group(
                client,
                cfg,
                (target, store),
                watermark,
                last,
                &group,
                report,
            )
            .await
        };
        match result {
            Ok(applied) => {
                let inserted = applied.rows_inserted;
                report.versions_loaded += versions.end() - versions.start() + 1;
                report.transactions += 1;
                report.rows_read += applied.rows_read;
                report.rows_inserted += inserted;
                report.copy_statements += applied.copy_statements;
                info!(
                    component = "snowflake",
                    table = %target.name,
                    first_version = versions.start(),
                    last_version = versions.end(),
                    rows_read = applied.rows_read,
                    rows_inserted = inserted,
                    "loaded Delta versions into Snowflake"
                );
                return Ok(last);
            }
            Err(e) if is_retryable(&e) && attempt < policy.attempts => {
                warn!(
                    component = "snowflake",
                    table = %target.name,
                    first_version = versions.start(),
                    last_version = versions.end(),
                    attempt,
                    of = policy.attempts,
                    error = %e,
                    "load transaction failed, retrying in a new session"
                );
                report.retries += 1;
                policy.wait(attempt).await;
                attempt += 1;
                recovering = true;
            }
            Err(LoadError::Snowflake(source)) if is_retryable_snowflake(&source) => {
                return Err(LoadError::Outage {
                    table: target.name.clone(),
                    first: *versions.start(),
                    last: *versions.end(),
                    attempts: attempt,
                    source: Box::new(source),
                });
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_retryable_snowflake(e: &SnowflakeError) -> bool {
    e.is_transient() || e.is_session_gone()
}

/// After a failed attempt: a new session, then the watermark decides. `true` when the group
/// is applied already (the earlier `COMMIT` went through), `false` when it must run again.
async fn recover(
    client: &mut SnowflakeClient,
    target: &Target<'_>,
    watermark: i64,
    last: i64,
) -> Result<bool, LoadError> {
    client.renew_session().await?;
    let now = read_watermark(client, &target.name).await?;
    if now == last {
        Ok(true)
    } else if now == watermark {
        Ok(false)
    } else {
        Err(LoadError::Conflict {
            table: target.name.clone(),
            expected: watermark,
        })
    }
}

/// One attempt at a group: staging table (or staged files), transaction, rows inserted.
async fn try_group(
    client: &mut SnowflakeClient,
    cfg: &SnowflakeConfig,
    (target, store): (&Target<'_>, &dyn ObjectStore),
    watermark: i64,
    last: i64,
    group: &Group,
    report: &mut LoadReport,
) -> Result<Applied, LoadError> {
    // A session about to be renewed would lose the staging table between here and the
    // transaction, so it is renewed first when its token has less than a minute to go.
    client
        .renew_if_due(std::time::Duration::from_mins(1))
        .await?;
    if target.snapshot {
        client.begin().await?;
        return match replace_in_transaction(client, cfg, target, watermark, last, group).await {
            Ok(inserted) => {
                client.commit().await?;
                Ok(Applied {
                    rows_read: group.rows_read,
                    rows_inserted: inserted,
                    copy_statements: 0,
                })
            }
            Err(e) => {
                if let Err(rollback) = client.rollback().await {
                    warn!(component = "snowflake", error = %rollback, "rollback after a failed load failed");
                }
                Err(e)
            }
        };
    }
    if target.mode != LoadMode::Rows {
        let (chunks, uploaded) =
            stage::prepare(client, cfg, target.def, &target.name, store, &group.files).await?;
        report.files_uploaded += uploaded;
        client.begin().await?;
        let applied = async {
            move_watermark(client, &target.name, watermark, last).await?;
            stage::copy_and_merge(client, cfg, target.def, &target.name, &chunks).await
        }
        .await;
        return match applied {
            Ok(counts) => {
                client.commit().await?;
                Ok(Applied {
                    rows_read: counts.rows_read,
                    rows_inserted: counts.rows_inserted,
                    copy_statements: counts.copy_statements,
                })
            }
            Err(e) => {
                if let Err(rollback) = client.rollback().await {
                    warn!(component = "snowflake", error = %rollback, "rollback after a failed load failed");
                }
                Err(e)
            }
        };
    }
    let staging = format!("{}_STAGING", target.name);
    // DDL commits an open transaction in Snowflake, so the session's staging table is made
    // before the transaction starts; it lives until the session ends.
    client
        .execute(
            &format!(
                "CREATE TEMPORARY TABLE IF NOT EXISTS {staging} ({})",
                target.def.column_list()
            ),
            &[],
        )
        .await?;
    client.begin().await?;
    match apply_in_transaction(client, cfg, target, &staging, watermark, last, group).await {
        Ok(inserted) => {
            client.commit().await?;
            Ok(Applied {
                rows_read: group.rows_read,
                rows_inserted: inserted,
                copy_statements: 0,
            })
        }
        Err(e) => {
            if let Err(rollback) = client.rollback().await {
                warn!(component = "snowflake", error = %rollback, "rollback after a failed load failed");
            }
            Err(e)
        }
    }
}

async fn apply_in_transaction(
    client: &mut SnowflakeClient,
    cfg: &SnowflakeConfig,
    target: &Target<'_>,
    staging: &str,
    watermark: i64,
    last: i64,
    group: &Group,
) -> Result<u64, LoadError> {
    let name = &target.name;
    move_watermark(client, name, watermark, last).await?;
    if group.rows.is_empty() {
        return Ok(0);
    }
    client
        .execute(&format!("DELETE FROM {staging}"), &[])
        .await?;
    let names = target.def.names();
    let row_marker = format!("({})", vec!["?"; target.def.columns.len()].join(", "));
    let rows: Vec<&Vec<BindValue>> = group.rows.values().collect();
    for chunk in rows.chunks(cfg.insert_chunk_rows) {
        let placeholders = vec![row_marker.as_str(); chunk.len()].join(", ");
        let bindings: Vec<BindValue> = chunk.iter().flat_map(|r| r.iter().cloned()).collect();
        client
            .execute(
                &format!("INSERT INTO {staging} ({names}) VALUES {placeholders}"),
                &bindings,
            )
            .await?;
    }
    let source_columns = target
        .def
        .columns
        .iter()
        .map(|c| format!("s.{}", c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let matches = target
        .def
        .key
        .iter()
        .map(|k| format!("t.{k} = s.{k}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let inserted = client
        .execute(
            &format!(
                "INSERT INTO {name} ({names}) SELECT {source_columns} FROM {staging} s WHERE NOT EXISTS (SELECT 1 FROM {name} t WHERE {matches})"
            ),
            &[],
        )
        .await?;
    Ok(inserted.rows_affected().unwrap_or(0))
}

/// The snapshot replace of the tags table: watermark, `DELETE`, then the snapshot's rows in
/// chunks, all in the caller's transaction, so readers see the old snapshot or the new one.
/// Returns the rows inserted.
async fn replace_in_transaction(
    client: &mut SnowflakeClient,
    cfg: &SnowflakeConfig,
    target: &Target<'_>,
    watermark: i64,
    last: i64,
    group: &Group,
) -> Result<u64, LoadError> {
    let name = &target.name;
    move_watermark(client, name, watermark, last).await?;
    client.execute(&format!("DELETE FROM {name}"), &[]).await?;
    let names = target.def.names();
    let row_marker = format!("({})", vec!["?"; target.def.columns.len()].join(", "));
    let rows: Vec<&Vec<BindValue>> = group.rows.values().collect();
    let mut inserted = 0;
    for chunk in rows.chunks(cfg.insert_chunk_rows) {
        let placeholders = vec![row_marker.as_str(); chunk.len()].join(", ");
        let bindings: Vec<BindValue> = chunk.iter().flat_map(|r| r.iter().cloned()).collect();
        let result = client
            .execute(
                &format!("INSERT INTO {name} ({names}) VALUES {placeholders}"),
                &bindings,
            )
            .await?;
        inserted += result.rows_affected().unwrap_or(chunk.len() as u64);
    }
    Ok(inserted)
}

/// Moves `name`'s watermark from `watermark` to `last`, the first statement of a load
/// transaction. Taking the control row's lock first makes a second loader wait here and then
/// find the watermark moved, instead of inserting the same versions.
async fn move_watermark(
    client: &mut SnowflakeClient,
    name: &str,
    watermark: i64,
    last: i64,
) -> Result<(), LoadError> {
    let moved = client
        .execute(
            &format!(
                "UPDATE {CONTROL_TABLE} SET LAST_VERSION = ?, LOADED_AT = SYSDATE() WHERE TABLE_NAME = ? AND LAST_VERSION = ?"
            ),
            &[
                BindValue::Fixed(last),
                BindValue::Text(name.to_owned()),
                BindValue::Fixed(watermark),
            ],
        )
        .await?;
    if moved.rows_affected().unwrap_or(0) == 0 {
        return Err(LoadError::Conflict {
            table: name.to_owned(),
            expected: watermark,
        });
    }
    Ok(())
}

/// The rows a file holds by its Delta statistics (`numRecords`); 0 when they are missing.
fn records_in(stats: Option<&str>) -> u64 {
    stats
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .and_then(|v| v.get("numRecords").and_then(serde_json::Value::as_u64))
        .unwrap_or(0)
}

async fn read_file(
    store: &dyn deltalake::ObjectStore,
    def: &TableDef,
    version: u64,
    file: &str,
    partition_values: &HashMap<String, Option<String>>,
) -> Result<Vec<Vec<BindValue>>, LoadError> {
    let path = Path::from_url_path(file).map_err(|e| LoadError::ReadFile {
        version,
        file: file.to_owned(),
        source: e.into(),
    })?;
    read_object(store, def, version, file, &path, partition_values).await
}

/// [`read_file`] with the object's path already decoded; `file` names it in errors.
async fn read_object(
    store: &dyn deltalake::ObjectStore,
    def: &TableDef,
    version: u64,
    file: &str,
    path: &Path,
    partition_values: &HashMap<String, Option<String>>,
) -> Result<Vec<Vec<BindValue>>, LoadError> {
    let read_err = |source| LoadError::ReadFile {
        version,
        file: file.to_owned(),
        source,
    };
    let bytes = store
        .get(path)
        .await
        .map_err(read_err)?
        .bytes()
        .await
        .map_err(read_err)?;
    let parquet_err = |source| LoadError::Parquet {
        version,
        file: file.to_owned(),
        source,
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(parquet_err)?
        .build()
        .map_err(parquet_err)?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| parquet_err(e.into()))?;
        let reader = BatchColumns {
            batch: &batch,
            partition_values,
            version,
            file,
        };
        reader.append_rows(def, &mut rows)?;
    }
    Ok(rows)
}

/// Reads a table's columns out of one record batch by name, so extra columns the Delta table
/// may carry do not matter, string columns the table partitions by come from the file's
/// partition values, and columns added after the file was written read as null.
struct BatchColumns<'a> {
    batch: &'a RecordBatch,
    partition_values: &'a HashMap<String, Option<String>>,
    version: u64,
    file: &'a str,
}

/// Where one column's values come from.
enum Source<'a> {
    Array(&'a ArrayRef),
    Partition(Option<&'a str>),
    /// A column added to the table after this file was written.
    Absent,
}

impl<'a> BatchColumns<'a> {
    fn problem(&self, column: &'static str, problem: impl Into<String>) -> LoadError {
        LoadError::Column {
            version: self.version,
            file: self.file.to_owned(),
            column,
            problem: problem.into(),
        }
    }

    fn source(&self, column: &Column) -> Result<Source<'a>, LoadError> {
        if let Ok(i) = self.batch.schema_ref().index_of(column.delta) {
            let array = self.batch.column(i);
            let fits = matches!(
                (column.kind, array.data_type()),
                (Kind::Int, DataType::Int64 | DataType::Int32)
                    | (Kind::Float, DataType::Float64 | DataType::Float32)
                    | (Kind::Timestamp, DataType::Timestamp(_, _))
                    | (
                        Kind::Text,
                        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                    )
            );
            if !fits {
                let expected = match column.kind {
                    Kind::Int => "Int64",
                    Kind::Float => "Float64",
                    Kind::Timestamp => "a timestamp",
                    Kind::Text => "a string",
                };
                return Err(self.problem(
                    column.delta,
                    format!("has type {}, expected {expected}", array.data_type()),
                ));
            }
            return Ok(Source::Array(array));
        }
        if column.kind == Kind::Text
            && let Some(value) = self.partition_values.get(column.delta)
        {
            return Ok(Source::Partition(value.as_deref()));
        }
        if column.presence == Presence::Added {
            return Ok(Source::Absent);
        }
        Err(self.problem(column.delta, "is missing"))
    }

    fn append_rows(&self, def: &TableDef, rows: &mut Vec<Vec<BindValue>>) -> Result<(), LoadError> {
        let sources = def
            .columns
            .iter()
            .map(|c| self.source(c))
            .collect::<Result<Vec<_>, _>>()?;
        rows.reserve(self.batch.num_rows());
        for i in 0..self.batch.num_rows() {
            let mut row = Vec::with_capacity(def.columns.len());
            for (column, source) in def.columns.iter().zip(&sources) {
                let value = Self::value_at(column, source, i);
                if value == BindValue::Null && column.presence == Presence::Required {
                    return Err(self.problem(column.delta, format!("is null at row {i}")));
                }
                row.push(value);
            }
            rows.push(row);
        }
        Ok(())
    }

    fn value_at(column: &Column, source: &Source<'_>, i: usize) -> BindValue {
        let array = match source {
            Source::Absent => return BindValue::Null,
            Source::Partition(value) => {
                return value.map_or(BindValue::Null, |v| BindValue::Text(v.to_owned()));
            }
            Source::Array(array) if array.is_null(i) => return BindValue::Null,
            Source::Array(array) => array,
        };
        // `source` checked the type against the column's kind.
        match (column.kind, array.data_type()) {
            (Kind::Int, DataType::Int32) => {
                BindValue::Fixed(i64::from(array.as_primitive::<Int32Type>().value(i)))
            }
            (Kind::Int, _) => BindValue::Fixed(array.as_primitive::<Int64Type>().value(i)),
            (Kind::Float, DataType::Float32) => {
                BindValue::Real(f64::from(array.as_primitive::<Float32Type>().value(i)))
            }
            (Kind::Float, _) => BindValue::Real(array.as_primitive::<Float64Type>().value(i)),
            (Kind::Timestamp, DataType::Timestamp(unit, _)) => {
                BindValue::TimestampTzMicros(match unit {
                    TimeUnit::Microsecond => {
                        array.as_primitive::<TimestampMicrosecondType>().value(i)
                    }
                    TimeUnit::Nanosecond => array
                        .as_primitive::<TimestampNanosecondType>()
                        .value(i)
                        .div_euclid(1000),
                    TimeUnit::Millisecond => array
                        .as_primitive::<TimestampMillisecondType>()
                        .value(i)
                        .saturating_mul(1000),
                    TimeUnit::Second => array
                        .as_primitive::<TimestampSecondType>()
                        .value(i)
                        .saturating_mul(1_000_000),
                })
            }
            (_, DataType::LargeUtf8) => {
                BindValue::Text(array.as_string::<i64>().value(i).to_owned())
            }
            (_, DataType::Utf8View) => BindValue::Text(array.as_string_view().value(i).to_owned()),
            _ => BindValue::Text(array.as_string::<i32>().value(i).to_owned()),
        }
    }
}
