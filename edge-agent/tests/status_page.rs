//! The status page as a plant engineer meets it: the real agent binary polls a pymodbus PLC and a
//! device that is down, and headless Chromium opens `/status` with the configured token. The
//! page's script must have filled in the tag table (value, unit, quality), the device health
//! with the dead device's error, the buffer and the sensor map's state.
//!
//! The screenshot is kept as a test artifact: `<target>/tmp/status-page.png`.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pipeline_e2e::{PyModbusServer, free_port, headless_chromium};
use serde_json::{Value, json};

const TOKEN: &str = "line-3-status";

/// A plain HTTP/1.1 GET with optional extra header lines; returns the status and the body.
fn get(port: u16, path: &str, headers: &str) -> (u16, String) {
    pipeline_e2e::http_get(port, path, headers).expect("the agent answers")
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// Waits until `/status.json` shows a value for every tag of `press-3` and an error for `press-9`.
fn wait_for_live_picture(port: u16) -> Value {
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            let (status, body) = get(
                port,
                "/status.json",
                &format!("Authorization: Bearer {TOKEN}\r\n"),
            );
            assert_eq!(status, 200, "{body}");
            let status: Value = serde_json::from_str(&body).expect("status.json is JSON");
            let tags = status["tags"].as_array().map_or(0, Vec::len);
            let dead_failing = status["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|d| d["device"] == "press-9" && !d["last_error"].is_null());
            let uploaded = status["uploads"]["batches"].as_u64().unwrap_or(0) > 0;
            if tags == 3 && dead_failing && uploaded {
                return status;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the status never showed both devices and an upload"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The map of the test: press-3 on the pymodbus PLC, press-9 on a port nobody listens on.
fn sensor_map(plc_port: u16, port: u16, dead_port: u16) -> String {
    format!(
        r#"site = "plant-ost"
gateway = "gw-status"

[batch]
max_age = "1s"

[upload.dir]
path = "landing"

[metrics]
listen = "127.0.0.1:{port}"
token_env = "PLANTLINE_STATUS_TOKEN"

[[modbus]]
name = "press-3"
host = "127.0.0.1"
port = {plc_port}
poll_interval = "200ms"

  [[modbus.tags]]
  name = "oil_temp"
  register = "holding"
  address = 0
  type = "u16"
  scale = 0.1
  unit = "degC"

  [[modbus.tags]]
  name = "strokes"
  register = "holding"
  address = 1
  type = "u16"

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
    )
}

#[test]
fn the_status_page_shows_live_tags_device_health_and_the_buffer_in_a_browser() {
    let plc = PyModbusServer::start(&json!({
        "device_id": 1,
        "holding": {"0": [421], "1": [7]},
    }));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let dead_port = free_port();
    let config = dir.path().join("line3.toml");
    std::fs::write(&config, sensor_map(plc.address().port(), port, dead_port)).unwrap();
    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .args(["run", "--config"])
            .arg(&config)
            .env("PLANTLINE_STATUS_TOKEN", TOKEN)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let status = wait_for_live_picture(port);

    // Without the token only /health answers.
    for path in ["/status", "/status.json", "/metrics", "/status?token=wrong"] {
        let (code, body) = get(port, path, "");
        assert_eq!(code, 401, "{path} without the token: {body}");
        assert!(body.contains("token_env or token_file"), "{body}");
    }
    let (code, _) = get(port, "/health", "");
    assert_ne!(code, 401, "/health stays open for supervisors");
    let (code, metrics) = get(
        port,
        "/metrics",
        &format!("Authorization: Bearer {TOKEN}\r\n"),
    );
    assert_eq!(code, 200);
    assert!(metrics.contains("plantline_agent_readings_total"));

    let artifact = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&artifact);
    let page = headless_chromium(
        &format!("http://127.0.0.1:{port}/status?token={TOKEN}"),
        Duration::from_secs(5),
        Some(&artifact),
    );
    let dom = &page.dom;
    assert!(
        dom.contains(r#"data-loaded="true""#),
        "the page's script never filled it in:\n{dom}"
    );

    let row = |tag: &str| -> String {
        let start = dom
            .find(&format!(r#"data-tag="{tag}""#))
            .unwrap_or_else(|| panic!("no row for {tag} in\n{dom}"));
        let end = dom[start..].find("</tr>").expect("a closed row") + start;
        dom[start..end].to_owned()
    };
    let oil = row("press-3/oil_temp");
    assert!(oil.contains(">42.1<"), "{oil}");
    assert!(oil.contains(">degC<"), "{oil}");
    assert!(oil.contains(r#"class="good">good<"#), "{oil}");
    let strokes = row("press-3/strokes");
    assert!(strokes.contains(">7<"), "{strokes}");
    let dead = row("press-9/oil_temp");
    assert!(dead.contains(r#"class="bad">bad<"#), "{dead}");
    assert!(dead.contains(">—<"), "a bad reading has no value: {dead}");

    // Device health: press-9 failing with its error, press-3 fine.
    let devices_start = dom.find(r#"id="devices""#).expect("a device table");
    let devices =
        &dom[devices_start..dom[devices_start..].find("</table>").unwrap() + devices_start];
    let press9 = &devices[devices.find(">press-9<").expect("press-9 listed")..];
    let press9 = &press9[..press9.find("</tr>").unwrap()];
    assert!(press9.contains(r#"class="bad">failing<"#), "{press9}");
    assert!(
        press9.contains(&format!("127.0.0.1:{dead_port}")),
        "the error names the address: {press9}"
    );
    let press3 = &devices[devices.find(">press-3<").expect("press-3 listed")..];
    assert!(press3[..press3.find("</tr>").unwrap()].contains(r#"class="good">ok<"#));

    // The map is in force, and the header names the gateway.
    assert_eq!(status["map"]["gateway"], "gw-status");
    assert_eq!(status["map"]["site"], "plant-ost");
    assert_eq!(
        status["map"]["path"],
        config.display().to_string(),
        "the page names the file in force"
    );
    assert!(dom.contains(r#"<b id="gateway">gw-status</b>"#), "{dom}");
    assert!(dom.contains("valid, in force"), "{dom}");
    assert!(dom.contains(&config.display().to_string()));
    // The screenshot is a real PNG.
    let png = std::fs::read(&artifact).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    eprintln!("status page screenshot: {}", artifact.display());
}
