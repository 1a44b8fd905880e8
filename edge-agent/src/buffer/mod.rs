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
//! - Bounds (`[buffer]` `max_bytes`, `max_age`, `on_full`; see [`Bounds`]). Size is the pages
//!   in use (`page_count - freelist_count`, two header reads, no scan), checked inside every
//!   commit's transaction:
//!   - `drop_oldest`: when a commit takes the pages in use over `max_bytes`, the same
//!     transaction deletes the oldest readings *after* the pending batch until they are a
//!     little below the bound (`max_bytes / 32`, 64 KiB to 4 MiB), so the bound holds at every
//!     commit. The pending batch is never cut into: a bound smaller than the batch in flight
//!     drops every new reading until it is confirmed.
//!   - `backpressure`: nothing is dropped for size; the buffer writer takes no readings while
//!     the pages in use are at or over `max_bytes`, so the bound is exceeded by at most one
//!     commit (and at shutdown by what the sources had already handed over).
//!   - `max_age`: a reading whose *commit* (not its timestamp) is older than `max_age` is
//!     deleted, in any policy, at the next commit or batcher round, at most `max_age / 100`
//!     (10 ms to 60 s) late; the pending batch again excepted. Commit times are kept as coarse
//!     marks in the `arrivals` table. A large forward jump of the gateway clock ages readings.
//!   - On disk the database file stays within about `max_bytes` plus one commit (freed pages
//!     are reused, not returned), and the write-ahead log is checkpointed after a sixteenth of
//!     the bound (64 to 1000 pages) and cut back to that size after each checkpoint. Lowering
//!     `max_bytes` does not shrink an existing file.
//! - Every dropped reading is counted (`plantline_agent_buffer_dropped_total{reason}` and a
//!   lifetime counter in `meta`) and recorded in the `gaps` table, in the same transaction as
//!   the delete: `(first_seq, last_seq, readings, reason, detected_at_us)` with reason
//!   `buffer_full`, `max_age` or `damaged_buffer` (losses found by recovery). A drop that
//!   continues the last record (same reason, not yet given to a batch, no reading between)
//!   extends it, so an outage gives one record, not one per commit.
//! - Cutting a batch gives it every gap record not yet given to one, in the same transaction,
//!   and the records never change afterwards: a retried upload carries the same gaps (the
//!   batch's bytes stay deterministic). They are deleted in [`Buffer::complete_batch`], with
//!   the batch's rows. A gap with no reading after it waits for the next reading's batch.
//! - Schema upgrades only add nullable columns to `readings` (`ALTER TABLE ADD COLUMN`, on
//!   open, in one transaction); no existing row is rewritten or lost, and a buffer written by an
//!   older agent is read as if the new columns were null. The `value_text` column (batch
//!   contract v2, the text of a string tag) came this way.
//! - The fresh lane (batch contract v3, `batch.fresh_lane`) only *copies*: it reads a range of
//!   readings ([`Buffer::plan_fresh_batch`], [`Buffer::fresh_rows_after`]) and, after the upload
//!   target confirmed the copy, records its run in `meta` (`fresh_first`, `fresh_last`;
//!   [`Buffer::fresh_uploaded`]). It never deletes a reading and never touches the pending
//!   batch, the gap records, the commit marks or the high-water marks, so everything above holds
//!   for the main lane as if it did not exist.
//! - Range rule: while the high-water `completed` mark is below `fresh_last`, the next fresh batch
//!   starts right after `fresh_last` (the run grows contiguously); otherwise it starts a new run
//!   at the first reading that arrived within the last `batch.max_age` (by the `arrivals` marks),
//!   above the main lane's cut mark. The run is written only after the upload, so a crash in
//!   between plans the same first `seq` again. Fresh batches therefore never go backwards.
//! - `seq` never goes backwards, even when the database is lost: the high-water file
//!   `<buffer>.seq` (written atomically and fsynced) records the highest `seq` reserved (in
//!   blocks of 100 000, before the rows are inserted), cut into a batch (before its upload) and
//!   confirmed (before the rows are deleted). On open, `seq` is raised past the cut and confirmed
//!   marks; after a damaged, unreadable or deleted database, past the reserved mark too.
//!
//! # Durability: what a power cut can lose
//! Readings wait in memory for up to `commit_interval` (200 ms by default) before their
//! transaction commits; those are lost by a crash, a `kill -9` or a power cut at either setting.
//! After the commit:
//! - `durability = "full"` (default, `synchronous = FULL`): the write-ahead log is fsynced at
//!   every commit, so a committed reading survives a power cut.
//! - `durability = "normal"` (`synchronous = NORMAL`): commits reach the disk when the operating
//!   system writes them back (usually within 30 s on Linux) or at the next checkpoint. A `kill -9`
//!   loses nothing, but a power cut can roll back the commits since then: the readings of up to
//!   about the last 30 s, plus any cut or completion of a batch in that window (a rolled-back
//!   completion uploads that batch again under the same key; the collector ignores the repeat).
//!   The database itself stays consistent, and the high-water file keeps `seq` from reusing a
//!   value that may already be in the cloud.
//!
//! # Damage
//! [`Buffer::open`] runs `PRAGMA quick_check` on an existing file. A damaged file (or one that
//! is not SQLite at all) is renamed `<name>.damaged-<UTC time>` together with its `-wal` and
//! `-shm`, every row that can still be read is copied into a fresh buffer with its `seq`, the
//! pending batch is carried over (starting at its first salvaged row), and the agent carries on;
//! [`RecoveryReport`] (logged, and kept on the buffer) says how many rows were saved and which
//! `seq` ranges were lost. Nobody has to delete anything. Limits: rows are found through the
//! table's b-tree, so the rows below a damaged interior page (tens of thousands) are lost with
//! it; damage that `quick_check` does not see (a value
//! garbled inside an intact page) is not detected; the ends of a lost range are reported as
//! unknown where neither the damaged file nor the high-water file tells them.

pub mod dead_letter;
mod high_water;
mod inspect;
pub mod plan_memory;
mod recovery;
mod sqlite;
mod utc;

pub use inspect::{BufferReport, RecordedBounds, inspect};
pub use recovery::{LostSeqs, RecoveryReport};
pub use sqlite::{Bounds, Buffer, BufferError, BufferStats, FreshBatch, FreshRun, PendingBatch};
pub(crate) use utc::format_micros;
