//! The protocol glue: the only code that knows whether a broker speaks MQTT 3.1.1 or MQTT 5.
//!
//! It builds the connection options (client id, session, credentials, TLS) for either
//! protocol, and turns rumqttc's two event loops and two clients into one [`Connection`] (what
//! happened on the wire) and one [`Requests`] handle (acknowledge, subscribe, publish a
//! command, disconnect). The tasks of [`super::client`] and the routing of [`super::route`] see
//! only these, so both protocols share one mapping, one acknowledgement order and one reconnect
//! policy.
//!
//! # The session, by protocol
//! - 3.1.1: `clean_session = false` asks the broker to keep the session; how long it keeps one
//!   whose client is away is the broker's setting (Mosquitto: `persistent_client_expiration`).
//! - 5: `clean_session = false` is Clean Start off, and the session expiry interval is
//!   `session_expiry` (a week by default): the broker keeps the session that long after the
//!   agent disconnected. A broker may grant less; the agent logs what it granted.
//!
//! Either way acknowledgements are manual (sent by the acker after the buffer's commit, never by
//! rumqttc) and the subscriptions are sent again after every CONNACK.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5 as packet5;
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tracing::warn;

use super::client::MqttError;
use super::tls;
use crate::config::{MqttBroker, MqttProtocol, MqttTls};

/// A PUBLISH from the broker, whatever the protocol.
#[derive(Debug)]
pub(crate) struct Message {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) retain: bool,
    pub(crate) dup: bool,
    pub(crate) pkid: u16,
    /// The packet as the protocol's client needs it to acknowledge.
    received: Received,
}

#[derive(Debug)]
enum Received {
    V4(rumqttc::Publish),
    V5(packet5::Publish),
}

impl Message {
    fn v4(publish: rumqttc::Publish) -> Self {
        Self {
            topic: publish.topic.clone(),
            payload: publish.payload.clone(),
            retain: publish.retain,
            dup: publish.dup,
            pkid: publish.pkid,
            received: Received::V4(publish),
        }
    }

    fn v5(publish: packet5::Publish) -> Self {
        Self {
            // The protocol requires UTF-8 topics; rumqttc checks none, so a broken one is kept
            // readable rather than dropped (it matches no filter and is acknowledged).
            topic: String::from_utf8_lossy(&publish.topic).into_owned(),
            payload: publish.payload.clone(),
            retain: publish.retain,
            dup: publish.dup,
            pkid: publish.pkid,
            received: Received::V5(publish),
        }
    }

    /// A QoS 1 message as MQTT 3.1.1 would deliver it, for tests of the tasks.
    #[cfg(test)]
    pub(crate) fn test_v4(topic: &str, pkid: u16, payload: &'static [u8]) -> Self {
        let mut publish = rumqttc::Publish::new(topic, rumqttc::QoS::AtLeastOnce, payload);
        publish.pkid = pkid;
        Self::v4(publish)
    }

    /// A QoS 1 message as MQTT 5 would deliver it, for tests of the tasks.
    #[cfg(test)]
    pub(crate) fn test_v5(topic: &str, pkid: u16, payload: &'static [u8]) -> Self {
        let mut publish = packet5::Publish::new(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            payload,
            None,
        );
        publish.pkid = pkid;
        Self::v5(publish)
    }
}

/// The client side of a connection: requests queued for its event loop.
#[derive(Clone)]
pub(crate) enum Requests {
    V4(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

impl Requests {
    /// Queues the acknowledgement of `message` (nothing for QoS 0).
    pub(crate) async fn ack(&self, message: &Message) -> Result<(), String> {
        match (self, &message.received) {
            (Self::V4(client), Received::V4(publish)) => {
                client.ack(publish).await.map_err(|e| e.to_string())
            }
            (Self::V5(client), Received::V5(publish)) => {
                client.ack(publish).await.map_err(|e| e.to_string())
            }
            _ => Err("the message came from a connection of the other protocol".to_owned()),
        }
    }

    /// Queues one SUBSCRIBE for all `filters` (topic filter and QoS).
    pub(crate) fn subscribe(&self, filters: &[(String, u8)]) -> Result<(), String> {
        match self {
            Self::V4(client) => client
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), qos_v4(*q))),
                )
                .map_err(|e| e.to_string()),
            Self::V5(client) => client
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|(f, q)| packet5::Filter::new(f.clone(), qos_v5(*q))),
                )
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues a QoS 0 PUBLISH (not retained) without waiting: a full request queue is an
    /// error, never a stall of the caller.
    pub(crate) fn try_publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Self::V4(client) => client
                .try_publish(topic, rumqttc::QoS::AtMostOnce, false, payload)
                .map_err(|e| e.to_string()),
            Self::V5(client) => client
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                    false,
                    payload,
                )
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues a DISCONNECT; false when the event loop is gone.
    pub(crate) fn try_disconnect(&self) -> bool {
        match self {
            Self::V4(client) => client.try_disconnect().is_ok(),
            Self::V5(client) => client.try_disconnect().is_ok(),
        }
    }

    /// A client whose requests go to `requests`, for tests of the acknowledgement order.
    #[cfg(test)]
    pub(crate) fn test_v4(requests: flume::Sender<rumqttc::Request>) -> Self {
        Self::V4(rumqttc::AsyncClient::from_senders(requests))
    }

    /// The same for MQTT 5.
    #[cfg(test)]
    pub(crate) fn test_v5(requests: flume::Sender<v5::Request>) -> Self {
        Self::V5(v5::AsyncClient::from_senders(requests))
    }
}

fn qos_v4(level: u8) -> rumqttc::QoS {
    if level == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    }
}

fn qos_v5(level: u8) -> rumqttc::v5::mqttbytes::QoS {
    if level == 0 {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    }
}

/// What the event loop reported.
#[derive(Debug)]
// A `Happened` lives from one poll to its match; boxing the message would allocate per message.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Happened {
    /// The broker accepted the connection (CONNACK).
    Connected {
        session_present: bool,
        /// MQTT 5: the session expiry the broker granted, when it sets one.
        session_expiry_s: Option<u32>,
    },
    /// The broker answered a SUBSCRIBE: its codes, in words, and the position of the first
    /// filter it refused, if any.
    Subscribed {
        codes: String,
        refused: Option<usize>,
    },
    Message(Message),
    /// MQTT 5: the broker closes the connection and says why.
    ServerDisconnect(String),
    /// The agent's own DISCONNECT went out: the connection is over.
    Closed,
    Other,
}

/// Why the connection failed: rumqttc's error in words, and the fix when it is a TLS one.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) reason: String,
    pub(crate) hint: Option<&'static str>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.hint {
            Some(hint) => write!(f, "{}; {hint}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

/// The event loop side of a connection; each `next` call drives it (connects, reconnects after
/// a failure, sends queued requests) until something happens.
pub(crate) struct Connection {
    event_loop: EventLoop,
    tls: Option<MqttTls>,
}

/// Boxed: the two event loops differ in size, and there is one per broker.
enum EventLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

/// Requests queued for the event loop (acks, subscribes, disconnect).
const REQUEST_CAPACITY: usize = 64;

/// The connection to `broker` by its protocol, its files (password, TLS) read now. Nothing is
/// sent before the first [`Connection::next`].
pub(crate) fn connect(broker: &MqttBroker) -> Result<(Requests, Connection), MqttError> {
    let (requests, event_loop) = match broker.protocol {
        MqttProtocol::V311 => {
            let (client, event_loop) =
                rumqttc::AsyncClient::new(options(broker)?, REQUEST_CAPACITY);
            (Requests::V4(client), EventLoop::V4(Box::new(event_loop)))
        }
        MqttProtocol::V5 => {
            let (client, event_loop) = v5::AsyncClient::new(options_v5(broker)?, REQUEST_CAPACITY);
            (Requests::V5(client), EventLoop::V5(Box::new(event_loop)))
        }
    };
    let connection = Connection {
        event_loop,
        tls: broker.tls.clone(),
    };
    Ok((requests, connection))
}

impl Connection {
    /// The next thing that happened, or the failure of the connection (the next call connects
    /// again).
    pub(crate) async fn next(&mut self) -> Result<Happened, Failure> {
        match &mut self.event_loop {
            EventLoop::V4(event_loop) => event_loop
                .poll()
                .await
                .map(happened_v4)
                .map_err(|e| failure(&e, describe_v4(&e))),
            EventLoop::V5(event_loop) => event_loop
                .poll()
                .await
                .map(happened_v5)
                .map_err(|e| failure(&e, describe_v5(&e))),
        }
    }

    /// Reads the TLS files again before the next connect, so renewed certificates are used;
    /// when they cannot be read, the ones read before stay.
    pub(crate) fn renew_tls(&mut self) {
        let Some(tls) = &self.tls else { return };
        match tls::client_config(tls) {
            Ok(config) => {
                let transport = Transport::tls_with_config(TlsConfiguration::Rustls(config));
                match &mut self.event_loop {
                    EventLoop::V4(event_loop) => {
                        event_loop.mqtt_options.set_transport(transport);
                    }
                    EventLoop::V5(event_loop) => {
                        event_loop.options.set_transport(transport);
                    }
                }
            }
            Err(e) => warn!("{e}; connecting with the TLS files as read before"),
        }
    }
}

fn happened_v4(event: rumqttc::Event) -> Happened {
    use rumqttc::{Event, Packet, SubscribeReasonCode};
    match event {
        Event::Incoming(Packet::ConnAck(ack)) => Happened::Connected {
            session_present: ack.session_present,
            session_expiry_s: None,
        },
        Event::Incoming(Packet::SubAck(ack)) => Happened::Subscribed {
            refused: ack
                .return_codes
                .iter()
                .position(|c| matches!(c, SubscribeReasonCode::Failure)),
            codes: format!("{:?}", ack.return_codes),
        },
        Event::Incoming(Packet::Publish(publish)) => Happened::Message(Message::v4(publish)),
        Event::Outgoing(Outgoing::Disconnect) => Happened::Closed,
        _ => Happened::Other,
    }
}

fn happened_v5(event: v5::Event) -> Happened {
    use packet5::SubscribeReasonCode;
    use v5::{Event, Incoming};
    match event {
        Event::Incoming(Incoming::ConnAck(ack)) => Happened::Connected {
            session_present: ack.session_present,
            session_expiry_s: ack.properties.and_then(|p| p.session_expiry_interval),
        },
        Event::Incoming(Incoming::SubAck(ack)) => Happened::Subscribed {
            refused: ack
                .return_codes
                .iter()
                .position(|c| !matches!(c, SubscribeReasonCode::Success(_))),
            codes: format!("{:?}", ack.return_codes),
        },
        Event::Incoming(Incoming::Publish(publish)) => Happened::Message(Message::v5(publish)),
        Event::Incoming(Incoming::Disconnect(disconnect)) => {
            let reason = disconnect
                .properties
                .and_then(|p| p.reason_string)
                .map_or_else(String::new, |r| format!(" ({r})"));
            Happened::ServerDisconnect(format!("{:?}{reason}", disconnect.reason_code))
        }
        Event::Outgoing(Outgoing::Disconnect) => Happened::Closed,
        _ => Happened::Other,
    }
}

fn failure(error: &(dyn std::error::Error + 'static), reason: String) -> Failure {
    Failure {
        reason,
        hint: tls::handshake_hint(error),
    }
}

fn describe_v4(e: &rumqttc::ConnectionError) -> String {
    match e {
        rumqttc::ConnectionError::ConnectionRefused(code) => format!("refused: {code:?}"),
        other => other.to_string(),
    }
}

fn describe_v5(e: &v5::ConnectionError) -> String {
    match e {
        v5::ConnectionError::ConnectionRefused(code) => format!("refused: {code:?}"),
        other => other.to_string(),
    }
}

/// The password of `broker`, read now from its environment variable or file.
fn password(broker: &MqttBroker) -> Result<Option<String>, MqttError> {
    match (&broker.password_env, &broker.password_file) {
        (Some(var), _) => std::env::var(var)
            .map(Some)
            .map_err(|_| MqttError::PasswordEnv {
                broker: broker.name.clone(),
                var: var.clone(),
            }),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|source| MqttError::PasswordFile {
                broker: broker.name.clone(),
                path: path.clone(),
                source,
            })?;
            Ok(Some(text.lines().next().unwrap_or_default().to_owned()))
        }
        (None, None) => Ok(None),
    }
}

/// Plain TCP, or TLS with the configuration of `[mqtt.tls]` read now.
fn transport(broker: &MqttBroker) -> Result<Transport, MqttError> {
    match &broker.tls {
        None => Ok(Transport::tcp()),
        Some(tls) => {
            let config = tls::client_config(tls).map_err(|source| MqttError::Tls {
                broker: broker.name.clone(),
                source: Box::new(source),
            })?;
            Ok(Transport::tls_with_config(TlsConfiguration::Rustls(config)))
        }
    }
}

fn keep_alive(broker: &MqttBroker) -> Duration {
    broker.keep_alive.0
}

/// The MQTT 3.1.1 options of the agent's session with `broker`: its client id and session
/// setting, manual acknowledgements, the credentials and TLS (files read now).
fn options(broker: &MqttBroker) -> Result<rumqttc::MqttOptions, MqttError> {
    let mut options = rumqttc::MqttOptions::new(&broker.client_id, &broker.host, broker.port());
    options
        .set_keep_alive(keep_alive(broker))
        .set_clean_session(broker.clean_session)
        // rumqttc's default (10 KiB) drops the connection on a larger message.
        .set_max_packet_size(
            broker.max_packet_bytes() as usize,
            broker.max_packet_bytes() as usize,
        )
        // Acks are sent by the acker once the buffer has the readings, never by rumqttc.
        .set_manual_acks(true)
        .set_transport(transport(broker)?);
    let password = password(broker)?;
    if let Some(username) = &broker.username {
        options.set_credentials(username, password.unwrap_or_default());
    }
    Ok(options)
}

/// The MQTT 5 options: as [`options`], with Clean Start and the session expiry interval.
fn options_v5(broker: &MqttBroker) -> Result<v5::MqttOptions, MqttError> {
    let mut options = v5::MqttOptions::new(&broker.client_id, &broker.host, broker.port());
    let expiry = u32::try_from(broker.session_expiry().0.as_secs()).unwrap_or(u32::MAX);
    options
        .set_keep_alive(keep_alive(broker))
        .set_clean_start(broker.clean_session)
        .set_session_expiry_interval(Some(expiry))
        .set_max_packet_size(Some(broker.max_packet_bytes()))
        .set_manual_acks(true)
        .set_transport(transport(broker)?);
    let password = password(broker)?;
    if let Some(username) = &broker.username {
        options.set_credentials(username, password.unwrap_or_default());
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(extra: &str) -> MqttBroker {
        toml::from_str(&format!(
            "name = \"b\"\nhost = \"127.0.0.1\"\nclient_id = \"gw\"\nusername = \"agent\"\nsubscriptions = []\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn credentials_come_from_the_password_file_and_are_never_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "s3cret\nignored\n").unwrap();
        let mut broker = broker("");
        broker.password_file = Some(file.clone());
        let options = options(&broker).unwrap();
        let login = options.credentials().expect("a user name is configured");
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("agent", "s3cret")
        );
        assert!(!options.clean_session());
        assert!(options.manual_acks());
        assert!(matches!(options.transport(), Transport::Tcp));
        assert_eq!(options.broker_address(), ("127.0.0.1".to_owned(), 1883));

        broker.password_file = None;
        broker.password_env = Some("PLANTLINE_TEST_UNSET_MQTT_PASSWORD".to_owned());
        assert_eq!(
            options_error(&broker),
            "broker `b`: environment variable `PLANTLINE_TEST_UNSET_MQTT_PASSWORD` (password_env) is not set"
        );
        broker.password_env = None;
        broker.password_file = Some(dir.path().join("missing"));
        assert_eq!(
            options_error(&broker),
            format!(
                "broker `b`: cannot read password_file {}: No such file or directory (os error 2)",
                dir.path().join("missing").display()
            )
        );
    }

    #[test]
    fn mqtt_5_keeps_the_session_for_the_configured_expiry_with_manual_acks() {
        let broker = broker("protocol = \"5\"\nsession_expiry = \"2h\"\n");
        let options = options_v5(&broker).unwrap();
        assert!(!options.clean_start());
        assert_eq!(options.session_expiry_interval(), Some(7200));
        assert!(options.manual_acks());

        let default = options_v5(&self::broker("protocol = \"5\"\n")).unwrap();
        assert_eq!(default.session_expiry_interval(), Some(7 * 24 * 3600));

        let clean = options_v5(&self::broker("protocol = \"5\"\nclean_session = true\n")).unwrap();
        assert!(clean.clean_start());
        assert_eq!(clean.session_expiry_interval(), Some(0));
    }

    #[test]
    fn tls_defaults_to_port_8883_and_names_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let mut broker = broker(&format!("[tls]\nca_file = \"{}\"\n", ca.display()));
        assert_eq!(broker.port(), 8883);
        assert_eq!(
            options_error(&broker),
            format!(
                "broker `b`: cannot read tls.ca_file {}: No such file or directory (os error 2); check the path and that the agent's user may read it",
                ca.display()
            )
        );
        broker.port = Some(18883);
        assert_eq!(broker.port(), 18883);
    }

    fn options_error(broker: &MqttBroker) -> String {
        match options(broker) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }
}
