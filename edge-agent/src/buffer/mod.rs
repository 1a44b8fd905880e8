//! The durable buffer: every reading passes through a SQLite database before it may leave the
//! gateway.
//!
//! # Invariants
//! - A reading is *accepted* once the transaction that inserted it has committed. From then on it
//!   survives a crash or `kill -9` (and, with `durability = "full"`, a power cut) until the batch
//!   that holds it has been confirmed by the upload target.
//! - `seq` is assigned by SQLite's `AUTOINCREMENT`, so it strictly increases over the life of the
//!   database file and is never reused, even after every row was deleted.
//! - The database belongs to one gateway: it records the gateway id on first open and refuses to
//!   open under another id, because `seq` values are only unique per gateway.
//! - At most one batch is *pending* (cut but not yet confirmed). A pending batch is a fixed `seq`
//!   range recorded in the same database; retrying it reads exactly the same rows, so a retried
//!   upload writes the same key with the same bytes.
//! - Rows leave the buffer only in [`Buffer::complete_batch`], after the upload target confirmed
//!   the batch, in the same transaction that clears the pending record.

mod sqlite;

pub use sqlite::{Buffer, BufferError, BufferStats, PendingBatch};
