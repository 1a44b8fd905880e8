//! Loading Snowflake from the Delta table, exactly once.
//!
//! # Invariants
//! - The readings table holds at most one row per (`GATEWAY`, `SEQ`): rows are inserted only
//!   when no row with the same key exists, so replaying a Delta version changes nothing.
//! - `PLANTLINE_LOAD_CONTROL.LAST_VERSION` for a readings table is the last Delta version whose
//!   added files are all in the readings table. It changes in the same Snowflake transaction as
//!   the rows of the versions it covers, and only if it still holds the value the loader read
//!   first, so two loaders never apply the same versions concurrently.
//! - Only files added with `dataChange = true` carry new readings; files rewritten by
//!   `OPTIMIZE` (`dataChange = false`) are skipped.
//! - The password is read from the environment at login and never logged or printed.

mod client;
mod config;
mod ddl;
mod init;
mod loader;
pub mod views;

pub use client::{
    BindValue, ColumnInfo, ConnectorTransport, QueryResult, Rowset, SnowflakeClient,
    SnowflakeError, StatementRequest, Transport, TransportFuture,
};
pub use config::{CONTROL_TABLE, SnowflakeConfig};
pub use ddl::READINGS_CLUSTER_KEY;
pub use init::{
    DEFAULT_LOADER_ROLE, GAPS_TABLE, InitError, InitScript, InitStatement, QUARANTINE_TABLE,
    REPORTING_ROLE, StatementKind, TAGS_TABLE,
};
pub use loader::{LoadError, LoadReport, load};
