//! The dead-letter table: messages whose payload could not (or not wholly) be mapped to readings,
//! kept in the buffer file so an operator can see what a sensor really sent and why it was
//! refused (`edge-agent buffer` shows the last few).
//!
//! # What always holds
//! - A dead letter is committed before the message it describes is acknowledged to the broker:
//!   the MQTT source waits for [`DeadLetterStore::record`] to return before it sends the PUBACK.
//!   So a `kill -9` at any instant either leaves the row, or leaves the message with the broker,
//!   which sends it again. A kill between the commit and the acknowledgement records the message
//!   twice (at least once, as for readings).
//! - Each broker keeps at most its `max_dead_letters` rows. A commit that goes past the bound
//!   deletes that broker's oldest rows *in the same transaction* and adds their number to
//!   `dead_letter_drops`, so the table never grows without bound and what was dropped stays
//!   counted across restarts.
//! - Only the first [`PAYLOAD_BYTES`] bytes of a payload are kept, with the payload's full length.
//! - The tables live in the buffer file on their own connection. They are never uploaded, and
//!   the salvage of a damaged buffer does not carry them over (they are diagnostics, not data).
//!   Their pages count toward `buffer.max_bytes` like any other: at most about
//!   `max_dead_letters` × 400 bytes per broker. Rows of a broker that was renamed or removed
//!   stay until they are deleted by hand.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::sqlite::BufferError;
use super::utc::format_micros;

/// How many bytes of a bad payload are kept: enough for a JSON document of a few fields, so the
/// reason can be seen, while 1000 dead letters stay under half a megabyte.
pub const PAYLOAD_BYTES: usize = 256;

/// How many dead letters a broker keeps when its config does not say (`max_dead_letters`).
pub const DEFAULT_MAX_DEAD_LETTERS: u32 = 1000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dead_letters (
    id           INTEGER PRIMARY KEY,
    received_us  INTEGER NOT NULL,
    broker       TEXT NOT NULL,
    subscription TEXT NOT NULL,
    topic        TEXT NOT NULL,
    reason       TEXT NOT NULL,
    detail       TEXT NOT NULL,
    payload_len  INTEGER NOT NULL,
    payload      BLOB NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS dead_letters_by_broker ON dead_letters (broker, id);
CREATE TABLE IF NOT EXISTS dead_letter_drops (
    broker  TEXT PRIMARY KEY,
    dropped INTEGER NOT NULL
) STRICT;
";

/// One message that gave no reading, or not all of its readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// When the message arrived at the agent, microseconds since the Unix epoch.
    pub received_us: i64,
    /// The broker's name in the config.
    pub broker: String,
    /// The topic filter of the subscription that received it.
    pub subscription: String,
    /// The message's topic.
    pub topic: String,
    /// Short, fixed code of the first problem (`not_json`, `missing_field`, ...), as the
    /// `reason` label of `plantline_mqtt_bad_payloads_total`.
    pub reason: String,
    /// Every problem of the message in words, `; ` between them.
    pub detail: String,
    /// The payload's full length in bytes.
    pub payload_len: u64,
    /// The first [`PAYLOAD_BYTES`] bytes of the payload.
    pub payload: Vec<u8>,
}

impl DeadLetter {
    /// A dead letter keeping the first [`PAYLOAD_BYTES`] of `payload`.
    pub fn new(
        received_us: i64,
        broker: &str,
        subscription: &str,
        topic: &str,
        reason: &str,
        detail: String,
        payload: &[u8],
    ) -> Self {
        Self {
            received_us,
            broker: broker.to_owned(),
            subscription: subscription.to_owned(),
            topic: topic.to_owned(),
            reason: reason.to_owned(),
            detail,
            payload_len: u64::try_from(payload.len()).unwrap_or(u64::MAX),
            payload: payload[..payload.len().min(PAYLOAD_BYTES)].to_vec(),
        }
    }
}

/// The dead-letter tables on their own connection to the buffer file (the writer side).
pub struct DeadLetterStore {
    path: PathBuf,
    conn: Connection,
}

impl DeadLetterStore {
    /// Opens the buffer file at `buffer` (the agent created it before the sources started) and
    /// adds the dead-letter tables if they are missing.
    pub fn open(buffer: &Path) -> Result<Self, BufferError> {
        let err = |source| BufferError::Sqlite {
            path: buffer.to_owned(),
            source,
        };
        let conn = Connection::open_with_flags(
            buffer,
            // Never create the file: a missing buffer here means a wrong path, not a first start.
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        // A dead letter is written only when a message is refused; fsyncing each commit costs
        // little and is what lets the acknowledgement follow it.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Self {
            path: buffer.to_owned(),
            conn,
        })
    }

    /// Commits `letters` in one transaction, then deletes the oldest rows of each of their
    /// brokers beyond `keep` (at least 1) in the same transaction. Returns how many rows the
    /// bound dropped.
    pub fn record(&mut self, letters: &[DeadLetter], keep: u32) -> Result<u64, BufferError> {
        let path = self.path.clone();
        let err = |source| BufferError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let mut brokers: Vec<&str> = Vec::new();
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO dead_letters
                       (received_us, broker, subscription, topic, reason, detail, payload_len, payload)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(err)?;
            for letter in letters {
                insert
                    .execute(params![
                        letter.received_us,
                        letter.broker,
                        letter.subscription,
                        letter.topic,
                        letter.reason,
                        letter.detail,
                        i64::try_from(letter.payload_len).unwrap_or(i64::MAX),
                        letter.payload,
                    ])
                    .map_err(err)?;
                if !brokers.contains(&letter.broker.as_str()) {
                    brokers.push(&letter.broker);
                }
            }
        }
        let mut dropped_total = 0;
        for broker in brokers {
            // Rows are numbered in commit order, so the oldest are those below the `keep`-th
            // newest.
            let dropped = tx
                .execute(
                    "DELETE FROM dead_letters WHERE broker = ?1 AND id <= (
                         SELECT id FROM dead_letters WHERE broker = ?1
                          ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                    params![broker, i64::from(keep.max(1))],
                )
                .map_err(err)?;
            if dropped > 0 {
                let dropped = u64::try_from(dropped).unwrap_or(u64::MAX);
                tx.execute(
                    "INSERT INTO dead_letter_drops (broker, dropped) VALUES (?1, ?2)
                     ON CONFLICT (broker) DO UPDATE SET dropped = dropped + excluded.dropped",
                    params![broker, i64::try_from(dropped).unwrap_or(i64::MAX)],
                )
                .map_err(err)?;
                dropped_total += dropped;
            }
        }
        tx.commit().map_err(err)?;
        Ok(dropped_total)
    }
}

/// A dead letter as stored, with its row number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDeadLetter {
    /// Row number; later dead letters have higher numbers.
    pub id: i64,
    pub letter: DeadLetter,
}

/// What the dead-letter table holds, as `edge-agent buffer` prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterReport {
    /// Whether the buffer has the table at all: it is made when an MQTT source first starts,
    /// and a buffer without it has nothing to show (`edge-agent buffer` leaves the section out).
    pub present: bool,
    /// Dead letters kept, all brokers.
    pub kept: u64,
    /// Dead letters the bound has dropped so far, all brokers.
    pub dropped: u64,
    /// The latest dead letters, oldest first.
    pub recent: Vec<StoredDeadLetter>,
}

/// Reads the dead-letter table of the buffer at `path` without changing anything (read-only,
/// safe while the agent runs). A buffer without the table (no MQTT source ever ran on it) has
/// none.
pub fn inspect(path: &Path, recent: usize) -> Result<DeadLetterReport, BufferError> {
    if !path.exists() {
        return Err(BufferError::Missing {
            path: path.to_owned(),
        });
    }
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
    let tx = conn.transaction().map_err(err)?;
    let report = read_report(&tx, recent).map_err(err)?;
    drop(tx);
    Ok(report)
}

/// The report, read on `conn` (inside the caller's read transaction).
pub(crate) fn read_report(conn: &Connection, recent: usize) -> rusqlite::Result<DeadLetterReport> {
    let exists = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dead_letters'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if !exists {
        return Ok(DeadLetterReport::default());
    }
    let kept: i64 = conn.query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))?;
    let dropped: i64 = conn.query_row(
        "SELECT coalesce(sum(dropped), 0) FROM dead_letter_drops",
        [],
        |r| r.get(0),
    )?;
    let mut stmt = conn.prepare(
        "SELECT id, received_us, broker, subscription, topic, reason, detail, payload_len, payload
           FROM dead_letters ORDER BY id DESC LIMIT ?1",
    )?;
    let mut rows = stmt
        .query_map([i64::try_from(recent).unwrap_or(i64::MAX)], |r| {
            Ok(StoredDeadLetter {
                id: r.get(0)?,
                letter: DeadLetter {
                    received_us: r.get(1)?,
                    broker: r.get(2)?,
                    subscription: r.get(3)?,
                    topic: r.get(4)?,
                    reason: r.get(5)?,
                    detail: r.get(6)?,
                    payload_len: u64::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
                    payload: r.get(8)?,
                },
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.reverse();
    Ok(DeadLetterReport {
        present: true,
        kept: u64::try_from(kept).unwrap_or(0),
        dropped: u64::try_from(dropped).unwrap_or(0),
        recent: rows,
    })
}

impl fmt::Display for DeadLetterReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.present {
            return Ok(());
        }
        writeln!(
            f,
            "dead letters    {} kept, {} dropped by max_dead_letters",
            self.kept, self.dropped
        )?;
        if self.recent.is_empty() {
            return Ok(());
        }
        writeln!(f, "latest dead letters, oldest first:")?;
        for stored in &self.recent {
            let l = &stored.letter;
            writeln!(
                f,
                "  {}  broker {}  subscription {}",
                format_micros(l.received_us),
                l.broker,
                l.subscription
            )?;
            writeln!(f, "    topic    {}", l.topic)?;
            writeln!(f, "    reason   {}: {}", l.reason, l.detail)?;
            writeln!(
                f,
                "    payload  {}",
                shown_payload(&l.payload, l.payload_len)
            )?;
        }
        Ok(())
    }
}

/// `12 bytes: {"v": "hot"}`, or `300 bytes, first 256: ...` when cut; bytes as escaped text.
pub fn shown_payload(head: &[u8], full_len: u64) -> String {
    if u64::try_from(head.len()).unwrap_or(u64::MAX) < full_len {
        format!("{full_len} bytes, first {}: {}", head.len(), escaped(head))
    } else {
        format!("{full_len} bytes: {}", escaped(head))
    }
}

/// Bytes as one line of text: valid UTF-8 stays as it is, except that a backslash becomes `\\`
/// and control characters become `\n`, `\r`, `\t` or `\u{..}`; bytes that are not UTF-8 become
/// `\xNN`. So a binary or multi-line payload cannot break the output's layout.
pub fn escaped(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => {
                    let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Buffer;
    use crate::config::Durability;

    fn letter(broker: &str, n: u8) -> DeadLetter {
        DeadLetter::new(
            1_700_000_000_000_000 + i64::from(n),
            broker,
            "meters/+/kwh",
            "meters/m-1/kwh",
            "not_a_number",
            format!("topic `meters/m-1/kwh`: payload `x{n}` is not a number"),
            format!("x{n}").as_bytes(),
        )
    }

    fn buffer(dir: &Path) -> PathBuf {
        let path = dir.join("b.db");
        drop(Buffer::open(&path, Durability::Full, "gw-1").unwrap());
        path
    }

    #[test]
    fn the_bound_drops_the_oldest_of_each_broker_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = buffer(dir.path());
        let mut store = DeadLetterStore::open(&path).unwrap();
        assert_eq!(
            store
                .record(&[letter("a", 1), letter("a", 2), letter("b", 1)], 3)
                .unwrap(),
            0
        );
        assert_eq!(
            store
                .record(&[letter("a", 3), letter("a", 4), letter("a", 5)], 3)
                .unwrap(),
            2
        );
        drop(store);

        let report = inspect(&path, 10).unwrap();
        assert_eq!((report.kept, report.dropped), (4, 2));
        let kept: Vec<(&str, &[u8])> = report
            .recent
            .iter()
            .map(|s| (s.letter.broker.as_str(), s.letter.payload.as_slice()))
            .collect();
        assert_eq!(
            kept,
            vec![
                ("b", b"x1".as_slice()),
                ("a", b"x3"),
                ("a", b"x4"),
                ("a", b"x5")
            ]
        );

        // The count of what was dropped survives a reopen.
        let mut store = DeadLetterStore::open(&path).unwrap();
        assert_eq!(store.record(&[letter("a", 6)], 3).unwrap(), 1);
        assert_eq!(inspect(&path, 2).unwrap().dropped, 3);
        assert_eq!(inspect(&path, 2).unwrap().recent.len(), 2);
    }

    #[test]
    fn only_the_first_bytes_are_kept_with_the_full_length() {
        let long = vec![b'7'; 1000];
        let l = DeadLetter::new(0, "b", "s", "t", "r", String::new(), &long);
        assert_eq!((l.payload.len(), l.payload_len), (PAYLOAD_BYTES, 1000));
        assert_eq!(
            shown_payload(b"abc", 1000),
            "1000 bytes, first 3: abc".to_owned()
        );
        assert_eq!(shown_payload(b"abc", 3), "3 bytes: abc".to_owned());
    }

    #[test]
    fn bytes_are_shown_as_one_line_of_escaped_text() {
        assert_eq!(
            escaped(b"{\"t\": 21.5}\r\n\tok\\ \xff\xfe \x01 \xc3\xa9"),
            "{\"t\": 21.5}\\r\\n\\tok\\\\ \\xFF\\xFE \\u{1} \u{e9}"
        );
    }

    #[test]
    fn a_buffer_without_the_table_has_no_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let path = buffer(dir.path());
        let none = inspect(&path, 5).unwrap();
        assert_eq!(none, DeadLetterReport::default());
        assert_eq!(none.to_string(), "", "no section without the table");
        DeadLetterStore::open(&path).unwrap();
        assert_eq!(
            inspect(&path, 5).unwrap().to_string(),
            "dead letters    0 kept, 0 dropped by max_dead_letters\n"
        );
        assert!(matches!(
            inspect(&dir.path().join("none.db"), 5),
            Err(BufferError::Missing { .. })
        ));
    }

    #[test]
    fn the_report_lists_the_latest_letters_oldest_first() {
        let report = DeadLetterReport {
            present: true,
            kept: 1,
            dropped: 0,
            recent: vec![StoredDeadLetter {
                id: 1,
                letter: DeadLetter::new(
                    1_700_000_000_000_000,
                    "line3-broker",
                    "plant/+/+/telemetry",
                    "plant/press-3/oil/telemetry",
                    "not_json",
                    "topic `plant/press-3/oil/telemetry`: payload is not JSON: EOF".to_owned(),
                    b"{oops\n",
                ),
            }],
        };
        assert_eq!(
            report.to_string(),
            "dead letters    1 kept, 0 dropped by max_dead_letters
latest dead letters, oldest first:
  2023-11-14T22:13:20.000000Z  broker line3-broker  subscription plant/+/+/telemetry
    topic    plant/press-3/oil/telemetry
    reason   not_json: topic `plant/press-3/oil/telemetry`: payload is not JSON: EOF
    payload  6 bytes: {oops\\n
"
        );
    }
}
