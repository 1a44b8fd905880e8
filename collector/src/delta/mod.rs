//! The Delta tables the collector writes (the processed zone): readings, gaps and quarantined
//! rows.
//!
//! # Invariants
//! - The readings table's schema is batch contract v1's columns, then the nullable `dq_flags`
//!   and `value_text` (contract v2) columns ([`readings_schema`]); a table without them gets
//!   what it lacks added on open, never by rewriting data. The quarantined-rows table gains
//!   `value_text` the same way.
//! - A readings table the collector creates is partitioned by `date` (the UTC day of `ts`,
//!   derived while writing); one created before that stays unpartitioned and is written as it
//!   is.
//! - Each gateway's watermark is the Delta `txn` action of app id `plantline-gateway-<id>`; in
//!   the readings table its version is the highest `seq` of that gateway applied (to the table
//!   or, for rows a rule quarantined, to the quarantined-rows table).
//! - Rows and the watermark that covers them land in the same commit, so a reader never sees rows
//!   without their watermark or the reverse; a row with `seq <= watermark` is never appended again.
//!   The gaps and quarantined-rows tables carry their own watermark per gateway and are committed
//!   before the readings commit of the same rows (see [`crate::ingest`]).
//! - Beside the watermark W, the readings table keeps each gateway's fresh range [Fs, Fe]
//!   (batch contract v3's fresh lane) as two more `txn` actions ([`FreshRange`]), written in the
//!   commit of the fresh-lane rows they cover. Every row of the range above W is in the table;
//!   main-lane rows are kept only if `seq > W` and outside the range. A range only grows
//!   contiguously, or is replaced once the watermark reached its end (`Fe <= W`).
//! - Two collectors applying the same gateway conflict on its app id; the loser re-reads the
//!   watermarks (and the fresh range) and re-filters, so the Delta protocol (conditional PUT of
//!   the commit file) decides, not a home-made lock.

mod commit;
mod gaps;
mod open;
mod quarantined_rows;
mod side_table;
mod table;
mod tables;
mod tags;
mod watermark;

pub(crate) use commit::{
    COMMIT_ID_KEY, CommitFailure, Failure, backoff, checkpoint_if_due, classify, find_commit,
    table_label,
};
pub use gaps::{GapRow, GapsTable, REASON_QUARANTINED, REASON_SEQ_JUMP, gaps_schema};
pub use quarantined_rows::{QuarantinedRow, QuarantinedRowsTable, quarantined_rows_schema};
pub use table::{
    ApplyOutcome, DATE_COLUMN, DQ_FLAGS_COLUMN, DeltaError, ReadingsTable, VALUE_TEXT_COLUMN,
    date_field, readings_schema,
};
pub(crate) use table::{filter_above, seq_column, with_flags, without_range};
pub use tables::{GAPS_SUFFIX, QUARANTINED_ROWS_SUFFIX, TableUrls, Tables, sibling};
pub use tags::{CatalogOutcome, TAGS_SUFFIX, TagRow, TagsTable, tags_schema};
pub use watermark::{
    APP_ID_PREFIX, FreshRange, Marks, app_id, fresh_first_app_id, fresh_last_app_id,
};
