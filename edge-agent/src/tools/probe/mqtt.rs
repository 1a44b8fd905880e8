//! `edge-agent probe --config map.toml --mqtt BROKER`: listens to a broker of the sensor map for
//! a few seconds and prints, per message, its topic, its payload (the first 256 bytes, escaped)
//! and what the agent would make of it: one line per reading (device, tag, value, unit, time) and
//! one per problem (the bad-payload reason), exactly as the source maps it
//! ([`crate::sources::mqtt::route`]).
//!
//! # What always holds
//! - The probe never touches the agent's session: it connects with its own client id
//!   (`<client_id>-probe-<4 hex digits>`) and a clean session, subscribes at QoS 0 and sends no
//!   acknowledgement the agent's session waits for, so a running agent still gets every message.
//! - It connects as the source does ([`crate::sources::mqtt::connect`]): the broker's protocol
//!   (`protocol = "5"` speaks MQTT 5), TLS and credentials, so what the probe reaches the agent
//!   reaches too. It never publishes (no Sparkplug rebirth requests).
//! - Connecting and subscribing run under a timeout; an unreachable broker or a refused filter is
//!   an error (exit code 1), never a hang.
//! - A retained message (the broker's replay of a topic's last value on subscribe) is shown with
//!   its mapping and marked, because the agent skips it.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use super::ProbeError;
use crate::buffer::dead_letter::{PAYLOAD_BYTES, shown_payload};
use crate::buffer::format_micros;
use crate::config::{AgentConfig, ConfigDuration, MqttBroker};
use crate::sources::mqtt::route::Router;
use crate::sources::mqtt::{Connection, Happened, Message, Requests, connect};

/// How long the broker may take to accept the connection and to confirm the subscriptions.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What to listen to.
#[derive(Debug, Clone)]
pub struct MqttProbeArgs {
    /// The broker, by its `name` in the sensor map.
    pub broker: String,
    /// Only this subscription (its topic filter as written in the map); `None` for all.
    pub subscription: Option<String>,
    /// How long to listen once subscribed.
    pub listen: ConfigDuration,
    /// Stop after this many messages, if that comes first.
    pub max_messages: Option<usize>,
}

/// What a probe saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MqttProbeSummary {
    pub messages: usize,
    /// Messages with at least one bad-payload problem.
    pub bad: usize,
}

/// Listens as `args` says and hands every output line to `print` as it happens (the header,
/// two or more lines per message, and a closing line).
pub async fn probe_mqtt(
    config: &AgentConfig,
    file: &Path,
    args: &MqttProbeArgs,
    mut print: impl FnMut(&str),
) -> Result<MqttProbeSummary, ProbeError> {
    let (broker, filters) = select(config, file, args)?;
    let mqtt_config = |e: &dyn std::fmt::Display| ProbeError::MqttConfig {
        file: file.to_owned(),
        reason: e.to_string(),
    };
    let router = Router::new(broker).map_err(|e| mqtt_config(&e))?;
    let client_id = format!("{}-probe-{:04x}", broker.client_id, rand::random::<u16>());
    let mut own = broker.clone();
    own.client_id.clone_from(&client_id);
    own.clean_session = true;
    let (requests, mut connection) = connect(&own).map_err(|e| mqtt_config(&e))?;
    let unreachable = |reason: String| ProbeError::BrokerUnreachable {
        broker: broker.name.clone(),
        host: broker.host.clone(),
        port: broker.port(),
        reason,
    };

    let early = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        subscribe(&requests, &mut connection, &filters),
    )
    .await
    .map_err(|_| unreachable(format!("no answer within {}s", HANDSHAKE_TIMEOUT.as_secs())))?
    .map_err(|e| match e {
        Handshake::Failed(reason) => unreachable(reason),
        Handshake::Refused(filter) => ProbeError::SubscriptionRefused {
            broker: broker.name.clone(),
            filter,
        },
    })?;
    print(&format!(
        "listening to broker {} at {}:{} as {client_id} (MQTT {}, clean session, QoS 0) for {}: {}",
        broker.name,
        broker.host,
        broker.port(),
        broker.protocol,
        args.listen,
        filters.join(", ")
    ));

    let mut summary = MqttProbeSummary::default();
    let shown = Shown { router: &router };
    for publish in early {
        shown.message(&publish, &mut summary, &mut print);
    }
    let deadline = Instant::now() + args.listen.0;
    let mut lost = None;
    while args.max_messages.is_none_or(|max| summary.messages < max) {
        let event = tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            event = connection.next() => event,
        };
        match event {
            Ok(Happened::Message(message)) => {
                shown.message(&message, &mut summary, &mut print);
            }
            Ok(_) => {}
            Err(e) => {
                lost = Some(e.to_string());
                break;
            }
        }
    }
    if let Some(reason) = lost {
        return Err(unreachable(format!("the connection broke: {reason}")));
    }
    let _ = requests.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(event) = connection.next().await {
            if matches!(event, Happened::Closed) {
                break;
            }
        }
    })
    .await;
    let bad = if summary.bad == 0 {
        String::new()
    } else {
        format!(", {} with a bad payload", summary.bad)
    };
    let plural = if summary.messages == 1 { "" } else { "s" };
    print(&format!("{} message{plural}{bad}", summary.messages));
    Ok(summary)
}

/// The broker of the map that `args` names, and the filters to listen to.
fn select<'a>(
    config: &'a AgentConfig,
    file: &Path,
    args: &MqttProbeArgs,
) -> Result<(&'a MqttBroker, Vec<&'a str>), ProbeError> {
    let Some(broker) = config.mqtt.iter().find(|b| b.name == args.broker) else {
        return Err(ProbeError::UnknownBroker {
            file: file.to_owned(),
            broker: args.broker.clone(),
            known: config.mqtt.iter().map(|b| b.name.clone()).collect(),
        });
    };
    let topics = broker.subscriptions.iter().map(|s| s.topic.as_str());
    let filters = match &args.subscription {
        None => topics.collect(),
        Some(wanted) => {
            let Some(topic) = topics.clone().find(|t| t == wanted) else {
                return Err(ProbeError::UnknownSubscription {
                    file: file.to_owned(),
                    broker: broker.name.clone(),
                    subscription: wanted.clone(),
                    known: topics.map(str::to_owned).collect(),
                });
            };
            vec![topic]
        }
    };
    Ok((broker, filters))
}

/// Why the connection or the subscription did not come about.
enum Handshake {
    Failed(String),
    /// The broker refused this filter.
    Refused(String),
}

/// Connects and subscribes at QoS 0; returns the messages that came before the broker
/// confirmed the subscriptions, to be shown first.
async fn subscribe(
    requests: &Requests,
    connection: &mut Connection,
    filters: &[&str],
) -> Result<Vec<Message>, Handshake> {
    loop {
        match connection.next().await {
            Ok(Happened::Connected { .. }) => break,
            Ok(_) => {}
            Err(e) => return Err(Handshake::Failed(e.to_string())),
        }
    }
    let at_most_once: Vec<(String, u8)> = filters.iter().map(|f| ((*f).to_owned(), 0)).collect();
    requests
        .subscribe(&at_most_once)
        .map_err(Handshake::Failed)?;
    let mut early = Vec::new();
    loop {
        match connection.next().await {
            Ok(Happened::Subscribed { refused, .. }) => {
                return match refused {
                    Some(i) => Err(Handshake::Refused(
                        filters.get(i).copied().unwrap_or_default().to_owned(),
                    )),
                    None => Ok(early),
                };
            }
            Ok(Happened::Message(message)) => early.push(message),
            Ok(_) => {}
            Err(e) => return Err(Handshake::Failed(e.to_string())),
        }
    }
}

/// How messages are shown: through the broker's own routes and mappings.
struct Shown<'a> {
    router: &'a Router,
}

impl Shown<'_> {
    /// Prints one message: its topic and payload, then a line per reading and per problem.
    fn message(
        &self,
        publish: &Message,
        summary: &mut MqttProbeSummary,
        print: &mut impl FnMut(&str),
    ) {
        summary.messages += 1;
        let arrival_us = now_us();
        let head = &publish.payload[..publish.payload.len().min(PAYLOAD_BYTES)];
        print(&format!(
            "{}  {}",
            publish.topic,
            shown_payload(
                head,
                u64::try_from(publish.payload.len()).unwrap_or(u64::MAX)
            )
        ));
        let Some((_, route)) = self.router.route(&publish.topic) else {
            print("  -> no subscription of the map matches this topic");
            return;
        };
        let mapped = route.map(&publish.topic, &publish.payload, arrival_us);
        for r in &mapped.readings {
            // Per reading: a Sparkplug metric without a timestamp takes the arrival time too.
            let arrival = if r.ts_us == arrival_us {
                " (arrival time)"
            } else {
                ""
            };
            let value = match (&r.value, &r.value_text) {
                (Some(v), _) => v.to_string(),
                (None, Some(text)) => format!("{text:?}"),
                (None, None) => "none".to_owned(),
            };
            let unit = r
                .unit
                .as_ref()
                .map_or_else(String::new, |u| format!(" {u}"));
            print(&format!(
                "  -> {} {} = {value}{unit} at {}{arrival}",
                r.device,
                r.tag,
                format_micros(r.ts_us)
            ));
        }
        if !mapped.problems.is_empty() {
            summary.bad += 1;
        }
        for problem in &mapped.problems {
            print(&format!(
                "  -> bad payload ({}): {problem}",
                problem.reason()
            ));
        }
        if publish.retain {
            print(
                "  (retained: the broker replays this last value on subscribe; the agent skips it)",
            );
        }
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
