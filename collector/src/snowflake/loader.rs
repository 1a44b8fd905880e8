//! Follows the Delta table's versions into Snowflake, exactly once.
//!
//! For every Delta version after the one recorded in the control table, the files the version
//! added with `dataChange = true` are read and, in one Snowflake transaction, staged in a
//! temporary table, inserted into the readings table where (`GATEWAY`, `SEQ`) is new, and the
//! control table is moved to that version. Small versions share a transaction.
//!
//! The insert is `INSERT ... SELECT ... WHERE NOT EXISTS`, which is exactly `MERGE ... WHEN NOT
//! MATCHED THEN INSERT` on the merge key; it is written that way because it behaves the same
//! in every SQL engine that speaks the protocol, including local stand-ins whose `MERGE` cannot
//! run inside an explicit transaction. Concurrent loaders are kept apart by the control-table
//! update that opens each transaction (see the module invariants in `snowflake`).

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
use deltalake::{DeltaTable, DeltaTableError, ObjectStoreError, Path};
use edge_agent::contract::column;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::errors::ParquetError;
use tracing::{info, warn};

use super::client::{BindValue, SnowflakeClient, SnowflakeError};
use super::config::{CONTROL_TABLE, SnowflakeConfig};
use super::ddl::{
    READINGS_COLUMNS, create_control_table, create_readings_table, readings_column_list,
};

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
        "another loader moved {table}'s load watermark away from version {expected} while this one was loading; nothing was applied, run the load again"
    )]
    Conflict { table: String, expected: i64 },
}

/// What one call to [`load`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadReport {
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
    /// Rows inserted into the readings table; rows already there (replays) are not counted.
    pub rows_inserted: u64,
}

/// One reading on its way to Snowflake, in the contract's columns.
#[derive(Debug, Clone, PartialEq)]
struct StagedRow {
    seq: i64,
    ts_us: i64,
    site: String,
    gateway: String,
    device: String,
    tag: String,
    value: Option<f64>,
    quality: String,
    unit: Option<String>,
}

/// Delta versions waiting for one transaction, keyed by (gateway, seq) so a row that two
/// versions both carry is staged once.
#[derive(Default)]
struct Group {
    versions: Option<RangeInclusive<u64>>,
    rows: BTreeMap<(String, i64), StagedRow>,
    rows_read: u64,
}

/// Loads every Delta version of `table` that Snowflake does not hold yet.
///
/// `table` may be stale: the loader reads the log up to its latest version. Creates the readings
/// table and the control table when they are missing.
pub async fn load(
    client: &mut SnowflakeClient,
    table: &DeltaTable,
    cfg: &SnowflakeConfig,
) -> Result<LoadReport, LoadError> {
    let problems = cfg.problems();
    if !problems.is_empty() {
        return Err(LoadError::Config { problems });
    }
    let target = cfg.table_name();
    let table_uri = table.log_store().root_url().to_string();
    let delta_err = |source| LoadError::Delta {
        table: table_uri.clone(),
        source,
    };

    create_tables(client, &target).await?;
    let previous = read_watermark(client, &target).await?;

    let mut latest_table = table.clone();
    latest_table.load().await.map_err(delta_err)?;
    let latest = latest_table.version();

    let mut report = LoadReport {
        previous_version: u64::try_from(previous).ok(),
        loaded_version: u64::try_from(previous).ok(),
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
            let rows = read_file(store.as_ref(), version, &add.path, &add.partition_values).await?;
            group.rows_read += rows.len() as u64;
            for row in rows {
                group
                    .rows
                    .entry((row.gateway.clone(), row.seq))
                    .or_insert(row);
            }
        }
        group.versions = Some(match group.versions.take() {
            Some(range) => *range.start()..=version,
            None => version..=version,
        });
        if group.rows.len() >= cfg.rows_per_transaction || version == latest {
            let applied = std::mem::take(&mut group);
            watermark = apply_group(client, cfg, &target, watermark, applied, &mut report).await?;
        }
    }
    report.loaded_version = u64::try_from(watermark).ok();
    Ok(report)
}

async fn create_tables(client: &mut SnowflakeClient, target: &str) -> Result<(), SnowflakeError> {
    // `collector snowflake init` creates the same tables from the same definitions.
    client.execute(&create_readings_table(target), &[]).await?;
    client
        .execute(&create_control_table(CONTROL_TABLE), &[])
        .await?;
    // Snowflake does not enforce primary keys, so the row is only added when it is missing.
    client
        .execute(
            &format!(
                "INSERT INTO {CONTROL_TABLE} (TABLE_NAME, LAST_VERSION, LOADED_AT) SELECT ?, -1, SYSDATE() WHERE NOT EXISTS (SELECT 1 FROM {CONTROL_TABLE} WHERE TABLE_NAME = ?)"
            ),
            &[BindValue::Text(target.to_owned()), BindValue::Text(target.to_owned())],
        )
        .await?;
    Ok(())
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

/// Applies one group in one transaction and returns the new watermark.
async fn apply_group(
    client: &mut SnowflakeClient,
    cfg: &SnowflakeConfig,
    target: &str,
    watermark: i64,
    group: Group,
    report: &mut LoadReport,
) -> Result<i64, LoadError> {
    let versions = group
        .versions
        .clone()
        .expect("a group is applied only after a version joined it");
    let last = i64::try_from(*versions.end()).expect("Delta versions stay far below i64::MAX");
    let staging = format!("{target}_STAGING");
    let columns = readings_column_list();
    // DDL commits an open transaction in Snowflake, so the session's staging table is made
    // before the transaction starts; it lives until the session ends.
    client
        .execute(
            &format!("CREATE TEMPORARY TABLE IF NOT EXISTS {staging} ({columns})"),
            &[],
        )
        .await?;

    client.begin().await?;
    match apply_in_transaction(client, cfg, target, &staging, watermark, last, &group).await {
        Ok(inserted) => {
            client.commit().await?;
            report.versions_loaded += versions.end() - versions.start() + 1;
            report.transactions += 1;
            report.rows_read += group.rows_read;
            report.rows_inserted += inserted;
            info!(
                component = "snowflake",
                table = target,
                first_version = versions.start(),
                last_version = versions.end(),
                rows_read = group.rows_read,
                rows_inserted = inserted,
                "loaded Delta versions into Snowflake"
            );
            Ok(last)
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
    target: &str,
    staging: &str,
    watermark: i64,
    last: i64,
    group: &Group,
) -> Result<u64, LoadError> {
    // Moving the watermark first takes the control row's lock: a second loader waits here
    // and then finds the watermark moved, instead of inserting the same versions.
    let moved = client
        .execute(
            &format!(
                "UPDATE {CONTROL_TABLE} SET LAST_VERSION = ?, LOADED_AT = SYSDATE() WHERE TABLE_NAME = ? AND LAST_VERSION = ?"
            ),
            &[
                BindValue::Fixed(last),
                BindValue::Text(target.to_owned()),
                BindValue::Fixed(watermark),
            ],
        )
        .await?;
    if moved.rows_affected().unwrap_or(0) == 0 {
        return Err(LoadError::Conflict {
            table: target.to_owned(),
            expected: watermark,
        });
    }
    if group.rows.is_empty() {
        return Ok(0);
    }
    client
        .execute(&format!("DELETE FROM {staging}"), &[])
        .await?;
    let names = READINGS_COLUMNS
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ");
    let rows: Vec<&StagedRow> = group.rows.values().collect();
    for chunk in rows.chunks(cfg.insert_chunk_rows) {
        let placeholders = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
        let bindings: Vec<BindValue> = chunk.iter().flat_map(|r| bindings_of(r)).collect();
        client
            .execute(
                &format!("INSERT INTO {staging} ({names}) VALUES {placeholders}"),
                &bindings,
            )
            .await?;
    }
    let source_columns = READINGS_COLUMNS
        .iter()
        .map(|(name, _)| format!("s.{name}"))
        .collect::<Vec<_>>()
        .join(", ");
    let inserted = client
        .execute(
            &format!(
                "INSERT INTO {target} ({names}) SELECT {source_columns} FROM {staging} s WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE t.GATEWAY = s.GATEWAY AND t.SEQ = s.SEQ)"
            ),
            &[],
        )
        .await?;
    Ok(inserted.rows_affected().unwrap_or(0))
}

fn bindings_of(row: &StagedRow) -> [BindValue; 9] {
    let text_or_null = |v: &Option<String>| v.clone().map_or(BindValue::Null, BindValue::Text);
    [
        BindValue::Fixed(row.seq),
        BindValue::TimestampTzMicros(row.ts_us),
        BindValue::Text(row.site.clone()),
        BindValue::Text(row.gateway.clone()),
        BindValue::Text(row.device.clone()),
        BindValue::Text(row.tag.clone()),
        row.value.map_or(BindValue::Null, BindValue::Real),
        BindValue::Text(row.quality.clone()),
        text_or_null(&row.unit),
    ]
}

async fn read_file(
    store: &dyn deltalake::ObjectStore,
    version: u64,
    file: &str,
    partition_values: &HashMap<String, Option<String>>,
) -> Result<Vec<StagedRow>, LoadError> {
    let path = Path::from_url_path(file).map_err(|e| LoadError::ReadFile {
        version,
        file: file.to_owned(),
        source: e.into(),
    })?;
    let read_err = |source| LoadError::ReadFile {
        version,
        file: file.to_owned(),
        source,
    };
    let bytes = store
        .get(&path)
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
        reader.append_rows(&mut rows)?;
    }
    Ok(rows)
}

/// Reads the contract's columns out of one record batch by name, so extra columns the Delta
/// table may carry do not matter, and string columns the table partitions by come from the
/// file's partition values.
struct BatchColumns<'a> {
    batch: &'a RecordBatch,
    partition_values: &'a HashMap<String, Option<String>>,
    version: u64,
    file: &'a str,
}

enum StringSource<'a> {
    Array(&'a ArrayRef),
    Partition(Option<&'a str>),
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

    fn array(&self, name: &'static str) -> Option<&'a ArrayRef> {
        self.batch
            .schema_ref()
            .index_of(name)
            .ok()
            .map(|i| self.batch.column(i))
    }

    fn strings(&self, name: &'static str) -> Result<StringSource<'a>, LoadError> {
        if let Some(array) = self.array(name) {
            return match array.data_type() {
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                    Ok(StringSource::Array(array))
                }
                other => Err(self.problem(name, format!("has type {other}, expected a string"))),
            };
        }
        match self.partition_values.get(name) {
            Some(value) => Ok(StringSource::Partition(value.as_deref())),
            None => Err(self.problem(name, "is missing")),
        }
    }

    fn string_at(source: &StringSource<'a>, i: usize) -> Option<String> {
        match source {
            StringSource::Partition(value) => value.map(str::to_owned),
            StringSource::Array(array) if array.is_null(i) => None,
            StringSource::Array(array) => Some(
                match array.data_type() {
                    DataType::LargeUtf8 => array.as_string::<i64>().value(i),
                    DataType::Utf8View => array.as_string_view().value(i),
                    _ => array.as_string::<i32>().value(i),
                }
                .to_owned(),
            ),
        }
    }

    fn append_rows(&self, rows: &mut Vec<StagedRow>) -> Result<(), LoadError> {
        let seq = self
            .array(column::SEQ)
            .ok_or_else(|| self.problem(column::SEQ, "is missing"))?;
        let ts = self
            .array(column::TS)
            .ok_or_else(|| self.problem(column::TS, "is missing"))?;
        let value = self
            .array(column::VALUE)
            .ok_or_else(|| self.problem(column::VALUE, "is missing"))?;
        let site = self.strings(column::SITE)?;
        let gateway = self.strings(column::GATEWAY)?;
        let device = self.strings(column::DEVICE)?;
        let tag = self.strings(column::TAG)?;
        let quality = self.strings(column::QUALITY)?;
        let unit = self.strings(column::UNIT)?;

        rows.reserve(self.batch.num_rows());
        for i in 0..self.batch.num_rows() {
            let required = |source: &StringSource<'a>, name: &'static str| {
                Self::string_at(source, i)
                    .ok_or_else(|| self.problem(name, format!("is null at row {i}")))
            };
            rows.push(StagedRow {
                seq: self.seq_at(seq, i)?,
                ts_us: self.ts_at(ts, i)?,
                site: required(&site, column::SITE)?,
                gateway: required(&gateway, column::GATEWAY)?,
                device: required(&device, column::DEVICE)?,
                tag: required(&tag, column::TAG)?,
                value: self.value_at(value, i)?,
                quality: required(&quality, column::QUALITY)?,
                unit: Self::string_at(&unit, i),
            });
        }
        Ok(())
    }

    fn seq_at(&self, array: &ArrayRef, i: usize) -> Result<i64, LoadError> {
        if array.is_null(i) {
            return Err(self.problem(column::SEQ, format!("is null at row {i}")));
        }
        match array.data_type() {
            DataType::Int64 => Ok(array.as_primitive::<Int64Type>().value(i)),
            DataType::Int32 => Ok(i64::from(array.as_primitive::<Int32Type>().value(i))),
            other => Err(self.problem(column::SEQ, format!("has type {other}, expected Int64"))),
        }
    }

    fn ts_at(&self, array: &ArrayRef, i: usize) -> Result<i64, LoadError> {
        if array.is_null(i) {
            return Err(self.problem(column::TS, format!("is null at row {i}")));
        }
        match array.data_type() {
            DataType::Timestamp(TimeUnit::Microsecond, _) => {
                Ok(array.as_primitive::<TimestampMicrosecondType>().value(i))
            }
            DataType::Timestamp(TimeUnit::Nanosecond, _) => Ok(array
                .as_primitive::<TimestampNanosecondType>()
                .value(i)
                .div_euclid(1000)),
            DataType::Timestamp(TimeUnit::Millisecond, _) => Ok(array
                .as_primitive::<TimestampMillisecondType>()
                .value(i)
                .saturating_mul(1000)),
            DataType::Timestamp(TimeUnit::Second, _) => Ok(array
                .as_primitive::<TimestampSecondType>()
                .value(i)
                .saturating_mul(1_000_000)),
            other => Err(self.problem(
                column::TS,
                format!("has type {other}, expected a timestamp"),
            )),
        }
    }

    fn value_at(&self, array: &ArrayRef, i: usize) -> Result<Option<f64>, LoadError> {
        if array.is_null(i) {
            return Ok(None);
        }
        match array.data_type() {
            DataType::Float64 => Ok(Some(array.as_primitive::<Float64Type>().value(i))),
            DataType::Float32 => Ok(Some(f64::from(
                array.as_primitive::<Float32Type>().value(i),
            ))),
            other => {
                Err(self.problem(column::VALUE, format!("has type {other}, expected Float64")))
            }
        }
    }
}
