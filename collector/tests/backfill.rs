//! `collector backfill` and `collector reprocess`, through the binary on a local raw zone, with
//! DuckDB's Delta reader checking the tables they write.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use collector::quarantine::{ProblemKind, ReasonObject};
use edge_agent::contract::{BatchKey, Quality, Row};
use pipeline_e2e::duckdb_query;

const FAIL_RULE: &str = "\n[[rules]]\nname = \"oil-temp-limit\"\ntags = [\"press-*/oil_temp\"]\nrange = [-20.0, 150.0]\naction = \"fail\"\n";

fn collector(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_collector"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `collector <command> --config <config> <extra>` and expects exit code 0.
fn run_ok(command: &str, config: &Path, extra: &[&str]) -> Output {
    let mut args = vec![command, "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = collector(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{command} failed\n--- stdout ---\n{}\n--- stderr ---\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// A config for the raw zone `landing/` and the readings table `lake/<table>`, one batch file
/// per commit (so the progress moves file by file), with `extra` appended.
fn write_config(dir: &Path, table: &str, extra: &str) -> PathBuf {
    let config = dir.join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "[raw]\nurl = \"landing\"\n\n[delta]\nurl = \"lake/{table}\"\n\n[run]\nmax_files_per_commit = 1\n{extra}"
        ),
    )
    .unwrap();
    config
}

fn batch_path(dir: &Path, gateway: &str, first_seq: i64) -> PathBuf {
    dir.join("landing")
        .join(BatchKey::new(gateway, first_seq).to_key("raw/"))
}

/// Writes a batch of `seqs` for `gateway` into the raw zone, every value `value(seq)`.
fn write_batch(
    dir: &Path,
    gateway: &str,
    seqs: std::ops::RangeInclusive<i64>,
    value: fn(i64) -> f64,
) {
    let rows: Vec<Row> = seqs
        .map(|seq| Row {
            seq,
            ts_us: 1_790_000_000_000_000 + seq,
            site: "plant-a".into(),
            gateway: gateway.into(),
            device: "press-3".into(),
            tag: "oil_temp".into(),
            value: Some(value(seq)),
            quality: Quality::Good,
            value_text: None,
            unit: Some("degC".into()),
        })
        .collect();
    let path = batch_path(dir, gateway, rows[0].seq);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut bytes = Vec::new();
    let batch = edge_agent::contract::to_record_batch(&rows);
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[allow(clippy::cast_precision_loss)] // test seqs are small
fn seq_value(seq: i64) -> f64 {
    seq as f64
}

fn too_hot(_: i64) -> f64 {
    1000.0
}

/// `gateway: rows, distinct seqs, sum of seqs` for every gateway, as DuckDB reads the table.
fn per_gateway(table: &Path) -> Vec<String> {
    duckdb_query(&format!(
        "SELECT gateway, count(*) AS n, count(DISTINCT seq) AS d, sum(seq) AS total \
         FROM delta_scan('{}') GROUP BY gateway ORDER BY gateway",
        table.display()
    ))
    .iter()
    .map(|r| {
        format!(
            "{}: {} rows, {} seqs, sum {}",
            r["gateway"].as_str().unwrap(),
            r["n"].as_i64().unwrap(),
            r["d"].as_i64().unwrap(),
            r["total"].as_i64().unwrap()
        )
    })
    .collect()
}

/// The relative paths of the files under `folder`, sorted.
fn files_under(folder: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![folder.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(
                    path.strip_prefix(folder)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

/// Two gateways' batches applied by `run-once` into `lake/readings`, so the archive holds them.
fn archived_setup(dir: &Path) {
    write_batch(dir, "gw-a", 1..=3, seq_value);
    write_batch(dir, "gw-a", 4..=5, seq_value);
    write_batch(dir, "gw-a", 6..=9, seq_value);
    write_batch(dir, "gw-b", 1..=4, seq_value);
    write_batch(dir, "gw-b", 5..=6, seq_value);
    let config = write_config(dir, "readings", "");
    run_ok("run-once", &config, &[]);
    assert_eq!(files_under(&dir.join("landing/archive")).len(), 5);
}

#[test]
fn backfill_into_a_new_table_rebuilds_every_seq_once_and_a_rerun_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    archived_setup(dir.path());
    let archive_before = files_under(&dir.path().join("landing/archive"));
    let config = write_config(dir.path(), "rebuilt", "");

    let out = run_ok("backfill", &config, &[]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("backfill: 5 of 5 files (")
            && stdout.contains(
                " applied, 15 rows applied, 0 duplicate rows filtered, 0 files quarantined, 0 rows quarantined by rules, in "
            ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "gateway gw-a: 3 files, 9 rows applied, 0 duplicate rows filtered, watermark 9\n"
        ) && stdout.contains(
            "gateway gw-b: 2 files, 6 rows applied, 0 duplicate rows filtered, watermark 6\n"
        ),
        "{stdout}"
    );
    // Not a terminal: plain progress lines, each with an ETA, the last one at the total.
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("backfill: ") && l.contains(" files, "))
        .collect();
    assert!(lines[0].starts_with("backfill: 5 files, "), "{stderr}");
    let progress: Vec<&&str> = lines.iter().filter(|l| l.contains("ETA ")).collect();
    assert!(progress.len() >= 2, "{stderr}");
    assert!(
        progress
            .last()
            .unwrap()
            .starts_with("backfill: 100% 5/5 files, ")
            && progress.last().unwrap().ends_with("ETA 0s"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\r'),
        "no in-place redraws in logs: {stderr}"
    );

    let rebuilt = dir.path().join("lake/rebuilt");
    let expected = vec![
        "gw-a: 9 rows, 9 seqs, sum 45".to_owned(),
        "gw-b: 6 rows, 6 seqs, sum 21".to_owned(),
    ];
    assert_eq!(per_gateway(&rebuilt), expected);
    assert_eq!(per_gateway(&dir.path().join("lake/readings")), expected);
    assert_eq!(
        files_under(&dir.path().join("landing/archive")),
        archive_before,
        "the archive is read in place"
    );

    // Again: resumes at each watermark, re-reads only the last file, commits nothing.
    let log_before = files_under(&rebuilt.join("_delta_log"));
    let again = text(&run_ok("backfill", &config, &[]).stdout);
    assert!(
        again.contains("backfill: 2 of 2 files (")
            && again.contains(", 0 rows applied, 6 duplicate rows filtered, "),
        "{again}"
    );
    assert_eq!(files_under(&rebuilt.join("_delta_log")), log_before);
    assert_eq!(per_gateway(&rebuilt), expected);
}

#[test]
fn backfill_is_limited_by_gateway_and_first_seq() {
    let dir = tempfile::tempdir().unwrap();
    archived_setup(dir.path());

    let config = write_config(dir.path(), "only-b", "");
    let out = text(&run_ok("backfill", &config, &["--gateway", "gw-b"]).stdout);
    assert!(!out.contains("gw-a"), "{out}");
    assert_eq!(
        per_gateway(&dir.path().join("lake/only-b")),
        ["gw-b: 6 rows, 6 seqs, sum 21"]
    );

    let config = write_config(dir.path(), "a-from-4", "");
    run_ok(
        "backfill",
        &config,
        &["--gateway", "gw-a", "--from-seq", "4"],
    );
    assert_eq!(
        per_gateway(&dir.path().join("lake/a-from-4")),
        ["gw-a: 6 rows, 6 seqs, sum 39"]
    );

    let out = collector(&[
        "backfill",
        "--config",
        config.to_str().unwrap(),
        "--gateway",
        "gw-z",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(
            "gateway `gw-z` has no folder under `archive/`; gateways there: gw-a, gw-b; check `--gateway`"
        ),
        "{}",
        text(&out.stderr)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[raw]\nurl = \"landing\"\n").unwrap();
    assert_eq!(
        collector(&["backfill", "--config", bad.to_str().unwrap()])
            .status
            .code(),
        Some(78)
    );
}

fn reason(dir: &Path, gateway: &str, first_seq: i64) -> ReasonObject {
    let path = dir.join("landing").join(format!(
        "{}.reason.json",
        BatchKey::new(gateway, first_seq).to_key("quarantine/")
    ));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn reprocess_applies_fixed_files_and_returns_still_bad_ones_with_a_fresh_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_batch(d, "gw-a", 1..=3, seq_value);
    write_batch(d, "gw-a", 4..=5, too_hot);
    std::fs::write(batch_path(d, "gw-a", 6), b"not parquet").unwrap();
    let config = write_config(d, "readings", FAIL_RULE);
    run_ok("run-once", &config, &[]);
    assert_eq!(reason(d, "gw-a", 4).reason.kind, ProblemKind::RuleFailed);
    let first_detection = reason(d, "gw-a", 6);
    assert_eq!(first_detection.reason.kind, ProblemKind::NotParquet);

    // A filter that matches nothing moves nothing.
    let out = text(&run_ok("reprocess", &config, &["--reason", "foreign_schema"]).stdout);
    assert!(
        out.starts_with("reprocess: 0 quarantined files moved back to the raw zone\n"),
        "{out}"
    );

    // With the rule still there, the hot batch fails again and goes back with a fresh reason.
    let out = text(&run_ok("reprocess", &config, &["--reason", "oil-temp-limit"]).stdout);
    assert!(
        out.starts_with("reprocess: 1 quarantined files moved back to the raw zone\n"),
        "{out}"
    );
    assert!(out.contains("rule_failed: reading seq 4"), "{out}");
    assert_eq!(reason(d, "gw-a", 4).reason.kind, ProblemKind::RuleFailed);

    // The rule is removed: the hot batch is applied, the file that is not Parquet returns.
    let config = write_config(d, "readings", "");
    let out = run_ok("reprocess", &config, &["--gateway", "gw-a"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("reprocess: 2 quarantined files moved back to the raw zone\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "gateway gw-a: 1 files, 2 rows applied, 0 duplicate rows filtered, watermark 5, 1 quarantined\n"
        ),
        "{stdout}"
    );
    assert!(
        text(&out.stderr).contains("reprocess: 100% 2/2 files, "),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        per_gateway(&d.join("lake/readings")),
        ["gw-a: 5 rows, 5 seqs, sum 15"]
    );
    assert_eq!(
        files_under(&d.join("landing/quarantine")),
        [
            "gateway=gw-a/00000000000000000006.parquet",
            "gateway=gw-a/00000000000000000006.parquet.reason.json"
        ]
    );
    let second_detection = reason(d, "gw-a", 6);
    assert_eq!(second_detection.reason.kind, ProblemKind::NotParquet);
    assert_ne!(second_detection.detected_at, first_detection.detected_at);
    assert!(files_under(&d.join("landing/raw")).is_empty());
    assert!(
        files_under(&d.join("landing/archive"))
            .contains(&"gateway=gw-a/00000000000000000004.parquet".to_owned())
    );
}

#[test]
fn reprocessing_a_file_below_the_watermark_is_a_no_op_replay() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_batch(d, "gw-a", 1..=3, seq_value);
    write_batch(d, "gw-a", 4..=5, too_hot);
    write_batch(d, "gw-a", 6..=7, seq_value);
    run_ok("run-once", &write_config(d, "readings", FAIL_RULE), &[]);

    let out = text(&run_ok("reprocess", &write_config(d, "readings", ""), &[]).stdout);
    assert!(
        out.contains(
            "gateway gw-a: 1 files, 0 rows applied, 2 duplicate rows filtered, watermark 7\n"
        ),
        "{out}"
    );
    assert_eq!(
        per_gateway(&d.join("lake/readings")),
        ["gw-a: 5 rows, 5 seqs, sum 19"]
    );
    assert!(files_under(&d.join("landing/quarantine")).is_empty());
    assert_eq!(files_under(&d.join("landing/archive")).len(), 3);
}
