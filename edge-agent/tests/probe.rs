//! `edge-agent probe` as a plant engineer runs it, against a real PLC stand-in: pymodbus 3.16
//! (`tests/peers/modbus_server.py`) started by each test on 127.0.0.1.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use pipeline_e2e::{PyModbusServer, free_port};
use serde_json::json;

fn edge_agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run edge-agent")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A PLC with an f32 oil temperature (123.456, ABCD) at holding 100, a pressure of 4.50 bar in
/// hundredths at holding 102, the same float in CDAB order at input 10 and three coils.
fn plc() -> PyModbusServer {
    PyModbusServer::start(&json!({
        "holding": {"100": [0x42F6, 0xE979], "102": [450]},
        "input": {"10": [0xE979, 0x42F6]},
        "coils": {"0": [true, false, true]}
    }))
}

fn sensor_map(dir: &Path, port: u16) -> String {
    let file = dir.join("line1.toml");
    std::fs::write(
        &file,
        format!(
            r#"site = "plant-ost"
gateway = "gw-line1"

[upload.dir]
path = "outbox"

[[modbus]]
name = "press-3"
host = "127.0.0.1"
port = {port}
timeout = "2s"

  [[modbus.tags]]
  name = "oil_temp"
  register = "holding"
  address = 100
  type = "f32"
  unit = "degC"

  [[modbus.tags]]
  name = "pressure"
  register = "holding"
  address = 102
  type = "u16"
  scale = 0.01
  unit = "bar"

  [[modbus.tags]]
  name = "meter_power"
  register = "input"
  address = 10
  type = "f32"
  byte_order = "CDAB"

  [[modbus.tags]]
  name = "running"
  register = "coil"
  address = 2
  type = "bool"

  [[modbus.tags]]
  name = "spare"
  register = "holding"
  address = 300
  type = "u16"
"#
        ),
    )
    .unwrap();
    file.display().to_string()
}

#[test]
fn probe_prints_each_tag_with_raw_words_value_unit_and_quality() {
    let plc = plc();
    let dir = tempfile::tempdir().unwrap();
    let port = plc.address().port();
    let map = sensor_map(dir.path(), port);
    let out = edge_agent(&["probe", "--config", &map, "--device", "press-3"]);
    assert_eq!(
        stdout(&out),
        format!(
            "oil_temp: holding 100-101 = 0x42F6 0xE979 (17142 59769) -> 123.45600128173828 degC, good\n\
             pressure: holding 102 = 0x01C2 (450) -> 4.5 bar, good\n\
             meter_power: input 10-11 = 0xE979 0x42F6 (59769 17142) -> 123.45600128173828, good\n\
             running: coil 2 = 1 -> 1, good\n\
             spare: holding 300 -> bad: press-3 (unit 1 at 127.0.0.1:{port}) refused holding 300: exception 2 (Illegal data address)\n"
        )
    );
    // The PLC lacks one register: the engineer must notice, so the exit code says so.
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn probe_of_one_tag_reads_only_that_tag_and_exits_0() {
    let plc = plc();
    let dir = tempfile::tempdir().unwrap();
    let map = sensor_map(dir.path(), plc.address().port());
    let out = edge_agent(&[
        "probe", "--config", &map, "--device", "press-3", "--tag", "pressure",
    ]);
    assert_eq!(
        stdout(&out),
        "pressure: holding 102 = 0x01C2 (450) -> 4.5 bar, good\n"
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn probe_of_an_unknown_device_or_tag_lists_the_known_ones_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let map = sensor_map(dir.path(), free_port());
    let out = edge_agent(&["probe", "--config", &map, "--device", "press-4"]);
    assert_eq!(
        stderr(&out),
        format!(
            "edge-agent probe: {map}: no device `press-4` in the sensor map; use one of: press-3\n"
        )
    );
    assert_eq!(out.status.code(), Some(78));
    let out = edge_agent(&[
        "probe", "--config", &map, "--device", "press-3", "--tag", "oil",
    ]);
    assert_eq!(
        stderr(&out),
        format!(
            "edge-agent probe: {map}: device `press-3` has no tag `oil`; use one of: oil_temp, pressure, meter_power, running, spare\n"
        )
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(out.stdout.is_empty());
}

#[test]
fn raw_probe_prints_every_word_and_the_decoded_value() {
    let plc = plc();
    let port = plc.address().port().to_string();
    let out = edge_agent(&[
        "probe",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--register",
        "input",
        "--address",
        "10",
        "--type",
        "f32",
        "--byte-order",
        "CDAB",
        "--scale",
        "0.5",
    ]);
    assert_eq!(
        stdout(&out),
        "input 10 = 0xE979 (59769)\n\
         input 11 = 0x42F6 (17142)\n\
         f32 CDAB at input 10 -> 61.72800064086914\n"
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let out = edge_agent(&[
        "probe",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--register",
        "holding",
        "--address",
        "100",
        "--count",
        "3",
    ]);
    assert_eq!(
        stdout(&out),
        "holding 100 = 0x42F6 (17142)\nholding 101 = 0xE979 (59769)\nholding 102 = 0x01C2 (450)\n"
    );
    assert_eq!(out.status.code(), Some(0));

    let out = edge_agent(&[
        "probe",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--register",
        "coil",
        "--address",
        "0",
        "--count",
        "3",
    ]);
    assert_eq!(stdout(&out), "coil 0 = 1\ncoil 1 = 0\ncoil 2 = 1\n");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn raw_probe_of_an_address_the_plc_lacks_names_device_address_and_exception() {
    let plc = plc();
    let port = plc.address().port();
    let out = edge_agent(&[
        "probe",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--register",
        "holding",
        "--address",
        "300",
        "--type",
        "f32",
    ]);
    assert_eq!(
        stderr(&out),
        format!(
            "edge-agent probe: unit 1 at 127.0.0.1:{port} refused holding 300-301: exception 2 (Illegal data address)\n"
        )
    );
    assert!(out.stdout.is_empty());
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn probe_of_a_closed_port_exits_1() {
    let port = free_port();
    let out = edge_agent(&[
        "probe",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--register",
        "holding",
        "--address",
        "0",
    ]);
    assert_eq!(
        stderr(&out),
        format!(
            "edge-agent probe: cannot connect to unit 1 at 127.0.0.1:{port}: Connection refused (os error 111)\n"
        )
    );
    assert_eq!(out.status.code(), Some(1));

    let dir = tempfile::tempdir().unwrap();
    let map = sensor_map(dir.path(), port);
    let out = edge_agent(&["probe", "--config", &map, "--device", "press-3"]);
    assert_eq!(
        stderr(&out),
        format!(
            "edge-agent probe: cannot connect to press-3 (unit 1 at 127.0.0.1:{port}): Connection refused (os error 111)\n"
        )
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn probe_of_a_device_that_accepts_but_never_answers_times_out() {
    // A TCP peer that accepts the connection and then says nothing, like a PLC whose Modbus
    // task hangs.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = edge_agent(&[
        "probe",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--register",
        "holding",
        "--address",
        "7",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(
        stderr(&out),
        format!(
            "edge-agent probe: unit 1 at 127.0.0.1:{port} did not answer within 300ms reading holding 7\n"
        )
    );
    assert_eq!(out.status.code(), Some(1));
    drop(listener);
}

#[test]
fn bad_probe_arguments_are_all_reported_and_exit_78() {
    let out = edge_agent(&[
        "probe",
        "--host",
        "127.0.0.1",
        "--register",
        "coils",
        "--address",
        "65535",
        "--count",
        "4",
        "--type",
        "f16",
        "--byte-order",
        "ABDC",
    ]);
    assert_eq!(
        stderr(&out),
        "edge-agent probe: --register coils: unknown variant `coils`, expected one of `coil`, `discrete`, `holding`, `input`\n\
         edge-agent probe: --type f16: unknown variant `f16`, expected one of `bool`, `bit`, `u16`, `i16`, `u32`, `i32`, `u64`, `i64`, `f32`, `f64`\n\
         edge-agent probe: --byte-order ABDC: unknown variant `ABDC`, expected one of `ABCD`, `CDAB`, `BADC`, `DCBA`\n\
         edge-agent probe: --address 65535 --count 4: the range ends past the last address 65535; use an address of at most 65532\n"
    );
    assert_eq!(out.status.code(), Some(78));

    let out = edge_agent(&[
        "probe",
        "--host",
        "127.0.0.1",
        "--register",
        "holding",
        "--address",
        "0",
        "--type",
        "bool",
    ]);
    assert_eq!(
        stderr(&out),
        "edge-agent probe: --type bool: does not fit holding registers; use a word type (u16, i16, u32, i32, u64, i64, f32, f64); read a bit as u16 and look at the hex\n"
    );
    assert_eq!(out.status.code(), Some(78));

    // Neither a sensor map nor a host: clap's message, and the promised exit code.
    let out = edge_agent(&["probe", "--register", "holding"]);
    assert_eq!(out.status.code(), Some(78));
}
