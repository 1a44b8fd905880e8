//! The Snowflake client and loader against a real fakesnow server on a loopback port.

// Readings must come back bit for bit, so exact float comparison is the point.
#![allow(clippy::float_cmp)]

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, RecordBatch, StructArray};
use collector::snowflake::{
    BindValue, LoadReport, Rowset, SnowflakeClient, SnowflakeConfig, SnowflakeError, load,
};
use deltalake::DeltaTable;
use deltalake::kernel::{DataType, StructField};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use edge_agent::contract::{self, Quality, Row};
use pipeline_e2e::{FakeSnow, free_port};

/// A loader config for a fresh database on `server`.
fn config(server: &FakeSnow) -> SnowflakeConfig {
    let database = format!("DB_{}", uuid::Uuid::new_v4().simple());
    toml::from_str(&format!(
        r#"
            url = "{}"
            account = "plantline"
            user = "LOADER"
            password_env = "PLANTLINE_TEST_UNUSED_{}"
            database = "{database}"
            schema = "RAW"
            warehouse = "LOAD_WH"
            request_timeout = "30s"
            insert_chunk_rows = 2
        "#,
        server.url(),
        uuid::Uuid::new_v4().simple()
    ))
    .expect("the test config parses")
}

async fn connect(cfg: &SnowflakeConfig) -> SnowflakeClient {
    SnowflakeClient::login_with_password(cfg, "not-checked-by-fakesnow".into())
        .await
        .expect("login to fakesnow")
}

fn batches(rowset: &Rowset) -> &[RecordBatch] {
    match rowset {
        Rowset::Arrow(batches) => batches,
        Rowset::Json(rows) => panic!("expected Arrow rows, got JSON {rows:?}"),
    }
}

/// Snowflake sends timestamps as structs of epoch seconds and nanosecond fractions.
fn micros(array: &dyn Array, i: usize) -> i64 {
    let s: &StructArray = array.as_struct();
    let epoch = s.column(0).as_primitive::<Int64Type>().value(i);
    let fraction = s.column(1).as_primitive::<Int32Type>().value(i);
    epoch * 1_000_000 + i64::from(fraction) / 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_logs_in_and_reads_arrow_results_with_exact_values() {
    let server = FakeSnow::start();
    let cfg = config(&server);
    let mut client = connect(&cfg).await;

    client
        .execute(
            "CREATE TABLE IF NOT EXISTS PROBE (ID NUMBER(19,0), MEASURED_AT TIMESTAMP_TZ, READING FLOAT, NOTE VARCHAR)",
            &[],
        )
        .await
        .unwrap();
    let inserted = client
        .execute(
            "INSERT INTO PROBE (ID, MEASURED_AT, READING, NOTE) VALUES (?, ?, ?, ?), (?, ?, ?, ?)",
            &[
                BindValue::Fixed(7),
                BindValue::TimestampTzMicros(1_700_000_000_123_456),
                BindValue::Real(21.5),
                BindValue::Text("it's fine".into()),
                BindValue::Fixed(8),
                BindValue::TimestampTzMicros(1_700_000_001_000_000),
                BindValue::Null,
                BindValue::Null,
            ],
        )
        .await
        .unwrap();
    assert_eq!(inserted.rows_affected(), Some(2));

    let result = client
        .execute(
            "SELECT ID, MEASURED_AT, READING, NOTE FROM PROBE WHERE ID >= ? ORDER BY ID",
            &[BindValue::Fixed(7)],
        )
        .await
        .unwrap();
    let names: Vec<(&str, &str)> = result
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.sf_type.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("ID", "fixed"),
            ("MEASURED_AT", "timestamp_tz"),
            ("READING", "real"),
            ("NOTE", "text")
        ]
    );
    assert_eq!(result.num_rows(), 2);
    assert_eq!(result.i64_at(0, 0).unwrap(), Some(7));
    assert_eq!(result.i64_at(1, 0).unwrap(), Some(8));
    assert!(result.query_id.is_some());
    let batch = &batches(&result.rows)[0];
    assert_eq!(micros(batch.column(1), 0), 1_700_000_000_123_456);
    assert_eq!(micros(batch.column(1), 1), 1_700_000_001_000_000);
    let reading = batch.column(2).as_primitive::<Float64Type>();
    assert_eq!(reading.value(0), 21.5);
    assert!(reading.is_null(1));
    let note = batch.column(3).as_string::<i32>();
    assert_eq!(note.value(0), "it's fine");
    assert!(note.is_null(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_errors_surface_with_their_snowflake_code() {
    let server = FakeSnow::start();
    let cfg = config(&server);
    let mut client = connect(&cfg).await;

    let err = client
        .execute("SELECT * FROM NO_SUCH_TABLE", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("002003"));
    match &err {
        SnowflakeError::Statement { sql, sql_state, .. } => {
            assert_eq!(sql, "SELECT * FROM NO_SUCH_TABLE");
            assert_eq!(sql_state, "42S02");
        }
        other => panic!("expected a statement error, got {other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with("statement failed with code 002003 (SQL state 42S02): "),
        "{err}"
    );

    let err = client.execute("SELEC 1", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some("001003"));

    // the session survives failed statements
    let result = client.execute("SELECT 42", &[]).await.unwrap();
    assert_eq!(result.i64_at(0, 0).unwrap(), Some(42));
}

#[tokio::test]
async fn login_names_the_missing_password_variable_and_unreachable_servers() {
    let port = free_port();
    let mut cfg: SnowflakeConfig = toml::from_str(&format!(
        r#"
            url = "http://127.0.0.1:{port}"
            account = "plantline"
            user = "LOADER"
            password_env = "PLANTLINE_TEST_NO_SUCH_VARIABLE"
            database = "PLANT"
            schema = "RAW"
            request_timeout = "2s"
        "#
    ))
    .unwrap();
    let err = SnowflakeClient::login(&cfg).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the Snowflake password is not set: export it in the environment variable `PLANTLINE_TEST_NO_SUCH_VARIABLE` (named by snowflake.password_env)"
    );

    let err = SnowflakeClient::login_with_password(&cfg, "pw".into())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SnowflakeError::Http { endpoint, .. } if endpoint == "/session/v1/login-request"),
        "{err:?}"
    );

    cfg.table = "READINGS; DROP TABLE X".into();
    let err = SnowflakeClient::login_with_password(&cfg, "pw".into())
        .await
        .unwrap_err();
    assert!(matches!(err, SnowflakeError::Config { .. }), "{err:?}");
}

fn reading(gateway: &str, seq: i64, value: Option<f64>) -> Row {
    Row {
        seq,
        ts_us: 1_700_000_000_000_000 + seq * 1_000_250,
        site: "plant-a".into(),
        gateway: gateway.into(),
        device: "press-3".into(),
        tag: "oil_temp".into(),
        value,
        quality: if value.is_some() {
            Quality::Good
        } else {
            Quality::Bad
        },
        value_text: None,
        unit: value.map(|_| "degC".to_owned()),
    }
}

async fn create_delta_table(dir: &std::path::Path) -> DeltaTable {
    let url = url::Url::from_directory_path(dir).unwrap();
    let fields: Vec<StructField> = contract::schema()
        .fields()
        .iter()
        .map(|f| {
            let ty = match f.name().as_str() {
                contract::column::SEQ => DataType::LONG,
                contract::column::TS => DataType::TIMESTAMP,
                contract::column::VALUE => DataType::DOUBLE,
                _ => DataType::STRING,
            };
            StructField::new(f.name(), ty, f.is_nullable())
        })
        .collect();
    DeltaTable::try_from_url(url)
        .await
        .unwrap()
        .create()
        .with_columns(fields)
        .await
        .unwrap()
}

async fn append(table: &mut DeltaTable, batches: &[Vec<Row>]) {
    let mut writer = RecordBatchWriter::for_table(table).unwrap();
    for rows in batches {
        writer.write(contract::to_record_batch(rows)).await.unwrap();
    }
    writer.flush_and_commit(table).await.unwrap();
}

type Loaded = (
    String,
    i64,
    i64,
    String,
    String,
    String,
    Option<f64>,
    String,
    Option<String>,
);

async fn loaded_rows(client: &mut SnowflakeClient) -> Vec<Loaded> {
    let result = client
        .execute(
            "SELECT GATEWAY, SEQ, TS, SITE, DEVICE, TAG, VALUE, QUALITY, UNIT FROM READINGS ORDER BY GATEWAY, SEQ",
            &[],
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut row = 0;
    for batch in batches(&result.rows) {
        let text = |c: usize, i: usize| {
            let a = batch.column(c).as_string::<i32>();
            (!a.is_null(i)).then(|| a.value(i).to_owned())
        };
        for i in 0..batch.num_rows() {
            let value = batch.column(6).as_primitive::<Float64Type>();
            out.push((
                text(0, i).unwrap(),
                result.i64_at(row, 1).unwrap().unwrap(),
                micros(batch.column(2), i),
                text(3, i).unwrap(),
                text(4, i).unwrap(),
                text(5, i).unwrap(),
                (!value.is_null(i)).then(|| value.value(i)),
                text(7, i).unwrap(),
                text(8, i),
            ));
            row += 1;
        }
    }
    out
}

fn expected(rows: &[Row]) -> Vec<Loaded> {
    let mut out: Vec<Loaded> = rows
        .iter()
        .map(|r| {
            (
                r.gateway.clone(),
                r.seq,
                r.ts_us,
                r.site.clone(),
                r.device.clone(),
                r.tag.clone(),
                r.value,
                r.quality.as_str().to_owned(),
                r.unit.clone(),
            )
        })
        .collect();
    out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    out
}

async fn control_version(client: &mut SnowflakeClient) -> Option<i64> {
    let result = client
        .execute(
            "SELECT LAST_VERSION FROM PLANTLINE_LOAD_CONTROL WHERE TABLE_NAME = 'READINGS'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(result.num_rows(), 1, "one control row per readings table");
    result.i64_at(0, 0).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loader_applies_each_delta_version_exactly_once() {
    let server = FakeSnow::start();
    let cfg = config(&server);
    let dir = tempfile::tempdir().unwrap();
    let mut table = create_delta_table(dir.path()).await;

    // version 1: two gateways' batches
    let first: Vec<Vec<Row>> = vec![
        vec![
            reading("gw-1", 1, Some(20.25)),
            reading("gw-1", 2, None),
            reading("gw-1", 3, Some(-4.5)),
        ],
        vec![reading("gw-2", 1, Some(1e-3))],
    ];
    append(&mut table, &first).await;

    let mut client = connect(&cfg).await;
    // the loader's future is Send, so a collector can spawn it
    let stale = table.clone();
    let spawned_cfg = cfg.clone();
    let (report, mut client) = tokio::spawn(async move {
        let report = load(&mut client, &stale, &spawned_cfg).await;
        (report, client)
    })
    .await
    .unwrap();
    assert_eq!(
        report.unwrap(),
        LoadReport {
            table: "READINGS".into(),
            previous_version: None,
            loaded_version: Some(1),
            versions_loaded: 2,
            transactions: 1,
            rows_read: 4,
            rows_inserted: 4,
            ..LoadReport::default()
        }
    );
    let mut all: Vec<Row> = first.concat();
    assert_eq!(loaded_rows(&mut client).await, expected(&all));
    assert_eq!(control_version(&mut client).await, Some(1));

    // nothing new: nothing loaded
    let report = load(&mut client, &table, &cfg).await.unwrap();
    assert_eq!(
        report,
        LoadReport {
            table: "READINGS".into(),
            previous_version: Some(1),
            loaded_version: Some(1),
            ..LoadReport::default()
        }
    );
    assert_eq!(loaded_rows(&mut client).await, expected(&all));

    // version 2 replays gw-1 seq 3 next to new rows; version 3 adds more
    let replay = reading("gw-1", 3, Some(-4.5));
    append(
        &mut table,
        &[vec![
            replay,
            reading("gw-1", 4, Some(7.0)),
            reading("gw-1", 5, Some(8.0)),
        ]],
    )
    .await;
    append(&mut table, &[vec![reading("gw-2", 2, Some(2.5))]]).await;
    // a fresh session (a restarted collector) with a stale table handle
    let mut client = connect(&cfg).await;
    let report = load(&mut client, &table, &cfg).await.unwrap();
    assert_eq!(
        report,
        LoadReport {
            table: "READINGS".into(),
            previous_version: Some(1),
            loaded_version: Some(3),
            versions_loaded: 2,
            transactions: 1,
            rows_read: 4,
            rows_inserted: 3,
            ..LoadReport::default()
        }
    );
    all.extend([
        reading("gw-1", 4, Some(7.0)),
        reading("gw-1", 5, Some(8.0)),
        reading("gw-2", 2, Some(2.5)),
    ]);
    assert_eq!(loaded_rows(&mut client).await, expected(&all));
    assert_eq!(control_version(&mut client).await, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_loads_are_split_into_transactions_per_version_group() {
    let server = FakeSnow::start();
    let mut cfg = config(&server);
    cfg.rows_per_transaction = 2;
    let dir = tempfile::tempdir().unwrap();
    let mut table = create_delta_table(dir.path()).await;
    let mut all = Vec::new();
    for v in 0..3 {
        let rows = vec![
            reading("gw-1", v * 2 + 1, Some(1.0)),
            reading("gw-1", v * 2 + 2, Some(2.0)),
        ];
        all.extend(rows.clone());
        append(&mut table, &[rows]).await;
    }
    let mut client = connect(&cfg).await;
    let report = load(&mut client, &table, &cfg).await.unwrap();
    // version 0 (the table's creation) joins version 1's transaction
    assert_eq!(report.transactions, 3);
    assert_eq!(report.versions_loaded, 4);
    assert_eq!(report.rows_inserted, 6);
    assert_eq!(report.loaded_version, Some(3));
    assert_eq!(loaded_rows(&mut client).await, expected(&all));
    assert_eq!(control_version(&mut client).await, Some(3));
}
