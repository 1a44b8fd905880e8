//! `collector run` serves `/metrics` and `/health` on a real socket: exact counters for a known
//! raw zone, the per-gateway freshness gauges and alert, and `/health` turning 503 when every
//! pass fails.

use std::path::Path;
use std::time::{Duration, Instant};

use edge_agent::contract::{self, BatchKey, Quality, Row};
use pipeline_e2e::free_port;

#[path = "support/process.rs"]
mod process;
use process::{Running, get, sample};

fn row(gateway: &str, seq: i64, ts_us: i64, value: f64) -> Row {
    Row {
        seq,
        ts_us,
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

fn write_file(dir: &Path, gateway: &str, first_seq: i64, bytes: &[u8]) {
    let path = dir
        .join("landing")
        .join(BatchKey::new(gateway, first_seq).to_key("raw/"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn write_batch(dir: &Path, rows: &[Row]) {
    let mut bytes = Vec::new();
    let batch = contract::to_record_batch(rows);
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    write_file(dir, &rows[0].gateway, rows[0].seq, &bytes);
}

/// Scrapes until `ready` holds for a scrape, or fails with the last scrape and the log.
fn scrape_until(
    port: u16,
    collector: &Running,
    token: Option<&str>,
    ready: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_mins(1);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some((200, body)) = get(port, "/metrics", token) {
            if ready(&body) {
                return body;
            }
            last = body;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "the scrape never got ready:\n{last}\n--- log ---\n{}",
        collector.log()
    );
}

fn now_us() -> i64 {
    pipeline_e2e::now_us()
}

// One scenario read top to bottom: the raw zone, then every counter it must produce.
#[allow(clippy::too_many_lines)]
#[test]
fn run_serves_exact_counters_freshness_and_health_for_a_known_raw_zone() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            r#"[raw]
url = "landing"

[delta]
url = "lake/readings"

[run]
interval = "1s"
freshness_alert = "15m"

[metrics]
listen = "127.0.0.1:{port}"
token_env = "PLANTLINE_TEST_METRICS_TOKEN"

[[rules]]
name = "oil-range"
tags = "*"
range = [0.0, 100.0]
action = "quarantine"
"#
        ),
    )
    .unwrap();
    let now = now_us();
    // gw-a: fresh readings. 1..=3, then 2..=5 replays 2 and 3; a file that is not Parquet
    // where seq 6 belongs; 7..=9 where seq 8 breaks the range rule.
    write_batch(
        dir.path(),
        &(1..=3)
            .map(|s| row("gw-a", s, now, 20.0))
            .collect::<Vec<_>>(),
    );
    write_batch(
        dir.path(),
        &(2..=5)
            .map(|s| row("gw-a", s, now, 20.0))
            .collect::<Vec<_>>(),
    );
    write_file(dir.path(), "gw-a", 6, b"not parquet");
    write_batch(
        dir.path(),
        &(7..=9)
            .map(|s| row("gw-a", s, now, if s == 8 { 150.0 } else { 30.0 }))
            .collect::<Vec<_>>(),
    );
    // gw-b: its newest reading is two hours old.
    let two_hours_ago = now - 7_200_000_000;
    write_batch(
        dir.path(),
        &(1..=4)
            .map(|s| row("gw-b", s, two_hours_ago - (4 - s) * 1_000_000, 50.0))
            .collect::<Vec<_>>(),
    );

    // The token is in the child's environment only.
    let mut collector = Running::start(
        "run",
        &config,
        dir.path(),
        &[("PLANTLINE_TEST_METRICS_TOKEN", "s3cret-token")],
    );
    let token = Some("s3cret-token");
    // Three passes, so the counters have settled (later passes find nothing new).
    let scrape = scrape_until(port, &collector, token, |s| {
        sample(s, "plantline_collector_passes_total{result=\"clean\"}").is_some_and(|n| n >= 3.0)
    });

    let expect = [
        (
            "plantline_collector_files_seen_total{gateway=\"gw-a\"}",
            4.0,
        ),
        (
            "plantline_collector_files_seen_total{gateway=\"gw-b\"}",
            1.0,
        ),
        (
            "plantline_collector_files_applied_total{gateway=\"gw-a\"}",
            3.0,
        ),
        (
            "plantline_collector_files_applied_total{gateway=\"gw-b\"}",
            1.0,
        ),
        (
            "plantline_collector_rows_applied_total{gateway=\"gw-a\"}",
            7.0,
        ),
        (
            "plantline_collector_rows_applied_total{gateway=\"gw-b\"}",
            4.0,
        ),
        (
            "plantline_collector_rows_skipped_total{gateway=\"gw-a\"}",
            2.0,
        ),
        (
            "plantline_collector_rows_skipped_total{gateway=\"gw-b\"}",
            0.0,
        ),
        (
            "plantline_collector_rows_quarantined_total{gateway=\"gw-a\"}",
            1.0,
        ),
        (
            "plantline_collector_gateway_errors_total{gateway=\"gw-a\"}",
            0.0,
        ),
        (
            "plantline_collector_gateway_watermark{gateway=\"gw-a\"}",
            9.0,
        ),
        (
            "plantline_collector_gateway_watermark{gateway=\"gw-b\"}",
            4.0,
        ),
        (
            "plantline_collector_files_quarantined_total{gateway=\"gw-a\",reason=\"not_parquet\"}",
            1.0,
        ),
        (
            "plantline_collector_rule_rows_total{rule=\"oil-range\",action=\"quarantined\"}",
            1.0,
        ),
        (
            "plantline_collector_rule_rows_total{rule=\"oil-range\",action=\"flagged\"}",
            0.0,
        ),
        (
            "plantline_collector_gap_rows_total{gateway=\"gw-a\",reason=\"quarantined\"}",
            1.0,
        ),
        ("plantline_collector_commits_total{table=\"readings\"}", 2.0),
        ("plantline_collector_commits_total{table=\"gaps\"}", 1.0),
        (
            "plantline_collector_commits_total{table=\"quarantined_rows\"}",
            1.0,
        ),
        (
            "plantline_collector_commit_conflicts_total{table=\"readings\"}",
            0.0,
        ),
        ("plantline_collector_passes_total{result=\"failed\"}", 0.0),
        ("plantline_collector_gateway_stale{gateway=\"gw-a\"}", 0.0),
        ("plantline_collector_gateway_stale{gateway=\"gw-b\"}", 1.0),
    ];
    for (series, want) in expect {
        assert_eq!(
            sample(&scrape, series),
            Some(want),
            "{series}\n--- scrape ---\n{scrape}"
        );
    }
    let age_a = sample(
        &scrape,
        "plantline_collector_gateway_last_reading_age_seconds{gateway=\"gw-a\"}",
    )
    .unwrap();
    let age_b = sample(
        &scrape,
        "plantline_collector_gateway_last_reading_age_seconds{gateway=\"gw-b\"}",
    )
    .unwrap();
    assert!((0.0..120.0).contains(&age_a), "{age_a}");
    assert!((7_200.0..7_400.0).contains(&age_b), "{age_b}");
    let passes = sample(&scrape, "plantline_collector_pass_duration_seconds_count").unwrap();
    assert!(passes >= 3.0, "{scrape}");
    let last_ok = sample(
        &scrape,
        "plantline_collector_last_successful_pass_timestamp_seconds",
    )
    .unwrap();
    assert!((last_ok - now as f64 / 1e6).abs() < 120.0, "{last_ok}");
    assert!(scrape.contains("# TYPE plantline_collector_pass_duration_seconds histogram\n"));

    // The token guards /metrics, not /health; unknown pages are 404.
    let (status, body) = get(port, "/metrics", None).unwrap();
    assert_eq!(status, 401, "{body}");
    assert_eq!(get(port, "/metrics", Some("wrong")).unwrap().0, 401);
    let (status, body) = get(port, "/health", None).unwrap();
    assert_eq!((status, body.as_str()), (200, "{\"status\":\"ok\"}\n"));
    assert_eq!(get(port, "/nope", token).unwrap().0, 404);

    // The stale alert is logged once for gw-b, however many passes ran, and never for gw-a.
    let log = collector.log();
    let stale_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("gateway is stale"))
        .collect();
    assert_eq!(stale_lines.len(), 1, "{log}");
    assert!(stale_lines[0].contains("gw-b"), "{log}");

    assert_eq!(collector.stop(), Some(0), "{}", collector.log());
}

#[test]
fn health_is_503_when_every_pass_fails() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "[raw]\nurl = \"landing\"\n\n[delta]\nurl = \"lake/readings\"\n\n[run]\ninterval = \"1s\"\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
        ),
    )
    .unwrap();
    // The Delta table's folder cannot be created: a file is in the way.
    std::fs::create_dir_all(dir.path().join("landing")).unwrap();
    std::fs::write(dir.path().join("lake"), b"in the way").unwrap();
    let mut collector = Running::start("run", &config, dir.path(), &[]);
    scrape_until(port, &collector, None, |s| {
        sample(s, "plantline_collector_passes_total{result=\"failed\"}").is_some_and(|n| n >= 1.0)
    });
    let (status, body) = get(port, "/health", None).unwrap();
    assert_eq!(status, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "failing");
    let reason = health["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("the last pass failed: cannot create the local folder"),
        "{reason}"
    );

    // Once the obstacle is gone the next pass succeeds and /health recovers.
    std::fs::remove_file(dir.path().join("lake")).unwrap();
    scrape_until(port, &collector, None, |s| {
        sample(s, "plantline_collector_passes_total{result=\"clean\"}").is_some_and(|n| n >= 1.0)
    });
    assert_eq!(get(port, "/health", None).unwrap().0, 200);
    assert_eq!(collector.stop(), Some(0), "{}", collector.log());
}
