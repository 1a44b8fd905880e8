use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

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
}

/// What the buffer holds right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BufferStats {
    /// Readings waiting to be uploaded, including those of a pending batch.
    pub rows: u64,
    pub first_seq: Option<i64>,
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
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
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

impl Buffer {
    /// Opens (or creates) the buffer for `gateway`.
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
        let conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;

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
        Ok(Self {
            path: path.to_owned(),
            gateway: gateway.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent (the open transaction
        // rolls back when its guard drops), so a poisoned lock is safe to keep using.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
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
        Ok(first.map(|f| (f, last)))
    }

    pub fn stats(&self) -> Result<BufferStats, BufferError> {
        let conn = self.conn();
        conn.query_row(
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
        read_pending(&self.conn()).map_err(|e| self.err(e))
    }

    /// Cuts the next batch: the oldest `max_rows` readings, recorded as pending. Returns the
    /// already pending batch instead if there is one, and `None` when the buffer is empty.
    pub fn cut_batch(
        &self,
        max_rows: usize,
        site: &str,
    ) -> Result<Option<PendingBatch>, BufferError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let existing = read_pending(&tx).map_err(|e| self.err(e))?;
        if existing.is_some() {
            return Ok(existing);
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
        Ok(Some(PendingBatch {
            first_seq,
            last_seq,
            site: site.to_owned(),
        }))
    }

    /// The rows of a batch in `seq` order, as they go into the Parquet file.
    pub fn batch_rows(&self, batch: &PendingBatch) -> Result<Vec<Row>, BufferError> {
        let conn = self.conn();
        let mut stmt = conn
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
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM readings WHERE seq <= ?1", [batch.last_seq])
            .map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM pending_batch WHERE id = 1", [])
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }
}

fn read_pending(conn: &Connection) -> rusqlite::Result<Option<PendingBatch>> {
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
