//! The `collector` command line: exit codes and what `run-once` prints.

use std::path::Path;
use std::process::{Command, Output};

use edge_agent::contract::{BatchKey, Quality, Row};

fn collector(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_collector"))
        .args(args)
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn write_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("collector.toml");
    std::fs::write(
        &config,
        "[raw]\nurl = \"landing\"\n\n[delta]\nurl = \"lake/readings\"\n",
    )
    .unwrap();
    config
}

fn write_batch(dir: &Path, gateway: &str, seqs: std::ops::RangeInclusive<i64>) {
    let rows: Vec<Row> = seqs
        .map(|seq| Row {
            seq,
            ts_us: 1_790_000_000_000_000 + seq,
            site: "plant-a".into(),
            gateway: gateway.into(),
            device: "press-3".into(),
            tag: "oil_temp".into(),
            value: Some(seq as f64),
            quality: Quality::Good,
            value_text: None,
            unit: Some("degC".into()),
        })
        .collect();
    let key = BatchKey::new(gateway, rows[0].seq).to_key("raw/");
    let path = dir.join("landing").join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut bytes = Vec::new();
    let batch = edge_agent::contract::to_record_batch(&rows);
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn run_once_exits_0_and_reports_what_it_applied() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    write_batch(dir.path(), "gw-a", 1..=3);
    write_batch(dir.path(), "gw-a", 4..=5);
    let out = collector(&["run-once", "--config"], &config);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "gateway gw-a: 2 files, 5 rows applied, 0 duplicate rows skipped, watermark 5\nsnowflake: not configured\n"
    );
    let again = collector(&["run-once", "--config"], &config);
    assert_eq!(
        String::from_utf8_lossy(&again.stdout),
        "gateway gw-a: 0 files, 0 rows applied, 0 duplicate rows skipped, watermark 5\nsnowflake: not configured\n"
    );
}

/// Puts a file that is not Parquet where gw-a's batch of seq 4 belongs.
fn write_bad_batch(dir: &Path) -> std::path::PathBuf {
    let bad = dir
        .join("landing")
        .join(BatchKey::new("gw-a", 4).to_key("raw/"));
    std::fs::write(&bad, b"not parquet").unwrap();
    bad
}

#[test]
fn run_once_exits_0_and_lists_the_files_it_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    write_batch(dir.path(), "gw-a", 1..=3);
    let bad = write_bad_batch(dir.path());
    write_batch(dir.path(), "gw-a", 5..=6);
    let out = collector(&["run-once", "--config"], &config);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "gateway gw-a: 2 files, 5 rows applied, 0 duplicate rows skipped, watermark 6, 1 quarantined, 1 gaps recorded\n  \
         quarantined raw/gateway=gw-a/00000000000000000004.parquet -> quarantine/gateway=gw-a/00000000000000000004.parquet: \
         not_parquet: is not a Parquet file: it does not start with the `PAR1` magic bytes (11 bytes)\n  \
         gap seq 4..=4 (1 readings): quarantined (quarantine/gateway=gw-a/00000000000000000004.parquet)\n\
         snowflake: not configured\n"
    );
    let moved = dir
        .path()
        .join("landing/quarantine/gateway=gw-a/00000000000000000004.parquet");
    assert!(!bad.exists());
    assert_eq!(std::fs::read(&moved).unwrap(), b"not parquet");
    assert!(moved.with_extension("parquet.reason.json").exists());
}

#[test]
fn run_once_exits_1_when_a_bad_file_cannot_be_moved_and_applies_nothing_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    write_batch(dir.path(), "gw-a", 1..=3);
    let bad = write_bad_batch(dir.path());
    write_batch(dir.path(), "gw-a", 5..=6);
    // The quarantine prefix cannot become a folder: a person has to look.
    std::fs::write(dir.path().join("landing/quarantine"), b"in the way").unwrap();
    let out = collector(&["run-once", "--config"], &config);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(
            "gateway gw-a: 1 files, 3 rows applied, 0 duplicate rows skipped, watermark 3; ERROR gateway `gw-a`: \
             cannot copy `raw/gateway=gw-a/00000000000000000004.parquet` to the quarantine as \
             `quarantine/gateway=gw-a/00000000000000000004.parquet`: "
        ),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("\nsnowflake: not configured\n"),
        "{stdout}"
    );
    // The bad file and the batch after it wait for the next pass.
    assert!(bad.exists());
    assert!(
        dir.path()
            .join("landing")
            .join(BatchKey::new("gw-a", 5).to_key("raw/"))
            .exists()
    );
}

#[test]
fn run_once_exits_1_when_the_tag_catalogs_fail_after_applying_the_readings() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    write_batch(dir.path(), "gw-a", 1..=3);
    // The tags table (beside the readings table) cannot become a folder.
    let blocker = dir.path().join("lake/readings_tags");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"in the way").unwrap();
    let out = collector(&["run-once", "--config"], &config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        "gateway gw-a: 1 files, 3 rows applied, 0 duplicate rows skipped, watermark 3"
    );
    assert!(lines[1].starts_with("tags: ERROR "), "{stdout}");
    assert!(lines[1].contains("readings_tags"), "{stdout}");
    assert_eq!(lines[2..], ["snowflake: not configured"]);
    // The readings are in; once the way is clear the pass is clean again.
    std::fs::remove_file(&blocker).unwrap();
    let again = collector(&["run-once", "--config"], &config);
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&again.stdout),
        "gateway gw-a: 0 files, 0 rows applied, 0 duplicate rows skipped, watermark 3\nsnowflake: not configured\n"
    );
}

#[test]
fn an_invalid_config_exits_78_with_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        "[raw]\nurl = \"landing\"\nprefix = \"raw\"\n\n[delta]\nurl = \"landing\"\n",
    )
    .unwrap();
    for args in [&["validate"][..], &["run-once", "--config"][..]] {
        let out = collector(args, &config);
        assert_eq!(out.status.code(), Some(78), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("`raw.prefix`: `raw` does not end with `/`; write it like \"raw/\""),
            "{stderr}"
        );
        assert!(
            stderr.contains("`delta.url`: is the same location as `raw.url`"),
            "{stderr}"
        );
    }
}
