//! `edge-agent probe` as a plant engineer runs it, against a real PLC stand-in: pymodbus 3.16
//! (`tests/peers/modbus_server.py`) started by each test on 127.0.0.1, over Modbus TCP, over RTU
//! on one end of a socat pty pair (a serial line), and as RTU frames over TCP (a serial
//! gateway).

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
         edge-agent probe: --type f16: unknown variant `f16`, expected one of `bool`, `bit`, `u16`, `i16`, `u32`, `i32`, `u64`, `i64`, `f32`, `f64`, `string`\n\
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
        "edge-agent probe: --type bool: does not fit holding registers; use a word type (u16, i16, u32, i32, u64, i64, f32, f64) or string; read a bit as u16 and look at the hex\n"
    );
    assert_eq!(out.status.code(), Some(78));

    // Neither a sensor map nor a host: clap's message, and the promised exit code.
    let out = edge_agent(&["probe", "--register", "holding"]);
    assert_eq!(out.status.code(), Some(78));
}

/// Two slaves of an RTU line: a power meter (unit 1) with an f32 in CDAB order at input 0, a
/// temperature transmitter (unit 2) with 21.5 degC in tenths at holding 0.
fn rtu_slaves() -> serde_json::Value {
    json!({"devices": [
        {"device_id": 1, "input": {"0": {"type": "f32", "order": "CDAB", "value": 1234.5}}},
        {"device_id": 2, "holding": {"0": [215]}},
    ]})
}

fn bus_map(dir: &Path, bus: &str) -> String {
    let file = dir.join("line5.toml");
    std::fs::write(
        &file,
        format!(
            r#"site = "plant-ost"
gateway = "gw-line5"

[upload.dir]
path = "outbox"

{bus}

[[modbus]]
name = "pm-5"
bus = "line5"
unit_id = 1
timeout = "500ms"

  [[modbus.tags]]
  name = "active_power"
  register = "input"
  address = 0
  type = "f32"
  byte_order = "CDAB"
  unit = "kW"

[[modbus]]
name = "tt-101"
bus = "line5"
unit_id = 2
timeout = "500ms"
inter_frame_delay = "5ms"

  [[modbus.tags]]
  name = "temperature"
  register = "holding"
  address = 0
  type = "i16"
  scale = 0.1
  unit = "degC"

  [[modbus.tags]]
  name = "spare"
  register = "holding"
  address = 5
  type = "u16"

[[modbus]]
name = "tt-109"
bus = "line5"
unit_id = 9
timeout = "300ms"

  [[modbus.tags]]
  name = "temperature"
  register = "holding"
  address = 0
  type = "i16"
"#
        ),
    )
    .unwrap();
    file.display().to_string()
}

#[test]
fn probe_reads_the_slaves_of_a_serial_bus_over_its_port() {
    let plc = PyModbusServer::start_rtu(&rtu_slaves());
    let port = plc.serial_path().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let map = bus_map(
        dir.path(),
        &format!(
            "[[modbus_bus]]\nname = \"line5\"\ntransport = \"rtu\"\nserial_port = \"{port}\"\nparity = \"none\"\n"
        ),
    );
    let out = edge_agent(&["probe", "--config", &map, "--device", "pm-5"]);
    assert_eq!(
        stdout(&out),
        "active_power: input 0-1 = 0x5000 0x449A (20480 17562) -> 1234.5 kW, good\n"
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // The slave lacks one register: the line names the slave, its bus and the exception.
    let out = edge_agent(&["probe", "--config", &map, "--device", "tt-101"]);
    assert_eq!(
        stdout(&out),
        format!(
            "temperature: holding 0 = 0x00D7 (215) -> 21.5 degC, good\n\
             spare: holding 5 -> bad: tt-101 (unit 2 on bus line5, {port} 19200 8N1) refused holding 5: exception 2 (Illegal data address)\n"
        )
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // A slave address nobody on the line owns: no answer, within the slave's timeout.
    let out = edge_agent(&["probe", "--config", &map, "--device", "tt-109"]);
    assert_eq!(
        stdout(&out),
        format!(
            "temperature: holding 0 -> bad: tt-109 (unit 9 on bus line5, {port} 19200 8N1) did not answer within 300ms reading holding 0\n"
        )
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn probe_reads_a_slave_behind_a_serial_gateway() {
    let gateway = PyModbusServer::start_rtu_over_tcp(&rtu_slaves());
    let port = gateway.address().port();
    let dir = tempfile::tempdir().unwrap();
    let map = bus_map(
        dir.path(),
        &format!(
            "[[modbus_bus]]\nname = \"line5\"\ntransport = \"rtu_over_tcp\"\nhost = \"127.0.0.1\"\nport = {port}\n"
        ),
    );
    let out = edge_agent(&[
        "probe",
        "--config",
        &map,
        "--device",
        "tt-101",
        "--tag",
        "temperature",
    ]);
    assert_eq!(
        stdout(&out),
        "temperature: holding 0 = 0x00D7 (215) -> 21.5 degC, good\n"
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // The same slave without a sensor map: a raw range as RTU frames over TCP.
    let out = edge_agent(&[
        "probe",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--rtu-over-tcp",
        "--unit",
        "1",
        "--register",
        "input",
        "--address",
        "0",
        "--type",
        "f32",
        "--byte-order",
        "CDAB",
    ]);
    assert_eq!(
        stdout(&out),
        "input 0 = 0x5000 (20480)\ninput 1 = 0x449A (17562)\nf32 CDAB at input 0 -> 1234.5\n"
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn raw_probe_reads_a_serial_port_with_its_framing() {
    let plc = PyModbusServer::start_rtu(&rtu_slaves());
    let port = plc.serial_path().display().to_string();
    let out = edge_agent(&[
        "probe",
        "--serial",
        &port,
        "--baud",
        "19200",
        "--parity",
        "none",
        "--unit",
        "2",
        "--register",
        "holding",
        "--address",
        "0",
        "--type",
        "i16",
        "--scale",
        "0.1",
    ]);
    assert_eq!(
        stdout(&out),
        "holding 0 = 0x00D7 (215)\ni16 ABCD at holding 0 -> 21.5\n"
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let out = edge_agent(&[
        "probe",
        "--serial",
        &port,
        "--parity",
        "none",
        "--unit",
        "9",
        "--register",
        "holding",
        "--address",
        "0",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(
        stderr(&out),
        format!(
            "edge-agent probe: unit 9 on {port} 19200 8N1 did not answer within 300ms reading holding 0\n"
        )
    );
    assert_eq!(out.status.code(), Some(1));

    let missing = "/dev/plantline-no-such-tty";
    let out = edge_agent(&[
        "probe",
        "--serial",
        missing,
        "--register",
        "holding",
        "--address",
        "0",
    ]);
    assert!(
        stderr(&out).starts_with(&format!(
            "edge-agent probe: cannot connect to unit 1 on {missing} 19200 8E1: "
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn bad_serial_probe_arguments_are_all_reported_and_exit_78() {
    let out = edge_agent(&[
        "probe",
        "--serial",
        "/dev/ttyUSB0",
        "--baud",
        "0",
        "--parity",
        "space",
        "--stop-bits",
        "3",
        "--unit",
        "0",
        "--register",
        "holding",
        "--address",
        "0",
    ]);
    assert_eq!(
        stderr(&out),
        "edge-agent probe: --parity space: unknown variant `space`, expected one of `none`, `even`, `odd`\n\
         edge-agent probe: --baud 0: carries no data; use the rate set on the slaves, for example --baud 9600 or 19200\n\
         edge-agent probe: --stop-bits 3: does not exist on a serial line; use 1 or 2\n\
         edge-agent probe: --unit 0: not a slave address on a serial line (0 is broadcast, which no slave answers; 248 and up are reserved); use the address set on the device, 1 to 247\n"
    );
    assert_eq!(out.status.code(), Some(78));

    // Serial settings without a serial line, and a serial port with a host: clap's message,
    // and the promised exit code.
    for args in [
        &[
            "probe",
            "--host",
            "127.0.0.1",
            "--baud",
            "9600",
            "--register",
            "holding",
            "--address",
            "0",
        ][..],
        &[
            "probe",
            "--host",
            "127.0.0.1",
            "--serial",
            "/dev/ttyUSB0",
            "--register",
            "holding",
            "--address",
            "0",
        ][..],
    ] {
        let out = edge_agent(args);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty());
    }
}
