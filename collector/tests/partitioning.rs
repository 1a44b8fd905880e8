//! The readings table is partitioned by the UTC day of `ts`: a new table gets a `date`
//! partition column that the collector derives (a batch straddling midnight lands in two
//! folders in one commit), OPTIMIZE compacts within each day, and a table created before
//! partitioning keeps its layout. Checked with an independent Delta reader (`DuckDB`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use collector::delta::{DATE_COLUMN, ReadingsTable, readings_schema};
use deltalake::kernel::StructType;
use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use edge_agent::contract::{self, BatchKey, Quality, Row};
use pipeline_e2e::duckdb_query;

/// 2026-01-01T00:00:00Z in µs.
const NEW_YEAR_US: i64 = 1_767_225_600_000_000;

/// The reading `seq` of a gateway whose readings are one minute apart from `first_ts` on.
fn row(gateway: &str, seq: i64, first_ts: i64) -> Row {
    Row {
        seq,
        ts_us: first_ts + (seq - 1) * 60_000_000,
        site: "plant-ost".into(),
        gateway: gateway.into(),
        device: if seq % 2 == 0 { "press-3" } else { "press-4" }.into(),
        tag: "oil_temp".into(),
        value: Some(seq as f64 / 4.0),
        quality: Quality::Good,
        unit: Some("degC".into()),
        value_text: None,
    }
}

fn write_batch(dir: &Path, rows: &[Row]) {
    let key = BatchKey::new(&rows[0].gateway, rows[0].seq).to_key("raw/");
    let path = dir.join("landing").join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut bytes = Vec::new();
    let batch = contract::to_record_batch(rows);
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn write_config(dir: &Path) -> PathBuf {
    let config = dir.join("collector.toml");
    std::fs::write(
        &config,
        "[raw]\nurl = \"landing\"\n\n[delta]\nurl = \"lake/readings\"\n\n[run]\nmax_files_per_commit = 1\n",
    )
    .unwrap();
    config
}

fn collector(args: &[&str], config: &Path) -> String {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_collector"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every row as `DuckDB` reads the table: `gateway/seq/ts µs/value/date`, sorted, plus the
/// number of rows whose `date` is not the UTC day of their `ts`.
fn duckdb_rows(table: &Path, with_date: bool) -> (Vec<String>, i64) {
    let date = if with_date {
        "CAST(date AS VARCHAR)"
    } else {
        "'-'"
    };
    let rows = duckdb_query(&format!(
        "SELECT gateway || '/' || seq || '/' || epoch_us(ts) || '/' || CAST(value * 4 AS BIGINT) || '/' || {date} AS r FROM delta_scan('{}') ORDER BY gateway, seq",
        table.display()
    ));
    let rows = rows
        .iter()
        .map(|r| r["r"].as_str().unwrap().to_owned())
        .collect();
    if !with_date {
        return (rows, 0);
    }
    let wrong = duckdb_query(&format!(
        "SELECT count(*) AS n FROM delta_scan('{}') WHERE (date - DATE '1970-01-01') <> floor(epoch_us(ts) / 86400000000)",
        table.display()
    ));
    (rows, wrong[0]["n"].as_i64().unwrap())
}

fn expected(rows: &[Row], with_date: bool) -> Vec<String> {
    let mut out: Vec<(String, i64, String)> = rows
        .iter()
        .map(|r| {
            let date = if with_date {
                chrono::DateTime::from_timestamp_micros(r.ts_us)
                    .unwrap()
                    .format("%Y-%m-%d")
                    .to_string()
            } else {
                "-".to_owned()
            };
            let line = format!(
                "{}/{}/{}/{}/{date}",
                r.gateway,
                r.seq,
                r.ts_us,
                // DuckDB prints value * 4, exact since every value is seq / 4.
                r.seq
            );
            (r.gateway.clone(), r.seq, line)
        })
        .collect();
    out.sort();
    out.into_iter().map(|(_, _, line)| line).collect()
}

/// The data files of the table's latest version: path → partition values.
async fn active_files(table: &Path) -> BTreeMap<String, BTreeMap<String, Option<String>>> {
    let url = url::Url::from_directory_path(table).unwrap();
    let readings = ReadingsTable::open_or_create(&url, std::collections::HashMap::new())
        .await
        .unwrap();
    let snapshot = readings.delta_table().snapshot().unwrap();
    snapshot
        .log_data()
        .iter()
        .map(|f| {
            (
                f.path().into_owned(),
                f.partition_values_map().into_iter().collect(),
            )
        })
        .collect()
}

// One scenario read top to bottom: write, read back, compact, read back again.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_table_is_partitioned_by_the_utc_day_and_optimize_compacts_within_each_day() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    // gw-a: one batch from 23:57 to 00:02 UTC; then small batches on both days for OPTIMIZE.
    // gw-b: only on the new day.
    let start_a = NEW_YEAR_US - 3 * 60_000_000;
    let mut all = Vec::new();
    for first in (1..=36).step_by(6) {
        let rows: Vec<Row> = (first..first + 6)
            .map(|s| row("gw-a", s, start_a))
            .collect();
        write_batch(dir.path(), &rows);
        all.extend(rows);
    }
    for first in (1..=20).step_by(4) {
        let rows: Vec<Row> = (first..first + 4)
            .map(|s| row("gw-b", s, NEW_YEAR_US + 3_600_000_000))
            .collect();
        write_batch(dir.path(), &rows);
        all.extend(rows);
    }
    // gw-a's last batch: 23:59 on 2026-01-01, then three readings on 2026-01-02.
    let late: Vec<Row> = (37..=40)
        .map(|s| row("gw-a", s, NEW_YEAR_US + 86_400_000_000 - 37 * 60_000_000))
        .collect();
    write_batch(dir.path(), &late);
    all.extend(late);

    collector(&["run-once"], &config);
    let table = dir.path().join("lake/readings");

    let log = std::fs::read_to_string(table.join("_delta_log/00000000000000000000.json")).unwrap();
    assert!(log.contains("\"partitionColumns\":[\"date\"]"), "{log}");
    assert!(
        log.contains(r#"\"name\":\"date\",\"type\":\"date\",\"nullable\":false"#),
        "{log}"
    );
    // gw-a's first batch straddles midnight: one commit, one file in each day's folder.
    let commits: Vec<String> = std::fs::read_dir(table.join("_delta_log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let straddling = commits.iter().filter(|c| {
        c.contains("\"path\":\"date=2025-12-31/") && c.contains("\"path\":\"date=2026-01-01/")
    });
    assert_eq!(straddling.count(), 1, "{commits:#?}");

    let (rows, wrong_dates) = duckdb_rows(&table, true);
    assert_eq!(rows, expected(&all, true));
    assert_eq!(wrong_dates, 0);
    let per_day = duckdb_query(&format!(
        "SELECT CAST(date AS VARCHAR) AS d, count(*) AS n FROM delta_scan('{}') GROUP BY date ORDER BY date",
        table.display()
    ));
    let per_day: Vec<(String, i64)> = per_day
        .iter()
        .map(|r| {
            (
                r["d"].as_str().unwrap().to_owned(),
                r["n"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        per_day,
        vec![
            ("2025-12-31".to_owned(), 3),
            ("2026-01-01".to_owned(), 33 + 20 + 1),
            ("2026-01-02".to_owned(), 3)
        ]
    );
    // The data files do not repeat the partition column (Delta keeps it in the log).
    let before = active_files(&table).await;
    assert!(before.keys().all(|p| p.starts_with("date=")), "{before:?}");

    let out = collector(&["optimize"], &config);
    assert!(out.starts_with("optimize: "), "{out}");
    let after = active_files(&table).await;
    // One file per day and gateway: 2025-12-31 gw-a, 2026-01-01 gw-a and gw-b, 2026-01-02 gw-a.
    let mut by_day: BTreeMap<String, usize> = BTreeMap::new();
    for (path, partition) in &after {
        let day = partition[DATE_COLUMN].clone().unwrap();
        assert!(path.starts_with(&format!("date={day}/")), "{path} in {day}");
        *by_day.entry(day).or_default() += 1;
    }
    assert_eq!(
        by_day,
        BTreeMap::from([
            ("2025-12-31".to_owned(), 1),
            ("2026-01-01".to_owned(), 2),
            ("2026-01-02".to_owned(), 1)
        ]),
        "{after:?}"
    );
    let (rows, wrong_dates) = duckdb_rows(&table, true);
    assert_eq!(rows, expected(&all, true));
    assert_eq!(wrong_dates, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_before_partitioning_keeps_its_layout() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("lake/readings");
    std::fs::create_dir_all(&table).unwrap();
    // What an earlier collector created: the readings columns, no partition column.
    let url = url::Url::from_directory_path(&table).unwrap();
    let schema = StructType::try_from_arrow(readings_schema().as_ref()).unwrap();
    deltalake::DeltaTableBuilder::from_url(url.clone())
        .unwrap()
        .build()
        .unwrap()
        .create()
        .with_table_name("readings")
        .with_columns(schema.fields().cloned())
        .await
        .unwrap();

    let config = write_config(dir.path());
    let mut all = Vec::new();
    for first in (1..=12).step_by(3) {
        let rows: Vec<Row> = (first..first + 3)
            .map(|s| row("gw-a", s, NEW_YEAR_US - 5 * 60_000_000))
            .collect();
        write_batch(dir.path(), &rows);
        all.extend(rows);
    }
    collector(&["run-once"], &config);
    collector(&["optimize"], &config);

    let readings = ReadingsTable::open_or_create(&url, std::collections::HashMap::new())
        .await
        .unwrap();
    assert!(readings.partition_columns().is_empty());
    let snapshot = readings.delta_table().snapshot().unwrap();
    assert!(snapshot.schema().field(DATE_COLUMN).is_none());
    let files: Vec<String> = snapshot
        .log_data()
        .iter()
        .map(|f| f.path().into_owned())
        .collect();
    assert_eq!(
        files.len(),
        1,
        "OPTIMIZE compacted the four files: {files:?}"
    );
    assert!(!files[0].contains('/'), "{files:?}");
    let (rows, _) = duckdb_rows(&table, false);
    assert_eq!(rows, expected(&all, false));
}
