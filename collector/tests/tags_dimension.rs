//! The `tags` dimension table: tag catalogs the agent publishes (built here by the agent's own
//! code from two versions of a sensor map) become type-2 history beside the readings table,
//! a replayed catalog changes nothing, a malformed one is quarantined, and DuckDB's Delta reader
//! joins readings to the tags as they were when each reading was taken.

use std::path::Path;

use collector::config::CollectorConfig;
use collector::delta::{TagRow, TagsTable};
use collector::raw_zone::RawZone;
use collector::tags::{CatalogResult, apply_catalogs};
use edge_agent::contract::{BatchKey, Quality, Row};
use edge_agent::tag_catalog::TagCatalog;
use pipeline_e2e::duckdb_query;
use serde_json::Value;

const GW: &str = "gw-1";
/// 2026-06-01T00:00:00Z, in µs.
const T0: i64 = 1_780_272_000_000_000;
const MINUTE: i64 = 60_000_000;

/// The agent's catalog of a sensor map with `press-3/oil_temp` in `unit` and, with `meter`,
/// a power meter.
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
fn publish(landing: &Path, catalog: &TagCatalog) -> String {
    let key = catalog.key().to_key("raw/");
    let path = landing.join(&key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(catalog).unwrap()).unwrap();
    key
}

fn put_batch(landing: &Path, seqs: std::ops::RangeInclusive<i64>, ts: impl Fn(i64) -> i64) {
    let rows: Vec<Row> = seqs
        .map(|seq| Row {
            seq,
            ts_us: ts(seq),
            site: "plant-ost".into(),
            gateway: GW.into(),
            device: "press-3".into(),
            tag: "oil_temp".into(),
            value: Some(40.0 + seq as f64),
            quality: Quality::Good,
            value_text: None,
            unit: Some("degC".into()),
        })
        .collect();
    let path = landing.join(BatchKey::new(GW, rows[0].seq).to_key("raw/"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, edge_agent::batch::encode(&rows, &[]).unwrap()).unwrap();
}

/// `(device, tag, unit, valid_from, valid_to)` of a row.
type Span = (String, String, Option<String>, i64, Option<i64>);

/// The [`Span`] of each row.
fn history(rows: &[TagRow]) -> Vec<Span> {
    rows.iter()
        .map(|r| {
            (
                r.tag.device.clone(),
                r.tag.tag.clone(),
                r.tag.unit.clone(),
                r.valid_from_us,
                r.valid_to_us,
            )
        })
        .collect()
}

fn row(device: &str, tag: &str, unit: Option<&str>, from: i64, to: Option<i64>) -> Span {
    (device.into(), tag.into(), unit.map(Into::into), from, to)
}

fn table_url(path: &Path) -> url::Url {
    url::Url::from_directory_path(path).unwrap()
}

#[tokio::test]
async fn two_catalogs_make_history_and_a_replay_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let landing = dir.path().join("landing");
    let raw = RawZone::local(&landing, "raw/", "archive/").unwrap();
    let lake = dir.path().join("readings_tags");
    let mut table =
        TagsTable::open_or_create(&table_url(&lake), &std::collections::HashMap::default())
            .await
            .unwrap();

    let first = catalog(T0, "degC", false);
    let second = catalog(T0 + 10 * MINUTE, "degF", true);
    let first_key = publish(&landing, &first);
    let second_key = publish(&landing, &second);
    let report = apply_catalogs(&raw, &mut table).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let outcomes: Vec<(usize, usize, bool)> = report
        .catalogs
        .iter()
        .map(|c| match &c.outcome {
            CatalogResult::Applied(o) => (o.opened, o.closed, o.replay),
            CatalogResult::Quarantined(reason) => panic!("{} quarantined: {reason}", c.key),
        })
        .collect();
    // The second: oil_temp changed (closed + opened), power new, strokes untouched.
    assert_eq!(outcomes, [(2, 0, false), (2, 1, false)]);

    let t1 = T0 + 10 * MINUTE;
    let rows = table.rows().await.unwrap();
    assert_eq!(
        history(&rows),
        [
            row("meter-1", "power", Some("kW"), t1, None),
            row("press-3", "oil_temp", Some("degC"), T0, Some(t1)),
            row("press-3", "oil_temp", Some("degF"), t1, None),
            row("press-3", "strokes", None, T0, None),
        ]
    );
    let oil = &rows[1];
    assert_eq!(oil.tag.area.as_deref(), Some("press-shop"));
    assert_eq!(oil.tag.machine.as_deref(), Some("press-3"));
    assert_eq!(
        oil.tag.description.as_deref(),
        Some("Hydraulic oil temperature")
    );
    assert_eq!(oil.catalog_hash, first.hash);
    assert_eq!(rows[2].catalog_hash, second.hash);
    assert_eq!(table.watermark(GW).await.unwrap(), Some(t1));

    // Both catalogs were archived like batches.
    for key in [&first_key, &second_key] {
        assert!(!landing.join(key).exists(), "{key} left in the raw zone");
        let archived = key.replacen("raw/", "archive/", 1);
        assert!(landing.join(&archived).exists(), "{archived} missing");
    }

    // A replay of the first catalog (a crash before its archive) changes nothing.
    let version = table.version();
    publish(&landing, &first);
    let report = apply_catalogs(&raw, &mut table).await.unwrap();
    match &report.catalogs[..] {
        [c] => assert!(matches!(c.outcome, CatalogResult::Applied(o) if o.replay)),
        other => panic!("one replay expected: {other:?}"),
    }
    assert_eq!(table.version(), version);
    assert_eq!(history(&table.rows().await.unwrap()), history(&rows));

    // The same content again, later (the agent lost its record and restarted): no row changes.
    let same = catalog(T0 + 20 * MINUTE, "degF", true);
    assert_eq!(same.hash, second.hash);
    publish(&landing, &same);
    apply_catalogs(&raw, &mut table).await.unwrap();
    assert_eq!(history(&table.rows().await.unwrap()), history(&rows));

    // An altered catalog is quarantined with its reason; the gateway's next one still applies.
    let mut altered = catalog(T0 + 30 * MINUTE, "bar", true);
    altered.tags[0].unit = Some("psi".into());
    let altered_key = publish(&landing, &altered);
    let removed = catalog(T0 + 40 * MINUTE, "degF", false);
    publish(&landing, &removed);
    let report = apply_catalogs(&raw, &mut table).await.unwrap();
    match &report.catalogs[0].outcome {
        CatalogResult::Quarantined(reason) => {
            assert!(reason.contains("the content was altered"), "{reason}");
        }
        CatalogResult::Applied(outcome) => panic!("the altered catalog was applied: {outcome:?}"),
    }
    let quarantined = altered_key.replacen("raw/", "quarantine/", 1);
    assert!(landing.join(&quarantined).exists());
    let reason: Value = serde_json::from_slice(
        &std::fs::read(landing.join(format!("{quarantined}.reason.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(reason["reason"]["kind"], "tag_catalog");
    let t4 = T0 + 40 * MINUTE;
    let history_now = history(&table.rows().await.unwrap());
    assert!(
        history_now.contains(&row("meter-1", "power", Some("kW"), t1, Some(t4))),
        "{history_now:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_keeps_the_tags_table_beside_the_readings_and_duckdb_joins_them_as_of_reading_time()
{
    let dir = tempfile::tempdir().unwrap();
    let landing = dir.path().join("landing");
    let config_path = dir.path().join("collector.toml");
    std::fs::write(
        &config_path,
        "[raw]\nurl = \"landing\"\n\n[delta]\nurl = \"lake/readings\"\n",
    )
    .unwrap();
    let config = CollectorConfig::load(&config_path).unwrap();
    let t1 = T0 + 10 * MINUTE;
    publish(&landing, &catalog(T0, "degC", false));
    publish(&landing, &catalog(t1, "degF", false));
    // Readings at T0 + 1..4 minutes and t1 + 1..4 minutes.
    put_batch(&landing, 1..=4, |seq| T0 + seq * MINUTE);
    put_batch(&landing, 5..=8, |seq| t1 + (seq - 4) * MINUTE);

    let report = collector::run_once(&config).await.unwrap();
    assert!(report.is_clean());
    // The catalogs' folder is not taken for a foreign gateway folder.
    assert!(
        report.ingest.foreign_folders.is_empty(),
        "{:?}",
        report.ingest.foreign_folders
    );

    let lake = dir.path().join("lake");
    let sql = format!(
        "SELECT r.seq, t.unit AS catalog_unit, t.machine, t.line
         FROM delta_scan('{readings}') r
         LEFT JOIN delta_scan('{tags}') t
           ON  t.gateway = r.gateway AND t.device = r.device AND t.tag = r.tag
           AND r.ts >= t.valid_from
           AND (t.valid_to IS NULL OR r.ts < t.valid_to)
         ORDER BY r.seq",
        readings = lake.join("readings").display(),
        tags = lake.join("readings_tags").display(),
    );
    let joined = duckdb_query(&sql);
    let units: Vec<(i64, String)> = joined
        .iter()
        .map(|r| {
            (
                r["seq"].as_i64().unwrap(),
                r["catalog_unit"]
                    .as_str()
                    .unwrap_or("<no match>")
                    .to_owned(),
            )
        })
        .collect();
    let expected: Vec<(i64, String)> = (1..=8)
        .map(|seq| (seq, if seq <= 4 { "degC" } else { "degF" }.to_owned()))
        .collect();
    assert_eq!(units, expected);
    assert!(
        joined
            .iter()
            .all(|r| r["machine"] == "press-3" && r["line"] == "line1")
    );

    // DuckDB sees exactly one row in force per tag.
    let in_force = duckdb_query(&format!(
        "SELECT count(*) AS n FROM delta_scan('{}') WHERE valid_to IS NULL",
        lake.join("readings_tags").display()
    ));
    assert_eq!(in_force[0]["n"].as_i64(), Some(2));

    // A second pass changes nothing.
    collector::run_once(&config).await.unwrap();
    let rows = duckdb_query(&format!(
        "SELECT count(*) AS n FROM delta_scan('{}')",
        lake.join("readings_tags").display()
    ));
    assert_eq!(rows[0]["n"].as_i64(), Some(3));
}
