//! String readings (batch contract v2's `value_text`) through the collector: v1 and v2 batches
//! side by side in the raw zone, a readings table written before the column existed gaining it
//! without a data file rewritten, the row-level rules on texts, the contract checks that
//! quarantine a file, and `DuckDB` (an independent Delta reader) reading `value_text`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use bytes::Bytes;
use collector::delta::{ReadingsTable, TableUrls, Tables, readings_schema};
use collector::ingest::{GatewayReport, IngestOptions, ingest_gateway};
use collector::quarantine::ProblemKind;
use collector::raw_zone::RawZone;
use collector::rules::{RuleConfig, RuleSet};
use deltalake::kernel::StructType;
use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use edge_agent::contract::{self, BatchKey, Quality, Row};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use pipeline_e2e::duckdb_query;
use serde_json::{Value, json};

const GW: &str = "gw-1";

fn number(seq: i64, value: f64) -> Row {
    Row {
        seq,
        ts_us: 1_767_225_600_000_000 + seq * 1_000_000,
        site: "plant-ost".into(),
        gateway: GW.into(),
        device: "mixer-1".into(),
        tag: "speed".into(),
        value: Some(value),
        quality: Quality::Good,
        unit: Some("rpm".into()),
        value_text: None,
    }
}

fn text(seq: i64, text: Option<&str>) -> Row {
    Row {
        tag: "recipe".into(),
        value: None,
        quality: if text.is_some() {
            Quality::Good
        } else {
            Quality::Bad
        },
        unit: None,
        value_text: text.map(str::to_owned),
        ..number(seq, 0.0)
    }
}

/// `rows` as a batch of contract `version` (v1: without `value_text`).
fn batch_of_version(rows: &[Row], version: u32) -> RecordBatch {
    let current = contract::to_record_batch(rows);
    let schema = contract::schema_of_version(version).unwrap();
    let columns = current.columns()[..schema.fields().len()].to_vec();
    RecordBatch::try_new(schema, columns).unwrap()
}

/// A batch file as an agent of contract `version` writes it; `named` is the version its footer
/// names (normally the same).
fn parquet_bytes(batch: &RecordBatch, named: &str) -> Vec<u8> {
    let seq = batch
        .column(0)
        .as_any()
        .downcast_ref::<arrow_array::Int64Array>()
        .unwrap();
    let meta = |k: &str, v: String| KeyValue::new(k.to_owned(), v);
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(vec![
            meta(contract::metadata::CONTRACT_VERSION, named.to_owned()),
            meta(contract::metadata::GATEWAY, GW.to_owned()),
            meta(contract::metadata::FIRST_SEQ, seq.value(0).to_string()),
            meta(
                contract::metadata::LAST_SEQ,
                seq.value(seq.len() - 1).to_string(),
            ),
        ]))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props)).unwrap();
    writer.write(batch).unwrap();
    writer.close().unwrap();
    out
}

struct Setup {
    dir: tempfile::TempDir,
    store: Arc<dyn ObjectStore>,
    raw: RawZone,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let raw_dir = dir.path().join("landing");
        std::fs::create_dir_all(&raw_dir).unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(&raw_dir).unwrap());
        let raw = RawZone::local(&raw_dir, "raw/", "archive/").unwrap();
        Self { dir, store, raw }
    }

    fn table_path(&self) -> PathBuf {
        self.dir.path().join("lake").join("readings")
    }

    fn urls(&self) -> TableUrls {
        std::fs::create_dir_all(self.table_path()).unwrap();
        TableUrls::beside(&url::Url::from_directory_path(self.table_path()).unwrap()).unwrap()
    }

    async fn put(&self, first_seq: i64, bytes: Vec<u8>) -> String {
        let key = BatchKey::new(GW, first_seq).to_key("raw/");
        self.store
            .put(
                &Path::parse(&key).unwrap(),
                PutPayload::from(Bytes::from(bytes)),
            )
            .await
            .unwrap();
        key
    }

    async fn pass(&self, tables: &mut Tables, rules: RuleSet) -> GatewayReport {
        let options = IngestOptions::new(100).with_rules(rules);
        ingest_gateway(&self.raw, tables, GW, &options)
            .await
            .unwrap()
    }
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

fn duck(table: &FsPath, select: &str) -> Vec<Value> {
    duckdb_query(&select.replace("READINGS", &format!("delta_scan('{}')", table.display())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_batches_apply_side_by_side_and_texts_land_in_value_text() {
    let s = Setup::new();
    // An agent before string tags, then one after: the same gateway, in seq order.
    s.put(
        1,
        parquet_bytes(
            &batch_of_version(&[number(1, 10.0), number(2, 20.0)], 1),
            "1",
        ),
    )
    .await;
    let v2 = [
        number(3, 150.0),
        text(4, Some("MIX-7 (night)")),
        text(5, None),
        text(6, Some("")),
        number(7, 30.0),
    ];
    s.put(3, parquet_bytes(&contract::to_record_batch(&v2), "2"))
        .await;
    let mut tables = Tables::open_or_create(&s.urls(), HashMap::new())
        .await
        .unwrap();
    // Range judges numbers only; not_null counts a text (even an empty one) as a value.
    let report = s
        .pass(
            &mut tables,
            rules(
                r#"
                [[rules]]
                name = "in-range"
                tags = "*"
                range = [0.0, 100.0]
                action = "flag"

                [[rules]]
                name = "present"
                tags = "*"
                not_null = true
                action = "quarantine"
                "#,
            ),
        )
        .await;
    assert!(report.quarantined.is_empty(), "{report:?}");
    assert_eq!((report.files_applied, report.rows_applied), (2, 6));
    assert_eq!((report.rows_flagged, report.rows_quarantined), (1, 1));

    let rows = tables.readings.current_rows_with_flags().await.unwrap();
    assert_eq!(
        rows.iter()
            .map(|(r, f)| (r.seq, r.value, r.value_text.as_deref(), f.as_deref()))
            .collect::<Vec<_>>(),
        [
            (1, Some(10.0), None, None),
            (2, Some(20.0), None, None),
            (3, Some(150.0), None, Some("in-range")),
            (4, None, Some("MIX-7 (night)"), None),
            (6, None, Some(""), None),
            (7, Some(30.0), None, None),
        ]
    );
    let quarantined = tables.quarantined_rows.current_rows().await.unwrap();
    assert_eq!(
        quarantined
            .iter()
            .map(|q| (
                q.row.seq,
                q.row.tag.as_str(),
                q.rule.as_str(),
                q.detail.as_str()
            ))
            .collect::<Vec<_>>(),
        [(5, "recipe", "present", "value is null")]
    );

    // An independent reader sees the column, null for numbers and for the v1 rows.
    assert_eq!(
        duck(
            &s.table_path(),
            "SELECT seq, value, value_text FROM READINGS ORDER BY seq"
        ),
        [
            json!({"seq": 1, "value": 10.0, "value_text": null}),
            json!({"seq": 2, "value": 20.0, "value_text": null}),
            json!({"seq": 3, "value": 150.0, "value_text": null}),
            json!({"seq": 4, "value": null, "value_text": "MIX-7 (night)"}),
            json!({"seq": 6, "value": null, "value_text": ""}),
            json!({"seq": 7, "value": 30.0, "value_text": null}),
        ]
    );
}

/// A readings table as a collector before contract v2 left it: contract v1's columns, with
/// `dq_flags` or without, and two commits of rows. Returns its data files.
async fn table_before_value_text(path: &FsPath, with_flags: bool) -> BTreeSet<String> {
    std::fs::create_dir_all(path).unwrap();
    let url = url::Url::from_directory_path(path).unwrap();
    let v1 = contract::schema_of_version(1).unwrap();
    let mut fields: Vec<arrow_schema::Field> =
        v1.fields().iter().map(|f| f.as_ref().clone()).collect();
    if with_flags {
        fields.push(arrow_schema::Field::new(
            "dq_flags",
            arrow_schema::DataType::Utf8,
            true,
        ));
    }
    let schema = Arc::new(arrow_schema::Schema::new(fields));
    let delta_schema = StructType::try_from_arrow(schema.as_ref()).unwrap();
    let mut table = deltalake::DeltaTableBuilder::from_url(url)
        .unwrap()
        .build()
        .unwrap()
        .create()
        .with_columns(delta_schema.fields().cloned())
        .await
        .unwrap();
    for seqs in [1..=2, 3..=4] {
        let rows: Vec<Row> = seqs.map(|s| number(s, s as f64)).collect();
        let mut columns = batch_of_version(&rows, 1).columns().to_vec();
        if with_flags {
            columns.push(Arc::new(arrow_array::StringArray::new_null(rows.len())));
        }
        let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
        let mut writer = RecordBatchWriter::for_table(&table).unwrap();
        writer.write(batch).await.unwrap();
        writer.flush_and_commit(&mut table).await.unwrap();
    }
    data_files(&table)
}

fn data_files(table: &deltalake::DeltaTable) -> BTreeSet<String> {
    table
        .snapshot()
        .unwrap()
        .log_data()
        .into_iter()
        .map(|f| f.object_store_path().to_string())
        .collect()
}

fn column_names(table: &ReadingsTable) -> Vec<String> {
    table
        .delta_table()
        .snapshot()
        .unwrap()
        .schema()
        .fields()
        .map(|f| f.name().clone())
        .collect()
}

/// The actions of one commit in the table's log, by kind (`add`, `metaData`, ...).
fn commit_actions(path: &FsPath, version: u64) -> Vec<String> {
    let log = std::fs::read_to_string(path.join(format!("_delta_log/{version:020}.json"))).unwrap();
    log.lines()
        .map(|line| {
            let action: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
            action.keys().next().unwrap().clone()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readings_table_from_before_value_text_gains_it_and_keeps_its_rows() {
    for with_flags in [true, false] {
        let s = Setup::new();
        let path = s.table_path();
        let files = table_before_value_text(&path, with_flags).await;
        assert_eq!(files.len(), 2);

        let urls = s.urls();
        let mut tables = Tables::open_or_create(&urls, HashMap::new()).await.unwrap();
        // One commit adds what is missing (both columns to a table without dq_flags), and it
        // only changes the metadata: the data files are the same.
        let want: Vec<String> = readings_schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(column_names(&tables.readings), want);
        assert_eq!(
            tables.readings.version(),
            Some(3),
            "with_flags = {with_flags}"
        );
        assert_eq!(commit_actions(&path, 3), ["commitInfo", "metaData"]);
        assert_eq!(data_files(tables.readings.delta_table()), files);
        let old: Vec<(i64, Option<f64>, Option<String>)> = tables
            .readings
            .current_rows()
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.seq, r.value, r.value_text))
            .collect();
        assert_eq!(
            old,
            [
                (1, Some(1.0), None),
                (2, Some(2.0), None),
                (3, Some(3.0), None),
                (4, Some(4.0), None)
            ]
        );

        // Texts land beside the old rows, and every reader sees one table.
        s.put(
            5,
            parquet_bytes(&contract::to_record_batch(&[text(5, Some("MIX-8"))]), "2"),
        )
        .await;
        let report = s.pass(&mut tables, RuleSet::default()).await;
        assert_eq!(report.rows_applied, 1);
        assert_eq!(
            duck(
                &path,
                "SELECT count(*) AS n, count(value_text) AS texts, max(value_text) AS text, count(dq_flags) AS flagged FROM READINGS"
            ),
            [json!({"n": 5, "texts": 1, "text": "MIX-8", "flagged": 0})]
        );

        // Opening again changes nothing.
        let version = tables.readings.version();
        let reopened = Tables::open_or_create(&urls, HashMap::new()).await.unwrap();
        assert_eq!(reopened.readings.version(), version);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_with_another_order_or_foreign_columns_is_refused_not_evolved() {
    let s = Setup::new();
    let path = s.table_path();
    std::fs::create_dir_all(&path).unwrap();
    // value_text without dq_flags: no collector writes that, so it is not guessed at.
    let schema = StructType::try_from_arrow(contract::schema().as_ref()).unwrap();
    deltalake::DeltaTableBuilder::from_url(url::Url::from_directory_path(&path).unwrap())
        .unwrap()
        .build()
        .unwrap()
        .create()
        .with_columns(schema.fields().cloned())
        .await
        .unwrap();
    let err = Tables::open_or_create(&s.urls(), HashMap::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("readings table: found columns [seq long, ts timestamp, site string, gateway string, device string, tag string, value double, quality string, unit string, value_text string], expected [seq long, ts timestamp, site string, gateway string, device string, tag string, value double, quality string, unit string, dq_flags string, value_text string]"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_that_break_the_v2_rules_are_quarantined_with_the_reason() {
    let s = Setup::new();
    // Names v1 but carries value_text.
    let v1_named = s
        .put(
            1,
            parquet_bytes(&contract::to_record_batch(&[text(1, Some("A"))]), "1"),
        )
        .await;
    // A row with a number and a text.
    let mut both = text(2, Some("B"));
    both.value = Some(1.0);
    let both_key = s
        .put(
            2,
            parquet_bytes(&contract::to_record_batch(&[number(2, 1.0), both]), "2"),
        )
        .await;
    // Names a version this collector does not read yet.
    let newer = s
        .put(
            4,
            parquet_bytes(&contract::to_record_batch(&[number(4, 1.0)]), "4"),
        )
        .await;
    let mut tables = Tables::open_or_create(&s.urls(), HashMap::new())
        .await
        .unwrap();
    let report = s.pass(&mut tables, RuleSet::default()).await;
    let found: Vec<(String, ProblemKind, String)> = report
        .quarantined
        .iter()
        .map(|q| (q.key.clone(), q.reason.kind, q.reason.message.clone()))
        .collect();
    assert_eq!(
        found,
        [
            (
                v1_named.clone(),
                ProblemKind::ForeignSchema,
                String::from(
                    "batch schema does not match contract v1: 10 columns found, 9 expected (`value_text` is not a v1 column); the producer must write the columns listed in docs/batch-contract.md"
                )
            ),
            (
                both_key.clone(),
                ProblemKind::ForeignSchema,
                String::from(
                    "row 1 (seq 2) has both a number in `value` and text in `value_text`; a reading carries one or the other"
                )
            ),
            (
                newer.clone(),
                ProblemKind::ContractVersion,
                String::from(
                    "was written against batch contract v4, this collector reads v1 to v3; upgrade the collector"
                )
            ),
        ]
    );
    assert_eq!(report.rows_applied, 0);
}
