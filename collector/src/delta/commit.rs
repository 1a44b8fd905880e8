//! Writing data files and committing them together with a gateway's `txn` watermark, for every
//! table the collector writes; and reading a table's data files back.

use std::collections::HashMap;
use std::time::Duration;

use arrow_array::RecordBatch;
use deltalake::kernel::transaction::{CommitBuilder, TransactionError};
use deltalake::kernel::{Action, Version};
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use url::Url;

use super::table::DeltaError;
use super::watermark;

/// Why a commit did not happen.
#[derive(Debug)]
pub(crate) enum CommitFailure {
    /// Another writer committed first (the same gateway, or too many concurrent commits): reload,
    /// re-read the watermark and try again.
    Conflict(Box<DeltaTableError>),
    /// Anything else.
    Other(DeltaError),
}

/// Writes `batches` as data files of `table` and commits them with `gateway`'s watermark moved
/// to `watermark`, in one commit. With no batches, the commit holds only the watermark (all the
/// rows it covers went elsewhere). On success the table's loaded state is the new version.
pub(crate) async fn commit_with_watermark(
    table: &mut DeltaTable,
    url: &Url,
    gateway: &str,
    batches: Vec<RecordBatch>,
    watermark: i64,
) -> Result<Version, CommitFailure> {
    let write_err = |source| {
        CommitFailure::Other(DeltaError::Write {
            table: url.to_string(),
            gateway: gateway.to_owned(),
            source: Box::new(source),
        })
    };
    let mut actions: Vec<Action> = Vec::new();
    if !batches.is_empty() {
        let mut writer = RecordBatchWriter::for_table(table)
            .map_err(write_err)?
            .with_writer_properties(writer_properties());
        for batch in batches {
            writer.write(batch).await.map_err(write_err)?;
        }
        let adds = writer.flush().await.map_err(write_err)?;
        actions.extend(adds.into_iter().map(Action::Add));
    }
    let snapshot = table.snapshot().map_err(write_err)?;
    let base_version = snapshot.version();
    actions.push(Action::Txn(watermark::action(gateway, watermark)));
    let app_metadata = HashMap::from([
        ("plantline.gateway".to_owned(), gateway.into()),
        ("plantline.last_seq".to_owned(), watermark.into()),
    ]);
    let operation = DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: None,
        predicate: None,
    };
    let committed = CommitBuilder::default()
        .with_actions(actions)
        .with_app_metadata(app_metadata)
        .build(Some(snapshot), table.log_store(), operation)
        .await;
    match committed {
        Ok(finalized) => {
            let version = finalized.version();
            table.state = Some(finalized.snapshot());
            Ok(version)
        }
        Err(source) if is_conflict(&source) => Err(CommitFailure::Conflict(Box::new(source))),
        Err(source) => Err(CommitFailure::Other(DeltaError::Commit {
            table: url.to_string(),
            gateway: gateway.to_owned(),
            base_version,
            source: Box::new(source),
        })),
    }
}

/// A lost race: another writer committed the same version or touched this gateway's app id.
pub(crate) fn is_conflict(e: &DeltaTableError) -> bool {
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
pub(crate) fn backoff(attempt: u32) -> Duration {
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

/// Reloads `table` to its newest version.
pub(crate) async fn reload(table: &mut DeltaTable, url: &Url) -> Result<(), DeltaError> {
    table
        .update_state()
        .await
        .map_err(|source| DeltaError::Reload {
            url: url.clone(),
            source: Box::new(source),
        })
}

/// Reads the data files of the loaded version of `table` for which `keep` (given the file's
/// statistics JSON, when the log has them) returns true. Meant for small tables and targeted
/// reads (tests, the demo, crash recovery), not for analytics.
pub(crate) async fn read_files(
    table: &DeltaTable,
    url: &Url,
    keep: impl Fn(Option<&serde_json::Value>) -> bool,
) -> Result<Vec<RecordBatch>, DeltaError> {
    use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use object_store::ObjectStoreExt;
    let Ok(snapshot) = table.snapshot() else {
        return Ok(Vec::new());
    };
    let store = table.object_store();
    let mut out = Vec::new();
    for file in snapshot.log_data() {
        let stats = file
            .stats()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
        if !keep(stats.as_ref()) {
            continue;
        }
        let path = file.object_store_path();
        let read_err = |message: String| DeltaError::ReadFile {
            table: url.to_string(),
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
            .and_then(ParquetRecordBatchReaderBuilder::build)
            .map_err(|e| read_err(e.to_string()))?;
        for batch in reader {
            out.push(batch.map_err(|e| read_err(e.to_string()))?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..10 {
            let d = backoff(attempt).as_millis();
            let base = 100u128 << attempt.min(5);
            assert!((base..2 * base).contains(&d), "{attempt}: {d}");
        }
    }
}
