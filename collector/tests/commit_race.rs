//! Commits that lose a race: two collectors with their own table handles on one table, on a
//! local folder and on S3 (moto server, conditional PUT), checked with an independent Delta
//! reader (`DuckDB`): every `seq` exactly once.

use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use collector::config::{CollectorConfig, S3Credentials};
use collector::delta::ReadingsTable;
use collector::ingest::{IngestOptions, ingest_all};
use edge_agent::contract::{self, BatchKey, Quality, Row};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use pipeline_e2e::{MotoServer, S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY, duckdb_query};

fn row(gateway: &str, seq: i64) -> Row {
    Row {
        seq,
        ts_us: 1_767_225_600_000_000 + seq * 1_000_000,
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

fn rows(gateway: &str, seqs: std::ops::RangeInclusive<i64>) -> Vec<Row> {
    seqs.map(|s| row(gateway, s)).collect()
}

fn parquet(rows: &[Row]) -> Vec<u8> {
    let mut out = Vec::new();
    let batch = contract::to_record_batch(rows);
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

/// `count`, `count(distinct (gateway, seq))` and `sum(seq)` of the table as `DuckDB` reads it.
fn duckdb_counts(table: &FsPath) -> (i64, i64, i64) {
    let rows = duckdb_query(&format!(
        "SELECT count(*) AS n, count(DISTINCT (gateway, seq)) AS d, sum(seq) AS s FROM delta_scan('{}')",
        table.display()
    ));
    let r = &rows[0];
    (
        r["n"].as_i64().unwrap(),
        r["d"].as_i64().unwrap(),
        r["s"].as_i64().unwrap(),
    )
}

/// The commit conflicts the process's registry has counted for the readings table.
fn readings_conflicts() -> f64 {
    let text = collector::metrics::global().render(std::time::SystemTime::now());
    text.lines()
        .find_map(|l| {
            l.strip_prefix("plantline_collector_commit_conflicts_total{table=\"readings\"} ")
        })
        .map_or(0.0, |v| v.parse().unwrap())
}

async fn open(config: &CollectorConfig) -> ReadingsTable {
    let (_, tables) = collector::open_tables(config).await.unwrap();
    tables.readings
}

/// A writer holding an old snapshot loses the race for the next version. Committing another
/// gateway, it retries on the new version with the same files; committing the same gateway,
/// it finds the watermark moved and filters its rows again, adding nothing.
async fn stale_writers_rebase_or_refilter(config: &CollectorConfig) {
    let mut a = open(config).await;
    let mut b = open(config).await;
    let base = a.version().unwrap();
    let batch = |g: &str, r| vec![contract::to_record_batch(&rows(g, r))];
    let conflicts_before = readings_conflicts();

    let first = a.apply("gw-1", &batch("gw-1", 1..=10)).await.unwrap();
    assert_eq!(first.version, Some(base + 1));
    // `b` still holds version `base`: its commit of gw-2 loses the race for base + 1.
    let other = b.apply("gw-2", &batch("gw-2", 1..=5)).await.unwrap();
    assert_eq!(
        (other.version, other.rows_applied, other.conflicts),
        (Some(base + 2), 5, 0),
        "{other:?}"
    );
    assert!(readings_conflicts() > conflicts_before);

    let mut c = open(config).await;
    a.apply("gw-1", &batch("gw-1", 11..=20)).await.unwrap();
    // `c` believes gw-1 is at 10 and commits 11..=20 again: the watermark tells it no.
    let same = c.apply("gw-1", &batch("gw-1", 11..=20)).await.unwrap();
    assert_eq!(
        (
            same.version,
            same.rows_applied,
            same.rows_skipped,
            same.conflicts
        ),
        (None, 0, 10, 1),
        "{same:?}"
    );
    assert_eq!(same.watermark_after, Some(20));

    let mut want = rows("gw-1", 1..=20);
    want.extend(rows("gw-2", 1..=5));
    assert_eq!(c.current_rows().await.unwrap(), want);
}

/// Two collectors (each with its own tables) apply the same raw zone at the same time until it
/// is drained.
async fn two_collectors_drain_one_raw_zone(
    config: &CollectorConfig,
    store: Arc<dyn ObjectStore>,
) -> Vec<Row> {
    let mut want = Vec::new();
    for gateway in ["gw-1", "gw-2", "gw-3"] {
        for first in (1..=60).step_by(5) {
            let batch = rows(gateway, first..=first + 4);
            let key = BatchKey::new(gateway, first).to_key("raw/");
            store
                .put(
                    &Path::parse(&key).unwrap(),
                    PutPayload::from(Bytes::from(parquet(&batch))),
                )
                .await
                .unwrap();
            want.extend(batch);
        }
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let collector = |barrier: Arc<tokio::sync::Barrier>| {
        let config = config.clone();
        let store = Arc::clone(&store);
        async move {
            let (raw, mut tables) = collector::open_tables(&config).await.unwrap();
            let options = IngestOptions::new(2).with_commit_attempts(10);
            barrier.wait().await;
            for _ in 0..50 {
                let report = ingest_all(&raw, &mut tables, &options).await.unwrap();
                for gw in &report.gateways {
                    // A batch the other collector archived between listing and reading is a
                    // transient failure of this pass, not of the data.
                    if let Some(error) = &gw.error {
                        eprintln!("{}: {error}", gw.gateway);
                    }
                }
                if pending_batches(store.as_ref()).await == 0 {
                    break;
                }
            }
            tables.readings
        }
    };
    let (one, two) = tokio::join!(
        tokio::spawn(collector(Arc::clone(&barrier))),
        tokio::spawn(collector(barrier))
    );
    let (mut one, _two) = (one.unwrap(), two.unwrap());
    assert_eq!(pending_batches(store.as_ref()).await, 0);
    let got = one.current_rows().await.unwrap();
    assert_eq!(got.len(), want.len());
    got
}

/// Batch files still under `raw/`.
async fn pending_batches(store: &dyn ObjectStore) -> usize {
    use futures::TryStreamExt;
    let keys: Vec<_> = store
        .list(Some(&Path::parse("raw/").unwrap()))
        .try_collect()
        .await
        .unwrap();
    keys.len()
}

fn local_config(dir: &FsPath) -> CollectorConfig {
    let path = dir.join("collector.toml");
    std::fs::write(
        &path,
        "[raw]\nurl = \"landing\"\n\n[delta]\nurl = \"lake/readings\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("landing")).unwrap();
    CollectorConfig::load(&path).unwrap()
}

fn s3_config(dir: &FsPath, moto: &MotoServer, raw: &str, lake: &str) -> CollectorConfig {
    let path = dir.join("collector.toml");
    std::fs::write(
        &path,
        format!(
            "[raw]\nurl = \"s3://{raw}\"\n\n[delta]\nurl = \"s3://{lake}/readings\"\n\n[s3]\nendpoint = \"{}\"\nallow_http = true\n",
            moto.endpoint()
        ),
    )
    .unwrap();
    let mut config = CollectorConfig::load(&path).unwrap();
    config.s3.static_credentials = Some(S3Credentials {
        access_key_id: S3_ACCESS_KEY_ID.into(),
        secret_access_key: S3_SECRET_ACCESS_KEY.into(),
    });
    config
}

fn moto_store(moto: &MotoServer, bucket: &str) -> Arc<dyn ObjectStore> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_race_on_a_local_table_is_retried_or_refiltered_never_written_twice() {
    let dir = tempfile::tempdir().unwrap();
    let config = local_config(dir.path());
    stale_writers_rebase_or_refilter(&config).await;
    assert_eq!(
        duckdb_counts(&dir.path().join("lake/readings")),
        (25, 25, (1..=20).sum::<i64>() + (1..=5).sum::<i64>())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_race_on_s3_is_retried_or_refiltered_never_written_twice() {
    let moto = MotoServer::start();
    let (raw, lake) = (moto.create_bucket(), moto.create_bucket());
    let dir = tempfile::tempdir().unwrap();
    let config = s3_config(dir.path(), &moto, &raw, &lake);
    stale_writers_rebase_or_refilter(&config).await;
    let copy = tempfile::tempdir().unwrap();
    moto.download_prefix(&lake, "readings/", copy.path());
    assert_eq!(
        duckdb_counts(copy.path()),
        (25, 25, (1..=20).sum::<i64>() + (1..=5).sum::<i64>())
    );
}

fn expected_counts() -> (i64, i64, i64) {
    (180, 180, 3 * (1..=60).sum::<i64>())
}

fn expected_rows() -> Vec<Row> {
    ["gw-1", "gw-2", "gw-3"]
        .into_iter()
        .flat_map(|g| rows(g, 1..=60))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_racing_on_a_local_table_apply_every_seq_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = local_config(dir.path());
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path().join("landing")).unwrap());
    let got = two_collectors_drain_one_raw_zone(&config, store).await;
    assert_eq!(got, expected_rows());
    assert_eq!(
        duckdb_counts(&dir.path().join("lake/readings")),
        expected_counts()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_racing_on_s3_apply_every_seq_exactly_once() {
    let moto = MotoServer::start();
    let (raw, lake) = (moto.create_bucket(), moto.create_bucket());
    let dir = tempfile::tempdir().unwrap();
    let config = s3_config(dir.path(), &moto, &raw, &lake);
    let got = two_collectors_drain_one_raw_zone(&config, moto_store(&moto, &raw)).await;
    assert_eq!(got, expected_rows());
    let copy = tempfile::tempdir().unwrap();
    moto.download_prefix(&lake, "readings/", copy.path());
    assert_eq!(duckdb_counts(copy.path()), expected_counts());
}
