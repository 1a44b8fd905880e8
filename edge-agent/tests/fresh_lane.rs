//! The fresh lane (batch contract v3) through the batcher's real loop, uploading to a folder:
//! while the main lane cannot get past a backlog, copies of the newest readings land under
//! `gateway=<id>/fresh/`, contiguous and never going backwards; the main lane still uploads
//! every reading exactly once in `seq` order; with `batch.fresh_lane = false` nothing lands in
//! the fresh lane.
//!
//! The main lane is held at its first batch by a folder sitting where that batch's file belongs
//! (the folder target cannot rename a file onto it), so the test decides when it may drain.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_agent::Reading;
use edge_agent::batch::Batcher;
use edge_agent::buffer::{Bounds, Buffer, FreshRun};
use edge_agent::config::{
    BatchConfig, ConfigDuration, DirUpload, Durability, FullPolicy, UploadConfig,
};
use edge_agent::contract::{BatchKey, Lane, Quality, Row, metadata};
use edge_agent::sinks::BatchSink;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokio_util::sync::CancellationToken;

const GATEWAY: &str = "gw-1";
const MAX_ROWS: usize = 100;
/// `batch.max_age`: a fresh batch at most this often, of what arrived within it.
const MAX_AGE: Duration = Duration::from_secs(1);
const TS0: i64 = 1_700_000_000_000_000;

fn readings(from: i64, n: i64) -> Vec<Reading> {
    (from..from + n)
        .map(|i| Reading {
            ts_us: TS0 + i * 1000,
            device: "press-3".into(),
            tag: "oil_temp".into(),
            value: Some(i as f64),
            value_text: None,
            quality: Quality::Good,
            unit: Some("degC".into()),
        })
        .collect()
}

/// One landed batch: its key and rows.
struct Landed {
    key: BatchKey,
    rows: Vec<Row>,
    footer: Vec<(String, String)>,
}

fn read(path: &Path, landing: &Path) -> Landed {
    let bytes = bytes::Bytes::from(std::fs::read(path).unwrap());
    let text = path.strip_prefix(landing).unwrap().to_str().unwrap();
    let key = BatchKey::parse("raw/", text).unwrap_or_else(|e| panic!("{text}: {e}"));
    let rows = edge_agent::batch::read_rows(bytes.clone())
        .unwrap_or_else(|e| panic!("{text} breaks the batch contract: {e}"));
    let footer = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .unwrap()
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap()
        .iter()
        .filter(|kv| kv.key.starts_with("plantline."))
        .map(|kv| (kv.key.clone(), kv.value.clone().unwrap()))
        .collect();
    Landed { key, rows, footer }
}

fn landed(landing: &Path, lane: Lane) -> Vec<Landed> {
    let files = match lane {
        Lane::Main => common::parquet_files(landing),
        Lane::Fresh => common::fresh_parquet_files(landing),
    };
    let mut batches: Vec<Landed> = files.iter().map(|f| read(f, landing)).collect();
    batches.sort_by_key(|b| b.key.first_seq);
    batches
}

struct Setup {
    _dir: tempfile::TempDir,
    buffer: Arc<Buffer>,
    db: PathBuf,
    landing: PathBuf,
    /// The folder that blocks the main lane's first batch.
    block: PathBuf,
}

/// A buffer with a backlog of `backlog` readings that arrived 1.5 s ago (longer than
/// `batch.max_age`), a main lane that cannot upload its first batch, and `fresh` readings that
/// just arrived.
fn backlog(backlog: i64, fresh: i64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("buffer.db");
    // Commit marks at most 300 ms wide (a hundredth of max_age), so the backlog and the fresh
    // readings lie in different marks; nothing here waits 30 s.
    let bounds = Bounds {
        max_bytes: u64::MAX,
        max_age: Duration::from_secs(30),
        on_full: FullPolicy::DropOldest,
    };
    let buffer = Arc::new(Buffer::open_bounded(&db, Durability::Full, GATEWAY, bounds).unwrap());
    let landing = dir.path().join("landing");
    let block = landing.join(BatchKey::new(GATEWAY, 1).to_key("raw/"));
    std::fs::create_dir_all(block.join("in-the-way")).unwrap();
    buffer.append(&readings(1, backlog)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    buffer.append(&readings(backlog + 1, fresh)).unwrap();
    Setup {
        _dir: dir,
        buffer,
        db,
        landing,
        block,
    }
}

async fn start_batcher(
    setup: &Setup,
    fresh_lane: bool,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), edge_agent::batch::BatcherError>>,
) {
    let sink = BatchSink::from_config(&UploadConfig {
        s3: None,
        dir: Some(DirUpload {
            path: setup.landing.clone(),
            prefix: "raw/".into(),
        }),
    })
    .await
    .unwrap();
    let config = BatchConfig {
        max_rows: MAX_ROWS,
        max_age: ConfigDuration(MAX_AGE),
        fresh_lane,
    };
    let mut batcher = Batcher::new(
        Arc::clone(&setup.buffer),
        Arc::new(sink),
        config,
        "plant-a".into(),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { batcher.run(stop).await }
    });
    (stop, task)
}

/// Appends 5 readings every 100 ms (a live sensor) until `stop`; returns the last `seq`.
fn sensor(buffer: &Arc<Buffer>, stop: CancellationToken) -> tokio::task::JoinHandle<i64> {
    let buffer = Arc::clone(buffer);
    tokio::spawn(async move {
        let mut last = buffer.stats().unwrap().last_seq.unwrap_or(0);
        while !stop.is_cancelled() {
            let (_, end) = buffer.append(&readings(last + 1, 5)).unwrap().unwrap();
            last = end;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last
    })
}

async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every `seq` of `1..=last` in exactly one main-lane batch, the batches contiguous in key order
/// and each at most `max_rows`.
fn assert_main_lane_exactly_once(main: &[Landed], last: i64) {
    let mut next = 1;
    for batch in main {
        assert_eq!(
            batch.key.first_seq, next,
            "main-lane batches are contiguous"
        );
        assert!(batch.rows.len() <= MAX_ROWS);
        for row in &batch.rows {
            assert_eq!(row.seq, next, "seq {next} once, in order");
            next += 1;
        }
        assert!(
            !batch.footer.iter().any(|(k, _)| k == metadata::LANE),
            "a main-lane file names no lane"
        );
        assert!(
            batch
                .footer
                .contains(&(metadata::CONTRACT_VERSION.to_owned(), "2".to_owned()))
        );
    }
    assert_eq!(next - 1, last, "every reading reached the main lane");
}

/// Each fresh-lane batch: a contiguous range of at most `max_rows`, with the v3 footer that names
/// its lane and carries no gap records.
fn assert_fresh_files(fresh: &[Landed]) {
    for batch in fresh {
        let seqs: Vec<i64> = batch.rows.iter().map(|r| r.seq).collect();
        assert_eq!(
            seqs,
            (seqs[0]..=*seqs.last().unwrap()).collect::<Vec<_>>(),
            "a fresh batch is a contiguous range"
        );
        assert!(batch.rows.len() <= MAX_ROWS);
        assert_eq!(batch.key.lane, Lane::Fresh);
        assert_eq!(
            batch.footer,
            [
                (metadata::CONTRACT_VERSION, "3".to_owned()),
                (metadata::GATEWAY, GATEWAY.to_owned()),
                (metadata::FIRST_SEQ, seqs[0].to_string()),
                (metadata::LAST_SEQ, seqs.last().unwrap().to_string()),
                (metadata::LANE, "fresh".to_owned()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
            "v3 footer with the lane and no gaps"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_readings_land_in_the_fresh_lane_while_the_backlog_waits_and_the_main_lane_stays_exact()
 {
    let setup = backlog(2000, 50);
    let (stop, task) = start_batcher(&setup, true).await;
    let sensor_stop = CancellationToken::new();
    let sensor_task = sensor(&setup.buffer, sensor_stop.clone());

    // The main lane is stuck at seq 1; the fresh lane goes ahead, once per max_age.
    wait_for("three fresh-lane batches", Duration::from_secs(20), || {
        common::fresh_parquet_files(&setup.landing).len() >= 3
    })
    .await;
    assert!(
        common::parquet_files(&setup.landing).is_empty(),
        "the main lane has not uploaded anything yet"
    );
    let fresh = landed(&setup.landing, Lane::Fresh);
    // The first fresh batch starts at the first reading that arrived within max_age: the 50
    // that came after the backlog, not the backlog.
    assert_eq!(fresh[0].key.first_seq, 2001);
    assert_eq!(fresh[0].rows.first().unwrap().seq, 2001);
    // While the main lane has not passed the run, each batch continues it, with no hole.
    for pair in fresh.windows(2) {
        assert_eq!(
            pair[1].key.first_seq,
            pair[0].rows.last().unwrap().seq + 1,
            "fresh-lane batches continue their run"
        );
    }
    assert_fresh_files(&fresh);
    // `edge-agent buffer` shows the run, behind which the main lane still waits.
    let report = edge_agent::buffer::inspect(&setup.db).unwrap();
    let run = report.fresh_run.expect("the run is recorded");
    assert_eq!(run.first_seq, 2001);
    assert!(run.last_seq >= fresh.last().unwrap().rows.last().unwrap().seq);
    assert!(
        report
            .to_string()
            .contains(&format!("fresh lane      seq 2001..={} copied ahead of the backlog; the main lane has not reached its end", run.last_seq)),
        "{report}"
    );

    // The main lane may go: it drains the backlog in order while the sensor keeps going.
    std::fs::remove_dir_all(&setup.block).unwrap();
    wait_for(
        "the main lane to pass the fresh run",
        Duration::from_mins(1),
        || {
            setup
                .buffer
                .stats()
                .unwrap()
                .first_seq
                .is_none_or(|first| first > run.last_seq)
        },
    )
    .await;
    sensor_stop.cancel();
    let last = sensor_task.await.unwrap();
    wait_for("the buffer to drain", Duration::from_secs(30), || {
        setup.buffer.stats().unwrap().rows == 0
    })
    .await;
    // Caught up: no backlog, so no more fresh batches.
    let fresh_when_drained = common::fresh_parquet_files(&setup.landing).len();
    tokio::time::sleep(MAX_AGE * 3).await;
    setup.buffer.append(&readings(last + 1, 3)).unwrap();
    tokio::time::sleep(MAX_AGE * 3).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(
        common::fresh_parquet_files(&setup.landing).len(),
        fresh_when_drained,
        "no fresh batch without a backlog"
    );

    let main = landed(&setup.landing, Lane::Main);
    assert_main_lane_exactly_once(&main, last + 3);
    // Fresh batches never go backwards, and their rows are copies of the main lane's.
    let fresh = landed(&setup.landing, Lane::Fresh);
    let mut previous_last = 0;
    for batch in &fresh {
        let first = batch.rows.first().unwrap().seq;
        let end = batch.rows.last().unwrap().seq;
        assert!(first > previous_last, "{:?} goes backwards", batch.key);
        previous_last = end;
        for row in &batch.rows {
            let main_row = main
                .iter()
                .flat_map(|b| &b.rows)
                .find(|r| r.seq == row.seq)
                .unwrap();
            assert_eq!(main_row, row, "a fresh row is a copy of the main lane's");
        }
    }
    let report = edge_agent::buffer::inspect(&setup.db).unwrap();
    assert!(matches!(report.fresh_run, Some(FreshRun { first_seq, .. }) if first_seq >= 2001));
    assert!(report.to_string().contains("; the main lane has passed it"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_fresh_lane_off_only_the_main_lane_uploads() {
    let setup = backlog(500, 50);
    let (stop, task) = start_batcher(&setup, false).await;
    tokio::time::sleep(MAX_AGE * 3).await;
    assert!(common::fresh_parquet_files(&setup.landing).is_empty());
    assert!(common::parquet_files(&setup.landing).is_empty());
    std::fs::remove_dir_all(&setup.block).unwrap();
    wait_for("the buffer to drain", Duration::from_mins(1), || {
        setup.buffer.stats().unwrap().rows == 0
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(
        !setup.landing.join("raw/gateway=gw-1/fresh").exists(),
        "no fresh folder at all"
    );
    assert_main_lane_exactly_once(&landed(&setup.landing, Lane::Main), 550);
    assert_eq!(
        edge_agent::buffer::inspect(&setup.db).unwrap().fresh_run,
        None
    );
}
