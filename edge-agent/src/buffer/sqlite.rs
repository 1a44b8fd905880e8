use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tracing::warn;

use super::high_water::{self, HighWater, RESERVE_BLOCK};
use super::recovery::{self, RecoveryReport};
use crate::Reading;
use crate::config::Durability;
use crate::contract::{Quality, Row};

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

/// A batch that has been cut but not yet confirmed by the upload target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingBatch {
    pub first_seq: i64,
    pub last_seq: i64,
    /// The site name at the time the batch was cut, so a retry writes identical bytes.
    pub site: String,
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
}

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
";

/// Opens (or creates) the database with the buffer's settings and schema.
pub(crate) fn open_connection(path: &Path, durability: Durability) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)?;
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
        }
        Ok(Self {
            path: path.to_owned(),
            gateway: gateway.to_owned(),
            inner: Mutex::new(Inner {
                conn,
                marks: marks.unwrap_or_default(),
                last_seq,
            }),
            recovery,
        })
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
                    "INSERT INTO readings (ts_us, device, tag, value, quality, unit)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(|e| self.err(e))?;
            for r in readings {
                stmt.execute(params![
                    r.ts_us,
                    r.device,
                    r.tag,
                    r.value,
                    r.quality.as_str(),
                    r.unit
                ])
                .map_err(|e| self.err(e))?;
                last = tx.last_insert_rowid();
                first.get_or_insert(last);
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        inner.last_seq = inner.last_seq.max(last);
        Ok(first.map(|f| (f, last)))
    }

    pub fn stats(&self) -> Result<BufferStats, BufferError> {
        let inner = self.lock();
        inner
            .conn
            .query_row(
                "SELECT count(*), min(seq), max(seq) FROM readings",
                [],
                |r| {
                    Ok(BufferStats {
                        rows: r.get::<_, i64>(0)?.try_into().unwrap_or(0),
                        first_seq: r.get(1)?,
                        last_seq: r.get(2)?,
                    })
                },
            )
            .map_err(|e| self.err(e))
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
        let inner = self.lock();
        let mut stmt = inner
            .conn
            .prepare_cached(
                "SELECT seq, ts_us, device, tag, value, quality, unit FROM readings
                 WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq",
            )
            .map_err(|e| self.err(e))?;
        let raw = stmt
            .query_map([batch.first_seq, batch.last_seq], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<f64>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut rows = Vec::new();
        for item in raw {
            let (seq, ts_us, device, tag, value, quality_name, unit) =
                item.map_err(|e| self.err(e))?;
            let quality = Quality::parse(&quality_name).ok_or_else(|| BufferError::CorruptRow {
                path: self.path.clone(),
                seq,
                quality: quality_name.clone(),
            })?;
            rows.push(Row {
                seq,
                ts_us,
                site: batch.site.clone(),
                gateway: self.gateway.clone(),
                device,
                tag,
                value,
                quality,
                unit,
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
        tx.execute("DELETE FROM readings WHERE seq <= ?1", [batch.last_seq])
            .map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM pending_batch WHERE id = 1", [])
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }
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

    #[test]
    fn empty_buffer_cuts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let buf = open(dir.path());
        assert_eq!(buf.cut_batch(10, "s").unwrap(), None);
        assert_eq!(buf.append(&[]).unwrap(), None);
    }
}
