//! Applying raw-zone batches to the Delta table exactly once, against local folders and a real
//! S3 peer (moto server), and checked with an independent Delta reader (`DuckDB`).

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use collector::config::{CollectorConfig, S3Credentials};
use collector::delta::{ReadingsTable, TableUrls, Tables, app_id};
use collector::ingest::{GatewayReport, IngestOptions, IngestReport, ingest_all, ingest_gateway};
use collector::quarantine::{ProblemKind, Reason, ReasonObject};
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
        value_text: None,
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
    tables: Tables,
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
    let tables = Tables::open_or_create(
        &TableUrls::beside(&url).unwrap(),
        std::collections::HashMap::default(),
    )
    .await
    .unwrap();
    LocalSetup {
        _dir: dir,
        raw_store,
        raw,
        table_path,
        tables,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_batches_in_seq_order_with_the_watermark_and_archives_them() {
    let mut s = local_setup().await;
    assert_eq!(s.tables.readings.version(), Some(0));
    let (a, b, c) = (
        rows("gw-1", 1..=3),
        rows("gw-1", 4..=6),
        rows("gw-1", 7..=10),
    );
    // Uploaded out of order: the listing, not the upload order, decides.
    let key_c = put_batch(s.raw_store.as_ref(), &c).await;
    let key_a = put_batch(s.raw_store.as_ref(), &a).await;
    let key_b = put_batch(s.raw_store.as_ref(), &b).await;

    let report = ingest_all(&s.raw, &mut s.tables, &IngestOptions::new(100))
        .await
        .unwrap();

    let gw = report.gateway("gw-1").unwrap();
    assert_eq!(gw.files_applied, 3);
    assert_eq!(gw.rows_applied, 10);
    assert_eq!(gw.rows_skipped, 0);
    assert_eq!(gw.watermark, Some(10));
    assert_eq!(gw.delta_version, Some(1));
    assert_eq!(gw.commits, 1);
    assert!(gw.quarantined.is_empty());
    assert_eq!(gw.error, None);
    assert_eq!(s.tables.readings.watermark("gw-1").await.unwrap(), Some(10));
    assert_eq!(
        table_rows(&mut s.tables.readings).await,
        rows("gw-1", 1..=10)
    );
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
    ingest_all(&s.raw, &mut s.tables, &IngestOptions::new(100))
        .await
        .unwrap();

    // The agent retried an upload that had in fact succeeded, and cut an overlapping batch.
    put_batch(s.raw_store.as_ref(), &rows("gw-1", 1..=5)).await;
    put_batch(s.raw_store.as_ref(), &rows("gw-1", 4..=8)).await;
    let report = ingest_all(&s.raw, &mut s.tables, &IngestOptions::new(100))
        .await
        .unwrap();

    let gw = report.gateway("gw-1").unwrap();
    assert_eq!(gw.files_applied, 2);
    assert_eq!(gw.rows_applied, 3);
    assert_eq!(gw.rows_skipped, 5 + 2);
    assert_eq!(gw.watermark, Some(8));
    assert_eq!(gw.delta_version, Some(2));
    assert_eq!(
        table_rows(&mut s.tables.readings).await,
        rows("gw-1", 1..=8)
    );
    assert!(keys_under(s.raw_store.as_ref(), "raw/").await.is_empty());

    // A replay that is entirely below the watermark is archived without a commit.
    put_batch(s.raw_store.as_ref(), &rows("gw-1", 6..=8)).await;
    let report = ingest_all(&s.raw, &mut s.tables, &IngestOptions::new(100))
        .await
        .unwrap();
    let gw = report.gateway("gw-1").unwrap();
    assert_eq!(
        (gw.files_applied, gw.rows_applied, gw.rows_skipped),
        (1, 0, 3)
    );
    assert_eq!((gw.delta_version, gw.commits), (None, 0));
    assert_eq!(s.tables.readings.version(), Some(2));
    assert!(keys_under(s.raw_store.as_ref(), "raw/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_ingest_twice_adds_nothing() {
    let mut s = local_setup().await;
    put_batch(s.raw_store.as_ref(), &rows("gw-1", 1..=4)).await;
    ingest_all(&s.raw, &mut s.tables, &IngestOptions::new(100))
        .await
        .unwrap();
    let version = s.tables.readings.version();

    let report = ingest_all(&s.raw, &mut s.tables, &IngestOptions::new(100))
        .await
        .unwrap();

    let gw = report.gateway("gw-1").unwrap();
    assert_eq!((gw.files_applied, gw.rows_applied, gw.commits), (0, 0, 0));
    assert_eq!(gw.watermark, Some(4));
    assert_eq!(s.tables.readings.version(), version);
    assert_eq!(
        table_rows(&mut s.tables.readings).await,
        rows("gw-1", 1..=4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_commit_and_archive_is_harmless() {
    let mut s = local_setup().await;
    let batch = rows("gw-1", 1..=4);
    put_batch(s.raw_store.as_ref(), &batch).await;
    // The commit landed, the process died before archiving.
    let outcome = s
        .tables
        .readings
        .apply("gw-1", &[contract::to_record_batch(&batch)])
        .await
        .unwrap();
    assert_eq!(outcome.version, Some(1));

    let report = ingest_all(&s.raw, &mut s.tables, &IngestOptions::new(100))
        .await
        .unwrap();

    let gw = report.gateway("gw-1").unwrap();
    assert_eq!(
        (gw.files_applied, gw.rows_applied, gw.rows_skipped),
        (1, 0, 4)
    );
    assert_eq!(table_rows(&mut s.tables.readings).await, batch);
    assert!(keys_under(s.raw_store.as_ref(), "raw/").await.is_empty());
}

/// Deterministic noise that does not start with the Parquet magic.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        })
        .collect();
    out[0] = b'#';
    out
}

/// A valid Parquet file whose columns are not the contract's.
fn foreign_schema_bytes() -> Vec<u8> {
    use arrow_array::{Float64Array, Int64Array, RecordBatch, StringArray};
    let batch = RecordBatch::try_from_iter([
        (
            "id",
            Arc::new(Int64Array::from(vec![1, 2])) as arrow_array::ArrayRef,
        ),
        ("name", Arc::new(StringArray::from(vec!["a", "b"])) as _),
        ("reading", Arc::new(Float64Array::from(vec![0.5, 1.5])) as _),
    ])
    .unwrap();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

async fn get(store: &dyn ObjectStore, key: &str) -> Vec<u8> {
    store
        .get(&Path::parse(key).unwrap())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

async fn reason_object(store: &dyn ObjectStore, quarantine_key: &str) -> ReasonObject {
    let json = get(store, &format!("{quarantine_key}.reason.json")).await;
    serde_json::from_slice(&json).unwrap()
}

/// `(key, kind, message)` of each quarantined file, in report order.
fn quarantined(gw: &GatewayReport) -> Vec<(String, ProblemKind, String)> {
    gw.quarantined
        .iter()
        .map(|q| (q.key.clone(), q.reason.kind, q.reason.message.clone()))
        .collect()
}

fn seqs(gateway: &str, ranges: &[std::ops::RangeInclusive<i64>]) -> Vec<Row> {
    ranges
        .iter()
        .flat_map(|r| rows(gateway, r.clone()))
        .collect()
}

// One scenario, asserted end to end: splitting it would hide which file broke which step.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_between_good_batches_are_quarantined_and_the_rest_applied_once() {
    let mut s = local_setup().await;
    let store = s.raw_store.as_ref();
    let started = chrono::Utc::now();
    for good in [1..=3, 5..=6, 9..=10, 12..=13, 16..=17, 19..=20] {
        put_batch(store, &rows("gw-a", good)).await;
    }
    let key = |seq| BatchKey::new("gw-a", seq).to_key("raw/");
    let corrupt = random_bytes(512);
    put(store, &key(4), corrupt.clone()).await;
    let valid = parquet_bytes(&rows("gw-a", 7..=8));
    let truncated = valid[..valid.len() / 2].to_vec();
    put(store, &key(7), truncated.clone()).await;
    put(store, &key(11), foreign_schema_bytes()).await;
    put(store, &key(14), parquet_bytes(&rows("gw-z", 14..=15))).await;
    let mut duplicate = rows("gw-a", 18..=18);
    duplicate.push(row("gw-a", 18));
    put(store, &key(18), parquet_bytes(&duplicate)).await;
    put(store, "raw/gateway=gw-a/notes.txt", b"hi".to_vec()).await;
    // The agent's folder sink is writing the next batch right now.
    let in_flight = "raw/gateway=gw-a/.00000000000000000021.parquet.tmp-42";
    put(store, in_flight, b"PAR1 half".to_vec()).await;
    put_batch(store, &rows("gw-b", 1..=4)).await;

    // Three files per commit, so bad files sit at the start, middle and end of commits.
    let report = ingest_all(&s.raw, &mut s.tables, &IngestOptions::new(3))
        .await
        .unwrap();

    let a = report.gateway("gw-a").unwrap();
    assert_eq!(
        quarantined(a),
        vec![
            (
                "raw/gateway=gw-a/notes.txt".to_owned(),
                ProblemKind::ForeignKey,
                "is not a batch key; expected `<prefix>gateway=<id>/<first seq, 20 digits>.parquet` (main lane) or `<prefix>gateway=<id>/fresh/<first seq, 20 digits>.parquet` (fresh lane)".to_owned()
            ),
            (
                key(4),
                ProblemKind::NotParquet,
                "is not a Parquet file: it does not start with the `PAR1` magic bytes (512 bytes)".to_owned()
            ),
            (
                key(7),
                ProblemKind::Truncated,
                format!(
                    "is a truncated Parquet file: it starts with the `PAR1` magic bytes but does not end with them ({} bytes); the upload was cut short",
                    truncated.len()
                )
            ),
            (
                key(11),
                ProblemKind::ForeignSchema,
                "batch schema does not match contract v2: 3 columns found, 10 expected (`id` is not a v2 column); the producer must write the columns listed in docs/batch-contract.md".to_owned()
            ),
            (
                key(14),
                ProblemKind::ForeignGateway,
                "holds rows of gateway `gw-z` but lies in the folder of gateway `gw-a`".to_owned()
            ),
            (
                key(18),
                ProblemKind::DuplicateSeq,
                "batch is not sorted by seq: seq 18 follows 18".to_owned()
            ),
        ]
    );
    assert!(a.quarantined.iter().all(|q| !q.resumed));
    assert_eq!(
        (a.files_applied, a.rows_applied, a.rows_skipped, a.watermark),
        (6, 13, 0, Some(20))
    );
    assert_eq!(a.error, None);
    assert_eq!(a.in_flight, vec![in_flight.to_owned()]);
    let b = report.gateway("gw-b").unwrap();
    assert_eq!((b.rows_applied, b.watermark), (4, Some(4)));
    assert!(b.quarantined.is_empty());
    assert_eq!(report.files_quarantined(), 6);

    let mut want = seqs("gw-a", &[1..=3, 5..=6, 9..=10, 12..=13, 16..=17, 19..=20]);
    want.extend(rows("gw-b", 1..=4));
    assert_eq!(table_rows(&mut s.tables.readings).await, want);
    assert_eq!(duckdb_count_and_sum_seq(&s.table_path), (17, 143));

    // Only the upload in flight is left in the raw zone; each bad file sits in the quarantine
    // under its own name with its reason beside it.
    assert_eq!(keys_under(store, "raw/").await, vec![in_flight.to_owned()]);
    let mut want_quarantine = Vec::new();
    for q in &a.quarantined {
        want_quarantine.push(q.quarantine_key.clone());
        want_quarantine.push(format!("{}.reason.json", q.quarantine_key));
    }
    want_quarantine.sort();
    assert_eq!(keys_under(store, "quarantine/").await, want_quarantine);
    assert_eq!(
        a.quarantined[1].quarantine_key,
        "quarantine/gateway=gw-a/00000000000000000004.parquet"
    );
    assert_eq!(get(store, &a.quarantined[1].quarantine_key).await, corrupt);

    let reason = reason_object(store, &a.quarantined[2].quarantine_key).await;
    let detected = chrono::DateTime::parse_from_rfc3339(&reason.detected_at).unwrap();
    assert!(
        detected >= started && detected <= chrono::Utc::now(),
        "{reason:?}"
    );
    assert!(reason.detected_at.ends_with('Z'), "{}", reason.detected_at);
    assert_eq!(
        reason,
        ReasonObject {
            key: key(7),
            gateway: "gw-a".into(),
            first_seq: Some(7),
            last_seq: None,
            quarantine_key: "quarantine/gateway=gw-a/00000000000000000007.parquet".into(),
            reason: a.quarantined[2].reason.clone(),
            detected_at: reason.detected_at.clone(),
            collector_version: env!("CARGO_PKG_VERSION").into(),
            size: truncated.len() as u64,
        }
    );
    let json: serde_json::Value =
        serde_json::from_slice(&get(store, "quarantine/gateway=gw-a/notes.txt.reason.json").await)
            .unwrap();
    assert_eq!(json["reason"]["kind"], "foreign_key");
    assert_eq!(json["first_seq"], serde_json::Value::Null);
    assert_eq!(json["size"], 2);

    // The next pass finds nothing new and commits nothing.
    let version = s.tables.readings.version();
    let report = ingest_all(&s.raw, &mut s.tables, &IngestOptions::new(3))
        .await
        .unwrap();
    let a = report.gateway("gw-a").unwrap();
    assert_eq!(
        (a.files_applied, a.rows_applied, a.watermark),
        (0, 0, Some(20))
    );
    assert_eq!(report.files_quarantined(), 0);
    assert_eq!(s.tables.readings.version(), version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_quarantine_copy_and_the_delete_is_finished_on_the_next_pass() {
    let mut s = local_setup().await;
    let store = s.raw_store.as_ref();
    let earlier = ReasonObject {
        key: "raw/gateway=gw-b/00000000000000000003.parquet".into(),
        gateway: "gw-b".into(),
        first_seq: Some(3),
        last_seq: None,
        quarantine_key: "quarantine/gateway=gw-b/00000000000000000003.parquet".into(),
        reason: Reason {
            kind: ProblemKind::NotParquet,
            message:
                "is not a Parquet file: it does not start with the `PAR1` magic bytes (64 bytes)"
                    .into(),
            rule: None,
        },
        detected_at: "2026-01-01T00:00:00.000Z".into(),
        collector_version: "0.0.9".into(),
        size: 64,
    };
    for gateway in ["gw-a", "gw-b"] {
        put_batch(store, &rows(gateway, 1..=2)).await;
        let bad = BatchKey::new(gateway, 3).to_key("raw/");
        put(store, &bad, random_bytes(64)).await;
        put_batch(store, &rows(gateway, 4..=5)).await;
        // The earlier pass copied the file and died: gw-a before writing the reason, gw-b after.
        put(
            store,
            &bad.replacen("raw/", "quarantine/", 1),
            random_bytes(64),
        )
        .await;
    }
    put(
        store,
        "quarantine/gateway=gw-b/00000000000000000003.parquet.reason.json",
        serde_json::to_vec(&earlier).unwrap(),
    )
    .await;

    let report = ingest_all(&s.raw, &mut s.tables, &IngestOptions::new(100))
        .await
        .unwrap();

    for gateway in ["gw-a", "gw-b"] {
        let gw = report.gateway(gateway).unwrap();
        assert_eq!(gw.quarantined.len(), 1, "{gw:?}");
        assert!(gw.quarantined[0].resumed);
        assert_eq!(gw.quarantined[0].reason.kind, ProblemKind::NotParquet);
        assert_eq!((gw.rows_applied, gw.watermark), (4, Some(5)));
    }
    assert!(keys_under(store, "raw/").await.is_empty());
    assert_eq!(
        keys_under(store, "quarantine/").await,
        vec![
            "quarantine/gateway=gw-a/00000000000000000003.parquet",
            "quarantine/gateway=gw-a/00000000000000000003.parquet.reason.json",
            "quarantine/gateway=gw-b/00000000000000000003.parquet",
            "quarantine/gateway=gw-b/00000000000000000003.parquet.reason.json",
        ]
    );
    // The first detection is kept; the missing reason is written now.
    let b = reason_object(
        store,
        "quarantine/gateway=gw-b/00000000000000000003.parquet",
    )
    .await;
    assert_eq!(b, earlier);
    let a = reason_object(
        store,
        "quarantine/gateway=gw-a/00000000000000000003.parquet",
    )
    .await;
    assert_eq!(
        (a.key.as_str(), a.size, a.collector_version.as_str()),
        (
            "raw/gateway=gw-a/00000000000000000003.parquet",
            64,
            env!("CARGO_PKG_VERSION")
        )
    );
    let mut want = seqs("gw-a", &[1..=2, 4..=5]);
    want.extend(seqs("gw-b", &[1..=2, 4..=5]));
    assert_eq!(table_rows(&mut s.tables.readings).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_files_per_commit_splits_a_backlog_into_several_commits() {
    let mut s = local_setup().await;
    for first in [1, 3, 5, 7, 9] {
        put_batch(s.raw_store.as_ref(), &rows("gw-1", first..=first + 1)).await;
    }

    let report = ingest_gateway(&s.raw, &mut s.tables, "gw-1", &IngestOptions::new(2))
        .await
        .unwrap();

    assert_eq!(
        (report.files_applied, report.rows_applied, report.commits),
        (5, 10, 3)
    );
    assert_eq!(report.delta_version, Some(3));
    assert_eq!(report.watermark, Some(10));
    assert_eq!(
        table_rows(&mut s.tables.readings).await,
        rows("gw-1", 1..=10)
    );
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
    s3_config_with(moto, raw_bucket, lake_bucket, "")
}

/// [`s3_config`] with extra lines in the `[raw]` section.
fn s3_config_with(
    moto: &MotoServer,
    raw_bucket: &str,
    lake_bucket: &str,
    raw_extra: &str,
) -> (tempfile::TempDir, CollectorConfig) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collector.toml");
    std::fs::write(
        &path,
        format!(
            "[raw]\nurl = \"s3://{raw_bucket}\"\n{raw_extra}\n[delta]\nurl = \"s3://{lake_bucket}/readings\"\n\n[s3]\nendpoint = \"{}\"\nallow_http = true\n",
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
    let (_, mut tables) = collector::open_tables(&config).await.unwrap();
    let options = IngestOptions::new(config.run.max_files_per_commit);

    put_batch(raw_store.as_ref(), &rows("gw-1", 1..=4)).await;
    put_batch(raw_store.as_ref(), &rows("gw-2", 10..=12)).await;
    let report: IngestReport = ingest_all(&raw, &mut tables, &options).await.unwrap();
    assert_eq!(report.rows_applied(), 7);
    assert_eq!(report.gateway("gw-1").unwrap().watermark, Some(4));
    assert_eq!(report.gateway("gw-2").unwrap().watermark, Some(12));

    // A retried upload plus a new batch: only the new rows land.
    put_batch(raw_store.as_ref(), &rows("gw-1", 1..=4)).await;
    put_batch(raw_store.as_ref(), &rows("gw-1", 5..=6)).await;
    let report = ingest_all(&raw, &mut tables, &options).await.unwrap();
    let gw = report.gateway("gw-1").unwrap();
    assert_eq!(
        (gw.files_applied, gw.rows_applied, gw.rows_skipped),
        (2, 2, 4)
    );
    assert_eq!(gw.watermark, Some(6));

    let mut want = rows("gw-1", 1..=6);
    want.extend(rows("gw-2", 10..=12));
    assert_eq!(table_rows(&mut tables.readings).await, want);
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

// One scenario, asserted end to end: splitting it would hide which file broke which step.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_on_s3_move_to_the_configured_quarantine_and_later_batches_flow() {
    let moto = MotoServer::start();
    let (raw_bucket, lake_bucket) = (moto.create_bucket(), moto.create_bucket());
    let (_dir, config) = s3_config_with(
        &moto,
        &raw_bucket,
        &lake_bucket,
        "quarantine_prefix = \"bad-files/\"\n",
    );
    let raw_store = store(&moto, &raw_bucket);
    let store = raw_store.as_ref();
    put_batch(store, &rows("gw-1", 1..=3)).await;
    let valid = parquet_bytes(&rows("gw-1", 4..=5));
    let truncated = valid[..valid.len() / 2].to_vec();
    put(
        store,
        &BatchKey::new("gw-1", 4).to_key("raw/"),
        truncated.clone(),
    )
    .await;
    // Rows 8..=9 under the key of seq 6.
    let wrong_key = BatchKey::new("gw-1", 6).to_key("raw/");
    put(store, &wrong_key, parquet_bytes(&rows("gw-1", 8..=9))).await;
    put(
        store,
        &BatchKey::new("gw-1", 12).to_key("raw/"),
        foreign_schema_bytes(),
    )
    .await;
    put_batch(store, &rows("gw-1", 13..=14)).await;
    // gw-1's rows uploaded into gw-2's folder, then gw-2's own batch.
    let wrong_gateway = BatchKey::new("gw-2", 1).to_key("raw/");
    put(store, &wrong_gateway, parquet_bytes(&rows("gw-1", 1..=3))).await;
    put_batch(store, &rows("gw-2", 2..=3)).await;

    let report = collector::run_once(&config).await.unwrap();

    assert!(report.is_clean());
    let one = report.ingest.gateway("gw-1").unwrap();
    assert_eq!(
        quarantined(one)
            .into_iter()
            .map(|(key, kind, _)| (key, kind))
            .collect::<Vec<_>>(),
        vec![
            (
                BatchKey::new("gw-1", 4).to_key("raw/"),
                ProblemKind::Truncated
            ),
            (wrong_key.clone(), ProblemKind::FirstSeqMismatch),
            (
                BatchKey::new("gw-1", 12).to_key("raw/"),
                ProblemKind::ForeignSchema
            ),
        ]
    );
    assert_eq!(
        one.quarantined[1].reason.message,
        "its first seq is 8 but its key says 6; keys must be derived from the first seq"
    );
    assert_eq!((one.rows_applied, one.watermark), (5, Some(14)));
    let two = report.ingest.gateway("gw-2").unwrap();
    assert_eq!(
        quarantined(two),
        vec![(
            wrong_gateway,
            ProblemKind::ForeignGateway,
            "holds rows of gateway `gw-1` but lies in the folder of gateway `gw-2`".to_owned()
        )]
    );
    assert_eq!((two.rows_applied, two.watermark), (2, Some(3)));
    assert_eq!(report.ingest.files_quarantined(), 4);

    assert!(moto.list_keys(&raw_bucket, "raw/").is_empty());
    assert_eq!(
        moto.list_keys(&raw_bucket, "bad-files/"),
        vec![
            "bad-files/gateway=gw-1/00000000000000000004.parquet",
            "bad-files/gateway=gw-1/00000000000000000004.parquet.reason.json",
            "bad-files/gateway=gw-1/00000000000000000006.parquet",
            "bad-files/gateway=gw-1/00000000000000000006.parquet.reason.json",
            "bad-files/gateway=gw-1/00000000000000000012.parquet",
            "bad-files/gateway=gw-1/00000000000000000012.parquet.reason.json",
            "bad-files/gateway=gw-2/00000000000000000001.parquet",
            "bad-files/gateway=gw-2/00000000000000000001.parquet.reason.json",
        ]
    );
    assert_eq!(
        moto.get_object(
            &raw_bucket,
            "bad-files/gateway=gw-1/00000000000000000004.parquet"
        ),
        Some(truncated.clone())
    );
    let reason: serde_json::Value = serde_json::from_slice(
        &moto
            .get_object(
                &raw_bucket,
                "bad-files/gateway=gw-1/00000000000000000004.parquet.reason.json",
            )
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        reason["key"],
        "raw/gateway=gw-1/00000000000000000004.parquet"
    );
    assert_eq!(reason["gateway"], "gw-1");
    assert_eq!(reason["first_seq"], 4);
    assert_eq!(reason["reason"]["kind"], "truncated");
    assert_eq!(reason["size"], truncated.len());
    assert_eq!(reason["collector_version"], env!("CARGO_PKG_VERSION"));

    let mut table = open_s3_table(&config).await;
    let mut want = seqs("gw-1", &[1..=3, 13..=14]);
    want.extend(rows("gw-2", 2..=3));
    assert_eq!(table_rows(&mut table).await, want);
    // An independent reader agrees.
    let copy = tempfile::tempdir().unwrap();
    moto.download_prefix(&lake_bucket, "readings/", copy.path());
    assert_eq!(duckdb_count_and_sum_seq(copy.path()), (7, 38));
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
