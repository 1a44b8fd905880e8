//! Salvage of a damaged buffer: move the file aside, copy every row that can still be read into
//! a fresh buffer with its `seq` unchanged, and report what was lost.
//!
//! The rows of the `readings` table sit in a b-tree ordered by `seq`. A damaged page breaks a
//! scan at the point where it is reached, so the scan seeks past it: it probes `seq > x` for
//! growing `x` until a seek succeeds, narrows the first readable point down by bisection, and
//! carries on from there. Since the buffer only ever deletes its oldest rows, the rows it held
//! form one contiguous `seq` range, so every hole between two salvaged rows is a known loss.

use std::fmt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::high_water::HighWater;
use super::sqlite::{
    BufferError, PendingBatch, add_to_meta_counter, dropped_key, now_us, open_connection,
    raise_sequence, read_pending, read_sequence, record_gap,
};
use crate::config::Durability;
use crate::contract::{GapReason, Quality};

/// Rows copied per transaction into the fresh buffer.
const CHUNK: i64 = 2_000;

/// What the start-up check found and what was saved. Its `Display` is the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The buffer that was damaged (now a fresh buffer holding the salvaged rows).
    pub path: PathBuf,
    /// Where the damaged file went (`<name>.damaged-<UTC time>`, with its `-wal` and `-shm`).
    pub damaged_file: PathBuf,
    /// What the check found.
    pub problem: String,
    /// Rows copied into the fresh buffer, each with its original `seq`.
    pub saved_rows: u64,
    /// The lowest and highest salvaged `seq`.
    pub saved_seq: Option<(i64, i64)>,
    /// The `seq` values that were in the buffer but could not be read, as far as knowable.
    pub lost: Vec<LostSeqs>,
    /// The pending batch carried over (narrowed to its first salvaged row), if it was readable.
    pub pending_batch: Option<PendingBatch>,
    /// The `seq` the next reading gets: above every value handed out before, as far as the
    /// damaged file and the high-water file tell.
    pub next_seq: i64,
    /// Readings counted as lost in the `damaged_buffer` gap records written for [`Self::lost`]:
    /// the width of each range, with an unknown start taken as seq 1 and an unknown end as
    /// `next_seq - 1`.
    pub lost_readings: u64,
}

/// A range of lost `seq` values; `None` where the bound is not knowable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LostSeqs {
    pub first: Option<i64>,
    pub last: Option<i64>,
}

impl fmt::Display for LostSeqs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.first, self.last) {
            (Some(a), Some(b)) => write!(f, "{a}..={b}"),
            (Some(a), None) => write!(f, "{a}..=(end unknown)"),
            (None, Some(b)) => write!(f, "(start unknown)..={b}"),
            (None, None) => f.write_str("(range unknown)"),
        }
    }
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "buffer {} was damaged ({}); moved it to {} and started a fresh buffer; saved {} readings",
            self.path.display(),
            self.problem,
            self.damaged_file.display(),
            self.saved_rows
        )?;
        if let Some((a, b)) = self.saved_seq {
            write!(f, " (seq {a}..={b})")?;
        }
        if self.lost.is_empty() {
            f.write_str(", lost none")?;
        } else {
            let lost: Vec<String> = self.lost.iter().map(ToString::to_string).collect();
            write!(f, ", lost seq {}", lost.join(", "))?;
        }
        write!(f, "; new readings continue at seq {}", self.next_seq)
    }
}

/// Moves the damaged file at `path` aside, salvages it into a fresh buffer at `path` and returns
/// the report. Refuses (and leaves the file alone) if it still says it belongs to another gateway.
pub(crate) fn recover(
    path: &Path,
    durability: Durability,
    gateway: &str,
    problem: String,
    marks: Option<HighWater>,
) -> Result<RecoveryReport, BufferError> {
    let err = |source| BufferError::Sqlite {
        path: path.to_owned(),
        source,
    };
    if let Some(stored) = open_damaged(path).and_then(|c| stored_gateway(&c))
        && stored != gateway
    {
        return Err(BufferError::GatewayMismatch {
            path: path.to_owned(),
            stored,
            configured: gateway.to_owned(),
        });
    }
    let damaged_file = move_aside(path)?;
    let mut fresh = open_connection(path, durability).map_err(err)?;
    fresh
        .execute(
            "INSERT INTO meta (key, value) VALUES ('gateway', ?1)",
            [gateway],
        )
        .map_err(err)?;

    let source = open_damaged(&damaged_file);
    let old_sequence = source
        .as_ref()
        .and_then(|c| read_sequence(c).ok())
        .filter(|&s| s > 0);
    let pending = source.as_ref().and_then(|c| read_pending(c).ok().flatten());
    // The lowest seq the buffer can have held: rows below the pending batch, or up to the last
    // confirmed batch, had already left.
    let low = pending
        .as_ref()
        .map(|p| p.first_seq)
        .or(marks.map(|m| m.completed + 1));
    let scan = match &source {
        Some(src) => salvage_rows(src, &mut fresh, low, old_sequence).map_err(err)?,
        None => Scan {
            lost: vec![LostSeqs {
                first: low,
                last: old_sequence,
            }],
            ..Scan::default()
        },
    };
    drop(source);

    let pending_batch = pending.and_then(|p| {
        let first: Option<i64> = fresh
            .query_row(
                "SELECT min(seq) FROM readings WHERE seq BETWEEN ?1 AND ?2",
                [p.first_seq, p.last_seq],
                |r| r.get(0),
            )
            .ok()
            .flatten();
        first.map(|first_seq| PendingBatch { first_seq, ..p })
    });
    if let Some(p) = &pending_batch {
        fresh
            .execute(
                "INSERT INTO pending_batch (id, first_seq, last_seq, site) VALUES (1, ?1, ?2, ?3)",
                params![p.first_seq, p.last_seq, p.site],
            )
            .map_err(err)?;
    }
    let floor = [
        old_sequence.unwrap_or(0),
        scan.saved_seq.map_or(0, |(_, b)| b),
        pending_batch.as_ref().map_or(0, |p| p.last_seq),
        marks.map_or(0, |m| m.highest()),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    raise_sequence(&fresh, floor).map_err(err)?;
    let lost_readings = record_losses(&fresh, &scan.lost, floor).map_err(err)?;
    if let Some(src) = open_damaged(&damaged_file) {
        carry_gaps(&src, &fresh, pending_batch.as_ref());
    }
    Ok(RecoveryReport {
        path: path.to_owned(),
        damaged_file,
        problem,
        saved_rows: scan.saved_rows,
        saved_seq: scan.saved_seq,
        lost: scan.lost,
        pending_batch,
        next_seq: floor + 1,
        lost_readings,
    })
}

/// Writes a `damaged_buffer` gap record for every lost range, so the loss travels to the cloud
/// with the next batch, and counts the readings. Returns how many were counted.
fn record_losses(fresh: &Connection, lost: &[LostSeqs], highest: i64) -> rusqlite::Result<u64> {
    let now = now_us();
    let mut total = 0;
    for range in lost {
        // An unknown start: nothing tells where the shipped readings ended, so the record
        // starts at 1 (documented in the batch contract); an unknown end runs to the last seq
        // that can have been handed out.
        let from = range.first.unwrap_or(1).max(1);
        let to = range.last.unwrap_or(highest);
        if from > to {
            continue;
        }
        let width = u64::try_from(to - from).unwrap_or(0) + 1;
        record_gap(fresh, from, to, width, &GapReason::DamagedBuffer, now)?;
        total += width;
    }
    if total > 0 {
        add_to_meta_counter(fresh, &dropped_key(&GapReason::DamagedBuffer), total)?;
    }
    Ok(total)
}

/// Copies the gap records the damaged file still had (drops not yet reported to the cloud).
/// Records given to the pending batch stay with it when the batch was carried over. Best
/// effort: a gaps table that cannot be read is left behind, and the readings' own losses are
/// reported anyway.
fn carry_gaps(src: &Connection, fresh: &Connection, pending: Option<&PendingBatch>) {
    let old_pending = read_pending(src).ok().flatten();
    let Ok(mut stmt) = src.prepare(
        "SELECT first_seq, last_seq, readings, reason, detected_at_us, batch_first_seq
         FROM gaps ORDER BY id",
    ) else {
        return;
    };
    let Ok(rows) = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, Option<i64>>(5)?,
        ))
    }) else {
        return;
    };
    for (first, last, readings, reason, at, batch) in rows.flatten() {
        let batch = match (batch, &old_pending, pending) {
            (Some(b), Some(old), Some(new)) if b == old.first_seq => Some(new.first_seq),
            _ => None,
        };
        let _ = fresh.execute(
            "INSERT INTO gaps (first_seq, last_seq, readings, reason, detected_at_us, batch_first_seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![first, last, readings, reason, at, batch],
        );
    }
}

/// A read-only connection to a damaged file, if SQLite accepts it at all. Read-only so that
/// closing it does not checkpoint into the damaged pages: the file stays as found.
fn open_damaged(path: &Path) -> Option<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ok()?;
    // Catch damaged cells on the way instead of reading garbage out of them.
    conn.pragma_update(None, "cell_size_check", true).ok()?;
    // A truncated file is shorter than its header says; SQLite refuses such a file unless the
    // schema is writable, which here only means "read what is there" (the connection is
    // read-only).
    conn.pragma_update(None, "writable_schema", true).ok()?;
    Some(conn)
}

fn stored_gateway(conn: &Connection) -> Option<String> {
    conn.query_row("SELECT value FROM meta WHERE key = 'gateway'", [], |r| {
        r.get(0)
    })
    .optional()
    .ok()
    .flatten()
}

/// Renames the file and its `-wal` and `-shm` to `<name>.damaged-<UTC time>[-wal|-shm]`, so
/// SQLite still finds the log next to the file when it is opened for salvage.
fn move_aside(path: &Path) -> Result<PathBuf, BufferError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let stamp = super::utc::file_stamp(now);
    let with_suffix = |p: &Path, suffix: &str| {
        let mut name = p.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    // Two recoveries in the same second (a crash loop) must not overwrite each other's evidence.
    let mut target = with_suffix(path, &format!(".damaged-{stamp}"));
    let mut n = 1;
    while target.exists() {
        n += 1;
        target = with_suffix(path, &format!(".damaged-{stamp}-{n}"));
    }
    for suffix in ["-wal", "-shm", ""] {
        let from = with_suffix(path, suffix);
        let to = with_suffix(&target, suffix);
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !suffix.is_empty() => {}
            Err(source) => {
                return Err(BufferError::MoveAside {
                    path: from,
                    to,
                    source,
                });
            }
        }
    }
    Ok(target)
}

#[derive(Debug, Default)]
struct Scan {
    saved_rows: u64,
    saved_seq: Option<(i64, i64)>,
    lost: Vec<LostSeqs>,
}

impl Scan {
    fn lose(&mut self, first: Option<i64>, last: Option<i64>) {
        if let (Some(a), Some(b)) = (first, last)
            && a > b
        {
            return;
        }
        // Neighbouring losses (bad rows in a row) read better as one range.
        if let (Some(prev), Some(a)) = (self.lost.last_mut(), first)
            && prev.last == Some(a - 1)
        {
            prev.last = last;
            return;
        }
        self.lost.push(LostSeqs { first, last });
    }
}

/// One row as read from the damaged file.
struct Salvaged {
    seq: i64,
    ts_us: i64,
    device: String,
    tag: String,
    value: Option<f64>,
    quality: String,
    unit: Option<String>,
    value_text: Option<String>,
}

/// The outcome of reading one chunk: the rows read (or the seq of a row whose content is
/// unusable), and whether reading stopped at damage.
struct Chunk {
    rows: Vec<Result<Salvaged, i64>>,
    damaged: bool,
    full: bool,
}

fn read_chunk(src: &Connection, after: i64) -> Chunk {
    let mut chunk = Chunk {
        rows: Vec::new(),
        damaged: false,
        full: false,
    };
    // A buffer written before `value_text` existed has no such column: its rows carry none.
    let Ok(mut stmt) = src
        .prepare_cached(
            "SELECT seq, ts_us, device, tag, value, quality, unit, value_text FROM readings
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .or_else(|_| {
            src.prepare_cached(
                "SELECT seq, ts_us, device, tag, value, quality, unit, NULL FROM readings
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
        })
    else {
        chunk.damaged = true;
        return chunk;
    };
    let Ok(mut rows) = stmt.query([after, CHUNK]) else {
        chunk.damaged = true;
        return chunk;
    };
    let mut prev = after;
    loop {
        match rows.next() {
            Ok(Some(r)) => {
                let Ok(seq) = r.get::<_, i64>(0) else {
                    chunk.damaged = true;
                    break;
                };
                // A damaged interior page can send the cursor anywhere; only forward is valid.
                if seq <= prev {
                    chunk.damaged = true;
                    break;
                }
                prev = seq;
                let row = (|| {
                    Ok::<_, rusqlite::Error>(Salvaged {
                        seq,
                        ts_us: r.get(1)?,
                        device: r.get(2)?,
                        tag: r.get(3)?,
                        value: r.get(4)?,
                        quality: r.get(5)?,
                        unit: r.get(6)?,
                        value_text: r.get(7)?,
                    })
                })()
                .ok()
                .filter(|s| Quality::parse(&s.quality).is_some());
                chunk.rows.push(row.ok_or(seq));
            }
            Ok(None) => break,
            Err(_) => {
                chunk.damaged = true;
                break;
            }
        }
    }
    chunk.full = !chunk.damaged && chunk.rows.len() == usize::try_from(CHUNK).unwrap_or(0);
    chunk
}

/// Whether a seek to the first row after `x` reads without an error.
fn seek_ok(src: &Connection, x: i64) -> bool {
    src.query_row(
        "SELECT seq FROM readings WHERE seq > ?1 ORDER BY seq LIMIT 1",
        [x],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .is_ok()
}

/// The smallest `x > from` whose seek succeeds, or `None` when nothing beyond `from` is readable.
fn next_readable(src: &Connection, from: i64) -> Option<i64> {
    let mut failing = from;
    let mut step: i64 = 1;
    loop {
        let x = from.saturating_add(step);
        if seek_ok(src, x) {
            let mut good = x;
            while good - failing > 1 {
                let mid = failing + (good - failing) / 2;
                if seek_ok(src, mid) {
                    good = mid;
                } else {
                    failing = mid;
                }
            }
            return Some(good);
        }
        if x == i64::MAX {
            return None;
        }
        failing = x;
        step = step.saturating_mul(2);
    }
}

/// Copies every readable row into `dst`, keeping its seq. `low` is the lowest seq the buffer
/// can have held and `high` the highest it handed out, where known.
fn salvage_rows(
    src: &Connection,
    dst: &mut Connection,
    low: Option<i64>,
    high: Option<i64>,
) -> rusqlite::Result<Scan> {
    let mut scan = Scan::default();
    // The last seq seen (salvaged or not) and the point the next read starts after.
    let mut last_seen: Option<i64> = None;
    let mut from = 0;
    // Whether damage was met since the last row seen: only then is a hole a loss rather than
    // rows that had already been shipped.
    let mut damaged = false;
    loop {
        let chunk = read_chunk(src, from);
        let tx = dst.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO readings (seq, ts_us, device, tag, value, quality, unit, value_text)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for row in &chunk.rows {
                let seq = match row {
                    Ok(r) => r.seq,
                    Err(seq) => *seq,
                };
                match last_seen {
                    None if damaged => scan.lose(low.or(None), Some(seq - 1)),
                    Some(prev) if seq > prev + 1 => scan.lose(Some(prev + 1), Some(seq - 1)),
                    _ => {}
                }
                match row {
                    Ok(r) => {
                        insert.execute(params![
                            r.seq,
                            r.ts_us,
                            r.device,
                            r.tag,
                            r.value,
                            r.quality,
                            r.unit,
                            r.value_text
                        ])?;
                        scan.saved_rows += 1;
                        let first = scan.saved_seq.map_or(r.seq, |(a, _)| a);
                        scan.saved_seq = Some((first, r.seq));
                    }
                    Err(seq) => scan.lose(Some(*seq), Some(*seq)),
                }
                last_seen = Some(seq);
                from = seq;
                damaged = false;
            }
        }
        tx.commit()?;
        if chunk.full {
            continue;
        }
        if chunk.damaged {
            damaged = true;
            if let Some(x) = next_readable(src, from) {
                from = x;
                continue;
            }
        }
        if damaged {
            // Unreadable to the end: everything after the last row seen, up to the last seq
            // handed out if that is known.
            let first = last_seen.map(|s| s + 1).or(low);
            if first.zip(high).is_none_or(|(a, b)| a <= b) {
                scan.lose(first, high);
            }
        }
        return Ok(scan);
    }
}
