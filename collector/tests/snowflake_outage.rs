//! A Snowflake outage in the middle of a load, against a real fakesnow server that the test
//! kills (`SIGKILL`, like a crash) and starts again on the same port.
//!
//! fakesnow keeps databases in memory unless a session names a folder with the session
//! parameter `FAKESNOW_DB_PATH`; the loader's config passes it through `[snowflake]
//! session_parameters`, so the database survives the restart and a committed transaction stays
//! committed while an open one is lost, as in Snowflake. fakesnow lets only one session per
//! server run attach such a database, so each test checks the counts through the loader's own
//! session.

use std::time::{Duration, Instant};

use collector::snowflake::{LoadError, SnowflakeClient, SnowflakeConfig, load};
use deltalake::DeltaTable;
use deltalake::kernel::{DataType, StructField};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use edge_agent::contract::{self, Quality, Row};
use pipeline_e2e::FakeSnow;

const VERSIONS: i64 = 12;
const ROWS_PER_VERSION: i64 = 20;
/// Statements answered before the server is killed: the middle of the third transaction.
const KILL_AFTER: usize = 65;

fn config(server: &FakeSnow, attempts: u32, max_backoff: &str) -> SnowflakeConfig {
    toml::from_str(&format!(
        r#"
            url = "{}"
            account = "plantline"
            user = "LOADER"
            password_env = "PLANTLINE_TEST_UNUSED"
            database = "DB_{}"
            schema = "RAW"
            request_timeout = "5s"
            insert_chunk_rows = 1
            rows_per_transaction = {ROWS_PER_VERSION}
            retry_attempts = {attempts}
            retry_max_backoff = "{max_backoff}"

            [session_parameters]
            FAKESNOW_DB_PATH = {:?}
            QUERY_TAG = "plantline-outage-test"
        "#,
        server.url(),
        uuid::Uuid::new_v4().simple(),
        server.db_path().display().to_string(),
    ))
    .expect("the test config parses")
}

fn reading(gateway: &str, seq: i64) -> Row {
    Row {
        seq,
        ts_us: 1_700_000_000_000_000 + seq * 1_000_000,
        site: "plant-a".into(),
        gateway: gateway.into(),
        device: "press-3".into(),
        tag: "oil_temp".into(),
        value: Some(seq as f64 / 4.0),
        quality: Quality::Good,
        unit: Some("degC".into()),
        value_text: None,
    }
}

/// `VERSIONS` Delta versions of `ROWS_PER_VERSION` readings of gw-1 each; every version after
/// the first also replays the previous version's last reading, as a retried upload would.
async fn delta_table(dir: &std::path::Path) -> DeltaTable {
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
    let mut table = DeltaTable::try_from_url(url)
        .await
        .unwrap()
        .create()
        .with_columns(fields)
        .await
        .unwrap();
    for v in 0..VERSIONS {
        let first = v * ROWS_PER_VERSION + 1;
        let start = if v == 0 { first } else { first - 1 };
        let rows: Vec<Row> = (start..first + ROWS_PER_VERSION)
            .map(|s| reading("gw-1", s))
            .collect();
        let mut writer = RecordBatchWriter::for_table(&table).unwrap();
        writer
            .write(contract::to_record_batch(&rows))
            .await
            .unwrap();
        writer.flush_and_commit(&mut table).await.unwrap();
    }
    table
}

/// Row count, distinct seqs, min and max seq and the sum of the values in READINGS, and the
/// control table's watermark.
async fn counts(client: &mut SnowflakeClient) -> (i64, i64, i64, i64, i64, i64) {
    let r = client
        .execute(
            "SELECT COUNT(*), COUNT(DISTINCT SEQ), MIN(SEQ), MAX(SEQ), CAST(SUM(VALUE) * 4 AS BIGINT) FROM READINGS",
            &[],
        )
        .await
        .unwrap();
    let w = client
        .execute(
            "SELECT LAST_VERSION FROM PLANTLINE_LOAD_CONTROL WHERE TABLE_NAME = 'READINGS'",
            &[],
        )
        .await
        .unwrap();
    let cell = |i| r.i64_at(0, i).unwrap().unwrap();
    (
        cell(0),
        cell(1),
        cell(2),
        cell(3),
        cell(4),
        w.i64_at(0, 0).unwrap().unwrap(),
    )
}

fn expected() -> (i64, i64, i64, i64, i64, i64) {
    let n = VERSIONS * ROWS_PER_VERSION;
    // values are seq / 4, so 4 * sum = 1 + 2 + ... + n
    (n, n, 1, n, n * (n + 1) / 2, VERSIONS)
}

/// Waits until the server has answered `statements` statements of the running load.
async fn wait_for_statements(server: &FakeSnow, statements: usize) {
    let deadline = Instant::now() + Duration::from_mins(2);
    while server.statements_answered() < statements {
        assert!(
            Instant::now() < deadline,
            "the load did not reach {statements} statements; fakesnow answered {}",
            server.statements_answered()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snowflake_restart_mid_load_delays_the_load_and_loses_or_duplicates_nothing() {
    let mut server = FakeSnow::start();
    // enough patience to outlast a fakesnow restart on a busy machine
    let cfg = config(&server, 40, "1s");
    let dir = tempfile::tempdir().unwrap();
    let table = delta_table(dir.path()).await;

    let client = SnowflakeClient::login_with_password(&cfg, "pw".into())
        .await
        .unwrap();
    let load_cfg = cfg.clone();
    let load_table = table.clone();
    let running = tokio::spawn(async move {
        let mut client = client;
        let report = load(&mut client, &load_table, &load_cfg).await;
        (report, client)
    });
    // One row per INSERT: the third transaction runs statements 59 to 85, its inserts from 63
    // to 83, so the kill lands inside it even if the test notices the count a dozen late.
    wait_for_statements(&server, KILL_AFTER).await;
    server.stop();
    assert!(
        !running.is_finished(),
        "the load finished before the outage"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart();

    let (report, mut client) = running.await.unwrap();
    let report = report.expect("the load rides out the outage");
    assert!(report.retries >= 1, "{report:?}");
    assert_eq!(report.loaded_version, Some(VERSIONS as u64));
    assert_eq!(counts(&mut client).await, expected());

    // loading again changes nothing
    let again = load(&mut client, &table, &cfg).await.unwrap();
    assert_eq!(again.rows_inserted, 0);
    assert_eq!(again.versions_loaded, 0);
    assert_eq!(counts(&mut client).await, expected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_retries_fails_the_load_and_the_next_load_completes_it() {
    let mut server = FakeSnow::start();
    let cfg = config(&server, 2, "200ms");
    let dir = tempfile::tempdir().unwrap();
    let table = delta_table(dir.path()).await;

    let client = SnowflakeClient::login_with_password(&cfg, "pw".into())
        .await
        .unwrap();
    let load_cfg = cfg.clone();
    let load_table = table.clone();
    let running = tokio::spawn(async move {
        let mut client = client;
        load(&mut client, &load_table, &load_cfg).await
    });
    wait_for_statements(&server, KILL_AFTER).await;
    server.stop();
    let err = running.await.unwrap().unwrap_err();
    assert!(
        matches!(err, LoadError::Outage { attempts: 2, .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.starts_with("loading READINGS (Delta versions "),
        "{message}"
    );
    assert!(
        message.contains("failed after 2 attempts: ")
            && message
                .ends_with("nothing of these versions was applied, the next load retries them"),
        "{message}"
    );

    // the next pass, after Snowflake is back
    server.restart();
    let mut client = SnowflakeClient::login_with_password(&cfg, "pw".into())
        .await
        .unwrap();
    let report = load(&mut client, &table, &cfg).await.unwrap();
    assert!(
        report.previous_version.is_some(),
        "some versions were loaded before the outage"
    );
    assert_eq!(report.loaded_version, Some(VERSIONS as u64));
    assert_eq!(counts(&mut client).await, expected());
}
