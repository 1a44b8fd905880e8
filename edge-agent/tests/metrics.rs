//! `/metrics`, `/health` and the JSON log format, as an operator meets them: the real agent loop
//! against a pymodbus PLC (`pipeline_e2e::PyModbusServer`) with a local folder as the upload
//! target, scraped over a real loopback socket.
//!
//! The registry is process-wide, so this file runs one agent in-process; the log test runs the
//! binary in its own process.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edge_agent::config;
use pipeline_e2e::{PyModbusServer, free_port};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A plain HTTP/1.1 GET; returns the status code and the body.
fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    pipeline_e2e::http_get(port, path, "")
}

/// `get` from async code without blocking the runtime's workers.
async fn fetch(port: u16, path: &'static str) -> std::io::Result<(u16, String)> {
    tokio::task::spawn_blocking(move || get(port, path))
        .await
        .unwrap()
}

/// The samples of a scrape: `name{labels}` → value as written.
fn samples(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

/// The metric names and types a scrape declares.
fn declared(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(str::to_owned)
        .collect()
}

/// Every row of every Parquet file under `dir`, counted by (device, quality).
fn uploaded(dir: &Path) -> (usize, BTreeMap<(String, String), u64>) {
    let files = common::parquet_files(dir).len();
    let mut counts = BTreeMap::new();
    for row in common::uploaded_rows(dir) {
        *counts
            .entry((row.device.clone(), row.quality.as_str().to_owned()))
            .or_default() += 1;
    }
    (files, counts)
}

// One story from start to after shutdown: the registry is process-wide, so it cannot be split.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_was_read_and_uploaded_and_health_follows_the_batcher() {
    let plc = PyModbusServer::start(&json!({
        "device_id": 1,
        "holding": {"0": [421], "1": [7]},
    }));
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    // Nothing listens on this port: a device that is down.
    let dead_port = free_port();
    let text = format!(
        r#"site = "plant-ost"
gateway = "gw-metrics"

[batch]
max_age = "1s"

[upload.dir]
path = "landing"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[[modbus]]
name = "press-3"
host = "127.0.0.1"
port = {plc_port}
poll_interval = "100ms"

  [[modbus.tags]]
  name = "oil_temp"
  register = "holding"
  address = 0
  type = "u16"
  scale = 0.1

  [[modbus.tags]]
  name = "spare"
  register = "holding"
  address = 50
  type = "u16"

[[modbus]]
name = "press-9"
host = "127.0.0.1"
port = {dead_port}
poll_interval = "100ms"
timeout = "200ms"

  [[modbus.tags]]
  name = "oil_temp"
  register = "holding"
  address = 0
  type = "u16"
"#,
        plc_port = plc.address().port()
    );
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, &text).unwrap();
    let cfg = config::load_file(&file).unwrap();
    let stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::run(cfg, stop.clone()));

    // While it runs: healthy, and every metric is declared.
    let deadline = Instant::now() + Duration::from_secs(30);
    let scrape = loop {
        assert!(Instant::now() < deadline, "no upload within 30 s");
        if let Ok((200, body)) = fetch(metrics_port, "/metrics").await
            && samples(&body)
                .get("plantline_agent_batches_uploaded_total")
                .is_some_and(|n| n != "0")
        {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        declared(&scrape),
        [
            "plantline_agent_readings_total counter",
            "plantline_agent_modbus_errors_total counter",
            "plantline_agent_buffer_readings gauge",
            "plantline_agent_buffer_oldest_reading_age_seconds gauge",
            "plantline_agent_buffer_dropped_total counter",
            "plantline_agent_batches_uploaded_total counter",
            "plantline_agent_rows_uploaded_total counter",
            "plantline_agent_fresh_batches_uploaded_total counter",
            "plantline_agent_fresh_rows_uploaded_total counter",
            "plantline_agent_upload_failures_total counter",
            "plantline_agent_upload_duration_seconds histogram",
            "plantline_agent_last_upload_timestamp_seconds gauge",
        ]
    );
    let running = samples(&scrape);
    let keys: BTreeSet<&str> = running.keys().map(String::as_str).collect();
    for key in [
        "plantline_agent_readings_total{device=\"press-3\",quality=\"good\"}",
        "plantline_agent_readings_total{device=\"press-3\",quality=\"bad\"}",
        "plantline_agent_readings_total{device=\"press-9\",quality=\"bad\"}",
        "plantline_agent_modbus_errors_total{device=\"press-3\",kind=\"exception\"}",
        "plantline_agent_modbus_errors_total{device=\"press-9\",kind=\"connect\"}",
        "plantline_agent_upload_duration_seconds_bucket{le=\"+Inf\"}",
    ] {
        assert!(keys.contains(key), "{key} missing from\n{scrape}");
    }
    let last_upload: f64 = running["plantline_agent_last_upload_timestamp_seconds"]
        .parse()
        .unwrap();
    assert!(last_upload > 1.7e9, "{last_upload}");
    assert_eq!(
        fetch(metrics_port, "/health").await.unwrap(),
        (200, "{\"status\":\"ok\"}\n".to_owned())
    );
    assert_eq!(fetch(metrics_port, "/nope").await.unwrap().0, 404);

    // Stopped: everything is uploaded and the endpoint is closed.
    stop.cancel();
    agent.await.unwrap().unwrap();
    assert!(
        TcpStream::connect(("127.0.0.1", metrics_port)).is_err(),
        "the endpoint stops with the agent"
    );

    // The same registry, served again, must agree with the files exactly.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(edge_agent::metrics::serve(
        listener,
        dir.path().join("buffer.db"),
        server_stop.clone(),
    ));
    let (status, body) = fetch(port, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let after = samples(&body);
    let (files, rows) = uploaded(&dir.path().join("landing"));
    let total: u64 = rows.values().sum();
    assert_eq!(after["plantline_agent_buffer_readings"], "0");
    assert_eq!(
        after["plantline_agent_buffer_oldest_reading_age_seconds"],
        "0"
    );
    assert_eq!(
        after["plantline_agent_rows_uploaded_total"],
        total.to_string()
    );
    assert_eq!(
        after["plantline_agent_batches_uploaded_total"],
        files.to_string()
    );
    assert_eq!(
        after["plantline_agent_upload_duration_seconds_count"],
        files.to_string()
    );
    assert_eq!(after["plantline_agent_upload_failures_total"], "0");
    let counted: BTreeMap<(String, String), u64> = after
        .iter()
        .filter_map(|(k, v)| {
            let labels = k.strip_prefix("plantline_agent_readings_total{device=\"")?;
            let (device, rest) = labels.split_once("\",quality=\"")?;
            let quality = rest.strip_suffix("\"}")?;
            Some(((device.to_owned(), quality.to_owned()), v.parse().unwrap()))
        })
        .collect();
    assert_eq!(counted, rows);
    // Every bad row of press-3 is its `spare` tag refused with an exception; the poller may have
    // counted one more that shutdown cut off before it was sent.
    let bad = rows[&("press-3".to_owned(), "bad".to_owned())];
    let exceptions: u64 =
        after["plantline_agent_modbus_errors_total{device=\"press-3\",kind=\"exception\"}"]
            .parse()
            .unwrap();
    assert!(
        (bad..=bad + 1).contains(&exceptions),
        "{exceptions} exceptions for {bad} bad rows"
    );
    assert_eq!(
        fetch(port, "/health").await.unwrap(),
        (
            503,
            "{\"reason\":\"the batcher is not running\",\"status\":\"failing\"}\n".to_owned()
        )
    );
    server_stop.cancel();
    server.await.unwrap();
}

#[test]
fn the_json_log_flag_writes_one_json_object_per_line_naming_component_and_device() {
    let dir = tempfile::tempdir().unwrap();
    let dead_port = free_port();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        format!(
            r#"site = "plant-ost"
gateway = "gw-logs"

[upload.dir]
path = "landing"

[metrics]
enabled = false

[[modbus]]
name = "press-9"
host = "127.0.0.1"
port = {dead_port}
timeout = "200ms"

  [[modbus.tags]]
  name = "oil_temp"
  register = "holding"
  address = 0
  type = "u16"
"#
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["run", "--log-format", "json", "--config"])
        .arg(&file)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let started = lines
        .iter()
        .find(|l| l["message"] == "edge agent started")
        .unwrap_or_else(|| panic!("no start line in\n{stderr}"));
    assert_eq!(started["level"], "INFO");
    assert_eq!(started["component"], "agent");
    assert_eq!(started["gateway"], "gw-logs");
    let down = lines
        .iter()
        .find(|l| l["message"] == "device unreachable; its tags read bad until it answers again")
        .unwrap_or_else(|| panic!("no unreachable line in\n{stderr}"));
    assert_eq!(down["level"], "WARN");
    assert_eq!(
        down["span"],
        json!({"name": "source", "component": "modbus", "device": "press-9"})
    );
    assert!(
        lines.iter().any(|l| l["message"] == "edge agent stopped"),
        "{stderr}"
    );
}
