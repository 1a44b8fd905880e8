//! What happens to a decoded value before it becomes a reading: scale and offset, the
//! engineering range, and report by exception.
//!
//! # What always holds
//! - A value outside the tag's `range` is never sent as it was read: it is clamped to the nearer
//!   limit and marked `uncertain`.
//! - Without `deadband`, `deadband_percent` and `heartbeat`, every sample is sent.
//! - With them, a reading is always sent when its quality differs from the last sent reading's
//!   (so the first bad reading after good ones, and the first good one after bad ones, always
//!   go out), when the heartbeat is due, or when the value moved past the deadband. Repeated bad
//!   readings are sent at the heartbeat only: an outage stays visible without filling the buffer.
//! - The deadband compares with the last *sent* value, not the last read one, so a slow drift
//!   is reported once it adds up to more than the deadband.
//! - A string tag's text passes unchanged (scale, offset, range and deadbands are for numbers;
//!   validation refuses them on strings). With a `heartbeat`, a string is sent when its text
//!   changes and at least every heartbeat; without one, every sample is sent.

use std::time::Duration;

use tokio::time::Instant;

use super::decode::{TagValue, apply_scale};
use crate::config::ModbusTag;
use crate::contract::Quality;

/// Scales a decoded value and checks it against the tag's engineering range.
pub fn apply(raw: f64, tag: &ModbusTag) -> (f64, Quality) {
    let value = apply_scale(raw, tag.scale, tag.offset);
    match tag.range {
        Some([min, _]) if value < min => (min, Quality::Uncertain),
        Some([_, max]) if value > max => (max, Quality::Uncertain),
        _ => (value, Quality::Good),
    }
}

/// [`apply`] for a decoded value of any kind: numbers are scaled and range-checked, a string's
/// text passes unchanged and good.
pub fn apply_value(value: TagValue, tag: &ModbusTag) -> (TagValue, Quality) {
    match value {
        TagValue::Number(raw) => {
            let (value, quality) = apply(raw, tag);
            (TagValue::Number(value), quality)
        }
        text @ TagValue::Text(_) => (text, Quality::Good),
    }
}

#[derive(Debug, Clone, Copy)]
enum Deadband {
    /// Any change at all (a heartbeat without a deadband).
    AnyChange,
    /// More than this many engineering units.
    Absolute(f64),
    /// More than this percentage of the last sent value's magnitude.
    Percent(f64),
}

#[derive(Debug, Clone)]
struct Sent {
    value: Option<TagValue>,
    quality: Quality,
    at: Instant,
}

/// Report-by-exception gate of one tag.
#[derive(Debug, Clone)]
pub struct ExceptionFilter {
    /// `None`: every sample is sent.
    deadband: Option<Deadband>,
    heartbeat: Option<Duration>,
    last: Option<Sent>,
}

impl ExceptionFilter {
    /// The gate configured by the tag's `deadband`, `deadband_percent` and `heartbeat`.
    pub fn for_tag(tag: &ModbusTag) -> Self {
        let deadband = match (tag.deadband, tag.deadband_percent, tag.heartbeat) {
            (Some(abs), _, _) => Some(Deadband::Absolute(abs)),
            (None, Some(pct), _) => Some(Deadband::Percent(pct)),
            (None, None, Some(_)) => Some(Deadband::AnyChange),
            (None, None, None) => None,
        };
        Self {
            deadband,
            heartbeat: tag.heartbeat.map(|h| h.0),
            last: None,
        }
    }

    /// Whether the gate lets every sample through (no deadband and no heartbeat): such a tag
    /// needs no gate at all.
    pub fn sends_everything(&self) -> bool {
        self.deadband.is_none()
    }

    /// Whether a numeric reading read at `now` is sent; remembers it as the last sent one if so.
    pub fn should_send(&mut self, value: Option<f64>, quality: Quality, now: Instant) -> bool {
        self.should_send_value(value.map(TagValue::Number).as_ref(), quality, now)
    }

    /// Whether a reading (number or text) read at `now` is sent; remembers it as the last sent
    /// one if so. A text counts as moved when it differs from the last sent text.
    pub fn should_send_value(
        &mut self,
        value: Option<&TagValue>,
        quality: Quality,
        now: Instant,
    ) -> bool {
        let Some(deadband) = self.deadband else {
            return true;
        };
        let send = match &self.last {
            None => true,
            Some(last) if last.quality != quality => true,
            Some(last)
                if self
                    .heartbeat
                    .is_some_and(|beat| now.duration_since(last.at) >= beat) =>
            {
                true
            }
            Some(last) => match (&last.value, value) {
                (Some(TagValue::Number(previous)), Some(TagValue::Number(value))) => {
                    moved(deadband, *previous, *value)
                }
                (Some(TagValue::Text(previous)), Some(TagValue::Text(value))) => previous != value,
                // A number where a text was (or the reverse) cannot come from one tag; send it.
                (Some(_), Some(_)) => true,
                // Both bad (no value): nothing new to say until the heartbeat.
                _ => false,
            },
        };
        if send {
            self.last = Some(Sent {
                value: value.cloned(),
                quality,
                at: now,
            });
        }
        send
    }
}

fn moved(deadband: Deadband, previous: f64, value: f64) -> bool {
    let change = (value - previous).abs();
    match deadband {
        Deadband::AnyChange => change > 0.0,
        Deadband::Absolute(limit) => change > limit,
        Deadband::Percent(percent) => change > previous.abs() * percent / 100.0,
    }
}

#[cfg(test)]
// Exact float comparisons are the point: clamping returns the configured limits as written.
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;
    use crate::config::{ConfigDuration, DataType, RegisterKind};

    fn tag() -> ModbusTag {
        ModbusTag::new("oil_temp", RegisterKind::Holding, 0, DataType::I16)
    }

    #[test]
    fn values_outside_the_range_are_clamped_and_uncertain() {
        let tag = ModbusTag {
            scale: 0.1,
            range: Some([-20.0, 150.0]),
            ..tag()
        };
        assert_eq!(apply(1000.0, &tag), (100.0, Quality::Good));
        assert_eq!(apply(1500.0, &tag), (150.0, Quality::Good));
        assert_eq!(apply(1501.0, &tag), (150.0, Quality::Uncertain));
        assert_eq!(apply(-32768.0, &tag), (-20.0, Quality::Uncertain));
        assert_eq!(apply(-32768.0, &self::tag()), (-32768.0, Quality::Good));
    }

    /// Feeds `(seconds since start, value)` samples, good when a value is given, bad otherwise,
    /// and returns the times of those that were sent.
    async fn sent(tag: &ModbusTag, samples: &[(u64, Option<f64>)]) -> Vec<u64> {
        let start = Instant::now();
        let mut filter = ExceptionFilter::for_tag(tag);
        let mut sent = Vec::new();
        for &(at, value) in samples {
            tokio::time::advance(start + Duration::from_secs(at) - Instant::now()).await;
            let quality = if value.is_some() {
                Quality::Good
            } else {
                Quality::Bad
            };
            if filter.should_send(value, quality, Instant::now()) {
                sent.push(at);
            }
        }
        sent
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_deadband_every_sample_is_sent() {
        let samples = [(0, Some(1.0)), (1, Some(1.0)), (2, None), (3, None)];
        assert_eq!(sent(&tag(), &samples).await, vec![0, 1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_absolute_deadband_sends_changes_beyond_it_and_the_heartbeat() {
        let tag = ModbusTag {
            deadband: Some(0.5),
            heartbeat: Some(ConfigDuration::from_secs(60)),
            ..tag()
        };
        let samples = [
            (0, Some(20.0)),
            (1, Some(20.5)), // exactly the deadband: not more than it
            (2, Some(20.3)),
            (3, Some(20.6)), // drifted 0.6 from the last sent 20.0
            (4, Some(20.2)),
            (5, Some(21.2)),
            (64, Some(21.2)), // 59 s after the last sent: not yet
            (65, Some(21.2)), // heartbeat
            (66, Some(21.2)),
        ];
        assert_eq!(sent(&tag, &samples).await, vec![0, 3, 5, 65]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_percent_deadband_is_relative_to_the_last_sent_value() {
        let tag = ModbusTag {
            deadband_percent: Some(10.0),
            ..tag()
        };
        let samples = [
            (0, Some(200.0)),
            (1, Some(219.0)),
            (2, Some(221.0)), // 10.5 % of 200
            (3, Some(200.0)), // 21 is 9.5 % of 221
            (4, Some(198.0)),
            (5, Some(0.0)),
            (6, Some(0.0)),
            (7, Some(0.001)), // any change from 0 is more than 10 % of 0
            (3600, Some(0.001)),
        ];
        assert_eq!(sent(&tag, &samples).await, vec![0, 2, 4, 5, 7]);
    }

    #[tokio::test(start_paused = true)]
    async fn quality_changes_are_always_sent_and_repeated_bad_waits_for_the_heartbeat() {
        let tag = ModbusTag {
            deadband: Some(100.0),
            heartbeat: Some(ConfigDuration::from_secs(10)),
            ..tag()
        };
        let samples = [
            (0, Some(5.0)),
            (1, Some(5.0)),
            (2, None), // bad after good
            (3, None),
            (11, None),
            (12, None),      // heartbeat of the outage
            (13, Some(5.0)), // first good after bad, though unchanged
            (14, Some(6.0)),
        ];
        assert_eq!(sent(&tag, &samples).await, vec![0, 2, 12, 13]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_alone_sends_every_change_and_unchanged_values_at_its_pace() {
        let tag = ModbusTag {
            heartbeat: Some(ConfigDuration::from_secs(30)),
            ..tag()
        };
        let samples = [
            (0, Some(1.0)),
            (1, Some(1.0)),
            (2, Some(0.0)),
            (3, Some(0.0)),
            (32, Some(0.0)),
            (33, Some(0.0)),
        ];
        assert_eq!(sent(&tag, &samples).await, vec![0, 2, 32]);
    }

    #[test]
    fn a_string_passes_unchanged_and_good() {
        let recipe = ModbusTag::string("recipe", RegisterKind::Holding, 0, 8);
        assert_eq!(
            apply_value(TagValue::Text("MIX-7".into()), &recipe),
            (TagValue::Text("MIX-7".into()), Quality::Good)
        );
        let scaled = ModbusTag {
            scale: 0.5,
            range: Some([0.0, 10.0]),
            ..tag()
        };
        assert_eq!(
            apply_value(TagValue::Number(30.0), &scaled),
            (TagValue::Number(10.0), Quality::Uncertain)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_string_with_a_heartbeat_is_sent_on_change_and_at_the_heartbeat() {
        let tag = ModbusTag {
            heartbeat: Some(ConfigDuration::from_secs(30)),
            ..ModbusTag::string("recipe", RegisterKind::Holding, 0, 8)
        };
        let start = Instant::now();
        let mut filter = ExceptionFilter::for_tag(&tag);
        let samples: [(u64, Option<&str>); 8] = [
            (0, Some("MIX-7")),
            (1, Some("MIX-7")),
            (2, Some("MIX-8")), // changed
            (3, Some("MIX-8")),
            (4, None), // bad: quality changed
            (5, None),
            (6, Some("MIX-8")),  // good again
            (36, Some("MIX-8")), // heartbeat
        ];
        let mut sent = Vec::new();
        for (at, text) in samples {
            tokio::time::advance(start + Duration::from_secs(at) - Instant::now()).await;
            let value = text.map(|t| TagValue::Text(t.to_owned()));
            let quality = if value.is_some() {
                Quality::Good
            } else {
                Quality::Bad
            };
            if filter.should_send_value(value.as_ref(), quality, Instant::now()) {
                sent.push(at);
            }
        }
        assert_eq!(sent, vec![0, 2, 4, 6, 36]);
        // Without a heartbeat every sample is sent, as for numbers.
        let mut every =
            ExceptionFilter::for_tag(&ModbusTag::string("recipe", RegisterKind::Holding, 0, 8));
        let same = TagValue::Text("MIX-7".into());
        assert!(every.should_send_value(Some(&same), Quality::Good, Instant::now()));
        assert!(every.should_send_value(Some(&same), Quality::Good, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_uncertain_reading_after_good_ones_is_sent() {
        let tag = ModbusTag {
            deadband: Some(100.0),
            ..tag()
        };
        let mut filter = ExceptionFilter::for_tag(&tag);
        let now = Instant::now();
        assert!(filter.should_send(Some(150.0), Quality::Good, now));
        assert!(filter.should_send(Some(150.0), Quality::Uncertain, now));
        assert!(!filter.should_send(Some(150.0), Quality::Uncertain, now));
        assert!(filter.should_send(Some(149.0), Quality::Good, now));
    }
}
