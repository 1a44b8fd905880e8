//! Which subscription a message belongs to and what that subscription's mapping makes of it:
//! the one path both the source and `edge-agent probe --mqtt` take a message through, so the
//! probe shows exactly what the agent would record (or refuse). A `sparkplug_b` subscription
//! goes to its [`Decoder`], which keeps the edge nodes' births between messages (each router
//! has its own, so a probe never shares the agent's).

use super::client::MqttError;
use super::payload::{Mapped, Mapping, PayloadError};
use super::sparkplug::Decoder;
use crate::buffer::dead_letter::DeadLetter;
use crate::config::{MqttBroker, PayloadFormat};

/// One subscription with its mapping.
#[derive(Debug, Clone)]
pub struct Route {
    /// The subscription's topic filter, as in the config.
    pub filter: String,
    decode: Decode,
    /// Whether edge nodes whose births are missing are asked for them (`sparkplug_b` only).
    rebirth: bool,
}

/// How a subscription's messages become readings.
#[derive(Debug, Clone)]
enum Decode {
    /// `json` and `number` payloads, mapped one message at a time.
    Mapping(Mapping),
    /// `sparkplug_b`, decoded against the births seen before.
    Sparkplug(Decoder),
}

/// The subscriptions of one broker, in config order.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// The mappings of every subscription of `broker`; fails only on a config that did not pass
    /// validation.
    pub fn new(broker: &MqttBroker) -> Result<Self, MqttError> {
        let routes = broker
            .subscriptions
            .iter()
            .enumerate()
            .map(|(index, s)| {
                let decode = match s.payload {
                    PayloadFormat::SparkplugB => Decode::Sparkplug(Decoder::new(&broker.name)),
                    PayloadFormat::Json | PayloadFormat::Number => {
                        Decode::Mapping(Mapping::new(s).map_err(|source| MqttError::Mapping {
                            broker: broker.name.clone(),
                            index,
                            filter: s.topic.clone(),
                            source: Box::new(source),
                        })?)
                    }
                };
                Ok(Route {
                    filter: s.topic.clone(),
                    rebirth: matches!(decode, Decode::Sparkplug(_)) && s.rebirth.unwrap_or(true),
                    decode,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { routes })
    }

    /// The subscriptions, in config order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The subscription a message on `topic` belongs to, with its index. Validation keeps the
    /// filters of one broker disjoint, so at most one matches.
    pub fn route(&self, topic: &str) -> Option<(usize, &Route)> {
        self.routes
            .iter()
            .enumerate()
            .find(|(_, r)| super::topic::matches(&r.filter, topic))
    }
}

impl Route {
    /// The readings of one message that arrived at `arrival_us`, and its problems.
    pub fn map(&self, topic: &str, payload: &[u8], arrival_us: i64) -> Mapped {
        match &self.decode {
            Decode::Mapping(mapping) => mapping.map(topic, payload, arrival_us),
            Decode::Sparkplug(decoder) => {
                let message = decoder.decode(topic, payload, arrival_us);
                Mapped {
                    readings: message.readings,
                    problems: message.problems.into_iter().map(Into::into).collect(),
                }
            }
        }
    }

    /// The `NCMD` topic to ask for the births that a message on `topic` lacked (its `problems`
    /// say so), when the subscription asks for rebirths; `None` otherwise.
    pub fn rebirth_command(&self, topic: &str, problems: &[PayloadError]) -> Option<String> {
        let lacks_birth = problems
            .iter()
            .any(|p| matches!(p, PayloadError::Sparkplug(e) if e.needs_birth()));
        if self.rebirth && lacks_birth {
            super::sparkplug::rebirth::command_topic(topic)
        } else {
            None
        }
    }

    /// The dead letter of a message whose mapping had `problems` (at least one): its reason is
    /// the first problem's code, its detail every problem in words.
    pub fn dead_letter(
        &self,
        broker: &str,
        topic: &str,
        payload: &[u8],
        received_us: i64,
        problems: &[PayloadError],
    ) -> DeadLetter {
        let reason = problems.first().map_or("unknown", PayloadError::reason);
        let detail = problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        DeadLetter::new(
            received_us,
            broker,
            &self.filter,
            topic,
            reason,
            detail,
            payload,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker() -> MqttBroker {
        toml::from_str(
            r#"
name = "b"
host = "127.0.0.1"
client_id = "gw"
[[subscriptions]]
topic = "meters/+/kwh"
payload = "number"
device = "{1}"
tag = "energy"
[[subscriptions]]
topic = "rooms/+/climate"
device = "room-{1}"
[[subscriptions.fields]]
tag = "temp"
value = "/t"
[[subscriptions.fields]]
tag = "rh"
value = "/h"
"#,
        )
        .unwrap()
    }

    #[test]
    fn a_message_goes_to_the_subscription_whose_filter_matches() {
        let router = Router::new(&broker()).unwrap();
        assert_eq!(router.route("rooms/4/climate").unwrap().0, 1);
        assert_eq!(router.route("meters/m-1/kwh").unwrap().0, 0);
        assert!(router.route("meters/m-1/kwh/extra").is_none());
    }

    #[test]
    fn sparkplug_data_without_a_birth_asks_its_edge_node_unless_turned_off() {
        let config = |extra: &str| -> MqttBroker {
            toml::from_str(&format!(
                "name = \"b\"\nhost = \"127.0.0.1\"\nclient_id = \"gw\"\n[[subscriptions]]\ntopic = \"spBv1.0/line3/#\"\npayload = \"sparkplug_b\"\n{extra}"
            ))
            .unwrap()
        };
        // An NDATA with no metrics: a valid (empty) protobuf payload.
        let topic = "spBv1.0/line3/DDATA/press-7/motor-1";
        let router = Router::new(&config("")).unwrap();
        let (_, route) = router.route(topic).unwrap();
        let mapped = route.map(topic, b"", 7);
        assert_eq!(mapped.problems[0].reason(), "sparkplug_no_birth");
        assert_eq!(
            route.rebirth_command(topic, &mapped.problems).as_deref(),
            Some("spBv1.0/line3/NCMD/press-7")
        );
        let bad = route.map("spBv1.0/line3/NDATA/press-7", b"\x0a\x05\xff", 7);
        assert_eq!(
            route.rebirth_command("spBv1.0/line3/NDATA/press-7", &bad.problems),
            None,
            "a broken payload is no reason to ask for births"
        );

        let off = Router::new(&config("rebirth = false")).unwrap();
        let (_, route) = off.route(topic).unwrap();
        let mapped = route.map(topic, b"", 7);
        assert_eq!(route.rebirth_command(topic, &mapped.problems), None);

        let json = Router::new(&broker()).unwrap();
        let (_, route) = json.route("rooms/4/climate").unwrap();
        assert_eq!(route.rebirth_command("rooms/4/climate", &[]), None);
    }

    #[test]
    fn a_dead_letter_names_the_first_reason_and_every_problem() {
        let router = Router::new(&broker()).unwrap();
        let (_, route) = router.route("rooms/4/climate").unwrap();
        let payload = br#"{"t": "warm"}"#;
        let mapped = route.map("rooms/4/climate", payload, 7);
        assert!(mapped.readings.is_empty());
        let letter = route.dead_letter("b", "rooms/4/climate", payload, 7, &mapped.problems);
        assert_eq!(
            letter,
            DeadLetter {
                received_us: 7,
                broker: "b".into(),
                subscription: "rooms/+/climate".into(),
                topic: "rooms/4/climate".into(),
                reason: "not_numeric".into(),
                detail: "topic `rooms/4/climate`: the value at `/t` is `\"warm\"`, not a number; topic `rooms/4/climate`: no value at JSON pointer `/h`".into(),
                payload_len: 13,
                payload: payload.to_vec(),
            }
        );
    }
}
