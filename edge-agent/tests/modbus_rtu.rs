//! Modbus RTU buses against a real, independently written Modbus server: pymodbus 3.16 through
//! the shared peer harness (`pipeline_e2e::PyModbusServer`), serving RTU on one end of a socat
//! pty pair (the agent opens the other end as its serial port) or RTU frames over TCP, as a
//! serial gateway does. One server answers several slave addresses, each with its own register
//! map; an address nobody owns gets no answer, as on a real bus. Typed register values are
//! encoded by the peer with Python's `struct`, independently of the agent's decoder.

// Exact float comparisons are the point: every value must arrive with these very bits.
#![allow(clippy::float_cmp)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use edge_agent::Reading;
use edge_agent::config::{
    AgentConfig, BusTransport, ByteOrder, ConfigDuration, DataType, ModbusBus, ModbusDevice,
    ModbusTag, Parity, RegisterKind, load_str,
};
use edge_agent::contract::Quality;
use edge_agent::sources::modbus::run_bus;
use pipeline_e2e::PyModbusServer;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One bus task under test and every reading it sends.
struct BusUnderTest {
    rx: mpsc::Receiver<Reading>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// Each device's tags, in the sensor map's order.
    tags: HashMap<String, Vec<String>>,
}

impl BusUnderTest {
    fn start(bus: ModbusBus, devices: Vec<ModbusDevice>) -> Self {
        let tags = devices
            .iter()
            .map(|d| {
                (
                    d.name.clone(),
                    d.tags.iter().map(|t| t.name.clone()).collect(),
                )
            })
            .collect();
        let (tx, rx) = mpsc::channel(1024);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_bus(bus, devices, tx, stop.clone()));
        Self {
            rx,
            stop,
            task,
            tags,
        }
    }

    /// Starts the bus of a sensor map the way the agent does: its `[[modbus_bus]]` and the
    /// `[[modbus]]` devices that name it.
    fn start_from(config: &AgentConfig) -> Self {
        let bus = config.modbus_bus[0].clone();
        let devices = config
            .modbus
            .iter()
            .filter(|d| d.bus.as_deref() == Some(bus.name.as_str()))
            .cloned()
            .collect();
        Self::start(bus, devices)
    }

    async fn next(&mut self) -> Reading {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("a reading within 10 s")
            .expect("the bus task is running")
    }

    /// The first complete tick of every device, by device and tag. A device's readings of one
    /// tick arrive together and in tag order.
    async fn first_rounds(&mut self) -> HashMap<String, HashMap<String, Reading>> {
        let mut rounds: HashMap<String, HashMap<String, Reading>> = HashMap::new();
        while rounds.len() < self.tags.len() {
            let first = self.next().await;
            let names = self.tags[&first.device].clone();
            assert_eq!(first.tag, names[0], "a tick starts with the first tag");
            let mut round = HashMap::from([(first.tag.clone(), first.clone())]);
            for name in names.iter().skip(1) {
                let reading = self.next().await;
                assert_eq!(
                    (&reading.device, &reading.tag),
                    (&first.device, name),
                    "one device's tick arrives whole and in tag order"
                );
                round.insert(name.clone(), reading);
            }
            rounds.entry(first.device.clone()).or_insert(round);
        }
        rounds
    }

    /// Every reading sent from now for `window`.
    async fn collect(&mut self, window: Duration) -> Vec<Reading> {
        let end = Instant::now() + window;
        let mut readings = Vec::new();
        while let Ok(Some(reading)) = tokio::time::timeout_at(end, self.rx.recv()).await {
            readings.push(reading);
        }
        readings
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the bus task stops within 5 s of shutdown")
            .expect("the bus task ends without panicking");
    }
}

fn serial_bus(plc: &PyModbusServer) -> ModbusBus {
    ModbusBus {
        name: "line5".to_owned(),
        transport: BusTransport::Rtu,
        serial_port: Some(plc.serial_path().display().to_string()),
        host: None,
        port: None,
        // What the peer's serial server uses; a pty carries any setting.
        baud_rate: 19_200,
        parity: Parity::None,
        data_bits: 8,
        stop_bits: 1,
        inter_frame_delay: None,
    }
}

fn slave(name: &str, unit_id: u8, tags: Vec<ModbusTag>) -> ModbusDevice {
    ModbusDevice {
        name: name.to_owned(),
        host: String::new(),
        port: ModbusDevice::DEFAULT_PORT,
        unit_id,
        bus: Some("line5".to_owned()),
        inter_frame_delay: None,
        poll_interval: ConfigDuration::from_millis(200),
        timeout: ConfigDuration::from_millis(500),
        addressing: edge_agent::config::Addressing::ZeroBased,
        max_gap: ModbusDevice::DEFAULT_MAX_GAP,
        tags,
    }
}

fn tag(name: &str, register: RegisterKind, address: u16, data_type: DataType) -> ModbusTag {
    ModbusTag::new(name, register, address, data_type)
}

/// A typed register entry, encoded by the peer.
fn typed(data_type: &str, order: &str, value: impl Into<Value>) -> Value {
    json!({"type": data_type, "order": order, "value": value.into()})
}

const ORDERS: [(ByteOrder, &str); 4] = [
    (ByteOrder::ABCD, "ABCD"),
    (ByteOrder::CDAB, "CDAB"),
    (ByteOrder::BADC, "BADC"),
    (ByteOrder::DCBA, "DCBA"),
];

// One table of cases, read top to bottom; splitting it would only scatter the cases.
#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn decodes_every_type_and_byte_order_over_rtu() {
    // (type, registers, value the peer encodes, value the agent must read); every byte of the
    // wider values differs, so a wrong order cannot give the right number.
    let cases: [(DataType, &str, u16, Value, f64); 8] = [
        (DataType::U16, "u16", 1, json!(0xA1B2), 41_394.0),
        (DataType::I16, "i16", 1, json!(-12_345), -12_345.0),
        (
            DataType::U32,
            "u32",
            2,
            json!(0xA1B2_C3D4_u32),
            2_712_847_316.0,
        ),
        (DataType::I32, "i32", 2, json!(-123_456_789), -123_456_789.0),
        (
            DataType::U64,
            "u64",
            4,
            json!(0x0102_0304_0506_0700_u64),
            72_623_859_790_382_848.0,
        ),
        (
            DataType::I64,
            "i64",
            4,
            json!(-72_623_859_790_382_848_i64),
            -72_623_859_790_382_848.0,
        ),
        (
            DataType::F32,
            "f32",
            2,
            json!(-1234.5678),
            f64::from(-1234.5678_f32),
        ),
        (DataType::F64, "f64", 4, json!(-98_765.432_1), -98_765.432_1),
    ];
    let mut holding = serde_json::Map::new();
    let mut tags = Vec::new();
    let mut expected = Vec::new();
    let mut address = 0_u16;
    for (order, order_name) in ORDERS {
        for (data_type, type_name, registers, value, read) in &cases {
            let name = format!("{type_name}_{order_name}");
            holding.insert(
                address.to_string(),
                typed(type_name, order_name, value.clone()),
            );
            tags.push(ModbusTag {
                byte_order: order,
                ..tag(&name, RegisterKind::Holding, address, *data_type)
            });
            expected.push((name, *read));
            address += registers;
        }
    }
    // A status word with bits 0, 2 and 15 set, input registers, coils and discrete inputs.
    holding.insert("200".to_owned(), json!([0x8005]));
    for (name, bit, value) in [
        ("running", 0, 1.0),
        ("fault", 1, 0.0),
        ("auto", 2, 1.0),
        ("alarm", 15, 1.0),
    ] {
        tags.push(ModbusTag {
            bit: Some(bit),
            ..tag(name, RegisterKind::Holding, 200, DataType::Bit)
        });
        expected.push((name.to_owned(), value));
    }
    tags.push(ModbusTag {
        byte_order: ByteOrder::CDAB,
        scale: 0.5,
        offset: -10.0,
        unit: Some("kW".to_owned()),
        ..tag("power", RegisterKind::Input, 10, DataType::F32)
    });
    expected.push(("power".to_owned(), 52.5 * 0.5 - 10.0));
    for (i, value) in [true, false, true].into_iter().enumerate() {
        let name = format!("coil_{i}");
        tags.push(tag(
            &name,
            RegisterKind::Coil,
            u16::try_from(i).unwrap(),
            DataType::Bool,
        ));
        expected.push((name, f64::from(u8::from(value))));
    }
    tags.push(tag(
        "door_closed",
        RegisterKind::Discrete,
        9,
        DataType::Bool,
    ));
    expected.push(("door_closed".to_owned(), 1.0));

    let plc = PyModbusServer::start_rtu(&json!({"devices": [{
        "device_id": 7,
        "holding": holding,
        "input": {"10": typed("f32", "CDAB", 52.5)},
        "coils": {"0": [true, false, true]},
        "discrete": {"8": [false, true]},
    }]}));
    let mut bus = BusUnderTest::start(serial_bus(&plc), vec![slave("meter-7", 7, tags)]);
    let rounds = bus.first_rounds().await;
    let round = &rounds["meter-7"];
    assert_eq!(round.len(), expected.len());
    for (name, value) in &expected {
        let reading = &round[name];
        assert_eq!(
            (reading.quality, reading.value),
            (Quality::Good, Some(*value)),
            "{name}: {reading:?}"
        );
    }
    assert_eq!(round["power"].unit.as_deref(), Some("kW"));
    bus.stop().await;
}

/// The sensor map of `line5`: a power meter and two temperature transmitters on one serial
/// line, plus `extra` devices.
fn line5_map(bus: &str, extra: &str) -> String {
    format!(
        r#"site = "plant-ost"
gateway = "gw-rtu"

[upload.dir]
path = "outbox"

{bus}

[[modbus]]
name = "power-meter"
bus = "line5"
unit_id = 1
poll_interval = "200ms"
timeout = "300ms"

  [[modbus.tags]]
  name = "active_power"
  register = "input"
  address = 0
  type = "f32"
  byte_order = "CDAB"
  unit = "kW"

  # Registers 2-5 do not exist: the coalesced read is refused with exception 2, split, and
  # both halves are read.
  [[modbus.tags]]
  name = "energy"
  register = "input"
  address = 6
  type = "u32"
  byte_order = "CDAB"
  unit = "kWh"

[[modbus]]
name = "tt-101"
bus = "line5"
unit_id = 2
poll_interval = "200ms"
timeout = "300ms"

  [[modbus.tags]]
  name = "temperature"
  register = "holding"
  address = 0
  type = "i16"
  scale = 0.1
  unit = "degC"

[[modbus]]
name = "tt-102"
bus = "line5"
unit_id = 3
poll_interval = "200ms"
timeout = "300ms"

  [[modbus.tags]]
  name = "temperature"
  register = "holding"
  address = 0
  type = "i16"
  scale = 0.1
  unit = "degC"
{extra}"#
    )
}

/// The three slaves' register maps.
fn line5_slaves() -> Value {
    json!({"devices": [
        {"device_id": 1, "input": {
            "0": typed("f32", "CDAB", 1234.5),
            "6": typed("u32", "CDAB", 3_000_000_000_u32),
        }},
        {"device_id": 2, "holding": {"0": typed("i16", "ABCD", 215)}},
        {"device_id": 3, "holding": {"0": typed("i16", "ABCD", -42)}},
    ]})
}

fn load(text: &str) -> AgentConfig {
    load_str(text, Path::new("/tmp/plantline-rtu-test/agent.toml"))
        .unwrap_or_else(|err| panic!("the test's sensor map is valid: {err}"))
}

fn assert_line5_values(rounds: &HashMap<String, HashMap<String, Reading>>) {
    let value = |device: &str, tag: &str| {
        let reading = &rounds[device][tag];
        assert_eq!(reading.quality, Quality::Good, "{reading:?}");
        reading.value
    };
    assert_eq!(value("power-meter", "active_power"), Some(1234.5));
    assert_eq!(value("power-meter", "energy"), Some(3e9));
    assert_eq!(value("tt-101", "temperature"), Some(21.5));
    assert_eq!(value("tt-102", "temperature"), Some(-4.2));
}

#[tokio::test]
async fn three_slaves_on_one_serial_bus_are_all_read() {
    let plc = PyModbusServer::start_rtu(&line5_slaves());
    let bus = format!(
        "[[modbus_bus]]\nname = \"line5\"\ntransport = \"rtu\"\nserial_port = \"{}\"\nbaud_rate = 19200\nparity = \"none\"\n",
        plc.serial_path().display()
    );
    let config = load(&line5_map(&bus, ""));
    let mut bus = BusUnderTest::start_from(&config);
    let rounds = bus.first_rounds().await;
    assert_line5_values(&rounds);
    // After the split was learned, every tick reads every tag good.
    let later = bus.collect(Duration::from_secs(1)).await;
    assert!(later.len() >= 3 * 4, "{} readings in 1 s", later.len());
    assert!(
        later.iter().all(|r| r.quality == Quality::Good),
        "{later:?}"
    );
    bus.stop().await;
}

#[tokio::test]
async fn a_slave_that_never_answers_does_not_hold_up_the_others() {
    let plc = PyModbusServer::start_rtu(&line5_slaves());
    let bus = format!(
        "[[modbus_bus]]\nname = \"line5\"\ntransport = \"rtu\"\nserial_port = \"{}\"\nparity = \"none\"\n",
        plc.serial_path().display()
    );
    // Unit 9 is on nobody's device: every request to it times out. It is polled twice as often
    // as the others, and each of its timeouts is longer than their poll interval: asked
    // at its rate, it alone would keep the line busy all the time.
    let dead = r#"
[[modbus]]
name = "tt-109"
bus = "line5"
unit_id = 9
poll_interval = "100ms"
timeout = "300ms"

  [[modbus.tags]]
  name = "temperature"
  register = "holding"
  address = 0
  type = "i16"
"#;
    let config = load(&line5_map(&bus, dead));
    let mut bus = BusUnderTest::start_from(&config);
    // The first ticks (and the backoff's first, shortest steps) pass before the count starts.
    let _ = bus.collect(Duration::from_millis(1500)).await;
    let window = Duration::from_secs(4);
    let readings = bus.collect(window).await;
    let mut per_device: HashMap<&str, Vec<&Reading>> = HashMap::new();
    for reading in &readings {
        per_device.entry(&reading.device).or_default().push(reading);
    }
    // 4 s at 200 ms: 20 ticks. A tick that waits for one of the silent slave's timeouts is
    // late, not lost, unless it waited a whole interval; allow three of those. (Asked at its
    // own rate instead of backed off, the silent slave costs each of the others about a third
    // of its ticks.)
    for (device, tags) in [("power-meter", 2), ("tt-101", 1), ("tt-102", 1)] {
        let got = &per_device[device];
        let ticks = got.len() / tags;
        assert!(
            (17..=21).contains(&ticks),
            "{device}: {ticks} ticks in {window:?} at 200 ms"
        );
        assert!(
            got.iter().all(|r| r.quality == Quality::Good),
            "{device} reads good throughout: {got:?}"
        );
    }
    // The silent slave's tags read bad at its own rate (100 ms), also while it is backed off
    // and not asked; ticks lost only while its own retries hold the line.
    let silent = &per_device["tt-109"];
    assert!(
        silent
            .iter()
            .all(|r| r.quality == Quality::Bad && r.value.is_none()),
        "{silent:?}"
    );
    assert!(
        (25..=41).contains(&silent.len()),
        "{} bad readings of tt-109 in {window:?} at 100 ms",
        silent.len()
    );
    bus.stop().await;
}

#[tokio::test]
async fn reads_slaves_behind_a_serial_gateway_over_tcp() {
    let gateway = PyModbusServer::start_rtu_over_tcp(&line5_slaves());
    let bus = format!(
        "[[modbus_bus]]\nname = \"line5\"\ntransport = \"rtu_over_tcp\"\nhost = \"127.0.0.1\"\nport = {}\nbaud_rate = 9600\n",
        gateway.address().port()
    );
    let config = load(&line5_map(&bus, ""));
    // 3.5 characters of 11 bits at 9600 baud, rounded up to the microsecond.
    assert_eq!(
        config.modbus_bus[0].inter_frame_delay(),
        Duration::from_micros(4011)
    );
    let mut bus = BusUnderTest::start_from(&config);
    let rounds = bus.first_rounds().await;
    assert_line5_values(&rounds);
    bus.stop().await;
}
