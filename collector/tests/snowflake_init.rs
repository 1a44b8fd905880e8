//! `collector snowflake init` and the analytics views, against a real fakesnow server on a
//! loopback port. The views' numbers are checked against values computed here from the rows
//! the test inserted.

// Counts and window sizes in these tests are tiny, so the casts between them cannot wrap or round.
#![allow(clippy::cast_possible_wrap, clippy::cast_precision_loss)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use collector::snowflake::{BindValue, InitScript, QueryResult, Rowset, SnowflakeClient};
use collector::snowflake::{SnowflakeConfig, views};
use pipeline_e2e::{FakeSnow, now_us};

const PASSWORD: &str = "s3cr3t-never-printed";
const HOUR_US: i64 = 3_600_000_000;
/// 2024-01-01T10:00:00Z
const BASE_US: i64 = 1_704_103_200_000_000;

fn config(server: &FakeSnow) -> SnowflakeConfig {
    toml::from_str(&format!(
        r#"
            url = "{}"
            account = "plantline"
            user = "LOADER"
            password_env = "PLANTLINE_TEST_UNUSED"
            database = "DB_{}"
            schema = "RAW"
            warehouse = "LOAD_WH"
            request_timeout = "30s"
        "#,
        server.url(),
        uuid::Uuid::new_v4().simple()
    ))
    .expect("the test config parses")
}

/// One cell of a result, decoded from the Arrow rows fakesnow sends.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
    /// A timestamp, microseconds since the epoch.
    Ts(i64),
}

impl Cell {
    fn int(&self) -> i64 {
        match self {
            Self::Int(v) => *v,
            other => panic!("expected a whole number, got {other:?}"),
        }
    }
    fn float(&self) -> Option<f64> {
        match self {
            Self::Float(v) => Some(*v),
            Self::Null => None,
            other => panic!("expected a float, got {other:?}"),
        }
    }
    fn ts(&self) -> i64 {
        match self {
            Self::Ts(v) => *v,
            other => panic!("expected a timestamp, got {other:?}"),
        }
    }
}

fn rows(result: &QueryResult) -> Vec<Vec<Cell>> {
    let Rowset::Arrow(batches) = &result.rows else {
        panic!("expected Arrow rows, got {:?}", result.rows)
    };
    let mut out = Vec::new();
    let mut row = 0;
    for batch in batches {
        for i in 0..batch.num_rows() {
            out.push(
                (0..batch.num_columns())
                    .map(|c| cell(result, batch, row, c, i))
                    .collect(),
            );
            row += 1;
        }
    }
    out
}

fn cell(result: &QueryResult, batch: &RecordBatch, row: usize, col: usize, i: usize) -> Cell {
    let array = batch.column(col);
    if array.is_null(i) {
        return Cell::Null;
    }
    match array.data_type() {
        DataType::Float64 => Cell::Float(array.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => Cell::Text(array.as_string::<i32>().value(i).to_owned()),
        DataType::Boolean => Cell::Bool(array.as_boolean().value(i)),
        // Snowflake sends timestamps as structs of epoch seconds and nanosecond fractions.
        DataType::Struct(_) => {
            let s = array.as_struct();
            let epoch = s.column(0).as_primitive::<Int64Type>().value(i);
            let fraction = s.column(1).as_primitive::<Int32Type>().value(i);
            Cell::Ts(epoch * 1_000_000 + i64::from(fraction) / 1000)
        }
        _ => Cell::Int(
            result
                .i64_at(row, col)
                .expect("other columns are whole numbers")
                .expect("nulls are handled above"),
        ),
    }
}

async fn query(client: &mut SnowflakeClient, sql: &str) -> Vec<Vec<Cell>> {
    rows(&client.execute(sql, &[]).await.unwrap())
}

/// A reading as the test inserts it.
#[derive(Debug, Clone)]
struct Reading {
    gateway: &'static str,
    seq: i64,
    ts_us: i64,
    tag: &'static str,
    value: Option<f64>,
}

impl Reading {
    fn quality(&self) -> &'static str {
        if self.value.is_some() { "good" } else { "bad" }
    }
}

/// gw-1's `oil_temp` every 5 minutes from 10:00 (one bad reading, an outlier of 35 at seq 15),
/// and gw-2's `pressure` three times.
fn readings() -> Vec<Reading> {
    let oil: [Option<f64>; 17] = [
        Some(20.0),
        Some(20.5),
        Some(21.0),
        Some(20.5),
        Some(20.0),
        None,
        Some(21.0),
        Some(20.5),
        Some(20.0),
        Some(21.0),
        Some(20.5),
        Some(20.0),
        Some(21.0),
        Some(20.5),
        Some(35.0),
        Some(20.5),
        Some(21.0),
    ];
    let mut out: Vec<Reading> = oil
        .iter()
        .zip(1..)
        .map(|(value, seq)| Reading {
            gateway: "gw-1",
            seq,
            ts_us: BASE_US + (seq - 1) * 300_000_000,
            tag: "oil_temp",
            value: *value,
        })
        .collect();
    for (seq, minutes, value) in [(1, 10, 1.5), (2, 20, 2.5), (3, 90, 4.0)] {
        out.push(Reading {
            gateway: "gw-2",
            seq,
            ts_us: BASE_US + minutes * 60_000_000,
            tag: "pressure",
            value: Some(value),
        });
    }
    out
}

async fn insert(client: &mut SnowflakeClient, readings: &[Reading]) {
    for r in readings {
        client
            .execute(
                "INSERT INTO READINGS (SEQ, TS, SITE, GATEWAY, DEVICE, TAG, VALUE, QUALITY, UNIT) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                &[
                    BindValue::Fixed(r.seq),
                    BindValue::TimestampTzMicros(r.ts_us),
                    BindValue::Text("plant-a".into()),
                    BindValue::Text(r.gateway.into()),
                    BindValue::Text("press-3".into()),
                    BindValue::Text(r.tag.into()),
                    r.value.map_or(BindValue::Null, BindValue::Real),
                    BindValue::Text(r.quality().into()),
                    BindValue::Text("unit".into()),
                ],
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_applies_twice_and_every_view_matches_independent_numbers() {
    let server = FakeSnow::start();
    let cfg = config(&server);
    let db = cfg.database.clone();
    // fakesnow has no roles or grants, so the objects are applied and the grants only printed
    let script = InitScript::new(&cfg, "s3://lake/readings")
        .unwrap()
        .without_access_control(true);
    let mut client = SnowflakeClient::login_with_password(&cfg, "pw".into())
        .await
        .unwrap();
    let first = script.apply(&mut client).await.unwrap();
    let second = script.apply(&mut client).await.unwrap();
    assert_eq!(first, second);
    let expected_objects: Vec<String> = [
        format!("database {db}"),
        format!("schema {db}.RAW"),
        format!("table {db}.RAW.READINGS"),
        format!("table {db}.RAW.PLANTLINE_LOAD_CONTROL"),
        format!("table {db}.RAW.PLANTLINE_TAGS"),
        format!("table {db}.RAW.PLANTLINE_GAPS"),
        format!("table {db}.RAW.PLANTLINE_QUARANTINED_ROWS"),
        format!("table {db}.RAW.PLANTLINE_QUARANTINE"),
        format!("column {db}.RAW.READINGS.VALUE_TEXT"),
        format!("column {db}.RAW.READINGS.DQ_FLAGS"),
        format!("column {db}.RAW.PLANTLINE_GAPS.READINGS"),
        format!("column {db}.RAW.PLANTLINE_GAPS.FILE_KEY"),
        format!("column {db}.RAW.PLANTLINE_TAGS.AREA"),
        format!("column {db}.RAW.PLANTLINE_TAGS.LINE"),
        format!("column {db}.RAW.PLANTLINE_TAGS.MACHINE"),
        format!("column {db}.RAW.PLANTLINE_TAGS.VALID_FROM"),
        format!("column {db}.RAW.PLANTLINE_TAGS.VALID_TO"),
        format!("column {db}.RAW.PLANTLINE_TAGS.CATALOG_HASH"),
        format!("view {db}.RAW.READINGS_HOURLY"),
        format!("view {db}.RAW.TAG_LATEST"),
        format!("view {db}.RAW.GATEWAY_FRESHNESS"),
        format!("view {db}.RAW.READINGS_ANOMALIES"),
        format!("view {db}.RAW.KNOWN_GAPS"),
    ]
    .into();
    assert_eq!(first, expected_objects);

    let all = readings();
    insert(&mut client, &all).await;
    // a third run after data arrived keeps it
    script.apply(&mut client).await.unwrap();
    assert_eq!(
        query(&mut client, "SELECT COUNT(*) FROM READINGS").await,
        [[Cell::Int(20)]]
    );

    check_hourly(&mut client, &all).await;
    check_latest(&mut client, &all).await;
    check_freshness(&mut client, &all).await;
    check_anomalies(&mut client, &all).await;

    check_known_gaps(&mut client, &all).await;
}

/// Two gaps: gw-1 lost seq 18..=19 after its last reading (seq 17), gw-2 lost 100..=141 far
/// from any reading it has; the view names the readings around each gap.
async fn check_known_gaps(client: &mut SnowflakeClient, all: &[Reading]) {
    for (gateway, first, last, reason) in [
        ("gw-1", 18, 19, "seq_jump"),
        ("gw-2", 100, 141, "damaged_buffer"),
    ] {
        client
            .execute(
                "INSERT INTO PLANTLINE_GAPS (GATEWAY, FIRST_SEQ, LAST_SEQ, READINGS, REASON, DETECTED_AT, FILE_KEY) VALUES (?, ?, ?, ?, ?, ?, ?)",
                &[
                    BindValue::Text(gateway.into()),
                    BindValue::Fixed(first),
                    BindValue::Fixed(last),
                    BindValue::Fixed(last - first + 1),
                    BindValue::Text(reason.into()),
                    BindValue::TimestampTzMicros(BASE_US + 7 * HOUR_US),
                    BindValue::Text(format!("raw/gateway={gateway}/{:020}.parquet", last + 1)),
                ],
            )
            .await
            .unwrap();
    }
    let ts_of = |gateway: &str, seq: i64| {
        all.iter()
            .find(|r| r.gateway == gateway && r.seq == seq)
            .map_or(Cell::Null, |r| Cell::Ts(r.ts_us))
    };
    // fakesnow's Arrow encoding of a NULL timestamp does not pass arrow-rs's validation, so
    // the times are selected where present and the NULLs tested in SQL
    let gaps = query(
        client,
        "SELECT GATEWAY, FIRST_SEQ, LAST_SEQ, MISSING_READINGS, REASON, FILE_KEY, DETECTED_AT, LAST_TS_BEFORE IS NULL, FIRST_TS_AFTER IS NULL FROM KNOWN_GAPS ORDER BY GATEWAY",
    )
    .await;
    assert_eq!(
        gaps,
        [
            vec![
                Cell::Text("gw-1".into()),
                Cell::Int(18),
                Cell::Int(19),
                Cell::Int(2),
                Cell::Text("seq_jump".into()),
                Cell::Text("raw/gateway=gw-1/00000000000000000020.parquet".into()),
                Cell::Ts(BASE_US + 7 * HOUR_US),
                Cell::Bool(ts_of("gw-1", 17) == Cell::Null),
                Cell::Bool(ts_of("gw-1", 20) == Cell::Null),
            ],
            vec![
                Cell::Text("gw-2".into()),
                Cell::Int(100),
                Cell::Int(141),
                Cell::Int(42),
                Cell::Text("damaged_buffer".into()),
                Cell::Text("raw/gateway=gw-2/00000000000000000142.parquet".into()),
                Cell::Ts(BASE_US + 7 * HOUR_US),
                Cell::Bool(true),
                Cell::Bool(true),
            ],
        ]
    );
    let before = query(
        client,
        "SELECT LAST_TS_BEFORE FROM KNOWN_GAPS WHERE GATEWAY = 'gw-1'",
    )
    .await;
    assert_eq!(before, [[ts_of("gw-1", 17)]]);
    assert_ne!(before[0][0], Cell::Null, "seq 17 of gw-1 is a reading");
}

async fn check_hourly(client: &mut SnowflakeClient, all: &[Reading]) {
    // (gateway, tag, hour start) -> the readings of that hour
    let mut groups: BTreeMap<(&str, &str, i64), Vec<&Reading>> = BTreeMap::new();
    for r in all {
        let hour = r.ts_us - r.ts_us.rem_euclid(HOUR_US);
        groups.entry((r.gateway, r.tag, hour)).or_default().push(r);
    }
    let expected: Vec<Vec<Cell>> = groups
        .iter()
        .map(|((gateway, tag, hour), rs)| {
            let values: Vec<f64> = rs.iter().filter_map(|r| r.value).collect();
            let count = |q: &str| rs.iter().filter(|r| r.quality() == q).count();
            vec![
                Cell::Text((*gateway).into()),
                Cell::Text((*tag).into()),
                Cell::Ts(*hour),
                Cell::Int(rs.len() as i64),
                Cell::Int(values.len() as i64),
                Cell::Int(count("good") as i64),
                Cell::Int(count("bad") as i64),
                Cell::Float(values.iter().copied().fold(f64::INFINITY, f64::min)),
                Cell::Float(values.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
                // the values are multiples of 0.5, so the sum is exact and so is the average
                Cell::Float(values.iter().sum::<f64>() / values.len() as f64),
            ]
        })
        .collect();
    assert_eq!(expected.len(), 4, "gw-1 and gw-2 each span two hours");
    let actual = query(
        client,
        "SELECT GATEWAY, TAG, HOUR_START, READING_COUNT, VALUE_COUNT, GOOD_COUNT, BAD_COUNT, MIN_VALUE, MAX_VALUE, AVG_VALUE FROM READINGS_HOURLY ORDER BY GATEWAY, TAG, HOUR_START",
    )
    .await;
    assert_eq!(actual, expected);
}

async fn check_latest(client: &mut SnowflakeClient, all: &[Reading]) {
    let before = now_us();
    let actual = query(
        client,
        "SELECT GATEWAY, TAG, SEQ, TS, VALUE, QUALITY, AGE_SECONDS FROM TAG_LATEST ORDER BY GATEWAY, TAG",
    )
    .await;
    let after = now_us();
    let last_of = |gateway: &str| {
        all.iter()
            .filter(|r| r.gateway == gateway)
            .max_by_key(|r| r.ts_us)
            .unwrap()
    };
    assert_eq!(actual.len(), 2);
    for (row, gateway) in actual.iter().zip(["gw-1", "gw-2"]) {
        let last = last_of(gateway);
        assert_eq!(
            row[..6],
            [
                Cell::Text(gateway.into()),
                Cell::Text(last.tag.into()),
                Cell::Int(last.seq),
                Cell::Ts(last.ts_us),
                Cell::Float(last.value.unwrap()),
                Cell::Text("good".into()),
            ]
        );
        let age = row[6].int();
        assert!(
            ((before - last.ts_us) / 1_000_000..=(after - last.ts_us) / 1_000_000 + 1)
                .contains(&age),
            "age {age} s of {gateway}'s latest reading"
        );
    }
}

async fn check_freshness(client: &mut SnowflakeClient, all: &[Reading]) {
    let actual = query(
        client,
        "SELECT SITE, GATEWAY, LAST_TS, LAST_SEQ, TAG_COUNT, READINGS_LAST_HOUR, AGE_SECONDS FROM GATEWAY_FRESHNESS ORDER BY GATEWAY",
    )
    .await;
    assert_eq!(actual.len(), 2);
    for (row, gateway) in actual.iter().zip(["gw-1", "gw-2"]) {
        let mine: Vec<&Reading> = all.iter().filter(|r| r.gateway == gateway).collect();
        let last_ts = mine.iter().map(|r| r.ts_us).max().unwrap();
        assert_eq!(
            row[..6],
            [
                Cell::Text("plant-a".into()),
                Cell::Text(gateway.into()),
                Cell::Ts(last_ts),
                Cell::Int(mine.iter().map(|r| r.seq).max().unwrap()),
                Cell::Int(1),
                // the readings are from 2024: none in the last hour
                Cell::Int(0),
            ]
        );
        assert!(row[6].int() >= (now_us() - last_ts) / 1_000_000 - 60);
    }
    assert_eq!(actual[0][2].ts(), BASE_US + 16 * 300_000_000);
}

async fn check_anomalies(client: &mut SnowflakeClient, all: &[Reading]) {
    let good: Vec<&Reading> = all
        .iter()
        .filter(|r| r.gateway == "gw-1" && r.value.is_some())
        .collect();
    let window = views::ANOMALY_WINDOW as usize;
    let actual = query(
        client,
        "SELECT SEQ, VALUE, BASELINE_COUNT, BASELINE_MEAN, BASELINE_STDDEV, Z_SCORE, IS_ANOMALY FROM READINGS_ANOMALIES WHERE GATEWAY = 'gw-1' ORDER BY SEQ",
    )
    .await;
    assert_eq!(actual.len(), good.len(), "bad readings have no z-score");
    let mut flagged = Vec::new();
    for (i, (row, reading)) in actual.iter().zip(&good).enumerate() {
        let baseline: Vec<f64> = good[i.saturating_sub(window)..i]
            .iter()
            .map(|r| r.value.unwrap())
            .collect();
        let n = baseline.len();
        assert_eq!(row[0], Cell::Int(reading.seq));
        assert_eq!(row[1].float(), reading.value);
        assert_eq!(
            row[2],
            Cell::Int(n as i64),
            "baseline of seq {}",
            reading.seq
        );
        let mean = baseline.iter().sum::<f64>() / n as f64;
        let stddev =
            (baseline.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0)).sqrt();
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        if n >= 1 {
            assert!(close(row[3].float(), mean), "mean of seq {}", reading.seq);
        }
        if n >= 2 {
            assert!(
                close(row[4].float(), stddev),
                "stddev of seq {}",
                reading.seq
            );
        }
        let z = (n >= views::ANOMALY_MIN_BASELINE as usize && stddev > 0.0)
            .then(|| (reading.value.unwrap() - mean) / stddev);
        match z {
            Some(z) => assert!(
                close(row[5].float(), z),
                "z of seq {}: {:?}",
                reading.seq,
                row[5]
            ),
            None => assert_eq!(row[5], Cell::Null, "z of seq {}", reading.seq),
        }
        let is_anomaly = z.is_some_and(|z| z.abs() > views::ANOMALY_Z_LIMIT);
        assert_eq!(
            row[6],
            Cell::Bool(is_anomaly),
            "flag of seq {}",
            reading.seq
        );
        if is_anomaly {
            flagged.push(reading.seq);
        }
    }
    // only the planted outlier: the readings after it have it in their baseline, which widens
    // the standard deviation instead of flagging them
    assert_eq!(flagged, [15]);
    let outlier = &actual[13];
    assert_eq!(outlier[0], Cell::Int(15));
    assert!(outlier[5].float().unwrap() > 30.0, "{outlier:?}");
}

fn collector(args: &[&str], password: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_collector"));
    command.args(args).env("RUST_LOG", "info");
    if let Some(pw) = password {
        command.env("PLANTLINE_TEST_SNOWFLAKE_PASSWORD", pw);
    }
    command.output().unwrap()
}

fn write_config(dir: &Path, snowflake_url: &str, database: &str) -> PathBuf {
    let path = dir.join("collector.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[raw]
url = "landing"

[delta]
url = "s3://acme-plant-lake/readings"

[snowflake]
url = "{snowflake_url}"
account = "plantline"
user = "PLANTLINE_LOADER"
password_env = "PLANTLINE_TEST_SNOWFLAKE_PASSWORD"
database = "{database}"
schema = "RAW"
warehouse = "LOAD_WH"
role = "PLANTLINE_LOADER"
"#
        ),
    )
    .unwrap();
    path
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8(output.stdout.clone()).unwrap(),
        String::from_utf8(output.stderr.clone()).unwrap(),
    )
}

#[test]
fn printed_script_names_every_object_and_carries_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "https://acme.snowflakecomputing.com", "PLANT");
    let output = collector(
        &["snowflake", "init", "--config", config.to_str().unwrap()],
        Some(PASSWORD),
    );
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    for expected in [
        "CREATE DATABASE IF NOT EXISTS PLANT;\n",
        "CREATE SCHEMA IF NOT EXISTS PLANT.RAW;\n",
        "CREATE TABLE IF NOT EXISTS PLANT.RAW.READINGS (SEQ NUMBER(19,0) NOT NULL, TS TIMESTAMP_TZ NOT NULL, SITE VARCHAR NOT NULL, GATEWAY VARCHAR NOT NULL, DEVICE VARCHAR NOT NULL, TAG VARCHAR NOT NULL, VALUE FLOAT, QUALITY VARCHAR NOT NULL, UNIT VARCHAR, VALUE_TEXT VARCHAR, DQ_FLAGS VARCHAR) CLUSTER BY (TO_DATE(TS), GATEWAY, TAG);\n",
        "CREATE TABLE IF NOT EXISTS PLANT.RAW.PLANTLINE_LOAD_CONTROL (",
        "CREATE TABLE IF NOT EXISTS PLANT.RAW.PLANTLINE_TAGS (GATEWAY VARCHAR NOT NULL, DEVICE VARCHAR NOT NULL, TAG VARCHAR NOT NULL, SITE VARCHAR NOT NULL, AREA VARCHAR, LINE VARCHAR, MACHINE VARCHAR, UNIT VARCHAR, DESCRIPTION VARCHAR, DATA_TYPE VARCHAR NOT NULL, SOURCE VARCHAR NOT NULL, VALID_FROM TIMESTAMP_TZ NOT NULL, VALID_TO TIMESTAMP_TZ, CATALOG_HASH VARCHAR NOT NULL);\n",
        "CREATE TABLE IF NOT EXISTS PLANT.RAW.PLANTLINE_GAPS (GATEWAY VARCHAR NOT NULL, FIRST_SEQ NUMBER(19,0) NOT NULL, LAST_SEQ NUMBER(19,0) NOT NULL, READINGS NUMBER(19,0) NOT NULL, REASON VARCHAR NOT NULL, DETECTED_AT TIMESTAMP_TZ NOT NULL, FILE_KEY VARCHAR NOT NULL);\n",
        "CREATE TABLE IF NOT EXISTS PLANT.RAW.PLANTLINE_QUARANTINED_ROWS (SEQ NUMBER(19,0) NOT NULL, ",
        ", RULE VARCHAR NOT NULL, RULE_CHECK VARCHAR NOT NULL, DETAIL VARCHAR NOT NULL, FILE_KEY VARCHAR NOT NULL, QUARANTINED_AT TIMESTAMP_TZ NOT NULL);\n",
        "CREATE TABLE IF NOT EXISTS PLANT.RAW.PLANTLINE_QUARANTINE (",
        "ALTER TABLE PLANT.RAW.READINGS ADD COLUMN IF NOT EXISTS VALUE_TEXT VARCHAR;\n",
        "ALTER TABLE PLANT.RAW.READINGS ADD COLUMN IF NOT EXISTS DQ_FLAGS VARCHAR;\n",
        "ALTER TABLE PLANT.RAW.PLANTLINE_GAPS ADD COLUMN IF NOT EXISTS READINGS NUMBER(19,0);\n",
        "ALTER TABLE PLANT.RAW.PLANTLINE_GAPS ADD COLUMN IF NOT EXISTS FILE_KEY VARCHAR;\n",
        "ALTER TABLE PLANT.RAW.PLANTLINE_TAGS ADD COLUMN IF NOT EXISTS MACHINE VARCHAR;\n",
        "ALTER TABLE PLANT.RAW.PLANTLINE_TAGS ADD COLUMN IF NOT EXISTS VALID_FROM TIMESTAMP_TZ;\n",
        "ALTER TABLE PLANT.RAW.PLANTLINE_TAGS ADD COLUMN IF NOT EXISTS CATALOG_HASH VARCHAR;\n",
        "-- PLANT.RAW.PLANTLINE_TAGS: the tags dimension, each tag's site, area, line, machine, unit, data type and source as type-2 history",
        "-- Join a reading to its tag as it was: t.GATEWAY = r.GATEWAY AND t.DEVICE = r.DEVICE AND t.TAG = r.TAG AND r.TS >= t.VALID_FROM AND (t.VALID_TO IS NULL OR r.TS < t.VALID_TO).\n",
        "GRANT SELECT, INSERT, DELETE ON TABLE PLANT.RAW.PLANTLINE_TAGS TO ROLE PLANTLINE_LOADER;\n",
        "GRANT SELECT, INSERT ON TABLE PLANT.RAW.PLANTLINE_QUARANTINE TO ROLE PLANTLINE_LOADER;\n",
        "GRANT SELECT ON TABLE PLANT.RAW.PLANTLINE_TAGS TO ROLE PLANTLINE_REPORTING;\n",
        "GRANT SELECT, INSERT ON TABLE PLANT.RAW.PLANTLINE_GAPS TO ROLE PLANTLINE_LOADER;\n",
        "GRANT SELECT, INSERT ON TABLE PLANT.RAW.PLANTLINE_QUARANTINED_ROWS TO ROLE PLANTLINE_LOADER;\n",
        "GRANT SELECT ON TABLE PLANT.RAW.PLANTLINE_QUARANTINED_ROWS TO ROLE PLANTLINE_REPORTING;\n",
        "CREATE OR REPLACE VIEW PLANT.RAW.READINGS_HOURLY AS\n",
        "CREATE OR REPLACE VIEW PLANT.RAW.TAG_LATEST AS\n",
        "CREATE OR REPLACE VIEW PLANT.RAW.GATEWAY_FRESHNESS AS\n",
        "CREATE OR REPLACE VIEW PLANT.RAW.READINGS_ANOMALIES AS\n",
        "CREATE OR REPLACE VIEW PLANT.RAW.KNOWN_GAPS AS\n",
        "CREATE ROLE IF NOT EXISTS PLANTLINE_LOADER;\n",
        "GRANT USAGE ON WAREHOUSE LOAD_WH TO ROLE PLANTLINE_LOADER;\n",
        "GRANT USAGE ON DATABASE PLANT TO ROLE PLANTLINE_LOADER;\n",
        "GRANT USAGE, CREATE TABLE ON SCHEMA PLANT.RAW TO ROLE PLANTLINE_LOADER;\n",
        "GRANT SELECT, INSERT ON TABLE PLANT.RAW.READINGS TO ROLE PLANTLINE_LOADER;\n",
        "GRANT SELECT, INSERT, UPDATE ON TABLE PLANT.RAW.PLANTLINE_LOAD_CONTROL TO ROLE PLANTLINE_LOADER;\n",
        "GRANT ROLE PLANTLINE_LOADER TO USER PLANTLINE_LOADER;\n",
        "CREATE ROLE IF NOT EXISTS PLANTLINE_REPORTING;\n",
        "GRANT SELECT ON VIEW PLANT.RAW.READINGS_ANOMALIES TO ROLE PLANTLINE_REPORTING;\n",
        "-- CREATE STORAGE INTEGRATION IF NOT EXISTS PLANTLINE_S3\n",
        "--   STORAGE_ALLOWED_LOCATIONS = ('s3://acme-plant-lake/readings/');\n",
        "-- CREATE STAGE IF NOT EXISTS PLANT.RAW.PLANTLINE_DELTA_STAGE\n",
        "--   URL = 's3://acme-plant-lake/readings/'\n",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in\n{stdout}"
        );
    }
    assert!(!stdout.contains(PASSWORD) && !stderr.contains(PASSWORD));
    // the loader deletes from the tags table only
    let deletes: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("GRANT") && l.contains("DELETE"))
        .collect();
    assert_eq!(
        deletes,
        [
            "GRANT SELECT, INSERT, DELETE ON TABLE PLANT.RAW.PLANTLINE_TAGS TO ROLE PLANTLINE_LOADER;"
        ]
    );
    assert!(!stdout.contains("filled by later collector stages"));

    let skipped = collector(
        &[
            "snowflake",
            "init",
            "--config",
            config.to_str().unwrap(),
            "--skip-grants",
        ],
        None,
    );
    let (stdout, _) = text(&skipped);
    assert_eq!(skipped.status.code(), Some(0));
    assert!(stdout.contains("CREATE OR REPLACE VIEW PLANT.RAW.KNOWN_GAPS AS\n"));
    assert!(
        !stdout
            .lines()
            .any(|l| l.starts_with("GRANT") || l.starts_with("CREATE ROLE"))
    );
}

#[test]
fn init_without_a_snowflake_section_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        "[raw]\nurl = \"landing\"\n\n[delta]\nurl = \"lake\"\n",
    )
    .unwrap();
    let output = collector(
        &["snowflake", "init", "--config", config.to_str().unwrap()],
        None,
    );
    assert_eq!(output.status.code(), Some(78));
    assert_eq!(
        text(&output).1,
        format!(
            "{}: there is no [snowflake] section; add one with url, account, user, password_env, database and schema\n",
            config.display()
        )
    );
}

#[test]
fn apply_through_the_cli_is_idempotent_and_names_a_refused_statement() {
    let server = FakeSnow::start();
    let dir = tempfile::tempdir().unwrap();
    let database = format!("DB_{}", uuid::Uuid::new_v4().simple());
    let config = write_config(dir.path(), &server.url(), &database);
    let args = [
        "snowflake",
        "init",
        "--config",
        config.to_str().unwrap(),
        "--apply",
        "--skip-grants",
    ];
    let first = collector(&args, Some(PASSWORD));
    let (stdout, stderr) = text(&first);
    assert_eq!(first.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.starts_with(&format!(
            "applied database {database}\napplied schema {database}.RAW\napplied table {database}.RAW.READINGS\n"
        )),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("snowflake init: 23 statements applied\n"),
        "{stdout}"
    );
    assert!(!stdout.contains(PASSWORD) && !stderr.contains(PASSWORD));
    let second = collector(&args, Some(PASSWORD));
    assert_eq!(second.status.code(), Some(0), "{}", text(&second).1);
    assert_eq!(text(&second).0, stdout);

    // with the grants, fakesnow (which has no roles) refuses the first one; the error names it
    let with_grants = collector(&args[..5], Some(PASSWORD));
    let (_, stderr) = text(&with_grants);
    assert_eq!(with_grants.status.code(), Some(1));
    assert!(
        stderr.contains(
            "collector: creating role PLANTLINE_LOADER failed (statement 24 of 48): statement failed with code 001003"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains(PASSWORD));

    let missing = collector(&args, None);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing).1.contains(
            "collector: the Snowflake password is not set: export it in the environment variable `PLANTLINE_TEST_SNOWFLAKE_PASSWORD` (named by snowflake.password_env)"
        ),
        "{}",
        text(&missing).1
    );
}
