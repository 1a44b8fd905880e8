//! How far each dropped file has been read, kept in the buffer database so it commits together
//! with the readings.
//!
//! # Invariants
//! - A file is known by its source, name, size and modification time (nanoseconds). A row in
//!   `file_drop_files` says the rows of that file before `next_line` are in the buffer, and
//!   `done = 1` that the whole file is and only the move to `done/` or `failed/` may be missing.
//! - `next_line` advances in the *same transaction* as the readings it covers: before a chunk of
//!   readings is handed to the buffer writer, a mark naming the chunk's last reading and the
//!   line after it is committed to `file_drop_marks`; the `file_drop_progress` trigger, run by
//!   the writer's insert of that reading, moves `next_line` and deletes the mark. So a crash at
//!   any instant leaves `next_line` exactly at the end of what the buffer holds, and a restart
//!   neither skips nor repeats a row. (The writer never splits one delivery over two
//!   transactions, so the whole chunk commits with its mark.)
//! - Rows of finished files are deleted a week after they finished; by then the file has long
//!   been moved out of the folder.
//! - The tables live in the buffer file: a damaged buffer moved aside by recovery takes them
//!   with it, and files not yet finished are then read again from their first line.

use std::path::Path;

use rusqlite::{Connection, params};

use crate::Reading;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS file_drop_files (
    id         INTEGER PRIMARY KEY,
    source     TEXT NOT NULL,
    name       TEXT NOT NULL,
    size       INTEGER NOT NULL,
    mtime_ns   INTEGER NOT NULL,
    next_line  INTEGER NOT NULL DEFAULT 1,
    done       INTEGER NOT NULL DEFAULT 0,
    updated_us INTEGER NOT NULL,
    UNIQUE (source, name, size, mtime_ns)
) STRICT;
CREATE TABLE IF NOT EXISTS file_drop_marks (
    file_id   INTEGER NOT NULL,
    next_line INTEGER NOT NULL,
    ts_us     INTEGER NOT NULL,
    device    TEXT NOT NULL,
    tag       TEXT NOT NULL,
    value     REAL
) STRICT;
CREATE INDEX IF NOT EXISTS file_drop_marks_reading ON file_drop_marks (ts_us, device, tag);
CREATE TRIGGER IF NOT EXISTS file_drop_progress AFTER INSERT ON readings
WHEN EXISTS (SELECT 1 FROM file_drop_marks m
             WHERE m.ts_us = NEW.ts_us AND m.device = NEW.device AND m.tag = NEW.tag
               AND m.value IS NEW.value)
BEGIN
    UPDATE file_drop_files
       SET next_line = (SELECT max(m.next_line) FROM file_drop_marks m
                         WHERE m.file_id = file_drop_files.id
                           AND m.ts_us = NEW.ts_us AND m.device = NEW.device
                           AND m.tag = NEW.tag AND m.value IS NEW.value)
     WHERE id IN (SELECT m.file_id FROM file_drop_marks m
                   WHERE m.ts_us = NEW.ts_us AND m.device = NEW.device
                     AND m.tag = NEW.tag AND m.value IS NEW.value);
    DELETE FROM file_drop_marks
     WHERE ts_us = NEW.ts_us AND device = NEW.device AND tag = NEW.tag AND value IS NEW.value;
END;
";

/// How long the record of a finished file is kept.
const KEEP_FINISHED_US: i64 = 7 * 24 * 3600 * 1_000_000;

/// A file's identity and progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Progress {
    pub(super) id: i64,
    /// The first line not yet in the buffer.
    pub(super) next_line: usize,
    pub(super) done: bool,
}

/// The progress tables of one source, on its own connection to the buffer database.
pub(super) struct State {
    conn: Connection,
    source: String,
}

impl State {
    /// Opens the buffer database (the agent created it before starting the sources) and adds
    /// the progress tables and trigger if they are missing.
    pub(super) fn open(buffer: &Path, source: &str) -> rusqlite::Result<Self> {
        let conn = Connection::open(buffer)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        conn.execute(
            "DELETE FROM file_drop_files WHERE source = ?1 AND done = 1 AND updated_us < ?2",
            params![source, now_us() - KEEP_FINISHED_US],
        )?;
        Ok(Self {
            conn,
            source: source.to_owned(),
        })
    }

    /// The progress of a file, recorded as new (nothing read) when it is not known yet. Marks
    /// left over from a chunk that never committed are dropped.
    pub(super) fn progress(
        &self,
        name: &str,
        size: u64,
        mtime_ns: i64,
    ) -> rusqlite::Result<Progress> {
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        self.conn.execute(
            "INSERT OR IGNORE INTO file_drop_files (source, name, size, mtime_ns, updated_us)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![self.source, name, size, mtime_ns, now_us()],
        )?;
        let (id, next_line, done): (i64, i64, i64) = self.conn.query_row(
            "SELECT id, next_line, done FROM file_drop_files
              WHERE source = ?1 AND name = ?2 AND size = ?3 AND mtime_ns = ?4",
            params![self.source, name, size, mtime_ns],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        self.conn
            .execute("DELETE FROM file_drop_marks WHERE file_id = ?1", [id])?;
        Ok(Progress {
            id,
            next_line: usize::try_from(next_line).unwrap_or(1),
            done: done != 0,
        })
    }

    /// Commits the mark that moves the file's `next_line` when `last` is inserted.
    pub(super) fn mark(&self, file: i64, next_line: usize, last: &Reading) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT INTO file_drop_marks (file_id, next_line, ts_us, device, tag, value)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                file,
                i64::try_from(next_line).unwrap_or(i64::MAX),
                last.ts_us,
                last.device,
                last.tag,
                last.value
            ],
        )?;
        Ok(())
    }

    /// Records that every reading of the file is in the buffer.
    pub(super) fn finish(&self, file: i64) -> rusqlite::Result<()> {
        self.conn.execute(
            "UPDATE file_drop_files SET done = 1, updated_us = ?2 WHERE id = ?1",
            params![file, now_us()],
        )?;
        self.conn
            .execute("DELETE FROM file_drop_marks WHERE file_id = ?1", [file])?;
        Ok(())
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
