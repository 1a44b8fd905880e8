//! The collector: applies the gateways' Parquet batches from the raw zone to a Delta Lake table
//! exactly once, judges every reading by the configured data-quality rules, records lost `seq`
//! ranges in a gaps table, archives the originals, and loads Snowflake from the Delta table.
//!
//! [`run_once`] is one pass (for cron or an orchestrator), [`run`] repeats passes until
//! cancelled. Both are what `main.rs` calls; tests drive them the same way.

mod apply;
pub mod backfill;
pub mod config;
pub mod delta;
#[cfg(feature = "demo")]
pub mod demo;
pub mod discovery;
pub mod gaps;
pub mod ingest;
pub mod maintenance;
pub mod metrics;
mod pass;
pub mod quarantine;
pub mod raw_zone;
pub mod rules;
pub mod snowflake;
pub mod stream;
pub mod summary;
pub mod tags;

pub use pass::{CollectorError, PassReport, open_stores, open_tables, run, run_once};
pub use stream::{StreamError, StreamReport, run_stream};
