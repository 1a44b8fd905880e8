//! `kill -9` of `collector run` at random instants, mostly while it commits: the real binary
//! runs against moto S3 while several gateways keep landing batches in the raw zone, is killed
//! with SIGKILL a bounded number of times and started again each time. Afterwards the readings
//! table is a valid Delta table (read by `DuckDB` and by delta-rs) holding every `(gateway, seq)`
//! exactly once, with the right `date`, and the data-quality tables hold no false gaps.
//!
//! The kill instants come from a seeded RNG; the seed is printed, and `PLANTLINE_CRASH_SEED`
//! replays a run.

use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use collector::config::{CollectorConfig, S3Credentials};
use edge_agent::contract::{self, BatchKey, Quality, Row};
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use pipeline_e2e::{MotoServer, S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY, duckdb_query};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const GATEWAYS: [&str; 4] = ["gw-1", "gw-2", "gw-3", "gw-4"];
const BATCHES_PER_GATEWAY: i64 = 24;
const ROWS_PER_BATCH: i64 = 25;
const KILLS: usize = 10;
/// 2026-01-01T00:00:00Z in µs: each gateway's readings cross midnight halfway.
const NEW_YEAR_US: i64 = 1_767_225_600_000_000;

fn row(gateway: &str, seq: i64) -> Row {
    let half = BATCHES_PER_GATEWAY * ROWS_PER_BATCH / 2;
    Row {
        seq,
        ts_us: NEW_YEAR_US + (seq - half) * 1_000_000,
        site: "plant-ost".into(),
        gateway: gateway.into(),
        device: "press-3".into(),
        tag: "oil_temp".into(),
        value: Some(seq as f64 / 2.0),
        quality: Quality::Good,
        unit: Some("degC".into()),
        value_text: None,
    }
}

fn parquet(rows: &[Row]) -> Vec<u8> {
    let mut out = Vec::new();
    let batch = contract::to_record_batch(rows);
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

fn store(moto: &MotoServer, bucket: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(S3_REGION)
            .with_endpoint(moto.endpoint())
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_access_key_id(S3_ACCESS_KEY_ID)
            .with_secret_access_key(S3_SECRET_ACCESS_KEY)
            .build()
            .unwrap(),
    )
}

async fn keys(store: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    let objects: Vec<_> = store
        .list(Some(&Path::parse(prefix).unwrap()))
        .try_collect()
        .await
        .unwrap();
    objects
        .into_iter()
        .map(|o| o.location.to_string())
        .collect()
}

/// The newest commit version in the readings table's log, `None` before the table exists.
async fn latest_version(lake: &dyn ObjectStore) -> Option<u64> {
    keys(lake, "readings/_delta_log/")
        .await
        .iter()
        .filter_map(|k| k.rsplit('/').next()?.strip_suffix(".json")?.parse().ok())
        .max()
}

/// Lands every gateway's batches in the raw zone, one round of batches every `pause`, as
/// gateways upload while the collector runs.
async fn feed(raw: Arc<dyn ObjectStore>, pause: Duration) {
    for batch in 0..BATCHES_PER_GATEWAY {
        for gateway in GATEWAYS {
            let first = batch * ROWS_PER_BATCH + 1;
            let rows: Vec<Row> = (first..first + ROWS_PER_BATCH)
                .map(|s| row(gateway, s))
                .collect();
            let key = BatchKey::new(gateway, first).to_key("raw/");
            raw.put(
                &Path::parse(&key).unwrap(),
                PutPayload::from(Bytes::from(parquet(&rows))),
            )
            .await
            .unwrap();
        }
        tokio::time::sleep(pause).await;
    }
}

fn write_config(dir: &FsPath, moto: &MotoServer, raw: &str, lake: &str) -> PathBuf {
    let path = dir.join("collector.toml");
    // Small commits (two batches each) and a short interval keep the process committing most
    // of the time; checkpoints every 10 versions and OPTIMIZE every 2 s put those in the way
    // of the kills too.
    std::fs::write(
        &path,
        format!(
            "[raw]\nurl = \"s3://{raw}\"\n\n[delta]\nurl = \"s3://{lake}/readings\"\n\n[s3]\nendpoint = \"{}\"\nallow_http = true\n\n[run]\ninterval = \"100ms\"\nmax_files_per_commit = 2\noptimize_interval = \"2s\"\n\n[maintenance]\ncheckpoint_interval = 10\n\n[metrics]\nenabled = false\n",
            moto.endpoint()
        ),
    )
    .unwrap();
    path
}

fn start(config: &FsPath, log: &FsPath, subcommand: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_collector"))
        .args([subcommand, "--config"])
        .arg(config)
        .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_ACCESS_KEY)
        .env("RUST_LOG", "warn,collector=info")
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap()
}

/// SIGKILL by pid (`Child::kill` sends SIGKILL on Unix) and reap it.
fn kill_9(mut child: Child) {
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the collector exited on its own before the kill: {status}"
    );
}

fn count(sql: &str) -> i64 {
    duckdb_query(sql)[0]["n"].as_i64().unwrap()
}

// One scenario read top to bottom: feed, kill and restart, drain, then check every table.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_commits_leaves_a_valid_table_with_every_seq_exactly_once() {
    let seed: u64 = std::env::var("PLANTLINE_CRASH_SEED").map_or_else(
        |_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                .into()
        },
        |s| s.parse().expect("PLANTLINE_CRASH_SEED is a whole number"),
    );
    eprintln!(
        "collector_crash: seed {seed} (PLANTLINE_CRASH_SEED={seed} replays the kill instants)"
    );
    let mut rng = StdRng::seed_from_u64(seed);

    let moto = MotoServer::start();
    let (raw_bucket, lake_bucket) = (moto.create_bucket(), moto.create_bucket());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &moto, &raw_bucket, &lake_bucket);
    let log = dir.path().join("collector.log");
    let raw = store(&moto, &raw_bucket);
    let lake = store(&moto, &lake_bucket);
    let feeder = tokio::spawn(feed(Arc::clone(&raw), Duration::from_millis(600)));

    let mut progressed = 0;
    for cycle in 0..KILLS {
        let before = latest_version(lake.as_ref()).await;
        let child = start(&config, &log, "run");
        // Even cycles: a random instant in the first seconds of the process (opening the
        // tables, a pass, a commit). Odd cycles: just after a commit landed, when the process
        // archives, checkpoints or writes the next commit; a short random delay spreads them.
        let started = Instant::now();
        let how = if cycle % 2 == 0 {
            let delay = Duration::from_millis(rng.random_range(150..2500));
            tokio::time::sleep(delay).await;
            format!("after {delay:?}")
        } else {
            let deadline = started + Duration::from_secs(5);
            loop {
                let now = latest_version(lake.as_ref()).await;
                if now > before || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let delay = Duration::from_millis(rng.random_range(0..150));
            tokio::time::sleep(delay).await;
            format!("{delay:?} after a commit at {:?}", started.elapsed())
        };
        kill_9(child);
        let after = latest_version(lake.as_ref()).await;
        if after > before {
            progressed += 1;
        }
        eprintln!("cycle {cycle}: killed {how}; table version {before:?} -> {after:?}");
    }
    feeder.await.unwrap();
    assert!(
        progressed >= KILLS / 2,
        "only {progressed} of {KILLS} runs committed anything before the kill, so the kills did not land during commits; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // Started once more, the collector drains the raw zone.
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_collector"))
            .args(["run-once", "--config"])
            .arg(&config)
            .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_ACCESS_KEY)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let pending = keys(raw.as_ref(), "raw/").await;
        if out.status.success() && pending.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the raw zone did not drain after the kills: run-once {}, {} batches left, stderr:\n{}",
            out.status,
            pending.len(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        keys(raw.as_ref(), "quarantine/").await,
        Vec::<String>::new(),
        "a kill made a good batch look bad"
    );
    assert_eq!(
        keys(raw.as_ref(), "archive/").await.len(),
        GATEWAYS.len() * usize::try_from(BATCHES_PER_GATEWAY).unwrap()
    );

    // DuckDB reads every table the collector wrote.
    let copy = tempfile::tempdir().unwrap();
    let table = |name: &str| {
        let path = copy.path().join(name);
        moto.download_prefix(&lake_bucket, &format!("{name}/"), &path);
        path
    };
    let readings = table("readings");
    let scan = format!("delta_scan('{}')", readings.display());
    let per_gateway = duckdb_query(&format!(
        "SELECT gateway, count(*) AS n, count(DISTINCT seq) AS d, min(seq) AS lo, max(seq) AS hi FROM {scan} GROUP BY gateway ORDER BY gateway"
    ));
    let per_gateway: Vec<(String, i64, i64, i64, i64)> = per_gateway
        .iter()
        .map(|r| {
            (
                r["gateway"].as_str().unwrap().to_owned(),
                r["n"].as_i64().unwrap(),
                r["d"].as_i64().unwrap(),
                r["lo"].as_i64().unwrap(),
                r["hi"].as_i64().unwrap(),
            )
        })
        .collect();
    let last_seq = BATCHES_PER_GATEWAY * ROWS_PER_BATCH;
    let want: Vec<_> = GATEWAYS
        .iter()
        .map(|g| ((*g).to_owned(), last_seq, last_seq, 1, last_seq))
        .collect();
    assert_eq!(per_gateway, want, "seed {seed}");
    assert_eq!(
        count(&format!(
            "SELECT count(*) AS n FROM {scan} WHERE (date - DATE '1970-01-01') <> floor(epoch_us(ts) / 86400000000) OR value <> seq / 2"
        )),
        0,
        "rows with a wrong date or value"
    );
    for side in ["readings_gaps", "readings_quarantined_rows"] {
        let path = table(side);
        assert_eq!(
            count(&format!(
                "SELECT count(*) AS n FROM delta_scan('{}')",
                path.display()
            )),
            0,
            "{side}: a kill left rows in a data-quality table"
        );
    }

    // delta-rs opens the same table on S3 and reads the same rows and watermarks.
    let mut loaded = CollectorConfig::load(&config).unwrap();
    loaded.s3.static_credentials = Some(S3Credentials {
        access_key_id: S3_ACCESS_KEY_ID.into(),
        secret_access_key: S3_SECRET_ACCESS_KEY.into(),
    });
    let (_, mut tables) = collector::open_tables(&loaded).await.unwrap();
    assert_eq!(tables.readings.partition_columns(), vec!["date".to_owned()]);
    let rows = tables.readings.current_rows().await.unwrap();
    let expected: Vec<Row> = GATEWAYS
        .iter()
        .flat_map(|g| (1..=last_seq).map(|s| row(g, s)))
        .collect();
    assert_eq!(rows.len(), expected.len());
    assert!(rows == expected, "delta-rs reads other rows than were fed");
    for gateway in GATEWAYS {
        assert_eq!(
            tables.readings.watermark(gateway).await.unwrap(),
            Some(last_seq)
        );
    }
}
