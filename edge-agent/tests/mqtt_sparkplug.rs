//! Sparkplug B against a real broker: Mosquitto 2.0 started by each test on 127.0.0.1, and an
//! edge node that is an independent encoder (`tests/peers/sparkplug_publisher.py`: paho-mqtt and
//! Google's protobuf runtime, through `pipeline_e2e::publish_sparkplug`). The agent runs through
//! `edge_agent::run` with a local folder as the upload target; what it recorded is read back
//! from the Parquet batches it wrote, its bad payloads from the buffer's dead-letter table, and
//! its counters from `/metrics`.

// Exact float comparisons are the point: every value must arrive with these very bits.
#![allow(clippy::float_cmp)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use edge_agent::buffer::dead_letter::{self, DeadLetterReport};
use edge_agent::config::{AgentConfig, load_str};
use edge_agent::contract::{Quality, Row};
use pipeline_e2e::{Mosquitto, now_us, publish_sparkplug};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// 2024-05-01T12:00:00Z in milliseconds: the edge node's clock in the scripts.
const T0_MS: i64 = 1_714_564_800_000;
const SUBSCRIPTION: &str = "spBv1.0/line3/#";

/// Everything the agent logs, for the assertions on subscriptions and seq gaps.
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

/// One agent's files and configuration: one broker with one Sparkplug subscription, and
/// `/metrics` on `metrics_port`.
struct Setup {
    dir: tempfile::TempDir,
    broker: String,
    text: String,
}

impl Setup {
    fn new(broker: &str, port: u16, metrics_port: u16) -> Self {
        // A batch is cut only at shutdown, so the buffer's row count shows what arrived.
        let text = format!(
            "site = \"plant-ost\"\ngateway = \"gw-sparkplug\"\n[buffer]\npath = \"buffer.db\"\ncommit_interval = \"50ms\"\n[batch]\nmax_age = \"1h\"\n[upload.dir]\npath = \"outbox\"\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[[mqtt]]\nname = \"{broker}\"\nhost = \"127.0.0.1\"\nport = {port}\nclient_id = \"gw-{broker}\"\nkeep_alive = \"5s\"\n[[mqtt.subscriptions]]\ntopic = \"{SUBSCRIPTION}\"\npayload = \"sparkplug_b\"\n"
        );
        Self {
            dir: tempfile::tempdir().unwrap(),
            broker: broker.to_owned(),
            text,
        }
    }

    fn config(&self) -> AgentConfig {
        load_str(&self.text, &self.dir.path().join("agent.toml")).expect("the test config is valid")
    }

    fn buffer_path(&self) -> PathBuf {
        self.dir.path().join("buffer.db")
    }

    fn buffered(&self) -> u64 {
        edge_agent::buffer::inspect(&self.buffer_path()).map_or(0, |r| r.rows)
    }

    fn dead_letters(&self) -> DeadLetterReport {
        match dead_letter::inspect(&self.buffer_path(), 100) {
            Ok(report) => report,
            Err(edge_agent::buffer::BufferError::Missing { .. }) => DeadLetterReport::default(),
            Err(e) => panic!("the dead-letter table is readable: {e}"),
        }
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
    /// Starts the agent and waits until the broker confirmed its subscription.
    async fn start(setup: &Setup) -> Self {
        logs();
        let before = log_lines(&setup.broker, "subscribed").len();
        let stop = CancellationToken::new();
        let task = tokio::spawn(edge_agent::run(setup.config(), stop.clone()));
        let broker = setup.broker.clone();
        wait_for("the agent's subscription", move || {
            log_lines(&broker, "subscribed").len() > before
        })
        .await;
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

async fn wait_for(what: &'static str, mut done: impl FnMut() -> bool + Send + 'static) {
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
}

/// Runs the Python edge node's `script` against the broker; returns once the broker has it all.
async fn edge_node(port: u16, script: Value) -> String {
    tokio::task::spawn_blocking(move || publish_sparkplug(port, &script))
        .await
        .unwrap()
}

/// A plain HTTP/1.1 GET of the agent's metrics endpoint; returns the body.
async fn scrape(port: u16) -> String {
    tokio::task::spawn_blocking(move || {
        let (status, body) = pipeline_e2e::http_get(port, "/metrics", "").unwrap();
        assert_eq!(status, 200, "{body}");
        body
    })
    .await
    .unwrap()
}

/// What a test compares of a row.
type Compared = (i64, String, String, Option<f64>, Quality, Option<String>);

fn row(ts_ms: i64, device: &str, tag: &str, value: Option<f64>, unit: Option<&str>) -> Compared {
    let quality = if value.is_some() {
        Quality::Good
    } else {
        Quality::Bad
    };
    (
        ts_ms * 1000,
        device.to_owned(),
        tag.to_owned(),
        value,
        quality,
        unit.map(str::to_owned),
    )
}

fn metric(name: &str, alias: u64, datatype: &str, value: &Value) -> Value {
    json!({"name": name, "alias": alias, "datatype": datatype, "value": value})
}

/// A data metric by alias only, as edge nodes that use aliases send them: no name, no datatype.
fn by_alias(alias: u64, field: &str, value: &Value) -> Value {
    json!({"alias": alias, "field": field, "value": value})
}

fn message(topic: &str, payload: &Value) -> Value {
    json!({"topic": topic, "payload": payload})
}

/// The edge node `press-7` of group `line3` with device `motor-1`: births, data by alias and by
/// name, a seq gap, an unknown alias, the device's death and data after it, data of a node that
/// was never born, a payload that is not protobuf, and the node's power loss (its will, the
/// NDEATH). Then the node comes back with a new birth and sends data again.
fn edge_node_script() -> Value {
    let node = |kind: &str| format!("spBv1.0/line3/{kind}/press-7");
    let motor = |kind: &str| format!("spBv1.0/line3/{kind}/press-7/motor-1");
    let oil_temp = json!({
        "name": "Oil/Temp", "alias": 2, "datatype": "Float", "value": 21.5,
        "properties": {"engUnit": "degC"}
    });
    // UInt32 in long_value, as Java encoders write it.
    let mut strokes = metric("Strokes", 4, "UInt32", &json!(100));
    strokes["field"] = json!("long_value");
    let first = json!({
        "client_id": "press-7",
        "will": {
            "topic": node("NDEATH"),
            "payload": {"timestamp": T0_MS, "metrics": [metric("bdSeq", 0, "Int64", &json!(0))]}
        },
        "messages": [
            message(&node("NBIRTH"), &json!({"timestamp": T0_MS, "seq": 0, "uuid": "plantline-test", "metrics": [
                metric("bdSeq", 0, "Int64", &json!(0)),
                metric("Node Control/Rebirth", 1, "Boolean", &json!(false)),
                oil_temp,
                metric("Running", 3, "Boolean", &json!(true)),
                strokes,
                metric("Serial No", 5, "String", &json!("P7-0042")),
                metric("Offset", 6, "Int8", &json!(-3)),
            ]})),
            message(&motor("DBIRTH"), &json!({"timestamp": T0_MS + 10, "seq": 1, "metrics": [
                metric("Speed", 10, "Int16", &json!(-5)),
                metric("Load", 11, "Double", &json!(0.75)),
                metric("Energy", 12, "UInt64", &json!(123_456_789_012_u64)),
            ]})),
            message(&node("NDATA"), &json!({"timestamp": T0_MS + 1000, "seq": 2, "metrics": [
                {"alias": 2, "field": "float_value", "value": 22.25, "timestamp": T0_MS + 990},
                by_alias(4, "long_value", &json!(101)),
                by_alias(3, "boolean_value", &json!(false)),
                by_alias(6, "int_value", &json!(-128)),
            ]})),
            message(&motor("DDATA"), &json!({"timestamp": T0_MS + 2000, "seq": 3, "metrics": [
                {"name": "Load", "field": "double_value", "value": 0.8},
                by_alias(10, "int_value", &json!(-7)),
            ]})),
            // seq 4 never comes: a gap.
            message(&node("NDATA"), &json!({"timestamp": T0_MS + 3000, "seq": 5, "metrics": [
                by_alias(2, "float_value", &json!(23.0)),
            ]})),
            message(&motor("DDATA"), &json!({"timestamp": T0_MS + 4000, "seq": 6, "metrics": [
                by_alias(99, "float_value", &json!(1.0)),
                by_alias(12, "long_value", &json!(123_456_789_999_u64)),
            ]})),
            message(&motor("DDEATH"), &json!({"timestamp": T0_MS + 5000, "seq": 7})),
            message(&motor("DDATA"), &json!({"timestamp": T0_MS + 6000, "seq": 8, "metrics": [
                by_alias(10, "int_value", &json!(1)),
            ]})),
            message("spBv1.0/line3/NDATA/press-9", &json!({"timestamp": T0_MS, "seq": 3, "metrics": [
                by_alias(1, "float_value", &json!(1.0)),
            ]})),
            message(&node("NDATA"), &json!({"raw_hex": "0a05ffff"})),
        ],
        "end": "die"
    });
    let second = json!({
        "client_id": "press-7",
        "will": {
            "topic": node("NDEATH"),
            "payload": {"metrics": [metric("bdSeq", 0, "Int64", &json!(1))]}
        },
        "messages": [
            message(&node("NBIRTH"), &json!({"timestamp": T0_MS + 20_000, "seq": 0, "metrics": [
                metric("bdSeq", 0, "Int64", &json!(1)),
                metric("Oil/Temp", 2, "Float", &json!(30.0)),
            ]})),
            message(&node("NDATA"), &json!({"timestamp": T0_MS + 21_000, "seq": 1, "metrics": [
                by_alias(2, "float_value", &json!(30.5)),
            ]})),
        ],
        "end": "disconnect"
    });
    json!([first, second])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_node_and_its_device_become_exact_readings_stale_marks_counted_gaps_and_dead_letters()
 {
    let broker = Mosquitto::start();
    let metrics_port = pipeline_e2e::free_port();
    let setup = Setup::new("sparkplug", broker.port(), metrics_port);
    let agent = Agent::start(&setup).await;

    let started_us = now_us();
    let printed = edge_node(broker.port(), edge_node_script()).await;
    assert_eq!(printed.matches("published ").count(), 12, "{printed}");
    let buffered = || setup.buffered();
    let deadline = Instant::now() + Duration::from_secs(20);
    while buffered() < 24 || setup.dead_letters().kept < 4 {
        assert!(
            Instant::now() < deadline,
            "after 20 s: {} of 24 readings, {} of 4 dead letters",
            buffered(),
            setup.dead_letters().kept
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = scrape(metrics_port).await;
    agent.stop().await;
    let stopped_us = now_us();

    let rows = setup.uploaded();
    let mut compared: Vec<Compared> = rows
        .iter()
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
        .collect();
    // The NDEATH's stale marks carry the time it arrived: check it, then compare the rest.
    for (ts_us, device, tag, ..) in &mut compared[18..22] {
        assert!(
            (started_us..=stopped_us).contains(ts_us),
            "{device} {tag} at {ts_us}"
        );
        *ts_us = 0;
    }
    let degc = Some("degC");
    let (node, motor) = ("press-7", "press-7/motor-1");
    assert_eq!(
        compared,
        vec![
            // NBIRTH: the values it carries; not bdSeq, the rebirth control or the string.
            row(T0_MS, node, "Oil.Temp", Some(21.5), degc),
            row(T0_MS, node, "Running", Some(1.0), None),
            row(T0_MS, node, "Strokes", Some(100.0), None),
            row(T0_MS, node, "Offset", Some(-3.0), None),
            // DBIRTH.
            row(T0_MS + 10, motor, "Speed", Some(-5.0), None),
            row(T0_MS + 10, motor, "Load", Some(0.75), None),
            row(T0_MS + 10, motor, "Energy", Some(123_456_789_012.0), None),
            // NDATA by alias: a metric's own timestamp wins over the payload's.
            row(T0_MS + 990, node, "Oil.Temp", Some(22.25), degc),
            row(T0_MS + 1000, node, "Strokes", Some(101.0), None),
            row(T0_MS + 1000, node, "Running", Some(0.0), None),
            row(T0_MS + 1000, node, "Offset", Some(-128.0), None),
            // DDATA by name and by alias.
            row(T0_MS + 2000, motor, "Load", Some(0.8), None),
            row(T0_MS + 2000, motor, "Speed", Some(-7.0), None),
            // After the gap: still decoded.
            row(T0_MS + 3000, node, "Oil.Temp", Some(23.0), degc),
            // The good metric of the message with an unknown alias.
            row(T0_MS + 4000, motor, "Energy", Some(123_456_789_999.0), None),
            // DDEATH: every tag of the device stale, at the death's timestamp.
            row(T0_MS + 5000, motor, "Speed", None, None),
            row(T0_MS + 5000, motor, "Load", None, None),
            row(T0_MS + 5000, motor, "Energy", None, None),
            // NDEATH (the will): every tag of the node stale (its device is already dead).
            row(0, node, "Oil.Temp", None, degc),
            row(0, node, "Running", None, None),
            row(0, node, "Strokes", None, None),
            row(0, node, "Offset", None, None),
            // The node is born again and decoded again.
            row(T0_MS + 20_000, node, "Oil.Temp", Some(30.0), None),
            row(T0_MS + 21_000, node, "Oil.Temp", Some(30.5), None),
        ]
    );

    assert_dead_letters(&setup);
    assert_counters(&metrics);
    let gap_logs = log_lines(&setup.broker, "Sparkplug seq gap");
    assert_eq!(gap_logs.len(), 1, "{gap_logs:?}");
    assert!(
        gap_logs[0].contains("expected=4") && gap_logs[0].contains("seq=5"),
        "{}",
        gap_logs[0]
    );
}

/// The dead letters of [`edge_node_script`], oldest first: topic, reason, every problem.
fn assert_dead_letters(setup: &Setup) {
    let mut letters: Vec<(String, String, String)> = setup
        .dead_letters()
        .recent
        .into_iter()
        .map(|s| (s.letter.topic, s.letter.reason, s.letter.detail))
        .collect();
    // prost's own words for the broken payload follow this prefix; they are its business.
    let decode_detail = &mut letters[3].2;
    let prefix = "topic `spBv1.0/line3/NDATA/press-7`: the payload is not a Sparkplug B payload: ";
    assert!(decode_detail.starts_with(prefix), "{decode_detail}");
    decode_detail.truncate(prefix.len());
    assert_eq!(
        letters,
        vec![
            (
                "spBv1.0/line3/DDATA/press-7/motor-1".to_owned(),
                "sparkplug_unknown_alias".to_owned(),
                "topic `spBv1.0/line3/DDATA/press-7/motor-1`: alias 99 is not in the DBIRTH of device `motor-1` of edge node `line3/press-7`".to_owned()
            ),
            (
                "spBv1.0/line3/DDATA/press-7/motor-1".to_owned(),
                "sparkplug_no_birth".to_owned(),
                "topic `spBv1.0/line3/DDATA/press-7/motor-1`: DDATA of device `motor-1` of edge node `line3/press-7` before its DBIRTH, so its aliases and datatypes are unknown; its messages are decoded again from its next DBIRTH on".to_owned()
            ),
            (
                "spBv1.0/line3/NDATA/press-9".to_owned(),
                "sparkplug_no_birth".to_owned(),
                "topic `spBv1.0/line3/NDATA/press-9`: NDATA of edge node `line3/press-9` before its NBIRTH, so its aliases and datatypes are unknown; its messages are decoded again from its next NBIRTH on".to_owned()
            ),
            (
                "spBv1.0/line3/NDATA/press-7".to_owned(),
                "sparkplug_decode".to_owned(),
                "topic `spBv1.0/line3/NDATA/press-7`: the payload is not a Sparkplug B payload: ".to_owned()
            ),
        ]
    );
}

/// The Sparkplug broker's counters on `/metrics` after [`edge_node_script`].
fn assert_counters(metrics: &str) {
    let mut counters: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("plantline_mqtt") && l.contains("broker=\"sparkplug\""))
        .collect();
    counters.sort_unstable();
    let bad = |reason: &str, n: u32| {
        format!(
            "plantline_mqtt_bad_payloads_total{{broker=\"sparkplug\",subscription=\"{SUBSCRIPTION}\",reason=\"{reason}\"}} {n}"
        )
    };
    assert_eq!(
        counters,
        vec![
            bad("sparkplug_decode", 1),
            bad("sparkplug_no_birth", 2),
            bad("sparkplug_unknown_alias", 1),
            "plantline_mqtt_dead_letters_dropped_total{broker=\"sparkplug\"} 0".to_owned(),
            "plantline_mqtt_sparkplug_seq_gaps_total{broker=\"sparkplug\",node=\"line3/press-7\"} 1".to_owned(),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_decodes_an_edge_nodes_messages_through_the_same_decoder() {
    use edge_agent::config::ConfigDuration;
    use edge_agent::tools::probe::{MqttProbeArgs, MqttProbeSummary, probe_mqtt};

    let broker = Mosquitto::start();
    let setup = Setup::new("sparkplug-probe", broker.port(), pipeline_e2e::free_port());
    let config = setup.config();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let printed = Arc::clone(&lines);
    let probe = tokio::spawn(async move {
        let args = MqttProbeArgs {
            broker: "sparkplug-probe".to_owned(),
            subscription: None,
            listen: ConfigDuration::from_secs(20),
            max_messages: Some(3),
        };
        probe_mqtt(&config, Path::new("agent.toml"), &args, |line| {
            printed.lock().unwrap().push(line.to_owned());
        })
        .await
    });
    let listening = Arc::clone(&lines);
    wait_for("the probe's subscription", move || {
        listening
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("listening"))
    })
    .await;
    let node = |kind: &str| format!("spBv1.0/line3/{kind}/press-7");
    let script = json!([{
        "client_id": "press-7",
        "messages": [
            message(&node("NBIRTH"), &json!({"timestamp": T0_MS, "seq": 0, "metrics": [
                {"name": "Oil/Temp", "alias": 2, "datatype": "Float", "value": 21.5,
                 "properties": {"engUnit": "degC"}},
            ]})),
            message(&node("NDATA"), &json!({"seq": 1, "metrics": [
                by_alias(2, "float_value", &json!(22.0)),
            ]})),
            message(&node("NDATA"), &json!({"timestamp": T0_MS + 2000, "seq": 2, "metrics": [
                by_alias(9, "float_value", &json!(1.0)),
            ]})),
        ],
    }]);
    edge_node(broker.port(), script).await;
    let summary = probe.await.unwrap().expect("the probe listens and ends");
    assert_eq!(
        summary,
        MqttProbeSummary {
            messages: 3,
            bad: 1
        }
    );
    let lines = lines.lock().unwrap().clone();
    let mapped: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("  ->"))
        .map(String::as_str)
        .collect();
    assert_eq!(mapped.len(), 3, "{lines:#?}");
    assert_eq!(
        mapped[0],
        "  -> press-7 Oil.Temp = 21.5 degC at 2024-05-01T12:00:00.000000Z"
    );
    assert!(
        mapped[1].starts_with("  -> press-7 Oil.Temp = 22 degC at ")
            && mapped[1].ends_with(" (arrival time)"),
        "a data message without timestamps is shown at its arrival time: {}",
        mapped[1]
    );
    assert_eq!(
        mapped[2],
        "  -> bad payload (sparkplug_unknown_alias): topic `spBv1.0/line3/NDATA/press-7`: alias 9 is not in the NBIRTH of edge node `line3/press-7`"
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("3 messages, 1 with a bad payload")
    );
}

/// The edge node `press-7` born before the agent runs (an agent restarted, or started late):
/// its data reaches the agent without the births, so the agent asks for them. The node answers
/// as a real one does, with a fresh NBIRTH and DBIRTH, and its data is decoded from then on.
fn late_agent_script(born: &Path, go: &Path) -> Value {
    let node = |kind: &str| format!("spBv1.0/line3/{kind}/press-7");
    let motor = |kind: &str| format!("spBv1.0/line3/{kind}/press-7/motor-1");
    let births = |ts: i64, oil: f64, speed: i64| {
        vec![
            message(
                &node("NBIRTH"),
                &json!({"timestamp": ts, "seq": 0, "metrics": [
                    metric("bdSeq", 0, "Int64", &json!(0)),
                    metric("Node Control/Rebirth", 1, "Boolean", &json!(false)),
                    metric("Oil/Temp", 2, "Float", &json!(oil)),
                ]}),
            ),
            message(
                &motor("DBIRTH"),
                &json!({"timestamp": ts + 10, "seq": 1, "metrics": [
                    metric("Speed", 10, "Int16", &json!(speed)),
                ]}),
            ),
        ]
    };
    let mut messages = births(T0_MS, 21.5, 2);
    messages.extend([
        json!({"touch_file": born.display().to_string()}),
        json!({"wait_file": go.display().to_string()}),
        message(
            &node("NDATA"),
            &json!({"timestamp": T0_MS + 1000, "seq": 2, "metrics": [
                by_alias(2, "float_value", &json!(22.0)),
            ]}),
        ),
        message(
            &motor("DDATA"),
            &json!({"timestamp": T0_MS + 2000, "seq": 3, "metrics": [
                by_alias(10, "int_value", &json!(4)),
            ]}),
        ),
        message(
            &node("NDATA"),
            &json!({"timestamp": T0_MS + 3000, "seq": 4, "metrics": [
                by_alias(2, "float_value", &json!(23.0)),
            ]}),
        ),
        json!({"await_rebirth": 1}),
        message(
            &node("NDATA"),
            &json!({"timestamp": T0_MS + 11_000, "seq": 2, "metrics": [
                by_alias(2, "float_value", &json!(26.5)),
            ]}),
        ),
        message(
            &motor("DDATA"),
            &json!({"timestamp": T0_MS + 12_000, "seq": 3, "metrics": [
                by_alias(10, "int_value", &json!(5)),
            ]}),
        ),
    ]);
    json!([{
        "client_id": "press-7",
        "will": {
            "topic": node("NDEATH"),
            "payload": {"metrics": [metric("bdSeq", 0, "Int64", &json!(0))]}
        },
        "rebirth": births(T0_MS + 10_000, 25.0, 3),
        "messages": messages,
        "end": "disconnect"
    }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_missed_the_births_asks_for_them_once_and_then_maps_exact_readings() {
    let broker = Mosquitto::start();
    let metrics_port = pipeline_e2e::free_port();
    let setup = Setup::new("sparkplug-rebirth", broker.port(), metrics_port);
    let born = setup.dir.path().join("node-born");
    let go = setup.dir.path().join("agent-subscribed");
    let port = broker.port();
    let script = late_agent_script(&born, &go);
    // The node is born while no agent listens; it goes on once the agent has subscribed.
    let node = tokio::spawn(edge_node(port, script));
    let node_born = born.clone();
    wait_for("the edge node's births", move || node_born.exists()).await;
    let agent = Agent::start(&setup).await;
    std::fs::write(&go, b"").unwrap();
    let printed = node.await.unwrap();
    assert_eq!(
        printed.matches("rebirth requested").count(),
        1,
        "the node is asked once, however many messages came without a birth: {printed}"
    );
    assert!(
        printed.ends_with("rebirth requests: 1\ndisconnected\n"),
        "{printed}"
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    while setup.buffered() < 4 || setup.dead_letters().kept < 3 {
        assert!(
            Instant::now() < deadline,
            "after 20 s: {} of 4 readings, {} of 3 dead letters",
            setup.buffered(),
            setup.dead_letters().kept
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = scrape(metrics_port).await;
    agent.stop().await;

    let compared: Vec<Compared> = setup
        .uploaded()
        .iter()
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
        .collect();
    let (node, motor) = ("press-7", "press-7/motor-1");
    assert_eq!(
        compared,
        vec![
            // The births the node sent in answer, then its data.
            row(T0_MS + 10_000, node, "Oil.Temp", Some(25.0), None),
            row(T0_MS + 10_010, motor, "Speed", Some(3.0), None),
            row(T0_MS + 11_000, node, "Oil.Temp", Some(26.5), None),
            row(T0_MS + 12_000, motor, "Speed", Some(5.0), None),
        ]
    );
    let letters: Vec<(String, String)> = setup
        .dead_letters()
        .recent
        .into_iter()
        .map(|s| (s.letter.topic, s.letter.reason))
        .collect();
    let no_birth = |topic: &str| (topic.to_owned(), "sparkplug_no_birth".to_owned());
    assert_eq!(
        letters,
        vec![
            no_birth("spBv1.0/line3/NDATA/press-7"),
            no_birth("spBv1.0/line3/DDATA/press-7/motor-1"),
            no_birth("spBv1.0/line3/NDATA/press-7"),
        ],
        "what came before the births stays a dead letter with its reason"
    );
    assert!(
        metrics.contains(&format!(
            "plantline_mqtt_bad_payloads_total{{broker=\"sparkplug-rebirth\",subscription=\"{SUBSCRIPTION}\",reason=\"sparkplug_no_birth\"}} 3"
        )),
        "{metrics}"
    );
    let requested = log_lines(&setup.broker, "Sparkplug rebirth requested");
    assert_eq!(requested.len(), 1, "{requested:?}");
    assert!(
        requested[0].contains("topic=\"spBv1.0/line3/NCMD/press-7\""),
        "{}",
        requested[0]
    );
}
