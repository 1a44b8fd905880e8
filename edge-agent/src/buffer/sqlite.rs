use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};
use tracing::warn;

use super::high_water::{self, HighWater, RESERVE_BLOCK};
use super::recovery::{self, RecoveryReport};
use crate::Reading;
use crate::config::{BufferConfig, Durability, FullPolicy};
use crate::contract::{Gap, GapReason, Quality, Row};

/// Problems with the buffer database.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("buffer {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "buffer {path} belongs to gateway `{stored}`, but the config says `{configured}`; seq numbers are per gateway, so either restore the gateway id in the config or point buffer.path at a new file"
    )]
    GatewayMismatch {
        path: PathBuf,
        stored: String,
        configured: String,
    },
    #[error("buffer {path}: row seq {seq} has an unknown quality `{quality}`")]
    CorruptRow {
        path: PathBuf,
        seq: i64,
        quality: String,
    },
    #[error(
        "buffer {path} does not exist; the agent creates it on its first start (check buffer.path in the config)"
    )]
    Missing { path: PathBuf },
    #[error(
        "buffer {path} is not an SQLite database; the agent moves it aside and starts a fresh buffer when it starts"
    )]
    NotADatabase { path: PathBuf },
    #[error("buffer {path} is damaged; cannot move it aside to {to}: {source}")]
    MoveAside {
        path: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot write the seq high-water file {path}: {source}; it must sit on the same writable storage as the buffer"
    )]
    HighWater {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the buffer holds right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BufferStats {
    /// Readings waiting to be uploaded, including those of a pending batch.
    pub rows: u64,
    /// The lowest `seq` in the buffer.
    pub first_seq: Option<i64>,
    /// The highest `seq` in the buffer.
    pub last_seq: Option<i64>,
}

/// The limits the buffer keeps: `[buffer]` `max_bytes`, `max_age` and `on_full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The most the database's pages in use may take, in bytes.
    pub max_bytes: u64,
    /// How long a reading may wait after its commit before it is dropped.
    pub max_age: Duration,
    /// What happens at `max_bytes`.
    pub on_full: FullPolicy,
}

impl Bounds {
    /// No limit at all: what [`Buffer::open`] starts with, for tools and tests that look at a
    /// buffer rather than run one.
    pub const UNBOUNDED: Bounds = Bounds {
        max_bytes: u64::MAX,
        max_age: Duration::MAX,
        on_full: FullPolicy::DropOldest,
    };

    pub fn from_config(config: &BufferConfig) -> Self {
        Self {
            max_bytes: config.max_bytes.0,
            max_age: config.max_age.0,
            on_full: config.on_full,
        }
    }

    fn max_age_us(&self) -> Option<i64> {
        (self.max_age != Duration::MAX)
            .then(|| i64::try_from(self.max_age.as_micros()).unwrap_or(i64::MAX))
    }

    /// How far apart the commit-time marks of `arrivals` may lie: readings are dropped for age
    /// at most this late.
    fn arrival_granularity_us(&self) -> i64 {
        self.max_age_us()
            .map_or(60_000_000, |age| (age / 100).clamp(10_000, 60_000_000))
    }

    /// How far below `max_bytes` a drop for size goes, so the buffer does not drop a few rows
    /// at every commit once it is full.
    fn slack(&self) -> u64 {
        (self.max_bytes / 32).clamp(64 << 10, 4 << 20)
    }
}

/// Readings the buffer dropped in one go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dropped {
    first_seq: i64,
    last_seq: i64,
    readings: u64,
}

/// The reason names of the drop counters, in the order `edge-agent buffer` shows them.
pub(crate) const DROP_REASONS: [GapReason; 3] = [
    GapReason::BufferFull,
    GapReason::MaxAge,
    GapReason::DamagedBuffer,
];

/// The `meta` key of the lifetime drop counter for `reason`.
pub(crate) fn dropped_key(reason: &GapReason) -> String {
    format!("dropped_{}", reason.as_str())
}

/// A batch that has been cut but not yet confirmed by the upload target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingBatch {
    pub first_seq: i64,
    pub last_seq: i64,
    /// The site name at the time the batch was cut, so a retry writes identical bytes.
    pub site: String,
}

/// The fresh lane's current run (batch contract v3): the `seq` range its confirmed batches
/// covered since it last jumped ahead, kept in `meta` (`fresh_first`, `fresh_last`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreshRun {
    pub first_seq: i64,
    pub last_seq: i64,
}

/// A fresh-lane batch: a copy of the readings `first_seq..=last_seq`. Nothing about it is
/// recorded until its upload is confirmed ([`Buffer::fresh_uploaded`]); planning again after a
/// crash gives the same `first_seq` (and maybe more rows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreshBatch {
    pub first_seq: i64,
    pub last_seq: i64,
    /// Readings in the range.
    pub rows: u64,
    /// The site name, as for a main-lane batch.
    pub site: String,
    /// Where the run this batch belongs to starts: the current run's start when the batch
    /// continues it, `first_seq` when it starts a new one.
    pub run_first_seq: i64,
}

impl FreshBatch {
    /// Whether the batch starts a new run (jumps ahead) rather than continuing the last one.
    pub fn starts_run(&self) -> bool {
        self.run_first_seq == self.first_seq
    }
}

/// The SQLite buffer. All methods block; call them from `spawn_blocking` in async code.
pub struct Buffer {
    path: PathBuf,
    gateway: String,
    inner: Mutex<Inner>,
    recovery: Option<RecoveryReport>,
}

/// The connection and the `seq` bookkeeping that must change together with it.
struct Inner {
    conn: Connection,
    /// The marks as last written to the high-water file.
    marks: HighWater,
    /// The highest `seq` assigned so far (`sqlite_sequence`).
    last_seq: i64,
    /// Readings in the table, kept here so no commit has to count them.
    rows: u64,
    bounds: Bounds,
}

/// The tables as first released. A column added later goes to [`ADDED_READING_COLUMNS`], never
/// here, so new and old buffers end up with the same layout.
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS readings (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_us   INTEGER NOT NULL,
    device  TEXT NOT NULL,
    tag     TEXT NOT NULL,
    value   REAL,
    quality TEXT NOT NULL,
    unit    TEXT
);
CREATE TABLE IF NOT EXISTS pending_batch (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    first_seq INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    site      TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS gaps (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    first_seq       INTEGER NOT NULL,
    last_seq        INTEGER NOT NULL,
    readings        INTEGER NOT NULL,
    reason          TEXT NOT NULL,
    detected_at_us  INTEGER NOT NULL,
    batch_first_seq INTEGER
) STRICT;
CREATE TABLE IF NOT EXISTS arrivals (
    last_seq    INTEGER PRIMARY KEY,
    first_at_us INTEGER NOT NULL,
    last_at_us  INTEGER NOT NULL
) STRICT;
";

/// Columns added to `readings` after its first release, in the order they were added, with
/// their SQL type. Every buffer (new or old) gets them by `ALTER TABLE ... ADD COLUMN`, so all
/// buffers have one layout: SQLite reads a column missing from an older row as NULL without
/// rewriting the row, and existing readings keep their `seq` and content.
const ADDED_READING_COLUMNS: [(&str, &str); 1] = [
    // Batch contract v2: the text of a string tag.
    ("value_text", "TEXT"),
];

/// Adds the columns of [`ADDED_READING_COLUMNS`] a buffer does not have yet, in one immediate
/// transaction (a second process opening the same file waits and then finds them).
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has = |conn: &Connection, name: &str| -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('readings') WHERE name = ?1)",
            [name],
            |r| r.get(0),
        )
    };
    let mut missing = false;
    for (name, _) in ADDED_READING_COLUMNS {
        missing |= !has(conn, name)?;
    }
    if !missing {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let added = (|| {
        for (name, sql_type) in ADDED_READING_COLUMNS {
            if !has(conn, name)? {
                conn.execute_batch(&format!(
                    "ALTER TABLE readings ADD COLUMN {name} {sql_type}"
                ))?;
            }
        }
        conn.execute_batch("COMMIT")
    })();
    if added.is_err() {
        // Best effort: the error that matters is the one returned.
        let _ = conn.execute_batch("ROLLBACK");
    }
    added
}

/// Microseconds since the Unix epoch on the gateway's clock.
pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Bytes in the database's pages that are in use (all pages minus the free list). Two header
/// reads, no scan; inside a write transaction it includes that transaction's changes.
pub(crate) fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pragma = |name: &str| -> rusqlite::Result<u64> {
        conn.pragma_query_value(None, name, |r| r.get::<_, i64>(0))
            .map(|v| u64::try_from(v).unwrap_or(0))
    };
    let pages = pragma("page_count")?;
    let free = pragma("freelist_count")?;
    Ok(pages.saturating_sub(free) * pragma("page_size")?)
}

/// Adds `n` to the lifetime counter `key` in `meta`.
pub(crate) fn add_to_meta_counter(conn: &Connection, key: &str, n: u64) -> rusqlite::Result<()> {
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, CAST(?2 AS TEXT))
         ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + ?2 AS TEXT)",
        params![key, n],
    )?;
    Ok(())
}

/// Records a gap, or extends the last one when it is of the same reason, not yet given to a
/// batch and no reading lies between the two (one long outage gives one record, not one per
/// commit).
pub(crate) fn record_gap(
    conn: &Connection,
    first_seq: i64,
    last_seq: i64,
    readings: u64,
    reason: &GapReason,
    detected_at_us: i64,
) -> rusqlite::Result<()> {
    let n = i64::try_from(readings).unwrap_or(i64::MAX);
    let last: Option<(i64, i64)> = conn
        .query_row(
            "SELECT id, last_seq FROM gaps WHERE batch_first_seq IS NULL AND reason = ?1
             ORDER BY id DESC LIMIT 1",
            [reason.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((id, prev_last)) = last
        && prev_last < first_seq
    {
        let between: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM readings WHERE seq > ?1 AND seq < ?2)",
            [prev_last, first_seq],
            |r| r.get(0),
        )?;
        if !between {
            conn.execute(
                "UPDATE gaps SET last_seq = ?2, readings = readings + ?3 WHERE id = ?1",
                params![id, last_seq, n],
            )?;
            return Ok(());
        }
    }
    conn.execute(
        "INSERT INTO gaps (first_seq, last_seq, readings, reason, detected_at_us)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![first_seq, last_seq, n, reason.as_str(), detected_at_us],
    )?;
    Ok(())
}

/// Deletes the readings with `after < seq <= upto`, records them as a gap and counts them.
fn drop_range(
    tx: &Transaction<'_>,
    after: i64,
    upto: i64,
    reason: &GapReason,
    now: i64,
) -> rusqlite::Result<Option<Dropped>> {
    let range: (Option<i64>, Option<i64>) = tx.query_row(
        "SELECT (SELECT min(seq) FROM readings WHERE seq > ?1 AND seq <= ?2),
                (SELECT max(seq) FROM readings WHERE seq > ?1 AND seq <= ?2)",
        [after, upto],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (Some(first_seq), Some(last_seq)) = range else {
        return Ok(None);
    };
    let deleted = tx.execute(
        "DELETE FROM readings WHERE seq >= ?1 AND seq <= ?2",
        [first_seq, last_seq],
    )?;
    let readings = u64::try_from(deleted).unwrap_or(0);
    // Marks at or below the range now cover only readings that are gone or pinned in the
    // pending batch, which is never dropped for age.
    tx.execute("DELETE FROM arrivals WHERE last_seq <= ?1", [last_seq])?;
    record_gap(tx, first_seq, last_seq, readings, reason, now)?;
    add_to_meta_counter(tx, &dropped_key(reason), readings)?;
    Ok(Some(Dropped {
        first_seq,
        last_seq,
        readings,
    }))
}

/// The readings of the pending batch are in flight and never dropped: the highest such `seq`.
fn pinned_seq(conn: &Connection) -> rusqlite::Result<i64> {
    Ok(read_pending(conn)?.map_or(0, |p| p.last_seq))
}

/// The highest `seq` above `pinned` whose commit mark is older than `cutoff_us`, if any.
fn aged_upto(conn: &Connection, pinned: i64, cutoff_us: i64) -> rusqlite::Result<Option<i64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT last_seq, last_at_us FROM arrivals WHERE last_seq > ?1 ORDER BY last_seq",
    )?;
    let mut rows = stmt.query([pinned])?;
    let mut upto = None;
    // Marks are in commit order, so the walk stops at the first one young enough.
    while let Some(row) = rows.next()? {
        let (last_seq, at): (i64, i64) = (row.get(0)?, row.get(1)?);
        if at >= cutoff_us {
            break;
        }
        upto = Some(last_seq);
    }
    Ok(upto)
}

/// Drops the readings older than `max_age` that are not in the pending batch.
fn enforce_age(
    tx: &Transaction<'_>,
    bounds: &Bounds,
    now: i64,
) -> rusqlite::Result<Option<Dropped>> {
    let Some(age) = bounds.max_age_us() else {
        return Ok(None);
    };
    let pinned = pinned_seq(tx)?;
    match aged_upto(tx, pinned, now.saturating_sub(age))? {
        Some(upto) => drop_range(tx, pinned, upto, &GapReason::MaxAge, now),
        None => Ok(None),
    }
}

/// With `drop_oldest`, drops the oldest readings outside the pending batch until the pages in
/// use are a little below `max_bytes`. `rows` is the number of readings in the table.
fn enforce_size(
    tx: &Transaction<'_>,
    bounds: &Bounds,
    mut rows: u64,
    now: i64,
) -> rusqlite::Result<Option<Dropped>> {
    let mut dropped: Option<Dropped> = None;
    if bounds.max_bytes == u64::MAX || bounds.on_full != FullPolicy::DropOldest {
        return Ok(dropped);
    }
    let mut used = used_bytes(tx)?;
    if used <= bounds.max_bytes {
        return Ok(dropped);
    }
    let target = bounds.max_bytes.saturating_sub(bounds.slack());
    let pinned = pinned_seq(tx)?;
    // Each round estimates how many rows free the excess from the average row size; pages
    // that do not empty completely can leave a little over, which the next round takes.
    for _ in 0..16 {
        let per_row = (used / rows.max(1)).max(1);
        let count = (used - target).div_ceil(per_row).max(1);
        let upto: Option<i64> = tx
            .query_row(
                "SELECT seq FROM readings WHERE seq > ?1 ORDER BY seq LIMIT 1 OFFSET ?2",
                params![pinned, i64::try_from(count - 1).unwrap_or(i64::MAX)],
                |r| r.get(0),
            )
            .optional()?;
        // Fewer rows than that after the pending batch: all of them.
        let upto = upto.unwrap_or(i64::MAX);
        let Some(d) = drop_range(tx, pinned, upto, &GapReason::BufferFull, now)? else {
            // Only the pending batch is left: nothing more may go.
            break;
        };
        rows = rows.saturating_sub(d.readings);
        // Each round starts right after the pending batch, where the last one ended.
        dropped = Some(match dropped {
            Some(before) => Dropped {
                first_seq: before.first_seq,
                last_seq: d.last_seq,
                readings: before.readings + d.readings,
            },
            None => d,
        });
        used = used_bytes(tx)?;
        if used <= target {
            break;
        }
    }
    Ok(dropped)
}

/// Notes that the readings up to `last_seq` were committed at `now`: extends the newest mark
/// while it is younger than the granularity, otherwise starts a new one.
fn record_arrival(
    tx: &Transaction<'_>,
    last_seq: i64,
    now: i64,
    granularity_us: i64,
) -> rusqlite::Result<()> {
    let newest: Option<(i64, i64)> = tx
        .query_row(
            "SELECT last_seq, first_at_us FROM arrivals ORDER BY last_seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match newest {
        Some((prev, first_at))
            if prev < last_seq && (first_at..first_at + granularity_us).contains(&now) =>
        {
            tx.execute(
                "UPDATE arrivals SET last_seq = ?2, last_at_us = ?3 WHERE last_seq = ?1",
                params![prev, last_seq, now],
            )?;
        }
        Some((prev, _)) if prev >= last_seq => {}
        _ => {
            tx.execute(
                "INSERT INTO arrivals (last_seq, first_at_us, last_at_us) VALUES (?1, ?2, ?2)",
                params![last_seq, now],
            )?;
        }
    }
    Ok(())
}

/// Logs and counts what a commit dropped (after the commit, so only drops that happened are
/// reported).
fn report_dropped(path: &Path, reason: &GapReason, dropped: Option<Dropped>, bounds: &Bounds) {
    if let Some(d) = dropped {
        crate::metrics::global().buffer_dropped(reason.as_str(), d.readings);
        let why = match reason {
            GapReason::MaxAge => format!(
                "they waited longer than buffer.max_age ({})",
                crate::config::ConfigDuration(bounds.max_age)
            ),
            _ => format!(
                "the buffer reached buffer.max_bytes ({})",
                crate::config::ByteSize(bounds.max_bytes)
            ),
        };
        warn!(
            component = "buffer",
            buffer = %path.display(),
            reason = reason.as_str(),
            readings = d.readings,
            first_seq = d.first_seq,
            last_seq = d.last_seq,
            "dropped {} readings (seq {}..={}) because {why}; a gap record goes to the cloud with the next batch",
            d.readings,
            d.first_seq,
            d.last_seq
        );
    }
}

/// The page cache of each connection to the buffer, in KiB (SQLite reads a negative
/// `cache_size` as KiB).
pub(crate) const PAGE_CACHE_KIB: i64 = 512;

/// Opens (or creates) the database with the buffer's settings and schema.
pub(crate) fn open_connection(path: &Path, durability: Durability) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    // SQLite's default page cache is 2 MiB per connection, and a buffer holding a batch or two
    // fills it. The agent's access is append at the end of `readings` and read/delete of the
    // oldest batch in seq order, so a small cache loses little: pages it drops are re-read from
    // the OS page cache, and on a 20 MB RSS budget the 1.5 MiB saved counts.
    conn.pragma_update(None, "cache_size", -PAGE_CACHE_KIB)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)?;
    migrate(&conn)?;
    Ok(conn)
}

/// Whether an error means the file itself is damaged (as opposed to busy, full or forbidden,
/// which moving the file aside would not cure and must never trigger).
pub(crate) fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// Runs `PRAGMA quick_check` on an existing file. `Ok(Some(problem))` when the file is damaged.
fn check_integrity(path: &Path) -> rusqlite::Result<Option<String>> {
    let run = || -> rusqlite::Result<Vec<String>> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut stmt = conn.prepare("PRAGMA quick_check")?;
        let lines = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(lines)
    };
    match run() {
        Ok(lines) if lines.len() == 1 && lines[0] == "ok" => Ok(None),
        Ok(lines) => {
            let first = lines.first().cloned().unwrap_or_default();
            Ok(Some(if lines.len() > 1 {
                format!(
                    "integrity check: {first} (and {} more problems)",
                    lines.len() - 1
                )
            } else {
                format!("integrity check: {first}")
            }))
        }
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) => {
            Ok(Some("not an SQLite database".to_owned()))
        }
        Err(e) if is_damage(&e) => Ok(Some(e.to_string())),
        Err(e) => Err(e),
    }
}

/// The highest `seq` `AUTOINCREMENT` has handed out (0 for none).
pub(crate) fn read_sequence(conn: &Connection) -> rusqlite::Result<i64> {
    Ok(conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'readings'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .unwrap_or(0))
}

/// Makes the next `seq` at least `floor + 1`.
pub(crate) fn raise_sequence(conn: &Connection, floor: i64) -> rusqlite::Result<()> {
    if read_sequence(conn)? >= floor {
        return Ok(());
    }
    let updated = conn.execute(
        "UPDATE sqlite_sequence SET seq = ?1 WHERE name = 'readings'",
        [floor],
    )?;
    if updated == 0 {
        conn.execute(
            "INSERT INTO sqlite_sequence (name, seq) VALUES ('readings', ?1)",
            [floor],
        )?;
    }
    Ok(())
}

impl Buffer {
    /// Opens (or creates) the buffer for `gateway`.
    ///
    /// An existing file is checked first (`PRAGMA quick_check`). A damaged file, or one that is
    /// not a database at all, is moved aside and whatever can still be read is salvaged into a
    /// fresh buffer (see [`RecoveryReport`], also available from [`Buffer::recovery`]); the
    /// agent carries on. Errors are left for conditions a new file would not cure: a folder that
    /// cannot be created, a busy or read-only file, another gateway's buffer.
    pub fn open(path: &Path, durability: Durability, gateway: &str) -> Result<Self, BufferError> {
        Self::open_bounded(path, durability, gateway, Bounds::UNBOUNDED)
    }

    /// [`Buffer::open`], then [`Buffer::set_bounds`]: what the agent does at start-up.
    pub fn open_bounded(
        path: &Path,
        durability: Durability,
        gateway: &str,
        bounds: Bounds,
    ) -> Result<Self, BufferError> {
        let buffer = Self::open_unbounded(path, durability, gateway)?;
        buffer.set_bounds(bounds)?;
        Ok(buffer)
    }

    fn open_unbounded(
        path: &Path,
        durability: Durability,
        gateway: &str,
    ) -> Result<Self, BufferError> {
        let err = |source| BufferError::Sqlite {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            // A missing parent folder would otherwise surface as SQLite's vague "unable to open".
            std::fs::create_dir_all(parent).map_err(|e| {
                err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                    Some(format!("cannot create folder {}: {e}", parent.display())),
                ))
            })?;
        }
        let marks = match HighWater::load(path) {
            Ok(marks) => marks,
            Err(problem) => {
                warn!(
                    component = "buffer",
                    "{problem}; seq continues from what the database says"
                );
                None
            }
        };
        let existing = std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
        let mut recovery = None;
        if existing && let Some(problem) = check_integrity(path).map_err(err)? {
            recovery = Some(recovery::recover(
                path, durability, gateway, problem, marks,
            )?);
        }
        let opened = match Self::open_checked(path, durability, gateway) {
            // quick_check does not read every page; a damage it missed can still show here.
            Err(BufferError::Sqlite { source, .. }) if recovery.is_none() && is_damage(&source) => {
                recovery = Some(recovery::recover(
                    path,
                    durability,
                    gateway,
                    source.to_string(),
                    marks,
                )?);
                Self::open_checked(path, durability, gateway)?
            }
            other => other?,
        };
        let (conn, mut last_seq) = opened;
        let rows = prepare_bounds_state(&conn).map_err(err)?;
        // Whatever the database says, seq must not fall back below what may have left the
        // gateway (a power cut with durability = "normal" can roll back the last commits); a
        // buffer that was deleted or lost starts above every seq ever handed out.
        let floor = match marks {
            Some(m) if !existing => m.highest(),
            Some(m) => m.cut.max(m.completed),
            None => 0,
        };
        if floor > last_seq {
            raise_sequence(&conn, floor).map_err(err)?;
            if !existing {
                warn!(
                    component = "buffer",
                    buffer = %path.display(),
                    next_seq = floor + 1,
                    "the buffer file was missing; started a new one, seq continues above every value handed out before"
                );
            }
            last_seq = floor;
        }
        if let Some(report) = &recovery {
            warn!(component = "buffer", "{report}");
            if report.lost_readings > 0 {
                crate::metrics::global()
                    .buffer_dropped(GapReason::DamagedBuffer.as_str(), report.lost_readings);
            }
        }
        Ok(Self {
            path: path.to_owned(),
            gateway: gateway.to_owned(),
            inner: Mutex::new(Inner {
                conn,
                marks: marks.unwrap_or_default(),
                last_seq,
                rows,
                bounds: Bounds::UNBOUNDED,
            }),
            recovery,
        })
    }

    /// Applies `bounds` from now on and records them in the database, where `edge-agent buffer`
    /// shows them. A smaller bound takes effect at the next commit (and the next
    /// [`Buffer::expire`] for the age).
    pub fn set_bounds(&self, bounds: Bounds) -> Result<(), BufferError> {
        let mut inner = self.lock();
        let policy = match bounds.on_full {
            FullPolicy::DropOldest => "drop_oldest",
            FullPolicy::Backpressure => "backpressure",
        };
        let age_ms = bounds
            .max_age_us()
            .map_or_else(|| "none".to_owned(), |us| (us / 1000).to_string());
        let max_bytes = if bounds.max_bytes == u64::MAX {
            "none".to_owned()
        } else {
            bounds.max_bytes.to_string()
        };
        let tx = inner.conn.transaction().map_err(|e| self.err(e))?;
        for (key, value) in [
            ("max_bytes", max_bytes),
            ("max_age_ms", age_ms),
            ("on_full", policy.to_owned()),
        ] {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = ?2",
                [key, &value],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        if bounds.max_bytes != u64::MAX {
            // Keep the write-ahead log small next to a small bound: checkpoint after about a
            // sixteenth of the bound (at most SQLite's default of 1000 pages) and cut the log
            // file back to that size after each checkpoint.
            let page_size: u64 = inner
                .conn
                .pragma_query_value(None, "page_size", |r| r.get::<_, i64>(0))
                .map(|v| u64::try_from(v).unwrap_or(4096))
                .map_err(|e| self.err(e))?;
            let pages = i64::try_from((bounds.max_bytes / 16 / page_size.max(1)).clamp(64, 1000))
                .unwrap_or(1000);
            inner
                .conn
                .pragma_update_and_check(None, "wal_autocheckpoint", pages, |_| Ok(()))
                .map_err(|e| self.err(e))?;
            let limit = pages * i64::try_from(page_size).unwrap_or(4096);
            inner
                .conn
                .pragma_update_and_check(None, "journal_size_limit", limit, |_| Ok(()))
                .map_err(|e| self.err(e))?;
        }
        inner.bounds = bounds;
        Ok(())
    }

    /// The bounds in force.
    pub fn bounds(&self) -> Bounds {
        self.lock().bounds
    }

    /// Bytes in the database's pages that are in use (the figure `max_bytes` bounds).
    pub fn used_bytes(&self) -> Result<u64, BufferError> {
        used_bytes(&self.lock().conn).map_err(|e| self.err(e))
    }

    /// Whether the pages in use are below `max_bytes`: with `on_full = "backpressure"` the
    /// buffer writer takes readings only while this holds.
    pub fn has_room(&self) -> Result<bool, BufferError> {
        let inner = self.lock();
        if inner.bounds.max_bytes == u64::MAX {
            return Ok(true);
        }
        used_bytes(&inner.conn)
            .map(|used| used < inner.bounds.max_bytes)
            .map_err(|e| self.err(e))
    }

    /// Drops the readings that waited longer than `max_age` (outside the pending batch) and
    /// returns how many went. Commits do this too; the batcher calls it on every round so
    /// readings age out while no source commits. Cheap when nothing is due: one index seek.
    pub fn expire(&self) -> Result<u64, BufferError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(age) = inner.bounds.max_age_us() else {
            return Ok(0);
        };
        let now = now_us();
        let due = pinned_seq(&inner.conn)
            .and_then(|pinned| aged_upto(&inner.conn, pinned, now.saturating_sub(age)))
            .map_err(|e| self.err(e))?;
        if due.is_none() {
            return Ok(0);
        }
        let tx = inner
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let dropped = enforce_age(&tx, &inner.bounds, now).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        let n = dropped.map_or(0, |d| d.readings);
        inner.rows = inner.rows.saturating_sub(n);
        report_dropped(&self.path, &GapReason::MaxAge, dropped, &inner.bounds);
        Ok(n)
    }

    /// The gap records that travel with `batch` (given to it when it was cut), in `seq` order.
    pub fn batch_gaps(&self, batch: &PendingBatch) -> Result<Vec<Gap>, BufferError> {
        let inner = self.lock();
        read_gaps(&inner.conn, Some(batch.first_seq)).map_err(|e| self.err(e))
    }

    /// Opens the database and checks that it belongs to `gateway`; returns the last `seq`.
    fn open_checked(
        path: &Path,
        durability: Durability,
        gateway: &str,
    ) -> Result<(Connection, i64), BufferError> {
        let err = |source| BufferError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = open_connection(path, durability).map_err(err)?;
        let stored: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'gateway'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err)?;
        match stored {
            Some(stored) if stored != gateway => {
                return Err(BufferError::GatewayMismatch {
                    path: path.to_owned(),
                    stored,
                    configured: gateway.to_owned(),
                });
            }
            Some(_) => {}
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('gateway', ?1)",
                    [gateway],
                )
                .map_err(err)?;
            }
        }
        let last_seq = read_sequence(&conn).map_err(err)?;
        Ok((conn, last_seq))
    }

    /// What the start-up check found and salvaged, when the file was damaged.
    pub fn recovery(&self) -> Option<&RecoveryReport> {
        self.recovery.as_ref()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves SQLite itself consistent (the open transaction
        // rolls back when its guard drops), and the marks are only raised after the file write
        // succeeded, so a poisoned lock is safe to keep using.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes raised marks to the high-water file, then remembers them.
    fn store_marks(&self, inner: &mut Inner, marks: HighWater) -> Result<(), BufferError> {
        if marks == inner.marks {
            return Ok(());
        }
        marks
            .store(&self.path)
            .map_err(|source| BufferError::HighWater {
                path: high_water::path_for(&self.path),
                source,
            })?;
        inner.marks = marks;
        Ok(())
    }

    fn err(&self, source: rusqlite::Error) -> BufferError {
        BufferError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Inserts readings in one transaction and returns the `seq` range they received.
    pub fn append(&self, readings: &[Reading]) -> Result<Option<(i64, i64)>, BufferError> {
        if readings.is_empty() {
            return Ok(None);
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        let count = i64::try_from(readings.len()).unwrap_or(i64::MAX);
        let needed = inner.last_seq.saturating_add(count);
        if needed > inner.marks.reserved {
            // Reserve before inserting, so the file always covers every seq handed out.
            let marks = HighWater {
                reserved: needed.saturating_add(RESERVE_BLOCK),
                ..inner.marks
            };
            self.store_marks(inner, marks)?;
        }
        let tx = inner.conn.transaction().map_err(|e| self.err(e))?;
        let mut first = None;
        let mut last = 0;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO readings (ts_us, device, tag, value, quality, unit, value_text)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(|e| self.err(e))?;
            for r in readings {
                stmt.execute(params![
                    r.ts_us,
                    r.device,
                    r.tag,
                    r.value,
                    r.quality.as_str(),
                    r.unit,
                    r.value_text
                ])
                .map_err(|e| self.err(e))?;
                last = tx.last_insert_rowid();
                first.get_or_insert(last);
            }
        }
        // The bounds are kept in the same transaction as the insert: a crash never leaves the
        // buffer over them, and a drop is on disk together with its gap record and count.
        let now = now_us();
        let bounds = inner.bounds;
        record_arrival(&tx, last, now, bounds.arrival_granularity_us()).map_err(|e| self.err(e))?;
        let aged = enforce_age(&tx, &bounds, now).map_err(|e| self.err(e))?;
        let rows = inner.rows + readings.len() as u64 - aged.map_or(0, |d| d.readings);
        let full = enforce_size(&tx, &bounds, rows, now).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        inner.rows = rows - full.map_or(0, |d| d.readings);
        inner.last_seq = inner.last_seq.max(last);
        report_dropped(&self.path, &GapReason::MaxAge, aged, &bounds);
        report_dropped(&self.path, &GapReason::BufferFull, full, &bounds);
        Ok(first.map(|f| (f, last)))
    }

    /// Depth and `seq` range; the row count is kept in memory and the ends are two index
    /// seeks, so this is cheap enough for every round of the batcher.
    pub fn stats(&self) -> Result<BufferStats, BufferError> {
        let inner = self.lock();
        // Two subqueries: SQLite answers a lone min() or max() of the key with one seek, but
        // both in one SELECT with a scan.
        let (first_seq, last_seq) = inner
            .conn
            .query_row(
                "SELECT (SELECT min(seq) FROM readings), (SELECT max(seq) FROM readings)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))?;
        Ok(BufferStats {
            rows: inner.rows,
            first_seq,
            last_seq,
        })
    }

    /// The batch that was cut but not confirmed, if any (for example before a crash).
    pub fn pending_batch(&self) -> Result<Option<PendingBatch>, BufferError> {
        read_pending(&self.lock().conn).map_err(|e| self.err(e))
    }

    /// Cuts the next batch: the oldest `max_rows` readings, recorded as pending. Returns the
    /// already pending batch instead if there is one, and `None` when the buffer is empty.
    pub fn cut_batch(
        &self,
        max_rows: usize,
        site: &str,
    ) -> Result<Option<PendingBatch>, BufferError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let tx = inner
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let existing = read_pending(&tx).map_err(|e| self.err(e))?;
        if let Some(batch) = existing {
            drop(tx);
            // A crash may have come between recording the batch and writing the mark.
            let marks = HighWater {
                cut: inner.marks.cut.max(batch.last_seq),
                ..inner.marks
            };
            self.store_marks(inner, marks)?;
            return Ok(Some(batch));
        }
        let limit = i64::try_from(max_rows.max(1)).unwrap_or(i64::MAX);
        let range: (Option<i64>, Option<i64>) = tx
            .query_row(
                "SELECT min(seq), max(seq) FROM (SELECT seq FROM readings ORDER BY seq LIMIT ?1)",
                [limit],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))?;
        let (Some(first_seq), Some(last_seq)) = range else {
            return Ok(None);
        };
        tx.execute(
            "INSERT INTO pending_batch (id, first_seq, last_seq, site) VALUES (1, ?1, ?2, ?3)",
            params![first_seq, last_seq, site],
        )
        .map_err(|e| self.err(e))?;
        // Every gap not yet shipped rides with this batch, fixed now, so a retried upload
        // carries exactly the same records.
        tx.execute(
            "UPDATE gaps SET batch_first_seq = ?1 WHERE batch_first_seq IS NULL",
            [first_seq],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        // The mark must be on disk before the upload starts: from then on these seq values may
        // exist in the cloud and must never be handed out again.
        let marks = HighWater {
            cut: inner.marks.cut.max(last_seq),
            ..inner.marks
        };
        self.store_marks(inner, marks)?;
        Ok(Some(PendingBatch {
            first_seq,
            last_seq,
            site: site.to_owned(),
        }))
    }

    /// The rows of a batch in `seq` order, as they go into the Parquet file.
    pub fn batch_rows(&self, batch: &PendingBatch) -> Result<Vec<Row>, BufferError> {
        self.batch_rows_after(batch, batch.first_seq.saturating_sub(1), usize::MAX)
    }

    /// Up to `limit` rows of a batch with `seq` above `after`, in `seq` order: the batch a slice
    /// at a time, so it is never in memory whole. The lock is held for one slice only; the
    /// slices still fit together, because the rows of the pending batch never change until
    /// [`Buffer::complete_batch`] (the bounds never cut into it).
    pub fn batch_rows_after(
        &self,
        batch: &PendingBatch,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Row>, BufferError> {
        self.rows_after(batch.last_seq, &batch.site, after, limit)
    }

    /// Up to `limit` rows of a fresh-lane batch with `seq` above `after`, in `seq` order (see
    /// [`Buffer::batch_rows_after`]). The bounds drop the oldest readings first, so they reach a
    /// fresh batch's rows only once everything before them went.
    pub fn fresh_rows_after(
        &self,
        batch: &FreshBatch,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Row>, BufferError> {
        self.rows_after(batch.last_seq, &batch.site, after, limit)
    }

    fn rows_after(
        &self,
        last_seq: i64,
        site: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Row>, BufferError> {
        let inner = self.lock();
        let mut stmt = inner
            .conn
            .prepare_cached(
                "SELECT seq, ts_us, device, tag, value, quality, unit, value_text FROM readings
                 WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(|e| self.err(e))?;
        // SQLite reads a negative LIMIT as none.
        let sql_limit = i64::try_from(limit).unwrap_or(-1);
        let raw = stmt
            .query_map([after, last_seq, sql_limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<f64>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        // A whole batch (no limit) grows as it reads instead of reserving max_rows up front.
        let mut rows = Vec::with_capacity(limit.min(4096));
        for item in raw {
            let (seq, ts_us, device, tag, value, quality_name, unit, value_text) =
                item.map_err(|e| self.err(e))?;
            let quality = Quality::parse(&quality_name).ok_or_else(|| BufferError::CorruptRow {
                path: self.path.clone(),
                seq,
                quality: quality_name.clone(),
            })?;
            rows.push(Row {
                seq,
                ts_us,
                site: site.to_owned(),
                gateway: self.gateway.clone(),
                device,
                tag,
                value,
                quality,
                unit,
                value_text,
            });
        }
        Ok(rows)
    }

    /// Forgets a batch the upload target has confirmed: deletes its rows and the pending record
    /// in one transaction.
    pub fn complete_batch(&self, batch: &PendingBatch) -> Result<(), BufferError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        // Written before the rows go: the upload target has them whether or not the delete
        // below survives, so after a loss of the database they are reported as shipped, not lost.
        let marks = HighWater {
            completed: inner.marks.completed.max(batch.last_seq),
            ..inner.marks
        };
        self.store_marks(inner, marks)?;
        let tx = inner.conn.transaction().map_err(|e| self.err(e))?;
        let deleted = tx
            .execute("DELETE FROM readings WHERE seq <= ?1", [batch.last_seq])
            .map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM pending_batch WHERE id = 1", [])
            .map_err(|e| self.err(e))?;
        // The gap records went out with the batch; the commit marks of its rows are no longer
        // needed.
        tx.execute(
            "DELETE FROM gaps WHERE batch_first_seq = ?1",
            [batch.first_seq],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "DELETE FROM arrivals WHERE last_seq <= ?1",
            [batch.last_seq],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        inner.rows = inner.rows.saturating_sub(deleted as u64);
        Ok(())
    }

    /// Whether a backlog waits, by the fresh lane's definition: more than `max_rows` readings
    /// outside the pending batch, or an oldest waiting reading that arrived more than
    /// `2 × max_age` ago.
    pub fn has_backlog(&self, max_rows: usize, max_age: Duration) -> Result<bool, BufferError> {
        let inner = self.lock();
        let max_rows = max_rows as u64;
        if inner.rows == 0 {
            return Ok(false);
        }
        let conn = &inner.conn;
        let outside = |conn: &Connection| -> rusqlite::Result<bool> {
            if inner.rows <= max_rows {
                return Ok(false);
            }
            let Some(pending) = read_pending(conn)? else {
                return Ok(true);
            };
            // The width of the pending range bounds its readings from above; count them only
            // when that is not enough to decide.
            let width = u64::try_from(pending.last_seq - pending.first_seq + 1).unwrap_or(0);
            if inner.rows.saturating_sub(width) > max_rows {
                return Ok(true);
            }
            let held: i64 = conn.query_row(
                "SELECT count(*) FROM readings WHERE seq >= ?1 AND seq <= ?2",
                [pending.first_seq, pending.last_seq],
                |r| r.get(0),
            )?;
            Ok(inner.rows.saturating_sub(u64::try_from(held).unwrap_or(0)) > max_rows)
        };
        if outside(conn).map_err(|e| self.err(e))? {
            return Ok(true);
        }
        // Marks of shipped or dropped readings are deleted with them, so the first mark is the
        // oldest waiting reading's; its latest commit time makes the age a lower bound.
        let oldest: Option<i64> = conn
            .query_row(
                "SELECT last_at_us FROM arrivals ORDER BY last_seq LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let twice = i64::try_from(max_age.as_micros().saturating_mul(2)).unwrap_or(i64::MAX);
        Ok(oldest.is_some_and(|at| now_us().saturating_sub(at) > twice))
    }

    /// The fresh lane's current run, if it ever uploaded a batch.
    pub fn fresh_run(&self) -> Result<Option<FreshRun>, BufferError> {
        read_fresh_run(&self.lock().conn).map_err(|e| self.err(e))
    }

    /// Plans the next fresh-lane batch (at most `max_rows` readings), or `None` when there is
    /// nothing to copy. The range rule, which lets the collector keep one fresh range per
    /// gateway:
    /// - while the main lane has not completed through the run's last `seq`, the batch continues
    ///   the run: it starts right after it, however old that is now;
    /// - otherwise (or with no run) it starts a new run at the first reading that arrived within
    ///   the last `max_age`, above the main lane's cut mark (never a reading the main lane has
    ///   cut or shipped).
    ///
    /// Reads only: nothing changes until [`Buffer::fresh_uploaded`].
    pub fn plan_fresh_batch(
        &self,
        max_rows: usize,
        max_age: Duration,
        site: &str,
    ) -> Result<Option<FreshBatch>, BufferError> {
        let inner = self.lock();
        let conn = &inner.conn;
        let plan = || -> rusqlite::Result<Option<FreshBatch>> {
            let run = read_fresh_run(conn)?;
            let (after, run_first) = match run {
                Some(run) if inner.marks.completed < run.last_seq => (run.last_seq, Some(run)),
                _ => {
                    let pending = read_pending(conn)?.map_or(0, |p| p.last_seq);
                    let cut = pending.max(inner.marks.cut).max(inner.marks.completed);
                    let max_age_us = i64::try_from(max_age.as_micros()).unwrap_or(i64::MAX);
                    let since_us = now_us().saturating_sub(max_age_us);
                    let Some(fresh_after) = arrived_after(conn, since_us)? else {
                        return Ok(None);
                    };
                    (newest_start(conn, cut.max(fresh_after), since_us)?, None)
                }
            };
            let limit = i64::try_from(max_rows.max(1)).unwrap_or(i64::MAX);
            let range: (Option<i64>, Option<i64>, i64) = conn.query_row(
                "SELECT min(seq), max(seq), count(*) FROM
                 (SELECT seq FROM readings WHERE seq > ?1 ORDER BY seq LIMIT ?2)",
                [after, limit],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let (Some(first_seq), Some(last_seq), rows) = range else {
                return Ok(None);
            };
            Ok(Some(FreshBatch {
                first_seq,
                last_seq,
                rows: u64::try_from(rows).unwrap_or(0),
                site: site.to_owned(),
                run_first_seq: run_first.map_or(first_seq, |r| r.first_seq),
            }))
        };
        plan().map_err(|e| self.err(e))
    }

    /// Records that the upload target confirmed a fresh-lane batch: the run now ends at its last
    /// `seq` (and starts where the batch says). Only `meta` changes: no reading, pending batch,
    /// gap record or high-water mark is touched.
    pub fn fresh_uploaded(&self, batch: &FreshBatch) -> Result<(), BufferError> {
        let mut guard = self.lock();
        let tx = guard.conn.transaction().map_err(|e| self.err(e))?;
        for (key, value) in [
            ("fresh_first", batch.run_first_seq),
            ("fresh_last", batch.last_seq),
        ] {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, CAST(?2 AS TEXT))
                 ON CONFLICT (key) DO UPDATE SET value = CAST(?2 AS TEXT)",
                params![key, value],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }
}

/// Where a new fresh run starts (the `seq` after which it begins), given `bound`, the start
/// from the commit marks. A mark covers up to a minute of commits, so a short backlog can lie
/// wholly inside the mark that straddles `since_us`; the readings' own times narrow it to the
/// first reading above `bound` read at or after `since_us`. The scan walks the primary key from
/// `bound` and stops at the first such reading, so it reads at most one mark's worth of rows.
/// When no reading above `bound` is that young by its own time (a source that stamps readings
/// with older times, such as a file drop of a test stand's log), the marks decide: `bound`.
fn newest_start(conn: &Connection, bound: i64, since_us: i64) -> rusqlite::Result<i64> {
    let young: Option<i64> = conn
        .query_row(
            "SELECT seq FROM readings WHERE seq > ?1 AND ts_us >= ?2 ORDER BY seq LIMIT 1",
            [bound, since_us],
            |r| r.get(0),
        )
        .optional()?;
    Ok(young.map_or(bound, |first| first - 1))
}

/// The fresh lane's run as recorded in `meta`.
pub(crate) fn read_fresh_run(conn: &Connection) -> rusqlite::Result<Option<FreshRun>> {
    let meta = |key: &str| -> rusqlite::Result<Option<i64>> {
        let value: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?;
        Ok(value.and_then(|v| v.parse().ok()))
    };
    Ok(match (meta("fresh_first")?, meta("fresh_last")?) {
        (Some(first_seq), Some(last_seq)) => Some(FreshRun {
            first_seq,
            last_seq,
        }),
        _ => None,
    })
}

/// The `seq` after which every reading arrived at or after `since_us` (0 when all marks are that
/// young), or `None` when no reading arrived since then. Walks the commit marks from the newest,
/// so it reads only the marks of the last `max_age`; the reading of the mark that straddles
/// `since_us` may be up to one mark's width older.
fn arrived_after(conn: &Connection, since_us: i64) -> rusqlite::Result<Option<i64>> {
    let mut stmt =
        conn.prepare_cached("SELECT last_seq, last_at_us FROM arrivals ORDER BY last_seq DESC")?;
    let mut rows = stmt.query([])?;
    let mut young = false;
    while let Some(row) = rows.next()? {
        let (last_seq, at): (i64, i64) = (row.get(0)?, row.get(1)?);
        if at < since_us {
            return Ok(young.then_some(last_seq));
        }
        young = true;
    }
    Ok(young.then_some(0))
}

/// Counts the readings and makes sure every one is covered by a commit mark (a buffer written
/// before marks existed, or one filled by recovery, gets a mark of now). Returns the count.
fn prepare_bounds_state(conn: &Connection) -> rusqlite::Result<u64> {
    let rows: i64 = conn.query_row("SELECT count(*) FROM readings", [], |r| r.get(0))?;
    let newest: Option<i64> = conn.query_row("SELECT max(seq) FROM readings", [], |r| r.get(0))?;
    let marked: Option<i64> =
        conn.query_row("SELECT max(last_seq) FROM arrivals", [], |r| r.get(0))?;
    if let Some(newest) = newest
        && marked.is_none_or(|m| m < newest)
    {
        let now = now_us();
        conn.execute(
            "INSERT INTO arrivals (last_seq, first_at_us, last_at_us) VALUES (?1, ?2, ?2)",
            params![newest, now],
        )?;
    }
    Ok(u64::try_from(rows).unwrap_or(0))
}

/// Gap records: those given to the batch starting at `batch_first_seq`, or with `None` those
/// not yet given to any batch; in `seq` order.
pub(crate) fn read_gaps(
    conn: &Connection,
    batch_first_seq: Option<i64>,
) -> rusqlite::Result<Vec<Gap>> {
    let mut stmt = conn.prepare_cached(
        "SELECT first_seq, last_seq, readings, reason, detected_at_us FROM gaps
         WHERE batch_first_seq IS ?1 ORDER BY first_seq, id",
    )?;
    stmt.query_map([batch_first_seq], |r| {
        Ok(Gap {
            first_seq: r.get(0)?,
            last_seq: r.get(1)?,
            readings: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
            reason: GapReason::parse(&r.get::<_, String>(3)?),
            detected_at_us: r.get(4)?,
        })
    })?
    .collect()
}

pub(crate) fn read_pending(conn: &Connection) -> rusqlite::Result<Option<PendingBatch>> {
    conn.query_row(
        "SELECT first_seq, last_seq, site FROM pending_batch WHERE id = 1",
        [],
        |r| {
            Ok(PendingBatch {
                first_seq: r.get(0)?,
                last_seq: r.get(1)?,
                site: r.get(2)?,
            })
        },
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(i: i64) -> Reading {
        Reading {
            ts_us: 1_700_000_000_000_000 + i,
            device: "press-3".into(),
            tag: format!("t{i}"),
            value: Some(i as f64),
            value_text: None,
            quality: Quality::Good,
            unit: Some("bar".into()),
        }
    }

    fn open(dir: &Path) -> Buffer {
        Buffer::open(&dir.join("b.db"), Durability::Full, "gw-1").unwrap()
    }

    #[test]
    fn seq_keeps_rising_after_every_row_was_shipped_and_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let buf = open(dir.path());
        assert_eq!(buf.append(&[reading(1), reading(2)]).unwrap(), Some((1, 2)));
        let batch = buf.cut_batch(10, "site").unwrap().unwrap();
        buf.complete_batch(&batch).unwrap();
        assert_eq!(buf.stats().unwrap().rows, 0);
        drop(buf);
        let buf = open(dir.path());
        assert_eq!(buf.append(&[reading(3)]).unwrap(), Some((3, 3)));
    }

    #[test]
    fn a_pending_batch_survives_reopen_and_yields_the_same_rows() {
        let dir = tempfile::tempdir().unwrap();
        let buf = open(dir.path());
        buf.append(&(1..=5).map(reading).collect::<Vec<_>>())
            .unwrap();
        let batch = buf.cut_batch(3, "plant-a").unwrap().unwrap();
        assert_eq!((batch.first_seq, batch.last_seq), (1, 3));
        let rows = buf.batch_rows(&batch).unwrap();
        // New readings after the cut do not change the pending batch.
        buf.append(&[reading(6)]).unwrap();
        drop(buf);

        let buf = open(dir.path());
        assert_eq!(buf.pending_batch().unwrap(), Some(batch.clone()));
        assert_eq!(buf.cut_batch(100, "renamed").unwrap(), Some(batch.clone()));
        assert_eq!(buf.batch_rows(&batch).unwrap(), rows);
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(rows[0].gateway, "gw-1");
        assert_eq!(rows[0].site, "plant-a");

        buf.complete_batch(&batch).unwrap();
        assert_eq!(
            buf.stats().unwrap(),
            BufferStats {
                rows: 3,
                first_seq: Some(4),
                last_seq: Some(6)
            }
        );
        let next = buf.cut_batch(100, "plant-a").unwrap().unwrap();
        assert_eq!((next.first_seq, next.last_seq), (4, 6));
    }

    #[test]
    fn refuses_a_buffer_of_another_gateway() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()));
        let err = Buffer::open(&dir.path().join("b.db"), Durability::Full, "gw-2")
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("belongs to gateway `gw-1`, but the config says `gw-2`"),
            "{err}"
        );
    }

    fn bounded(dir: &Path, bounds: Bounds) -> Buffer {
        Buffer::open_bounded(&dir.join("b.db"), Durability::Full, "gw-1", bounds).unwrap()
    }

    fn chunk(from: i64, n: i64) -> Vec<Reading> {
        (from..from + n).map(reading).collect()
    }

    fn meta_counter(buf: &Buffer, reason: &GapReason) -> u64 {
        buf.lock()
            .conn
            .query_row(
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?1",
                [dropped_key(reason)],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .unwrap()
            .map_or(0, |n| u64::try_from(n).unwrap())
    }

    fn unshipped_gaps(buf: &Buffer) -> Vec<Gap> {
        read_gaps(&buf.lock().conn, None).unwrap()
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn drop_oldest_stays_within_max_bytes_keeps_the_pending_batch_and_records_one_gap() {
        let dir = tempfile::tempdir().unwrap();
        let buf = bounded(
            dir.path(),
            Bounds {
                max_bytes: MIB,
                ..Bounds::UNBOUNDED
            },
        );
        buf.append(&chunk(1, 1000)).unwrap();
        let pending = buf.cut_batch(600, "plant-a").unwrap().unwrap();
        let pending_rows = buf.batch_rows(&pending).unwrap();
        let mut appended = 1000;
        // About ten times what fits, in commits of 500.
        while appended < 100_000 {
            buf.append(&chunk(appended + 1, 500)).unwrap();
            appended += 500;
            let used = buf.used_bytes().unwrap();
            assert!(used <= MIB, "{used} bytes in use after seq {appended}");
        }
        // The pending batch is untouched: a retry reads the same rows.
        assert_eq!(buf.batch_rows(&pending).unwrap(), pending_rows);
        let stats = buf.stats().unwrap();
        let counted: i64 = buf
            .lock()
            .conn
            .query_row("SELECT count(*) FROM readings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stats.rows, u64::try_from(counted).unwrap());
        assert_eq!(stats.last_seq, Some(100_000));
        // Every drop was taken right after the pending batch, so one long record tells it all.
        let first_kept = buf
            .lock()
            .conn
            .query_row("SELECT min(seq) FROM readings WHERE seq > 600", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap();
        let dropped = u64::try_from(first_kept - 601).unwrap();
        assert_eq!(stats.rows, 100_000 - dropped);
        let gaps = unshipped_gaps(&buf);
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        assert_eq!(
            (gaps[0].first_seq, gaps[0].last_seq, gaps[0].readings),
            (601, first_kept - 1, dropped)
        );
        assert_eq!(gaps[0].reason, GapReason::BufferFull);
        assert_eq!(meta_counter(&buf, &GapReason::BufferFull), dropped);
        // It still fills most of the bound: drops go a little below it, not far.
        assert!(buf.used_bytes().unwrap() > MIB / 2);

        // The gap rides with the next batch and leaves with it.
        buf.complete_batch(&pending).unwrap();
        let next = buf.cut_batch(1000, "plant-a").unwrap().unwrap();
        assert_eq!(next.first_seq, first_kept);
        assert_eq!(buf.batch_gaps(&next).unwrap(), gaps);
        assert_eq!(unshipped_gaps(&buf), []);
        buf.complete_batch(&next).unwrap();
        assert_eq!(buf.batch_gaps(&next).unwrap(), []);
        let left: i64 = buf
            .lock()
            .conn
            .query_row("SELECT count(*) FROM gaps", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
    }

    #[test]
    fn gaps_given_to_a_pending_batch_stay_fixed_and_later_drops_wait_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let buf = bounded(
            dir.path(),
            Bounds {
                max_bytes: MIB,
                ..Bounds::UNBOUNDED
            },
        );
        // Fill past the bound with no batch pending: the oldest readings go first.
        let mut next_seq = 1;
        while meta_counter(&buf, &GapReason::BufferFull) == 0 {
            buf.append(&chunk(next_seq, 500)).unwrap();
            next_seq += 500;
        }
        let first_gaps = unshipped_gaps(&buf);
        assert_eq!(first_gaps.len(), 1);
        assert_eq!(first_gaps[0].first_seq, 1);
        let batch = buf.cut_batch(100, "plant-a").unwrap().unwrap();
        assert_eq!(batch.first_seq, first_gaps[0].last_seq + 1);
        assert_eq!(buf.batch_gaps(&batch).unwrap(), first_gaps);
        let before = buf.batch_gaps(&batch).unwrap();
        // More drops while the batch is pending: a new record, not an extension of the one
        // already given to the batch, so a retried upload carries the same gaps.
        for _ in 0..40 {
            buf.append(&chunk(next_seq, 500)).unwrap();
            next_seq += 500;
        }
        assert_eq!(buf.batch_gaps(&batch).unwrap(), before);
        let later = unshipped_gaps(&buf);
        assert_eq!(later.len(), 1, "{later:?}");
        assert_eq!(later[0].first_seq, batch.last_seq + 1);
        drop(buf);
        // Both survive a restart with their assignment.
        let buf = bounded(
            dir.path(),
            Bounds {
                max_bytes: MIB,
                ..Bounds::UNBOUNDED
            },
        );
        assert_eq!(buf.batch_gaps(&batch).unwrap(), before);
        assert_eq!(unshipped_gaps(&buf), later);
        assert_eq!(
            meta_counter(&buf, &GapReason::BufferFull),
            before[0].readings + later[0].readings
        );
    }

    #[test]
    fn readings_older_than_max_age_are_dropped_except_the_pending_batch() {
        let dir = tempfile::tempdir().unwrap();
        let buf = bounded(
            dir.path(),
            Bounds {
                max_age: Duration::from_millis(300),
                ..Bounds::UNBOUNDED
            },
        );
        buf.append(&chunk(1, 10)).unwrap();
        let pending = buf.cut_batch(3, "plant-a").unwrap().unwrap();
        assert_eq!(buf.expire().unwrap(), 0, "nothing is old yet");
        std::thread::sleep(Duration::from_millis(400));
        // The next commit finds 4..=10 too old; the pending 1..=3 stays.
        buf.append(&chunk(11, 2)).unwrap();
        let stats = buf.stats().unwrap();
        assert_eq!((stats.rows, stats.first_seq), (5, Some(1)));
        assert_eq!(buf.batch_rows(&pending).unwrap().len(), 3);
        let gaps = unshipped_gaps(&buf);
        assert_eq!(
            gaps.iter()
                .map(|g| (g.first_seq, g.last_seq, g.readings, g.reason.clone()))
                .collect::<Vec<_>>(),
            [(4, 10, 7, GapReason::MaxAge)]
        );
        // Without any commit, expire() finds 11..=12 once they are old; the record grows.
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(buf.expire().unwrap(), 2);
        assert_eq!(buf.stats().unwrap().rows, 3);
        let gaps = unshipped_gaps(&buf);
        assert_eq!(
            gaps.iter()
                .map(|g| (g.first_seq, g.last_seq, g.readings))
                .collect::<Vec<_>>(),
            [(4, 12, 9)]
        );
        assert_eq!(meta_counter(&buf, &GapReason::MaxAge), 9);
        assert_eq!(buf.expire().unwrap(), 0);
    }

    #[test]
    fn age_counts_from_the_commit_not_from_the_reading_timestamp() {
        let dir = tempfile::tempdir().unwrap();
        let buf = bounded(
            dir.path(),
            Bounds {
                max_age: Duration::from_mins(1),
                ..Bounds::UNBOUNDED
            },
        );
        // A log file of last year, imported now, is not old for the buffer.
        let mut old = chunk(1, 5);
        for r in &mut old {
            r.ts_us -= 365 * 24 * 3600 * 1_000_000;
        }
        buf.append(&old).unwrap();
        assert_eq!(buf.expire().unwrap(), 0);
        assert_eq!(buf.stats().unwrap().rows, 5);
    }

    #[test]
    fn backpressure_drops_nothing_and_reports_when_room_returns() {
        let dir = tempfile::tempdir().unwrap();
        let buf = bounded(
            dir.path(),
            Bounds {
                max_bytes: MIB,
                on_full: FullPolicy::Backpressure,
                ..Bounds::UNBOUNDED
            },
        );
        let mut next_seq = 1;
        while buf.has_room().unwrap() {
            buf.append(&chunk(next_seq, 500)).unwrap();
            next_seq += 500;
        }
        // The writer stops at the first commit over the bound, so it overshoots by one commit.
        let used = buf.used_bytes().unwrap();
        assert!((MIB..MIB + 128 * 1024).contains(&used), "{used}");
        assert_eq!(
            buf.stats().unwrap().rows,
            u64::try_from(next_seq - 1).unwrap()
        );
        assert_eq!(unshipped_gaps(&buf), []);
        assert_eq!(meta_counter(&buf, &GapReason::BufferFull), 0);
        let batch = buf.cut_batch(5000, "plant-a").unwrap().unwrap();
        buf.complete_batch(&batch).unwrap();
        assert!(buf.has_room().unwrap());
    }

    #[test]
    fn string_readings_keep_their_text_through_the_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let buf = open(dir.path());
        let text = Reading {
            tag: "recipe".into(),
            value: None,
            value_text: Some("MIX-7".into()),
            unit: None,
            ..reading(2)
        };
        buf.append(&[reading(1), text, reading(3)]).unwrap();
        let batch = buf.cut_batch(10, "plant-a").unwrap().unwrap();
        let rows = buf.batch_rows(&batch).unwrap();
        let texts: Vec<(Option<f64>, Option<&str>)> = rows
            .iter()
            .map(|r| (r.value, r.value_text.as_deref()))
            .collect();
        assert_eq!(
            texts,
            [(Some(1.0), None), (None, Some("MIX-7")), (Some(3.0), None)]
        );
    }

    #[test]
    fn a_buffer_of_an_older_agent_gains_value_text_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        {
            // The layout before contract v2: the first-release tables, no value_text.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('gateway', 'gw-1')",
                [],
            )
            .unwrap();
            for i in 1..=3 {
                conn.execute(
                    "INSERT INTO readings (ts_us, device, tag, value, quality, unit)
                     VALUES (?1, 'press-3', 'oil_temp', ?2, 'good', 'degC')",
                    params![1_700_000_000_000_000_i64 + i, i as f64],
                )
                .unwrap();
            }
            let columns: i64 = conn
                .query_row(
                    "SELECT count(*) FROM pragma_table_info('readings')",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(columns, 7);
        }
        let buf = open(dir.path());
        assert_eq!(buf.stats().unwrap().rows, 3);
        buf.append(&[Reading {
            value: None,
            value_text: Some("MIX-7".into()),
            ..reading(4)
        }])
        .unwrap();
        let batch = buf.cut_batch(10, "plant-a").unwrap().unwrap();
        assert_eq!((batch.first_seq, batch.last_seq), (1, 4));
        let rows = buf.batch_rows(&batch).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.value).collect::<Vec<_>>(),
            [Some(1.0), Some(2.0), Some(3.0), None]
        );
        assert_eq!(
            rows.iter()
                .map(|r| r.value_text.as_deref())
                .collect::<Vec<_>>(),
            [None, None, None, Some("MIX-7")]
        );
        drop(buf);
        // Opening again finds the column and changes nothing.
        let buf = open(dir.path());
        assert_eq!(buf.batch_rows(&batch).unwrap(), rows);
    }

    #[test]
    fn empty_buffer_cuts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let buf = open(dir.path());
        assert_eq!(buf.cut_batch(10, "s").unwrap(), None);
        assert_eq!(buf.append(&[]).unwrap(), None);
    }

    /// A buffer whose commit marks are 100 ms apart at most, so readings committed a few hundred
    /// milliseconds apart land in different marks.
    fn fine_marks(dir: &Path) -> Buffer {
        bounded(
            dir,
            Bounds {
                max_bytes: u64::MAX,
                max_age: Duration::from_secs(10),
                on_full: FullPolicy::DropOldest,
            },
        )
    }

    /// "Fresh" for these tests: arrived within the last 150 ms.
    const WINDOW: Duration = Duration::from_millis(150);

    fn ends(batch: &FreshBatch) -> (i64, i64, u64, i64) {
        (
            batch.first_seq,
            batch.last_seq,
            batch.rows,
            batch.run_first_seq,
        )
    }

    #[test]
    fn fresh_lane_continues_its_run_until_the_main_lane_passed_it_then_jumps_to_fresh_readings() {
        let dir = tempfile::tempdir().unwrap();
        let buf = fine_marks(dir.path());
        buf.append(&chunk(1, 10)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        buf.append(&chunk(11, 10)).unwrap();

        // No run yet: a new one starts at the first reading that arrived within the window.
        let first = buf.plan_fresh_batch(4, WINDOW, "plant-a").unwrap().unwrap();
        assert_eq!(ends(&first), (11, 14, 4, 11));
        assert!(first.starts_run());
        // Planning records nothing: a crash between the PUT and the meta write plans the same
        // first seq again (here with the same rows, as max_rows is reached).
        assert_eq!(buf.fresh_run().unwrap(), None);
        buf.append(&chunk(21, 2)).unwrap();
        assert_eq!(
            buf.plan_fresh_batch(4, WINDOW, "plant-a").unwrap(),
            Some(first.clone())
        );
        buf.fresh_uploaded(&first).unwrap();
        assert_eq!(
            buf.fresh_run().unwrap(),
            Some(FreshRun {
                first_seq: 11,
                last_seq: 14
            })
        );

        // Continue: right after the run, however old those readings are by now.
        std::thread::sleep(Duration::from_millis(300));
        let next = buf.plan_fresh_batch(4, WINDOW, "plant-a").unwrap().unwrap();
        assert_eq!(ends(&next), (15, 18, 4, 11));
        assert!(!next.starts_run());
        // A crash after its PUT: the same first seq again, now with more rows behind it.
        let again = buf
            .plan_fresh_batch(100, WINDOW, "plant-a")
            .unwrap()
            .unwrap();
        assert_eq!(ends(&again), (15, 22, 8, 11));
        buf.fresh_uploaded(&again).unwrap();
        assert_eq!(
            buf.fresh_run().unwrap(),
            Some(FreshRun {
                first_seq: 11,
                last_seq: 22
            })
        );

        // The main lane ships 1..=10, then cuts 11..=20: it has not completed through 22, so
        // the fresh lane still continues (and has nothing new to copy).
        let main = buf.cut_batch(10, "plant-a").unwrap().unwrap();
        buf.complete_batch(&main).unwrap();
        let main = buf.cut_batch(10, "plant-a").unwrap().unwrap();
        assert_eq!((main.first_seq, main.last_seq), (11, 20));
        assert_eq!(buf.plan_fresh_batch(4, WINDOW, "plant-a").unwrap(), None);
        buf.append(&chunk(23, 3)).unwrap();
        assert_eq!(
            ends(&buf.plan_fresh_batch(4, WINDOW, "plant-a").unwrap().unwrap()),
            (23, 25, 3, 11)
        );
        buf.complete_batch(&main).unwrap();
        let main = buf.cut_batch(10, "plant-a").unwrap().unwrap();
        assert_eq!((main.first_seq, main.last_seq), (21, 25));
        buf.complete_batch(&main).unwrap();

        // The main lane completed through 22: the run is behind it, and the next fresh batch
        // jumps to what arrived within the window, above the main lane's cut mark.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(buf.plan_fresh_batch(4, WINDOW, "plant-a").unwrap(), None);
        buf.append(&chunk(26, 5)).unwrap();
        let jump = buf.plan_fresh_batch(4, WINDOW, "plant-a").unwrap().unwrap();
        assert_eq!(ends(&jump), (26, 29, 4, 26));
        assert!(jump.starts_run());
        // Never into the main lane's pending batch, fresh as its readings are.
        let main = buf.cut_batch(3, "plant-a").unwrap().unwrap();
        assert_eq!((main.first_seq, main.last_seq), (26, 28));
        let jump = buf.plan_fresh_batch(4, WINDOW, "plant-a").unwrap().unwrap();
        assert_eq!(ends(&jump), (29, 30, 2, 29));
        buf.fresh_uploaded(&jump).unwrap();
        assert_eq!(
            buf.fresh_run().unwrap(),
            Some(FreshRun {
                first_seq: 29,
                last_seq: 30
            })
        );
        // The run survives a restart.
        drop(buf);
        assert_eq!(
            open(dir.path()).fresh_run().unwrap(),
            Some(FreshRun {
                first_seq: 29,
                last_seq: 30
            })
        );
    }

    #[test]
    fn a_new_fresh_run_starts_at_the_first_reading_read_within_max_age_inside_one_commit_mark() {
        let dir = tempfile::tempdir().unwrap();
        let buf = open(dir.path());
        // A PLC polled through an outage: every reading stamped with the time it was read, all
        // of them committed within one commit mark.
        let stamped = |from: i64, n: i64, ts_us: i64| -> Vec<Reading> {
            (from..from + n)
                .map(|i| Reading {
                    ts_us,
                    ..reading(i)
                })
                .collect()
        };
        let now = now_us();
        buf.append(&stamped(1, 100, now - 20_000_000)).unwrap();
        buf.append(&stamped(101, 10, now)).unwrap();
        let batch = buf
            .plan_fresh_batch(50, Duration::from_secs(5), "plant-a")
            .unwrap()
            .unwrap();
        assert_eq!(
            ends(&batch),
            (101, 110, 10, 101),
            "the run copies the readings of the last 5 s, not the whole mark"
        );
    }

    #[test]
    fn fresh_lane_copies_leave_rows_pending_batch_gaps_and_marks_alone() {
        let dir = tempfile::tempdir().unwrap();
        let buf = fine_marks(dir.path());
        buf.append(&chunk(1, 10)).unwrap();
        let main = buf.cut_batch(4, "plant-a").unwrap().unwrap();
        let marks = buf.lock().marks;
        let fresh = buf
            .plan_fresh_batch(3, Duration::from_secs(5), "plant-a")
            .unwrap()
            .unwrap();
        assert_eq!(ends(&fresh), (5, 7, 3, 5));
        let rows = buf.fresh_rows_after(&fresh, 4, usize::MAX).unwrap();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [5, 6, 7]);
        assert_eq!(rows, buf.rows_after(7, "plant-a", 4, usize::MAX).unwrap());
        buf.fresh_uploaded(&fresh).unwrap();
        assert_eq!(buf.stats().unwrap().rows, 10);
        assert_eq!(buf.pending_batch().unwrap(), Some(main));
        assert_eq!(buf.lock().marks, marks);
    }

    #[test]
    fn a_backlog_is_more_than_one_batch_outside_the_pending_one_or_an_old_reading() {
        let dir = tempfile::tempdir().unwrap();
        let buf = fine_marks(dir.path());
        let age = Duration::from_millis(100);
        assert!(!buf.has_backlog(4, age).unwrap(), "empty");
        buf.append(&chunk(1, 8)).unwrap();
        assert!(buf.has_backlog(4, age).unwrap(), "8 waiting, batches of 4");
        buf.cut_batch(4, "plant-a").unwrap().unwrap();
        assert!(
            !buf.has_backlog(4, age).unwrap(),
            "4 outside the pending batch fit one batch"
        );
        buf.append(&chunk(9, 1)).unwrap();
        assert!(
            buf.has_backlog(4, age).unwrap(),
            "5 outside the pending batch"
        );
        let dir = tempfile::tempdir().unwrap();
        let buf = fine_marks(dir.path());
        buf.append(&chunk(1, 2)).unwrap();
        assert!(!buf.has_backlog(4, age).unwrap());
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            buf.has_backlog(4, age).unwrap(),
            "the oldest reading waited more than twice max_age"
        );
    }
}
