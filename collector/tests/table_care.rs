//! Table care on a local table: `collector optimize` (many small files into few, the same rows,
//! `dataChange = false`), `collector vacuum` (only unreferenced files past the retention, never
//! without a Snowflake check or an explicit opt-out), and checkpoints with expired-log cleanup.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use edge_agent::contract::{self, BatchKey, Quality, Row};
use pipeline_e2e::duckdb_query;

fn row(gateway: &str, seq: i64) -> Row {
    Row {
        seq,
        ts_us: 1_767_225_600_000_000 + seq * 1_000_000,
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

fn write_batch(dir: &Path, gateway: &str, seqs: std::ops::RangeInclusive<i64>) {
    let rows: Vec<Row> = seqs.map(|s| row(gateway, s)).collect();
    let key = BatchKey::new(gateway, rows[0].seq).to_key("raw/");
    let path = dir.join("landing").join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut bytes = Vec::new();
    let batch = contract::to_record_batch(&rows);
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let config = dir.join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "[raw]\nurl = \"landing\"\n\n[delta]\nurl = \"lake/readings\"\n\n[run]\nmax_files_per_commit = 1\n{extra}"
        ),
    )
    .unwrap();
    config
}

fn collector(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_collector"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(count, count distinct (gateway, seq), sum(seq), files)` as `DuckDB` reads the table.
fn duckdb_counts(table: &Path) -> (i64, i64, i64) {
    let rows = duckdb_query(&format!(
        "SELECT count(*) AS n, count(DISTINCT (gateway, seq)) AS d, sum(seq) AS s FROM delta_scan('{}')",
        table.display()
    ));
    let r = &rows[0];
    (
        r["n"].as_i64().unwrap(),
        r["d"].as_i64().unwrap(),
        r["s"].as_i64().unwrap(),
    )
}

/// The data files under the table's folder, relative to it: at the top (an unpartitioned table,
/// or a file no commit references) and in partition folders (`date=2026-01-01/...`).
fn parquet_files(table: &Path) -> Vec<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(table).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".parquet") {
            files.push(name);
        } else if name.contains('=') && entry.path().is_dir() {
            files.extend(
                parquet_files(&entry.path())
                    .into_iter()
                    .map(|inner| format!("{name}/{inner}")),
            );
        }
    }
    files.sort();
    files
}

fn log_file(table: &Path, version: u64, suffix: &str) -> PathBuf {
    table
        .join("_delta_log")
        .join(format!("{version:020}{suffix}"))
}

/// Sets a file's modification time into the past, as time would.
fn backdate(path: &Path, ago: &str) {
    let status = Command::new("touch")
        .arg("-d")
        .arg(ago)
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "touch -d {ago} {}", path.display());
}

fn latest_version(table: &Path) -> u64 {
    std::fs::read_dir(table.join("_delta_log"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_suffix(".json")?.parse().ok()
        })
        .max()
        .unwrap()
}

// One scenario read top to bottom: compaction, then every VACUUM variant on its result.
#[allow(clippy::too_many_lines)]
#[test]
fn optimize_compacts_small_files_and_vacuum_deletes_only_what_left_the_table_past_retention() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    for first in (1..=50).step_by(5) {
        write_batch(dir.path(), "gw-a", first..=first + 4);
    }
    for first in (1..=30).step_by(5) {
        write_batch(dir.path(), "gw-b", first..=first + 4);
    }
    stdout(&collector(&["run-once"], &config));
    let table = dir.path().join("lake/readings");
    let small = parquet_files(&table);
    assert_eq!(small.len(), 16);
    let want = (80, 80, (1..=50).sum::<i64>() + (1..=30).sum::<i64>());
    assert_eq!(duckdb_counts(&table), want);

    let out = stdout(&collector(&["optimize"], &config));
    let version = latest_version(&table);
    assert!(
        out.starts_with("optimize: 16 files (") && out.contains(" rewritten into 2 ("),
        "{out}"
    );
    assert!(
        out.ends_with(&format!(
            "), 80 rows, dataChange=false, version {version}; 2 data files now\n"
        )),
        "{out}"
    );
    assert_eq!(duckdb_counts(&table), want);
    // The commit adds and removes with dataChange = false, so a change-feed reader (the
    // Snowflake loader) skips it.
    let commit = std::fs::read_to_string(log_file(&table, version, ".json")).unwrap();
    let actions: Vec<serde_json::Value> = commit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (mut adds, mut removes) = (0, 0);
    for action in &actions {
        if let Some(add) = action.get("add") {
            assert_eq!(add["dataChange"], false, "{commit}");
            let stats: serde_json::Value =
                serde_json::from_str(add["stats"].as_str().unwrap()).unwrap();
            // One gateway per compacted file, its seqs in one contiguous run.
            assert_eq!(stats["minValues"]["gateway"], stats["maxValues"]["gateway"]);
            adds += 1;
        }
        if let Some(remove) = action.get("remove") {
            assert_eq!(remove["dataChange"], false, "{commit}");
            removes += 1;
        }
        if let Some(info) = action.get("commitInfo") {
            assert_eq!(info["operation"], "OPTIMIZE");
        }
    }
    assert_eq!((adds, removes), (2, 16));
    // Nothing left to compact.
    assert_eq!(
        stdout(&collector(&["optimize"], &config)),
        "optimize: nothing to compact (2 data files)\n"
    );

    // Without [snowflake], VACUUM needs to be told that no Snowflake loads from the table.
    let refused = collector(&["vacuum", "--retention", "0s"], &config);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.starts_with("collector: VACUUM refused: there is no [snowflake] section to read the loader's watermark from"),
        "{stderr}"
    );
    assert_eq!(parquet_files(&table).len(), 18);

    let readings_url = url::Url::from_directory_path(&table).unwrap();
    let line = |verb: &str, n: usize| format!("vacuum {readings_url}: {verb} {n} files\n");
    // The rewritten files left the table seconds ago: a 1h retention keeps them.
    let out = stdout(&collector(
        &["vacuum", "--no-snowflake-check", "--retention", "1h"],
        &config,
    ));
    assert!(out.starts_with(&line("deleted", 0)), "{out}");
    assert_eq!(parquet_files(&table).len(), 18);
    // A dry run lists them and deletes nothing.
    let out = stdout(&collector(
        &[
            "vacuum",
            "--no-snowflake-check",
            "--retention",
            "0s",
            "--dry-run",
        ],
        &config,
    ));
    assert!(out.starts_with(&line("would delete", 16)), "{out}");
    for file in &small {
        assert!(out.contains(file.as_str()), "{file}: {out}");
    }
    assert_eq!(parquet_files(&table).len(), 18);
    let out = stdout(&collector(
        &["vacuum", "--no-snowflake-check", "--retention", "0s"],
        &config,
    ));
    assert!(out.starts_with(&line("deleted", 16)), "{out}");
    let left = parquet_files(&table);
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|f| !small.contains(f)));
    assert_eq!(duckdb_counts(&table), want);

    // A file no commit references (a commit that crashed after writing it): only the full
    // mode deletes it, only with a retention of at least 1h, and only once it is that old.
    let orphan = table.join("part-00000-orphan-c000.zstd.parquet");
    std::fs::copy(table.join(&left[0]), &orphan).unwrap();
    let too_short = collector(
        &[
            "vacuum",
            "--no-snowflake-check",
            "--full",
            "--retention",
            "10m",
        ],
        &config,
    );
    assert_eq!(too_short.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&too_short.stderr)
            .contains("use a retention of at least 3600s, or leave --full out"),
        "{}",
        String::from_utf8_lossy(&too_short.stderr)
    );
    let full = [
        "vacuum",
        "--no-snowflake-check",
        "--full",
        "--retention",
        "1h",
    ];
    assert!(stdout(&collector(&full, &config)).starts_with(&line("deleted", 0)));
    assert!(orphan.exists());
    backdate(&orphan, "3 hours ago");
    assert!(stdout(&collector(&full, &config)).starts_with(&line("deleted", 1)));
    assert!(!orphan.exists());
    assert_eq!(parquet_files(&table), left);
    assert_eq!(duckdb_counts(&table), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_follow_the_interval_and_old_commits_are_cleaned_after_one() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = write_config(
        dir.path(),
        "\n[maintenance]\ncheckpoint_interval = 5\nlog_retention = \"1h\"\n",
    );
    let config = collector::config::CollectorConfig::load(&config_path).unwrap();
    let table = dir.path().join("lake/readings");
    // Version 0 creates the table, 1 records the properties, 2..=13 are 12 commits.
    for first in (1..=60).step_by(5) {
        write_batch(dir.path(), "gw-a", first..=first + 4);
    }
    let report = collector::run_once(&config).await.unwrap();
    assert_eq!(report.ingest.rows_applied(), 60);
    assert_eq!(latest_version(&table), 13);
    let configuration = std::fs::read_to_string(log_file(&table, 1, ".json")).unwrap();
    assert!(
        configuration.contains("\"delta.checkpointInterval\":\"5\""),
        "{configuration}"
    );
    for version in [4, 9] {
        assert!(
            log_file(&table, version, ".checkpoint.parquet").exists(),
            "checkpoint {version}"
        );
    }
    assert!(!log_file(&table, 13, ".checkpoint.parquet").exists());
    let last: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(table.join("_delta_log/_last_checkpoint")).unwrap(),
    )
    .unwrap();
    assert_eq!(last["version"], 9);

    // Versions 0..=8 (their commits and the checkpoint of 4) grow older than the 1h retention.
    for version in 0..=8 {
        backdate(&log_file(&table, version, ".json"), "2 hours ago");
    }
    backdate(&log_file(&table, 4, ".checkpoint.parquet"), "2 hours ago");
    // The next pass commits versions 14 and 15; 14 ends an interval, so the log is cleaned up to
    // the checkpoint that covers the old commits.
    for first in [61, 66] {
        write_batch(dir.path(), "gw-a", first..=first + 4);
    }
    collector::run_once(&config).await.unwrap();
    assert!(log_file(&table, 14, ".checkpoint.parquet").exists());
    for version in 0..=8 {
        assert!(
            !log_file(&table, version, ".json").exists(),
            "commit {version} should be cleaned"
        );
    }
    assert!(!log_file(&table, 4, ".checkpoint.parquet").exists());
    assert!(log_file(&table, 9, ".checkpoint.parquet").exists());
    for version in 9..=15 {
        assert!(
            log_file(&table, version, ".json").exists(),
            "commit {version} is younger than the retention"
        );
    }
    // The table still opens (from its checkpoint) and reads whole.
    let (_, mut tables) = collector::open_tables(&config).await.unwrap();
    assert_eq!(tables.readings.current_rows().await.unwrap().len(), 70);
    assert_eq!(duckdb_counts(&table), (70, 70, (1..=70).sum::<i64>()));
}

/// The shipped lifecycle policy, applied with boto3 (as `aws s3api put-bucket-lifecycle-
/// configuration` does) to a bucket on the S3 peer, and read back.
#[test]
fn the_shipped_s3_lifecycle_policy_is_accepted_and_covers_archive_quarantine_and_uploads() {
    let moto = pipeline_e2e::MotoServer::start();
    let bucket = moto.create_bucket();
    let policy = pipeline_e2e::checkout().join("config-examples/collector/s3-lifecycle.json");
    let script = format!(
        r#"
import json, boto3
s3 = boto3.client("s3", endpoint_url="{endpoint}", aws_access_key_id="{key}",
                  aws_secret_access_key="{secret}", region_name="{region}")
with open("{policy}") as f:
    s3.put_bucket_lifecycle_configuration(Bucket="{bucket}", LifecycleConfiguration=json.load(f))
rules = s3.get_bucket_lifecycle_configuration(Bucket="{bucket}")["Rules"]
print(json.dumps(rules, default=str))
"#,
        endpoint = moto.endpoint(),
        key = pipeline_e2e::S3_ACCESS_KEY_ID,
        secret = pipeline_e2e::S3_SECRET_ACCESS_KEY,
        region = pipeline_e2e::S3_REGION,
        policy = policy.display(),
    );
    let out = Command::new(pipeline_e2e::PeerVenv::peers().python())
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let by_prefix = |prefix: &str| {
        rules
            .iter()
            .find(|r| r["Filter"]["Prefix"] == prefix && r["Status"] == "Enabled")
            .unwrap_or_else(|| panic!("no enabled rule for `{prefix}`: {rules:?}"))
            .clone()
    };
    let archive = by_prefix("archive/");
    assert_eq!(archive["Transitions"][0]["StorageClass"], "GLACIER_IR");
    assert_eq!(archive["Expiration"]["Days"], 400);
    assert_eq!(by_prefix("quarantine/")["Expiration"]["Days"], 90);
    assert_eq!(
        by_prefix("")["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"],
        2
    );
}

/// VACUUM reads the Snowflake loader's watermark (fakesnow standing in for Snowflake) and
/// refuses a retention shorter than the age of the oldest version Snowflake has not loaded.
#[test]
fn vacuum_is_refused_while_snowflake_lags_behind_the_retention() {
    let server = pipeline_e2e::FakeSnow::start();
    let dir = tempfile::tempdir().unwrap();
    let snowflake = format!(
        "\n[snowflake]\nurl = \"{}\"\naccount = \"plantline\"\nuser = \"LOADER\"\npassword_env = \"PLANTLINE_TEST_SF_PASSWORD\"\ndatabase = \"DB_{}\"\nschema = \"RAW\"\nrequest_timeout = \"30s\"\n",
        server.url(),
        uuid::Uuid::new_v4().simple()
    );
    let with_snowflake = write_config(dir.path(), &snowflake);
    let without = dir.path().join("no-snowflake.toml");
    std::fs::write(
        &without,
        "[raw]\nurl = \"landing\"\n\n[delta]\nurl = \"lake/readings\"\n",
    )
    .unwrap();
    let run = |args: &[&str], config: &Path| {
        Command::new(env!("CARGO_BIN_EXE_collector"))
            .args(args)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .env("PLANTLINE_TEST_SF_PASSWORD", "not-checked-by-fakesnow")
            .output()
            .unwrap()
    };
    write_batch(dir.path(), "gw-a", 1..=5);
    let out = stdout(&run(&["run-once"], &with_snowflake));
    assert!(out.contains("snowflake: "), "{out}");
    // Snowflake holds every version: any retention is safe.
    let out = stdout(&run(&["vacuum", "--retention", "0s"], &with_snowflake));
    assert!(out.contains(": deleted 0 files"), "{out}");

    // A pass that does not load Snowflake leaves it one version behind.
    write_batch(dir.path(), "gw-a", 6..=10);
    stdout(&run(&["run-once"], &without));
    let refused = run(&["vacuum", "--retention", "0s"], &with_snowflake);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.starts_with("collector: VACUUM refused: Snowflake has loaded up to version "),
        "{stderr}"
    );
    assert!(
        stderr.contains("so a retention of 0s could delete files it still has to load; use a retention of at least "),
        "{stderr}"
    );
    // A retention longer than the lag (plus its 10-minute margin) goes ahead.
    let out = stdout(&run(&["vacuum", "--retention", "1h"], &with_snowflake));
    assert!(out.contains(": deleted 0 files"), "{out}");
}
