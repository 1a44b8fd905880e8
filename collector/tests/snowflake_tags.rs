//! The tags dimension in Snowflake, against a real fakesnow server: each pass that changed the
//! Delta tags table replaces `PLANTLINE_TAGS` with its snapshot in one transaction (closed rows
//! included, which inserting new keys would miss), a pass with no change touches nothing, a
//! reading joins to the unit in force when it was read, and a `PLANTLINE_TAGS` created by an
//! earlier `init` gets the new columns and is filled.

use std::path::{Path, PathBuf};

use collector::config::CollectorConfig;
use collector::delta::TagsTable;
use collector::snowflake::{BindValue, LoadReport, SnowflakeClient, SnowflakeConfig, load_tables};
use edge_agent::contract::{BatchKey, Quality, Row};
use edge_agent::tag_catalog::TagCatalog;
use pipeline_e2e::FakeSnow;

const GW: &str = "gw-1";
/// 2026-06-01T00:00:00Z, in µs.
const T0: i64 = 1_780_272_000_000_000;
const MINUTE: i64 = 60_000_000;
/// When the second sensor map took effect.
const T1: i64 = T0 + 10 * MINUTE;

/// The agent's catalog of a sensor map with `press-3/oil_temp` in `unit`, `press-3/strokes`
/// and, with `meter`, a power meter.
fn catalog(effective_at_us: i64, unit: &str, meter: bool) -> TagCatalog {
    let meter = if meter {
        "[[modbus]]\nname = \"meter-1\"\nhost = \"127.0.0.1\"\n[[modbus.tags]]\nname = \"power\"\nregister = \"input\"\naddress = 0\ntype = \"f32\"\nunit = \"kW\"\n"
    } else {
        ""
    };
    let text = format!(
        r#"site = "plant-ost"
gateway = "{GW}"
[upload.dir]
path = "outbox"
[assets]
area = "press-shop"
line = "line1"
[assets.devices.press-3]
machine = "press-3"

[[modbus]]
name = "press-3"
host = "127.0.0.1"
[[modbus.tags]]
name = "oil_temp"
register = "holding"
address = 0
type = "f32"
unit = "{unit}"
description = "Hydraulic oil temperature"
[[modbus.tags]]
name = "strokes"
register = "holding"
address = 2
type = "u32"
{meter}"#
    );
    let config = edge_agent::config::load_str(&text, Path::new("agent.toml"))
        .unwrap_or_else(|e| panic!("the test map is valid: {e}"));
    edge_agent::tag_catalog::build::build(&config, effective_at_us)
}

/// Puts `catalog` into the raw zone folder as the agent's folder sink would.
fn publish(landing: &Path, catalog: &TagCatalog) {
    let path = landing.join(catalog.key().to_key("raw/"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(catalog).unwrap()).unwrap();
}

/// A batch of `press-3/oil_temp` readings `seqs`, each at `ts(seq)`.
fn put_batch(landing: &Path, seqs: std::ops::RangeInclusive<i64>, ts: impl Fn(i64) -> i64) {
    let rows: Vec<Row> = seqs
        .map(|seq| Row {
            seq,
            ts_us: ts(seq),
            site: "plant-ost".into(),
            gateway: GW.into(),
            device: "press-3".into(),
            tag: "oil_temp".into(),
            value: Some(40.0 + f64::from(u8::try_from(seq).unwrap())),
            quality: Quality::Good,
            value_text: None,
            unit: Some("degC".into()),
        })
        .collect();
    let path = landing.join(BatchKey::new(GW, rows[0].seq).to_key("raw/"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, edge_agent::batch::encode(&rows, &[]).unwrap()).unwrap();
}

fn collector_config(dir: &Path, server: &FakeSnow) -> PathBuf {
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
url = "{}"
account = "plantline"
user = "LOADER"
password_file = {:?}
database = "DB_{}"
schema = "RAW"
request_timeout = "30s"
insert_chunk_rows = 3
"#,
            dir.join("landing").display(),
            dir.join("lake/readings").display(),
            server.url(),
            password.display().to_string(),
            uuid::Uuid::new_v4().simple(),
        ),
    )
    .unwrap();
    path
}

async fn connect(cfg: &SnowflakeConfig) -> SnowflakeClient {
    SnowflakeClient::login_with_password(cfg, "pw".into())
        .await
        .expect("login to fakesnow")
}

/// A pass of the collector; returns the tags table's load report.
async fn pass(config: &CollectorConfig) -> LoadReport {
    let report = collector::run_once(config).await.unwrap();
    let sf = report.snowflake.expect("snowflake is configured");
    let names: Vec<&str> = sf.side_tables.iter().map(|t| t.table.as_str()).collect();
    assert_eq!(
        names,
        [
            "PLANTLINE_GAPS",
            "PLANTLINE_QUARANTINED_ROWS",
            "PLANTLINE_TAGS"
        ]
    );
    sf.side_tables[2].clone()
}

/// `(device, tag, unit, valid_from, valid_to)` of a tags row.
type Span = (String, String, Option<String>, i64, Option<i64>);

fn span(device: &str, tag: &str, unit: Option<&str>, from: i64, to: Option<i64>) -> Span {
    (device.into(), tag.into(), unit.map(Into::into), from, to)
}

/// Every row of PLANTLINE_TAGS as a [`Span`], sorted. The times are selected as microsecond
/// numbers: fakesnow's Arrow encoding of a NULL timestamp does not pass arrow-rs's validation.
async fn snowflake_tags(client: &mut SnowflakeClient) -> Vec<Span> {
    let r = client
        .execute(
            "SELECT DEVICE, TAG, UNIT, TO_VARCHAR(DATE_PART(EPOCH_MICROSECOND, VALID_FROM)), TO_VARCHAR(DATE_PART(EPOCH_MICROSECOND, VALID_TO)) FROM PLANTLINE_TAGS ORDER BY DEVICE, TAG, VALID_FROM",
            &[],
        )
        .await
        .unwrap();
    let micros = |row: usize, col: usize| {
        r.text_at(row, col)
            .unwrap()
            .map(|t| t.parse::<i64>().unwrap())
    };
    (0..r.num_rows())
        .map(|i| {
            (
                r.text_at(i, 0).unwrap().unwrap(),
                r.text_at(i, 1).unwrap().unwrap(),
                r.text_at(i, 2).unwrap(),
                micros(i, 3).expect("VALID_FROM is never null"),
                micros(i, 4),
            )
        })
        .collect()
}

/// Every row of the Delta tags table as a [`Span`], sorted like [`snowflake_tags`].
async fn delta_tags(dir: &Path) -> Vec<Span> {
    let url = url::Url::from_directory_path(dir.join("lake/readings_tags")).unwrap();
    let mut table = TagsTable::open_or_create(&url, &std::collections::HashMap::default())
        .await
        .unwrap();
    table
        .rows()
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.tag.device,
                r.tag.tag,
                r.tag.unit,
                r.valid_from_us,
                r.valid_to_us,
            )
        })
        .collect()
}

async fn tags_version(dir: &Path) -> Option<u64> {
    let url = url::Url::from_directory_path(dir.join("lake/readings_tags")).unwrap();
    TagsTable::open_or_create(&url, &std::collections::HashMap::default())
        .await
        .unwrap()
        .version()
}

async fn watermark(client: &mut SnowflakeClient) -> Option<i64> {
    client
        .execute(
            "SELECT LAST_VERSION FROM PLANTLINE_LOAD_CONTROL WHERE TABLE_NAME = ?",
            &[BindValue::Text("PLANTLINE_TAGS".into())],
        )
        .await
        .unwrap()
        .i64_at(0, 0)
        .unwrap()
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

// One history across four loads: each load's watermark is what the next must respect, so it
// cannot be split.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_changed_snapshot_replaces_the_tags_once_and_readings_join_the_unit_of_their_time() {
    let server = FakeSnow::start();
    let dir = tempfile::tempdir().unwrap();
    let landing = dir.path().join("landing");
    let config = CollectorConfig::load(&collector_config(dir.path(), &server)).unwrap();
    let sf = config.snowflake.clone().unwrap();
    let mut client = connect(&sf).await;

    // No catalog was ever applied: there is no tags Delta table, and the load skips it.
    let (_, tables) = collector::open_tables(&config).await.unwrap();
    let report = load_tables(&mut client, &tables, &sf).await.unwrap();
    let tags = &report.side_tables[2];
    assert_eq!(tags.table, "PLANTLINE_TAGS");
    assert_eq!(
        (tags.loaded_version, tags.transactions, tags.rows_inserted),
        (None, 0, 0)
    );
    assert!(!dir.path().join("lake/readings_tags").exists());
    assert_eq!(
        count(&mut client, "SELECT COUNT(*) FROM PLANTLINE_TAGS").await,
        0
    );
    assert_eq!(watermark(&mut client).await, Some(-1));

    // The first sensor map and readings under it.
    let first = catalog(T0, "degC", true);
    publish(&landing, &first);
    put_batch(&landing, 1..=4, |seq| T0 + seq * MINUTE);
    let tags = pass(&config).await;
    assert_eq!((tags.transactions, tags.rows_inserted), (1, 3));
    let version = tags_version(dir.path()).await;
    assert_eq!(tags.loaded_version, version);
    assert_eq!(
        snowflake_tags(&mut client).await,
        [
            span("meter-1", "power", Some("kW"), T0, None),
            span("press-3", "oil_temp", Some("degC"), T0, None),
            span("press-3", "strokes", None, T0, None),
        ]
    );
    let oil = client
        .execute(
            "SELECT GATEWAY, SITE, AREA, LINE, MACHINE, DESCRIPTION, DATA_TYPE, SOURCE, CATALOG_HASH FROM PLANTLINE_TAGS WHERE TAG = 'oil_temp'",
            &[],
        )
        .await
        .unwrap();
    let oil: Vec<Option<String>> = (0..9).map(|c| oil.text_at(0, c).unwrap()).collect();
    assert_eq!(
        oil,
        [
            Some(GW.to_owned()),
            Some("plant-ost".to_owned()),
            Some("press-shop".to_owned()),
            Some("line1".to_owned()),
            Some("press-3".to_owned()),
            Some("Hydraulic oil temperature".to_owned()),
            Some("f32".to_owned()),
            Some("modbus".to_owned()),
            Some(first.hash.clone()),
        ]
    );

    // The second map changes oil_temp's unit and drops the meter: their rows are closed at T1
    // (rewritten in Delta, so only a snapshot replace carries the close), oil_temp gets a new
    // row from T1, strokes is untouched.
    publish(&landing, &catalog(T1, "degF", false));
    put_batch(&landing, 5..=8, |seq| T1 + (seq - 4) * MINUTE);
    let tags = pass(&config).await;
    assert_eq!((tags.transactions, tags.rows_inserted), (1, 4));
    let version = tags_version(dir.path()).await;
    assert_eq!(tags.previous_version.map(|v| v + 1), version);
    assert_eq!(tags.loaded_version, version);
    let history = [
        span("meter-1", "power", Some("kW"), T0, Some(T1)),
        span("press-3", "oil_temp", Some("degC"), T0, Some(T1)),
        span("press-3", "oil_temp", Some("degF"), T1, None),
        span("press-3", "strokes", None, T0, None),
    ];
    assert_eq!(snowflake_tags(&mut client).await, history);
    assert_eq!(delta_tags(dir.path()).await, history);
    assert_eq!(
        watermark(&mut client).await,
        version.map(|v| i64::try_from(v).unwrap())
    );

    // Nothing changed: no transaction, the watermark and the rows stay.
    let tags = pass(&config).await;
    assert_eq!(
        (
            tags.versions_loaded,
            tags.transactions,
            tags.rows_read,
            tags.rows_inserted
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(tags.loaded_version, version);
    assert_eq!(tags_version(dir.path()).await, version);
    assert_eq!(
        watermark(&mut client).await,
        version.map(|v| i64::try_from(v).unwrap())
    );
    assert_eq!(snowflake_tags(&mut client).await, history);

    // Each reading joins the oil_temp row in force when it was read.
    let joined = client
        .execute(
            "SELECT r.SEQ, t.UNIT, t.MACHINE FROM READINGS r LEFT JOIN PLANTLINE_TAGS t
               ON t.GATEWAY = r.GATEWAY AND t.DEVICE = r.DEVICE AND t.TAG = r.TAG
              AND r.TS >= t.VALID_FROM AND (t.VALID_TO IS NULL OR r.TS < t.VALID_TO)
             ORDER BY r.SEQ",
            &[],
        )
        .await
        .unwrap();
    let units: Vec<(i64, Option<String>, Option<String>)> = (0..joined.num_rows())
        .map(|i| {
            (
                joined.i64_at(i, 0).unwrap().unwrap(),
                joined.text_at(i, 1).unwrap(),
                joined.text_at(i, 2).unwrap(),
            )
        })
        .collect();
    let expected: Vec<(i64, Option<String>, Option<String>)> = (1..=8)
        .map(|seq| {
            let unit = if seq <= 4 { "degC" } else { "degF" };
            (seq, Some(unit.to_owned()), Some("press-3".to_owned()))
        })
        .collect();
    assert_eq!(units, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tags_table_from_an_earlier_init_gets_the_new_columns_and_is_filled() {
    let server = FakeSnow::start();
    let dir = tempfile::tempdir().unwrap();
    let landing = dir.path().join("landing");
    let config = CollectorConfig::load(&collector_config(dir.path(), &server)).unwrap();
    let sf = config.snowflake.clone().unwrap();
    let mut client = connect(&sf).await;
    // PLANTLINE_TAGS as `collector snowflake init` created it before the Delta tags table
    client
        .execute(
            "CREATE TABLE IF NOT EXISTS PLANTLINE_TAGS (SITE VARCHAR NOT NULL, GATEWAY VARCHAR NOT NULL, DEVICE VARCHAR NOT NULL, TAG VARCHAR NOT NULL, UNIT VARCHAR, DESCRIPTION VARCHAR, SOURCE VARCHAR, ADDRESS VARCHAR, DATA_TYPE VARCHAR, SCALE FLOAT, VALUE_OFFSET FLOAT, UPDATED_AT TIMESTAMP_TZ, PRIMARY KEY (GATEWAY, DEVICE, TAG))",
            &[],
        )
        .await
        .unwrap();

    publish(&landing, &catalog(T0, "degC", true));
    let tags = pass(&config).await;
    assert_eq!(
        tags.columns_added,
        [
            "AREA",
            "LINE",
            "MACHINE",
            "VALID_FROM",
            "VALID_TO",
            "CATALOG_HASH"
        ]
    );
    assert_eq!(tags.rows_inserted, 3);
    assert_eq!(
        snowflake_tags(&mut client).await,
        [
            span("meter-1", "power", Some("kW"), T0, None),
            span("press-3", "oil_temp", Some("degC"), T0, None),
            span("press-3", "strokes", None, T0, None),
        ]
    );
    // the old columns stay, null; the new ones are filled
    let r = client
        .execute(
            "SELECT COUNT(*), COUNT(ADDRESS), COUNT(SCALE), COUNT(VALUE_OFFSET), COUNT(UPDATED_AT), COUNT(SITE), COUNT(MACHINE), COUNT(CATALOG_HASH) FROM PLANTLINE_TAGS",
            &[],
        )
        .await
        .unwrap();
    let counts: Vec<i64> = (0..8).map(|c| r.i64_at(0, c).unwrap().unwrap()).collect();
    assert_eq!(counts, [3, 0, 0, 0, 0, 3, 2, 3]);

    // the next pass finds the columns there and, with no change, loads nothing
    let again = pass(&config).await;
    assert!(again.columns_added.is_empty());
    assert_eq!((again.transactions, again.rows_inserted), (0, 0));
}
