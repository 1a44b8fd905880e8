//! Opening a Delta table the collector owns, creating it with its schema when nothing is there
//! yet, and bringing a table an earlier collector wrote up to the current schema. Shared by the
//! readings table and the data-quality tables (gaps, quarantined rows).
//!
//! # Schema evolution
//! A table's columns only ever grow at the end, by nullable columns named in
//! [`TableSpec::added_columns`]. A table that has the spec's columns without a tail of those
//! gets the tail added by one metadata-only commit (delta-rs `ADD COLUMN`): no data file is
//! rewritten, and earlier rows read the new columns as null. Any other difference is refused
//! with both column lists, so a collector never writes into a table it does not understand.
//!
//! # Partition columns
//! A table may be created with a partition column that the collector derives while writing
//! (the readings table's `date`); it follows the spec's columns in the Delta schema. Partition
//! columns are left out when a table's columns are compared with the spec, so a column added
//! later (appended by Delta after the partition column) still counts as the spec's tail, and a
//! table created before partitioning keeps working as it is. Which partition columns a table
//! may have is the owner's check ([`super::ReadingsTable`]).

use std::collections::HashMap;

use arrow_schema::{Field, Schema};
use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake::kernel::{StructField, StructType};
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use tracing::info;
use url::Url;

use super::commit;
use super::table::DeltaError;

/// What a table is: its name in the Delta metadata, its comment and its columns.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TableSpec {
    /// Name recorded in the table's metadata (and used in logs).
    pub(crate) name: &'static str,
    /// Comment recorded in the table's metadata.
    pub(crate) comment: &'static str,
    /// The Arrow schema every data file is written with.
    pub(crate) schema: fn() -> arrow_schema::SchemaRef,
    /// The nullable columns added after the table's first release, in the order they were
    /// added; they are the last columns of `schema`. A table missing a tail of them gets it
    /// added on open.
    pub(crate) added_columns: &'static [&'static str],
}

impl TableSpec {
    /// The Delta schema of the table.
    pub(crate) fn delta_schema(&self, url: &Url) -> Result<StructType, DeltaError> {
        delta_schema(url, (self.schema)().as_ref())
    }
}

/// The Delta schema of an Arrow schema.
pub(crate) fn delta_schema(url: &Url, schema: &Schema) -> Result<StructType, DeltaError> {
    StructType::try_from_arrow(schema).map_err(|e| DeltaError::Create {
        url: url.clone(),
        source: Box::new(DeltaTableError::Generic(e.to_string())),
    })
}

/// Opens the table at `url`, creating it with `spec`'s schema if nothing is there yet. A local
/// folder is created if missing. Works when another collector creates the table at the same
/// moment (the loser of the race to version 0 uses the winner's table).
pub(crate) async fn open_or_create(
    url: &Url,
    storage_options: &HashMap<String, String>,
    spec: &TableSpec,
) -> Result<DeltaTable, DeltaError> {
    open_or_create_partitioned(url, storage_options, spec, None).await
}

/// [`open_or_create`], creating a missing table partitioned by `partition` (a column after
/// the spec's, filled in by the writer). An existing table is opened as it is, partitioned or
/// not.
pub(crate) async fn open_or_create_partitioned(
    url: &Url,
    storage_options: &HashMap<String, String>,
    spec: &TableSpec,
    partition: Option<&Field>,
) -> Result<DeltaTable, DeltaError> {
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
        Ok(()) => Ok(table),
        Err(DeltaTableError::NotATable(_)) => {
            let mut fields: Vec<Field> = (spec.schema)()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
            fields.extend(partition.cloned());
            let schema = delta_schema(url, &Schema::new(fields))?;
            let created = table
                .create()
                .with_table_name(spec.name)
                .with_comment(spec.comment)
                .with_columns(schema.fields().cloned())
                .with_partition_columns(partition.map(|p| p.name().clone()))
                .with_save_mode(SaveMode::Ignore)
                .await;
            match created {
                Ok(t) => {
                    info!(component = "delta", table = %url, name = spec.name, partitioned_by = partition.map(|p| p.name().as_str()), "created the table");
                    Ok(t)
                }
                Err(create_err) => {
                    // Another collector may have won the race to version 0: use its table.
                    let mut t = open(url)?;
                    t.load().await.map_err(|_| DeltaError::Create {
                        url: url.clone(),
                        source: Box::new(create_err),
                    })?;
                    Ok(t)
                }
            }
        }
        Err(source) => Err(DeltaError::Open {
            url: url.clone(),
            source: Box::new(source),
        }),
    }
}

/// `name type` of every column, for schema comparisons and messages.
pub(crate) fn column_names(schema: &StructType) -> Vec<String> {
    schema
        .fields()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect()
}

/// Accepts a table with exactly `spec`'s columns; adds the missing tail of
/// [`TableSpec::added_columns`] to a table an earlier collector wrote (see the module doc);
/// refuses anything else. Works when another collector evolves or writes the table at the same
/// moment: a lost race reloads and looks again, at most `attempts` times.
pub(crate) async fn evolve(
    table: &mut DeltaTable,
    url: &Url,
    spec: &TableSpec,
    attempts: u32,
) -> Result<(), DeltaError> {
    let want_schema = spec.delta_schema(url)?;
    let want = column_names(&want_schema);
    for _ in 0..attempts.max(3) {
        let found = found_columns(table, url, spec)?;
        if found == want {
            return Ok(());
        }
        let Some(missing) = missing_tail(&found, &want, spec) else {
            return Err(schema_mismatch(url, spec, &found, &want));
        };
        let fields: Vec<StructField> = want_schema.fields().skip(found.len()).cloned().collect();
        debug_assert_eq!(fields.len(), missing.len());
        match table.clone().add_columns().with_fields(fields).await {
            Ok(evolved) => {
                info!(component = "delta", table = %url, name = spec.name, columns = %missing.join(", "), "added nullable columns to the table");
                *table = evolved;
                return Ok(());
            }
            // Another collector evolved it (or committed) first: look again.
            Err(e) if commit::is_conflict(&e) => commit::reload(table, url).await?,
            Err(source) => {
                return Err(DeltaError::Evolve {
                    url: url.clone(),
                    columns: format!("{} ({} table)", missing.join(", "), spec.name),
                    source: Box::new(source),
                });
            }
        }
    }
    let found = found_columns(table, url, spec)?;
    if found == want {
        Ok(())
    } else {
        Err(schema_mismatch(url, spec, &found, &want))
    }
}

/// The names of the columns `found` lacks when it is `want` without a tail of the spec's added
/// columns; `None` for any other difference.
fn missing_tail<'a>(
    found: &[String],
    want: &'a [String],
    spec: &TableSpec,
) -> Option<Vec<&'a str>> {
    let tail = want.get(found.len()..).filter(|t| !t.is_empty())?;
    if want[..found.len()] != *found {
        return None;
    }
    // `want` holds `name type`; the spec lists names.
    let names: Vec<&str> = tail
        .iter()
        .map(|c| c.split_once(' ').map_or(c.as_str(), |(name, _)| name))
        .collect();
    let added = spec.added_columns;
    (names.len() <= added.len() && added[added.len() - names.len()..] == *names).then_some(names)
}

fn found_columns(
    table: &DeltaTable,
    url: &Url,
    spec: &TableSpec,
) -> Result<Vec<String>, DeltaError> {
    let snapshot = table.snapshot().map_err(|e| DeltaError::Schema {
        url: url.clone(),
        detail: format!("{} table: {e}", spec.name),
    })?;
    let partitions = snapshot.metadata().partition_columns();
    Ok(snapshot
        .schema()
        .fields()
        .filter(|f| !partitions.contains(f.name()))
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect())
}

fn schema_mismatch(url: &Url, spec: &TableSpec, found: &[String], want: &[String]) -> DeltaError {
    DeltaError::Schema {
        url: url.clone(),
        detail: format!(
            "{} table: found columns [{}], expected [{}]",
            spec.name,
            found.join(", "),
            want.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_schema() -> arrow_schema::SchemaRef {
        std::sync::Arc::new(Schema::empty())
    }

    const SPEC: TableSpec = TableSpec {
        name: "t",
        comment: "",
        schema: no_schema,
        added_columns: &["b", "c"],
    };

    fn cols(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| format!("{n} string")).collect()
    }

    #[test]
    fn only_a_missing_tail_of_added_columns_is_added() {
        let want = cols(&["seq", "a", "b", "c"]);
        assert_eq!(
            missing_tail(&cols(&["seq", "a"]), &want, &SPEC),
            Some(vec!["b", "c"])
        );
        assert_eq!(
            missing_tail(&cols(&["seq", "a", "b"]), &want, &SPEC),
            Some(vec!["c"])
        );
        // The same columns: nothing to add (the caller accepts it before asking).
        assert_eq!(missing_tail(&want, &want, &SPEC), None);
        // A first-release column missing, another order, or a foreign column: refused.
        assert_eq!(missing_tail(&cols(&["seq"]), &want, &SPEC), None);
        assert_eq!(missing_tail(&cols(&["a", "seq"]), &want, &SPEC), None);
        assert_eq!(missing_tail(&cols(&["seq", "x"]), &want, &SPEC), None);
        // A column of another type is another column.
        let typed = vec!["seq string".to_owned(), "a long".to_owned()];
        assert_eq!(missing_tail(&typed, &want, &SPEC), None);
    }
}
