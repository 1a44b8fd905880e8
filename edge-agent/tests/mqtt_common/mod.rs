//! Helpers shared by the MQTT integration tests (`mqtt_source`, `mqtt_tls`, `mqtt_v5`): the
//! agent's captured log, a test's config and files ([`Setup`]), the agent in-process ([`Agent`])
//! or as a binary killed with SIGKILL ([`AgentBinary`]), and a QoS 1 test publisher.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use edge_agent::config::{AgentConfig, load_str};
use edge_agent::contract::{Quality, Row};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio_util::sync::CancellationToken;

/// Everything the agent logs, for the assertions on counted bad payloads.
pub(crate) fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
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

pub(crate) struct LogWriter(Arc<Mutex<Vec<u8>>>);

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
pub(crate) fn log_lines(broker: &str, containing: &str) -> Vec<String> {
    let marker = format!("broker={broker}");
    String::from_utf8_lossy(&logs().lock().unwrap())
        .lines()
        .filter(|l| l.contains(&marker) && l.contains(containing))
        .map(str::to_owned)
        .collect()
}

pub(crate) fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One agent's files and its configuration text around the `[[mqtt]]` section under test.
pub(crate) struct Setup {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) broker: String,
    pub(crate) mqtt: String,
}

impl Setup {
    pub(crate) fn new(broker: &str, port: u16, subscriptions: &str) -> Self {
        Self::with_broker_keys(broker, port, "", subscriptions)
    }

    /// As [`Setup::new`], with `keys` (lines of the `[[mqtt]]` table, and tables such as
    /// `[mqtt.tls]`) written before the subscriptions.
    pub(crate) fn with_broker_keys(
        broker: &str,
        port: u16,
        keys: &str,
        subscriptions: &str,
    ) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            broker: broker.to_owned(),
            mqtt: format!(
                "[[mqtt]]\nname = \"{broker}\"\nhost = \"127.0.0.1\"\nport = {port}\nclient_id = \"gw-{broker}\"\nkeep_alive = \"5s\"\n{keys}\n{subscriptions}"
            ),
        }
    }

    pub(crate) fn config(&self) -> AgentConfig {
        load_str(&self.config_text("50ms"), &self.config_path()).expect("the test config is valid")
    }

    pub(crate) fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    pub(crate) fn config_text(&self, commit_interval: &str) -> String {
        // A batch is cut only at shutdown, so the buffer's row count shows what arrived.
        format!(
            "site = \"plant-ost\"\ngateway = \"gw-mqtt\"\n[buffer]\npath = \"buffer.db\"\ncommit_interval = \"{commit_interval}\"\n[batch]\nmax_age = \"1h\"\n[upload.dir]\npath = \"outbox\"\n{}",
            self.mqtt
        )
    }

    pub(crate) fn buffered(&self) -> u64 {
        edge_agent::buffer::inspect(&self.dir.path().join("buffer.db")).map_or(0, |r| r.rows)
    }

    /// Every row of every batch the agent uploaded, in `seq` order.
    pub(crate) fn uploaded(&self) -> Vec<Row> {
        crate::common::uploaded_rows(&self.dir.path().join("outbox"))
    }
}

/// A running agent.
pub(crate) struct Agent {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), edge_agent::AgentError>>,
}

impl Agent {
    /// Starts the agent and waits until its subscriptions are confirmed by the broker.
    pub(crate) async fn start(setup: &Setup) -> Self {
        let subscribed = subscriptions_confirmed(setup);
        let agent = Self::spawn(setup);
        wait_subscribed(setup, subscribed).await;
        agent
    }

    /// Starts the agent without waiting for its broker.
    pub(crate) fn spawn(setup: &Setup) -> Self {
        logs();
        let stop = CancellationToken::new();
        let task = tokio::spawn(edge_agent::run(setup.config(), stop.clone()));
        Self { stop, task }
    }

    pub(crate) async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("the agent does not panic")
            .expect("the agent stops cleanly");
    }
}

/// How often the broker has confirmed the agent's subscriptions so far.
pub(crate) fn subscriptions_confirmed(setup: &Setup) -> usize {
    logs();
    log_lines(&setup.broker, "subscribed").len()
}

/// Waits until the broker confirmed the agent's subscriptions more than `before` times.
pub(crate) async fn wait_subscribed(setup: &Setup, before: usize) {
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
pub(crate) async fn publish(port: u16, messages: &[(&str, &[u8])]) {
    Publisher::plain(port).publish(messages).await;
}

pub(crate) async fn publish_with(port: u16, retain: bool, messages: &[(&str, &[u8])]) {
    Publisher::plain(port)
        .publish_retained(retain, messages)
        .await;
}

/// A test client that publishes at QoS 1 over MQTT 3.1.1, plain or TLS.
#[derive(Clone)]
pub(crate) struct Publisher {
    port: u16,
    transport: rumqttc::Transport,
    login: Option<(String, String)>,
}

impl Publisher {
    /// Anonymous, plain TCP.
    pub(crate) fn plain(port: u16) -> Self {
        Self {
            port,
            transport: rumqttc::Transport::tcp(),
            login: None,
        }
    }

    /// TLS trusting the test CA, logging in as `user` and, for a broker that requires it, with
    /// the test client certificate.
    pub(crate) fn tls(
        port: u16,
        pki: &pipeline_e2e::TestPki,
        login: Option<(&str, &str)>,
        client_certificate: bool,
    ) -> Self {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(pki.ca_file()).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = if client_certificate {
            let chain = CertificateDer::pem_file_iter(pki.client_cert_file())
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(pki.client_key_file()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        } else {
            builder.with_no_client_auth()
        };
        Self {
            port,
            transport: rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                Arc::new(config),
            )),
            login: login.map(|(u, p)| (u.to_owned(), p.to_owned())),
        }
    }

    /// Publishes each `(topic, payload)` at QoS 1 and returns once the broker acknowledged all.
    pub(crate) async fn publish(&self, messages: &[(&str, &[u8])]) {
        self.publish_retained(false, messages).await;
    }

    pub(crate) async fn publish_retained(&self, retain: bool, messages: &[(&str, &[u8])]) {
        let mut options = MqttOptions::new("test-publisher", "127.0.0.1", self.port);
        options
            .set_keep_alive(Duration::from_secs(5))
            // Large enough for the large-message test.
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_transport(self.transport.clone());
        if let Some((user, password)) = &self.login {
            options.set_credentials(user, password);
        }
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
}

pub(crate) async fn wait_buffered(setup: &Setup, rows: u64) {
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
pub(crate) type Compared = (i64, String, String, Option<f64>, Quality, Option<String>);

pub(crate) fn summary(rows: &[Row]) -> Vec<Compared> {
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

pub(crate) fn row(ts_us: i64, device: &str, tag: &str, value: f64, unit: &str) -> Compared {
    (
        ts_us,
        device.to_owned(),
        tag.to_owned(),
        Some(value),
        Quality::Good,
        Some(unit.to_owned()),
    )
}

pub(crate) const SUBSCRIPTIONS: &str = r#"
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

/// The agent binary, killed when a test fails before it does.
pub(crate) struct KillOnDrop(pub(crate) std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent binary with debug logs in a file, killed with SIGKILL by the test.
pub(crate) struct AgentBinary {
    child: KillOnDrop,
    log: PathBuf,
}

impl AgentBinary {
    /// Starts `edge-agent run` and waits until its subscriptions are confirmed.
    pub(crate) async fn start(setup: &Setup, run: &str) -> Self {
        let log = setup.dir.path().join(format!("agent-{run}.log"));
        let child = KillOnDrop(
            std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
                .args(["run", "--config"])
                .arg(setup.config_path())
                .env("RUST_LOG", "warn,edge_agent=debug")
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        let binary = Self { child, log };
        binary.wait_log("subscribed", 1).await;
        binary
    }

    pub(crate) async fn wait_log(&self, text: &'static str, times: usize) {
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || {
            wait_for(text, || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .matches(text)
                    .count()
                    >= times
            });
        })
        .await
        .unwrap();
    }

    pub(crate) fn kill(mut self) {
        self.child.0.kill().unwrap(); // SIGKILL
        self.child.0.wait().unwrap();
    }
}
