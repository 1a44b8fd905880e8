//! The readings table in Delta Lake (the processed zone).
//!
//! # Invariants
//! - The table's schema is the batch contract's schema ([`edge_agent::contract::schema`]).
//! - Each gateway's watermark is the Delta `txn` action of app id `plantline-gateway-<id>`; its
//!   version is the highest `seq` of that gateway present in the table.
//! - Rows and the watermark that covers them land in the same commit, so a reader never sees rows
//!   without their watermark or the reverse; a row with `seq <= watermark` is never appended again.
//! - Two collectors applying the same gateway conflict on its app id; the loser re-reads the
//!   watermark and re-filters, so the Delta protocol (conditional PUT of the commit file) decides,
//!   not a home-made lock.

mod table;
mod watermark;

pub use table::{ApplyOutcome, DeltaError, ReadingsTable};
pub use watermark::{APP_ID_PREFIX, app_id};
