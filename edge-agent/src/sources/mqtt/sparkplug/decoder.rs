//! One `sparkplug_b` subscription's decoder: the birth certificates of the edge nodes and
//! devices it has seen, and what each message makes of them (see the module doc of
//! [`super`] for the rules a plant engineer reads).
//!
//! # What always holds
//! - Decoding never panics and never fails the source: any topic and any bytes give readings,
//!   problems (dead letters), both, or neither.
//! - A data message is decoded only against the birth of the same edge node session: an NBIRTH
//!   drops the node's device births (the node sends them again), a DEATH drops what it kills,
//!   and data without a birth is a problem, never a guess.
//! - The state lives behind a mutex that is held only while one message is decoded, never
//!   across an `.await`; the MQTT mapper is its only writer, so the lock is never contended
//!   (a probe has its own decoder).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use prost::Message as _;
use tracing::{debug, info, warn};

use super::names::tag_name;
use super::proto::{Metric, MetricValue, Payload, PropertyScalar, datatype};
use super::topic::{self, Kind, Parsed};
use super::value;
use crate::Reading;
use crate::contract::Quality;

/// The latest timestamp a reading may have: 9999-12-31T23:59:59.999Z, in milliseconds.
const MAX_TIMESTAMP_MS: u64 = 253_402_300_799_999;

/// Why (part of) a Sparkplug message gave no reading. Each names the topic; the subscription
/// is named by the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SparkplugError {
    #[error(
        "topic `{topic}` is not a Sparkplug B topic (spBv1.0/<group id>/<NBIRTH|NDATA|NDEATH|DBIRTH|DDATA|DDEATH>/<edge node id>[/<device id>])"
    )]
    Topic { topic: String },
    #[error("topic `{topic}`: the payload is not a Sparkplug B payload: {reason}")]
    Decode { topic: String, reason: String },
    #[error(
        "topic `{topic}`: {kind} of {subject} before its {birth}, so its aliases and datatypes are unknown; its messages are decoded again from its next {birth} on"
    )]
    NoBirth {
        topic: String,
        kind: &'static str,
        subject: String,
        birth: &'static str,
    },
    #[error("topic `{topic}`: alias {alias} is not in the {birth} of {subject}")]
    UnknownAlias {
        topic: String,
        alias: u64,
        subject: String,
        birth: &'static str,
    },
    #[error("topic `{topic}`: metric `{name}` is not in the {birth} of {subject}")]
    UnknownMetric {
        topic: String,
        name: String,
        subject: String,
        birth: &'static str,
    },
    #[error("topic `{topic}`: metric {metric} {problem}")]
    BadMetric {
        topic: String,
        /// `` `name` `` or `#N` (its position in the message, from 0) when it has no name.
        metric: String,
        problem: String,
    },
    #[error("topic `{topic}`: metric `{metric}` ({datatype}): {problem}")]
    BadValue {
        topic: String,
        metric: String,
        datatype: &'static str,
        problem: String,
    },
    #[error("topic `{topic}`: metric `{metric}`: timestamp {ms} ms is after the year 9999")]
    BadTimestamp {
        topic: String,
        metric: String,
        ms: u64,
    },
}

impl SparkplugError {
    /// A short, fixed code for the kind of problem: the `reason` of a dead letter and of
    /// `plantline_mqtt_bad_payloads_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Topic { .. } => "sparkplug_topic",
            Self::Decode { .. } => "sparkplug_decode",
            Self::NoBirth { .. } => "sparkplug_no_birth",
            Self::UnknownAlias { .. } => "sparkplug_unknown_alias",
            Self::UnknownMetric { .. } => "sparkplug_unknown_metric",
            Self::BadMetric { .. } => "sparkplug_bad_metric",
            Self::BadValue { .. } => "sparkplug_bad_value",
            Self::BadTimestamp { .. } => "bad_timestamp",
        }
    }

    /// Whether the message came without the birth it needs: its edge node should be asked for
    /// its births again.
    pub fn needs_birth(&self) -> bool {
        matches!(self, Self::NoBirth { .. })
    }
}

/// What one message gave: readings (values, or stale marks after a death) and problems.
#[derive(Debug, Default, PartialEq)]
pub struct Decoded {
    pub readings: Vec<Reading>,
    pub problems: Vec<SparkplugError>,
}

/// The decoder of one subscription, with the births it has seen.
#[derive(Debug)]
pub struct Decoder {
    broker: String,
    nodes: Mutex<HashMap<NodeKey, Node>>,
}

impl Clone for Decoder {
    fn clone(&self) -> Self {
        Self {
            broker: self.broker.clone(),
            nodes: Mutex::new(self.lock().clone()),
        }
    }
}

/// An edge node: its group and its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct NodeKey {
    group: String,
    node: String,
}

/// One edge node session, from its NBIRTH to its NDEATH.
#[derive(Debug, Clone, Default)]
struct Node {
    /// The `bdSeq` of the NBIRTH, to tell this session's NDEATH from a late one of an earlier.
    bd_seq: Option<u64>,
    /// The `seq` the node's next message should carry.
    next_seq: Option<u64>,
    metrics: Birth,
    /// Device id to its DBIRTH.
    devices: HashMap<String, Birth>,
}

/// The metrics of one birth certificate, by alias and by name.
#[derive(Debug, Clone, Default)]
struct Birth {
    known: Vec<Known>,
    by_alias: HashMap<u64, usize>,
    by_name: HashMap<String, usize>,
}

#[derive(Debug, Clone)]
struct Known {
    name: String,
    tag: String,
    datatype: u32,
    unit: Option<String>,
    /// Whether the metric gives readings: a number or Boolean, not a control metric.
    recorded: bool,
}

/// One message being decoded.
struct Message<'a> {
    topic: &'a str,
    kind: Kind,
    group: &'a str,
    node: &'a str,
    device: Option<&'a str>,
    payload: Payload,
    arrival_us: i64,
}

impl Message<'_> {
    fn key(&self) -> NodeKey {
        NodeKey {
            group: self.group.to_owned(),
            node: self.node.to_owned(),
        }
    }

    /// The edge node as `group/node`, as logs and metrics name it.
    fn node_label(&self) -> String {
        format!("{}/{}", self.group, self.node)
    }

    /// The device of the readings: the edge node's id, or `<node>/<device>`.
    fn reading_device(&self) -> String {
        match self.device {
            Some(device) => format!("{}/{device}", self.node),
            None => self.node.to_owned(),
        }
    }

    /// The edge node or device, in problems.
    fn subject(&self) -> String {
        match self.device {
            Some(device) => format!("device `{device}` of edge node `{}`", self.node_label()),
            None => format!("edge node `{}`", self.node_label()),
        }
    }

    fn birth_kind(&self) -> &'static str {
        if self.device.is_some() {
            "DBIRTH"
        } else {
            "NBIRTH"
        }
    }

    fn bad_metric(&self, metric: String, problem: impl Into<String>) -> SparkplugError {
        SparkplugError::BadMetric {
            topic: self.topic.to_owned(),
            metric,
            problem: problem.into(),
        }
    }

    /// The time of a reading of `metric`: its own timestamp, else the payload's, else the
    /// arrival time.
    fn timestamp_us(&self, metric: &Metric, name: &str) -> Result<i64, SparkplugError> {
        ms_to_us(metric.timestamp.or(self.payload.timestamp), self.arrival_us).map_err(|ms| {
            SparkplugError::BadTimestamp {
                topic: self.topic.to_owned(),
                metric: name.to_owned(),
                ms,
            }
        })
    }

    /// The reading of `metric`, known from the birth as `known`; `None` for a metric that
    /// gives none (a string, a control metric, a transient value).
    fn reading(&self, known: &Known, metric: &Metric) -> Result<Option<Reading>, SparkplugError> {
        if !known.recorded || metric.is_transient == Some(true) {
            return Ok(None);
        }
        let ts_us = self.timestamp_us(metric, &known.name)?;
        let value = if metric.is_null == Some(true) {
            None
        } else {
            let number = value::number(known.datatype, metric.value.as_ref()).map_err(|p| {
                SparkplugError::BadValue {
                    topic: self.topic.to_owned(),
                    metric: known.name.clone(),
                    datatype: datatype::name(known.datatype),
                    problem: p.to_string(),
                }
            })?;
            Some(number)
        };
        Ok(Some(Reading {
            ts_us,
            device: self.reading_device(),
            tag: known.tag.clone(),
            value,
            value_text: None,
            // A metric the edge node marks null has no value now: bad, as the contract pairs
            // a missing value with quality bad.
            quality: if value.is_some() {
                Quality::Good
            } else {
                Quality::Bad
            },
            unit: known.unit.clone(),
        }))
    }
}

/// Milliseconds (if any) as microseconds, else `arrival_us`; `Err(ms)` after the year 9999.
fn ms_to_us(ms: Option<u64>, arrival_us: i64) -> Result<i64, u64> {
    match ms {
        None => Ok(arrival_us),
        Some(ms) if ms <= MAX_TIMESTAMP_MS => {
            Ok(i64::try_from(ms).expect("checked against MAX_TIMESTAMP_MS") * 1000)
        }
        Some(ms) => Err(ms),
    }
}

impl Decoder {
    /// A decoder for a subscription of `broker` (the name its seq-gap counter carries).
    pub fn new(broker: &str) -> Self {
        Self {
            broker: broker.to_owned(),
            nodes: Mutex::new(HashMap::new()),
        }
    }

    /// A poisoned lock means a panic mid-message, which the decoder does not have; the births
    /// are still usable.
    fn lock(&self) -> MutexGuard<'_, HashMap<NodeKey, Node>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decodes one message that arrived at `arrival_us` (microseconds since the Unix epoch).
    pub fn decode(&self, topic: &str, bytes: &[u8], arrival_us: i64) -> Decoded {
        let mut out = Decoded::default();
        let (group, kind, node, device) = match topic::parse(topic) {
            Some(Parsed::Edge {
                group,
                kind,
                node,
                device,
            }) => (group, kind, node, device),
            Some(Parsed::NotMeasurements(what)) => {
                debug!(
                    topic,
                    "Sparkplug {what} message skipped: it carries no measurements"
                );
                return out;
            }
            None => {
                out.problems.push(SparkplugError::Topic {
                    topic: topic.to_owned(),
                });
                return out;
            }
        };
        let payload = match Payload::decode(bytes) {
            Ok(payload) => payload,
            Err(e) => {
                out.problems.push(SparkplugError::Decode {
                    topic: topic.to_owned(),
                    reason: e.to_string(),
                });
                return out;
            }
        };
        let msg = Message {
            topic,
            kind,
            group,
            node,
            device,
            payload,
            arrival_us,
        };
        let mut nodes = self.lock();
        match kind {
            Kind::NBirth => self.node_birth(&mut nodes, &msg, &mut out),
            Kind::NDeath => node_death(&mut nodes, &msg, &mut out),
            Kind::DBirth | Kind::NData | Kind::DData | Kind::DDeath => {
                let Some(node) = nodes.get_mut(&msg.key()) else {
                    out.problems.push(SparkplugError::NoBirth {
                        topic: topic.to_owned(),
                        kind: kind.as_str(),
                        subject: format!("edge node `{}`", msg.node_label()),
                        birth: "NBIRTH",
                    });
                    return out;
                };
                self.check_seq(node, &msg);
                device_message(node, &msg, &mut out);
            }
        }
        out
    }

    /// A new session of an edge node: its metrics replace the old ones, its devices are
    /// forgotten until their DBIRTHs (which follow an NBIRTH).
    fn node_birth(&self, nodes: &mut HashMap<NodeKey, Node>, msg: &Message<'_>, out: &mut Decoded) {
        let node = Node {
            bd_seq: bd_seq(&msg.payload),
            next_seq: msg.payload.seq.map(next_seq),
            metrics: birth(msg, out),
            devices: HashMap::new(),
        };
        let label = msg.node_label();
        crate::metrics::global().mqtt_sparkplug_node_born(&self.broker, &label);
        let metrics = node.metrics.known.len();
        if nodes.insert(msg.key(), node).is_some() {
            info!(
                topic = msg.topic,
                metrics, "Sparkplug edge node {label} born again"
            );
        } else {
            info!(
                topic = msg.topic,
                metrics, "Sparkplug edge node {label} born"
            );
        }
    }

    /// Counts and logs a gap in the edge node's `seq`, and expects the one after this.
    fn check_seq(&self, node: &mut Node, msg: &Message<'_>) {
        let Some(seq) = msg.payload.seq else {
            return;
        };
        if let Some(expected) = node.next_seq
            && seq != expected
        {
            let label = msg.node_label();
            crate::metrics::global().mqtt_sparkplug_seq_gap(&self.broker, &label);
            warn!(
                topic = msg.topic,
                expected,
                seq,
                "Sparkplug seq gap on edge node {label}: messages were lost or came out of order"
            );
        }
        node.next_seq = Some(next_seq(seq));
    }
}

/// The `seq` after `seq`, wrapping after 255.
fn next_seq(seq: u64) -> u64 {
    (seq % 256 + 1) % 256
}

/// The `bdSeq` metric of an NBIRTH or NDEATH.
fn bd_seq(payload: &Payload) -> Option<u64> {
    payload
        .metrics
        .iter()
        .find(|m| m.name.as_deref() == Some("bdSeq"))
        .and_then(|m| match m.value {
            Some(MetricValue::Long(v)) => Some(v),
            Some(MetricValue::Int(v)) => Some(u64::from(v)),
            _ => None,
        })
}

/// Metrics that steer the edge node rather than measure: no readings.
fn is_control(name: &str) -> bool {
    name == "bdSeq" || name.starts_with("Node Control/") || name.starts_with("Device Control/")
}

/// The `engUnit` property of a birth metric (as Ignition sends it), if it is non-empty text.
fn eng_unit(metric: &Metric) -> Option<String> {
    let properties = metric.properties.as_ref()?;
    properties
        .keys
        .iter()
        .zip(&properties.values)
        .find(|(key, _)| matches!(key.as_str(), "engUnit" | "engUnits"))
        .and_then(|(_, value)| match &value.value {
            Some(PropertyScalar::String(unit)) if !unit.trim().is_empty() => Some(unit.clone()),
            _ => None,
        })
}

/// The alias table of an NBIRTH or DBIRTH, and the readings of the values it carries.
fn birth(msg: &Message<'_>, out: &mut Decoded) -> Birth {
    let mut birth = Birth::default();
    let mut tags: HashMap<String, usize> = HashMap::new();
    for (i, metric) in msg.payload.metrics.iter().enumerate() {
        let Some(name) = metric.name.as_deref() else {
            out.problems
                .push(msg.bad_metric(format!("#{i}"), "has no name; a birth names every metric"));
            continue;
        };
        if birth.by_name.contains_key(name) {
            out.problems.push(msg.bad_metric(
                format!("`{name}`"),
                "appears twice in the birth; the first is kept",
            ));
            continue;
        }
        if let Some(alias) = metric.alias
            && let Some(&first) = birth.by_alias.get(&alias)
        {
            out.problems.push(msg.bad_metric(
                format!("`{name}`"),
                format!(
                    "has alias {alias}, which metric `{}` has already; it is left out",
                    birth.known[first].name
                ),
            ));
            continue;
        }
        let code = metric.datatype.unwrap_or(0);
        let mut recorded = datatype::is_recorded(code) && !is_control(name);
        if metric.datatype.is_none() {
            out.problems.push(msg.bad_metric(
                format!("`{name}`"),
                "has no datatype; a birth declares every metric's datatype, its values are left out",
            ));
        }
        let tag = tag_name(name);
        if recorded {
            if let Some(&first) = tags.get(&tag) {
                out.problems.push(msg.bad_metric(
                    format!("`{name}`"),
                    format!(
                        "gives tag `{tag}`, as metric `{}` does; its values are left out, rename one of them on the edge node",
                        birth.known[first].name
                    ),
                ));
                recorded = false;
            } else {
                tags.insert(tag.clone(), birth.known.len());
            }
        }
        let known = Known {
            name: name.to_owned(),
            tag,
            datatype: code,
            unit: eng_unit(metric),
            recorded,
        };
        match msg.reading(&known, metric) {
            Ok(Some(reading)) => out.readings.push(reading),
            Ok(None) => {}
            Err(e) => out.problems.push(e),
        }
        let index = birth.known.len();
        if let Some(alias) = metric.alias {
            birth.by_alias.insert(alias, index);
        }
        birth.by_name.insert(known.name.clone(), index);
        birth.known.push(known);
    }
    birth
}

/// The metrics of an NDATA or DDATA, by alias or by name.
fn data(birth: &Birth, msg: &Message<'_>, out: &mut Decoded) {
    for (i, metric) in msg.payload.metrics.iter().enumerate() {
        let by_name = || {
            metric
                .name
                .as_deref()
                .and_then(|name| birth.by_name.get(name))
        };
        let found = match (metric.alias, metric.name.as_deref()) {
            (Some(alias), _) => birth.by_alias.get(&alias).or_else(by_name).ok_or_else(|| {
                SparkplugError::UnknownAlias {
                    topic: msg.topic.to_owned(),
                    alias,
                    subject: msg.subject(),
                    birth: msg.birth_kind(),
                }
            }),
            (None, Some(name)) => by_name().ok_or_else(|| SparkplugError::UnknownMetric {
                topic: msg.topic.to_owned(),
                name: name.to_owned(),
                subject: msg.subject(),
                birth: msg.birth_kind(),
            }),
            (None, None) => Err(msg.bad_metric(format!("#{i}"), "has neither a name nor an alias")),
        };
        match found.and_then(|&index| msg.reading(&birth.known[index], metric)) {
            Ok(Some(reading)) => out.readings.push(reading),
            Ok(None) => {}
            Err(e) => out.problems.push(e),
        }
    }
}

/// DBIRTH, NDATA, DDATA or DDEATH of an edge node whose NBIRTH is known.
fn device_message(node: &mut Node, msg: &Message<'_>, out: &mut Decoded) {
    match (msg.kind, msg.device) {
        (Kind::NData, None) => data(&node.metrics, msg, out),
        (Kind::DBirth, Some(device)) => {
            let birth = birth(msg, out);
            let metrics = birth.known.len();
            if node.devices.insert(device.to_owned(), birth).is_some() {
                info!(topic = msg.topic, metrics, "Sparkplug device born again");
            } else {
                info!(topic = msg.topic, metrics, "Sparkplug device born");
            }
        }
        (Kind::DData, Some(device)) => match node.devices.get(device) {
            Some(birth) => data(birth, msg, out),
            None => out.problems.push(SparkplugError::NoBirth {
                topic: msg.topic.to_owned(),
                kind: msg.kind.as_str(),
                subject: msg.subject(),
                birth: "DBIRTH",
            }),
        },
        (Kind::DDeath, Some(device)) => {
            let Some(birth) = node.devices.remove(device) else {
                debug!(
                    topic = msg.topic,
                    "DDEATH of a device without a DBIRTH: nothing to mark"
                );
                return;
            };
            // The device's own death time, sent by its edge node; the arrival time without it.
            let ts_us = match ms_to_us(msg.payload.timestamp, msg.arrival_us) {
                Ok(ts) => ts,
                Err(ms) => {
                    out.problems.push(SparkplugError::BadTimestamp {
                        topic: msg.topic.to_owned(),
                        metric: "(payload)".to_owned(),
                        ms,
                    });
                    msg.arrival_us
                }
            };
            let before = out.readings.len();
            stale(&birth, &msg.reading_device(), ts_us, &mut out.readings);
            info!(
                topic = msg.topic,
                stale = out.readings.len() - before,
                "Sparkplug device died; its tags are marked stale (quality bad)"
            );
        }
        // `topic::parse` gives a device exactly for the device kinds.
        _ => debug!(
            topic = msg.topic,
            "message kind and topic disagree; skipped"
        ),
    }
}

/// The end of an edge node session: the node's tags and those of all its devices are marked
/// stale, unless the NDEATH belongs to an earlier session (its `bdSeq` is not the NBIRTH's).
fn node_death(nodes: &mut HashMap<NodeKey, Node>, msg: &Message<'_>, out: &mut Decoded) {
    let key = msg.key();
    let Some(node) = nodes.get(&key) else {
        debug!(
            topic = msg.topic,
            "NDEATH of an edge node without an NBIRTH: nothing to mark"
        );
        return;
    };
    if let (Some(born), Some(died)) = (node.bd_seq, bd_seq(&msg.payload))
        && born != died
    {
        info!(
            topic = msg.topic,
            birth_bd_seq = born,
            death_bd_seq = died,
            "NDEATH of an earlier session of this edge node ignored"
        );
        return;
    }
    let node = nodes.remove(&key).expect("the node was found above");
    // The NDEATH is the node's MQTT will, written when it connected: its timestamp (if any) is
    // that connect time, so the stale marks carry the time the broker announced the death.
    let ts_us = msg.arrival_us;
    stale(&node.metrics, msg.node, ts_us, &mut out.readings);
    let mut devices: Vec<(&String, &Birth)> = node.devices.iter().collect();
    devices.sort_by_key(|(device, _)| *device);
    for (device, birth) in devices {
        stale(
            birth,
            &format!("{}/{device}", msg.node),
            ts_us,
            &mut out.readings,
        );
    }
    info!(
        topic = msg.topic,
        stale = out.readings.len(),
        "Sparkplug edge node {} died; its tags and its devices' are marked stale (quality bad)",
        msg.node_label()
    );
}

/// One reading per recorded metric of `birth`: no value, quality bad.
fn stale(birth: &Birth, device: &str, ts_us: i64, readings: &mut Vec<Reading>) {
    // Recorded metrics have distinct tags: `birth` refuses a second metric with the same tag.
    readings.extend(
        birth
            .known
            .iter()
            .filter(|k| k.recorded)
            .map(|known| Reading {
                ts_us,
                device: device.to_owned(),
                tag: known.tag.clone(),
                value: None,
                value_text: None,
                quality: Quality::Bad,
                unit: known.unit.clone(),
            }),
    );
}
