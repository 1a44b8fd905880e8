//! The MQTT source speaking MQTT 5 (`protocol = "5"`) to a real broker, Mosquitto 2.0 on
//! 127.0.0.1: the same mapping and the same guarantees as 3.1.1 (acknowledged only after the
//! commit, a persistent session through the session expiry interval, subscriptions renewed on
//! every connect). Messages are published by a separate MQTT 3.1.1 client, which the broker
//! hands on to the agent's MQTT 5 session.

// Exact float comparisons are the point: every value must arrive with these very bits.
#![allow(clippy::float_cmp)]

mod common;
mod mqtt_common;

use std::time::Duration;

use mqtt_common::{
    Agent, AgentBinary, SUBSCRIPTIONS, Setup, log_lines, publish, row, subscriptions_confirmed,
    summary, wait_buffered, wait_subscribed,
};
use pipeline_e2e::{Mosquitto, now_us};

/// MQTT 5 with a session that outlives the agent's absences in these tests.
const V5: &str = "protocol = \"5\"\nsession_expiry = \"1h\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_plain_number_and_multi_field_messages_become_exact_readings_over_mqtt_5() {
    let broker = Mosquitto::start();
    let setup = Setup::with_broker_keys("v5-mapping", broker.port(), V5, SUBSCRIPTIONS);
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
    let meter_ts = rows[1].ts_us;
    assert!((before..=after).contains(&meter_ts));
    assert_eq!(
        summary(&rows),
        vec![
            row(1_700_000_000_001_000, "press-3", "oil_temp", 21.5, "degC"),
            row(meter_ts, "m-7", "energy", 1234.5, "kWh"),
            row(1_714_564_800_250_000, "room-12", "temp", 21.5, "degC"),
            row(1_714_564_800_250_000, "room-12", "rh", 45.0, "%"),
        ]
    );
    let started = log_lines("v5-mapping", "mqtt source starting");
    assert!(
        started[0].contains("protocol=5 tls=false"),
        "{}",
        started[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_message_published_while_the_agent_was_away_arrives_when_it_returns() {
    let broker = Mosquitto::start();
    let setup = Setup::with_broker_keys("v5-session", broker.port(), V5, SUBSCRIPTIONS);
    let agent = Agent::start(&setup).await;
    publish(broker.port(), &[("meters/m-1/kwh", b"1")]).await;
    wait_buffered(&setup, 1).await;
    agent.stop().await;

    // The agent is away: the broker keeps these for the session's expiry interval.
    publish(
        broker.port(),
        &[
            ("meters/m-1/kwh", b"2"),
            (
                "plant/press-3/oil_temp/telemetry",
                br#"{"value": 40, "ts": 1700000000002}"#,
            ),
        ],
    )
    .await;
    // The first reading left the buffer in the batch cut when the agent stopped.
    let agent = Agent::start(&setup).await;
    wait_buffered(&setup, 2).await;
    agent.stop().await;

    let values: Vec<(String, Option<f64>)> = setup
        .uploaded()
        .iter()
        .map(|r| (r.tag.clone(), r.value))
        .collect();
    assert_eq!(
        values,
        vec![
            ("energy".to_owned(), Some(1.0)),
            ("energy".to_owned(), Some(2.0)),
            ("oil_temp".to_owned(), Some(4.0)),
        ],
        "every message exactly once, in publishing order"
    );
    let connected = log_lines("v5-session", "connected to the broker");
    assert_eq!(connected.len(), 2, "{connected:#?}");
    assert!(
        connected[0].contains("session_present=false"),
        "{}",
        connected[0]
    );
    assert!(
        connected[1].contains("session_present=true"),
        "the broker kept the session: {}",
        connected[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_start_session_does_not_receive_what_was_published_while_away() {
    // The other side of the setting: with clean_session = true nothing waits for the agent,
    // which shows the session above is the broker's doing and not an accident of the test.
    let broker = Mosquitto::start();
    let setup = Setup::with_broker_keys(
        "v5-clean",
        broker.port(),
        "protocol = \"5\"\nclean_session = true\n",
        SUBSCRIPTIONS,
    );
    let agent = Agent::start(&setup).await;
    agent.stop().await;
    publish(broker.port(), &[("meters/m-1/kwh", b"2")]).await;
    let agent = Agent::start(&setup).await;
    publish(broker.port(), &[("meters/m-1/kwh", b"3")]).await;
    wait_buffered(&setup, 1).await;
    agent.stop().await;
    assert_eq!(
        setup.uploaded().iter().map(|r| r.value).collect::<Vec<_>>(),
        vec![Some(3.0)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_received_but_not_committed_when_the_agent_is_killed_comes_again() {
    let broker = Mosquitto::start();
    let setup = Setup::with_broker_keys("v5-killed", broker.port(), V5, SUBSCRIPTIONS);
    // The agent binary, committing only once an hour: what it receives stays uncommitted.
    std::fs::write(setup.config_path(), setup.config_text("1h")).unwrap();
    let binary = AgentBinary::start(&setup, "first").await;
    publish(
        broker.port(),
        &[(
            "plant/press-3/oil_temp/telemetry",
            br#"{"value": 215, "ts": 1700000000003}"#,
        )],
    )
    .await;
    binary.wait_log("message received", 1).await;
    assert_eq!(setup.buffered(), 0, "received, not committed");
    binary.kill(); // SIGKILL

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
async fn the_source_reconnects_and_subscribes_again_when_the_broker_comes_back() {
    let port = pipeline_e2e::free_port();
    let listener = format!("listener {port} 127.0.0.1");
    let setup = Setup::with_broker_keys("v5-reconnect", port, V5, SUBSCRIPTIONS);
    let broker = Mosquitto::start_with_config(&listener);
    let agent = Agent::start(&setup).await;
    publish(port, &[("meters/m-1/kwh", b"1")]).await;
    wait_buffered(&setup, 1).await;

    // A new broker without the old session takes the port: the agent reconnects and subscribes
    // again, or the message below would never reach it.
    let subscribed = subscriptions_confirmed(&setup);
    drop(broker);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _broker = Mosquitto::start_with_config(&listener);
    wait_subscribed(&setup, subscribed).await;
    publish(port, &[("meters/m-1/kwh", b"2")]).await;
    wait_buffered(&setup, 2).await;
    agent.stop().await;
    assert_eq!(
        setup.uploaded().iter().map(|r| r.value).collect::<Vec<_>>(),
        vec![Some(1.0), Some(2.0)]
    );
    assert_eq!(
        log_lines("v5-reconnect", "connection to the broker lost").len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_speaks_mqtt_5_to_a_broker_configured_for_it() {
    use std::sync::{Arc, Mutex};

    use edge_agent::config::ConfigDuration;
    use edge_agent::tools::probe::{MqttProbeArgs, MqttProbeSummary, probe_mqtt};

    let broker = Mosquitto::start();
    let setup = Setup::with_broker_keys("v5-probe", broker.port(), V5, SUBSCRIPTIONS);
    let config = setup.config();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let printed = Arc::clone(&lines);
    let probe = tokio::spawn(async move {
        let args = MqttProbeArgs {
            broker: "v5-probe".to_owned(),
            subscription: Some("meters/+/kwh".to_owned()),
            listen: ConfigDuration::from_secs(20),
            max_messages: Some(1),
        };
        probe_mqtt(&config, std::path::Path::new("agent.toml"), &args, |line| {
            printed.lock().unwrap().push(line.to_owned());
        })
        .await
    });
    let listening = Arc::clone(&lines);
    tokio::task::spawn_blocking(move || {
        mqtt_common::wait_for("the probe's subscription", || {
            listening
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.starts_with("listening"))
        });
    })
    .await
    .unwrap();
    publish(broker.port(), &[("meters/m-7/kwh", b"1234.5")]).await;
    let summary = probe.await.unwrap().expect("the probe listens and ends");
    assert_eq!(
        summary,
        MqttProbeSummary {
            messages: 1,
            bad: 0
        }
    );
    let lines = lines.lock().unwrap().clone();
    assert!(
        lines[0].contains(" (MQTT 5, clean session, QoS 0) for 20s: meters/+/kwh"),
        "{lines:#?}"
    );
    assert!(
        lines[2].starts_with("  -> m-7 energy = 1234.5 kWh at ")
            && lines[2].ends_with(" (arrival time)"),
        "{lines:#?}"
    );
    // The broker's own account of the connection: protocol level 5 (`p5`), clean start (`c1`).
    let connected: Vec<String> = broker
        .peer()
        .stderr()
        .lines()
        .filter(|l| l.contains("as gw-v5-probe-probe-"))
        .map(str::to_owned)
        .collect();
    assert_eq!(connected.len(), 1, "{connected:?}");
    assert!(connected[0].contains("(p5, c1, k5"), "{}", connected[0]);
}
