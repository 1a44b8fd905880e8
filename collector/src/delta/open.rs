//! Opening a Delta table the collector owns, creating it with its schema when nothing is there
//! yet. Shared by the readings table and the data-quality tables (gaps, quarantined rows).

use std::collections::HashMap;

use arrow_schema::Schema;
use deltalake::kernel::StructType;
use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use tracing::info;
use url::Url;

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
            let schema = spec.delta_schema(url)?;
            let created = table
                .create()
                .with_table_name(spec.name)
                .with_comment(spec.comment)
                .with_columns(schema.fields().cloned())
                .with_save_mode(SaveMode::Ignore)
                .await;
            match created {
                Ok(t) => {
                    info!(component = "delta", table = %url, name = spec.name, "created the table");
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

/// Checks that a data-quality table has exactly `spec`'s columns.
pub(crate) fn check_exact_schema(
    table: &DeltaTable,
    url: &Url,
    spec: &TableSpec,
) -> Result<(), DeltaError> {
    let schema_err = |detail: String| DeltaError::Schema {
        url: url.clone(),
        detail: format!("{} table: {detail}", spec.name),
    };
    let snapshot = table.snapshot().map_err(|e| schema_err(e.to_string()))?;
    let want = column_names(&spec.delta_schema(url)?);
    let found = column_names(snapshot.schema().as_ref());
    if found == want {
        Ok(())
    } else {
        Err(schema_err(format!(
            "found columns [{}], expected [{}]",
            found.join(", "),
            want.join(", ")
        )))
    }
}
