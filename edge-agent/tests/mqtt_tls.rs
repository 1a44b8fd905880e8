//! The MQTT source over TLS against a real broker: Mosquitto 2.0 with a TLS listener on
//! 127.0.0.1 (`pipeline_e2e::Mosquitto::start_tls`), its certificates made by the test at run
//! time (`pipeline_e2e::TestPki`, never committed), a password file, and for one test required
//! client certificates. The agent runs through `edge_agent::run`; what it recorded is read back
//! from the Parquet batches it wrote.

// Exact float comparisons are the point: every value must arrive with these very bits.
#![allow(clippy::float_cmp)]

mod common;
mod mqtt_common;

use std::path::Path;

use edge_agent::config::load_str;
use mqtt_common::{
    Agent, Publisher, SUBSCRIPTIONS, Setup, log_lines, logs, row, summary, wait_buffered, wait_for,
};
use pipeline_e2e::{Mosquitto, MosquittoTls, TestPki};

const AGENT_PASSWORD: &str = "agent-pw-5d1c9e";

/// A broker with the users `agent` and `sensor`.
fn broker_with_passwords(pki: &TestPki, require_client_certificate: bool) -> Mosquitto {
    Mosquitto::start_tls(
        pki,
        &MosquittoTls {
            users: vec![
                ("agent".to_owned(), AGENT_PASSWORD.to_owned()),
                ("sensor".to_owned(), "sensor-pw".to_owned()),
            ],
            require_client_certificate,
        },
    )
}

/// The agent's `[[mqtt]]` keys: user `agent` with its password in a file next to the config,
/// and `[mqtt.tls]` with `tls` (paths relative to the config's folder work too).
fn setup(name: &str, port: u16, protocol: &str, tls: &str) -> Setup {
    let setup = Setup::with_broker_keys(
        name,
        port,
        &format!(
            "protocol = \"{protocol}\"\nusername = \"agent\"\npassword_file = \"mqtt-password\"\n[mqtt.tls]\n{tls}\n"
        ),
        SUBSCRIPTIONS,
    );
    std::fs::write(
        setup.dir.path().join("mqtt-password"),
        format!("{AGENT_PASSWORD}\n"),
    )
    .unwrap();
    setup
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Waits until the agent logged a line for `broker` containing `text`.
async fn wait_logged(broker: &'static str, text: &'static str) {
    tokio::task::spawn_blocking(move || {
        wait_for(text, || !log_lines(broker, text).is_empty());
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_readings_arrive_over_tls_with_a_password_that_is_never_logged() {
    let pki = TestPki::generate();
    let broker = broker_with_passwords(&pki, false);
    let setup = setup(
        "tls-password",
        broker.port(),
        "3.1.1",
        &format!("ca_file = \"{}\"", path(&pki.ca_file())),
    );
    let agent = Agent::start(&setup).await;
    Publisher::tls(broker.port(), &pki, Some(("sensor", "sensor-pw")), false)
        .publish(&[
            (
                "plant/press-3/oil_temp/telemetry",
                br#"{"value": 215, "ts": 1700000000001}"#,
            ),
            (
                "rooms/12/climate",
                br#"{"t": 21.5, "h": 0.45, "time": "2024-05-01T12:00:00.250Z"}"#,
            ),
        ])
        .await;
    wait_buffered(&setup, 3).await;
    agent.stop().await;

    assert_eq!(
        summary(&setup.uploaded()),
        vec![
            row(1_700_000_000_001_000, "press-3", "oil_temp", 21.5, "degC"),
            row(1_714_564_800_250_000, "room-12", "temp", 21.5, "degC"),
            row(1_714_564_800_250_000, "room-12", "rh", 45.0, "%"),
        ]
    );
    let started = log_lines("tls-password", "mqtt source starting");
    assert_eq!(started.len(), 1, "{started:#?}");
    assert!(
        started[0].contains(&format!("tls=true host=127.0.0.1 port={}", broker.port())),
        "{}",
        started[0]
    );
    let everything = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(
        !everything.contains(AGENT_PASSWORD),
        "the password must never be logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_requiring_client_certificates_accepts_the_agents_over_mqtt_5() {
    let pki = TestPki::generate();
    let broker = broker_with_passwords(&pki, true);
    // Relative paths: the files sit in the config's folder.
    let setup = setup(
        "tls-client-cert",
        broker.port(),
        "5",
        "ca_file = \"pki/ca.pem\"\nclient_cert_file = \"pki/client.pem\"\nclient_key_file = \"pki/client.key\"",
    );
    let pki_copy = setup.dir.path().join("pki");
    std::fs::create_dir(&pki_copy).unwrap();
    for file in [pki.ca_file(), pki.client_cert_file(), pki.client_key_file()] {
        std::fs::copy(&file, pki_copy.join(file.file_name().unwrap())).unwrap();
    }
    let agent = Agent::start(&setup).await;
    Publisher::tls(broker.port(), &pki, Some(("sensor", "sensor-pw")), true)
        .publish(&[("meters/m-7/kwh", b"1234.5")])
        .await;
    wait_buffered(&setup, 1).await;
    agent.stop().await;
    let rows = setup.uploaded();
    assert_eq!(
        summary(&rows),
        vec![row(rows[0].ts_us, "m-7", "energy", 1234.5, "kWh")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_client_certificate_the_refusal_is_logged_with_the_fix() {
    let pki = TestPki::generate();
    let broker = broker_with_passwords(&pki, true);
    let setup = setup(
        "tls-no-client-cert",
        broker.port(),
        "3.1.1",
        &format!("ca_file = \"{}\"", path(&pki.ca_file())),
    );
    let agent = Agent::spawn(&setup);
    wait_logged(
        "tls-no-client-cert",
        "set tls.client_cert_file and tls.client_key_file",
    )
    .await;
    agent.stop().await;
    assert_eq!(setup.buffered(), 0);
    assert!(log_lines("tls-no-client-cert", "subscribed").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_certificate_another_ca_signed_is_refused_with_a_clear_error() {
    let pki = TestPki::generate();
    let broker = broker_with_passwords(&pki, false);
    let setup = setup(
        "tls-wrong-ca",
        broker.port(),
        "3.1.1",
        &format!("ca_file = \"{}\"", path(&pki.other_ca_file())),
    );
    let agent = Agent::spawn(&setup);
    wait_logged("tls-wrong-ca", "cannot connect to the broker").await;
    agent.stop().await;
    let refused = log_lines("tls-wrong-ca", "cannot connect to the broker");
    assert!(
        refused[0].contains(
            "the broker's certificate is not signed by a CA in tls.ca_file; set ca_file to the certificate of the CA that signed it"
        ),
        "{}",
        refused[0]
    );
    assert!(refused[0].contains("UnknownIssuer"), "{}", refused[0]);
    assert!(log_lines("tls-wrong-ca", "subscribed").is_empty());
    assert_eq!(setup.buffered(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_checks_the_certificate_for_that_name_instead_of_the_host() {
    let pki = TestPki::generate();
    let broker = broker_with_passwords(&pki, false);
    let ca = path(&pki.ca_file());

    // The certificate names broker.plantline.test: connecting by IP with that name works.
    let named = setup(
        "tls-named",
        broker.port(),
        "3.1.1",
        &format!(
            "ca_file = \"{ca}\"\nserver_name = \"{}\"",
            TestPki::BROKER_NAME
        ),
    );
    let agent = Agent::start(&named).await;
    agent.stop().await;

    // A name the certificate does not carry is refused, though the IP address is in it.
    let misnamed = setup(
        "tls-misnamed",
        broker.port(),
        "3.1.1",
        &format!("ca_file = \"{ca}\"\nserver_name = \"other.plantline.test\""),
    );
    let agent = Agent::spawn(&misnamed);
    wait_logged("tls-misnamed", "cannot connect to the broker").await;
    agent.stop().await;
    let refused = log_lines("tls-misnamed", "cannot connect to the broker");
    assert!(
        refused[0].contains("does not name the host the agent connects to; connect by a name in the certificate, or set tls.server_name to one"),
        "{}",
        refused[0]
    );
}

#[test]
fn validate_reads_the_tls_files_and_names_a_key_that_does_not_fit_its_certificate() {
    let pki = TestPki::generate();
    let config = pki.dir().join("agent.toml");
    let text = |tls: &str| {
        format!(
            "site = \"plant-ost\"\ngateway = \"gw-1\"\n[upload.dir]\npath = \"out\"\n[[mqtt]]\nname = \"b\"\nhost = \"127.0.0.1\"\nclient_id = \"gw-1\"\n[mqtt.tls]\n{tls}\n[[mqtt.subscriptions]]\ntopic = \"a/+\"\ndevice = \"{{1}}\"\ntag = \"t\"\nvalue = \"\"\n"
        )
    };
    // Relative to the config's folder; the default port becomes 8883.
    let loaded = load_str(
        &text("ca_file = \"ca.pem\"\nclient_cert_file = \"client.pem\"\nclient_key_file = \"client.key\""),
        &config,
    )
    .unwrap();
    assert_eq!(loaded.mqtt[0].port(), 8883);
    assert_eq!(
        loaded.mqtt[0].tls.as_ref().unwrap().ca_file,
        pki.dir().join("ca.pem")
    );

    let problems = |tls: &str| match load_str(&text(tls), &config) {
        Ok(_) => panic!("expected a problem with {tls}"),
        Err(e) => e.to_string(),
    };
    let file = config.display();
    assert_eq!(
        problems(
            "ca_file = \"ca.pem\"\nclient_cert_file = \"client.pem\"\nclient_key_file = \"server.key\""
        ),
        format!(
            "{file}:12: mqtt[0].tls.client_key_file: tls.client_key_file {} is not the key of tls.client_cert_file {} (the certificate holds another public key); give the key that was made with this certificate",
            pki.server_key_file().display(),
            pki.client_cert_file().display()
        )
    );
    assert_eq!(
        problems("ca_file = \"client.key\""),
        format!(
            "{file}:10: mqtt[0].tls.ca_file: tls.ca_file {} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`); it holds a private key: give the certificate file here",
            pki.client_key_file().display()
        )
    );
    assert_eq!(
        problems(
            "ca_file = \"ca.pem\"\nclient_cert_file = \"client.pem\"\nclient_key_file = \"missing.key\""
        ),
        format!(
            "{file}:12: mqtt[0].tls.client_key_file: cannot read tls.client_key_file {}: No such file or directory (os error 2); check the path and that the agent's user may read it",
            pki.dir().join("missing.key").display()
        )
    );
}
