//! Writing data files and committing them together with a gateway's `txn` watermark, for every
//! table the collector writes; and reading a table's data files back.
//!
//! # Commits that stay fast and unambiguous
//! delta-rs retries a commit that lost the race for its version a fixed number of times,
//! immediately (delta-rs #3066), and an error after the commit file was written (a timeout, a
//! dropped connection, a failed reload of the new state) leaves the caller not knowing whether
//! the commit landed (delta-rs #2279). So the collector runs the retry loop itself, with
//! delta-rs's own retries off:
//! - Every attempt is built on a snapshot in which the gateway's watermark was read, and carries
//!   a commit token (`plantline.commit_id` in `commitInfo`) that is unique to this commit.
//! - A lost race (`VersionAlreadyExists`, or the table moved since the snapshot) and an ambiguous
//!   error are both resolved the same way: reload the table and read the gateway's watermark
//!   again. Unchanged: the commit did not land and nobody applied this gateway; it is retried on
//!   the new snapshot with the same data files, after a capped exponential backoff with full
//!   jitter ([`backoff`]), for up to [`RETRY_BUDGET`]. Moved: the versions since the snapshot are
//!   searched for the token; found, the commit landed (the caller gets its version); not found,
//!   another writer applied this gateway and the caller filters its rows again
//!   ([`CommitFailure::Conflict`]). Nothing is ever written without that check.
//! - An error that cannot have come after the write (a protocol check, serialising the commit)
//!   is returned as is.
//! - After a commit whose version is a multiple of the table's `delta.checkpointInterval` (set
//!   from `maintenance.checkpoint_interval`), a checkpoint is written, so opening the table reads
//!   one checkpoint and a few commits however long the log grows. A failed checkpoint is logged
//!   and counted; the commit stands. Expired-log cleanup runs after passes
//!   ([`crate::maintenance`]), where the Snowflake loader's position is known.

use std::time::Duration;

use arrow_array::{Array, Date32Array, RecordBatch};
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Add, Version};
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::table::config::TablePropertiesExt as _;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, info, warn};
use url::Url;

use super::table::DeltaError;
use super::watermark::{self, FreshRange, Marks};
use crate::metrics::{AmbiguousOutcome, global as metrics};

/// The first retry waits up to this long (full jitter: a random time below the bound).
pub(crate) const BACKOFF_BASE: Duration = Duration::from_millis(50);
/// No retry waits longer than this, however many races were lost.
pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How long one commit keeps retrying lost races (or uncertain outcomes that had not landed)
/// before the gateway is left for the next pass. Generous, because a lost race against a commit
/// of another gateway is normal when many collectors share a table.
pub(crate) const RETRY_BUDGET: Duration = Duration::from_mins(2);

/// The key in `commitInfo` that carries a commit's token.
pub(crate) const COMMIT_ID_KEY: &str = "plantline.commit_id";

/// Why a commit did not happen.
#[derive(Debug)]
pub(crate) enum CommitFailure {
    /// Another writer applied rows of the same gateway first: reload, re-read the watermark and
    /// filter the rows again.
    Conflict(Box<DeltaTableError>),
    /// Anything else.
    Other(DeltaError),
}

/// What a failed commit attempt means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Another commit took the version (or the table moved since the snapshot): nothing of
    /// ours was written at that version.
    Race,
    /// An error after the commit file may have been written: it may have landed.
    Ambiguous,
    /// An error before anything was written (protocol, serialisation): it did not land, and
    /// trying again changes nothing.
    Definite,
}

/// Sorts a delta-rs commit error into [`Failure`]s.
pub(crate) fn classify(e: &DeltaTableError) -> Failure {
    match e {
        DeltaTableError::VersionAlreadyExists(_)
        | DeltaTableError::Transaction {
            source:
                TransactionError::VersionAlreadyExists(_)
                | TransactionError::CommitConflict(_)
                | TransactionError::MaxCommitAttempts(_),
        } => Failure::Race,
        DeltaTableError::SerializeLogJson { .. }
        | DeltaTableError::CommitValidation { .. }
        | DeltaTableError::Transaction {
            source:
                TransactionError::SerializeLogJson { .. }
                | TransactionError::DeltaTableAppendOnly
                | TransactionError::UnsupportedTableFeatures(_)
                | TransactionError::TableFeaturesRequired(_),
        } => Failure::Definite,
        _ => Failure::Ambiguous,
    }
}

/// What re-reading the gateway's watermark after a failed attempt showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolution {
    /// The attempt's commit is in the log at this version.
    Landed(Version),
    /// The watermark did not move: the attempt did not land and nobody applied the gateway.
    NotLanded,
    /// Another writer moved the watermark; the attempt's commit is not in the log.
    Superseded,
}

/// Reads the watermark seen after a failed attempt: `before` is the watermark the attempt was
/// built on, `now` the one the reloaded table holds, `ours` the version carrying the attempt's
/// token if the log holds one (only looked for when the watermark moved).
pub(crate) fn resolve<M: PartialEq + Copy>(before: M, now: M, ours: Option<Version>) -> Resolution {
    match ours {
        Some(version) => Resolution::Landed(version),
        None if now == before => Resolution::NotLanded,
        None => Resolution::Superseded,
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// The commit is in the table at this version: done.
    Landed(Version),
    /// Try again on the reloaded snapshot after this pause.
    Retry(Duration),
    /// Another writer applied the gateway: filter the rows again.
    Refilter,
    /// The retry budget is spent: leave the gateway for the next pass.
    GiveUp,
}

/// The commit loop's decision after `attempt` (1 for the first) failed with `failure`, resolved
/// as `resolution`, with `elapsed` spent since the first attempt and `pause` the backoff drawn
/// for the next one.
pub(crate) fn decide(resolution: Resolution, elapsed: Duration, pause: Duration) -> Decision {
    match resolution {
        Resolution::Landed(version) => Decision::Landed(version),
        Resolution::Superseded => Decision::Refilter,
        Resolution::NotLanded if elapsed + pause > RETRY_BUDGET => Decision::GiveUp,
        Resolution::NotLanded => Decision::Retry(pause),
    }
}

/// Writes `batches` as data files of `table` and commits them with `gateway`'s watermark moved
/// to `watermark`, in one commit. With no batches, the commit holds only the watermark (all the
/// rows it covers went elsewhere). On success the table's loaded state is the new version.
///
/// Lost races and uncertain outcomes are resolved as the module documentation says; the data
/// files are written once and reused by every retry.
// The commit loop read top to bottom: attempt, classify, resolve, decide.
#[allow(clippy::too_many_lines)]
pub(crate) async fn commit_with_watermark(
    table: &mut DeltaTable,
    url: &Url,
    gateway: &str,
    batches: Vec<RecordBatch>,
    watermark: i64,
) -> Result<Version, CommitFailure> {
    commit_with_marks(
        table,
        url,
        gateway,
        batches,
        MarkUpdate::Watermark(watermark),
        false,
    )
    .await
}

/// What a commit records for its gateway beside its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MarkUpdate {
    /// Moves the gateway's watermark to this `seq`.
    Watermark(i64),
    /// Records the gateway's fresh range (readings table only); the watermark stays.
    Fresh(FreshRange),
}

/// [`commit_with_watermark`] for any [`MarkUpdate`]. With `with_fresh` (the readings table) the
/// gateway's fresh range is read beside its watermark, and a change of either since the attempt
/// was built means another writer applied the gateway: a main-lane commit must not land on a
/// range it did not filter by, nor a fresh-lane commit on a watermark or range it did not see.
#[allow(clippy::too_many_lines)]
pub(crate) async fn commit_with_marks(
    table: &mut DeltaTable,
    url: &Url,
    gateway: &str,
    batches: Vec<RecordBatch>,
    update: MarkUpdate,
    with_fresh: bool,
) -> Result<Version, CommitFailure> {
    let write_err = |source| {
        CommitFailure::Other(DeltaError::Write {
            table: url.to_string(),
            gateway: gateway.to_owned(),
            source: Box::new(source),
        })
    };
    let adds: Vec<Action> = write_data_files(table, batches)
        .await
        .map_err(write_err)?
        .into_iter()
        .map(Action::Add)
        .collect();
    let label = table_label(table, url);
    let token = uuid::Uuid::new_v4().to_string();
    let started = tokio::time::Instant::now();
    let mut attempt: u32 = 0;
    let mut built_on = None;
    loop {
        attempt += 1;
        let snapshot = table.snapshot().map_err(write_err)?;
        let base_version = snapshot.version();
        let before = watermark::read_marks(table, url, gateway, with_fresh)
            .await
            .map_err(CommitFailure::Other)?;
        let expected = *built_on.get_or_insert(before);
        if attempt > 1 && before != expected {
            // Only reachable on a retry: another writer applied the gateway meanwhile.
            return Err(CommitFailure::Conflict(Box::new(DeltaTableError::Generic(
                format!("gateway `{gateway}` in {url} was moved by another writer: {before:?}"),
            ))));
        }
        let mut actions = adds.clone();
        let mut metadata: Vec<(String, serde_json::Value)> =
            vec![("plantline.gateway".to_owned(), gateway.into())];
        match update {
            MarkUpdate::Watermark(last_seq) => {
                actions.push(Action::Txn(watermark::action(gateway, last_seq)));
                metadata.push(("plantline.last_seq".to_owned(), last_seq.into()));
            }
            MarkUpdate::Fresh(range) => {
                actions.extend(
                    watermark::fresh_actions(gateway, range)
                        .into_iter()
                        .map(Action::Txn),
                );
                metadata.push(("plantline.lane".to_owned(), "fresh".into()));
                metadata.push(("plantline.fresh_first".to_owned(), range.first.into()));
                metadata.push(("plantline.fresh_last".to_owned(), range.last.into()));
            }
        }
        metadata.push((COMMIT_ID_KEY.to_owned(), token.clone().into()));
        let properties = CommitProperties::default()
            .with_max_retries(0)
            .with_create_checkpoint(false)
            .with_cleanup_expired_logs(Some(false))
            .with_metadata(metadata);
        let partitions = snapshot.metadata().partition_columns();
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: (!partitions.is_empty()).then(|| partitions.to_vec()),
            predicate: None,
        };
        let committed = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(snapshot), table.log_store(), operation)
            .await;
        let source = match committed {
            Ok(finalized) => {
                let version = finalized.version();
                table.state = Some(finalized.snapshot());
                metrics().commit_made(&label);
                checkpoint_if_due(table, url, &label, version).await;
                return Ok(version);
            }
            Err(source) => source,
        };
        let failure = classify(&source);
        if failure == Failure::Definite {
            return Err(commit_error(url, gateway, base_version, source));
        }
        if failure == Failure::Race {
            metrics().commit_conflict(&label);
        }
        // Re-read the gateway's watermark (and, if it moved, look for our token) before
        // anything else is written.
        let resolution = match resolve_attempt(
            table,
            url,
            gateway,
            with_fresh,
            before,
            base_version,
            &token,
        )
        .await
        {
            Ok(resolution) => resolution,
            Err(reread) => {
                warn!(
                    component = "delta",
                    table = %url,
                    gateway,
                    error = %source,
                    reread_error = %reread,
                    "commit outcome unknown and the table cannot be read; the next pass resolves it by the watermark"
                );
                return Err(commit_error(url, gateway, base_version, source));
            }
        };
        if failure == Failure::Ambiguous {
            let outcome = match resolution {
                Resolution::Landed(_) => AmbiguousOutcome::Landed,
                Resolution::NotLanded => AmbiguousOutcome::NotLanded,
                Resolution::Superseded => AmbiguousOutcome::Superseded,
            };
            metrics().commit_ambiguous(&label, outcome);
            warn!(
                component = "delta",
                table = %url,
                gateway,
                error = %source,
                outcome = ?outcome,
                "commit outcome was uncertain; resolved by re-reading the gateway's watermark"
            );
        }
        let pause = backoff(attempt);
        match decide(resolution, started.elapsed(), pause) {
            Decision::Landed(version) => {
                info!(component = "delta", table = %url, gateway, version, "the commit had landed");
                metrics().commit_made(&label);
                if table.version() != Some(version) {
                    // The state we hold is newer or older than our commit; later commits build
                    // on the latest state either way.
                    reload(table, url).await.map_err(CommitFailure::Other)?;
                }
                checkpoint_if_due(table, url, &label, version).await;
                return Ok(version);
            }
            Decision::Refilter => return Err(CommitFailure::Conflict(Box::new(source))),
            Decision::GiveUp => {
                return Err(if failure == Failure::Race {
                    CommitFailure::Other(DeltaError::Contended {
                        gateway: gateway.to_owned(),
                        attempts: attempt,
                    })
                } else {
                    commit_error(url, gateway, base_version, source)
                });
            }
            Decision::Retry(pause) => {
                tracing::debug!(
                    component = "delta",
                    table = %url,
                    gateway,
                    attempt,
                    pause_ms = pause.as_millis(),
                    "commit lost the race for its version to another writer; retrying on the new version"
                );
                tokio::time::sleep(pause).await;
            }
        }
    }
}

fn commit_error(
    url: &Url,
    gateway: &str,
    base_version: Version,
    source: DeltaTableError,
) -> CommitFailure {
    CommitFailure::Other(DeltaError::Commit {
        table: url.to_string(),
        gateway: gateway.to_owned(),
        base_version,
        source: Box::new(source),
    })
}

/// A lost race, for operations other than the collector's own commits (schema evolution):
/// another writer committed the same version first.
pub(crate) fn is_conflict(e: &DeltaTableError) -> bool {
    classify(e) == Failure::Race
}

/// Reloads `table`, re-reads `gateway`'s watermark (and fresh range, `with_fresh`) and, if they
/// moved away from `before`, looks
/// for the commit carrying `token` among the versions after `base_version`.
async fn resolve_attempt(
    table: &mut DeltaTable,
    url: &Url,
    gateway: &str,
    with_fresh: bool,
    before: Marks,
    base_version: Version,
    token: &str,
) -> Result<Resolution, DeltaError> {
    reload(table, url).await?;
    let now = watermark::read_marks(table, url, gateway, with_fresh).await?;
    if now == before {
        return Ok(Resolution::NotLanded);
    }
    let ours = find_commit(table, base_version, token)
        .await
        .map_err(|source| DeltaError::Reload {
            url: url.clone(),
            source: Box::new(source),
        })?;
    Ok(resolve(before, now, ours))
}

/// The version after `base_version`, up to the loaded one, whose commit carries `token`.
pub(crate) async fn find_commit(
    table: &DeltaTable,
    base_version: Version,
    token: &str,
) -> Result<Option<Version>, DeltaTableError> {
    let latest = table.version().unwrap_or(base_version);
    let log_store = table.log_store();
    for version in base_version + 1..=latest {
        let entry = log_store.read_commit_entry(version).await?;
        if entry.is_some_and(|bytes| holds_token(&bytes, token)) {
            return Ok(Some(version));
        }
    }
    Ok(None)
}

/// Whether a commit file carries `token` (a UUID, so it cannot appear by accident).
fn holds_token(commit: &[u8], token: &str) -> bool {
    String::from_utf8_lossy(commit).contains(token)
}

/// Writes a checkpoint of `version` (the table's loaded state) when it completes a
/// `delta.checkpointInterval`.
pub(crate) async fn checkpoint_if_due(
    table: &DeltaTable,
    url: &Url,
    label: &str,
    version: Version,
) {
    let Ok(state) = table.snapshot() else {
        return;
    };
    let interval = state.table_config().checkpoint_interval().get();
    if !(version + 1).is_multiple_of(interval) || table.version() != Some(version) {
        return;
    }
    match deltalake::checkpoints::create_checkpoint(table, None).await {
        Ok(()) => {
            metrics().checkpoint(label, true);
            info!(component = "delta", table = %url, version, "checkpoint written");
        }
        Err(e) => {
            metrics().checkpoint(label, false);
            warn!(component = "delta", table = %url, version, error = %e, "checkpoint failed; the commit stands and the next interval tries again");
        }
    }
}

/// The table's name for metrics: the name in its metadata (`readings`, `gaps`,
/// `quarantined_rows`), else the last segment of its URL.
pub(crate) fn table_label(table: &DeltaTable, url: &Url) -> String {
    table
        .snapshot()
        .ok()
        .and_then(|s| s.metadata().name().map(str::to_owned))
        .unwrap_or_else(|| {
            url.path()
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
}

/// Capped exponential backoff with full jitter (a random pause below the bound), so racing
/// collectors spread out instead of colliding again in step: the bound doubles from
/// [`BACKOFF_BASE`] with each attempt up to [`BACKOFF_CAP`].
pub(crate) fn backoff(attempt: u32) -> Duration {
    let bound = backoff_bound(attempt);
    let bound_ms = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX).max(1);
    let jitter_ms = u64::try_from(uuid::Uuid::new_v4().as_u128() % u128::from(bound_ms))
        .expect("the remainder is below bound_ms, which fits in u64");
    // At least a millisecond, so two writers never retry in the same instant by design.
    Duration::from_millis(jitter_ms.max(1))
}

/// The upper bound of the pause after `attempt` failed attempts.
pub(crate) fn backoff_bound(attempt: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_CAP)
}

/// Writes `batches` as data files of `table`, one file per partition value (as a single
/// writer would), the partitions' files written in parallel: Parquet encoding is most of a
/// commit's work, and a chunk of readings spans a few dates. Nothing is committed here.
async fn write_data_files(
    table: &DeltaTable,
    batches: Vec<RecordBatch>,
) -> Result<Vec<Add>, DeltaTableError> {
    let groups = by_partition(table, batches);
    let mut writers = Vec::with_capacity(groups.len());
    for group in groups {
        let mut writer =
            RecordBatchWriter::for_table(table)?.with_writer_properties(writer_properties());
        writers.push(AbortOnDropHandle::new(tokio::spawn(
            async move {
                for batch in group {
                    writer.write(batch).await?;
                }
                writer.flush().await
            }
            .in_current_span(),
        )));
    }
    let mut adds = Vec::new();
    for written in futures::future::join_all(writers).await {
        match written {
            Ok(written) => adds.extend(written?),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(join) => return Err(DeltaTableError::Generic(join.to_string())),
        }
    }
    Ok(adds)
}

/// `batches` grouped by the value of the table's partition column, for a table partitioned by
/// one date column (the readings table); one group of everything for any other table.
fn by_partition(table: &DeltaTable, batches: Vec<RecordBatch>) -> Vec<Vec<RecordBatch>> {
    let column = table
        .snapshot()
        .ok()
        .and_then(|s| match s.metadata().partition_columns() {
            [one] => Some(one.clone()),
            _ => None,
        });
    group_by_day(column.as_deref(), batches)
}

/// `batches` grouped by the value of the date column `column` (one group per day, in the order
/// the days first appear; within a group the rows keep their order); one group of everything
/// without a column, or when a batch has no such column or a null in it.
fn group_by_day(column: Option<&str>, batches: Vec<RecordBatch>) -> Vec<Vec<RecordBatch>> {
    let days = |batch: &RecordBatch| {
        batch
            .column_by_name(column?)?
            .as_any()
            .downcast_ref::<Date32Array>()
            .filter(|days| days.null_count() == 0)
            .map(|days| days.values().clone())
    };
    if batches.is_empty() {
        return Vec::new();
    }
    if !batches.iter().all(|b| days(b).is_some()) {
        return vec![batches];
    }
    let mut groups: Vec<(i32, Vec<RecordBatch>)> = Vec::new();
    for batch in batches {
        let days = days(&batch).expect("checked above");
        // Readings come in `seq` order, so a batch's days form a run or two.
        let mut start = 0;
        while start < days.len() {
            let day = days[start];
            let run = days[start..].iter().take_while(|&&d| d == day).count();
            let slice = batch.slice(start, run);
            match groups.iter_mut().find(|(d, _)| *d == day) {
                Some((_, group)) => group.push(slice),
                None => groups.push((day, vec![slice])),
            }
            start += run;
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
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
    // Chosen before the first read, so no iterator over the snapshot is held across an await
    // (it is not Send, and the pass runs in spawned tasks).
    let paths: Vec<object_store::path::Path> = snapshot
        .log_data()
        .iter()
        .filter(|file| {
            let stats = file
                .stats()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
            keep(stats.as_ref())
        })
        .map(|file| file.object_store_path())
        .collect();
    for path in paths {
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
    fn backoff_doubles_from_the_base_up_to_the_cap_with_full_jitter() {
        assert_eq!(backoff_bound(1), BACKOFF_BASE);
        assert_eq!(backoff_bound(2), BACKOFF_BASE * 2);
        assert_eq!(backoff_bound(5), BACKOFF_BASE * 16);
        assert_eq!(backoff_bound(8), BACKOFF_CAP);
        assert_eq!(backoff_bound(u32::MAX), BACKOFF_CAP);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let pause = backoff(4);
            assert!(
                pause >= Duration::from_millis(1) && pause < backoff_bound(4),
                "{pause:?}"
            );
            seen.insert(pause);
        }
        // Jitter: two racers almost never draw the same pause.
        assert!(seen.len() > 50, "{}", seen.len());
    }

    #[test]
    fn lost_races_and_uncertain_outcomes_are_told_apart_from_definite_errors() {
        use deltalake::kernel::transaction::TransactionError as T;
        assert_eq!(
            classify(&DeltaTableError::VersionAlreadyExists(3)),
            Failure::Race
        );
        assert_eq!(
            classify(&DeltaTableError::Transaction {
                source: T::MaxCommitAttempts(0)
            }),
            Failure::Race
        );
        let timeout = DeltaTableError::ObjectStore {
            source: object_store::Error::Generic {
                store: "S3",
                source: "operation timed out".into(),
            },
        };
        assert_eq!(classify(&timeout), Failure::Ambiguous);
        assert_eq!(
            classify(&DeltaTableError::Generic("reload failed".into())),
            Failure::Ambiguous
        );
        assert_eq!(
            classify(&DeltaTableError::Transaction {
                source: T::DeltaTableAppendOnly
            }),
            Failure::Definite
        );
    }

    #[test]
    fn the_watermark_decides_whether_an_attempt_landed() {
        // Unchanged watermark: nothing landed, nobody else applied the gateway.
        assert_eq!(resolve(Some(10), Some(10), None), Resolution::NotLanded);
        assert_eq!(resolve(None::<i64>, None, None), Resolution::NotLanded);
        // Our token is in the log: it landed, even if a later commit moved the watermark on.
        assert_eq!(resolve(Some(10), Some(20), Some(7)), Resolution::Landed(7));
        assert_eq!(resolve(Some(10), Some(30), Some(7)), Resolution::Landed(7));
        // Moved without our token: another writer applied the gateway.
        assert_eq!(resolve(Some(10), Some(20), None), Resolution::Superseded);
        assert_eq!(resolve(None, Some(5), None), Resolution::Superseded);
        // In the readings table the fresh range counts as much as the watermark: another
        // writer's fresh-lane commit leaves the watermark where it was.
        let marks = |fresh: Option<(i64, i64)>| Marks {
            watermark: Some(10),
            fresh: fresh.map(|(first, last)| FreshRange { first, last }),
        };
        assert_eq!(
            resolve(marks(Some((50, 60))), marks(Some((50, 70))), None),
            Resolution::Superseded
        );
        assert_eq!(
            resolve(marks(None), marks(None), None),
            Resolution::NotLanded
        );
    }

    #[test]
    fn only_a_commit_that_did_not_land_is_retried_and_only_within_the_budget() {
        let pause = Duration::from_millis(400);
        assert_eq!(
            decide(Resolution::NotLanded, Duration::from_secs(1), pause),
            Decision::Retry(pause)
        );
        assert_eq!(
            decide(Resolution::NotLanded, RETRY_BUDGET, pause),
            Decision::GiveUp
        );
        assert_eq!(
            decide(Resolution::Landed(12), RETRY_BUDGET * 2, pause),
            Decision::Landed(12)
        );
        assert_eq!(
            decide(Resolution::Superseded, Duration::ZERO, pause),
            Decision::Refilter
        );
    }

    #[test]
    fn rows_are_grouped_by_day_in_order_for_one_writer_per_partition() {
        use arrow_array::Int64Array;
        use arrow_schema::{DataType, Field, Schema};
        let schema = std::sync::Arc::new(Schema::new(vec![
            Field::new("seq", DataType::Int64, false),
            Field::new("date", DataType::Date32, false),
        ]));
        let batch = |seqs: Vec<i64>, days: Vec<i32>| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    std::sync::Arc::new(Int64Array::from(seqs)),
                    std::sync::Arc::new(Date32Array::from(days)),
                ],
            )
            .unwrap()
        };
        // The second batch straddles midnight; the third falls on the first batch's day again
        // (a clock step back).
        let batches = vec![
            batch(vec![1, 2], vec![10, 10]),
            batch(vec![3, 4, 5], vec![10, 11, 11]),
            batch(vec![6], vec![10]),
        ];
        let seqs = |group: &[RecordBatch]| -> Vec<i64> {
            group
                .iter()
                .flat_map(|b| {
                    b.column(0)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .unwrap()
                        .values()
                        .to_vec()
                })
                .collect()
        };
        let groups = group_by_day(Some("date"), batches.clone());
        let found: Vec<Vec<i64>> = groups.iter().map(|g| seqs(g)).collect();
        assert_eq!(found, vec![vec![1, 2, 3, 6], vec![4, 5]]);
        // A table not partitioned by the column: one writer for everything, as given.
        for column in [None, Some("day")] {
            let groups = group_by_day(column, batches.clone());
            assert_eq!(groups.len(), 1);
            assert_eq!(seqs(&groups[0]), vec![1, 2, 3, 4, 5, 6]);
        }
        assert!(group_by_day(Some("date"), Vec::new()).is_empty());
    }

    #[test]
    fn a_commit_file_is_recognised_by_its_token() {
        let token = uuid::Uuid::new_v4().to_string();
        let commit = format!(
            "{{\"commitInfo\":{{\"operation\":\"WRITE\",\"{COMMIT_ID_KEY}\":\"{token}\"}}}}\n{{\"txn\":{{\"appId\":\"plantline-gateway-gw\",\"version\":4}}}}"
        );
        assert!(holds_token(commit.as_bytes(), &token));
        assert!(!holds_token(
            commit.as_bytes(),
            &uuid::Uuid::new_v4().to_string()
        ));
    }
}
