//! A read-only look at a buffer file for `edge-agent buffer`: safe while the agent runs, because
//! it opens the database read-only as one more WAL reader and never checkpoints or writes.

use std::fmt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::sqlite::{
    BufferError, DROP_REASONS, FreshRun, PAGE_CACHE_KIB, PendingBatch, dropped_key, read_fresh_run,
    read_gaps, read_pending, used_bytes,
};
use crate::contract::Gap;

/// The bounds the agent last started with, as it recorded them in the buffer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordedBounds {
    /// `buffer.max_bytes`; `None` when unbounded.
    pub max_bytes: Option<u64>,
    /// `buffer.max_age` in milliseconds; `None` when unbounded.
    pub max_age_ms: Option<u64>,
    /// `buffer.on_full`: `drop_oldest` or `backpressure`.
    pub on_full: String,
}

/// What a buffer file holds, as `edge-agent buffer` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BufferReport {
    pub path: PathBuf,
    /// The gateway the buffer belongs to (none before the agent's first start completed).
    pub gateway: Option<String>,
    /// Readings waiting to be uploaded, including those of the pending batch.
    pub rows: u64,
    /// Lowest and highest `seq` waiting.
    pub seq: Option<(i64, i64)>,
    /// Earliest and latest reading time waiting, microseconds since the Unix epoch (UTC).
    pub time_us: Option<(i64, i64)>,
    /// The batch cut but not yet confirmed by the upload target.
    pub pending: Option<PendingBatch>,
    /// The fresh lane's current run: the readings it last copied ahead of a backlog.
    pub fresh_run: Option<FreshRun>,
    /// Size of the database file in bytes.
    pub file_bytes: u64,
    /// Size of its write-ahead log in bytes (commits not yet checkpointed into the file).
    pub wal_bytes: u64,
    /// Bytes in the pages in use: the figure `buffer.max_bytes` bounds.
    pub used_bytes: u64,
    /// The bounds in force, as the agent recorded them when it started (`None` before that).
    pub bounds: Option<RecordedBounds>,
    /// Readings this buffer file ever dropped, per reason (`buffer_full`, `max_age`,
    /// `damaged_buffer`).
    pub dropped: Vec<(String, u64)>,
    /// Gap records given to the pending batch: they go out with it.
    pub pending_gaps: Vec<Gap>,
    /// Gap records waiting for the next batch to be cut.
    pub waiting_gaps: Vec<Gap>,
}

/// Reads the report from the buffer at `path` without changing anything.
pub fn inspect(path: &Path) -> Result<BufferReport, BufferError> {
    let file_bytes = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BufferError::Missing {
                path: path.to_owned(),
            });
        }
        Err(e) => {
            return Err(BufferError::Sqlite {
                path: path.to_owned(),
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                    Some(e.to_string()),
                ),
            });
        }
    };
    let err = |source: rusqlite::Error| {
        if source.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) {
            BufferError::NotADatabase {
                path: path.to_owned(),
            }
        } else {
            BufferError::Sqlite {
                path: path.to_owned(),
                source,
            }
        }
    };
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(err)?;
    // Every /metrics scrape and status page view opens this connection and scans `readings`;
    // with SQLite's default 2 MiB cache each scan would take that much heap while it runs.
    conn.pragma_update(None, "cache_size", -PAGE_CACHE_KIB)
        .map_err(err)?;
    // One read transaction, so the figures belong to the same moment while the agent writes.
    let tx = conn.transaction().map_err(err)?;
    let gateway = tx
        .query_row("SELECT value FROM meta WHERE key = 'gateway'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(err)?;
    let (rows, first, last, oldest, newest) = tx
        .query_row(
            "SELECT count(*), min(seq), max(seq), min(ts_us), max(ts_us) FROM readings",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                ))
            },
        )
        .map_err(err)?;
    let pending = read_pending(&tx).map_err(err)?;
    let fresh_run = read_fresh_run(&tx).map_err(err)?;
    let limits = read_limits(&tx, pending.as_ref()).map_err(err)?;
    drop(tx);
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let wal_bytes = std::fs::metadata(PathBuf::from(wal)).map_or(0, |m| m.len());
    Ok(BufferReport {
        path: path.to_owned(),
        gateway,
        rows: u64::try_from(rows).unwrap_or(0),
        seq: first.zip(last),
        time_us: oldest.zip(newest),
        pending,
        fresh_run,
        file_bytes,
        wal_bytes,
        used_bytes: limits.used_bytes,
        bounds: limits.bounds,
        dropped: limits.dropped,
        pending_gaps: limits.pending_gaps,
        waiting_gaps: limits.waiting_gaps,
    })
}

/// The bounds part of the report.
struct Limits {
    used_bytes: u64,
    bounds: Option<RecordedBounds>,
    dropped: Vec<(String, u64)>,
    pending_gaps: Vec<Gap>,
    waiting_gaps: Vec<Gap>,
}

/// Reads the size in use, the recorded bounds, the drop counters and the unshipped gaps.
fn read_limits(conn: &Connection, pending: Option<&PendingBatch>) -> rusqlite::Result<Limits> {
    let used_bytes = used_bytes(conn)?;
    let meta = |key: &str| -> rusqlite::Result<Option<String>> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
    };
    let number = |value: Option<String>| value.and_then(|v| v.parse::<u64>().ok());
    let bounds = match meta("on_full")? {
        Some(on_full) => Some(RecordedBounds {
            max_bytes: number(meta("max_bytes")?),
            max_age_ms: number(meta("max_age_ms")?),
            on_full,
        }),
        None => None,
    };
    let mut dropped = Vec::new();
    for reason in &DROP_REASONS {
        let n = number(meta(&dropped_key(reason))?).unwrap_or(0);
        dropped.push((reason.as_str().to_owned(), n));
    }
    // A buffer written before gap records existed has no such table: it has no gaps either.
    let has_gaps: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'gaps')",
        [],
        |r| r.get(0),
    )?;
    let (pending_gaps, waiting_gaps) = match (pending, has_gaps) {
        (_, false) => (Vec::new(), Vec::new()),
        (Some(p), true) => (read_gaps(conn, Some(p.first_seq))?, read_gaps(conn, None)?),
        (None, true) => (Vec::new(), read_gaps(conn, None)?),
    };
    Ok(Limits {
        used_bytes,
        bounds,
        dropped,
        pending_gaps,
        waiting_gaps,
    })
}

impl BufferReport {
    /// The fresh lane's run as `edge-agent buffer` shows it.
    fn fresh_lane(&self) -> String {
        let Some(run) = self.fresh_run else {
            return "none".to_owned();
        };
        // The main lane deletes what it shipped: a waiting reading at or below the run's end
        // means it has not got there yet.
        let behind = self.seq.is_some_and(|(first, _)| first <= run.last_seq);
        format!(
            "seq {}..={} copied ahead of the backlog; the main lane {}",
            run.first_seq,
            run.last_seq,
            if behind {
                "has not reached its end"
            } else {
                "has passed it"
            }
        )
    }
}

impl fmt::Display for BufferReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let none = || "none".to_owned();
        writeln!(f, "buffer          {}", self.path.display())?;
        writeln!(
            f,
            "gateway         {}",
            self.gateway.clone().unwrap_or_else(none)
        )?;
        writeln!(f, "readings        {}", self.rows)?;
        writeln!(
            f,
            "seq             {}",
            self.seq.map_or_else(none, |(a, b)| format!("{a}..={b}"))
        )?;
        let (oldest, newest) = self.time_us.map_or_else(
            || (none(), none()),
            |(a, b)| (super::utc::format_micros(a), super::utc::format_micros(b)),
        );
        writeln!(f, "oldest reading  {oldest}")?;
        writeln!(f, "newest reading  {newest}")?;
        writeln!(
            f,
            "pending batch   {}",
            self.pending.as_ref().map_or_else(none, |p| format!(
                "seq {}..={} (site {})",
                p.first_seq, p.last_seq, p.site
            ))
        )?;
        writeln!(f, "fresh lane      {}", self.fresh_lane())?;
        writeln!(
            f,
            "file size       {} bytes + {} bytes write-ahead log",
            self.file_bytes, self.wal_bytes
        )?;
        let (bound, age, policy) = match &self.bounds {
            Some(b) => (
                b.max_bytes.map_or_else(
                    || "no bound".to_owned(),
                    |m| {
                        format!(
                            "{} ({} %)",
                            crate::config::ByteSize(m),
                            self.used_bytes.saturating_mul(100) / m.max(1)
                        )
                    },
                ),
                b.max_age_ms.map_or_else(
                    || "no bound".to_owned(),
                    |ms| crate::config::ConfigDuration::from_millis(ms).to_string(),
                ),
                b.on_full.clone(),
            ),
            None => (
                "not recorded (the agent has not started on this file)".to_owned(),
                none(),
                none(),
            ),
        };
        writeln!(
            f,
            "in use          {} bytes of max_bytes {bound}",
            self.used_bytes
        )?;
        writeln!(f, "max age         {age}")?;
        writeln!(f, "when full       {policy}")?;
        let dropped: Vec<String> = self
            .dropped
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        writeln!(f, "dropped         {}", dropped.join(", "))?;
        let gaps: Vec<String> = self
            .pending_gaps
            .iter()
            .map(|g| (g, "goes with the pending batch"))
            .chain(
                self.waiting_gaps
                    .iter()
                    .map(|g| (g, "waits for the next batch")),
            )
            .map(|(g, when)| {
                format!(
                    "seq {}..={}: {} readings, {} at {}, {when}",
                    g.first_seq,
                    g.last_seq,
                    g.readings,
                    g.reason,
                    super::utc::format_micros(g.detected_at_us)
                )
            })
            .collect();
        if gaps.is_empty() {
            writeln!(f, "unshipped gaps  none")
        } else {
            writeln!(f, "unshipped gaps  {}", gaps.join("\n                "))
        }
    }
}
