//! Readings per second through the agent's durable path, buffer → Parquet → upload, against a
//! raw SQLite insert-and-delete of the same readings in the same process:
//!
//!     cargo bench -p edge-agent --bench throughput
//!     PLANTLINE_BENCH_READINGS=2000000 cargo bench -p edge-agent --bench throughput
//!
//! Pipeline: the readings are committed to the real buffer (`durability = "full"`, commits of
//! 1000 readings, as the writer does at 5000 readings/s with the default `commit_interval`),
//! then the real batcher cuts, encodes and uploads batches of 50 000 to a local folder (fsynced
//! and renamed, as the folder target does) and deletes them from the buffer. Baseline: the same
//! readings inserted into a plain SQLite table (WAL, `synchronous = FULL`, same commit size)
//! and deleted again, with no batching, encoding or upload. The ratio says what the delivery
//! chain costs on top of storing the readings at all.

#[path = "signal_mix/mod.rs"]
mod signal_mix;

use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_agent::batch::Batcher;
use edge_agent::buffer::Buffer;
use edge_agent::config::{BatchConfig, ConfigDuration, DirUpload, Durability, UploadConfig};
use edge_agent::sinks::BatchSink;

const COMMIT: usize = 1_000;
const MAX_ROWS: usize = 50_000;

fn main() {
    let total: usize = std::env::var("PLANTLINE_BENCH_READINGS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500_000);
    println!("throughput benchmark on {}", signal_mix::machine());
    let readings = signal_mix::readings(20, total.div_ceil(100));
    let readings = &readings[..total.min(readings.len())];
    println!(
        "{} readings, commits of {COMMIT}, batches of {MAX_ROWS}\n",
        readings.len()
    );

    let baseline = raw_sqlite(readings);
    let pipeline = pipeline(readings);
    let rate = |d: Duration| {
        #[allow(clippy::cast_precision_loss)]
        let r = readings.len() as f64 / d.as_secs_f64();
        r
    };
    println!("{:<44} {:>10} {:>16}", "path", "seconds", "readings/s");
    println!(
        "{:<44} {:>10.2} {:>16.0}",
        "raw SQLite insert + delete (baseline)",
        baseline.as_secs_f64(),
        rate(baseline)
    );
    println!(
        "{:<44} {:>10.2} {:>16.0}",
        "buffer -> Parquet -> folder upload -> delete",
        pipeline.as_secs_f64(),
        rate(pipeline)
    );
    println!(
        "\npipeline / baseline: {:.2} of the raw SQLite rate",
        rate(pipeline) / rate(baseline)
    );
}

fn pipeline(readings: &[edge_agent::Reading]) -> Duration {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let buffer = Arc::new(
            Buffer::open(&dir.path().join("buffer.db"), Durability::Full, "gw-line1")
                .expect("a fresh buffer"),
        );
        let sink = BatchSink::from_config(&UploadConfig {
            s3: None,
            dir: Some(DirUpload {
                path: dir.path().join("landing"),
                prefix: "raw/".into(),
            }),
        })
        .await
        .expect("the folder target");
        let mut batcher = Batcher::new(
            Arc::clone(&buffer),
            Arc::new(sink),
            BatchConfig {
                max_rows: MAX_ROWS,
                max_age: ConfigDuration::from_secs(60),
                // The main lane's throughput; one backlog-free batch stream.
                fresh_lane: false,
            },
            "plant-ost".into(),
        );
        let started = Instant::now();
        for chunk in readings.chunks(COMMIT) {
            buffer.append(chunk).expect("the buffer takes the readings");
        }
        batcher
            .flush(Duration::from_hours(1))
            .await
            .expect("everything uploads");
        let took = started.elapsed();
        assert_eq!(buffer.stats().expect("stats").rows, 0, "all uploaded");
        took
    })
}

fn raw_sqlite(readings: &[edge_agent::Reading]) -> Duration {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let mut conn = rusqlite::Connection::open(dir.path().join("raw.db")).expect("open");
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE readings (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts_us INTEGER NOT NULL,
           device TEXT NOT NULL, tag TEXT NOT NULL, value REAL, quality TEXT NOT NULL, unit TEXT);",
    )
    .expect("schema");
    let started = Instant::now();
    for chunk in readings.chunks(COMMIT) {
        let tx = conn.transaction().expect("begin");
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO readings (ts_us, device, tag, value, quality, unit) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .expect("prepare");
            for r in chunk {
                insert
                    .execute(rusqlite::params![
                        r.ts_us,
                        r.device,
                        r.tag,
                        r.value,
                        r.quality.as_str(),
                        r.unit
                    ])
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    let mut next = 0i64;
    loop {
        let deleted = conn
            .execute(
                "DELETE FROM readings WHERE seq <= ?1",
                [next + i64::try_from(MAX_ROWS).expect("small")],
            )
            .expect("delete");
        next += i64::try_from(MAX_ROWS).expect("small");
        if deleted == 0 {
            let left: i64 = conn
                .query_row("SELECT count(*) FROM readings", [], |r| r.get(0))
                .expect("count");
            if left == 0 {
                break;
            }
        }
    }
    started.elapsed()
}
