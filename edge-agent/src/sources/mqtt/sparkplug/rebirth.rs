//! Rebirth requests: what a Sparkplug host application sends an edge node whose births it
//! missed, so it can decode the node's data again (Sparkplug 3.0, "Node Control/Rebirth").
//!
//! The request is an `NCMD` to `spBv1.0/<group>/NCMD/<edge node>` whose one metric
//! `Node Control/Rebirth` (Boolean) is true; the node answers with a fresh NBIRTH and the
//! DBIRTHs of its devices. The specification has commands published at QoS 0, not retained: a
//! request lost with the connection is sent again with the next undecodable message.
//!
//! # What always holds
//! - At most one request per edge node per [`REBIRTH_INTERVAL`], however many messages of it
//!   arrive without a birth: a node that is slow to answer (or never does, an edge node that
//!   does not implement rebirth) is not flooded.
//! - The bookkeeping is bounded: entries older than the interval are dropped once
//!   [`MAX_REMEMBERED`] nodes are remembered.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prost::Message as _;

use super::proto::{Metric, MetricValue, Payload, datatype};
use super::topic::{NAMESPACE, Parsed, parse};

/// The shortest time between two rebirth requests to one edge node.
pub const REBIRTH_INTERVAL: Duration = Duration::from_secs(30);
/// The metric an edge node acts on.
pub const REBIRTH_METRIC: &str = "Node Control/Rebirth";
/// How many edge nodes the limiter remembers before it forgets the ones past their interval.
const MAX_REMEMBERED: usize = 1024;

/// The `NCMD` topic that asks the edge node of `topic` (any message of the node or of one of
/// its devices) for its births; `None` for a topic that is not an edge node's.
pub fn command_topic(topic: &str) -> Option<String> {
    match parse(topic)? {
        Parsed::Edge { group, node, .. } => Some(format!("{NAMESPACE}/{group}/NCMD/{node}")),
        Parsed::NotMeasurements(_) => None,
    }
}

/// The payload of a rebirth request sent at `now_ms` (milliseconds since the Unix epoch).
pub fn request_payload(now_ms: u64) -> Vec<u8> {
    Payload {
        timestamp: Some(now_ms),
        metrics: vec![Metric {
            name: Some(REBIRTH_METRIC.to_owned()),
            alias: None,
            timestamp: Some(now_ms),
            datatype: Some(datatype::BOOLEAN),
            is_historical: None,
            is_transient: None,
            is_null: None,
            properties: None,
            value: Some(MetricValue::Boolean(true)),
        }],
        seq: None,
    }
    .encode_to_vec()
}

/// When each edge node was last asked, keyed by its `NCMD` topic.
#[derive(Debug, Default)]
pub struct Limiter {
    asked: HashMap<String, Instant>,
}

impl Limiter {
    /// Whether the node of `command` may be asked at `now`; if so, the request counts as sent.
    pub fn admit(&mut self, command: &str, now: Instant) -> bool {
        if let Some(last) = self.asked.get(command)
            && now.saturating_duration_since(*last) < REBIRTH_INTERVAL
        {
            return false;
        }
        if self.asked.len() >= MAX_REMEMBERED {
            self.asked
                .retain(|_, last| now.saturating_duration_since(*last) < REBIRTH_INTERVAL);
        }
        self.asked.insert(command.to_owned(), now);
        true
    }

    /// Forgets a request that could not be sent, so the next message asks again.
    pub fn forget(&mut self, command: &str) {
        self.asked.remove(command);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_goes_to_the_edge_node_of_any_of_its_messages() {
        assert_eq!(
            command_topic("spBv1.0/line3/NDATA/press-7").as_deref(),
            Some("spBv1.0/line3/NCMD/press-7")
        );
        assert_eq!(
            command_topic("spBv1.0/line3/DDATA/press-7/motor-1").as_deref(),
            Some("spBv1.0/line3/NCMD/press-7")
        );
        assert_eq!(command_topic("spBv1.0/line3/NCMD/press-7"), None);
        assert_eq!(command_topic("spBv1.0/STATE/scada"), None);
        assert_eq!(command_topic("plant/line3/NDATA/press-7"), None);
    }

    #[test]
    fn the_request_carries_the_rebirth_metric_set_to_true() {
        let payload = Payload::decode(request_payload(1_714_564_800_000).as_slice()).unwrap();
        assert_eq!(payload.timestamp, Some(1_714_564_800_000));
        assert_eq!(payload.seq, None);
        assert_eq!(payload.metrics.len(), 1);
        let metric = &payload.metrics[0];
        assert_eq!(metric.name.as_deref(), Some("Node Control/Rebirth"));
        assert_eq!(metric.datatype, Some(datatype::BOOLEAN));
        assert_eq!(metric.value, Some(MetricValue::Boolean(true)));
    }

    #[test]
    fn each_node_is_asked_at_most_once_per_interval() {
        let mut limiter = Limiter::default();
        let t0 = Instant::now();
        let (a, b) = ("spBv1.0/g/NCMD/a", "spBv1.0/g/NCMD/b");
        assert!(limiter.admit(a, t0));
        assert!(!limiter.admit(a, t0 + Duration::from_secs(1)));
        assert!(limiter.admit(b, t0 + Duration::from_secs(1)), "per node");
        let just_before = t0 + REBIRTH_INTERVAL.saturating_sub(Duration::from_millis(1));
        assert!(!limiter.admit(a, just_before));
        assert!(limiter.admit(a, t0 + REBIRTH_INTERVAL));
        limiter.forget(b);
        assert!(
            limiter.admit(b, t0 + Duration::from_secs(2)),
            "a request that was not sent does not count"
        );
    }

    #[test]
    fn the_limiter_forgets_old_nodes_rather_than_grow() {
        let mut limiter = Limiter::default();
        let t0 = Instant::now();
        for i in 0..MAX_REMEMBERED {
            assert!(limiter.admit(&format!("spBv1.0/g/NCMD/n{i}"), t0));
        }
        assert!(limiter.admit("spBv1.0/g/NCMD/late", t0 + REBIRTH_INTERVAL));
        assert_eq!(limiter.asked.len(), 1);
    }
}
