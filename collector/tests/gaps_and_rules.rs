//! The gaps table and the row-level data-quality rules, end to end through the collector's
//! pass: batches written like the agent writes them (some with the agent's `plantline.gaps`
//! footer records), applied to local-path Delta tables and to moto S3, and read back both
//! through the collector's own readers and through DuckDB's Delta reader.

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use collector::config::{CollectorConfig, S3Credentials};
use collector::delta::{GapRow, QuarantinedRow, TableUrls, Tables};
use collector::ingest::{IngestOptions, IngestReport, ingest_all};
use collector::quarantine::ProblemKind;
use collector::raw_zone::RawZone;
use collector::rules::{RuleConfig, RuleCounts, RuleSet};
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
use serde_json::{Value, json};

const GW: &str = "gw-1";

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn row(gateway: &str, seq: i64) -> Row {
    Row {
        seq,
        // Recent readings, so no time rule is broken by accident.
        ts_us: now_us() - 60_000_000 + seq,
        site: "plant-ost".into(),
        gateway: gateway.into(),
        device: "press-3".into(),
        tag: "oil_temp".into(),
        value: Some(40.0 + seq as f64 / 4.0),
        quality: Quality::Good,
        value_text: None,
        unit: Some("degC".into()),
    }
}

fn rows(gateway: &str, seqs: std::ops::RangeInclusive<i64>) -> Vec<Row> {
    seqs.map(|s| row(gateway, s)).collect()
}

/// A batch file as the agent writes it, plus `extra` footer entries.
fn parquet_bytes(rows: &[Row], extra: &[(&str, &str)]) -> Vec<u8> {
    let meta = |k: &str, v: String| KeyValue::new(k.to_owned(), v);
    let mut kv = vec![
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
    ];
    kv.extend(extra.iter().map(|(k, v)| meta(k, (*v).to_owned())));
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_key_value_metadata(Some(kv))
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

fn key(gateway: &str, first_seq: i64) -> String {
    BatchKey::new(gateway, first_seq).to_key("raw/")
}

/// Uploads `rows` under their batch key, with `extra` footer entries.
async fn put_batch_with(store: &dyn ObjectStore, rows: &[Row], extra: &[(&str, &str)]) -> String {
    let key = key(&rows[0].gateway, rows[0].seq);
    put(store, &key, parquet_bytes(rows, extra)).await;
    key
}

async fn put_batch(store: &dyn ObjectStore, rows: &[Row]) -> String {
    put_batch_with(store, rows, &[]).await
}

/// The agent's gap records as the `plantline.gaps` footer value.
fn gap_records(records: &[(i64, i64, i64, &str)]) -> String {
    let list: Vec<Value> = records
        .iter()
        .map(|&(first, last, readings, reason)| {
            json!({"first_seq": first, "last_seq": last, "readings": readings, "reason": reason, "detected_at_us": 1_767_225_600_000_000_i64})
        })
        .collect();
    Value::Array(list).to_string()
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

struct Local {
    dir: tempfile::TempDir,
    store: Arc<dyn ObjectStore>,
    raw: RawZone,
    urls: TableUrls,
    tables: Tables,
}

impl Local {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let raw_dir = dir.path().join("landing");
        std::fs::create_dir_all(&raw_dir).unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(&raw_dir).unwrap());
        let raw = RawZone::local(&raw_dir, "raw/", "archive/").unwrap();
        let urls = TableUrls::beside(
            &url::Url::from_directory_path(dir.path().join("lake/readings")).unwrap(),
        )
        .unwrap();
        let tables = Tables::open_or_create(&urls, HashMap::new()).await.unwrap();
        Self {
            dir,
            store,
            raw,
            urls,
            tables,
        }
    }

    fn path(&self, table: &str) -> PathBuf {
        self.dir.path().join("lake").join(table)
    }

    async fn pass(&mut self, rules: &RuleSet) -> IngestReport {
        let options = IngestOptions::new(100).with_rules(rules.clone());
        ingest_all(&self.raw, &mut self.tables, &options)
            .await
            .unwrap()
    }

    async fn gaps(&mut self) -> Vec<GapRow> {
        self.tables.gaps.current_gaps().await.unwrap()
    }

    async fn readings(&mut self) -> Vec<(Row, Option<String>)> {
        self.tables
            .readings
            .current_rows_with_flags()
            .await
            .unwrap()
    }

    async fn quarantined_rows(&mut self) -> Vec<QuarantinedRow> {
        self.tables.quarantined_rows.current_rows().await.unwrap()
    }
}

fn no_rules() -> RuleSet {
    RuleSet::default()
}

/// Rules from TOML `[[rules]]` entries, checked the way the config loader checks them.
fn rules(toml_text: &str) -> RuleSet {
    #[derive(serde::Deserialize)]
    struct File {
        rules: Vec<RuleConfig>,
    }
    let file: File = toml::from_str(toml_text).unwrap();
    collector::rules::compile(&file.rules).unwrap()
}

/// `(first_seq, last_seq, readings, reason, file_key)` of gap rows.
fn gap_summary(gaps: &[GapRow]) -> Vec<(i64, i64, i64, String, String)> {
    gaps.iter()
        .map(|g| {
            (
                g.first_seq,
                g.last_seq,
                g.readings,
                g.reason.clone(),
                g.file_key.clone(),
            )
        })
        .collect()
}

fn seqs_of(readings: &[(Row, Option<String>)]) -> Vec<i64> {
    readings.iter().map(|(r, _)| r.seq).collect()
}

fn duck(sql: &str) -> Vec<Value> {
    duckdb_query(sql)
}

fn delta_scan(path: &FsPath) -> String {
    format!("delta_scan('{}')", path.display())
}

// ---- gaps ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_jump_becomes_one_gap_row_in_the_same_pass_and_across_passes() {
    let mut s = Local::new().await;
    put_batch(s.store.as_ref(), &rows(GW, 1..=3)).await;
    let after_jump = put_batch(s.store.as_ref(), &rows(GW, 8..=10)).await;
    put_batch(s.store.as_ref(), &rows("gw-2", 1..=2)).await;

    let report = s.pass(&no_rules()).await;

    let want = vec![(4, 7, 4, "seq_jump".to_owned(), after_jump)];
    assert_eq!(gap_summary(&report.gateway(GW).unwrap().gaps), want);
    assert!(report.gateway("gw-2").unwrap().gaps.is_empty());
    assert_eq!(gap_summary(&s.gaps().await), want);
    let gap = &s.gaps().await[0];
    assert_eq!(gap.gateway, GW);
    assert!((now_us() - gap.detected_at_us) < 60_000_000, "{gap:?}");

    // The next batch jumps again, this time from the watermark of the earlier pass.
    let second = put_batch(s.store.as_ref(), &rows(GW, 12..=12)).await;
    let report = s.pass(&no_rules()).await;
    assert_eq!(
        gap_summary(&report.gateway(GW).unwrap().gaps),
        vec![(11, 11, 1, "seq_jump".to_owned(), second.clone())]
    );
    assert_eq!(s.gaps().await.len(), 2);
    assert_eq!(seqs_of(&s.readings().await), [1, 2, 3, 8, 9, 10, 12, 1, 2]);

    // A pass with nothing new, and a replay of every batch, record nothing twice.
    for first in [1, 8, 12] {
        let r: Vec<Row> = match first {
            1 => rows(GW, 1..=3),
            8 => rows(GW, 8..=10),
            _ => rows(GW, 12..=12),
        };
        put_batch(s.store.as_ref(), &r).await;
    }
    let report = s.pass(&no_rules()).await;
    assert_eq!(report.gaps_recorded(), 0);
    assert_eq!(report.gateway(GW).unwrap().rows_skipped, 7);
    assert_eq!(
        gap_summary(&s.gaps().await),
        vec![
            (4, 7, 4, "seq_jump".to_owned(), key(GW, 8)),
            (11, 11, 1, "seq_jump".to_owned(), second),
        ]
    );

    let duck_rows = duck(&format!(
        "SELECT gateway, first_seq, last_seq, readings, reason FROM {} ORDER BY first_seq",
        delta_scan(&s.path("readings_gaps"))
    ));
    assert_eq!(
        duck_rows,
        vec![
            json!({"gateway": GW, "first_seq": 4, "last_seq": 7, "readings": 4, "reason": "seq_jump"}),
            json!({"gateway": GW, "first_seq": 11, "last_seq": 11, "readings": 1, "reason": "seq_jump"}),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gap_record_becomes_the_gap_row_instead_of_a_seq_jump() {
    let mut s = Local::new().await;
    put_batch(s.store.as_ref(), &rows(GW, 1..=3)).await;
    // The gateway dropped 4..=9 when its buffer was full and says so in the next batch.
    let carrier = put_batch_with(
        s.store.as_ref(),
        &rows(GW, 10..=12),
        &[("plantline.gaps", &gap_records(&[(4, 9, 6, "buffer_full")]))],
    )
    .await;
    // A second gateway's record explains only part of its jump; the rest stays a seq_jump.
    put_batch(s.store.as_ref(), &rows("gw-2", 1..=1)).await;
    let partial = put_batch_with(
        s.store.as_ref(),
        &rows("gw-2", 10..=10),
        &[("plantline.gaps", &gap_records(&[(2, 5, 3, "max_age")]))],
    )
    .await;
    // A gateway's very first batch may carry a record for what it lost before it.
    let first = put_batch_with(
        s.store.as_ref(),
        &rows("gw-3", 20..=21),
        &[(
            "plantline.gaps",
            &gap_records(&[(1, 19, 19, "damaged_buffer")]),
        )],
    )
    .await;

    let report = s.pass(&no_rules()).await;

    assert_eq!(report.gaps_recorded(), 4);
    let gaps = s.gaps().await;
    let of = |gw: &str| {
        gap_summary(
            &gaps
                .iter()
                .filter(|g| g.gateway == gw)
                .cloned()
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(of(GW), vec![(4, 9, 6, "buffer_full".to_owned(), carrier)]);
    assert_eq!(
        of("gw-2"),
        vec![
            (2, 5, 3, "max_age".to_owned(), partial.clone()),
            (6, 9, 4, "seq_jump".to_owned(), partial),
        ]
    );
    assert_eq!(
        of("gw-3"),
        vec![(1, 19, 19, "damaged_buffer".to_owned(), first)]
    );
    let agent_row = gaps.iter().find(|g| g.reason == "buffer_full").unwrap();
    assert_eq!(agent_row.detected_at_us, 1_767_225_600_000_000);

    // The same batch again (a retried upload) adds no second record.
    put_batch_with(
        s.store.as_ref(),
        &rows(GW, 10..=12),
        &[("plantline.gaps", &gap_records(&[(4, 9, 6, "buffer_full")]))],
    )
    .await;
    let report = s.pass(&no_rules()).await;
    assert_eq!(report.gaps_recorded(), 0);
    assert_eq!(s.gaps().await, gaps);

    let duck_rows = duck(&format!(
        "SELECT gateway, reason, count(*) AS n, sum(readings) AS lost FROM {} GROUP BY ALL ORDER BY gateway, reason",
        delta_scan(&s.path("readings_gaps"))
    ));
    assert_eq!(
        duck_rows,
        vec![
            json!({"gateway": "gw-1", "reason": "buffer_full", "n": 1, "lost": 6}),
            json!({"gateway": "gw-2", "reason": "max_age", "n": 1, "lost": 3}),
            json!({"gateway": "gw-2", "reason": "seq_jump", "n": 1, "lost": 4}),
            json!({"gateway": "gw-3", "reason": "damaged_buffer", "n": 1, "lost": 19}),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_gap_record_quarantines_its_file_with_a_clear_reason() {
    let mut s = Local::new().await;
    put_batch(s.store.as_ref(), &rows(GW, 1..=3)).await;
    let bad = put_batch_with(
        s.store.as_ref(),
        &rows(GW, 4..=5),
        &[("plantline.gaps", r#"[{"first_seq":9,"last_seq":2}]"#)],
    )
    .await;
    let next = put_batch(s.store.as_ref(), &rows(GW, 6..=7)).await;

    let report = s.pass(&no_rules()).await;

    let gw = report.gateway(GW).unwrap();
    assert_eq!(gw.quarantined.len(), 1);
    assert_eq!(gw.quarantined[0].key, bad);
    assert_eq!(gw.quarantined[0].reason.kind, ProblemKind::MalformedGaps);
    assert_eq!(
        gw.quarantined[0].reason.message,
        "has a malformed `plantline.gaps` footer entry: is not a JSON array of gap records (missing field `readings` at line 1 column 29); expected [{\"first_seq\":1,\"last_seq\":9,\"readings\":9,\"reason\":\"buffer_full\",\"detected_at_us\":1700000000000000}]; the agent writes a JSON array of gap records (docs/data-quality.md)"
    );
    // Its rows are missing, and the gaps table says why, with the footer's last seq.
    assert_eq!(seqs_of(&s.readings().await), [1, 2, 3, 6, 7]);
    assert_eq!(
        gap_summary(&s.gaps().await),
        vec![(
            4,
            5,
            2,
            "quarantined".to_owned(),
            "quarantine/gateway=gw-1/00000000000000000004.parquet".to_owned()
        )]
    );
    let _ = next;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_files_are_recorded_as_quarantined_gaps() {
    let mut s = Local::new().await;
    put_batch(s.store.as_ref(), &rows(GW, 1..=3)).await;
    // Not Parquet: only its key's first seq is known.
    put(s.store.as_ref(), &key(GW, 4), b"#not parquet".to_vec()).await;
    let after = put_batch(s.store.as_ref(), &rows(GW, 9..=10)).await;
    // The first files a gateway ever sent are corrupt: its first good batch closes the range.
    put(s.store.as_ref(), &key("gw-2", 1), b"#junk".to_vec()).await;
    put_batch(s.store.as_ref(), &rows("gw-2", 5..=6)).await;

    let report = s.pass(&no_rules()).await;

    assert_eq!(report.files_quarantined(), 2);
    assert_eq!(
        gap_summary(&s.gaps().await),
        vec![
            (
                4,
                8,
                5,
                "quarantined".to_owned(),
                "quarantine/gateway=gw-1/00000000000000000004.parquet".to_owned()
            ),
            (
                1,
                4,
                4,
                "quarantined".to_owned(),
                "quarantine/gateway=gw-2/00000000000000000001.parquet".to_owned()
            ),
        ]
    );
    let _ = after;
}

/// Copies a local folder tree.
fn copy_dir(from: &FsPath, to: &FsPath) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_that_crashed_before_its_readings_commit_is_replayed_without_duplicates() {
    let mut s = Local::new().await;
    let quarantine_big = rules(
        r#"
[[rules]]
name = "oil-range"
tags = "oil_temp"
range = [0.0, 100.0]
action = "quarantine"
"#,
    );
    put_batch(s.store.as_ref(), &rows(GW, 1..=3)).await;
    s.pass(&quarantine_big).await;
    // The state the crash leaves behind: the readings table and the raw zone as before the
    // next pass, the gaps and quarantined_rows tables as after its first two commits.
    let before = s.dir.path().join("readings-before");
    copy_dir(&s.path("readings"), &before);
    let mut hot = rows(GW, 6..=9);
    hot[1].value = Some(180.0);
    hot[3].value = Some(250.0);
    let file = parquet_bytes(&hot, &[]);
    put(s.store.as_ref(), &key(GW, 6), file.clone()).await;

    let first = s.pass(&quarantine_big).await;
    let gw = first.gateway(GW).unwrap();
    assert_eq!((gw.rows_applied, gw.rows_quarantined), (2, 2));
    assert_eq!(gap_summary(&gw.gaps).len(), 1);

    std::fs::remove_dir_all(s.path("readings")).unwrap();
    copy_dir(&before, &s.path("readings"));
    put(s.store.as_ref(), &key(GW, 6), file).await;
    // The retry even runs without the rule: the readings it quarantined stay decided.
    let mut tables = Tables::open_or_create(&s.urls, HashMap::new())
        .await
        .unwrap();
    assert_eq!(tables.readings.watermark(GW).await.unwrap(), Some(3));
    assert_eq!(tables.gaps.watermark(GW).await.unwrap(), Some(9));
    assert_eq!(
        tables.quarantined_rows.watermark(GW).await.unwrap(),
        Some(9)
    );
    let report = ingest_all(&s.raw, &mut tables, &IngestOptions::new(100))
        .await
        .unwrap();
    s.tables = tables;

    let gw = report.gateway(GW).unwrap();
    assert_eq!(
        (
            gw.rows_applied,
            gw.rows_quarantined,
            gw.rows_skipped,
            gw.gaps.len()
        ),
        (2, 0, 2, 0)
    );
    assert_eq!(seqs_of(&s.readings().await), [1, 2, 3, 6, 8]);
    let quarantined: Vec<i64> = s
        .quarantined_rows()
        .await
        .iter()
        .map(|q| q.row.seq)
        .collect();
    assert_eq!(quarantined, [7, 9]);
    assert_eq!(
        gap_summary(&s.gaps().await),
        vec![(4, 5, 2, "seq_jump".to_owned(), key(GW, 6))]
    );
    // Every seq is in exactly one of the two tables, as an independent reader sees them.
    let union = duck(&format!(
        "SELECT count(*) AS n, count(DISTINCT seq) AS d FROM (SELECT seq FROM {} UNION ALL SELECT seq FROM {})",
        delta_scan(&s.path("readings")),
        delta_scan(&s.path("readings_quarantined_rows"))
    ));
    assert_eq!(union, vec![json!({"n": 7, "d": 7})]);
}

// ---- row-level rules ----

const RULES: &str = r#"
[[rules]]
name = "finite-values"
tags = "*"
finite = true
action = "quarantine"

[[rules]]
name = "oil-temp-range"
tags = "press-*/oil_temp"
range = [-20.0, 150.0]
action = "quarantine"

[[rules]]
name = "pressure-present"
tags = ["pressure"]
not_null = true
action = "flag"

[[rules]]
name = "no-future"
tags = "*"
max_future_skew = "5m"
action = "flag"

[[rules]]
name = "horizon"
tags = "*"
max_age = "24h"
action = "flag"
"#;

#[allow(clippy::too_many_lines)] // one crafted batch, every outcome asserted
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_and_action_acts_on_exactly_the_readings_that_break_it() {
    let mut s = Local::new().await;
    let now = now_us();
    let hour = 3_600_000_000;
    let reading = |seq: i64, device: &str, tag: &str, value: Option<f64>, ts_us: i64| Row {
        seq,
        ts_us,
        site: "plant-ost".into(),
        gateway: GW.into(),
        device: device.into(),
        tag: tag.into(),
        value,
        quality: if value.is_some() {
            Quality::Good
        } else {
            Quality::Bad
        },
        value_text: None,
        unit: None,
    };
    let batch = vec![
        reading(1, "press-3", "oil_temp", Some(80.0), now),
        reading(2, "press-3", "oil_temp", Some(180.0), now), // range → quarantine
        reading(3, "press-3", "oil_temp", Some(f64::NAN), now), // finite first → quarantine
        reading(4, "pump-1", "oil_temp", Some(500.0), now),  // pattern names press-*: kept
        reading(5, "pump-1", "flow", Some(f64::INFINITY), now), // finite → quarantine
        reading(6, "press-3", "pressure", None, now),        // not_null → flag
        reading(7, "press-3", "pressure", Some(5.0), now + hour), // future → flag
        reading(8, "press-3", "pressure", None, now - 48 * hour), // not_null + horizon → 2 flags
        reading(9, "press-3", "oil_temp", Some(200.0), now + hour), // quarantine wins over flag
        reading(10, "pump-1", "flow", None, now),            // null passes finite
    ];
    let file = put_batch(s.store.as_ref(), &batch).await;

    let report = s.pass(&rules(RULES)).await;

    let gw = report.gateway(GW).unwrap();
    assert_eq!(
        (gw.rows_applied, gw.rows_quarantined, gw.rows_flagged),
        (6, 4, 3)
    );
    let count = |flagged, quarantined| RuleCounts {
        flagged,
        quarantined,
        failed_files: 0,
    };
    let want: Vec<(String, RuleCounts)> = vec![
        ("finite-values".into(), count(0, 2)),
        ("horizon".into(), count(1, 0)),
        ("no-future".into(), count(1, 0)),
        ("oil-temp-range".into(), count(0, 2)),
        ("pressure-present".into(), count(2, 0)),
    ];
    assert_eq!(report.rule_counts().into_iter().collect::<Vec<_>>(), want);
    // The readings a quarantine rule took are not gaps: they are in their own table.
    assert!(gw.gaps.is_empty());

    let readings: Vec<(i64, Option<String>)> = s
        .readings()
        .await
        .into_iter()
        .map(|(r, f)| (r.seq, f))
        .collect();
    assert_eq!(
        readings,
        vec![
            (1, None),
            (4, None),
            (6, Some("pressure-present".into())),
            (7, Some("no-future".into())),
            (8, Some("pressure-present,horizon".into())),
            (10, None),
        ]
    );
    let quarantined: Vec<(i64, String, String, String)> = s
        .quarantined_rows()
        .await
        .into_iter()
        .map(|q| {
            assert_eq!(q.file_key, file);
            assert!((now_us() - q.quarantined_at_us) < 60_000_000);
            (q.row.seq, q.rule, q.check, q.detail)
        })
        .collect();
    assert_eq!(
        quarantined,
        vec![
            (
                2,
                "oil-temp-range".into(),
                "range".into(),
                "value 180 is outside the range [-20, 150]".into()
            ),
            (
                3,
                "finite-values".into(),
                "finite".into(),
                "value NaN is not a finite number".into()
            ),
            (
                5,
                "finite-values".into(),
                "finite".into(),
                "value inf is not a finite number".into()
            ),
            (
                9,
                "oil-temp-range".into(),
                "range".into(),
                "value 200 is outside the range [-20, 150]".into()
            ),
        ]
    );
    assert_eq!(s.tables.readings.watermark(GW).await.unwrap(), Some(10));

    // An independent reader sees the flags and the quarantined rows with their rule.
    let flags = duck(&format!(
        "SELECT seq, dq_flags FROM {} WHERE dq_flags IS NOT NULL ORDER BY seq",
        delta_scan(&s.path("readings"))
    ));
    assert_eq!(
        flags,
        vec![
            json!({"seq": 6, "dq_flags": "pressure-present"}),
            json!({"seq": 7, "dq_flags": "no-future"}),
            json!({"seq": 8, "dq_flags": "pressure-present,horizon"}),
        ]
    );
    let by_rule = duck(&format!(
        "SELECT rule, count(*) AS n, min(seq) AS lo FROM {} GROUP BY rule ORDER BY rule",
        delta_scan(&s.path("readings_quarantined_rows"))
    ));
    assert_eq!(
        by_rule,
        vec![
            json!({"rule": "finite-values", "n": 2, "lo": 3}),
            json!({"rule": "oil-temp-range", "n": 2, "lo": 2}),
        ]
    );

    // Running again changes nothing.
    let again = s.pass(&rules(RULES)).await;
    assert_eq!(again.rows_quarantined(), 0);
    assert_eq!(s.quarantined_rows().await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_rule_sends_the_whole_batch_to_the_file_quarantine_and_later_batches_flow() {
    let mut s = Local::new().await;
    let fail = rules(
        r#"
[[rules]]
name = "sane-oil"
tags = "oil_temp"
range = [-50.0, 400.0]
action = "fail"
"#,
    );
    put_batch(s.store.as_ref(), &rows(GW, 1..=3)).await;
    let mut broken = rows(GW, 4..=6);
    broken[1].value = Some(9999.0);
    let bad = put_batch(s.store.as_ref(), &broken).await;
    let after = put_batch(s.store.as_ref(), &rows(GW, 9..=10)).await;

    let report = s.pass(&fail).await;

    let gw = report.gateway(GW).unwrap();
    assert_eq!(gw.quarantined.len(), 1);
    let q = &gw.quarantined[0];
    assert_eq!(
        (q.key.as_str(), q.reason.kind),
        (bad.as_str(), ProblemKind::RuleFailed)
    );
    assert_eq!(q.reason.rule.as_deref(), Some("sane-oil"));
    assert_eq!(
        q.reason.message,
        "reading seq 5 (press-3/oil_temp) breaks rule `sane-oil` (range check, action fail): value 9999 is outside the range [-50, 400]"
    );
    assert_eq!(
        report.rule_counts().get("sane-oil"),
        Some(&RuleCounts {
            flagged: 0,
            quarantined: 0,
            failed_files: 1
        })
    );
    assert_eq!(seqs_of(&s.readings().await), [1, 2, 3, 9, 10]);
    // The reason object knows the file's last seq, so the gap splits where the file ends.
    let reason: Value = serde_json::from_slice(
        &s.store
            .get(
                &Path::parse("quarantine/gateway=gw-1/00000000000000000004.parquet.reason.json")
                    .unwrap(),
            )
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (
            reason["last_seq"].as_i64(),
            reason["reason"]["rule"].as_str()
        ),
        (Some(6), Some("sane-oil"))
    );
    assert_eq!(
        gap_summary(&s.gaps().await),
        vec![
            (
                4,
                6,
                3,
                "quarantined".to_owned(),
                "quarantine/gateway=gw-1/00000000000000000004.parquet".to_owned()
            ),
            (7, 8, 2, "seq_jump".to_owned(), after),
        ]
    );
    assert!(keys_under(s.store.as_ref(), "raw/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readings_table_from_before_dq_flags_gets_the_column_and_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("readings");
    std::fs::create_dir_all(&path).unwrap();
    let url = url::Url::from_directory_path(&path).unwrap();
    // What an earlier collector wrote: the columns of contract v1 only.
    {
        use deltalake::kernel::StructType;
        use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
        use deltalake::writer::{DeltaWriter, RecordBatchWriter};
        let v1 = contract::schema_of_version(1).unwrap();
        let schema = StructType::try_from_arrow(v1.as_ref()).unwrap();
        let mut table = deltalake::DeltaTableBuilder::from_url(url.clone())
            .unwrap()
            .build()
            .unwrap()
            .create()
            .with_columns(schema.fields().cloned())
            .await
            .unwrap();
        let mut writer = RecordBatchWriter::for_table(&table).unwrap();
        let current = contract::to_record_batch(&rows(GW, 1..=2));
        let v1_batch =
            arrow_array::RecordBatch::try_new(v1.clone(), current.columns()[..9].to_vec()).unwrap();
        writer.write(v1_batch).await.unwrap();
        writer.flush_and_commit(&mut table).await.unwrap();
    }
    let urls = TableUrls::beside(&url).unwrap();
    let mut tables = Tables::open_or_create(&urls, HashMap::new()).await.unwrap();
    let flagged = tables.readings.current_rows_with_flags().await.unwrap();
    assert_eq!(
        flagged
            .iter()
            .map(|(r, f)| (r.seq, f.clone()))
            .collect::<Vec<_>>(),
        vec![(1, None), (2, None)]
    );
    assert_eq!(
        duck(&format!(
            "SELECT count(*) AS n, count(dq_flags) AS flagged FROM {}",
            delta_scan(&path)
        )),
        vec![json!({"n": 2, "flagged": 0})]
    );
    // Opening again is a no-op.
    let version = tables.readings.version();
    let reopened = Tables::open_or_create(&urls, HashMap::new()).await.unwrap();
    assert_eq!(reopened.readings.version(), version);
}

// ---- S3 (moto server) ----

fn s3_store(moto: &MotoServer, bucket: &str) -> Arc<dyn ObjectStore> {
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
async fn run_once_on_s3_writes_gaps_and_quarantined_rows_beside_the_readings() {
    let moto = MotoServer::start();
    let (raw_bucket, lake_bucket) = (moto.create_bucket(), moto.create_bucket());
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("collector.toml");
    std::fs::write(
        &config_path,
        format!(
            "[raw]\nurl = \"s3://{raw_bucket}\"\n\n[delta]\nurl = \"s3://{lake_bucket}/readings\"\n\n[s3]\nendpoint = \"{}\"\nallow_http = true\n\n[[rules]]\nname = \"oil-temp-range\"\ntags = \"press-*/oil_temp\"\nrange = [-20.0, 150.0]\naction = \"quarantine\"\n",
            moto.endpoint()
        ),
    )
    .unwrap();
    let mut config = CollectorConfig::load(&config_path).unwrap();
    config.s3.static_credentials = Some(S3Credentials {
        access_key_id: S3_ACCESS_KEY_ID.into(),
        secret_access_key: S3_SECRET_ACCESS_KEY.into(),
    });
    let raw = s3_store(&moto, &raw_bucket);
    put_batch(raw.as_ref(), &rows(GW, 1..=3)).await;
    let mut hot = rows(GW, 10..=12);
    hot[0].value = Some(300.0);
    put_batch_with(
        raw.as_ref(),
        &hot,
        &[("plantline.gaps", &gap_records(&[(4, 6, 3, "buffer_full")]))],
    )
    .await;

    let report = collector::run_once(&config).await.unwrap();

    assert!(report.is_clean());
    let summary = collector::summary::pass_summary(&report);
    assert!(
        summary.contains("gateway gw-1: 2 files, 5 rows applied, 0 duplicate rows skipped, watermark 12, 1 rows quarantined by rules, 2 gaps recorded\n"),
        "{summary}"
    );
    assert!(
        summary.contains("  gap seq 4..=6 (3 readings): buffer_full (raw/gateway=gw-1/00000000000000000010.parquet)\n"),
        "{summary}"
    );
    assert!(
        summary.contains("  gap seq 7..=9 (3 readings): seq_jump (raw/gateway=gw-1/00000000000000000010.parquet)\n"),
        "{summary}"
    );
    assert!(
        summary
            .contains("rule oil-temp-range: 0 rows flagged, 1 rows quarantined, 0 files failed\n"),
        "{summary}"
    );

    // A second run adds nothing anywhere.
    let again = collector::run_once(&config).await.unwrap();
    assert_eq!(
        (
            again.ingest.rows_applied(),
            again.ingest.gaps_recorded(),
            again.ingest.rows_quarantined()
        ),
        (0, 0, 0)
    );

    let local = tempfile::tempdir().unwrap();
    for table in ["readings", "readings_gaps", "readings_quarantined_rows"] {
        moto.download_prefix(
            &lake_bucket,
            &format!("{table}/"),
            &local.path().join(table),
        );
    }
    assert_eq!(
        duck(&format!(
            "SELECT first_seq, last_seq, reason FROM {} ORDER BY first_seq",
            delta_scan(&local.path().join("readings_gaps"))
        )),
        vec![
            json!({"first_seq": 4, "last_seq": 6, "reason": "buffer_full"}),
            json!({"first_seq": 7, "last_seq": 9, "reason": "seq_jump"}),
        ]
    );
    assert_eq!(
        duck(&format!(
            "SELECT seq, value, rule, file_key FROM {}",
            delta_scan(&local.path().join("readings_quarantined_rows"))
        )),
        vec![
            json!({"seq": 10, "value": 300.0, "rule": "oil-temp-range", "file_key": "raw/gateway=gw-1/00000000000000000010.parquet"})
        ]
    );
    assert_eq!(
        duck(&format!(
            "SELECT count(*) AS n, sum(seq) AS s FROM {}",
            delta_scan(&local.path().join("readings"))
        )),
        vec![json!({"n": 5, "s": 29})]
    );
}
