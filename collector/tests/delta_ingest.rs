//! Applying raw-zone batches to the Delta table exactly once, against local folders and a real
//! S3 peer (moto server), and checked with an independent Delta reader (`DuckDB`).

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use collector::config::{CollectorConfig, S3Credentials};
use collector::delta::{ReadingsTable, app_id};
use collector::ingest::{IngestReport, RejectedBatch, ingest_all, ingest_gateway};
use collector::raw_zone::RawZone;
use edge_agent::contract::{self, BatchKey, Quality, Row};
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use pipeline_e2e::{MotoServer, S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY, duckdb_query};

fn row(gateway: &str, seq: i64) -> Row {
    Row {
        seq,
        ts_us: 1_767_225_600_000_000 + seq * 1_000_000,
        site: "plant-ost".into(),
        gateway: gateway.into(),
        device: "press-3".into(),
        tag: "oil_temp".into(),
        value: (seq % 5 != 0).then_some(40.0 + seq as f64 / 4.0),
        quality: if seq % 5 == 0 {
            Quality::Bad
        } else {
            Quality::Good
        },
        unit: Some("degC".into()),
    }
}

fn rows(gateway: &str, seqs: std::ops::RangeInclusive<i64>) -> Vec<Row> {
    seqs.map(|s| row(gateway, s)).collect()
}

/// A batch file as the agent writes it: zstd Parquet with the contract's key-value metadata.
fn parquet_bytes(rows: &[Row]) -> Vec<u8> {
    let meta = |k: &str, v: String| KeyValue::new(k.to_owned(), v);
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_key_value_metadata(Some(vec![
            meta(
                contract::metadata::CONTRACT_VERSION,
                contract::CONTRACT_VERSION.to_string(),
            ),
            meta(contract::metadata::GATEWAY, rows[0].gateway.clone()),
            meta(contract::metadata::FIRST_SEQ, rows[0].seq.to_string()),
            meta(
                contract::metadata::LAST_SEQ,
                rows[rows.len() - 1].seq.to_string(),
            ),
        ]))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, contract::schema(), Some(props)).unwrap();
    writer.write(&contract::to_record_batch(rows)).unwrap();
    writer.close().unwrap();
    out
}

async fn put(store: &dyn ObjectStore, key: &str, bytes: Vec<u8>) {
    store
        .put(
            &Path::parse(key).unwrap(),
            PutPayload::from(Bytes::from(bytes)),
        )
        .await
        .unwrap();
}

/// Uploads `rows` under the batch key of their gateway and first seq, below `raw/`.
async fn put_batch(store: &dyn ObjectStore, rows: &[Row]) -> String {
    let key = BatchKey::new(&rows[0].gateway, rows[0].seq).to_key("raw/");
    put(store, &key, parquet_bytes(rows)).await;
    key
}

async fn keys_under(store: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = store
        .list(Some(&Path::parse(prefix).unwrap()))
        .map_ok(|m| m.location.as_ref().to_owned())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

/// Every row in the table's current version, sorted by gateway and seq.
async fn table_rows(table: &mut ReadingsTable) -> Vec<Row> {
    table.current_rows().await.unwrap()
}

struct LocalSetup {
    _dir: tempfile::TempDir,
    raw_store: Arc<dyn ObjectStore>,
    raw: RawZone,
    table_path: PathBuf,
    table: ReadingsTable,
}

async fn local_setup() -> LocalSetup {
    let dir = tempfile::tempdir().unwrap();
    let raw_dir = dir.path().join("landing");
    std::fs::create_dir_all(&raw_dir).unwrap();
    let raw_store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(&raw_dir).unwrap());
    let raw = RawZone::local(&raw_dir, "raw/", "archive/").unwrap();
    let table_path = dir.path().join("lake").join("readings");
    let url = url::Url::from_directory_path(&table_path).unwrap();
    let table = ReadingsTable::open_or_create(&url, std::collections::HashMap::default())
        .await
        .unwrap();
    LocalSetup {
        _dir: dir,
        raw_store,
        raw,
        table_path,
        table,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_batches_in_seq_order_with_the_watermark_and_archives_them() {
    let mut s = local_setup().await;
    assert_eq!(s.table.version(), Some(0));
    let (a, b, c) = (
        rows("gw-1", 1..=3),
        rows("gw-1", 4..=6),
        rows("gw-1", 7..=10),
    );
    // Uploaded out of order: the listing, not the upload order, decides.
    let key_c = put_batch(s.raw_store.as_ref(), &c).await;
    let key_a = put_batch(s.raw_store.as_ref(), &a).await;
    let key_b = put_batch(s.raw_store.as_ref(), &b).await;

    let report = ingest_all(&s.raw, &mut s.table, 100).await.unwrap();

    let gw = report.gateway("gw-1").unwrap();
    assert_eq!(gw.files_applied, 3);
    assert_eq!(gw.rows_applied, 10);
    assert_eq!(gw.rows_skipped, 0);
    assert_eq!(gw.watermark, Some(10));
    assert_eq!(gw.delta_version, Some(1));
    assert_eq!(gw.commits, 1);
    assert_eq!(gw.rejected, None);
    assert_eq!(gw.error, None);
    assert_eq!(s.table.watermark("gw-1").await.unwrap(), Some(10));
    assert_eq!(table_rows(&mut s.table).await, rows("gw-1", 1..=10));
    assert!(keys_under(s.raw_store.as_ref(), "raw/").await.is_empty());
    assert_eq!(
        keys_under(s.raw_store.as_ref(), "archive/").await,
        [key_a, key_b, key_c]
            .iter()
            .map(|k| k.replacen("raw/", "archive/", 1))
            .collect::<Vec<_>>()
    );

    let (count, sum) = duckdb_count_and_sum_seq(&s.table_path);
    assert_eq!((count, sum), (10, 55));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_and_overlapping_batches_add_nothing_twice() {
    let mut s = local_setup().await;
    put_batch(s.raw_store.as_ref(), &rows("gw-1", 1..=5)).await;
    ingest_all(&s.raw, &mut s.table, 100).await.unwrap();

    // The agent retried an upload that had in fact succeeded, and cut an overlapping batch.
    put_batch(s.raw_store.as_ref(), &rows("gw-1", 1..=5)).await;
    put_batch(s.raw_store.as_ref(), &rows("gw-1", 4..=8)).await;
    let report = ingest_all(&s.raw, &mut s.table, 100).await.unwrap();

    let gw = report.gateway("gw-1").unwrap();
    assert_eq!(gw.files_applied, 2);
    assert_eq!(gw.rows_applied, 3);
    assert_eq!(gw.rows_skipped, 5 + 2);
    assert_eq!(gw.watermark, Some(8));
    assert_eq!(gw.delta_version, Some(2));
    assert_eq!(table_rows(&mut s.table).await, rows("gw-1", 1..=8));
    assert!(keys_under(s.raw_store.as_ref(), "raw/").await.is_empty());

    // A replay that is entirely below the watermark is archived without a commit.
    put_batch(s.raw_store.as_ref(), &rows("gw-1", 6..=8)).await;
    let report = ingest_all(&s.raw, &mut s.table, 100).await.unwrap();
    let gw = report.gateway("gw-1").unwrap();
    assert_eq!(
        (gw.files_applied, gw.rows_applied, gw.rows_skipped),
        (1, 0, 3)
    );
    assert_eq!((gw.delta_version, gw.commits), (None, 0));
    assert_eq!(s.table.version(), Some(2));
    assert!(keys_under(s.raw_store.as_ref(), "raw/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_ingest_twice_adds_nothing() {
    let mut s = local_setup().await;
    put_batch(s.raw_store.as_ref(), &rows("gw-1", 1..=4)).await;
    ingest_all(&s.raw, &mut s.table, 100).await.unwrap();
    let version = s.table.version();

    let report = ingest_all(&s.raw, &mut s.table, 100).await.unwrap();

    let gw = report.gateway("gw-1").unwrap();
    assert_eq!((gw.files_applied, gw.rows_applied, gw.commits), (0, 0, 0));
    assert_eq!(gw.watermark, Some(4));
    assert_eq!(s.table.version(), version);
    assert_eq!(table_rows(&mut s.table).await, rows("gw-1", 1..=4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_commit_and_archive_is_harmless() {
    let mut s = local_setup().await;
    let batch = rows("gw-1", 1..=4);
    put_batch(s.raw_store.as_ref(), &batch).await;
    // The commit landed, the process died before archiving.
    let outcome = s
        .table
        .apply("gw-1", &[contract::to_record_batch(&batch)])
        .await
        .unwrap();
    assert_eq!(outcome.version, Some(1));

    let report = ingest_all(&s.raw, &mut s.table, 100).await.unwrap();

    let gw = report.gateway("gw-1").unwrap();
    assert_eq!(
        (gw.files_applied, gw.rows_applied, gw.rows_skipped),
        (1, 0, 4)
    );
    assert_eq!(table_rows(&mut s.table).await, batch);
    assert!(keys_under(s.raw_store.as_ref(), "raw/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_file_is_reported_by_key_and_blocks_only_its_gateway() {
    let mut s = local_setup().await;
    put_batch(s.raw_store.as_ref(), &rows("gw-a", 1..=5)).await;
    let corrupt = BatchKey::new("gw-a", 6).to_key("raw/");
    put(
        s.raw_store.as_ref(),
        &corrupt,
        b"PAR1 but not really".to_vec(),
    )
    .await;
    let after = put_batch(s.raw_store.as_ref(), &rows("gw-a", 7..=9)).await;
    put_batch(s.raw_store.as_ref(), &rows("gw-b", 1..=4)).await;
    put(
        s.raw_store.as_ref(),
        "raw/gateway=gw-b/notes.txt",
        b"hi".to_vec(),
    )
    .await;

    let report = ingest_all(&s.raw, &mut s.table, 100).await.unwrap();

    let a = report.gateway("gw-a").unwrap();
    assert_eq!(
        (a.files_applied, a.rows_applied, a.watermark),
        (1, 5, Some(5))
    );
    let RejectedBatch { key, reason } = a.rejected.clone().unwrap();
    assert_eq!(key, "raw/gateway=gw-a/00000000000000000006.parquet");
    assert!(
        reason.starts_with("not a readable Parquet file: "),
        "{reason}"
    );
    let b = report.gateway("gw-b").unwrap();
    assert_eq!(
        (b.files_applied, b.rows_applied, b.watermark),
        (1, 4, Some(4))
    );
    assert_eq!(b.rejected, None);
    assert_eq!(
        b.foreign_keys,
        vec!["raw/gateway=gw-b/notes.txt".to_owned()]
    );

    let mut want = rows("gw-a", 1..=5);
    want.extend(rows("gw-b", 1..=4));
    assert_eq!(table_rows(&mut s.table).await, want);
    // The corrupt file and everything after it wait in place.
    assert_eq!(
        keys_under(s.raw_store.as_ref(), "raw/").await,
        vec![
            corrupt.clone(),
            after,
            "raw/gateway=gw-b/notes.txt".to_owned()
        ]
    );

    let later = s.raw.list_batches("gw-a", Some(6)).await.unwrap();
    assert_eq!(
        later
            .batches
            .iter()
            .map(|b| b.key.first_seq)
            .collect::<Vec<_>>(),
        vec![7]
    );

    // Still blocked on the next pass; nothing is skipped over.
    let report = ingest_all(&s.raw, &mut s.table, 100).await.unwrap();
    let a = report.gateway("gw-a").unwrap();
    assert_eq!((a.rows_applied, a.watermark), (0, Some(5)));
    assert_eq!(a.rejected.as_ref().unwrap().key, corrupt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_the_wrong_folder_or_under_the_wrong_key_is_rejected() {
    let mut s = local_setup().await;
    // gw-2's rows uploaded into gw-1's folder.
    let wrong_folder = BatchKey::new("gw-1", 1).to_key("raw/");
    put(
        s.raw_store.as_ref(),
        &wrong_folder,
        parquet_bytes(&rows("gw-2", 1..=3)),
    )
    .await;
    // A key that does not match the first seq inside.
    let wrong_key = BatchKey::new("gw-3", 2).to_key("raw/");
    put(
        s.raw_store.as_ref(),
        &wrong_key,
        parquet_bytes(&rows("gw-3", 5..=6)),
    )
    .await;

    let report = ingest_all(&s.raw, &mut s.table, 100).await.unwrap();

    assert_eq!(
        report.gateway("gw-1").unwrap().rejected,
        Some(RejectedBatch {
            key: wrong_folder,
            reason: "holds rows of gateway `gw-2` but lies in the folder of gateway `gw-1`".into(),
        })
    );
    assert_eq!(
        report.gateway("gw-3").unwrap().rejected,
        Some(RejectedBatch {
            key: wrong_key,
            reason:
                "its first seq is 5 but its key says 2; keys must be derived from the first seq"
                    .into(),
        })
    );
    assert_eq!(report.rows_applied(), 0);
    assert_eq!(s.table.version(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_files_per_commit_splits_a_backlog_into_several_commits() {
    let mut s = local_setup().await;
    for first in [1, 3, 5, 7, 9] {
        put_batch(s.raw_store.as_ref(), &rows("gw-1", first..=first + 1)).await;
    }

    let report = ingest_gateway(&s.raw, &mut s.table, "gw-1", 2)
        .await
        .unwrap();

    assert_eq!(
        (report.files_applied, report.rows_applied, report.commits),
        (5, 10, 3)
    );
    assert_eq!(report.delta_version, Some(3));
    assert_eq!(report.watermark, Some(10));
    assert_eq!(table_rows(&mut s.table).await, rows("gw-1", 1..=10));
}

// ---- S3 (moto server) ----

/// An object store client on a moto bucket, independent of the collector's own configuration.
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

/// Loads a collector config the way the binary does, plus test credentials.
fn s3_config(
    moto: &MotoServer,
    raw_bucket: &str,
    lake_bucket: &str,
) -> (tempfile::TempDir, CollectorConfig) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collector.toml");
    std::fs::write(
        &path,
        format!(
            "[raw]\nurl = \"s3://{raw_bucket}\"\n\n[delta]\nurl = \"s3://{lake_bucket}/readings\"\n\n[s3]\nendpoint = \"{}\"\nallow_http = true\n",
            moto.endpoint()
        ),
    )
    .unwrap();
    let mut config = CollectorConfig::load(&path).unwrap();
    config.s3.static_credentials = Some(S3Credentials {
        access_key_id: S3_ACCESS_KEY_ID.into(),
        secret_access_key: S3_SECRET_ACCESS_KEY.into(),
    });
    (dir, config)
}

async fn open_s3_table(config: &CollectorConfig) -> ReadingsTable {
    let url = config.delta_location().unwrap().to_url().unwrap();
    ReadingsTable::open_or_create(&url, config.s3.storage_options())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_exactly_once_on_s3() {
    let moto = MotoServer::start();
    let (raw_bucket, lake_bucket) = (moto.create_bucket(), moto.create_bucket());
    let (_dir, config) = s3_config(&moto, &raw_bucket, &lake_bucket);
    let raw_store = store(&moto, &raw_bucket);
    let raw = RawZone::open(
        &config.raw_location().unwrap(),
        &config.s3,
        &config.raw.prefix,
        &config.raw.archive_prefix,
    )
    .unwrap();
    let mut table = open_s3_table(&config).await;

    put_batch(raw_store.as_ref(), &rows("gw-1", 1..=4)).await;
    put_batch(raw_store.as_ref(), &rows("gw-2", 10..=12)).await;
    let report: IngestReport = ingest_all(&raw, &mut table, config.run.max_files_per_commit)
        .await
        .unwrap();
    assert_eq!(report.rows_applied(), 7);
    assert_eq!(report.gateway("gw-1").unwrap().watermark, Some(4));
    assert_eq!(report.gateway("gw-2").unwrap().watermark, Some(12));

    // A retried upload plus a new batch: only the new rows land.
    put_batch(raw_store.as_ref(), &rows("gw-1", 1..=4)).await;
    put_batch(raw_store.as_ref(), &rows("gw-1", 5..=6)).await;
    let report = ingest_all(&raw, &mut table, 100).await.unwrap();
    let gw = report.gateway("gw-1").unwrap();
    assert_eq!(
        (gw.files_applied, gw.rows_applied, gw.rows_skipped),
        (2, 2, 4)
    );
    assert_eq!(gw.watermark, Some(6));

    let mut want = rows("gw-1", 1..=6);
    want.extend(rows("gw-2", 10..=12));
    assert_eq!(table_rows(&mut table).await, want);
    assert!(keys_under(raw_store.as_ref(), "raw/").await.is_empty());
    // The replay is archived under the key of the original it repeats.
    assert_eq!(keys_under(raw_store.as_ref(), "archive/").await.len(), 3);
    // A fresh collector sees the same watermarks in the table.
    let reopened = open_s3_table(&config).await;
    assert_eq!(reopened.watermark("gw-1").await.unwrap(), Some(6));
    assert_eq!(reopened.watermark("gw-2").await.unwrap(), Some(12));
    assert_eq!(reopened.watermark("gw-9").await.unwrap(), None);
    assert_eq!(app_id("gw-1"), "plantline-gateway-gw-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_racing_on_one_gateway_apply_each_row_once() {
    let moto = MotoServer::start();
    let (raw_bucket, lake_bucket) = (moto.create_bucket(), moto.create_bucket());
    let (_dir, config) = s3_config(&moto, &raw_bucket, &lake_bucket);
    let mut first = open_s3_table(&config).await;
    let mut second = open_s3_table(&config).await;
    let batches: Vec<_> = [1..=50, 51..=100]
        .into_iter()
        .map(|r| contract::to_record_batch(&rows("gw-1", r)))
        .collect();

    let (a, b) = tokio::join!(
        first.apply("gw-1", &batches),
        second.apply("gw-1", &batches)
    );
    let (a, b) = (a.unwrap(), b.unwrap());

    let mut applied = [a.rows_applied, b.rows_applied];
    applied.sort_unstable();
    assert_eq!(applied, [0, 100], "{a:?} {b:?}");
    // The loser (usually after losing the commit race) saw the winner's watermark and committed nothing.
    let loser = if a.rows_applied == 0 { &a } else { &b };
    assert_eq!((loser.version, loser.watermark_after), (None, Some(100)));
    assert_eq!(a.version.or(b.version), Some(1));
    assert_eq!(table_rows(&mut first).await, rows("gw-1", 1..=100));
    first.reload().await.unwrap();
    assert_eq!(first.watermark("gw-1").await.unwrap(), Some(100));
}

// ---- independent reader ----

/// `(count(*), sum(seq))` of the table as the `DuckDB` Delta extension reads it.
fn duckdb_count_and_sum_seq(table: &FsPath) -> (i64, i64) {
    let rows = duckdb_query(&format!(
        "SELECT count(*) AS n, sum(seq) AS total FROM delta_scan('{}')",
        table.display()
    ));
    let row = &rows[0];
    (row["n"].as_i64().unwrap(), row["total"].as_i64().unwrap())
}
