//! The collector: applies the gateways' Parquet batches from the raw zone to a Delta Lake table
//! exactly once, archives the originals, and loads Snowflake from the Delta table.
//!
//! [`run_once`] is one pass (for cron or an orchestrator), [`run`] repeats passes until
//! cancelled. Both are what `main.rs` calls; tests drive them the same way.

pub mod config;
pub mod delta;
#[cfg(feature = "demo")]
pub mod demo;
pub mod ingest;
mod pass;
pub mod quarantine;
pub mod raw_zone;
pub mod snowflake;
pub mod summary;

pub use pass::{CollectorError, PassReport, open_stores, run, run_once};
