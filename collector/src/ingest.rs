//! Applying the raw zone to the Delta tables: per gateway, in `seq` order, exactly once.
//!
//! # The delivery chain, collector side
//! 1. A gateway's batches are looked at in key order, which is `seq` order. Up to
//!    [`IngestOptions::read_ahead`] files are fetched and decoded at once, ahead of the one
//!    looked at (and of the commits), but their results are taken one by one in key order, so
//!    everything below holds as if they were read one after the other.
//! 2. Rows with `seq <= watermark` are dropped (replays, overlaps, batches applied by a pass that
//!    crashed before archiving); the rest are judged by the row-level rules ([`crate::rules`])
//!    and go into one readings commit together with the new watermark (`txn` action), at most
//!    `max_files_per_commit` files per commit. Readings a rule quarantines and the gaps the
//!    chunk reveals are committed to their own tables just before, each with its own watermark
//!    ([`crate::apply`] has the order and why it is exactly once).
//! 3. Only after the commit are the files archived (several at once). A crash between commit
//!    and archive, or a file that could not be archived, is harmless: the next pass finds the
//!    files again, drops all their rows and archives them.
//! 4. A file that fails the contract (or a key under a gateway folder that is not a batch key,
//!    or a batch with a reading that breaks a `fail` rule) is moved to the quarantine with a
//!    reason object ([`crate::quarantine`]) and the gateway's later batches are applied in the
//!    same pass: the watermark passes the bad file's `seq`
//!    range only through the rows of good files. This is safe because a gateway uploads its
//!    batches one at a time in `seq` order (batch contract, guarantee 4): nothing the bad file
//!    could have held is still on its way.
//! 5. A transient failure (the store cannot be reached, a read times out, a quarantine move
//!    fails) ends the gateway's pass after applying the batches read before it; later batches
//!    wait for the next pass, so the watermark never passes a file that was not looked at.
//!    Other gateways carry on.
//! 6. The fresh lane (batch contract v3, `gateway=<id>/fresh/`) is listed before the main lane
//!    and applied after it, in key order, against the gateway's fresh range
//!    ([`crate::apply`] has the rules). Its files are validated and quarantined like main ones
//!    (rules never fail a fresh file: a reading a rule would take ends its apply instead), then
//!    archived; a file that starts a new run before the main lane passed the range waits in the
//!    raw zone (deferred) with every later fresh file. The main lane alone moves the watermark.
//! 7. Several collectors may run passes over one gateway at once. Each commit lands only if the
//!    watermark it was built on is still the table's, and a pass reads the watermark only after
//!    listing the gateway's folder: a batch another collector archived before the listing was
//!    committed first, so it lies at or below that watermark and is never mistaken for a gap.

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, error, info, info_span, warn};

use crate::apply::{ApplyError, apply_chunk, apply_fresh};
use crate::delta::{DeltaError, FreshRange, GapRow, Tables, without_range};
use crate::quarantine::{QuarantineError, QuarantinedFile, Reason, quarantine};
use crate::raw_zone::{BatchFile, RawZone, RawZoneError, ValidBatch};
use crate::rules::{Judge, RuleAction, RuleCounts, RuleCountsByName, RuleSet};

/// How many of a gateway's batch files are read and decoded ahead of the one being looked at,
/// unless the options say otherwise ([`IngestOptions::read_ahead`]).
pub const DEFAULT_READ_AHEAD: usize = 16;

/// How many applied batch files are archived at once after a commit.
const ARCHIVES_IN_FLIGHT: usize = 16;

/// How a pass works: commit size and the row-level rules.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// At most this many batch files of one gateway per commit.
    pub max_files_per_commit: usize,
    /// How many of a gateway's batch files are read and decoded at once, ahead of the one being
    /// looked at (at least 1: one after the other). The files are still looked at, quarantined
    /// and applied in key order; reads ahead of a file that stops the gateway's pass are
    /// dropped.
    pub read_ahead: usize,
    /// The row-level data-quality rules (none: every valid reading is kept, unflagged).
    pub rules: RuleSet,
    /// How many times a chunk whose commit lost a race is re-read and retried.
    pub commit_attempts: u32,
    /// Only batch files whose first `seq` is above this are listed (`None`: all of them); a
    /// backfill's resume point.
    pub start_after: Option<i64>,
    /// Called after each chunk is applied and archived, for progress reports.
    pub on_chunk: Option<ChunkHook>,
    /// Whether the gateways' fresh lanes (`gateway=<id>/fresh/`) are listed and applied. Off for
    /// a backfill: the archive's main lane holds every reading.
    pub fresh_lane: bool,
}

/// What one chunk of a gateway's batch files amounted to, for progress reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkDone {
    /// Batch files looked at (applied or quarantined).
    pub files: usize,
    /// Their size in bytes.
    pub bytes: u64,
    /// Rows appended to the readings table.
    pub rows_applied: usize,
}

/// A callback for [`ChunkDone`]; cheap to clone with the options.
#[derive(Clone)]
pub struct ChunkHook(std::sync::Arc<dyn Fn(ChunkDone) + Send + Sync>);

impl ChunkHook {
    /// Wraps `f`.
    pub fn new(f: impl Fn(ChunkDone) + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(f))
    }
}

impl std::fmt::Debug for ChunkHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkHook")
    }
}

impl IngestOptions {
    /// `max_files_per_commit` files per commit, no rules, 5 commit attempts.
    pub fn new(max_files_per_commit: usize) -> Self {
        Self {
            max_files_per_commit,
            read_ahead: DEFAULT_READ_AHEAD,
            rules: RuleSet::default(),
            commit_attempts: 5,
            start_after: None,
            on_chunk: None,
            fresh_lane: true,
        }
    }

    /// The same options, leaving the fresh lane alone (neither listed nor applied).
    #[must_use]
    pub fn without_fresh_lane(mut self) -> Self {
        self.fresh_lane = false;
        self
    }

    /// The same options, listing only batch files whose first `seq` is above `seq`.
    #[must_use]
    pub fn with_start_after(mut self, seq: Option<i64>) -> Self {
        self.start_after = seq;
        self
    }

    /// The same options, calling `hook` after each chunk.
    #[must_use]
    pub fn with_chunk_hook(mut self, hook: ChunkHook) -> Self {
        self.on_chunk = Some(hook);
        self
    }

    /// The same options, reading `files` batch files at once (at least 1).
    #[must_use]
    pub fn with_read_ahead(mut self, files: usize) -> Self {
        self.read_ahead = files.max(1);
        self
    }

    /// The same options with `rules`.
    #[must_use]
    pub fn with_rules(mut self, rules: RuleSet) -> Self {
        self.rules = rules;
        self
    }

    /// The same options with `attempts` commit attempts (at least 1).
    #[must_use]
    pub fn with_commit_attempts(mut self, attempts: u32) -> Self {
        self.commit_attempts = attempts.max(1);
        self
    }
}

/// Errors that stop one gateway's pass (the table and the raw zone are left consistent; the
/// next pass resumes).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("gateway `{gateway}`: {source}")]
    RawZone {
        gateway: String,
        #[source]
        source: RawZoneError,
    },
    #[error("gateway `{gateway}`: {source}")]
    Delta {
        gateway: String,
        #[source]
        source: DeltaError,
    },
    #[error("gateway `{gateway}`: {source}")]
    Quarantine {
        gateway: String,
        #[source]
        source: QuarantineError,
    },
    #[error("cannot list the gateways in the raw zone: {0}")]
    ListGateways(#[source] RawZoneError),
}

impl IngestError {
    fn from_apply(gateway: &str, e: ApplyError) -> Self {
        let gateway = gateway.to_owned();
        match e {
            ApplyError::Delta(source) => Self::Delta { gateway, source },
            ApplyError::Quarantine(source) => Self::Quarantine { gateway, source },
        }
    }
}

/// What one pass did for one gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayReport {
    /// The gateway id.
    pub gateway: String,
    /// Batch files applied (including those whose rows were all duplicates) and archived, both
    /// lanes.
    pub files_applied: usize,
    /// Rows appended to the Delta table, both lanes.
    pub rows_applied: usize,
    /// Rows dropped because their `seq` was at or below the watermark, or inside the fresh range
    /// (the fresh lane applied them first).
    pub rows_skipped: usize,
    /// Fresh-lane files applied (or dropped as replays, or ended by a rule) and archived; part of
    /// `files_applied`.
    pub fresh_files_applied: usize,
    /// Rows the fresh lane appended; part of `rows_applied`.
    pub fresh_rows_applied: usize,
    /// Fresh-lane files left in the raw zone for a later pass: they start a new run before the
    /// main lane passed the current one. Their keys, in key order.
    pub fresh_deferred: Vec<String>,
    /// The gateway's fresh range as this pass's fresh apply left it (`None` when the pass had no
    /// valid fresh file to look at, or the gateway has no range).
    pub fresh_range: Option<FreshRange>,
    /// Rows a `quarantine` rule moved to the `quarantined_rows` table.
    pub rows_quarantined: usize,
    /// Rows applied with at least one `flag` rule named in `dq_flags`.
    pub rows_flagged: usize,
    /// What each rule did, by rule name (rules that did nothing are left out).
    pub rules: RuleCountsByName,
    /// Gap rows recorded in this pass, in `seq` order.
    pub gaps: Vec<GapRow>,
    /// The gateway's watermark after the pass (`None`: nothing ever applied).
    pub watermark: Option<i64>,
    /// The Delta version of the pass's last commit for this gateway (`None`: no commit).
    pub delta_version: Option<u64>,
    /// Commits made.
    pub commits: usize,
    /// Files moved to the quarantine in this pass, in the order they were found.
    pub quarantined: Vec<QuarantinedFile>,
    /// Uploads in flight (names starting with `.`), left alone.
    pub in_flight: Vec<String>,
    /// A store, quarantine or Delta failure that ended this gateway's pass early (retried next
    /// pass).
    pub error: Option<String>,
}

/// What one pass over the whole raw zone did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// One entry per gateway folder, sorted by gateway id.
    pub gateways: Vec<GatewayReport>,
    /// Folders under the raw prefix that are not `gateway=<id>/` (left alone).
    pub foreign_folders: Vec<String>,
}

impl IngestReport {
    /// Total rows appended in this pass.
    pub fn rows_applied(&self) -> usize {
        self.gateways.iter().map(|g| g.rows_applied).sum()
    }

    /// Total files moved to the quarantine in this pass.
    pub fn files_quarantined(&self) -> usize {
        self.gateways.iter().map(|g| g.quarantined.len()).sum()
    }

    /// Total rows moved to the `quarantined_rows` table in this pass.
    pub fn rows_quarantined(&self) -> usize {
        self.gateways.iter().map(|g| g.rows_quarantined).sum()
    }

    /// Total gap rows recorded in this pass.
    pub fn gaps_recorded(&self) -> usize {
        self.gateways.iter().map(|g| g.gaps.len()).sum()
    }

    /// What each rule did over all gateways, by rule name.
    pub fn rule_counts(&self) -> RuleCountsByName {
        let mut total = RuleCountsByName::new();
        for gw in &self.gateways {
            for (rule, counts) in &gw.rules {
                total.entry(rule.clone()).or_default().add(counts);
            }
        }
        total
    }

    /// The report of one gateway.
    pub fn gateway(&self, id: &str) -> Option<&GatewayReport> {
        self.gateways.iter().find(|g| g.gateway == id)
    }
}

/// Applies every gateway's pending batches. A failing gateway is recorded in its report and does
/// not stop the others; only failing to list the raw zone is an error.
pub async fn ingest_all(
    raw: &RawZone,
    tables: &mut Tables,
    options: &IngestOptions,
) -> Result<IngestReport, IngestError> {
    let listing = raw
        .list_gateways()
        .await
        .map_err(IngestError::ListGateways)?;
    for folder in &listing.foreign {
        warn!(component = "ingest", folder = %folder, "folder in the raw zone is not a gateway folder; left alone");
    }
    let mut report = IngestReport {
        gateways: Vec::with_capacity(listing.gateways.len()),
        foreign_folders: listing.foreign,
    };
    for gateway in listing.gateways {
        let mut gw = GatewayReport {
            gateway: gateway.clone(),
            ..GatewayReport::default()
        };
        if let Err(e) = ingest_gateway_into(raw, tables, &gateway, options, &mut gw)
            .instrument(info_span!("ingest", component = "ingest", gateway = %gateway))
            .await
        {
            error!(component = "ingest", gateway = %gateway, error = %e, "gateway pass ended early; retried next pass");
            gw.error = Some(e.to_string());
        }
        report.gateways.push(gw);
    }
    Ok(report)
}

/// Applies one gateway's pending batches, `max_files_per_commit` files per commit, until its
/// folder is drained or a transient failure stops it; bad files are quarantined on the way.
pub async fn ingest_gateway(
    raw: &RawZone,
    tables: &mut Tables,
    gateway: &str,
    options: &IngestOptions,
) -> Result<GatewayReport, IngestError> {
    let mut report = GatewayReport {
        gateway: gateway.to_owned(),
        ..GatewayReport::default()
    };
    ingest_gateway_into(raw, tables, gateway, options, &mut report)
        .instrument(info_span!("ingest", component = "ingest", gateway = %gateway))
        .await?;
    Ok(report)
}

#[allow(clippy::too_many_lines)] // the per-gateway loop, read top to bottom
async fn ingest_gateway_into(
    raw: &RawZone,
    tables: &mut Tables,
    gateway: &str,
    options: &IngestOptions,
    report: &mut GatewayReport,
) -> Result<(), IngestError> {
    let raw_err = |source| IngestError::RawZone {
        gateway: gateway.to_owned(),
        source,
    };
    let delta_err = |source| IngestError::Delta {
        gateway: gateway.to_owned(),
        source,
    };
    let quarantine_err = |source| IngestError::Quarantine {
        gateway: gateway.to_owned(),
        source,
    };
    let listing = if options.fresh_lane {
        // The fresh lane first: see `RawZone::list_batches`.
        raw.list_batches(gateway, options.start_after).await
    } else {
        raw.list_main_batches(gateway, options.start_after).await
    }
    .map_err(raw_err)?;
    // Pick up commits of other collectors, after the listing: a collector commits a batch
    // before it archives it, so every batch missing from the listing because another
    // collector archived it is at or below the watermark read now. Read before the listing, a
    // batch archived in between would look like a hole in the seqs and be recorded as a gap.
    tables.reload().await.map_err(delta_err)?;
    report.watermark = tables
        .readings
        .watermark(gateway)
        .await
        .map_err(delta_err)?;
    for key in &listing.in_flight {
        warn!(key = %key, "upload in flight in a gateway folder; left alone");
    }
    report.in_flight = listing.in_flight;
    // Foreign keys hold no batch, so moving them first changes nothing for the seq order.
    for object in &listing.foreign {
        let moved = quarantine(
            raw,
            gateway,
            &object.object_key,
            object.size,
            None,
            Reason::foreign_key(),
        )
        .await
        .map_err(quarantine_err)?;
        record_quarantined(report, moved);
    }

    // The reads run ahead of the loop (and of the commits), but their results are taken in key
    // order, so everything below sees the files exactly as if it read them one by one.
    let mut reads = read_ahead(raw, &listing.batches, options.read_ahead);
    for chunk in listing.batches.chunks(options.max_files_per_commit.max(1)) {
        // One clock reading per chunk: every reading of a commit is judged at the same instant.
        let now_us = chrono::Utc::now().timestamp_micros();
        let mut judge = Judge::new(&options.rules, now_us);
        // Readings at or below this were decided by an earlier attempt, and those of the fresh
        // range by the fresh lane; `fail` rules skip them.
        let (decided, fresh_range) = if options.rules.has(RuleAction::Fail) {
            let marks = tables.readings.marks(gateway).await.map_err(delta_err)?;
            let decided = tables
                .quarantined_rows
                .watermark(gateway)
                .await
                .map_err(delta_err)?
                .max(marks.watermark);
            (decided, marks.fresh.filter(|r| r.is_live(marks.watermark)))
        } else {
            (report.watermark, None)
        };
        let mut valid: Vec<ValidBatch> = Vec::with_capacity(chunk.len());
        let mut stop = None;
        let mut rows_applied = 0;
        for file in chunk {
            let read = reads
                .next()
                .await
                .expect("one read per listed file, in listing order");
            let (object_key, last_seq, reason) = match read {
                Ok(batch) => {
                    let failure = batch.data.iter().find_map(|b| {
                        let (outside, _) = without_range(vec![(0, b.clone())], fresh_range);
                        outside
                            .iter()
                            .find_map(|(_, part)| judge.first_failure(part, decided))
                    });
                    match failure {
                        None => {
                            valid.push(batch);
                            continue;
                        }
                        Some(failure) => {
                            let rule = &options.rules.rules()[failure.violation.rule];
                            report
                                .rules
                                .entry(rule.name.clone())
                                .or_default()
                                .failed_files += 1;
                            (
                                batch.file.object_key.clone(),
                                Some(batch.last_seq),
                                Reason::rule_failed(rule, &failure),
                            )
                        }
                    }
                }
                Err(RawZoneError::Invalid {
                    key,
                    problem,
                    last_seq,
                }) => (key, last_seq, Reason::from_problem(&problem)),
                Err(e) => {
                    stop = Some(raw_err(e));
                    break;
                }
            };
            match quarantine(raw, gateway, &object_key, file.size, last_seq, reason).await {
                Ok(moved) => record_quarantined(report, moved),
                Err(e) => {
                    stop = Some(quarantine_err(e));
                    break;
                }
            }
        }
        // Everything before the first unreadable batch is still applied: it precedes it in seq.
        if !valid.is_empty() {
            let outcome = apply_chunk(
                raw,
                tables,
                gateway,
                &valid,
                &mut judge,
                now_us,
                options.commit_attempts,
            )
            .await
            .map_err(|e| IngestError::from_apply(gateway, e))?;
            report.rows_applied += outcome.rows_applied;
            rows_applied = outcome.rows_applied;
            report.rows_skipped += outcome.rows_skipped;
            report.rows_quarantined += outcome.rows_quarantined;
            report.rows_flagged += outcome.rows_flagged;
            report.watermark = outcome.watermark_after;
            for (rule, counts) in &outcome.rules {
                report.rules.entry(rule.clone()).or_default().add(counts);
            }
            report.gaps.extend(outcome.gaps);
            if let Some(version) = outcome.version {
                report.delta_version = Some(version);
                report.commits += 1;
            }
            info!(
                files = valid.len(),
                rows_applied = outcome.rows_applied,
                rows_skipped = outcome.rows_skipped,
                watermark = ?outcome.watermark_after,
                version = ?outcome.version,
                "applied"
            );
            let (archived, failed) = archive_applied(raw, &valid).await;
            report.files_applied += archived;
            if let Some(e) = failed {
                return Err(raw_err(e));
            }
        }
        if let Some(e) = stop {
            return Err(e);
        }
        if let Some(hook) = &options.on_chunk {
            hook.0(ChunkDone {
                files: chunk.len(),
                bytes: chunk.iter().map(|f| f.size).sum(),
                rows_applied,
            });
        }
    }
    if !listing.fresh.is_empty() {
        apply_fresh_lane(raw, tables, gateway, &listing.fresh, options, report).await?;
    }
    report
        .rules
        .retain(|_, counts: &mut RuleCounts| !counts.is_zero());
    Ok(())
}

/// Applies one gateway's fresh-lane files (in key order), after its main lane: validated and
/// quarantined like main files, applied against the fresh range, archived; the files from the
/// first one that must wait on are left in the raw zone.
async fn apply_fresh_lane(
    raw: &RawZone,
    tables: &mut Tables,
    gateway: &str,
    files: &[BatchFile],
    options: &IngestOptions,
    report: &mut GatewayReport,
) -> Result<(), IngestError> {
    let raw_err = |source| IngestError::RawZone {
        gateway: gateway.to_owned(),
        source,
    };
    let quarantine_err = |source| IngestError::Quarantine {
        gateway: gateway.to_owned(),
        source,
    };
    let chunk_size = options.max_files_per_commit.max(1);
    let mut reads = read_ahead(raw, files, options.read_ahead);
    let mut next = 0;
    while next < files.len() {
        let chunk = &files[next..(next + chunk_size).min(files.len())];
        let now_us = chrono::Utc::now().timestamp_micros();
        let mut judge = Judge::new(&options.rules, now_us);
        let mut valid: Vec<ValidBatch> = Vec::with_capacity(chunk.len());
        let mut stop = None;
        let mut looked_at = 0;
        for file in chunk {
            let read = reads
                .next()
                .await
                .expect("one read per listed file, in listing order");
            let (object_key, last_seq, reason) = match read {
                Ok(batch) => {
                    valid.push(batch);
                    looked_at += 1;
                    continue;
                }
                Err(RawZoneError::Invalid {
                    key,
                    problem,
                    last_seq,
                }) => (key, last_seq, Reason::from_problem(&problem)),
                Err(e) => {
                    stop = Some(raw_err(e));
                    break;
                }
            };
            match quarantine(raw, gateway, &object_key, file.size, last_seq, reason).await {
                Ok(moved) => record_quarantined(report, moved),
                Err(e) => {
                    stop = Some(quarantine_err(e));
                    break;
                }
            }
            looked_at += 1;
        }
        let mut deferred = false;
        if !valid.is_empty() {
            let outcome = apply_fresh(tables, gateway, &valid, &mut judge, options.commit_attempts)
                .await
                .map_err(|e| IngestError::from_apply(gateway, e))?;
            report.rows_applied += outcome.rows_applied;
            report.fresh_rows_applied += outcome.rows_applied;
            report.fresh_range = outcome.range_after;
            report.rows_skipped += outcome.rows_skipped;
            report.rows_flagged += outcome.rows_flagged;
            for (rule, counts) in &outcome.rules {
                report.rules.entry(rule.clone()).or_default().add(counts);
            }
            if let Some(version) = outcome.version {
                report.delta_version = Some(version);
                report.commits += 1;
            }
            info!(
                lane = "fresh",
                files = outcome.settled,
                rows_applied = outcome.rows_applied,
                rows_skipped = outcome.rows_skipped,
                fresh_range = ?outcome.range_after.map(|r| (r.first, r.last)),
                version = ?outcome.version,
                "fresh lane applied"
            );
            let (archived, failed) = archive_applied(raw, &valid[..outcome.settled]).await;
            report.files_applied += archived;
            report.fresh_files_applied += archived;
            if let Some(e) = failed {
                return Err(raw_err(e));
            }
            if outcome.settled < valid.len() {
                deferred = true;
                record_deferred(report, files, &valid[outcome.settled].file);
            }
        }
        if let Some(e) = stop {
            return Err(e);
        }
        if deferred {
            break;
        }
        next += looked_at;
    }
    Ok(())
}

/// The reads of `files`, in their order, up to `window` of them (at least 1) in flight at once:
/// each read is a task of its own, so the files ahead are fetched and decoded while the caller
/// judges, quarantines or commits. Dropping the stream aborts the reads still in flight (a
/// read changes nothing in the raw zone, so an abandoned one leaves no trace).
fn read_ahead<'a>(
    raw: &RawZone,
    files: &'a [BatchFile],
    window: usize,
) -> BoxStream<'a, Result<ValidBatch, RawZoneError>> {
    let raw = raw.clone();
    futures::stream::iter(files.iter().map(move |file| {
        let (raw, file) = (raw.clone(), file.clone());
        let key = file.object_key.clone();
        let task = AbortOnDropHandle::new(tokio::spawn(
            async move { raw.read_batch(&file).await }.in_current_span(),
        ));
        async move {
            match task.await {
                Ok(read) => read,
                Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
                // Only when the runtime shuts down: as transient as a failed request.
                Err(join) => Err(RawZoneError::Read {
                    key,
                    source: object_store::Error::Generic {
                        store: "raw zone",
                        source: Box::new(join),
                    },
                }),
            }
        }
    }))
    .buffered(window.max(1))
    // Boxed, so the future of the pass stays provably `Send` (rust-lang/rust#102211).
    .boxed()
}

/// Archives applied batch files (their commit has landed), [`ARCHIVES_IN_FLIGHT`] at once.
/// Returns how many were archived and the first failure in key order; the other failures are
/// logged. A file left behind is harmless: the next pass drops its rows by the watermark and
/// archives it then.
async fn archive_applied(raw: &RawZone, batches: &[ValidBatch]) -> (usize, Option<RawZoneError>) {
    // Boxed, so the future of the pass stays provably `Send` (rust-lang/rust#102211).
    let mut results: Vec<(usize, Result<(), RawZoneError>)> =
        futures::stream::iter(batches.iter().enumerate())
            .map(|(i, batch)| async move { (i, raw.archive(&batch.file).await) })
            .buffer_unordered(ARCHIVES_IN_FLIGHT)
            .boxed()
            .collect()
            .await;
    results.sort_by_key(|(i, _)| *i);
    let archived = results.iter().filter(|(_, r)| r.is_ok()).count();
    let mut failures = results.into_iter().filter_map(|(_, r)| r.err());
    let first = failures.next();
    for e in failures {
        warn!(error = %e, "applied batch not archived; the next pass archives it");
    }
    (archived, first)
}

/// Reports the fresh files that wait for a later pass: `first_waiting` and every file of
/// `files` after it (a range only grows in key order) that was not quarantined.
fn record_deferred(report: &mut GatewayReport, files: &[BatchFile], first_waiting: &BatchFile) {
    let from = files
        .iter()
        .position(|f| f.object_key == first_waiting.object_key)
        .expect("the valid files are files of this listing");
    let waiting: Vec<String> = files[from..]
        .iter()
        .filter(|f| !report.quarantined.iter().any(|q| q.key == f.object_key))
        .map(|f| f.object_key.clone())
        .collect();
    report.fresh_deferred.extend(waiting);
    info!(
        lane = "fresh",
        key = %first_waiting.object_key,
        waiting = report.fresh_deferred.len(),
        "fresh batch starts a new run before the main lane passed the current one; left for a later pass"
    );
}

/// Logs and reports one quarantined file; `None` means another collector moved it first.
fn record_quarantined(report: &mut GatewayReport, moved: Option<QuarantinedFile>) {
    let Some(file) = moved else {
        return;
    };
    error!(
        key = %file.key,
        quarantine_key = %file.quarantine_key,
        kind = %file.reason.kind,
        reason = %file.reason.message,
        resumed = file.resumed,
        "file quarantined; the gateway's later batches carry on without its rows"
    );
    report.quarantined.push(file);
}
