//! The MQTT source against a real broker: Mosquitto 2.0 started by each test on 127.0.0.1
//! (`pipeline_e2e::Mosquitto`). The agent runs through `edge_agent::run` with a local folder as
//! the upload target; what it recorded is read back from the Parquet batches it wrote. Messages
//! are published at QoS 1 by a separate client and confirmed by the broker before the test goes
//! on.

// Exact float comparisons are the point: every value must arrive with these very bits.
#![allow(clippy::float_cmp)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use edge_agent::config::{AgentConfig, load_str};
use edge_agent::contract::{Quality, Row};
use pipeline_e2e::{Mosquitto, now_us};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio_util::sync::CancellationToken;

/// Everything the agent logs, for the assertions on counted bad payloads.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogWriter(Arc::clone(&sink)))
            .init();
        logs
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log lines of one broker (every test names its broker after itself).
fn log_lines(broker: &str, containing: &str) -> Vec<String> {
    let marker = format!("broker={broker}");
    String::from_utf8_lossy(&logs().lock().unwrap())
        .lines()
        .filter(|l| l.contains(&marker) && l.contains(containing))
        .map(str::to_owned)
        .collect()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One agent's files and its configuration text around the `[[mqtt]]` section under test.
struct Setup {
    dir: tempfile::TempDir,
    broker: String,
    mqtt: String,
}

impl Setup {
    fn new(broker: &str, port: u16, subscriptions: &str) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            broker: broker.to_owned(),
            mqtt: format!(
                "[[mqtt]]\nname = \"{broker}\"\nhost = \"127.0.0.1\"\nport = {port}\nclient_id = \"gw-{broker}\"\nkeep_alive = \"5s\"\n{subscriptions}"
            ),
        }
    }

    fn config(&self) -> AgentConfig {
        load_str(&self.config_text("50ms"), &self.config_path()).expect("the test config is valid")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    fn config_text(&self, commit_interval: &str) -> String {
        // A batch is cut only at shutdown, so the buffer's row count shows what arrived.
        format!(
            "site = \"plant-ost\"\ngateway = \"gw-mqtt\"\n[buffer]\npath = \"buffer.db\"\ncommit_interval = \"{commit_interval}\"\n[batch]\nmax_age = \"1h\"\n[upload.dir]\npath = \"outbox\"\n{}",
            self.mqtt
        )
    }

    fn buffered(&self) -> u64 {
        edge_agent::buffer::inspect(&self.dir.path().join("buffer.db")).map_or(0, |r| r.rows)
    }

    /// Every row of every batch the agent uploaded, in `seq` order.
    fn uploaded(&self) -> Vec<Row> {
        common::uploaded_rows(&self.dir.path().join("outbox"))
    }
}

/// A running agent.
struct Agent {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), edge_agent::AgentError>>,
}

impl Agent {
    /// Starts the agent and waits until its subscriptions are confirmed by the broker.
    async fn start(setup: &Setup) -> Self {
        let subscribed = subscriptions_confirmed(setup);
        let agent = Self::spawn(setup);
        wait_subscribed(setup, subscribed).await;
        agent
    }

    /// Starts the agent without waiting for its broker.
    fn spawn(setup: &Setup) -> Self {
        logs();
        let stop = CancellationToken::new();
        let task = tokio::spawn(edge_agent::run(setup.config(), stop.clone()));
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("the agent does not panic")
            .expect("the agent stops cleanly");
    }
}

/// How often the broker has confirmed the agent's subscriptions so far.
fn subscriptions_confirmed(setup: &Setup) -> usize {
    logs();
    log_lines(&setup.broker, "subscribed").len()
}

/// Waits until the broker confirmed the agent's subscriptions more than `before` times.
async fn wait_subscribed(setup: &Setup, before: usize) {
    let broker = setup.broker.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("the agent's subscriptions", || {
            log_lines(&broker, "subscribed").len() > before
        });
    })
    .await
    .unwrap();
}

/// Publishes each `(topic, payload)` at QoS 1 and returns once the broker acknowledged all.
async fn publish(port: u16, messages: &[(&str, &[u8])]) {
    publish_with(port, false, messages).await;
}

async fn publish_with(port: u16, retain: bool, messages: &[(&str, &[u8])]) {
    let mut options = MqttOptions::new("test-publisher", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    for (topic, payload) in messages {
        client
            .publish(*topic, QoS::AtLeastOnce, retain, payload.to_vec())
            .await
            .unwrap();
    }
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(10), async {
        while acked < messages.len() {
            if let Event::Incoming(Packet::PubAck(_)) =
                eventloop.poll().await.expect("the broker is up")
            {
                acked += 1;
            }
        }
        client.disconnect().await.unwrap();
        loop {
            if let Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) = eventloop.poll().await {
                break;
            }
        }
    })
    .await
    .expect("the broker acknowledges every message within 10 s");
}

async fn wait_buffered(setup: &Setup, rows: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while setup.buffered() < rows {
        assert!(
            Instant::now() < deadline,
            "only {} of {rows} readings buffered after 20 s",
            setup.buffered()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a test compares of a row: `ts_us`, device, tag, value, quality, unit (all but `seq`,
/// `site` and `gateway`).
type Compared = (i64, String, String, Option<f64>, Quality, Option<String>);

fn summary(rows: &[Row]) -> Vec<Compared> {
    rows.iter()
        .map(|r| {
            (
                r.ts_us,
                r.device.clone(),
                r.tag.clone(),
                r.value,
                r.quality,
                r.unit.clone(),
            )
        })
        .collect()
}

fn row(ts_us: i64, device: &str, tag: &str, value: f64, unit: &str) -> Compared {
    (
        ts_us,
        device.to_owned(),
        tag.to_owned(),
        Some(value),
        Quality::Good,
        Some(unit.to_owned()),
    )
}

const SUBSCRIPTIONS: &str = r#"
[[mqtt.subscriptions]]
topic = "plant/+/+/telemetry"
device = "{1}"
tag = "{2}"
value = "/value"
timestamp = "/ts"
timestamp_format = "epoch_ms"
unit = "degC"
scale = 0.1

[[mqtt.subscriptions]]
topic = "meters/+/kwh"
payload = "number"
device = "{1}"
tag = "energy"
unit = "kWh"

[[mqtt.subscriptions]]
topic = "rooms/+/climate"
device = "room-{1}"
timestamp = "/time"
timestamp_format = "rfc3339"

[[mqtt.subscriptions.fields]]
tag = "temp"
value = "/t"
unit = "degC"

[[mqtt.subscriptions.fields]]
tag = "rh"
value = "/h"
unit = "%"
scale = 100.0
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_plain_number_and_multi_field_messages_become_exact_readings() {
    let broker = Mosquitto::start();
    let setup = Setup::new("mapping", broker.port(), SUBSCRIPTIONS);
    let agent = Agent::start(&setup).await;

    let before = now_us();
    publish(
        broker.port(),
        &[
            (
                "plant/press-3/oil_temp/telemetry",
                br#"{"value": 215, "ts": 1700000000001}"#,
            ),
            ("meters/m-7/kwh", b" 1234.5\n"),
            (
                "rooms/12/climate",
                br#"{"t": 21.5, "h": 0.45, "time": "2024-05-01T12:00:00.250Z"}"#,
            ),
        ],
    )
    .await;
    wait_buffered(&setup, 4).await;
    let after = now_us();
    agent.stop().await;

    let rows = setup.uploaded();
    assert_eq!(rows.len(), 4, "{rows:#?}");
    // The plain number carries its arrival time.
    let meter_ts = rows[1].ts_us;
    assert!(
        (before..=after).contains(&meter_ts),
        "{meter_ts} not in {before}..={after}"
    );
    assert_eq!(
        summary(&rows),
        vec![
            row(1_700_000_000_001_000, "press-3", "oil_temp", 21.5, "degC"),
            row(meter_ts, "m-7", "energy", 1234.5, "kWh"),
            row(1_714_564_800_250_000, "room-12", "temp", 21.5, "degC"),
            row(1_714_564_800_250_000, "room-12", "rh", 45.0, "%"),
        ]
    );
    assert!(
        rows.iter()
            .all(|r| r.gateway == "gw-mqtt" && r.site == "plant-ost")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_while_the_agent_is_stopped_arrive_after_it_restarts() {
    let broker = Mosquitto::start();
    let setup = Setup::new("session", broker.port(), SUBSCRIPTIONS);
    let agent = Agent::start(&setup).await;
    publish(broker.port(), &[("meters/m-1/kwh", b"1")]).await;
    wait_buffered(&setup, 1).await;
    agent.stop().await;

    // The agent is away: the broker keeps these for its persistent session.
    publish(
        broker.port(),
        &[
            ("meters/m-1/kwh", b"2"),
            ("meters/m-1/kwh", b"3"),
            (
                "plant/press-3/oil_temp/telemetry",
                br#"{"value": 40, "ts": 1700000000002}"#,
            ),
        ],
    )
    .await;

    let agent = Agent::start(&setup).await;
    wait_buffered(&setup, 3).await;
    agent.stop().await;

    let rows = setup.uploaded();
    let values: Vec<(String, Option<f64>)> =
        rows.iter().map(|r| (r.tag.clone(), r.value)).collect();
    assert_eq!(
        values,
        vec![
            ("energy".to_owned(), Some(1.0)),
            ("energy".to_owned(), Some(2.0)),
            ("energy".to_owned(), Some(3.0)),
            ("oil_temp".to_owned(), Some(4.0)),
        ],
        "every message exactly once, in publishing order"
    );
    assert_eq!(rows[3].ts_us, 1_700_000_000_002_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_counted_acknowledged_and_do_not_block_the_stream() {
    let broker = Mosquitto::start();
    let setup = Setup::new("malformed", broker.port(), SUBSCRIPTIONS);
    let agent = Agent::start(&setup).await;
    publish(
        broker.port(),
        &[
            ("plant/press-3/oil_temp/telemetry", b"{oops"),
            ("meters/m-1/kwh", b"n/a"),
            (
                "plant/press-3/oil_temp/telemetry",
                br#"{"value": "hot", "ts": 1}"#,
            ),
            // Half of a multi-field message is still recorded.
            (
                "rooms/4/climate",
                br#"{"t": 19.0, "time": "2024-05-01T12:00:00Z"}"#,
            ),
            ("meters/m-1/kwh", b"5"),
        ],
    )
    .await;
    wait_buffered(&setup, 2).await;
    agent.stop().await;

    let rows = setup.uploaded();
    assert_eq!(
        rows.iter()
            .map(|r| (r.device.as_str(), r.tag.as_str(), r.value))
            .collect::<Vec<_>>(),
        vec![("room-4", "temp", Some(19.0)), ("m-1", "energy", Some(5.0))]
    );
    let bad: Vec<String> = log_lines("malformed", "bad payload")
        .iter()
        .map(|l| l[l.find("bad payload").unwrap()..].to_owned())
        .collect();
    assert_eq!(
        bad,
        vec![
            "bad payload: topic `plant/press-3/oil_temp/telemetry`: payload is not JSON: key must be a string at line 1 column 2 subscription=plant/+/+/telemetry bad_payloads=1 payload={oops",
            "bad payload: topic `meters/m-1/kwh`: payload `n/a` is not a number subscription=meters/+/kwh bad_payloads=1 payload=n/a",
            "bad payload: topic `plant/press-3/oil_temp/telemetry`: the value at `/value` is `\"hot\"`, not a number subscription=plant/+/+/telemetry bad_payloads=2 payload={\"value\": \"hot\", \"ts\": 1}",
            "bad payload: topic `rooms/4/climate`: no value at JSON pointer `/h` subscription=rooms/+/climate bad_payloads=1 payload={\"t\": 19.0, \"time\": \"2024-05-01T12:00:00Z\"}",
        ]
    );

    // They were acknowledged: a restart on the same session brings none of them back.
    let agent = Agent::start(&setup).await;
    publish(broker.port(), &[("meters/m-1/kwh", b"6")]).await;
    wait_buffered(&setup, 1).await;
    agent.stop().await;
    assert_eq!(log_lines("malformed", "bad payload").len(), 4);
    assert_eq!(setup.uploaded().len(), 3);
}

#[test]
fn validate_counts_mqtt_brokers_and_subscriptions() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config-examples/agent/line3-mqtt-sensors.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .arg("validate")
        .arg(&example)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "{}: ok (0 devices, 0 tags, 1 mqtt brokers, 3 subscriptions, gateway `gw-line3`)\n",
            example.display()
        )
    );
    assert_eq!(out.status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_reconnects_and_subscribes_again_when_the_broker_comes_back() {
    // A listener on a port the test chose, so a second broker can take the first one's place.
    let port = pipeline_e2e::free_port();
    let listener = format!("listener {port} 127.0.0.1");
    let setup = Setup::new("reconnect", port, SUBSCRIPTIONS);

    // The agent starts before the broker: it keeps trying.
    let agent = Agent::spawn(&setup);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let broker = Mosquitto::start_with_config(&listener);
    wait_subscribed(&setup, 0).await;
    publish(port, &[("meters/m-1/kwh", b"1")]).await;
    wait_buffered(&setup, 1).await;

    // The broker goes away and a new one without the old sessions comes up on the same port:
    // the agent reconnects and subscribes again.
    let subscribed = subscriptions_confirmed(&setup);
    drop(broker);
    let _broker = Mosquitto::start_with_config(&listener);
    wait_subscribed(&setup, subscribed).await;
    publish(port, &[("meters/m-1/kwh", b"2")]).await;
    wait_buffered(&setup, 2).await;
    agent.stop().await;

    assert_eq!(
        setup.uploaded().iter().map(|r| r.value).collect::<Vec<_>>(),
        vec![Some(1.0), Some(2.0)]
    );
    let lost = log_lines("reconnect", "connection to the broker lost");
    assert_eq!(lost.len(), 1, "{lost:#?}");
    assert!(!log_lines("reconnect", "cannot connect to the broker").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_received_but_not_committed_when_the_agent_is_killed_comes_again() {
    let broker = Mosquitto::start();
    let setup = Setup::new("killed", broker.port(), SUBSCRIPTIONS);
    // The agent binary, committing only once an hour: what it receives stays uncommitted.
    std::fs::write(setup.config_path(), setup.config_text("1h")).unwrap();
    let stderr = setup.dir.path().join("agent.log");
    let mut agent = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .args(["run", "--config"])
            .arg(setup.config_path())
            .env("RUST_LOG", "warn,edge_agent=debug")
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let log = {
        let stderr = stderr.clone();
        move || std::fs::read_to_string(&stderr).unwrap_or_default()
    };
    tokio::task::spawn_blocking({
        let log = log.clone();
        move || {
            wait_for("the agent binary's subscriptions", || {
                log().contains("subscribed")
            });
        }
    })
    .await
    .unwrap();
    publish(
        broker.port(),
        &[(
            "plant/press-3/oil_temp/telemetry",
            br#"{"value": 215, "ts": 1700000000003}"#,
        )],
    )
    .await;
    tokio::task::spawn_blocking({
        let log = log.clone();
        move || {
            wait_for("the message at the agent", || {
                log().contains("message received")
            });
        }
    })
    .await
    .unwrap();
    assert_eq!(setup.buffered(), 0, "received, not committed");
    agent.0.kill().unwrap(); // SIGKILL
    agent.0.wait().unwrap();

    // Not acknowledged, so the broker sends it again to the restarted agent.
    let agent = Agent::start(&setup).await;
    wait_buffered(&setup, 1).await;
    agent.stop().await;
    assert_eq!(
        summary(&setup.uploaded()),
        vec![row(
            1_700_000_000_003_000,
            "press-3",
            "oil_temp",
            21.5,
            "degC"
        )]
    );
}

/// The agent binary, killed when a test fails before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_values_replayed_on_subscribe_are_not_recorded_again() {
    let broker = Mosquitto::start();
    let setup = Setup::new("retained", broker.port(), SUBSCRIPTIONS);
    // A retained last value: the broker hands it to every new subscription.
    publish_with(broker.port(), true, &[("meters/m-1/kwh", b"9")]).await;
    let agent = Agent::start(&setup).await;
    publish(broker.port(), &[("meters/m-1/kwh", b"10")]).await;
    wait_buffered(&setup, 1).await;
    agent.stop().await;
    assert_eq!(
        setup.uploaded().iter().map(|r| r.value).collect::<Vec<_>>(),
        vec![Some(10.0)]
    );
}
