//! The live path, `collector stream`: the agents' Kinesis live stream into a live Delta table
//! within seconds, the way kafka-delta-ingest moves Kafka partitions into Delta.
//!
//! # What always holds
//! - Rows and the shard positions that cover them land in one Delta commit: the commit's
//!   `metaData` action carries each moved shard's last sequence number in the table
//!   configuration ([`checkpoint`] says why not a `txn` action). A reader never sees rows
//!   without their positions or the reverse.
//! - A start (or a start-over after a failed commit) reads each shard right after the
//!   position the table holds (`AFTER_SEQUENCE_NUMBER`), or from `stream.start` when it holds
//!   none. So records read but not committed before a crash are read again and committed
//!   once; records committed are never read again. No (`gateway`, `seq`) is duplicated by a
//!   restart, and none is lost while the stream retains it.
//! - An outcome-unknown commit is resolved by re-reading the positions and looking for the
//!   commit's token, never by writing again; positions that another writer moved make the
//!   consumer start over from them (one `collector stream` per live table).
//! - A reading the agent put twice (its PutRecords retries are at least once, so the same
//!   reading may sit in two records) is dropped when its (`gateway`, `seq`) was committed in
//!   this run among the last 200 000 keys, or waits in the same commit. Across a restart the
//!   positions alone decide.
//! - A record that does not decode is skipped whole, counted and logged at WARN with its shard,
//!   sequence number, the reason and its first 200 bytes; the position moves past it, so it
//!   never stops the stream. The batches in the raw zone still carry its readings.
//! - A child shard of a reshard is read only after its parents were read to their end, so one
//!   device's records stay in order.
//!
//! - What the consumer does is counted in its [`StreamMetrics`] and served, with a `/health`
//!   verdict, on `stream.metrics_listen` ([`serve_stream_metrics`]).
//!
//! The live table has the batch contract's columns (`site` empty: the live records do not carry
//! it) plus `shard_id`, `sequence_number` and `arrival_ts`. It is not the readings table: the
//! batch path stays the system of record, and the two join on (`gateway`, `seq`).

mod checkpoint;
mod config;
mod consumer;
mod decode;
mod dedupe;
mod live_table;
mod metrics;
mod shard_reader;

pub use checkpoint::{POSITION_PREFIX, Positions, STREAM_KEY};
pub use config::{StartPosition, StreamConfig};
pub use consumer::{StreamError, StreamReport, run_stream, run_stream_with};
pub use decode::{DecodeError, decode};
pub use live_table::{
    ARRIVAL_COLUMN, LiveRow, LiveTable, LiveTableError, SEQUENCE_NUMBER_COLUMN, SHARD_COLUMN,
    live_schema,
};
pub use metrics::{
    CommitFailure, ReadFailure, ShardState, StreamMetrics, StreamMetricsError, serve_stream_metrics,
};
pub use shard_reader::{KinesisError, ShardReader};
