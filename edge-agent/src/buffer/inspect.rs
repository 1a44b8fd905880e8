//! A read-only look at a buffer file for `edge-agent buffer`: safe while the agent runs, because
//! it opens the database read-only as one more WAL reader and never checkpoints or writes.

use std::fmt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::sqlite::{BufferError, PendingBatch, read_pending};

/// What a buffer file holds, as `edge-agent buffer` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Size of the database file in bytes.
    pub file_bytes: u64,
    /// Size of its write-ahead log in bytes (commits not yet checkpointed into the file).
    pub wal_bytes: u64,
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
        file_bytes,
        wal_bytes,
    })
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
        writeln!(
            f,
            "file size       {} bytes + {} bytes write-ahead log",
            self.file_bytes, self.wal_bytes
        )
    }
}
