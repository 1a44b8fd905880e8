//! Loading the readings table through a stage, against a real fakesnow server: files `PUT`
//! into an internal stage, or read by `COPY INTO` from an external stage whose URL is the local
//! Delta table (`file://`, as fakesnow cannot reach S3). Both load exactly once, never load an
//! `OPTIMIZE` rewrite, split big groups into several `COPY` statements, and fill columns a file
//! lacks (newer contract columns, partition columns) as the rows path does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow_schema::{DataType as ArrowType, Field, Schema, TimeUnit};
use collector::config::CollectorConfig;
use collector::snowflake::{SnowflakeClient, SnowflakeConfig, load};
use deltalake::DeltaTable;
use deltalake::kernel::{DataType, StructField};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use edge_agent::contract::{BatchKey, Quality, Row};
use pipeline_e2e::FakeSnow;

fn database() -> String {
    format!("DB_{}", uuid::Uuid::new_v4().simple())
}

/// `[snowflake]` for a fresh database; `password_file` is what `collector run-once` logs in with
/// (fakesnow accepts any password).
fn snowflake_toml(server: &FakeSnow, database: &str, password_file: &Path, mode: &str) -> String {
    format!(
        r#"
url = "{}"
account = "plantline"
user = "LOADER"
password_file = {:?}
database = "{database}"
schema = "RAW"
request_timeout = "30s"
{mode}
"#,
        server.url(),
        password_file.display().to_string()
    )
}

async fn connect(cfg: &SnowflakeConfig) -> SnowflakeClient {
    SnowflakeClient::login_with_password(cfg, "not-checked-by-fakesnow".into())
        .await
        .expect("login to fakesnow")
}

/// The stage each mode loads from, made as `collector snowflake init` (internal) or an admin
/// following its template (external, here over the local table) would.
async fn create_stage(client: &mut SnowflakeClient, mode: &str, readings: &Path) {
    let sql = if mode == "external_stage" {
        let url = url::Url::from_directory_path(readings).unwrap();
        format!("CREATE STAGE IF NOT EXISTS PLANTLINE_DELTA_STAGE URL = '{url}'")
    } else {
        "CREATE STAGE IF NOT EXISTS PLANTLINE_LOAD_STAGE".to_owned()
    };
    client.execute(&sql, &[]).await.unwrap();
}

fn mode_settings(mode: &str, extra: &str) -> String {
    let stage = if mode == "external_stage" {
        "external_stage = \"PLANTLINE_DELTA_STAGE\"\n"
    } else {
        ""
    };
    format!("load_mode = \"{mode}\"\n{stage}{extra}")
}

/// A batch file of readings, as the agent uploads it, under the collector's raw folder.
fn upload(raw: &Path, rows: &[Row]) {
    let key = BatchKey::new(&rows[0].gateway, rows[0].seq).to_key("raw/");
    let path = raw.join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let batch = edge_agent::contract::to_record_batch(rows);
    let mut bytes = Vec::new();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn row(gateway: &str, seq: i64) -> Row {
    Row {
        seq,
        ts_us: chrono::Utc::now().timestamp_micros() - 60_000_000 + seq,
        site: "plant-a".into(),
        gateway: gateway.into(),
        device: "press-3".into(),
        tag: "oil_temp".into(),
        #[allow(clippy::cast_precision_loss)]
        value: Some(seq as f64 / 4.0),
        quality: Quality::Good,
        unit: Some("degC".into()),
        value_text: None,
    }
}

fn rows(gateway: &str, seqs: std::ops::RangeInclusive<i64>) -> Vec<Row> {
    seqs.map(|s| row(gateway, s)).collect()
}

fn collector_config(dir: &Path, server: &FakeSnow, database: &str, mode: &str) -> PathBuf {
    let path = dir.join("collector.toml");
    let password = dir.join("snowflake-password");
    std::fs::write(&password, "not-checked-by-fakesnow\n").unwrap();
    std::fs::write(
        &path,
        format!(
            "[raw]\nurl = \"{}\"\n\n[delta]\nurl = \"{}\"\n\n[snowflake]\n{}",
            dir.join("landing").display(),
            dir.join("lake/readings").display(),
            snowflake_toml(server, database, &password, mode)
        ),
    )
    .unwrap();
    path
}

/// (gateway, seq, value) of every row in READINGS, sorted.
async fn loaded(client: &mut SnowflakeClient) -> Vec<(String, i64, f64)> {
    let result = client
        .execute(
            "SELECT GATEWAY, SEQ, TO_VARCHAR(VALUE) FROM READINGS ORDER BY GATEWAY, SEQ",
            &[],
        )
        .await
        .unwrap();
    (0..result.num_rows())
        .map(|i| {
            (
                result.text_at(i, 0).unwrap().unwrap(),
                result.i64_at(i, 1).unwrap().unwrap(),
                result
                    .text_at(i, 2)
                    .unwrap()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN),
            )
        })
        .collect()
}

fn expected(all: &[Row]) -> Vec<(String, i64, f64)> {
    let mut out: Vec<_> = all
        .iter()
        .map(|r| (r.gateway.clone(), r.seq, r.value.unwrap()))
        .collect();
    out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    out
}

async fn delta_file_count(config: &CollectorConfig) -> u64 {
    let (_, tables) = collector::open_tables(config).await.unwrap();
    let files = tables
        .readings
        .delta_table()
        .get_file_uris()
        .unwrap()
        .count();
    u64::try_from(files).unwrap()
}

/// One whole scenario per mode: first load, replay, `OPTIMIZE` and more data, and a group of
/// files split into several `COPY` statements.
async fn stage_mode_loads_exactly_once(mode: &str) {
    let server = FakeSnow::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("landing");
    let database = database();
    // two files per COPY, so the first load's five files take three statements
    let config_path = collector_config(
        dir.path(),
        &server,
        &database,
        &mode_settings(mode, "copy_chunk_files = 2"),
    );
    let config = CollectorConfig::load(&config_path).unwrap();
    let sf = config.snowflake.clone().unwrap();
    let mut client = connect(&sf).await;
    std::fs::create_dir_all(dir.path().join("lake/readings")).unwrap();
    create_stage(&mut client, mode, &dir.path().join("lake/readings")).await;

    let mut all = Vec::new();
    for batch in [
        rows("gw-1", 1..=3),
        rows("gw-1", 4..=5),
        rows("gw-2", 1..=4),
        rows("gw-2", 5..=5),
        rows("gw-3", 1..=2),
    ] {
        upload(&raw, &batch);
        all.extend(batch);
    }
    let report = collector::run_once(&config).await.unwrap();
    let sf_report = report.snowflake.expect("snowflake is configured");
    let files = delta_file_count(&config).await;
    assert_eq!(sf_report.rows_read, 12, "{sf_report:?}");
    assert_eq!(sf_report.rows_inserted, 12, "{sf_report:?}");
    assert_eq!(sf_report.transactions, 1, "{sf_report:?}");
    assert_eq!(sf_report.copy_statements, files.div_ceil(2));
    assert!(files >= 3, "the first pass wrote {files} files");
    let uploaded = if mode == "internal_stage" { files } else { 0 };
    assert_eq!(sf_report.files_uploaded, uploaded);
    assert_eq!(loaded(&mut client).await, expected(&all));

    // a replayed pass (nothing new in Delta) loads nothing
    let report = collector::run_once(&config).await.unwrap();
    let again = report.snowflake.unwrap();
    assert_eq!(
        (
            again.rows_inserted,
            again.copy_statements,
            again.files_uploaded
        ),
        (0, 0, 0)
    );
    assert_eq!(loaded(&mut client).await, expected(&all));

    // more batches give gw-1 and gw-2 a second file each, which OPTIMIZE then rewrites into
    // one (dataChange = false); of a batch after that, only its own rows are read
    let second = [rows("gw-1", 6..=7), rows("gw-2", 6..=6)];
    for batch in &second {
        upload(&raw, batch);
        all.extend(batch.iter().cloned());
    }
    let report = collector::run_once(&config).await.unwrap();
    assert_eq!(report.snowflake.unwrap().rows_inserted, 3);
    let optimized = collector::maintenance::optimize_readings(&config)
        .await
        .unwrap();
    assert!(optimized.files_removed >= 2, "{optimized:?}");
    let late = rows("gw-1", 8..=9);
    upload(&raw, &late);
    all.extend(late);
    let report = collector::run_once(&config).await.unwrap();
    let after = report.snowflake.unwrap();
    assert_eq!(after.rows_read, 2, "{after:?}");
    assert_eq!(after.rows_inserted, 2, "{after:?}");
    assert_eq!(after.copy_statements, 1, "{after:?}");
    assert_eq!(loaded(&mut client).await, expected(&all));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_stage_loads_each_added_file_exactly_once() {
    stage_mode_loads_exactly_once("external_stage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_stage_puts_and_loads_each_added_file_exactly_once() {
    stage_mode_loads_exactly_once("internal_stage").await;
}

/// A v1-contract table (no `value_text`, no `dq_flags`) partitioned by `site`, so `site` is in
/// no file, only in the add actions.
async fn v1_table_partitioned_by_site(dir: &Path) -> DeltaTable {
    let fields: Vec<Field> = vec![
        Field::new("seq", ArrowType::Int64, false),
        Field::new(
            "ts",
            ArrowType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("site", ArrowType::Utf8, false),
        Field::new("gateway", ArrowType::Utf8, false),
        Field::new("device", ArrowType::Utf8, false),
        Field::new("tag", ArrowType::Utf8, false),
        Field::new("value", ArrowType::Float64, true),
        Field::new("quality", ArrowType::Utf8, false),
        Field::new("unit", ArrowType::Utf8, true),
    ];
    let columns: Vec<StructField> = fields
        .iter()
        .map(|f| {
            let ty = match f.name().as_str() {
                "seq" => DataType::LONG,
                "ts" => DataType::TIMESTAMP,
                "value" => DataType::DOUBLE,
                _ => DataType::STRING,
            };
            StructField::new(f.name(), ty, f.is_nullable())
        })
        .collect();
    let mut table = DeltaTable::try_from_url(url::Url::from_directory_path(dir).unwrap())
        .await
        .unwrap()
        .create()
        .with_columns(columns)
        .with_partition_columns(["site"])
        .await
        .unwrap();
    let schema = Arc::new(Schema::new(fields));
    for (site, seqs) in [("plant-a", [1_i64, 2]), ("plant-b", [3, 4])] {
        let text = |v: &str| -> ArrayRef { Arc::new(StringArray::from(vec![v; 2])) };
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(seqs.to_vec())),
                Arc::new(
                    TimestampMicrosecondArray::from(
                        seqs.iter()
                            .map(|s| 1_700_000_000_000_000 + s)
                            .collect::<Vec<_>>(),
                    )
                    .with_timezone("UTC"),
                ),
                text(site),
                text("gw-1"),
                text("press-3"),
                text("mode"),
                Arc::new(Float64Array::from(vec![Some(1.5), None])),
                text("good"),
                Arc::new(StringArray::from(vec![Some("bar"), None])),
            ],
        )
        .unwrap();
        let mut writer = RecordBatchWriter::for_table(&table).unwrap();
        writer.write(batch).await.unwrap();
        writer.flush_and_commit(&mut table).await.unwrap();
    }
    table
}

type Full = Vec<Vec<Option<String>>>;

async fn everything(client: &mut SnowflakeClient) -> Full {
    let result = client
        .execute(
            "SELECT TO_VARCHAR(SEQ), SITE, GATEWAY, DEVICE, TAG, TO_VARCHAR(VALUE), QUALITY, UNIT, VALUE_TEXT, DQ_FLAGS, TO_VARCHAR(DATE_PART(EPOCH_MICROSECOND, TS)) FROM READINGS ORDER BY SEQ",
            &[],
        )
        .await
        .unwrap();
    (0..result.num_rows())
        .map(|i| (0..11).map(|c| result.text_at(i, c).unwrap()).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_modes_fill_partition_and_newer_columns_as_the_rows_path_does() {
    let server = FakeSnow::start();
    let dir = tempfile::tempdir().unwrap();
    let table = v1_table_partitioned_by_site(dir.path()).await;
    // the partition column is in the add actions, not in the files
    let first_file = table.get_file_uris().unwrap().next().unwrap();
    assert!(first_file.contains("site=plant-"), "{first_file}");
    let mut results = Vec::new();
    for mode in ["rows", "internal_stage", "external_stage"] {
        let cfg: SnowflakeConfig = toml::from_str(&snowflake_toml(
            &server,
            &database(),
            Path::new("/nonexistent"),
            &mode_settings(mode, ""),
        ))
        .unwrap();
        let mut client = connect(&cfg).await;
        create_stage(&mut client, mode, dir.path()).await;
        let report = load(&mut client, &table, &cfg).await.unwrap();
        assert_eq!((report.rows_read, report.rows_inserted), (4, 4), "{mode}");
        // one COPY per partition value
        let copies = if mode == "rows" { 0 } else { 2 };
        assert_eq!(report.copy_statements, copies, "{mode}");
        results.push((mode, everything(&mut client).await));
    }
    let text = |v: &str| Some(v.to_owned());
    let first = &results[0].1;
    assert_eq!(first.len(), 4);
    assert_eq!(
        first[0],
        [
            text("1"),
            text("plant-a"),
            text("gw-1"),
            text("press-3"),
            text("mode"),
            text("1.5"),
            text("good"),
            text("bar"),
            None,
            None,
            text("1700000000000001"),
        ]
    );
    assert_eq!(first[3][1], text("plant-b"));
    for (mode, rows) in &results[1..] {
        assert_eq!(rows, first, "{mode} loads what the rows path loads");
    }
}
