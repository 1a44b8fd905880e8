//! Applying one chunk of a gateway's valid batches to the three tables: the row-level rules
//! decide each new reading, the gaps are derived, and the commits go out in a fixed order.
//!
//! # The commit order, and why it is exactly once
//! For a chunk whose new readings end at `seq` H (readings watermark W):
//! 1. `quarantined_rows`: the readings a `quarantine` rule moved, with the gateway's watermark
//!    in that table moved to H. Skipped when there are none.
//! 2. `gaps`: the gap rows whose `first_seq` is above the gateway's gaps watermark (and above
//!    W), with that watermark moved past H and past every recorded `first_seq`. Skipped when
//!    there are none.
//! 3. `readings`: the kept readings (with `dq_flags`) and the readings watermark H, in one
//!    commit; a commit with no rows when every new reading was quarantined.
//!
//! A crash (or a lost race) after 1 or 2 leaves those tables ahead of the readings watermark.
//! The retry starts over from the readings watermark W and:
//! - drops every gap row at or below the gaps watermark (they are recorded already);
//! - does not judge the readings in `W+1 ..= quarantined_rows watermark` again: the ones the
//!   `quarantined_rows` table holds are dropped, the others are kept. So a rule that depends on
//!   the clock cannot send a reading to both tables, or to neither.
//!
//! The rules' clock is read once per chunk ([`crate::rules::Judge`]).
//!
//! # The fresh lane (batch contract v3)
//! The readings table keeps one fresh range [Fs, Fe] per gateway beside its watermark W
//! ([`crate::delta::FreshRange`]). Main-lane chunks keep readings with `seq > W` outside the
//! range and record no gap inside it. A gateway's fresh batches are applied after its main
//! chunks, in key order ([`apply_fresh`]):
//! - readings at or below W, or inside a live range (`W < Fe`), are dropped (replays; a file that
//!   continues the range only adds readings above Fe);
//! - a file with no live range, or contiguous with it (`first seq <= Fe + 1`), is applied: the
//!   range becomes [Fs, last applied] (live range) or [first applied, last applied];
//! - a file that starts a new run while the range is live (`first seq > Fe + 1`, `W < Fe`) waits
//!   in the raw zone with every later fresh file: the gateway starts a new run only after its main
//!   lane uploaded everything up to Fe, so a later pass applies it;
//! - `flag` rules flag fresh readings as main ones; a reading a `quarantine` or `fail` rule would
//!   take ends the file's apply just before it: it and the rest of the file are the main lane's;
//! - no gaps: the fresh lane holds copies, the main lane reports what is missing.
//!
//! Exactly once: the main lane keeps `seq > W` minus the range, the fresh lane keeps `seq > W`
//! minus the range, and every commit lands only if W and the range are what it was built on.

use std::collections::BTreeSet;

use arrow_array::{Array, RecordBatch, StringArray};
use edge_agent::contract;
use tracing::{info, warn};

use crate::delta::{
    CommitFailure, DeltaError, FreshRange, GapRow, QuarantinedRow, Tables, backoff, filter_above,
    seq_column, with_flags, without_range,
};
use crate::gaps::{self, Jump, QuarantinedRange};
use crate::quarantine::{QuarantineError, quarantined_batches};
use crate::raw_zone::{RawZone, ValidBatch};
use crate::rules::{Judge, RowVerdict, RuleCountsByName};

/// Why a chunk could not be applied (the tables stay consistent; the next pass resumes).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error(transparent)]
    Delta(#[from] DeltaError),
    #[error(transparent)]
    Quarantine(#[from] QuarantineError),
}

/// What applying one chunk did.
#[derive(Debug, Default)]
pub(crate) struct ChunkOutcome {
    /// The readings table version of the commit, `None` when nothing was new.
    pub(crate) version: Option<u64>,
    pub(crate) rows_applied: usize,
    pub(crate) rows_skipped: usize,
    pub(crate) rows_quarantined: usize,
    pub(crate) rows_flagged: usize,
    pub(crate) watermark_after: Option<i64>,
    /// Gap rows this chunk committed.
    pub(crate) gaps: Vec<GapRow>,
    /// What each rule did (flags, rows quarantined) in this chunk.
    pub(crate) rules: RuleCountsByName,
    pub(crate) conflicts: u32,
}

/// Applies `files` (one gateway's valid batches, in `seq` order) to `tables`, retrying from the
/// top with backoff when a commit loses a race, up to `attempts` times.
pub(crate) async fn apply_chunk(
    raw: &RawZone,
    tables: &mut Tables,
    gateway: &str,
    files: &[ValidBatch],
    judge: &mut Judge<'_>,
    now_us: i64,
    attempts: u32,
) -> Result<ChunkOutcome, ApplyError> {
    // What earlier attempts of this chunk committed to the side tables stays committed; the
    // retry sees it through the watermarks and must not count it again.
    let mut done = ChunkOutcome::default();
    loop {
        match attempt(raw, tables, gateway, files, judge, now_us, &mut done).await {
            Ok(()) => return Ok(done),
            Err(AttemptError::Failed(e)) => return Err(e),
            Err(AttemptError::Conflict(source)) => {
                done.conflicts += 1;
                prepare_retry(tables, gateway, "main", done.conflicts, attempts, &source).await?;
            }
        }
    }
}

/// After the `conflicts`-th lost race of a chunk of `lane`: gives up once `attempts` are spent,
/// otherwise waits the backoff and reloads the tables, so the next attempt starts over from the
/// watermarks the winner left.
async fn prepare_retry(
    tables: &mut Tables,
    gateway: &str,
    lane: &'static str,
    conflicts: u32,
    attempts: u32,
    source: &deltalake::DeltaTableError,
) -> Result<(), ApplyError> {
    if conflicts >= attempts {
        return Err(DeltaError::Contended {
            gateway: gateway.to_owned(),
            attempts: conflicts,
        }
        .into());
    }
    let pause = backoff(conflicts);
    warn!(
        component = "delta",
        gateway,
        lane,
        attempt = conflicts,
        pause_ms = pause.as_millis(),
        error = %source,
        "commit lost a race with another writer of this gateway; re-reading the watermarks"
    );
    tokio::time::sleep(pause).await;
    tables.reload().await?;
    Ok(())
}

enum AttemptError {
    Conflict(Box<deltalake::DeltaTableError>),
    Failed(ApplyError),
}

impl From<DeltaError> for AttemptError {
    fn from(e: DeltaError) -> Self {
        Self::Failed(e.into())
    }
}

impl From<QuarantineError> for AttemptError {
    fn from(e: QuarantineError) -> Self {
        Self::Failed(e.into())
    }
}

impl From<CommitFailure> for AttemptError {
    fn from(e: CommitFailure) -> Self {
        match e {
            CommitFailure::Conflict(source) => Self::Conflict(source),
            CommitFailure::Other(e) => Self::Failed(e.into()),
        }
    }
}

/// The readings of one batch, sorted into kept runs and quarantined rows.
struct Sorted {
    kept: Vec<RecordBatch>,
    quarantined: Vec<QuarantinedRow>,
    rows_kept: usize,
    rows_flagged: usize,
    already_quarantined: usize,
}

#[allow(clippy::too_many_lines)] // one attempt, read top to bottom in commit order
async fn attempt(
    raw: &RawZone,
    tables: &mut Tables,
    gateway: &str,
    files: &[ValidBatch],
    judge: &mut Judge<'_>,
    now_us: i64,
    done: &mut ChunkOutcome,
) -> Result<(), AttemptError> {
    let marks = tables.readings.marks(gateway).await?;
    let w_readings = marks.watermark;
    // The fresh lane's rows above the watermark: in the table already, skipped here, no gap.
    let fresh_range = marks.fresh.filter(|r| r.is_live(w_readings));
    let w_gaps = tables.gaps.watermark(gateway).await?;
    let w_quarantined = tables.quarantined_rows.watermark(gateway).await?;

    let mut owners = Vec::new();
    let mut flat = Vec::new();
    for (i, file) in files.iter().enumerate() {
        for batch in &file.data {
            owners.push(i);
            flat.push(batch.clone());
        }
    }
    let (above, high, skipped) = filter_above(&flat, w_readings);
    done.rows_skipped = skipped;
    done.watermark_after = w_readings;
    done.version = None;
    done.rows_applied = 0;
    done.rows_flagged = 0;
    let Some(high) = high.filter(|_| !above.is_empty()) else {
        return Ok(());
    };
    // The watermark still moves to `high` when every new reading lies in the fresh range.
    let (new_rows, in_range) = without_range(above.clone(), fresh_range);
    done.rows_skipped += in_range;

    // Readings an earlier attempt already decided: the quarantined ones are in the table.
    let decided_up_to = w_quarantined.filter(|&q| w_readings.is_none_or(|w| q > w));
    let already: BTreeSet<i64> = match decided_up_to {
        Some(hi) => {
            let lo = w_readings.map_or(i64::MIN, |w| w + 1);
            tables
                .quarantined_rows
                .quarantined_seqs(gateway, lo, hi)
                .await?
        }
        None => BTreeSet::new(),
    };

    let mut kept = Vec::new();
    let mut new_quarantined = Vec::new();
    let mut flag_counts = RuleCountsByName::new();
    let mut quarantine_counts = RuleCountsByName::new();
    for (index, batch) in &new_rows {
        let file_key = &files[owners[*index]].file.object_key;
        let sorted = sort_rows(
            batch,
            judge,
            file_key,
            now_us,
            decided_up_to,
            &already,
            &mut flag_counts,
            &mut quarantine_counts,
        );
        kept.extend(sorted.kept);
        new_quarantined.extend(sorted.quarantined);
        done.rows_applied += sorted.rows_kept;
        done.rows_flagged += sorted.rows_flagged;
        done.rows_skipped += sorted.already_quarantined;
    }

    // Gaps, from the readings that reached the collector (quarantined ones and those the fresh
    // lane applied included).
    let seqs: Vec<(&str, &[i64])> = above
        .iter()
        .map(|(i, b)| {
            (
                files[owners[*i]].file.object_key.as_str(),
                seq_column(b).values().as_ref(),
            )
        })
        .collect();
    let mut jumps = gaps::find_jumps(w_readings, seqs.iter().copied());
    let first_fresh = seqs[0].1[0];
    if w_readings.is_none() && first_fresh > 1 {
        // The gateway's first readings: only quarantined files can show what came before (a
        // gateway's `seq` starts at 1, so a first reading at 1 has nothing before it).
        let before = quarantined_batches(raw, gateway, 0, first_fresh - 1).await?;
        if let Some(first) = before.first() {
            jumps.insert(
                0,
                Jump {
                    first_seq: first.first_seq,
                    last_seq: first_fresh - 1,
                    file_key: seqs[0].0.to_owned(),
                },
            );
        }
    }
    let quarantined_files: Vec<QuarantinedRange> = match (jumps.first(), jumps.last()) {
        (Some(first), Some(last)) => {
            quarantined_batches(raw, gateway, first.first_seq, last.last_seq).await?
        }
        _ => Vec::new(),
    };
    let agent: Vec<(gaps::AgentGap, String)> = files
        .iter()
        .flat_map(|f| {
            f.gaps
                .iter()
                .map(|g| (g.clone(), f.file.object_key.clone()))
        })
        .collect();
    for (record, key) in &agent {
        if !gaps::agent::KNOWN_REASONS.contains(&record.reason.as_str()) {
            warn!(key = %key, reason = %record.reason, "agent gap record with a reason this collector does not know; recorded as given");
        }
    }
    let gap_floor = w_gaps.max(w_readings);
    let new_gaps: Vec<GapRow> = gaps::outside_fresh_range(
        gaps::explain(
            gateway,
            &jumps,
            &agent,
            &quarantined_files,
            gap_floor,
            now_us,
        ),
        fresh_range,
    );

    // 1. quarantined rows.
    if !new_quarantined.is_empty() {
        let watermark = w_quarantined.map_or(high, |w| w.max(high));
        tables
            .quarantined_rows
            .commit(gateway, &new_quarantined, watermark)
            .await?;
        done.rows_quarantined += new_quarantined.len();
        for (rule, counts) in quarantine_counts {
            done.rules.entry(rule).or_default().add(&counts);
        }
        warn!(
            rows = new_quarantined.len(),
            "readings broke a quarantine rule; moved to the quarantined_rows table"
        );
    }
    // 2. gaps.
    if !new_gaps.is_empty() {
        let highest_first = new_gaps.iter().map(|g| g.first_seq).max().unwrap_or(high);
        let watermark = [w_gaps, w_readings, Some(high), Some(highest_first)]
            .into_iter()
            .flatten()
            .max()
            .expect("`high` is always there");
        tables.gaps.commit(gateway, &new_gaps, watermark).await?;
        for gap in &new_gaps {
            warn!(
                first_seq = gap.first_seq,
                last_seq = gap.last_seq,
                readings = gap.readings,
                reason = %gap.reason,
                file_key = %gap.file_key,
                "gap recorded"
            );
        }
        done.gaps.extend(new_gaps);
    }
    // 3. readings and their watermark.
    let version = tables.readings.commit_rows(gateway, kept, high).await?;
    for (rule, counts) in flag_counts {
        done.rules.entry(rule).or_default().add(&counts);
    }
    done.version = Some(version);
    done.watermark_after = Some(high);
    info!(
        rows_applied = done.rows_applied,
        rows_flagged = done.rows_flagged,
        rows_quarantined = done.rows_quarantined,
        watermark = high,
        version,
        "committed readings"
    );
    Ok(())
}

/// Judges the rows of one batch: readings above `decided_up_to` by the rules, those at or
/// below it by what the `quarantined_rows` table holds (`already`).
#[allow(clippy::too_many_arguments)]
fn sort_rows(
    batch: &RecordBatch,
    judge: &mut Judge<'_>,
    file_key: &str,
    now_us: i64,
    decided_up_to: Option<i64>,
    already: &BTreeSet<i64>,
    flag_counts: &mut RuleCountsByName,
    quarantine_counts: &mut RuleCountsByName,
) -> Sorted {
    let rules = judge.rules();
    let seqs = seq_column(batch);
    let n = batch.num_rows();
    let mut sorted = Sorted {
        kept: Vec::new(),
        quarantined: Vec::new(),
        rows_kept: 0,
        rows_flagged: 0,
        already_quarantined: 0,
    };
    let decided = |seq: i64| decided_up_to.is_some_and(|d| seq <= d);
    if rules.is_empty() && !(0..n).any(|i| already.contains(&seqs.value(i))) {
        sorted.rows_kept = n;
        sorted.kept.push(with_flags(batch, None));
        return sorted;
    }
    let verdicts: Vec<RowVerdict> = if rules.is_empty() {
        vec![RowVerdict::default(); n]
    } else {
        judge.judge_batch(batch)
    };
    let mut flags: Vec<Option<String>> = Vec::with_capacity(n);
    let mut keep = Vec::with_capacity(n);
    let mut rows: Option<Vec<contract::Row>> = None;
    for (i, verdict) in verdicts.into_iter().enumerate() {
        let seq = seqs.value(i);
        if decided(seq) && already.contains(&seq) {
            sorted.already_quarantined += 1;
            keep.push(false);
            flags.push(None);
            continue;
        }
        if !decided(seq)
            && let Some(violation) = verdict.quarantine
        {
            let rule = &rules.rules()[violation.rule];
            let all = rows.get_or_insert_with(|| {
                contract::rows_from_batch(batch)
                    .expect("batches are validated against the contract before rules see them")
            });
            sorted.quarantined.push(QuarantinedRow {
                row: all[i].clone(),
                rule: rule.name.clone(),
                check: rule.check.name().to_owned(),
                detail: violation.detail,
                file_key: file_key.to_owned(),
                quarantined_at_us: now_us,
            });
            quarantine_counts
                .entry(rule.name.clone())
                .or_default()
                .quarantined += 1;
            keep.push(false);
            flags.push(None);
            continue;
        }
        keep.push(true);
        sorted.rows_kept += 1;
        if verdict.flags.is_empty() {
            flags.push(None);
        } else {
            sorted.rows_flagged += 1;
            let names: Vec<&str> = verdict
                .flags
                .iter()
                .map(|&r| rules.rules()[r].name.as_str())
                .collect();
            for name in &names {
                flag_counts.entry((*name).to_owned()).or_default().flagged += 1;
            }
            flags.push(Some(names.join(",")));
        }
    }
    let flags = StringArray::from(flags);
    // Kept rows go out as zero-copy slices of the batch, one per run.
    let mut start = 0;
    while start < n {
        if !keep[start] {
            start += 1;
            continue;
        }
        let end = (start..n).find(|&i| !keep[i]).unwrap_or(n);
        let len = end - start;
        let run_flags = flags.slice(start, len);
        let run_flags = (run_flags.null_count() < len).then_some(run_flags);
        sorted
            .kept
            .push(with_flags(&batch.slice(start, len), run_flags));
        start = end;
    }
    sorted
}

/// What applying a gateway's fresh-lane batches did.
#[derive(Debug, Default)]
pub(crate) struct FreshOutcome {
    /// The readings table version of the commit, `None` when nothing was new.
    pub(crate) version: Option<u64>,
    pub(crate) rows_applied: usize,
    /// Readings dropped: at or below the watermark, or inside the fresh range already.
    pub(crate) rows_skipped: usize,
    pub(crate) rows_flagged: usize,
    /// The gateway's fresh range afterwards.
    pub(crate) range_after: Option<FreshRange>,
    /// The first this many files are done with (applied, replays, or stopped by a rule) and go to
    /// the archive; the others wait in the raw zone for a later pass.
    pub(crate) settled: usize,
    /// What each `flag` rule did.
    pub(crate) rules: RuleCountsByName,
    pub(crate) conflicts: u32,
}

/// Applies `files` (one gateway's valid fresh-lane batches, in key order) to the readings table
/// in one commit, as the module documentation says, retrying from the top with backoff when the
/// commit loses a race, up to `attempts` times.
pub(crate) async fn apply_fresh(
    tables: &mut Tables,
    gateway: &str,
    files: &[ValidBatch],
    judge: &mut Judge<'_>,
    attempts: u32,
) -> Result<FreshOutcome, ApplyError> {
    let mut done = FreshOutcome::default();
    loop {
        match fresh_attempt(tables, gateway, files, judge, &mut done).await {
            Ok(()) => return Ok(done),
            Err(AttemptError::Failed(e)) => return Err(e),
            Err(AttemptError::Conflict(source)) => {
                done.conflicts += 1;
                prepare_retry(tables, gateway, "fresh", done.conflicts, attempts, &source).await?;
            }
        }
    }
}

async fn fresh_attempt(
    tables: &mut Tables,
    gateway: &str,
    files: &[ValidBatch],
    judge: &mut Judge<'_>,
    done: &mut FreshOutcome,
) -> Result<(), AttemptError> {
    let marks = tables.readings.marks(gateway).await?;
    let w = marks.watermark;
    let w_quarantined = tables.quarantined_rows.watermark(gateway).await?;
    done.version = None;
    done.rows_applied = 0;
    done.rows_skipped = 0;
    done.rows_flagged = 0;
    done.range_after = marks.fresh;
    done.settled = 0;
    if w_quarantined.is_some_and(|q| w.is_none_or(|w| q > w)) {
        // A main-lane chunk committed its quarantined readings but not yet its readings: its
        // retry decides those readings first, so they never land in both tables.
        return Ok(());
    }
    let mut range = marks.fresh;
    let mut kept = Vec::new();
    let mut rows_kept = 0;
    let mut rows_flagged = 0;
    let mut flag_counts = RuleCountsByName::new();
    for file in files {
        let live = range.filter(|r| r.is_live(w));
        if let Some(r) = live
            && file.first_seq > r.last + 1
        {
            // A new run while the main lane has not passed the range: later, with all after it.
            break;
        }
        let floor = match live {
            Some(r) => Some(w.map_or(r.last, |w| w.max(r.last))),
            None => w,
        };
        let (above, _, skipped) = filter_above(&file.data, floor);
        done.rows_skipped += skipped;
        done.settled += 1;
        let mut applied: Option<(i64, i64)> = None;
        for (_, batch) in &above {
            let judged = judge_fresh(batch, judge, &mut flag_counts);
            if let Some(run) = judged.kept {
                let seqs = seq_column(&run);
                let (lo, hi) = (seqs.value(0), seqs.value(seqs.len() - 1));
                applied = Some(applied.map_or((lo, hi), |(first, _)| (first, hi)));
                rows_kept += run.num_rows();
                kept.push(run);
            }
            rows_flagged += judged.rows_flagged;
            if let Some(stop) = judged.stopped_at {
                info!(
                    lane = "fresh",
                    key = %file.file.object_key,
                    seq = stop.0,
                    rule = %stop.1,
                    "a reading breaks a quarantine or fail rule; the fresh apply of this file stops before it and leaves it to the main lane"
                );
                break;
            }
        }
        if let Some((first, last)) = applied {
            range = Some(match live {
                Some(r) => FreshRange {
                    first: r.first,
                    last,
                },
                None => FreshRange { first, last },
            });
        }
    }
    done.range_after = range;
    if kept.is_empty() {
        return Ok(());
    }
    let range = range.expect("readings were kept, so the range covers them");
    let version = tables.readings.commit_fresh(gateway, kept, range).await?;
    for (rule, counts) in flag_counts {
        done.rules.entry(rule).or_default().add(&counts);
    }
    done.version = Some(version);
    done.rows_applied = rows_kept;
    done.rows_flagged = rows_flagged;
    info!(
        lane = "fresh",
        rows_applied = rows_kept,
        rows_flagged,
        fresh_first = range.first,
        fresh_last = range.last,
        version,
        "committed fresh-lane readings"
    );
    Ok(())
}

/// One fresh batch's readings, judged.
struct FreshJudged {
    /// The readings before the first one a `quarantine` or `fail` rule takes, with `dq_flags`.
    kept: Option<RecordBatch>,
    rows_flagged: usize,
    /// The `seq` a rule stopped the apply at, and that rule's name.
    stopped_at: Option<(i64, String)>,
}

/// Judges `batch` for the fresh lane: `flag` rules flag as for the main lane; the first reading
/// a `quarantine` or `fail` rule takes ends what is kept.
fn judge_fresh(
    batch: &RecordBatch,
    judge: &mut Judge<'_>,
    flag_counts: &mut RuleCountsByName,
) -> FreshJudged {
    let rules = judge.rules();
    let n = batch.num_rows();
    if rules.is_empty() {
        return FreshJudged {
            kept: Some(with_flags(batch, None)),
            rows_flagged: 0,
            stopped_at: None,
        };
    }
    let verdicts = judge.judge_batch(batch);
    let stop = verdicts
        .iter()
        .position(|v| v.quarantine.is_some() || v.fail.is_some());
    let end = stop.unwrap_or(n);
    let mut flags: Vec<Option<String>> = Vec::with_capacity(end);
    let mut rows_flagged = 0;
    for verdict in &verdicts[..end] {
        if verdict.flags.is_empty() {
            flags.push(None);
            continue;
        }
        rows_flagged += 1;
        let names: Vec<&str> = verdict
            .flags
            .iter()
            .map(|&r| rules.rules()[r].name.as_str())
            .collect();
        for name in &names {
            flag_counts.entry((*name).to_owned()).or_default().flagged += 1;
        }
        flags.push(Some(names.join(",")));
    }
    let stopped_at = stop.map(|i| {
        let verdict = &verdicts[i];
        let violation = verdict
            .fail
            .as_ref()
            .or(verdict.quarantine.as_ref())
            .expect("the stop is where a quarantine or fail rule was broken");
        (
            seq_column(batch).value(i),
            rules.rules()[violation.rule].name.clone(),
        )
    });
    let kept = (end > 0).then(|| {
        let flags = StringArray::from(flags);
        let flags = (flags.null_count() < end).then_some(flags);
        with_flags(&batch.slice(0, end), flags)
    });
    FreshJudged {
        kept,
        rows_flagged,
        stopped_at,
    }
}
