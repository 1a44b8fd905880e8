//! What the loader puts into Snowflake beside the readings, against a real fakesnow server:
//! columns added to the readings contract (`value_text`, `dq_flags`) applied to an older
//! Snowflake table with `ALTER TABLE ... ADD COLUMN` and loaded (null from Delta versions
//! written before them), and the gaps and quarantined-rows tables loaded exactly once through
//! the collector's own pass.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow_schema::{DataType as ArrowType, Field, Schema, TimeUnit};
use collector::config::CollectorConfig;
use collector::snowflake::{BindValue, SnowflakeClient, SnowflakeConfig, load};
use deltalake::DeltaTable;
use deltalake::kernel::{DataType, StructField};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use edge_agent::contract::{BatchKey, Quality, Row};
use pipeline_e2e::FakeSnow;

fn snowflake_toml(server: &FakeSnow, database: &str, auth: &str) -> String {
    format!(
        r#"
url = "{}"
account = "plantline"
user = "LOADER"
{auth}
database = "{database}"
schema = "RAW"
request_timeout = "30s"
insert_chunk_rows = 3
"#,
        server.url()
    )
}

fn database() -> String {
    format!("DB_{}", uuid::Uuid::new_v4().simple())
}

async fn connect(cfg: &SnowflakeConfig) -> SnowflakeClient {
    SnowflakeClient::login_with_password(cfg, "pw".into())
        .await
        .expect("login to fakesnow")
}

/// The batch contract's v1 columns, as the first readings tables had them.
fn v1_fields() -> Vec<Field> {
    vec![
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
    ]
}

/// The `value_text` and `dq_flags` of a batch's readings.
type Additions<'a> = (&'a [Option<&'a str>], &'a [Option<&'a str>]);

/// A batch of gw-1 readings `seqs`; with `extra`, also `value_text` and `dq_flags`.
fn batch(seqs: &[i64], extra: Option<Additions<'_>>) -> RecordBatch {
    let n = seqs.len();
    let mut fields = v1_fields();
    let text = |v: &str| -> ArrayRef { Arc::new(StringArray::from(vec![v; n])) };
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(seqs.to_vec())),
        Arc::new(
            TimestampMicrosecondArray::from(
                seqs.iter()
                    .map(|s| 1_700_000_000_000_000 + s * 1_000_000)
                    .collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        text("plant-a"),
        text("gw-1"),
        text("press-3"),
        text("mode"),
        Arc::new(Float64Array::from(
            seqs.iter().map(|s| Some(*s as f64)).collect::<Vec<_>>(),
        )),
        text("good"),
        Arc::new(StringArray::from(vec![None::<&str>; n])),
    ];
    if let Some((value_text, dq_flags)) = extra {
        fields.push(Field::new("value_text", ArrowType::Utf8, true));
        fields.push(Field::new("dq_flags", ArrowType::Utf8, true));
        columns.push(Arc::new(StringArray::from(value_text.to_vec())));
        columns.push(Arc::new(StringArray::from(dq_flags.to_vec())));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
}

async fn write(table: &mut DeltaTable, batch: RecordBatch) {
    let mut writer = RecordBatchWriter::for_table(table).unwrap();
    writer.write(batch).await.unwrap();
    writer.flush_and_commit(table).await.unwrap();
}

type Loaded = (i64, Option<String>, Option<String>);

async fn loaded(client: &mut SnowflakeClient) -> Vec<Loaded> {
    let result = client
        .execute(
            "SELECT SEQ, VALUE_TEXT, DQ_FLAGS FROM READINGS ORDER BY SEQ",
            &[],
        )
        .await
        .unwrap();
    (0..result.num_rows())
        .map(|i| {
            (
                result.i64_at(i, 0).unwrap().unwrap(),
                result.text_at(i, 1).unwrap(),
                result.text_at(i, 2).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_additions_are_added_to_an_older_table_and_loaded_null_where_delta_lacks_them() {
    let server = FakeSnow::start();
    let cfg: SnowflakeConfig = toml::from_str(&snowflake_toml(
        &server,
        &database(),
        "password_env = \"PLANTLINE_TEST_UNUSED\"",
    ))
    .unwrap();
    let mut client = connect(&cfg).await;
    // the readings table as an earlier collector created it, with a row already loaded
    client
        .execute(
            "CREATE TABLE READINGS (SEQ NUMBER(19,0) NOT NULL, TS TIMESTAMP_TZ NOT NULL, SITE VARCHAR NOT NULL, GATEWAY VARCHAR NOT NULL, DEVICE VARCHAR NOT NULL, TAG VARCHAR NOT NULL, VALUE FLOAT, QUALITY VARCHAR NOT NULL, UNIT VARCHAR)",
            &[],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO READINGS (SEQ, TS, SITE, GATEWAY, DEVICE, TAG, VALUE, QUALITY, UNIT) VALUES (?, ?, 'plant-a', 'gw-0', 'press-1', 'mode', ?, 'good', NULL)",
            &[
                BindValue::Fixed(7),
                BindValue::TimestampTzMicros(1_600_000_000_000_000),
                BindValue::Real(7.5),
            ],
        )
        .await
        .unwrap();

    // Delta: version 1 written with contract v1 columns only, then the two columns added
    // (metadata only, as the collector does) and version 3 written with them
    let dir = tempfile::tempdir().unwrap();
    let url = url::Url::from_directory_path(dir.path()).unwrap();
    let fields: Vec<StructField> = v1_fields()
        .iter()
        .map(|f| {
            let ty = match f.data_type() {
                ArrowType::Int64 => DataType::LONG,
                ArrowType::Timestamp(..) => DataType::TIMESTAMP,
                ArrowType::Float64 => DataType::DOUBLE,
                _ => DataType::STRING,
            };
            StructField::new(f.name(), ty, f.is_nullable())
        })
        .collect();
    let mut table = DeltaTable::try_from_url(url)
        .await
        .unwrap()
        .create()
        .with_columns(fields)
        .await
        .unwrap();
    write(&mut table, batch(&[1, 2], None)).await;
    table = table
        .add_columns()
        .with_fields([
            StructField::new("value_text", DataType::STRING, true),
            StructField::new("dq_flags", DataType::STRING, true),
        ])
        .await
        .unwrap();
    write(
        &mut table,
        batch(
            &[3, 4],
            Some((
                &[Some("AUTO"), None],
                &[None, Some("pressure-present,horizon")],
            )),
        ),
    )
    .await;

    let report = load(&mut client, &table, &cfg).await.unwrap();
    assert_eq!(report.columns_added, ["VALUE_TEXT", "DQ_FLAGS"]);
    assert_eq!(report.rows_inserted, 4);
    let expect = |seq: i64, text: Option<&str>, flags: Option<&str>| -> Loaded {
        (seq, text.map(str::to_owned), flags.map(str::to_owned))
    };
    assert_eq!(
        loaded(&mut client).await,
        [
            expect(1, None, None),
            expect(2, None, None),
            expect(3, Some("AUTO"), None),
            expect(4, None, Some("pressure-present,horizon")),
            // the row loaded before the columns existed is kept, and reads them as null
            expect(7, None, None),
        ]
    );
    let kept = client
        .execute("SELECT GATEWAY, VALUE FROM READINGS WHERE SEQ = 7", &[])
        .await
        .unwrap();
    assert_eq!(kept.text_at(0, 0).unwrap().as_deref(), Some("gw-0"));

    // the next load finds the columns there and adds nothing
    let again = load(&mut client, &table, &cfg).await.unwrap();
    assert!(again.columns_added.is_empty());
    assert_eq!(again.rows_inserted, 0);
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

fn row(gateway: &str, seq: i64, value: f64) -> Row {
    Row {
        seq,
        ts_us: chrono::Utc::now().timestamp_micros() - 60_000_000 + seq,
        site: "plant-a".into(),
        gateway: gateway.into(),
        device: "press-3".into(),
        tag: "oil_temp".into(),
        value: Some(value),
        quality: Quality::Good,
        unit: Some("degC".into()),
        value_text: None,
    }
}

fn collector_config(dir: &Path, server: &FakeSnow, database: &str) -> PathBuf {
    let path = dir.join("collector.toml");
    let password = dir.join("snowflake-password");
    std::fs::write(&password, "not-checked-by-fakesnow\n").unwrap();
    std::fs::write(
        &path,
        format!(
            r#"
[raw]
url = "{}"

[delta]
url = "{}"

[snowflake]
{}

[[rules]]
name = "oil-temp-range"
tags = "oil_temp"
range = [-20.0, 150.0]
action = "quarantine"
"#,
            dir.join("landing").display(),
            dir.join("lake/readings").display(),
            snowflake_toml(
                server,
                database,
                &format!("password_file = {:?}", password.display().to_string())
            )
        ),
    )
    .unwrap();
    path
}

/// (gateway, first, last, readings, reason, file key) of PLANTLINE_GAPS, sorted.
async fn snowflake_gaps(
    client: &mut SnowflakeClient,
) -> Vec<(String, i64, i64, i64, String, String)> {
    let r = client
        .execute(
            "SELECT GATEWAY, FIRST_SEQ, LAST_SEQ, READINGS, REASON, FILE_KEY FROM PLANTLINE_GAPS ORDER BY GATEWAY, FIRST_SEQ",
            &[],
        )
        .await
        .unwrap();
    (0..r.num_rows())
        .map(|i| {
            (
                r.text_at(i, 0).unwrap().unwrap(),
                r.i64_at(i, 1).unwrap().unwrap(),
                r.i64_at(i, 2).unwrap().unwrap(),
                r.i64_at(i, 3).unwrap().unwrap(),
                r.text_at(i, 4).unwrap().unwrap(),
                r.text_at(i, 5).unwrap().unwrap(),
            )
        })
        .collect()
}

/// (gateway, seq, rule, check, detail, file key) of PLANTLINE_QUARANTINED_ROWS, sorted.
async fn snowflake_quarantined(
    client: &mut SnowflakeClient,
) -> Vec<(String, i64, String, String, String, String)> {
    let r = client
        .execute(
            "SELECT GATEWAY, SEQ, RULE, RULE_CHECK, DETAIL, FILE_KEY FROM PLANTLINE_QUARANTINED_ROWS ORDER BY GATEWAY, SEQ",
            &[],
        )
        .await
        .unwrap();
    (0..r.num_rows())
        .map(|i| {
            (
                r.text_at(i, 0).unwrap().unwrap(),
                r.i64_at(i, 1).unwrap().unwrap(),
                r.text_at(i, 2).unwrap().unwrap(),
                r.text_at(i, 3).unwrap().unwrap(),
                r.text_at(i, 4).unwrap().unwrap(),
                r.text_at(i, 5).unwrap().unwrap(),
            )
        })
        .collect()
}

async fn count(client: &mut SnowflakeClient, sql: &str) -> i64 {
    client
        .execute(sql, &[])
        .await
        .unwrap()
        .i64_at(0, 0)
        .unwrap()
        .unwrap()
}

// One story across two passes and two loads: the watermarks of the first are what the second
// must respect, so it cannot be split.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_and_quarantined_rows_are_loaded_exactly_once_with_their_own_watermarks() {
    let server = FakeSnow::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("landing");
    let database = database();
    let config_path = collector_config(dir.path(), &server, &database);
    let config = CollectorConfig::load(&config_path).unwrap();
    let sf = config.snowflake.clone().unwrap();

    // gw-1: 1..=5 with an out-of-range reading at 3, then 9..=10 (a jump over 6..=8);
    // gw-2: 1..=2, then 5..=6 (a jump over 3..=4)
    upload(
        &raw,
        &[
            row("gw-1", 1, 40.0),
            row("gw-1", 2, 41.0),
            row("gw-1", 3, 500.0),
            row("gw-1", 4, 42.0),
            row("gw-1", 5, 43.0),
        ],
    );
    upload(&raw, &[row("gw-1", 9, 44.0), row("gw-1", 10, 45.0)]);
    upload(&raw, &[row("gw-2", 1, 1.0), row("gw-2", 2, 2.0)]);
    upload(&raw, &[row("gw-2", 5, 5.0), row("gw-2", 6, 6.0)]);

    let report = collector::run_once(&config).await.unwrap();
    let sf_report = report.snowflake.expect("snowflake is configured");
    assert_eq!(sf_report.rows_inserted, 10);
    let side: Vec<(&str, u64)> = sf_report
        .side_tables
        .iter()
        .map(|t| (t.table.as_str(), t.rows_inserted))
        .collect();
    assert_eq!(
        side,
        [
            ("PLANTLINE_GAPS", 2),
            ("PLANTLINE_QUARANTINED_ROWS", 1),
            // the pass created the tags table; no catalog, so its snapshot is empty
            ("PLANTLINE_TAGS", 0)
        ]
    );

    // Snowflake holds exactly what the Delta tables hold
    let (_, mut tables) = collector::open_tables(&config).await.unwrap();
    let delta_gaps: Vec<_> = tables
        .gaps
        .current_gaps()
        .await
        .unwrap()
        .into_iter()
        .map(|g| {
            (
                g.gateway,
                g.first_seq,
                g.last_seq,
                g.readings,
                g.reason,
                g.file_key,
            )
        })
        .collect();
    assert_eq!(delta_gaps.len(), 2, "{delta_gaps:?}");
    let delta_quarantined: Vec<_> = tables
        .quarantined_rows
        .current_rows()
        .await
        .unwrap()
        .into_iter()
        .map(|q| {
            (
                q.row.gateway,
                q.row.seq,
                q.rule,
                q.check,
                q.detail,
                q.file_key,
            )
        })
        .collect();
    assert_eq!(delta_quarantined.len(), 1, "{delta_quarantined:?}");
    assert_eq!(delta_quarantined[0].1, 3);

    let mut client = connect(&sf).await;
    assert_eq!(snowflake_gaps(&mut client).await, delta_gaps);
    assert_eq!(snowflake_quarantined(&mut client).await, delta_quarantined);
    assert_eq!(
        count(&mut client, "SELECT COUNT(*) FROM READINGS").await,
        10
    );
    assert_eq!(
        count(
            &mut client,
            "SELECT COUNT(*) FROM READINGS WHERE GATEWAY = 'gw-1' AND SEQ = 3"
        )
        .await,
        0,
        "the quarantined reading is not in READINGS"
    );
    // each table has its own watermark: the version of its own Delta table
    for (name, version) in [
        ("READINGS", tables.readings.version()),
        ("PLANTLINE_GAPS", tables.gaps.version()),
        (
            "PLANTLINE_QUARANTINED_ROWS",
            tables.quarantined_rows.version(),
        ),
    ] {
        let v = client
            .execute(
                "SELECT LAST_VERSION FROM PLANTLINE_LOAD_CONTROL WHERE TABLE_NAME = ?",
                &[BindValue::Text(name.into())],
            )
            .await
            .unwrap();
        assert_eq!(v.num_rows(), 1, "{name}");
        assert_eq!(
            v.i64_at(0, 0).unwrap().and_then(|v| u64::try_from(v).ok()),
            version,
            "{name}"
        );
    }

    // a pass with nothing new, then one with a new gap: nothing is loaded twice
    let again = collector::run_once(&config)
        .await
        .unwrap()
        .snowflake
        .unwrap();
    assert_eq!(again.rows_inserted, 0);
    assert!(
        again.side_tables.iter().all(|t| t.rows_inserted == 0),
        "{again:?}"
    );
    upload(&raw, &[row("gw-1", 14, 46.0)]);
    let third = collector::run_once(&config)
        .await
        .unwrap()
        .snowflake
        .unwrap();
    assert_eq!(third.rows_inserted, 1);
    assert_eq!(third.side_tables[0].rows_inserted, 1);
    let gaps = snowflake_gaps(&mut client).await;
    assert_eq!(gaps.len(), 3);
    assert_eq!(
        (gaps[1].1, gaps[1].2, gaps[1].4.as_str()),
        (11, 13, "seq_jump")
    );
    assert_eq!(snowflake_quarantined(&mut client).await.len(), 1);
}
