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

use std::collections::BTreeSet;

use arrow_array::{Array, RecordBatch, StringArray};
use edge_agent::contract;
use tracing::{info, warn};

use crate::delta::{
    CommitFailure, DeltaError, GapRow, QuarantinedRow, Tables, backoff, filter_above, seq_column,
    with_flags,
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
                if done.conflicts >= attempts {
                    return Err(DeltaError::Contended {
                        gateway: gateway.to_owned(),
                        attempts: done.conflicts,
                    }
                    .into());
                }
                let pause = backoff(done.conflicts);
                warn!(
                    component = "delta",
                    gateway,
                    attempt = done.conflicts,
                    pause_ms = pause.as_millis(),
                    error = %source,
                    "commit lost a race with another writer of this gateway; re-reading the watermarks"
                );
                tokio::time::sleep(pause).await;
                tables.reload().await?;
            }
        }
    }
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
    let w_readings = tables.readings.watermark(gateway).await?;
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
    let (fresh, high, skipped) = filter_above(&flat, w_readings);
    done.rows_skipped = skipped;
    done.watermark_after = w_readings;
    done.version = None;
    done.rows_applied = 0;
    done.rows_flagged = 0;
    let Some(high) = high.filter(|_| !fresh.is_empty()) else {
        return Ok(());
    };

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
    for (index, batch) in &fresh {
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

    // Gaps, from the readings that reached the collector (quarantined ones included).
    let seqs: Vec<(&str, &[i64])> = fresh
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
    let new_gaps: Vec<GapRow> = gaps::explain(
        gateway,
        &jumps,
        &agent,
        &quarantined_files,
        gap_floor,
        now_us,
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

/// Judges the rows of one fresh batch: readings above `decided_up_to` by the rules, those at or
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
