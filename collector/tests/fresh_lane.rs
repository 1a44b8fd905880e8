//! The fresh lane (batch contract v3) through the collector's pass, on moto S3: fresh-lane
//! batches written with the agent's encoder beside a main-lane backlog, applied to Delta tables
//! and read back through DuckDB's Delta reader: fresh readings show up ahead of the backlog, and
//! every `seq` is in the table exactly once, with no gap rows for what the fresh lane applied.

use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use collector::config::{CollectorConfig, S3Credentials};
use collector::delta::{FreshRange, Tables};
use collector::ingest::{GatewayReport, IngestOptions, ingest_all};
use collector::quarantine::{ProblemKind, ReasonObject};
use collector::raw_zone::RawZone;
use collector::rules::{RuleConfig, RuleSet};

use edge_agent::contract::{self, BatchKey, Lane, Quality, Row};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use pipeline_e2e::{MotoServer, S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY, duckdb_query};

const GW: &str = "gw-1";

/// Rules from TOML `[[rules]]` entries, checked the way the config loader checks them.
fn rules(toml_text: &str) -> RuleSet {
    #[derive(serde::Deserialize)]
    struct File {
        rules: Vec<RuleConfig>,
    }
    let file: File = toml::from_str(toml_text).unwrap();
    collector::rules::compile(&file.rules).unwrap()
}

fn row(gateway: &str, seq: i64) -> Row {
    Row {
        seq,
        // Recent readings, so a time rule is never broken by accident.
        ts_us: chrono::Utc::now().timestamp_micros() - 600_000_000 + seq,
        site: "plant-ost".into(),
        gateway: gateway.into(),
        device: "press-3".into(),
        tag: "oil_temp".into(),
        value: Some(40.0 + seq as f64 / 4.0),
        quality: Quality::Good,
        unit: Some("degC".into()),
        value_text: None,
    }
}

fn rows(gateway: &str, seqs: std::ops::RangeInclusive<i64>) -> Vec<Row> {
    seqs.map(|s| row(gateway, s)).collect()
}

/// A moto bucket as the raw zone and another as the lake, with one collector's tables.
struct Setup {
    moto: MotoServer,
    raw_bucket: String,
    lake_bucket: String,
    store: Arc<dyn ObjectStore>,
    config: CollectorConfig,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn start() -> Self {
        let moto = MotoServer::start();
        let (raw_bucket, lake_bucket) = (moto.create_bucket(), moto.create_bucket());
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
        let store: Arc<dyn ObjectStore> = Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(&raw_bucket)
                .with_region(S3_REGION)
                .with_endpoint(moto.endpoint())
                .with_allow_http(true)
                .with_virtual_hosted_style_request(false)
                .with_access_key_id(S3_ACCESS_KEY_ID)
                .with_secret_access_key(S3_SECRET_ACCESS_KEY)
                .build()
                .unwrap(),
        );
        Self {
            moto,
            raw_bucket,
            lake_bucket,
            store,
            config,
            _dir: dir,
        }
    }

    async fn open(&self) -> (RawZone, Tables) {
        collector::open_tables(&self.config).await.unwrap()
    }

    async fn put(&self, key: &str, bytes: Bytes) {
        self.store
            .put(&Path::parse(key).unwrap(), PutPayload::from(bytes))
            .await
            .unwrap();
    }

    /// Main-lane batches of `per_file` readings covering `seqs`, as the agent encodes them.
    async fn put_main(&self, gateway: &str, seqs: std::ops::RangeInclusive<i64>, per_file: i64) {
        let (start, end) = seqs.into_inner();
        for first in (start..=end).step_by(usize::try_from(per_file).unwrap()) {
            let batch = rows(gateway, first..=(first + per_file - 1).min(end));
            let bytes = edge_agent::batch::encode(&batch, &[]).unwrap();
            self.put(&BatchKey::new(gateway, first).to_key("raw/"), bytes)
                .await;
        }
    }

    /// One fresh-lane batch of `seqs`, as the agent encodes it; returns its key.
    async fn put_fresh(&self, gateway: &str, seqs: std::ops::RangeInclusive<i64>) -> String {
        let batch = rows(gateway, seqs);
        let bytes = edge_agent::batch::encode_lane(&batch, &[], Lane::Fresh).unwrap();
        let key = BatchKey::fresh(gateway, batch[0].seq).to_key("raw/");
        self.put(&key, bytes).await;
        key
    }

    fn raw_keys(&self, prefix: &str) -> Vec<String> {
        self.moto.list_keys(&self.raw_bucket, prefix)
    }

    /// `count`, `count(distinct seq)`, `min(seq)`, `max(seq)` and `sum(seq)` of `gateway`'s rows
    /// as DuckDB reads the readings table.
    fn duckdb_seqs(&self, gateway: &str) -> (i64, i64, i64, i64, i64) {
        let copy = tempfile::tempdir().unwrap();
        self.moto
            .download_prefix(&self.lake_bucket, "readings/", copy.path());
        duckdb_summary(copy.path(), gateway)
    }
}

fn duckdb_summary(table: &FsPath, gateway: &str) -> (i64, i64, i64, i64, i64) {
    let rows = duckdb_query(&format!(
        "SELECT count(*) AS n, count(DISTINCT seq) AS d, min(seq) AS lo, max(seq) AS hi, sum(seq) AS s \
         FROM delta_scan('{}') WHERE gateway = '{gateway}'",
        table.display()
    ));
    let r = &rows[0];
    let get = |k: &str| r[k].as_i64().unwrap_or(0);
    (get("n"), get("d"), get("lo"), get("hi"), get("s"))
}

/// DuckDB's figures for a table holding exactly `seqs` of a gateway.
fn exactly(seqs: impl IntoIterator<Item = i64>) -> (i64, i64, i64, i64, i64) {
    let seqs: Vec<i64> = seqs.into_iter().collect();
    let n = i64::try_from(seqs.len()).unwrap();
    (
        n,
        n,
        *seqs.iter().min().unwrap(),
        *seqs.iter().max().unwrap(),
        seqs.iter().sum(),
    )
}

async fn pass(raw: &RawZone, tables: &mut Tables, options: &IngestOptions) -> GatewayReport {
    let report = ingest_all(raw, tables, options).await.unwrap();
    let gw = report.gateway(GW).unwrap().clone();
    assert_eq!(gw.error, None, "{gw:?}");
    gw
}

fn range(first: i64, last: i64) -> FreshRange {
    FreshRange { first, last }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_readings_land_ahead_of_the_backlog_and_the_main_lane_fills_in_each_seq_once() {
    let s = Setup::start();
    let (raw, mut tables) = s.open().await;
    let options = IngestOptions::new(4);
    // After an outage: the backlog's first two batches are up, and a fresh copy of the newest
    // readings went ahead of the rest.
    s.put_main(GW, 1..=20, 10).await;
    let fresh = s.put_fresh(GW, 81..=90).await;

    let gw = pass(&raw, &mut tables, &options).await;
    assert_eq!(gw.watermark, Some(20));
    assert_eq!(gw.fresh_range, Some(range(81, 90)));
    assert_eq!(
        (gw.fresh_files_applied, gw.fresh_rows_applied),
        (1, 10),
        "{gw:?}"
    );
    assert_eq!((gw.files_applied, gw.rows_applied), (3, 30));
    assert!(gw.fresh_deferred.is_empty());
    assert_eq!(
        s.duckdb_seqs(GW),
        exactly((1..=20).chain(81..=90)),
        "the fresh readings are readable before the backlog drained"
    );
    assert_eq!(
        s.raw_keys(&format!("archive/gateway={GW}/fresh/")),
        vec![fresh.replacen("raw/", "archive/", 1)],
        "the fresh batch is archived under the fresh folder"
    );

    // The rest of the backlog, the fresh range's readings included, arrives in the main lane.
    s.put_main(GW, 21..=100, 10).await;
    let gw = pass(&raw, &mut tables, &options).await;
    assert_eq!(gw.watermark, Some(100));
    assert_eq!(gw.rows_applied, 70);
    assert_eq!(gw.rows_skipped, 10, "the fresh range's copies are skipped");
    assert_eq!(gw.fresh_files_applied, 0);
    assert_eq!(s.duckdb_seqs(GW), exactly(1..=100));
    assert!(gw.gaps.is_empty(), "{:?}", gw.gaps);
    assert!(tables.gaps.current_gaps().await.unwrap().is_empty());
    assert!(s.raw_keys("raw/").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_fresh_run_waits_until_the_main_lane_passed_the_last_one() {
    let s = Setup::start();
    let (raw, mut tables) = s.open().await;
    let options = IngestOptions::new(4);
    s.put_main(GW, 1..=80, 20).await;
    s.put_fresh(GW, 81..=90).await;
    // A new run, not contiguous with 81..=90, while the main lane is still at 80.
    let new_run = s.put_fresh(GW, 151..=160).await;

    let gw = pass(&raw, &mut tables, &options).await;
    assert_eq!(gw.watermark, Some(80));
    assert_eq!(gw.fresh_range, Some(range(81, 90)));
    assert_eq!(gw.fresh_deferred, vec![new_run.clone()]);
    assert_eq!(
        s.raw_keys(&format!("raw/gateway={GW}/fresh/")),
        vec![new_run]
    );
    assert_eq!(s.duckdb_seqs(GW), exactly(1..=90));
    // The pass's metrics count it (the registry is the process's; this test's gateway is
    // the only one that defers).
    let report = collector::PassReport::of_ingest(collector::ingest::IngestReport {
        gateways: vec![gw.clone()],
        foreign_folders: Vec::new(),
    });
    let registry = collector::metrics::global();
    let now = std::time::SystemTime::now();
    registry.pass_finished(&report, std::time::Duration::from_millis(1), now);
    let metrics = registry.render(now);
    assert!(
        metrics.lines().any(|l| l
            .starts_with("plantline_collector_fresh_files_deferred_total{gateway=\"gw-1\"} ")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("plantline_collector_fresh_rows_applied_total{gateway=\"gw-1\"} ")),
        "{metrics}"
    );

    // The main lane passes the old range; in the same pass the new run is applied.
    s.put_main(GW, 81..=100, 10).await;
    let gw = pass(&raw, &mut tables, &options).await;
    assert_eq!(gw.watermark, Some(100));
    assert_eq!(gw.fresh_range, Some(range(151, 160)));
    assert_eq!((gw.fresh_files_applied, gw.fresh_rows_applied), (1, 10));
    assert!(gw.fresh_deferred.is_empty());
    assert_eq!(s.duckdb_seqs(GW), exactly((1..=100).chain(151..=160)));
    assert!(s.raw_keys(&format!("raw/gateway={GW}/fresh/")).is_empty());

    // The main lane drains the rest: each seq once, no gap for either range.
    s.put_main(GW, 101..=170, 10).await;
    let gw = pass(&raw, &mut tables, &options).await;
    assert_eq!(gw.watermark, Some(170));
    assert_eq!(s.duckdb_seqs(GW), exactly(1..=170));
    assert!(tables.gaps.current_gaps().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_batch_uploaded_again_with_more_rows_adds_only_the_new_ones() {
    let s = Setup::start();
    let (raw, mut tables) = s.open().await;
    let options = IngestOptions::new(4);
    s.put_main(GW, 1..=10, 10).await;
    s.put_fresh(GW, 81..=85).await;
    s.put_fresh(GW, 86..=88).await;
    let gw = pass(&raw, &mut tables, &options).await;
    assert_eq!(gw.fresh_range, Some(range(81, 88)));
    assert_eq!(gw.fresh_rows_applied, 8);

    // The agent crashed before it recorded 86..=88: its next fresh batch has the same key and
    // more rows.
    s.put_fresh(GW, 86..=95).await;
    let gw = pass(&raw, &mut tables, &options).await;
    assert_eq!((gw.fresh_files_applied, gw.fresh_rows_applied), (1, 7));
    assert_eq!(gw.rows_skipped, 3);
    assert_eq!(gw.fresh_range, Some(range(81, 95)));
    assert_eq!(s.duckdb_seqs(GW), exactly((1..=10).chain(81..=95)));

    // The same file once more (a replay after the archive copy): nothing new.
    s.put_fresh(GW, 86..=95).await;
    let gw = pass(&raw, &mut tables, &options).await;
    assert_eq!((gw.fresh_files_applied, gw.fresh_rows_applied), (1, 0));
    assert_eq!(s.duckdb_seqs(GW), exactly((1..=10).chain(81..=95)));

    s.put_main(GW, 11..=100, 30).await;
    let gw = pass(&raw, &mut tables, &options).await;
    assert_eq!(gw.watermark, Some(100));
    assert_eq!(s.duckdb_seqs(GW), exactly(1..=100));
    assert!(tables.gaps.current_gaps().await.unwrap().is_empty());
}

/// A batch file with exactly these footer entries (besides the encoder's own).
fn with_footer(rows: &[Row], entries: &[(&str, &str)]) -> Bytes {
    let kv = entries
        .iter()
        .map(|(k, v)| KeyValue::new((*k).to_owned(), (*v).to_owned()))
        .collect();
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(kv))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, contract::schema(), Some(props)).unwrap();
    writer.write(&contract::to_record_batch(rows)).unwrap();
    writer.close().unwrap();
    Bytes::from(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_whose_footer_does_not_match_their_lane_are_quarantined_with_the_reason() {
    let s = Setup::start();
    let (raw, mut tables) = s.open().await;
    let options = IngestOptions::new(10);
    s.put_main(GW, 1..=10, 10).await;
    // A main-lane file (v2, no lane entry) put in the fresh folder.
    let v2_in_fresh = BatchKey::fresh(GW, 81).to_key("raw/");
    s.put(
        &v2_in_fresh,
        edge_agent::batch::encode(&rows(GW, 81..=85), &[]).unwrap(),
    )
    .await;
    // A v3 file in the fresh folder without `plantline.lane`.
    let no_lane = BatchKey::fresh(GW, 86).to_key("raw/");
    s.put(
        &no_lane,
        with_footer(
            &rows(GW, 86..=90),
            &[(contract::metadata::CONTRACT_VERSION, "3")],
        ),
    )
    .await;
    // A fresh-lane file put directly in the gateway's folder: it claims the fresh lane.
    let fresh_in_main = BatchKey::new(GW, 11).to_key("raw/");
    s.put(
        &fresh_in_main,
        edge_agent::batch::encode_lane(&rows(GW, 11..=20), &[], Lane::Fresh).unwrap(),
    )
    .await;
    s.put_main(GW, 21..=30, 10).await;

    let gw = pass(&raw, &mut tables, &options).await;
    let mut got: Vec<(String, ProblemKind, String)> = gw
        .quarantined
        .iter()
        .map(|q| (q.key.clone(), q.reason.kind, q.reason.message.clone()))
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            (
                fresh_in_main.clone(),
                ProblemKind::LaneMismatch,
                "carries `plantline.lane` = `fresh` but lies in the main lane (directly in `gateway=<id>/`); fresh-lane files belong in `gateway=<id>/fresh/`".to_owned()
            ),
            (
                v2_in_fresh.clone(),
                ProblemKind::LaneMismatch,
                "lies in the fresh lane (`gateway=<id>/fresh/`) but its footer names batch contract v2; a fresh-lane file names batch contract v3 and carries `plantline.lane` = `fresh`".to_owned()
            ),
            (
                no_lane.clone(),
                ProblemKind::LaneMismatch,
                "lies in the fresh lane (`gateway=<id>/fresh/`) but its footer has no `plantline.lane` entry; a fresh-lane file names batch contract v3 and carries `plantline.lane` = `fresh`".to_owned()
            ),
        ]
    );
    // The quarantine keeps the lane folder, and the reason object says why.
    let reason_key = format!("{}.reason.json", no_lane.replacen("raw/", "quarantine/", 1));
    let reason: ReasonObject =
        serde_json::from_slice(&s.moto.get_object(&s.raw_bucket, &reason_key).unwrap()).unwrap();
    assert_eq!(reason.reason.kind.as_str(), "lane_mismatch");
    assert_eq!(reason.first_seq, Some(86));
    // Nothing of the bad files reached the table; the main lane carried on past the bad one.
    assert_eq!(gw.fresh_range, None);
    assert_eq!(gw.watermark, Some(30));
    assert_eq!(s.duckdb_seqs(GW), exactly((1..=10).chain(21..=30)));
    assert!(s.raw_keys("raw/").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_apply_stops_before_a_reading_a_rule_would_quarantine() {
    let s = Setup::start();
    let (raw, mut tables) = s.open().await;
    let options = IngestOptions::new(4).with_rules(rules(
        "[[rules]]\nname = \"warm\"\ntags = \"press-3/oil_temp\"\naction = \"flag\"\nrange = [0.0, 61.0]\n\n\
         [[rules]]\nname = \"too-hot\"\ntags = \"press-3/oil_temp\"\naction = \"quarantine\"\nrange = [0.0, 62.0]\n",
    ));
    s.put_main(GW, 1..=10, 10).await;
    // 40 + seq / 4 > 62 from seq 89 on.
    s.put_fresh(GW, 81..=92).await;
    let gw = pass(&raw, &mut tables, &options).await;
    assert_eq!(gw.fresh_range, Some(range(81, 88)));
    assert_eq!(gw.fresh_rows_applied, 8);
    assert_eq!(
        gw.rows_quarantined, 0,
        "the fresh lane quarantines no reading"
    );
    // 40 + seq / 4 > 61 from seq 85 on: flagged as the main lane would.
    assert_eq!(gw.rows_flagged, 4);
    // The main lane brings 89..=92 and its rule moves them to the quarantined rows.
    s.put_main(GW, 11..=92, 41).await;
    let gw = pass(&raw, &mut tables, &options).await;
    assert_eq!(gw.watermark, Some(92));
    assert_eq!(gw.rows_quarantined, 4);
    assert_eq!(s.duckdb_seqs(GW), exactly(1..=88));
    let copy = tempfile::tempdir().unwrap();
    s.moto
        .download_prefix(&s.lake_bucket, "readings/", copy.path());
    let flagged = duckdb_query(&format!(
        "SELECT min(seq) AS lo, max(seq) AS hi, count(*) AS n FROM delta_scan('{}') WHERE dq_flags = 'warm'",
        copy.path().display()
    ));
    assert_eq!(
        (
            flagged[0]["lo"].as_i64(),
            flagged[0]["hi"].as_i64(),
            flagged[0]["n"].as_i64()
        ),
        (Some(85), Some(88), Some(4))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_racing_over_both_lanes_apply_every_seq_exactly_once() {
    let s = Setup::start();
    let gateways = ["gw-1", "gw-2", "gw-3"];
    for gateway in gateways {
        s.put_main(gateway, 1..=60, 5).await;
        for first in [31, 36, 41] {
            s.put_fresh(gateway, first..=first + 4).await;
        }
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let collector = |barrier: Arc<tokio::sync::Barrier>| {
        let config = s.config.clone();
        let store = Arc::clone(&s.store);
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
                if pending(store.as_ref()).await == 0 {
                    break;
                }
            }
        }
    };
    let (one, two) = tokio::join!(
        tokio::spawn(collector(Arc::clone(&barrier))),
        tokio::spawn(collector(barrier))
    );
    one.unwrap();
    two.unwrap();
    assert_eq!(pending(s.store.as_ref()).await, 0);
    for gateway in gateways {
        assert_eq!(s.duckdb_seqs(gateway), exactly(1..=60), "{gateway}");
    }
    let (_, mut tables) = s.open().await;
    assert!(tables.gaps.current_gaps().await.unwrap().is_empty());
}

/// Objects still under `raw/`.
async fn pending(store: &dyn ObjectStore) -> usize {
    use futures::TryStreamExt;
    let keys: Vec<_> = store
        .list(Some(&Path::parse("raw/").unwrap()))
        .try_collect()
        .await
        .unwrap();
    keys.len()
}
