//! Loading the readings table from files in a stage instead of rows in bindings: Snowflake
//! reads the Parquet files the Delta versions added itself, so no row crosses the collector.
//!
//! For a group of Delta versions, before the transaction:
//! - `internal_stage`: every added file is uploaded with `PUT` under a prefix of its own
//!   (`<stage>/readings/<attempt id>/<chunk>/`), so a retried attempt never meets files of an
//!   earlier one; the `COPY` of a chunk loads its whole prefix and purges it.
//! - `external_stage`: nothing moves; files are named relative to the stage, which points at the
//!   Delta table's root, exactly as the Delta log names them.
//!
//! Then, inside the loader's transaction (after the watermark moved), per chunk of at most
//! `copy_chunk_files` files that share their partition values: the landing table is emptied,
//! `COPY INTO` fills it (`MATCH_BY_COLUMN_NAME`, so columns a file lacks, such as ones added
//! after it was written, read as null), and the rows whose merge key is new are inserted into the
//! target, partition columns taken from the Delta add action.
//!
//! # Invariants
//! - Every `COPY` runs with `FORCE = TRUE`: Snowflake's load history would otherwise skip a file
//!   an earlier, rolled-back attempt loaded, silently losing its rows. Exactly-once comes from
//!   the watermark and the merge key, never from the load history.
//! - A `COPY` must report every file it was given as `LOADED`, or the transaction fails.
//! - The landing table is emptied before each `COPY` and after the last, and only written inside
//!   the transaction that moves the watermark, so two loaders never mix their rows in it.

use std::collections::{BTreeMap, HashMap};

use deltalake::logstore::object_store::ObjectStoreExt as _;
use deltalake::{ObjectStore, Path};
use tracing::debug;

use super::client::{BindValue, QueryResult, SnowflakeClient};
use super::config::{LoadMode, SnowflakeConfig};
use super::ddl::{Kind, TableDef};
use super::loader::LoadError;

/// A file a Delta version added with `dataChange = true`.
#[derive(Debug, Clone)]
pub(super) struct AddedFile {
    pub(super) version: u64,
    /// The path as the Delta log writes it: relative to the table root, URL-encoded.
    pub(super) path: String,
    pub(super) partition_values: HashMap<String, Option<String>>,
}

/// Files one `COPY INTO` loads, all with the same partition values.
#[derive(Debug)]
pub(super) struct Chunk {
    /// The stage location after `FROM`, with `@`.
    from: String,
    /// The `FILES` list, relative to `from`; empty means every file under `from`.
    files: Vec<String>,
    /// How many files the `COPY` must report as loaded.
    expected_files: usize,
    /// Partition values of the target's text columns, in column order.
    partition: Vec<(&'static str, Option<String>)>,
}

/// What the stage path did in one attempt.
#[derive(Debug, Default)]
pub(super) struct StageCounts {
    pub(super) rows_read: u64,
    pub(super) rows_inserted: u64,
    pub(super) copy_statements: u64,
}

/// The table `COPY` fills for `target`: the target's columns, all nullable, since partition
/// columns are not in the files and are filled in by the merge.
pub(super) fn landing_table(target: &str) -> String {
    format!("{target}_LANDING")
}

/// Before the transaction: creates the landing table, uploads the files (internal stage) and
/// splits them into `COPY` chunks. Returns the chunks and how many files were uploaded.
pub(super) async fn prepare(
    client: &mut SnowflakeClient,
    cfg: &SnowflakeConfig,
    def: &TableDef,
    target: &str,
    store: &dyn ObjectStore,
    files: &[AddedFile],
) -> Result<(Vec<Chunk>, u64), LoadError> {
    let columns = def
        .columns
        .iter()
        .map(|c| format!("{} {}", c.name, c.kind.sql_type()))
        .collect::<Vec<_>>()
        .join(", ");
    // DDL commits an open transaction, so this runs before it; TRANSIENT because the rows
    // only pass through, and fail-safe storage for them would be paid for nothing.
    client
        .execute(
            &format!(
                "CREATE TRANSIENT TABLE IF NOT EXISTS {} ({columns})",
                landing_table(target)
            ),
            &[],
        )
        .await?;

    let mut by_partition: BTreeMap<Vec<(&'static str, Option<String>)>, Vec<&AddedFile>> =
        BTreeMap::new();
    for file in files {
        by_partition
            .entry(partition_of(def, file))
            .or_default()
            .push(file);
    }
    let attempt = uuid::Uuid::new_v4().simple();
    let mut chunks = Vec::new();
    let mut uploaded = 0;
    for (partition, files) in by_partition {
        for group in files.chunks(cfg.copy_chunk_files) {
            let chunk = match cfg.load_mode {
                LoadMode::ExternalStage => {
                    let stage = cfg
                        .external_stage
                        .as_deref()
                        .expect("validation requires external_stage with this mode");
                    Chunk {
                        from: format!("@{stage}/"),
                        files: group
                            .iter()
                            .map(|f| object_path(f).map(|p| p.to_string()))
                            .collect::<Result<_, _>>()?,
                        expected_files: group.len(),
                        partition: partition.clone(),
                    }
                }
                LoadMode::InternalStage | LoadMode::Rows => {
                    let dir = format!(
                        "{}/{}/{attempt}/{}/",
                        cfg.internal_stage,
                        def.label,
                        chunks.len()
                    );
                    for (i, file) in group.iter().enumerate() {
                        let bytes = read(store, file).await?;
                        client.put(&dir, &format!("{i:04}.parquet"), bytes).await?;
                        uploaded += 1;
                    }
                    debug!(component = "snowflake", stage = %dir, files = group.len(), "files uploaded");
                    Chunk {
                        from: format!("@{dir}"),
                        files: Vec::new(),
                        expected_files: group.len(),
                        partition: partition.clone(),
                    }
                }
            };
            chunks.push(chunk);
        }
    }
    Ok((chunks, uploaded))
}

/// Inside the transaction: `COPY` each chunk into the landing table and insert its new rows.
pub(super) async fn copy_and_merge(
    client: &mut SnowflakeClient,
    cfg: &SnowflakeConfig,
    def: &TableDef,
    target: &str,
    chunks: &[Chunk],
) -> Result<StageCounts, LoadError> {
    let landing = landing_table(target);
    let names = def.names();
    let mut counts = StageCounts::default();
    for chunk in chunks {
        client
            .execute(&format!("DELETE FROM {landing}"), &[])
            .await?;
        let files = if chunk.files.is_empty() {
            String::new()
        } else {
            let quoted: Vec<String> = chunk
                .files
                .iter()
                .map(|f| format!("'{}'", f.replace('\'', "''")))
                .collect();
            format!(" FILES = ({})", quoted.join(", "))
        };
        let purge = if cfg.load_mode == LoadMode::InternalStage {
            " PURGE = TRUE"
        } else {
            ""
        };
        let copy = format!(
            "COPY INTO {landing} FROM {}{files} FILE_FORMAT = (TYPE = PARQUET) MATCH_BY_COLUMN_NAME = CASE_INSENSITIVE FORCE = TRUE{purge}",
            chunk.from
        );
        let answer = client.execute(&copy, &[]).await?;
        counts.copy_statements += 1;
        counts.rows_read += loaded_rows(&answer, chunk)?;

        let mut bindings = Vec::new();
        let exprs = def
            .columns
            .iter()
            .map(|c| {
                match chunk.partition.iter().find(|(name, _)| *name == c.name) {
                    // the file's own value wins, as when the rows path reads a file
                    Some((_, value)) => {
                        bindings.push(value.clone().map_or(BindValue::Null, BindValue::Text));
                        format!("COALESCE({0}, CAST(? AS VARCHAR)) AS {0}", c.name)
                    }
                    None => c.name.to_owned(),
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let key = def.key.join(", ");
        let source_columns = def
            .columns
            .iter()
            .map(|c| format!("s.{}", c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let matches = def
            .key
            .iter()
            .map(|k| format!("t.{k} = s.{k}"))
            .collect::<Vec<_>>()
            .join(" AND ");
        // ROW_NUMBER keeps one row per merge key when two files of a chunk carry the same row
        let inserted = client
            .execute(
                &format!(
                    "INSERT INTO {target} ({names}) SELECT {source_columns} FROM (SELECT d.*, ROW_NUMBER() OVER (PARTITION BY {key} ORDER BY {key}) AS PLANTLINE_ROW FROM (SELECT {exprs} FROM {landing}) d) s WHERE s.PLANTLINE_ROW = 1 AND NOT EXISTS (SELECT 1 FROM {target} t WHERE {matches})"
                ),
                &bindings,
            )
            .await?;
        counts.rows_inserted += inserted.rows_affected().unwrap_or(0);
    }
    client
        .execute(&format!("DELETE FROM {landing}"), &[])
        .await?;
    Ok(counts)
}

/// The rows a `COPY` loaded; an error unless it loaded every file of the chunk.
fn loaded_rows(answer: &QueryResult, chunk: &Chunk) -> Result<u64, LoadError> {
    let column = |name: &str| {
        answer
            .columns
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(name))
    };
    let problem = |detail: String| LoadError::Copy {
        from: chunk.from.clone(),
        detail,
    };
    let (Some(file_col), Some(status_col), Some(rows_col)) =
        (column("file"), column("status"), column("rows_loaded"))
    else {
        return Err(problem(format!(
            "no file was loaded, {} expected; the stage holds none of them",
            chunk.expected_files
        )));
    };
    let mut rows = 0;
    for i in 0..answer.num_rows() {
        let status = answer.text_at(i, status_col)?.unwrap_or_default();
        if !status.eq_ignore_ascii_case("LOADED") {
            let file = answer.text_at(i, file_col)?.unwrap_or_default();
            return Err(problem(format!("`{file}` came back {status}")));
        }
        rows += u64::try_from(answer.i64_at(i, rows_col)?.unwrap_or(0)).unwrap_or(0);
    }
    if answer.num_rows() != chunk.expected_files {
        return Err(problem(format!(
            "{} files were loaded, {} expected",
            answer.num_rows(),
            chunk.expected_files
        )));
    }
    Ok(rows)
}

/// The partition values of `def`'s text columns that `file` has, in column order.
fn partition_of(def: &TableDef, file: &AddedFile) -> Vec<(&'static str, Option<String>)> {
    def.columns
        .iter()
        .filter(|c| c.kind == Kind::Text)
        .filter_map(|c| {
            file.partition_values
                .get(c.delta)
                .map(|v| (c.name, v.clone()))
        })
        .collect()
}

/// The file's path relative to the table root, decoded, as an object store (and a stage over
/// the same root) names it.
fn object_path(file: &AddedFile) -> Result<Path, LoadError> {
    Path::from_url_path(&file.path).map_err(|e| LoadError::ReadFile {
        version: file.version,
        file: file.path.clone(),
        source: e.into(),
    })
}

async fn read(store: &dyn ObjectStore, file: &AddedFile) -> Result<Vec<u8>, LoadError> {
    let path = object_path(file)?;
    let read_err = |source| LoadError::ReadFile {
        version: file.version,
        file: file.path.clone(),
        source,
    };
    let bytes = store
        .get(&path)
        .await
        .map_err(read_err)?
        .bytes()
        .await
        .map_err(read_err)?;
    Ok(bytes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snowflake::ddl::READINGS;

    fn added(path: &str, partition: &[(&str, Option<&str>)]) -> AddedFile {
        AddedFile {
            version: 3,
            path: path.to_owned(),
            partition_values: partition
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned)))
                .collect(),
        }
    }

    #[test]
    fn partition_values_are_taken_for_the_tables_text_columns_only() {
        let file = added(
            "site=plant%201/part-0.parquet",
            &[("site", Some("plant 1")), ("date", Some("2026-11-26"))],
        );
        assert_eq!(
            partition_of(&READINGS, &file),
            [("SITE", Some("plant 1".to_owned()))]
        );
        assert_eq!(
            object_path(&file).unwrap().as_ref(),
            "site=plant 1/part-0.parquet"
        );
    }

    #[test]
    fn a_copy_that_skipped_or_missed_a_file_fails() {
        let chunk = Chunk {
            from: "@S/".into(),
            files: vec!["a.parquet".into()],
            expected_files: 1,
            partition: Vec::new(),
        };
        let err = loaded_rows(&QueryResult::for_test(&["status"], &[]), &chunk).unwrap_err();
        assert_eq!(
            err.to_string(),
            "COPY INTO from @S/ did not load what it was given: no file was loaded, 1 expected; the stage holds none of them; nothing of these versions was applied"
        );
        let answer = QueryResult::for_test(
            &["file", "status", "rows_loaded"],
            &[&["a.parquet", "LOAD_SKIPPED", "0"]],
        );
        assert!(
            loaded_rows(&answer, &chunk)
                .unwrap_err()
                .to_string()
                .contains("`a.parquet` came back LOAD_SKIPPED")
        );
        let answer = QueryResult::for_test(
            &["file", "status", "rows_loaded"],
            &[&["a.parquet", "LOADED", "7"]],
        );
        assert_eq!(loaded_rows(&answer, &chunk).unwrap(), 7);
    }
}
