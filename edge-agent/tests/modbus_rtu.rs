//! Modbus RTU buses against a real, independently written Modbus server: pymodbus 3.16 through
//! the shared peer harness (`pipeline_e2e::PyModbusServer`), serving RTU on one end of a socat
//! pty pair (the agent opens the other end as its serial port) or RTU frames over TCP, as a
//! serial gateway does. One server answers several slave addresses, each with its own register
//! map; an address nobody owns gets no answer, as on a real bus. Typed register values are
//! encoded by the peer with Python's `struct`, independently of the agent's decoder.
//!
//! For what pymodbus cannot be made to do (answer late, so that the answer crosses the next
//! request; answer with a bad CRC or with bytes that are no frame), a small serial gateway
//! written here speaks RTU framing over TCP for a few slaves, each of which can be told to
//! misbehave.

// Exact float comparisons are the point: every value must arrive with these very bits.
#![allow(clippy::float_cmp)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::OwnedWriteHalf;
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
        max_registers_per_request: None,
        max_bits_per_request: None,
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

/// How a slave behind the [`FakeGateway`] misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Answers after its own answer time.
    None,
    /// Holds its answer until the next request on the line has gone out (to whichever slave),
    /// then sends it while that request waits for its own answer: a late answer that crosses
    /// the next request.
    LateCrossing,
    /// Answers with the right frame but a wrong CRC.
    BadCrc,
    /// Answers with bytes that are no RTU frame.
    Garbage,
}

/// What the fake gateway's slaves hold and what happened.
struct GatewayState {
    /// Each slave's holding registers, from address 0.
    slaves: HashMap<u8, Vec<u16>>,
    faults: Mutex<HashMap<u8, Fault>>,
    /// How long a healthy slave takes to answer: long enough that a crossing late answer
    /// arrives first.
    answer_time: Duration,
    connections: AtomicUsize,
    /// Requests received, by slave address.
    requests: Mutex<HashMap<u8, usize>>,
    /// Late answers sent while another request waited.
    crossings: AtomicUsize,
    /// Requests answered with a fault other than lateness.
    faulty_answers: AtomicUsize,
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// CRC-16/MODBUS (polynomial 0xA001 reflected, initial value 0xFFFF), written out from the
/// serial line specification, independently of the agent's codec.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0xFFFF_u16;
    for &byte in bytes {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

fn with_crc(mut frame: Vec<u8>) -> Vec<u8> {
    let crc = crc16(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame
}

/// A serial device server in transparent mode with RTU slaves behind it, on 127.0.0.1. It
/// reads 8-byte read requests (slave, function, start, count, CRC) and answers function 3 from
/// the slave's registers; an unknown slave address gets no answer, as on a real line.
struct FakeGateway {
    addr: SocketAddr,
    state: Arc<GatewayState>,
    task: JoinHandle<()>,
}

impl FakeGateway {
    async fn start(slaves: &[(u8, &[u16])]) -> Self {
        let state = Arc::new(GatewayState {
            slaves: slaves
                .iter()
                .map(|(id, regs)| (*id, regs.to_vec()))
                .collect(),
            faults: Mutex::new(HashMap::new()),
            answer_time: Duration::from_millis(20),
            connections: AtomicUsize::new(0),
            requests: Mutex::new(HashMap::new()),
            crossings: AtomicUsize::new(0),
            faulty_answers: AtomicUsize::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let task = tokio::spawn({
            let state = Arc::clone(&state);
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    state.connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(Self::serve(stream, Arc::clone(&state)));
                }
            }
        });
        Self { addr, state, task }
    }

    fn set_fault(&self, slave: u8, fault: Fault) {
        locked(&self.state.faults).insert(slave, fault);
    }

    fn requests_to(&self, slave: u8) -> usize {
        locked(&self.state.requests)
            .get(&slave)
            .copied()
            .unwrap_or(0)
    }

    /// Writes `frame` after `delay`, whole, so frames never interleave on the connection.
    fn send_later(
        writer: &Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
        frame: Vec<u8>,
        delay: Duration,
    ) {
        let writer = Arc::clone(writer);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = writer.lock().await.write_all(&frame).await;
        });
    }

    async fn serve(stream: tokio::net::TcpStream, state: Arc<GatewayState>) {
        let (mut reader, writer) = stream.into_split();
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        // A late answer waiting for the next request to cross.
        let mut held: Option<Vec<u8>> = None;
        let mut request = [0_u8; 8];
        while reader.read_exact(&mut request).await.is_ok() {
            if crc16(&request[..6]) != u16::from_le_bytes([request[6], request[7]]) {
                // A slave ignores a frame with a bad CRC.
                continue;
            }
            let slave = request[0];
            *locked(&state.requests).entry(slave).or_default() += 1;
            if let Some(late) = held.take() {
                state.crossings.fetch_add(1, Ordering::SeqCst);
                Self::send_later(&writer, late, Duration::from_millis(5));
            }
            let Some(registers) = state.slaves.get(&slave) else {
                continue;
            };
            let function = request[1];
            let start = usize::from(u16::from_be_bytes([request[2], request[3]]));
            let count = usize::from(u16::from_be_bytes([request[4], request[5]]));
            let answer = match registers.get(start..start + count) {
                Some(words) if function == 3 => {
                    let mut frame = vec![slave, 3, u8::try_from(count * 2).unwrap()];
                    for word in words {
                        frame.extend_from_slice(&word.to_be_bytes());
                    }
                    with_crc(frame)
                }
                // Illegal function, or illegal data address.
                _ => with_crc(vec![
                    slave,
                    function | 0x80,
                    if function == 3 { 2 } else { 1 },
                ]),
            };
            let fault = locked(&state.faults)
                .get(&slave)
                .copied()
                .unwrap_or(Fault::None);
            match fault {
                Fault::None => Self::send_later(&writer, answer, state.answer_time),
                Fault::LateCrossing => held = Some(answer),
                Fault::BadCrc => {
                    state.faulty_answers.fetch_add(1, Ordering::SeqCst);
                    let mut bad = answer;
                    let last = bad.len() - 1;
                    bad[last] ^= 0x5A;
                    Self::send_later(&writer, bad, state.answer_time);
                }
                Fault::Garbage => {
                    state.faulty_answers.fetch_add(1, Ordering::SeqCst);
                    Self::send_later(
                        &writer,
                        b"\x00\xff\x13\x37HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
                        state.answer_time,
                    );
                }
            }
        }
    }
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn gateway_bus(gateway: &FakeGateway) -> ModbusBus {
    ModbusBus {
        name: "line5".to_owned(),
        transport: BusTransport::RtuOverTcp,
        serial_port: None,
        host: Some("127.0.0.1".to_owned()),
        port: Some(gateway.addr.port()),
        baud_rate: 19_200,
        parity: Parity::Even,
        data_bits: 8,
        stop_bits: 1,
        inter_frame_delay: None,
    }
}

/// Collects readings until `done` holds (checked every 100 ms), at most `limit`.
async fn collect_until(
    bus: &mut BusUnderTest,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> Vec<Reading> {
    let end = Instant::now() + limit;
    let mut readings = Vec::new();
    while !done() {
        assert!(Instant::now() < end, "not done within {limit:?}");
        readings.extend(bus.collect(Duration::from_millis(100)).await);
    }
    readings
}

/// Asserts that `readings` hold the healthy slave `tt-2`'s every tick good with its exact
/// values, and that it never went longer than `max_gap` between ticks.
fn assert_tt2_unaffected(readings: &[Reading], max_gap: Duration) {
    let tt2: Vec<&Reading> = readings.iter().filter(|r| r.device == "tt-2").collect();
    assert!(!tt2.is_empty(), "tt-2 was read");
    for reading in &tt2 {
        let expected = if reading.tag == "level" { 222.0 } else { 223.0 };
        assert_eq!(
            (reading.quality, reading.value),
            (Quality::Good, Some(expected)),
            "tt-2 reads good with its own values: {reading:?}"
        );
    }
    let stamps: Vec<i64> = tt2
        .iter()
        .filter(|r| r.tag == "level")
        .map(|r| r.ts_us)
        .collect();
    let longest = stamps.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    assert!(
        longest <= i64::try_from(max_gap.as_micros()).unwrap(),
        "tt-2 went {longest} µs without a tick"
    );
}

// One bus through four faults of one slave, told phase by phase.
#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn late_and_garbled_answers_behind_a_serial_gateway_spare_the_other_slaves() {
    let gateway = FakeGateway::start(&[(1, &[111]), (2, &[222, 223])]).await;
    let tt1 = ModbusDevice {
        timeout: ConfigDuration::from_millis(250),
        bus: Some("line5".to_owned()),
        ..slave(
            "tt-1",
            1,
            vec![tag("level", RegisterKind::Holding, 0, DataType::U16)],
        )
    };
    let tt2 = ModbusDevice {
        poll_interval: ConfigDuration::from_millis(100),
        timeout: ConfigDuration::from_millis(250),
        ..slave(
            "tt-2",
            2,
            vec![
                tag("level", RegisterKind::Holding, 0, DataType::U16),
                tag("flow", RegisterKind::Holding, 1, DataType::U16),
            ],
        )
    };
    let mut bus = BusUnderTest::start(gateway_bus(&gateway), vec![tt1, tt2]);
    let healthy = bus.collect(Duration::from_millis(600)).await;
    assert!(
        healthy
            .iter()
            .any(|r| r.device == "tt-1" && r.value == Some(111.0)),
        "{healthy:?}"
    );
    assert_tt2_unaffected(&healthy, Duration::from_millis(400));

    // tt-1 answers late: its answer crosses tt-2's next request. tt-2 must neither fail nor
    // take tt-1's answer for its own.
    gateway.set_fault(1, Fault::LateCrossing);
    let state = Arc::clone(&gateway.state);
    let late = collect_until(&mut bus, Duration::from_secs(15), || {
        state.crossings.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert_tt2_unaffected(&late, Duration::from_millis(800));
    assert!(
        late.iter()
            .any(|r| r.device == "tt-1" && r.quality == Quality::Bad),
        "tt-1 reads bad while its answers come late"
    );

    // A wrong CRC, then bytes that are no frame: tt-1 reads bad, tt-2 goes on, and the
    // gateway connection stays up (only the framing is reset).
    for fault in [Fault::BadCrc, Fault::Garbage] {
        gateway.set_fault(1, fault);
        let before = gateway.state.faulty_answers.load(Ordering::SeqCst);
        let faulty = collect_until(&mut bus, Duration::from_secs(20), || {
            state.faulty_answers.load(Ordering::SeqCst) >= before + 2
        })
        .await;
        assert_tt2_unaffected(&faulty, Duration::from_millis(800));
        let tt1: Vec<&Reading> = faulty.iter().filter(|r| r.device == "tt-1").collect();
        assert!(
            tt1.iter()
                .all(|r| r.quality == Quality::Bad || r.value == Some(111.0)),
            "{fault:?}: tt-1 never reads a wrong value: {tt1:?}"
        );
        assert!(
            tt1.iter().any(|r| r.quality == Quality::Bad),
            "{fault:?}: tt-1 reads bad"
        );
    }
    assert_eq!(
        gateway.state.connections.load(Ordering::SeqCst),
        1,
        "a garbled answer resets the framing, not the connection"
    );

    // The fault is gone: tt-1 reads good again by itself, at its next retry.
    gateway.set_fault(1, Fault::None);
    let asked = gateway.requests_to(1);
    let mut recovered = Vec::new();
    let end = Instant::now() + Duration::from_secs(40);
    while !recovered
        .iter()
        .any(|r: &Reading| r.device == "tt-1" && r.value == Some(111.0))
    {
        assert!(Instant::now() < end, "tt-1 did not recover within 40 s");
        recovered.extend(bus.collect(Duration::from_millis(200)).await);
    }
    assert!(gateway.requests_to(1) > asked);
    assert_tt2_unaffected(&recovered, Duration::from_millis(800));
    bus.stop().await;
}

#[test]
fn the_test_gateway_computes_the_crc_of_the_specification() {
    // Read holding registers 0-1 of slave 1: 01 03 00 00 00 02 C4 0B (the specification's
    // worked examples use the same polynomial).
    assert_eq!(
        with_crc(vec![1, 3, 0, 0, 0, 2]),
        vec![1, 3, 0, 0, 0, 2, 0xC4, 0x0B]
    );
}

#[test]
fn validate_names_the_buses_and_their_slaves() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let bus =
        "[[modbus_bus]]\nname = \"line5\"\ntransport = \"rtu\"\nserial_port = \"/dev/ttyUSB0\"\n";
    let press = r#"
[[modbus]]
name = "press-3"
host = "10.0.0.7"

  [[modbus.tags]]
  name = "oil_temp"
  register = "holding"
  address = 0
  type = "f32"
"#;
    let validate = |name: &str, text: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, text).expect("write the map");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .arg("validate")
            .arg(&file)
            .output()
            .expect("run edge-agent validate");
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        String::from_utf8_lossy(&out.stdout).replace(&file.display().to_string(), name)
    };
    assert_eq!(
        validate("line5.toml", &line5_map(bus, press)),
        "line5.toml: ok (1 device on TCP, 1 bus with 3 slaves, 5 tags, gateway `gw-rtu`)\n"
    );
    let second = bus.replace("line5", "line6").replace("ttyUSB0", "ttyUSB1");
    let slave_on_6 = line5_map("", "")
        .split("[[modbus]]")
        .nth(2)
        .expect("the map's second device")
        .replace("line5", "line6");
    assert_eq!(
        validate(
            "two.toml",
            &line5_map(bus, &format!("{second}\n[[modbus]]{slave_on_6}{press}")).replace(
                "name = \"tt-101\"\nbus = \"line6\"",
                "name = \"tt-201\"\nbus = \"line6\""
            )
        ),
        "two.toml: ok (1 device on TCP, 2 buses with 4 slaves, 6 tags, gateway `gw-rtu`)\n"
    );
}
