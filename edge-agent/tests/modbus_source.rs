//! The Modbus TCP source against a real, independently written Modbus server: pymodbus 3.16,
//! started by each test on 127.0.0.1 (see `tests/peers/modbus_server.py`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edge_agent::Reading;
use edge_agent::config::{
    ByteOrder, ConfigDuration, DataType, ModbusDevice, ModbusTag, RegisterKind,
};
use edge_agent::contract::Quality;
use edge_agent::sources::modbus::run_device;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The Python environment with pymodbus, as `./tests/run.sh` creates it.
fn peers_python() -> PathBuf {
    let venv = std::env::var_os("PLANTLINE_PEERS_VENV").map_or_else(
        || PathBuf::from("/root/.cache/plantline/venv/peers"),
        PathBuf::from,
    );
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "the pymodbus test peer is missing: {} does not exist; run ./tests/run.sh to install the test peers",
        python.display()
    );
    python
}

/// A pymodbus server process, killed (by its PID) when dropped.
struct ModbusServer {
    child: Child,
    port: u16,
}

impl ModbusServer {
    /// Starts the server with a JSON register map on `port` (0 for an ephemeral port) and waits
    /// until it accepts connections.
    fn start(registers: &str, port: u16) -> Self {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/modbus_server.py");
        let mut child = Command::new(peers_python())
            .arg(&script)
            .arg(registers)
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the pymodbus server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout is piped"))
            .read_line(&mut line)
            .expect("read the server's ready line");
        let Some(port) = line
            .trim()
            .strip_prefix("READY ")
            .and_then(|p| p.parse().ok())
        else {
            let _ = child.kill();
            panic!("the pymodbus server did not start (printed {line:?}); its error is above");
        };
        Self { child, port }
    }

    fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ModbusServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tag(
    name: &str,
    register: RegisterKind,
    address: u16,
    data_type: DataType,
    byte_order: ByteOrder,
) -> ModbusTag {
    ModbusTag {
        name: name.to_owned(),
        register,
        address,
        data_type,
        byte_order,
        scale: 1.0,
        offset: 0.0,
        unit: None,
    }
}

fn device(port: u16, tags: Vec<ModbusTag>) -> ModbusDevice {
    ModbusDevice {
        name: "press-3".to_owned(),
        host: "127.0.0.1".to_owned(),
        port,
        unit_id: 1,
        poll_interval: ConfigDuration::from_millis(100),
        timeout: ConfigDuration::from_millis(500),
        tags,
    }
}

/// The poller under test, stopped when the test ends.
struct Poller {
    rx: mpsc::Receiver<Reading>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    tags: usize,
}

impl Poller {
    fn start(device: ModbusDevice) -> Self {
        let tags = device.tags.len();
        let (tx, rx) = mpsc::channel(256);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_device(device, tx, stop.clone()));
        Self {
            rx,
            stop,
            task,
            tags,
        }
    }

    async fn next(&mut self) -> Reading {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("a reading within 10 s")
            .expect("the poller is running")
    }

    /// The readings of one poll tick, by tag. Call it at a tick boundary.
    async fn round(&mut self) -> HashMap<String, Reading> {
        let mut round = HashMap::new();
        for _ in 0..self.tags {
            let reading = self.next().await;
            round.insert(reading.tag.clone(), reading);
        }
        assert_eq!(round.len(), self.tags, "one reading per tag and tick");
        round
    }

    /// Skips readings until a tick starts whose first tag has `quality`, and returns that round.
    async fn round_with(&mut self, first_tag: &str, quality: Quality) -> HashMap<String, Reading> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {quality} reading of {first_tag} within 20 s"
            );
            let reading = self.next().await;
            if reading.tag == first_tag && reading.quality == quality {
                let mut round = HashMap::from([(reading.tag.clone(), reading)]);
                for _ in 1..self.tags {
                    let reading = self.next().await;
                    round.insert(reading.tag.clone(), reading);
                }
                return round;
            }
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("the poller ends without panicking");
    }
}

fn now_us() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap()
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
async fn decodes_every_type_and_byte_order_from_a_real_plc() {
    // Each value is encoded by the Python peer with `struct`, in the order the tag names.
    let mut entries = vec![
        r#"{"address": 0, "type": "u16", "value": 65535}"#.to_owned(),
        r#"{"address": 1, "type": "i16", "value": -1}"#.to_owned(),
        r#"{"address": 2, "type": "u16", "value": 4500}"#.to_owned(),
        r#"{"address": 3, "type": "i16", "value": -200}"#.to_owned(),
        r#"{"address": 4, "type": "u16", "value": 4500, "order": "BADC"}"#.to_owned(),
    ];
    let mut tags = vec![
        tag(
            "u16_max",
            RegisterKind::Holding,
            0,
            DataType::U16,
            ByteOrder::ABCD,
        ),
        tag(
            "i16_minus_one",
            RegisterKind::Holding,
            1,
            DataType::I16,
            ByteOrder::ABCD,
        ),
        ModbusTag {
            scale: 0.01,
            unit: Some("bar".to_owned()),
            ..tag(
                "pressure",
                RegisterKind::Holding,
                2,
                DataType::U16,
                ByteOrder::ABCD,
            )
        },
        ModbusTag {
            scale: 0.1,
            offset: 50.0,
            ..tag(
                "offset_temp",
                RegisterKind::Holding,
                3,
                DataType::I16,
                ByteOrder::ABCD,
            )
        },
        tag(
            "u16_swapped",
            RegisterKind::Holding,
            4,
            DataType::U16,
            ByteOrder::BADC,
        ),
    ];
    let mut input_entries = Vec::new();
    for (i, (order, name)) in ORDERS.into_iter().enumerate() {
        let base = u16::try_from(10 + i * 10).unwrap();
        entries.push(format!(
            r#"{{"address": {base}, "type": "f32", "value": 123.456, "order": "{name}"}}"#
        ));
        entries.push(format!(
            r#"{{"address": {}, "type": "i32", "value": -2, "order": "{name}"}}"#,
            base + 2
        ));
        entries.push(format!(
            r#"{{"address": {}, "type": "u32", "value": 4000000000, "order": "{name}"}}"#,
            base + 4
        ));
        input_entries.push(format!(
            r#"{{"address": {base}, "type": "f32", "value": -0.5, "order": "{name}"}}"#
        ));
        tags.push(tag(
            &format!("f32_{name}"),
            RegisterKind::Holding,
            base,
            DataType::F32,
            order,
        ));
        tags.push(tag(
            &format!("i32_{name}"),
            RegisterKind::Holding,
            base + 2,
            DataType::I32,
            order,
        ));
        tags.push(tag(
            &format!("u32_{name}"),
            RegisterKind::Holding,
            base + 4,
            DataType::U32,
            order,
        ));
        tags.push(tag(
            &format!("input_f32_{name}"),
            RegisterKind::Input,
            base,
            DataType::F32,
            order,
        ));
    }
    let registers = format!(
        r#"{{"unit": 1, "holding": [{}], "input": [{}]}}"#,
        entries.join(", "),
        input_entries.join(", ")
    );
    let server = ModbusServer::start(&registers, 0);
    let before = now_us();
    let mut poller = Poller::start(device(server.port, tags));
    let round = poller.round().await;
    let after = now_us();

    let mut expected: Vec<(String, f64)> = vec![
        ("u16_max".into(), 65535.0),
        ("i16_minus_one".into(), -1.0),
        ("pressure".into(), 45.0),
        ("offset_temp".into(), 30.0),
        ("u16_swapped".into(), 4500.0),
    ];
    for (_, name) in ORDERS {
        expected.push((format!("f32_{name}"), 123.456_001_281_738_28));
        expected.push((format!("i32_{name}"), -2.0));
        expected.push((format!("u32_{name}"), 4_000_000_000.0));
        expected.push((format!("input_f32_{name}"), -0.5));
    }
    for (name, value) in &expected {
        let reading = &round[name];
        assert_eq!(reading.quality, Quality::Good, "{reading:?}");
        assert_eq!(reading.value, Some(*value), "{name}");
        assert_eq!(reading.device, "press-3");
        assert!((before..=after).contains(&reading.ts_us), "{reading:?}");
    }
    assert_eq!(round["pressure"].unit.as_deref(), Some("bar"));
    assert_eq!(round["u16_max"].unit, None);
    // All tags of one tick carry the tick's time.
    assert!(round.values().all(|r| r.ts_us == round["u16_max"].ts_us));

    poller.stop().await;
    server.stop();
}

#[tokio::test]
async fn a_register_the_plc_does_not_have_reads_bad_and_the_other_tags_stay_good() {
    let registers = r#"{"holding": [{"address": 0, "type": "u16", "value": 7}, {"address": 1, "type": "f32", "value": 1.5}]}"#;
    let server = ModbusServer::start(registers, 0);
    let mut poller = Poller::start(device(
        server.port,
        vec![
            tag(
                "first",
                RegisterKind::Holding,
                0,
                DataType::U16,
                ByteOrder::ABCD,
            ),
            tag(
                "missing",
                RegisterKind::Holding,
                500,
                DataType::U16,
                ByteOrder::ABCD,
            ),
            tag(
                "wrong_table",
                RegisterKind::Input,
                0,
                DataType::U16,
                ByteOrder::ABCD,
            ),
            tag(
                "last",
                RegisterKind::Holding,
                1,
                DataType::F32,
                ByteOrder::ABCD,
            ),
        ],
    ));
    // Two ticks: an exception does not cost the connection or the next tick.
    for _ in 0..2 {
        let round = poller.round().await;
        assert_eq!(
            (round["first"].quality, round["first"].value),
            (Quality::Good, Some(7.0))
        );
        assert_eq!(
            (round["missing"].quality, round["missing"].value),
            (Quality::Bad, None)
        );
        assert_eq!(
            (round["wrong_table"].quality, round["wrong_table"].value),
            (Quality::Bad, None)
        );
        assert_eq!(
            (round["last"].quality, round["last"].value),
            (Quality::Good, Some(1.5))
        );
    }
    poller.stop().await;
    server.stop();
}

#[tokio::test]
async fn reports_bad_while_the_plc_is_down_and_reconnects_by_itself() {
    let registers = r#"{"holding": [{"address": 0, "type": "u16", "value": 42}, {"address": 1, "type": "i16", "value": -3}]}"#;
    let server = ModbusServer::start(registers, 0);
    let port = server.port;
    let mut poller = Poller::start(device(
        port,
        vec![
            tag(
                "a",
                RegisterKind::Holding,
                0,
                DataType::U16,
                ByteOrder::ABCD,
            ),
            tag(
                "b",
                RegisterKind::Holding,
                1,
                DataType::I16,
                ByteOrder::ABCD,
            ),
        ],
    ));
    let round = poller.round().await;
    assert_eq!(round["a"].value, Some(42.0));
    assert_eq!(round["b"].value, Some(-3.0));

    server.stop();
    // Every tick of the outage still yields one bad reading per tag.
    let round = poller.round_with("a", Quality::Bad).await;
    assert_eq!((round["b"].quality, round["b"].value), (Quality::Bad, None));
    let round = poller.round().await;
    assert!(
        round
            .values()
            .all(|r| r.quality == Quality::Bad && r.value.is_none()),
        "{round:?}"
    );

    let server = ModbusServer::start(registers, port);
    let round = poller.round_with("a", Quality::Good).await;
    assert_eq!(round["a"].value, Some(42.0));
    assert_eq!(
        (round["b"].quality, round["b"].value),
        (Quality::Good, Some(-3.0))
    );

    poller.stop().await;
    server.stop();
}
