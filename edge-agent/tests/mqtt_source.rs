//! The MQTT source against a real broker: Mosquitto 2.0 started by each test on 127.0.0.1
//! (`pipeline_e2e::Mosquitto`). The agent runs through `edge_agent::run` with a local folder as
//! the upload target; what it recorded is read back from the Parquet batches it wrote. Messages
//! are published at QoS 1 by a separate client and confirmed by the broker before the test goes
//! on.

// Exact float comparisons are the point: every value must arrive with these very bits.
#![allow(clippy::float_cmp)]

mod common;
mod mqtt_common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use edge_agent::buffer::dead_letter::{self, DeadLetterReport};
use edge_agent::contract::Quality;
use mqtt_common::{
    Agent, AgentBinary, KillOnDrop, SUBSCRIPTIONS, Setup, log_lines, publish, publish_with, row,
    subscriptions_confirmed, summary, wait_buffered, wait_for, wait_subscribed,
};
use pipeline_e2e::{Mosquitto, now_us};

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
            "bad payload: topic `plant/press-3/oil_temp/telemetry`: payload is not JSON: key must be a string at line 1 column 2 subscription=plant/+/+/telemetry reason=not_json bad_payloads=1 payload={oops",
            "bad payload: topic `meters/m-1/kwh`: payload `n/a` is not a number subscription=meters/+/kwh reason=not_a_number bad_payloads=1 payload=n/a",
            "bad payload: topic `plant/press-3/oil_temp/telemetry`: the value at `/value` is `\"hot\"`, not a number subscription=plant/+/+/telemetry reason=not_numeric bad_payloads=2 payload={\"value\": \"hot\", \"ts\": 1}",
            "bad payload: topic `rooms/4/climate`: no value at JSON pointer `/h` subscription=rooms/+/climate reason=missing_field bad_payloads=1 payload={\"t\": 19.0, \"time\": \"2024-05-01T12:00:00Z\"}",
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
    let example = pipeline_e2e::checkout().join("config-examples/agent/line3-mqtt-sensors.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .arg("validate")
        .arg(&example)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "{}: ok (0 devices, 0 tags, 1 mqtt brokers, 4 subscriptions, gateway `gw-line3`)\n",
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

// ---- Dead letters, bad-payload metrics and `probe --mqtt` -------------------------------------

impl Setup {
    /// Serves the agent's `/metrics` on `port` of the loopback.
    fn with_metrics(mut self, port: u16) -> Self {
        self.mqtt = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n{}", self.mqtt);
        self
    }

    fn buffer_path(&self) -> PathBuf {
        self.dir.path().join("buffer.db")
    }

    /// The dead-letter table: count, dropped, and every row kept, oldest first.
    fn dead_letters(&self) -> DeadLetterReport {
        match dead_letter::inspect(&self.buffer_path(), 100_000) {
            Ok(report) => report,
            Err(edge_agent::buffer::BufferError::Missing { .. }) => DeadLetterReport::default(),
            Err(e) => panic!("the dead-letter table is readable: {e}"),
        }
    }
}

async fn wait_dead_letters(setup: &Setup, kept: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while setup.dead_letters().kept < kept {
        assert!(
            Instant::now() < deadline,
            "only {} of {kept} dead letters after 20 s",
            setup.dead_letters().kept
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a test compares of a dead letter: subscription, topic, reason, payload kept, length.
fn letter_summary(report: &DeadLetterReport) -> Vec<(String, String, String, Vec<u8>, u64)> {
    report
        .recent
        .iter()
        .map(|s| {
            let l = &s.letter;
            (
                l.subscription.clone(),
                l.topic.clone(),
                l.reason.clone(),
                l.payload.clone(),
                l.payload_len,
            )
        })
        .collect()
}

fn letter(
    subscription: &str,
    topic: &str,
    reason: &str,
    payload: &[u8],
) -> (String, String, String, Vec<u8>, u64) {
    (
        subscription.to_owned(),
        topic.to_owned(),
        reason.to_owned(),
        payload.to_vec(),
        payload.len() as u64,
    )
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

/// The bad-payload counters of the `deadletters` broker in a scrape of `/metrics`.
fn assert_bad_payload_counters(metrics: &str) {
    let mut counted: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("broker=\"deadletters\""))
        .collect();
    counted.sort_unstable();
    assert_eq!(
        counted,
        vec![
            "plantline_mqtt_bad_payloads_total{broker=\"deadletters\",subscription=\"meters/+/kwh\",reason=\"not_a_number\"} 1",
            "plantline_mqtt_bad_payloads_total{broker=\"deadletters\",subscription=\"meters/+/kwh\",reason=\"not_text\"} 1",
            "plantline_mqtt_bad_payloads_total{broker=\"deadletters\",subscription=\"plant/+/+/telemetry\",reason=\"bad_timestamp\"} 1",
            "plantline_mqtt_bad_payloads_total{broker=\"deadletters\",subscription=\"plant/+/+/telemetry\",reason=\"missing_field\"} 1",
            "plantline_mqtt_bad_payloads_total{broker=\"deadletters\",subscription=\"plant/+/+/telemetry\",reason=\"not_json\"} 2",
            "plantline_mqtt_bad_payloads_total{broker=\"deadletters\",subscription=\"plant/+/+/telemetry\",reason=\"not_numeric\"} 1",
            "plantline_mqtt_bad_payloads_total{broker=\"deadletters\",subscription=\"rooms/+/climate\",reason=\"missing_field\"} 1",
            "plantline_mqtt_dead_letters_dropped_total{broker=\"deadletters\"} 0",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_of_every_kind_are_dead_lettered_with_reason_and_bytes_and_counted() {
    let broker = Mosquitto::start();
    let metrics_port = pipeline_e2e::free_port();
    let setup = Setup::new("deadletters", broker.port(), SUBSCRIPTIONS).with_metrics(metrics_port);
    let agent = Agent::start(&setup).await;
    let long = format!("<{}>", "x".repeat(298));
    let messages: Vec<(&str, &[u8])> = vec![
        ("plant/press-3/oil_temp/telemetry", b"{oops"),
        ("meters/m-1/kwh", b"n/a"),
        ("meters/m-1/kwh", b"\xff\xfe\x00"),
        (
            "plant/press-3/oil_temp/telemetry",
            br#"{"value": "hot", "ts": 1}"#,
        ),
        ("plant/press-3/oil_temp/telemetry", br#"{"ts": 1}"#),
        (
            "plant/press-3/oil_temp/telemetry",
            br#"{"value": 1, "ts": "yesterday"}"#,
        ),
        // Half of a multi-field message is still recorded; the message is a dead letter too.
        (
            "rooms/4/climate",
            br#"{"t": 19.0, "time": "2024-05-01T12:00:00Z"}"#,
        ),
        ("plant/press-3/oil_temp/telemetry", long.as_bytes()),
        ("meters/m-1/kwh", b"5"),
    ];
    publish(broker.port(), &messages).await;
    wait_buffered(&setup, 2).await;
    wait_dead_letters(&setup, 8).await;
    let metrics = scrape(metrics_port).await;
    agent.stop().await;

    // The good readings still flowed, in order.
    assert_eq!(
        setup
            .uploaded()
            .iter()
            .map(|r| (r.device.as_str(), r.tag.as_str(), r.value))
            .collect::<Vec<_>>(),
        vec![("room-4", "temp", Some(19.0)), ("m-1", "energy", Some(5.0))]
    );
    let report = setup.dead_letters();
    let plant = "plant/+/+/telemetry";
    let press = "plant/press-3/oil_temp/telemetry";
    let mut cut = letter(plant, press, "not_json", &long.as_bytes()[..256]);
    cut.4 = 300;
    assert_eq!(
        letter_summary(&report),
        vec![
            letter(plant, press, "not_json", b"{oops"),
            letter("meters/+/kwh", "meters/m-1/kwh", "not_a_number", b"n/a"),
            letter(
                "meters/+/kwh",
                "meters/m-1/kwh",
                "not_text",
                b"\xff\xfe\x00"
            ),
            letter(plant, press, "not_numeric", br#"{"value": "hot", "ts": 1}"#),
            letter(plant, press, "missing_field", br#"{"ts": 1}"#),
            letter(
                plant,
                press,
                "bad_timestamp",
                br#"{"value": 1, "ts": "yesterday"}"#
            ),
            letter(
                "rooms/+/climate",
                "rooms/4/climate",
                "missing_field",
                br#"{"t": 19.0, "time": "2024-05-01T12:00:00Z"}"#
            ),
            cut,
        ]
    );
    assert_eq!((report.kept, report.dropped), (8, 0));
    let first = &report.recent[0].letter;
    assert_eq!(first.broker, "deadletters");
    assert_eq!(
        first.detail,
        "topic `plant/press-3/oil_temp/telemetry`: payload is not JSON: key must be a string at line 1 column 2"
    );
    assert_eq!(
        report.recent[5].letter.detail,
        "topic `plant/press-3/oil_temp/telemetry`: the timestamp at `/ts` (`\"yesterday\"`) is not epoch milliseconds"
    );

    assert_bad_payload_counters(&metrics);

    // Acknowledged once their rows were committed: a restart brings none of them back.
    let agent = Agent::start(&setup).await;
    publish(broker.port(), &[("meters/m-1/kwh", b"6")]).await;
    wait_buffered(&setup, 1).await;
    agent.stop().await;
    assert_eq!(setup.dead_letters().kept, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_bound_drops_the_oldest_and_counts_them() {
    let broker = Mosquitto::start();
    let subscriptions = format!("max_dead_letters = 3\n{SUBSCRIPTIONS}");
    let setup = Setup::new("bounded", broker.port(), &subscriptions);
    let agent = Agent::start(&setup).await;
    let bad: Vec<String> = (1..=5).map(|i| format!("bad-{i}")).collect();
    let mut messages: Vec<(&str, &[u8])> = bad
        .iter()
        .map(|p| ("meters/m-2/kwh", p.as_bytes()))
        .collect();
    messages.push(("meters/m-2/kwh", b"42"));
    publish(broker.port(), &messages).await;
    wait_buffered(&setup, 1).await;
    // The good message came after every bad one, and acknowledgements go in order: all five
    // dead letters were committed by the time the reading was.
    let report = setup.dead_letters();
    assert_eq!((report.kept, report.dropped), (3, 2));
    assert_eq!(
        report
            .recent
            .iter()
            .map(|s| String::from_utf8_lossy(&s.letter.payload).into_owned())
            .collect::<Vec<_>>(),
        vec!["bad-3", "bad-4", "bad-5"]
    );
    let metrics = edge_agent::metrics::global().render(None, std::time::SystemTime::now());
    assert!(
        metrics.contains("plantline_mqtt_dead_letters_dropped_total{broker=\"bounded\"} 2\n"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "plantline_mqtt_bad_payloads_total{broker=\"bounded\",subscription=\"meters/+/kwh\",reason=\"not_a_number\"} 5\n"
    ));

    // `edge-agent buffer` shows the count and the latest dead letters, while the agent runs.
    std::fs::write(setup.config_path(), setup.config_text("50ms")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["buffer", "--dead-letters", "2", "--config"])
        .arg(setup.config_path())
        .output()
        .unwrap();
    agent.stop().await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let letters = &stdout[stdout.find("dead letters").expect("a dead-letter section")..];
    let letters: Vec<&str> = letters.lines().collect();
    assert_eq!(letters.len(), 10, "{stdout}");
    assert_eq!(
        letters[0],
        "dead letters    3 kept, 2 dropped by max_dead_letters"
    );
    assert_eq!(letters[1], "latest dead letters, oldest first:");
    assert!(
        letters[2].ends_with("Z  broker bounded  subscription meters/+/kwh"),
        "{}",
        letters[2]
    );
    assert_eq!(
        &letters[3..6],
        [
            "    topic    meters/m-2/kwh",
            "    reason   not_a_number: topic `meters/m-2/kwh`: payload `bad-4` is not a number",
            "    payload  5 bytes: bad-4",
        ]
    );
    assert_eq!(letters[9], "    payload  5 bytes: bad-5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_message_is_dead_lettered_or_sent_again_when_the_agent_is_killed() {
    let broker = Mosquitto::start();
    let setup = Setup::new("killedbad", broker.port(), SUBSCRIPTIONS);
    std::fs::write(setup.config_path(), setup.config_text("50ms")).unwrap();
    let press = "plant/press-3/oil_temp/telemetry";

    // 1. Killed before the dead letter could be committed: the test holds the buffer's write
    //    lock, so the agent's commit waits. The broker must send the message again.
    let binary = AgentBinary::start(&setup, "1").await;
    let lock = rusqlite::Connection::open(setup.buffer_path()).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    publish(broker.port(), &[(press, b"{killed-before-commit")]).await;
    binary.wait_log("message received", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(setup.dead_letters().kept, 0, "the commit is still waiting");
    binary.kill();
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);

    let agent = Agent::start(&setup).await;
    wait_dead_letters(&setup, 1).await;
    agent.stop().await;
    assert_eq!(
        letter_summary(&setup.dead_letters()),
        vec![letter(
            "plant/+/+/telemetry",
            press,
            "not_json",
            b"{killed-before-commit"
        )],
        "sent again after the kill and dead-lettered once"
    );

    // 2. Killed right after the dead letter was committed: it is kept, and comes at most once
    //    more if the acknowledgement had not left yet. Never lost.
    let binary = AgentBinary::start(&setup, "2").await;
    publish(broker.port(), &[(press, b"{killed-after-commit")]).await;
    wait_dead_letters(&setup, 2).await;
    binary.kill();
    let agent = Agent::start(&setup).await;
    publish(broker.port(), &[("meters/m-1/kwh", b"1")]).await;
    wait_buffered(&setup, 1).await;
    agent.stop().await;
    let after: Vec<_> = letter_summary(&setup.dead_letters())
        .into_iter()
        .filter(|l| l.3 == b"{killed-after-commit")
        .collect();
    assert!(
        (1..=2).contains(&after.len()),
        "kept once, or twice when the acknowledgement was lost: {after:?}"
    );
}

/// Runs `edge-agent probe` with `args`; returns its stdout lines as they come, and the child.
fn spawn_probe(args: &[&str]) -> (std::sync::mpsc::Receiver<String>, KillOnDrop) {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .arg("probe")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (rx, KillOnDrop(child))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_prints_what_the_mapping_makes_of_each_message_without_disturbing_the_agent() {
    let broker = Mosquitto::start();
    let setup = Setup::new("probe", broker.port(), SUBSCRIPTIONS);
    std::fs::write(setup.config_path(), setup.config_text("50ms")).unwrap();
    // A retained last value: the probe shows it (marked), the agent skips it.
    publish_with(broker.port(), true, &[("meters/m-9/kwh", b"7")]).await;
    let agent = Agent::start(&setup).await;

    let config = setup.config_path();
    let (lines, mut child) = spawn_probe(&[
        "--config",
        config.to_str().unwrap(),
        "--mqtt",
        "probe",
        "--listen",
        "30s",
        "--messages",
        "4",
    ]);
    let header = tokio::task::spawn_blocking(move || {
        let header = lines.recv_timeout(Duration::from_secs(20)).unwrap();
        (header, lines)
    })
    .await
    .unwrap();
    let (header, lines) = header;
    assert!(
        header.starts_with(&format!(
            "listening to broker probe at 127.0.0.1:{} as gw-probe-probe-",
            broker.port()
        )),
        "{header}"
    );
    assert!(
        header.ends_with(
            " (MQTT 3.1.1, clean session, QoS 0) for 30s: plant/+/+/telemetry, meters/+/kwh, rooms/+/climate"
        ),
        "{header}"
    );
    publish(
        broker.port(),
        &[
            (
                "plant/press-3/oil_temp/telemetry",
                br#"{"value": 215, "ts": 1700000000001}"#,
            ),
            (
                "rooms/12/climate",
                br#"{"t": 21.5, "time": "2024-05-01T12:00:00.250Z"}"#,
            ),
            ("meters/m-7/kwh", b"n/a\n"),
        ],
    )
    .await;
    let (status, out) = tokio::task::spawn_blocking(move || {
        let status = child.0.wait().unwrap();
        // The reader ends at the pipe's end, after the last line.
        let out: Vec<String> = lines.iter().collect();
        (status, out)
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0), "{out:#?}");
    assert_eq!(out.len(), 11, "{out:#?}");
    // The retained value comes first, mapped at its arrival time.
    assert_eq!(out[0], "meters/m-9/kwh  1 bytes: 7");
    assert!(
        out[1].starts_with("  -> m-9 energy = 7 kWh at ") && out[1].ends_with("Z (arrival time)"),
        "{}",
        out[1]
    );
    assert_eq!(
        &out[2..],
        [
            "  (retained: the broker replays this last value on subscribe; the agent skips it)",
            "plant/press-3/oil_temp/telemetry  35 bytes: {\"value\": 215, \"ts\": 1700000000001}",
            "  -> press-3 oil_temp = 21.5 degC at 2023-11-14T22:13:20.001000Z",
            "rooms/12/climate  47 bytes: {\"t\": 21.5, \"time\": \"2024-05-01T12:00:00.250Z\"}",
            "  -> room-12 temp = 21.5 degC at 2024-05-01T12:00:00.250000Z",
            "  -> bad payload (missing_field): topic `rooms/12/climate`: no value at JSON pointer `/h`",
            "meters/m-7/kwh  4 bytes: n/a\\n",
            "  -> bad payload (not_a_number): topic `meters/m-7/kwh`: payload `n/a` is not a number",
            "4 messages, 2 with a bad payload",
        ]
        .map(str::to_owned)
    );

    // The agent's own session got every message: the probe took nothing from it.
    wait_buffered(&setup, 2).await;
    wait_dead_letters(&setup, 2).await;
    agent.stop().await;
    assert_eq!(
        setup
            .uploaded()
            .iter()
            .map(|r| (r.device.as_str(), r.tag.as_str(), r.value))
            .collect::<Vec<_>>(),
        vec![
            ("press-3", "oil_temp", Some(21.5)),
            ("room-12", "temp", Some(21.5))
        ]
    );
}

#[test]
fn probe_names_the_brokers_and_subscriptions_of_the_map_when_asked_for_another() {
    let example = pipeline_e2e::checkout().join("config-examples/agent/line3-mqtt-sensors.toml");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .arg("probe")
            .arg("--config")
            .arg(&example)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(
        run(&["--mqtt", "line9"]),
        (
            Some(78),
            format!(
                "edge-agent probe: {}: no MQTT broker `line9` in the sensor map; use one of: line3-broker\n",
                example.display()
            )
        )
    );
    assert_eq!(
        run(&["--mqtt", "line3-broker", "--subscription", "plant/#"]),
        (
            Some(78),
            format!(
                "edge-agent probe: {}: broker `line3-broker` has no subscription `plant/#`; use one of: plant/+/+/telemetry, meters/+/kwh, rooms/+/climate, spBv1.0/line3/#\n",
                example.display()
            )
        )
    );
}

#[test]
fn probe_of_a_broker_that_is_not_there_exits_1_naming_it() {
    let port = pipeline_e2e::free_port();
    let setup = Setup::new("absent", port, SUBSCRIPTIONS);
    std::fs::write(setup.config_path(), setup.config_text("50ms")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["probe", "--mqtt", "absent", "--config"])
        .arg(setup.config_path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "edge-agent probe: cannot reach MQTT broker `absent` at 127.0.0.1:{port}: "
        )),
        "{stderr}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
}

/// rumqttc alone drops the connection on a message over 10 KiB; the agent's default allows 1 MiB,
/// so a large payload (a big JSON document, a Sparkplug birth with hundreds of metrics) arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_of_hundreds_of_kilobytes_is_read_like_any_other() {
    let broker = Mosquitto::start();
    let setup = Setup::new("large", broker.port(), SUBSCRIPTIONS);
    let agent = Agent::start(&setup).await;

    let padding = "x".repeat(300_000);
    let payload = format!(r#"{{"value": 215, "ts": 1700000000001, "note": "{padding}"}}"#);
    publish(
        broker.port(),
        &[("plant/press-3/oil_temp/telemetry", payload.as_bytes())],
    )
    .await;
    wait_buffered(&setup, 1).await;
    agent.stop().await;

    let rows = setup.uploaded();
    assert_eq!(
        summary(&rows),
        vec![row(
            1_700_000_000_001_000,
            "press-3",
            "oil_temp",
            21.5,
            "degC"
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_string_value_is_recorded_as_text_and_a_number_value_still_refuses_text() {
    let broker = Mosquitto::start();
    let subscriptions = r#"
[[mqtt.subscriptions]]
topic = "press/+/status"
device = "{1}"
timestamp = "/ts"
timestamp_format = "epoch_ms"
[[mqtt.subscriptions.fields]]
tag = "recipe"
value = "/recipe"
type = "string"
[[mqtt.subscriptions.fields]]
tag = "speed"
value = "/speed"
unit = "rpm"

[[mqtt.subscriptions]]
topic = "press/+/mode"
device = "{1}"
tag = "mode"
value = "/mode"
"#;
    let setup = Setup::new("text-values", broker.port(), subscriptions);
    let agent = Agent::start(&setup).await;
    let status = br#"{"ts": 1700000000001, "recipe": "PX-200 \u00d6l", "speed": 12}"#;
    let numeric_recipe = br#"{"ts": 1700000000002, "recipe": 4711, "speed": "13"}"#;
    let mode = br#"{"mode": "auto"}"#;
    publish(
        broker.port(),
        &[
            ("press/p-1/status", status),
            ("press/p-1/status", numeric_recipe),
            ("press/p-1/mode", mode),
        ],
    )
    .await;
    wait_buffered(&setup, 4).await;
    wait_dead_letters(&setup, 1).await;
    agent.stop().await;

    let rows: Vec<TextOrNumber> = setup
        .uploaded()
        .into_iter()
        .map(|r| {
            assert_eq!((r.device.as_str(), r.quality), ("p-1", Quality::Good));
            (r.ts_us, r.tag, r.value, r.value_text, r.unit)
        })
        .collect();
    let text = |ts_us: i64, text: &str| {
        (
            ts_us,
            "recipe".to_owned(),
            None,
            Some(text.to_owned()),
            None,
        )
    };
    let speed = |ts_us: i64, v: f64| {
        (
            ts_us,
            "speed".to_owned(),
            Some(v),
            None,
            Some("rpm".to_owned()),
        )
    };
    assert_eq!(
        rows,
        vec![
            text(1_700_000_000_001_000, "PX-200 Öl"),
            speed(1_700_000_000_001_000, 12.0),
            text(1_700_000_000_002_000, "4711"),
            speed(1_700_000_000_002_000, 13.0),
        ]
    );
    assert_eq!(
        letter_summary(&setup.dead_letters()),
        vec![letter(
            "press/+/mode",
            "press/p-1/mode",
            "not_numeric",
            mode
        )],
        "a value not declared as text stays a number, and text there is a bad payload"
    );
}

/// A reading as the text-value tests compare it: time, tag, number, text, unit.
type TextOrNumber = (i64, String, Option<f64>, Option<String>, Option<String>);
