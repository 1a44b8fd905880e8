//! A damaged buffer at start-up: the agent moves it aside, salvages every readable row with its
//! seq, reports what it lost and carries on with seq above every earlier value. And the
//! read-only `edge-agent buffer` command.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use edge_agent::Reading;
use edge_agent::buffer::{Buffer, LostSeqs, PendingBatch, RecoveryReport};
use edge_agent::config::Durability;
use edge_agent::contract::Quality;

const TS0: i64 = 1_700_000_000_000_000;
/// 3000 readings appended at once reserve seq up to 3000 + the block of 100 000.
const RESERVED: i64 = 103_000;

type StoredRow = (
    i64,
    i64,
    String,
    String,
    Option<f64>,
    String,
    Option<String>,
);

fn reading(i: i64) -> Reading {
    Reading {
        ts_us: TS0 + i * 1000,
        device: "press-3".into(),
        tag: format!("hydraulic_oil_temp_{i:05}"),
        value: if i % 7 == 0 {
            None
        } else {
            Some(i as f64 * 0.5)
        },
        value_text: None,
        quality: if i % 7 == 0 {
            Quality::Bad
        } else {
            Quality::Good
        },
        unit: Some("degC".into()),
    }
}

fn stored(i: i64) -> StoredRow {
    let r = reading(i);
    (
        i,
        r.ts_us,
        r.device,
        r.tag,
        r.value,
        r.quality.as_str().to_owned(),
        r.unit,
    )
}

fn rows_in(db: &Path) -> Vec<StoredRow> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT seq, ts_us, device, tag, value, quality, unit FROM readings ORDER BY seq")
        .unwrap();
    stmt.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// A buffer the way a running agent leaves it: seq 1..=500 shipped, 501..=1000 cut as the
/// pending batch, 1001..=3000 waiting. Closed cleanly, so everything is in the main file.
fn shipped_some(dir: &Path) -> PathBuf {
    let db = dir.join("buffer.db");
    let buffer = Buffer::open(&db, Durability::Full, "gw-1").unwrap();
    assert_eq!(
        buffer
            .append(&(1..=3000).map(reading).collect::<Vec<_>>())
            .unwrap(),
        Some((1, 3000))
    );
    let first = buffer.cut_batch(500, "plant-a").unwrap().unwrap();
    buffer.complete_batch(&first).unwrap();
    let pending = buffer.cut_batch(500, "plant-a").unwrap().unwrap();
    assert_eq!((pending.first_seq, pending.last_seq), (501, 1000));
    drop(buffer);
    assert!(!dir.join("buffer.db-wal").exists());
    db
}

fn expand(lost: &[LostSeqs]) -> BTreeSet<i64> {
    lost.iter()
        .flat_map(|l| l.first.unwrap()..=l.last.unwrap())
        .collect()
}

/// Checks what every salvage must guarantee, and returns the report.
fn assert_salvaged(dir: &Path, db: &Path, damaged_bytes: &[u8]) -> RecoveryReport {
    let buffer = Buffer::open(db, Durability::Full, "gw-1").unwrap();
    let report = buffer.recovery().expect("the damage is found").clone();

    // The damaged file is kept, byte for byte, under a dated name.
    let name = report
        .damaged_file
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(report.damaged_file.parent(), Some(dir));
    let stamp = name.strip_prefix("buffer.db.damaged-").unwrap();
    assert!(
        stamp.len() == 16
            && stamp.as_bytes()[8] == b'T'
            && stamp.ends_with('Z')
            && stamp[..8]
                .bytes()
                .chain(stamp[9..15].bytes())
                .all(|b| b.is_ascii_digit()),
        "{name}"
    );
    assert_eq!(std::fs::read(&report.damaged_file).unwrap(), damaged_bytes);

    // Every salvaged row is exactly the original, under its original seq.
    let rows = rows_in(db);
    assert!(!rows.is_empty(), "{report}");
    for row in &rows {
        assert_eq!(row, &stored(row.0));
    }
    let saved: BTreeSet<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(report.saved_rows, saved.len() as u64);
    assert_eq!(
        report.saved_seq,
        Some((*saved.first().unwrap(), *saved.last().unwrap()))
    );
    // Saved and lost together are exactly what was waiting, each seq once.
    let lost = expand(&report.lost);
    assert!(saved.is_disjoint(&lost), "{report}");
    assert_eq!(
        saved.union(&lost).copied().collect::<Vec<_>>(),
        (501..=3000).collect::<Vec<_>>(),
        "{report}"
    );
    // The pending batch keeps its range, starting at its first salvaged row.
    let pending_first = saved.range(501..=1000).next().copied();
    assert_eq!(
        report.pending_batch,
        pending_first.map(|first_seq| PendingBatch {
            first_seq,
            last_seq: 1000,
            site: "plant-a".into()
        })
    );
    assert_eq!(buffer.pending_batch().unwrap(), report.pending_batch);

    // seq never goes back: new readings come after every value handed out before.
    assert_eq!(report.next_seq, RESERVED + 1);
    assert_eq!(
        buffer.append(&[reading(1)]).unwrap(),
        Some((RESERVED + 1, RESERVED + 1))
    );
    drop(buffer);
    // The fresh buffer is healthy: the next start finds nothing to recover.
    let again = Buffer::open(db, Durability::Full, "gw-1").unwrap();
    assert_eq!(again.recovery(), None);
    assert_eq!(again.stats().unwrap().rows, report.saved_rows + 1);
    report
}

#[test]
fn a_buffer_truncated_in_the_middle_keeps_its_first_half_and_reports_the_lost_tail() {
    let dir = tempfile::tempdir().unwrap();
    let db = shipped_some(dir.path());
    let len = std::fs::metadata(&db).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    file.set_len(len / 2).unwrap();
    drop(file);
    let damaged = std::fs::read(&db).unwrap();

    let report = assert_salvaged(dir.path(), &db, &damaged);
    // What is lost is the tail running to the last seq handed out, and one leaf page of rows
    // just before the last salvaged ones, which SQLite placed in the cut-off half when an
    // interior page split (the layout is fixed by the bundled SQLite and the row size; the
    // 1-byte `value_text` column of contract v2 moved the split here).
    let (_, last_saved) = report.saved_seq.unwrap();
    assert_eq!(
        report.lost,
        [
            LostSeqs {
                first: Some(1247),
                last: Some(1279)
            },
            LostSeqs {
                first: Some(last_saved + 1),
                last: Some(3000)
            }
        ],
        "{report}"
    );
    assert_eq!(report.saved_seq, Some((501, 1308)), "{report}");
}

#[test]
fn random_bytes_over_pages_lose_only_the_rows_on_those_pages() {
    let dir = tempfile::tempdir().unwrap();
    let db = shipped_some(dir.path());
    let mut bytes = std::fs::read(&db).unwrap();
    let page = 4096;
    let pages = bytes.len() / page;
    // xorshift64 with a fixed seed: the same pages and bytes on every run.
    let mut state: u64 = 0x5EED_2024_0BAD_F00D;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // Leaf pages only: the first pages hold the schema and the roots of the tables, and without
    // a root nothing below it can be found (see the README's limits).
    let mut hit = BTreeSet::new();
    while hit.len() < 3 {
        hit.insert(pages / 4 + usize::try_from(next() % (pages as u64 * 3 / 4 - 1)).unwrap());
    }
    for p in &hit {
        for b in &mut bytes[p * page..(p + 1) * page] {
            *b = next().to_le_bytes()[0];
        }
    }
    std::fs::write(&db, &bytes).unwrap();

    let report = assert_salvaged(dir.path(), &db, &bytes);
    // Three leaf pages, three holes (the layout is fixed by the bundled SQLite, the row size
    // and the seed: 63 rows a leaf since the `value_text` column of contract v2).
    let range = |a, b| LostSeqs {
        first: Some(a),
        last: Some(b),
    };
    assert_eq!(
        report.lost,
        [range(937, 999), range(1867, 1929), range(2487, 2549)],
        "{report}"
    );
    assert_eq!(report.saved_rows, 2311);
}

/// Overwrites page `page` of the file with bytes that are not a valid b-tree page.
fn garble_page(db: &Path, page: usize) {
    let mut bytes = std::fs::read(db).unwrap();
    for (i, b) in bytes[page * 4096..(page + 1) * 4096].iter_mut().enumerate() {
        *b = u8::try_from(i * 131 % 251).unwrap();
    }
    std::fs::write(db, &bytes).unwrap();
}

/// The buffer's tables as an agent before batch contract v2 created them: no `value_text`.
const PRE_V2_SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE readings (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_us   INTEGER NOT NULL,
    device  TEXT NOT NULL,
    tag     TEXT NOT NULL,
    value   REAL,
    quality TEXT NOT NULL,
    unit    TEXT
);
CREATE TABLE pending_batch (
    id INTEGER PRIMARY KEY CHECK (id = 1), first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL, site TEXT NOT NULL
) STRICT;
CREATE TABLE gaps (
    id INTEGER PRIMARY KEY AUTOINCREMENT, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    readings INTEGER NOT NULL, reason TEXT NOT NULL, detected_at_us INTEGER NOT NULL,
    batch_first_seq INTEGER
) STRICT;
CREATE TABLE arrivals (
    last_seq INTEGER PRIMARY KEY, first_at_us INTEGER NOT NULL, last_at_us INTEGER NOT NULL
) STRICT;
";

#[test]
fn a_damaged_buffer_of_an_agent_before_string_tags_is_salvaged_without_texts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("buffer.db");
    {
        let mut conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(PRE_V2_SCHEMA).unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('gateway', 'gw-1')",
            [],
        )
        .unwrap();
        for (seq, ts_us, device, tag, value, quality, unit) in (1..=3000).map(stored) {
            tx.execute(
                "INSERT INTO readings (seq, ts_us, device, tag, value, quality, unit)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                rusqlite::params![seq, ts_us, device, tag, value, quality, unit],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let pages = usize::try_from(std::fs::metadata(&db).unwrap().len() / 4096).unwrap();
    garble_page(&db, pages / 2);

    let buffer = Buffer::open(&db, Durability::Full, "gw-1").unwrap();
    let report = buffer
        .recovery()
        .expect("the garbled page is found")
        .clone();
    let lost = expand(&report.lost);
    assert!(!lost.is_empty() && lost.len() < 200, "{report}");
    assert_eq!(report.saved_rows + lost.len() as u64, 3000, "{report}");
    // Every salvaged row is as it was written, and reads without a text.
    let kept: Vec<StoredRow> = (1..=3000)
        .filter(|s| !lost.contains(s))
        .map(stored)
        .collect();
    assert_eq!(rows_in(&db), kept);
    let batch = buffer.cut_batch(5000, "plant-a").unwrap().unwrap();
    let rows = buffer.batch_rows(&batch).unwrap();
    assert_eq!(rows.len(), kept.len());
    assert!(rows.iter().all(|r| r.value_text.is_none()));
}

#[test]
fn string_texts_survive_a_salvage() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("buffer.db");
    let text_of = |i: i64| (i % 3 == 0).then(|| format!("RECIPE-{i:04}"));
    let readings: Vec<Reading> = (1..=3000)
        .map(|i| match text_of(i) {
            Some(text) => Reading {
                value: None,
                value_text: Some(text),
                quality: Quality::Good,
                unit: None,
                ..reading(i)
            },
            None => reading(i),
        })
        .collect();
    {
        let buffer = Buffer::open(&db, Durability::Full, "gw-1").unwrap();
        buffer.append(&readings).unwrap();
    }
    let pages = usize::try_from(std::fs::metadata(&db).unwrap().len() / 4096).unwrap();
    garble_page(&db, pages / 2);

    let buffer = Buffer::open(&db, Durability::Full, "gw-1").unwrap();
    let report = buffer
        .recovery()
        .expect("the garbled page is found")
        .clone();
    let lost = expand(&report.lost);
    assert!(!lost.is_empty(), "{report}");
    let batch = buffer.cut_batch(5000, "plant-a").unwrap().unwrap();
    let rows = buffer.batch_rows(&batch).unwrap();
    assert_eq!(rows.len() + lost.len(), 3000, "{report}");
    for row in &rows {
        let written = &readings[usize::try_from(row.seq - 1).unwrap()];
        assert_eq!(
            (row.value, row.value_text.as_ref()),
            (written.value, written.value_text.as_ref()),
            "seq {}",
            row.seq
        );
    }
    assert!(rows.iter().filter(|r| r.value_text.is_some()).count() > 900);
}

#[test]
fn a_file_that_is_not_sqlite_is_moved_aside_and_seq_continues_above_the_high_water_mark() {
    let dir = tempfile::tempdir().unwrap();
    let db = shipped_some(dir.path());
    let garbage = b"this is not a database\n".repeat(2000);
    std::fs::write(&db, &garbage).unwrap();

    let buffer = Buffer::open(&db, Durability::Full, "gw-1").unwrap();
    let report = buffer.recovery().unwrap().clone();
    assert_eq!(std::fs::read(&report.damaged_file).unwrap(), garbage);
    assert_eq!(report.saved_rows, 0);
    // Seq 1..=500 were confirmed by the upload target; from 501 on nothing could be read, and
    // the end is not knowable from the outside of the database.
    assert_eq!(
        report.to_string(),
        format!(
            "buffer {} was damaged (not an SQLite database); moved it to {} and started a fresh buffer; saved 0 readings, lost seq 501..=(end unknown); new readings continue at seq {}",
            db.display(),
            report.damaged_file.display(),
            RESERVED + 1
        )
    );
    assert_eq!(
        buffer.append(&[reading(1)]).unwrap(),
        Some((RESERVED + 1, RESERVED + 1))
    );
}

#[test]
fn a_foreign_file_without_any_history_starts_an_empty_buffer_at_seq_1() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("buffer.db");
    std::fs::write(&db, "site = \"plant\"\n").unwrap();
    let buffer = Buffer::open(&db, Durability::Full, "gw-1").unwrap();
    let report = buffer.recovery().unwrap();
    assert_eq!(
        report.to_string(),
        format!(
            "buffer {} was damaged (not an SQLite database); moved it to {} and started a fresh buffer; saved 0 readings, lost seq (range unknown); new readings continue at seq 1",
            db.display(),
            report.damaged_file.display(),
        )
    );
    assert_eq!(buffer.append(&[reading(1)]).unwrap(), Some((1, 1)));
}

#[test]
fn a_deleted_buffer_restarts_above_every_seq_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let db = shipped_some(dir.path());
    std::fs::remove_file(&db).unwrap();
    let buffer = Buffer::open(&db, Durability::Full, "gw-1").unwrap();
    assert_eq!(buffer.recovery(), None);
    assert_eq!(
        buffer.append(&[reading(1)]).unwrap(),
        Some((RESERVED + 1, RESERVED + 1))
    );
}

fn edge_agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edge-agent"))
}

fn write_config(dir: &Path, buffer: &str) -> PathBuf {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "site = \"plant-a\"\ngateway = \"gw-1\"\n\n[buffer]\npath = \"{buffer}\"\n\n[upload.dir]\npath = \"landing\"\n"
        ),
    )
    .unwrap();
    config
}

#[test]
fn buffer_command_shows_depth_seq_times_pending_batch_and_size_while_the_agent_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "buffer.db");
    let db = dir.path().join("buffer.db");
    // Stays open during the command, as in a running agent: the rows sit in the WAL.
    let buffer = Buffer::open(&db, Durability::Full, "gw-1").unwrap();
    buffer
        .append(&(1..=5).map(reading).collect::<Vec<_>>())
        .unwrap();
    buffer.cut_batch(3, "plant-a").unwrap().unwrap();

    let out = edge_agent()
        .args(["buffer", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file_bytes = std::fs::metadata(&db).unwrap().len();
    let wal_bytes = std::fs::metadata(dir.path().join("buffer.db-wal"))
        .unwrap()
        .len();
    assert!(wal_bytes > 0);
    let used = buffer.used_bytes().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "buffer          {}\n\
             gateway         gw-1\n\
             readings        5\n\
             seq             1..=5\n\
             oldest reading  2023-11-14T22:13:20.001000Z\n\
             newest reading  2023-11-14T22:13:20.005000Z\n\
             pending batch   seq 1..=3 (site plant-a)\n\
             fresh lane      none\n\
             file size       {file_bytes} bytes + {wal_bytes} bytes write-ahead log\n\
             in use          {used} bytes of max_bytes no bound\n\
             max age         no bound\n\
             when full       drop_oldest\n\
             dropped         buffer_full 0, max_age 0, damaged_buffer 0\n\
             unshipped gaps  none\n",
            db.display()
        )
    );
    // Read-only: the agent's next commit is unaffected.
    assert_eq!(buffer.append(&[reading(6)]).unwrap(), Some((6, 6)));
}

#[test]
fn buffer_command_on_an_empty_buffer_says_none() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "buffer.db");
    let db = dir.path().join("buffer.db");
    drop(Buffer::open(&db, Durability::Full, "gw-1").unwrap());
    let out = edge_agent()
        .args(["buffer", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let file_bytes = std::fs::metadata(&db).unwrap().len();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "buffer          {}\n\
             gateway         gw-1\n\
             readings        0\n\
             seq             none\n\
             oldest reading  none\n\
             newest reading  none\n\
             pending batch   none\n\
             fresh lane      none\n\
             file size       {file_bytes} bytes + 0 bytes write-ahead log\n\
             in use          {file_bytes} bytes of max_bytes no bound\n\
             max age         no bound\n\
             when full       drop_oldest\n\
             dropped         buffer_full 0, max_age 0, damaged_buffer 0\n\
             unshipped gaps  none\n",
            db.display()
        )
    );
}

#[test]
fn buffer_command_exits_1_for_a_missing_or_foreign_file_and_78_for_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "nothing-here.db");
    let out = edge_agent()
        .args(["buffer", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "buffer {} does not exist; the agent creates it on its first start (check buffer.path in the config)\n",
            dir.path().join("nothing-here.db").display()
        )
    );

    std::fs::write(dir.path().join("notes.db"), "not a database\n".repeat(300)).unwrap();
    let config = write_config(dir.path(), "notes.db");
    let out = edge_agent()
        .args(["buffer", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "buffer {} is not an SQLite database; the agent moves it aside and starts a fresh buffer when it starts\n",
            dir.path().join("notes.db").display()
        )
    );
    // Looking never changes anything.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("notes.db")).unwrap(),
        "not a database\n".repeat(300)
    );

    std::fs::write(&config, "site = \"plant-a\"\n").unwrap();
    let out = edge_agent()
        .args(["buffer", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(out.stdout.is_empty());
}
