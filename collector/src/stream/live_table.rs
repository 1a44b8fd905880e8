//! The live Delta table: the batch contract's columns plus where each row came from on the
//! stream, appended together with the shard positions ([`super::checkpoint`]) in one commit.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use arrow_array::{ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, MetadataExt as _, StructType, Version};
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use edge_agent::contract::{self, Row};
use tracing::{info, warn};
use url::Url;

use super::checkpoint::{self, Positions};
use super::metrics::StreamMetrics;
use crate::delta::{COMMIT_ID_KEY, Failure, backoff, classify, find_commit};

/// The shard a row was read from.
pub const SHARD_COLUMN: &str = "shard_id";
/// The Kinesis sequence number of the record a row came in.
pub const SEQUENCE_NUMBER_COLUMN: &str = "sequence_number";
/// When Kinesis received that record (approximate, from Kinesis).
pub const ARRIVAL_COLUMN: &str = "arrival_ts";

/// How many times a commit whose attempt did not land is tried again before the consumer
/// starts over from the table's positions.
const COMMIT_ATTEMPTS: u32 = 8;

/// One reading on its way to the live table.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveRow {
    pub row: Row,
    pub shard: String,
    pub sequence_number: String,
    pub arrival_us: Option<i64>,
}

/// The live table's columns: the batch contract's (current version, `site` empty), then
/// [`SHARD_COLUMN`], [`SEQUENCE_NUMBER_COLUMN`] and [`ARRIVAL_COLUMN`].
pub fn live_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let mut fields: Vec<Field> = contract::schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new(SHARD_COLUMN, DataType::Utf8, false));
        fields.push(Field::new(SEQUENCE_NUMBER_COLUMN, DataType::Utf8, false));
        fields.push(Field::new(
            ARRIVAL_COLUMN,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ));
        Arc::new(Schema::new(fields))
    });
    SCHEMA.clone()
}

/// What went wrong with the live table. Every variant names its URL.
#[derive(Debug, thiserror::Error)]
pub enum LiveTableError {
    #[error("cannot open or create the live Delta table {url}: {message}")]
    Open { url: String, message: String },
    #[error(
        "the live Delta table {url} has other columns than the live path writes ({found}); point `stream.table_url` at a folder of its own"
    )]
    Schema { url: String, found: String },
    #[error(
        "the live Delta table {url} holds positions of Kinesis stream `{found}`, not `{configured}`; give each stream its own `stream.table_url`"
    )]
    OtherStream {
        url: String,
        found: String,
        configured: String,
    },
    #[error("cannot write data files to the live Delta table {url}: {message}")]
    Write { url: String, message: String },
    #[error(
        "cannot commit to the live Delta table {url} on top of version {base_version}: {message}"
    )]
    Commit {
        url: String,
        base_version: Version,
        message: String,
    },
    /// Another writer moved the positions: the consumer must start over from the table's.
    #[error(
        "another writer moved the shard positions in the live Delta table {url}; starting over from the table's positions (run one `collector stream` per live table)"
    )]
    Superseded { url: String },
}

/// The live table at its latest loaded version.
#[derive(Debug)]
pub struct LiveTable {
    table: DeltaTable,
    url: Url,
    stream: String,
}

impl LiveTable {
    /// Opens the table at `url` (creating it, and a local folder, when nothing is there yet)
    /// and checks that it is a live table of `stream`.
    pub async fn open_or_create(
        url: &Url,
        storage_options: &HashMap<String, String>,
        stream: &str,
    ) -> Result<Self, LiveTableError> {
        let open_err = |e: &dyn std::fmt::Display| LiveTableError::Open {
            url: url.to_string(),
            message: e.to_string(),
        };
        if url.scheme() == "file"
            && let Ok(path) = url.to_file_path()
        {
            std::fs::create_dir_all(&path).map_err(|e| open_err(&e))?;
        }
        let build = || {
            DeltaTableBuilder::from_url(url.clone())
                .and_then(|b| b.with_storage_options(storage_options.clone()).build())
                .map_err(|e| open_err(&e))
        };
        let mut table = build()?;
        match table.load().await {
            Ok(()) => {}
            Err(DeltaTableError::NotATable(_)) => {
                let schema =
                    StructType::try_from_arrow(live_schema().as_ref()).map_err(|e| open_err(&e))?;
                let created = table
                    .create()
                    .with_table_name("live_readings")
                    .with_comment("plantline live readings from Kinesis: the batch contract's columns plus shard_id, sequence_number, arrival_ts")
                    .with_columns(schema.fields().cloned())
                    .with_save_mode(SaveMode::Ignore)
                    .await;
                table = match created {
                    Ok(t) => {
                        info!(component = "stream", table = %url, "created the live table");
                        t
                    }
                    Err(e) => {
                        // Another consumer may have created it first: use that one.
                        let mut t = build()?;
                        t.load().await.map_err(|_| open_err(&e))?;
                        t
                    }
                };
            }
            Err(e) => return Err(open_err(&e)),
        }
        let this = Self {
            table,
            url: url.clone(),
            stream: stream.to_owned(),
        };
        this.check()?;
        Ok(this)
    }

    /// Refuses a table with other columns or with positions of another stream.
    fn check(&self) -> Result<(), LiveTableError> {
        let snapshot = self.table.snapshot().map_err(|e| LiveTableError::Open {
            url: self.url.to_string(),
            message: e.to_string(),
        })?;
        let found: Vec<String> = snapshot
            .schema()
            .fields()
            .map(|f| f.name().clone())
            .collect();
        let want: Vec<String> = live_schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        if found != want {
            return Err(LiveTableError::Schema {
                url: self.url.to_string(),
                found: found.join(", "),
            });
        }
        if let Some(other) = snapshot
            .metadata()
            .configuration()
            .get(checkpoint::STREAM_KEY)
            && *other != self.stream
        {
            return Err(LiveTableError::OtherStream {
                url: self.url.to_string(),
                found: other.clone(),
                configured: self.stream.clone(),
            });
        }
        Ok(())
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The loaded version.
    pub fn version(&self) -> Option<Version> {
        self.table.version()
    }

    /// The shard positions of the loaded version.
    pub fn positions(&self) -> Positions {
        self.table
            .snapshot()
            .map(|s| checkpoint::read(s.metadata().configuration()))
            .unwrap_or_default()
    }

    /// Loads the newest version.
    pub async fn reload(&mut self) -> Result<(), LiveTableError> {
        self.table
            .update_state()
            .await
            .map_err(|e| LiveTableError::Open {
                url: self.url.to_string(),
                message: e.to_string(),
            })
    }

    /// Appends `rows` and moves the shards in `moved` to their new positions, in one commit.
    /// `expected` is what the caller believes the table's positions are; if the table holds
    /// others, another writer is at work and nothing is written ([`LiveTableError::Superseded`]).
    /// An attempt whose outcome is unknown is resolved by re-reading the positions (and looking
    /// for the attempt's commit token), never by writing again blindly. Each attempt tried again
    /// is counted in `metrics`.
    pub async fn commit(
        &mut self,
        rows: &[LiveRow],
        expected: &Positions,
        moved: &Positions,
        metrics: &StreamMetrics,
    ) -> Result<Version, LiveTableError> {
        let adds = self.write_files(rows).await?;
        let token = uuid::Uuid::new_v4().to_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let url = self.url.to_string();
            let commit_err = move |base_version: Version, message: String| LiveTableError::Commit {
                url: url.clone(),
                base_version,
                message,
            };
            if self.positions() != *expected {
                return Err(LiveTableError::Superseded {
                    url: self.url.to_string(),
                });
            }
            let snapshot = self
                .table
                .snapshot()
                .map_err(|e| commit_err(0, e.to_string()))?;
            let base_version = snapshot.version();
            let mut metadata = snapshot.metadata().clone();
            for (key, value) in checkpoint::entries(&self.stream, moved) {
                metadata = metadata
                    .add_config_key(key, value)
                    .map_err(|e| commit_err(base_version, e.to_string()))?;
            }
            let mut actions = adds.clone();
            actions.push(Action::Metadata(metadata));
            let properties = CommitProperties::default()
                .with_max_retries(0)
                .with_create_checkpoint(true)
                .with_metadata([
                    (COMMIT_ID_KEY.to_owned(), token.clone().into()),
                    ("plantline.rows".to_owned(), rows.len().into()),
                ]);
            let operation = DeltaOperation::Write {
                mode: SaveMode::Append,
                partition_by: None,
                predicate: None,
            };
            let committed = CommitBuilder::from(properties)
                .with_actions(actions)
                .build(Some(snapshot), self.table.log_store(), operation)
                .await;
            let source = match committed {
                Ok(finalized) => {
                    let version = finalized.version();
                    self.table.state = Some(finalized.snapshot());
                    return Ok(version);
                }
                Err(source) => source,
            };
            if classify(&source) == Failure::Definite {
                return Err(commit_err(base_version, source.to_string()));
            }
            self.reload().await?;
            if self.positions() != *expected {
                let ours = find_commit(&self.table, base_version, &token)
                    .await
                    .map_err(|e| commit_err(base_version, e.to_string()))?;
                return match ours {
                    Some(version) => {
                        info!(component = "stream", table = %self.url, version, "the commit had landed");
                        Ok(version)
                    }
                    None => Err(LiveTableError::Superseded {
                        url: self.url.to_string(),
                    }),
                };
            }
            if attempt >= COMMIT_ATTEMPTS {
                return Err(commit_err(base_version, source.to_string()));
            }
            metrics.commit_retried();
            let pause = backoff(attempt);
            warn!(component = "stream", table = %self.url, attempt, error = %source, pause_ms = pause.as_millis(), "commit did not land; retrying");
            tokio::time::sleep(pause).await;
        }
    }

    async fn write_files(&self, rows: &[LiveRow]) -> Result<Vec<Action>, LiveTableError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let write_err = |e: &dyn std::fmt::Display| LiveTableError::Write {
            url: self.url.to_string(),
            message: e.to_string(),
        };
        let batch = to_batch(rows).map_err(|e| write_err(&e))?;
        let mut writer = RecordBatchWriter::for_table(&self.table)
            .map_err(|e| write_err(&e))?
            .with_writer_properties(
                WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::default()))
                    .build(),
            );
        writer.write(batch).await.map_err(|e| write_err(&e))?;
        let adds = writer.flush().await.map_err(|e| write_err(&e))?;
        Ok(adds.into_iter().map(Action::Add).collect())
    }
}

/// The rows as one batch in [`live_schema`].
fn to_batch(rows: &[LiveRow]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let contract_rows: Vec<Row> = rows.iter().map(|r| r.row.clone()).collect();
    let mut columns: Vec<ArrayRef> = contract::to_record_batch(&contract_rows).columns().to_vec();
    columns.push(Arc::new(
        rows.iter()
            .map(|r| Some(r.shard.as_str()))
            .collect::<StringArray>(),
    ));
    columns.push(Arc::new(
        rows.iter()
            .map(|r| Some(r.sequence_number.as_str()))
            .collect::<StringArray>(),
    ));
    columns.push(Arc::new(
        rows.iter()
            .map(|r| r.arrival_us)
            .collect::<TimestampMicrosecondArray>()
            .with_timezone("UTC"),
    ));
    RecordBatch::try_new(live_schema(), columns)
}
