//! Sparkplug B (Eclipse Sparkplug 3.0) on a subscription with `payload = "sparkplug_b"`.
//!
//! # What a subscription follows
//! Its topic filter is a whole group, `spBv1.0/<group id>/#`, or one edge node of it,
//! `spBv1.0/<group id>/+/<edge node id>/#` (`+` for any group or node): a filter for one
//! message type would get data without the births it needs, so `validate` refuses it
//! ([`check_filter`]). Host `STATE` messages and commands (`NCMD`, `DCMD`) on the same topics
//! carry no measurements and are skipped.
//!
//! # What becomes a reading
//! - NBIRTH and DBIRTH: each names its metrics, with their datatypes and (usually) an alias per
//!   metric. The decoder keeps that table per edge node and per device of it, and records the
//!   values the birth carries. An NBIRTH starts a new session of the node: its earlier devices
//!   are forgotten until their DBIRTHs, which follow.
//! - NDATA and DDATA: each metric is looked up by alias (or by name when it has no alias) in
//!   the birth of its edge node or device.
//! - The device of a reading is the edge node id for node metrics and `<edge node>/<device>`
//!   for device metrics (`press-7`, `press-7/motor-1`); the group is not part of it, so edge
//!   node ids must be unique across the groups one subscription follows (Sparkplug only keeps
//!   them unique within a group; subscribe per group when they are not).
//! - The tag is the metric name made a legal tag name ([`tag_name`]): `/` becomes `.`, other
//!   characters outside `A-Z a-z 0-9 - _ .` become `_` (`Inputs/Temperature A` →
//!   `Inputs.Temperature_A`).
//! - The value: Int8 to Int64, UInt8 to UInt64, Float and Double as numbers, Boolean as 1 or 0
//!   (`value.rs` lists the encodings accepted). Other datatypes (String, Text, UUID,
//!   DateTime, Bytes, File, DataSet, Template, arrays) and the control metrics (`bdSeq`,
//!   `Node Control/…`, `Device Control/…`) give no readings, and neither do metrics marked
//!   transient. A metric marked null gives a reading with no value and quality `bad`.
//! - The unit is the birth metric's `engUnit` property when it has one (Ignition sends it).
//! - The time is the metric's timestamp, else the payload's, else the arrival time
//!   (milliseconds since the Unix epoch on the wire).
//!
//! # Deaths: stale marks
//! NDEATH (the edge node's MQTT will) and DDEATH mark the tags of what died stale: one reading
//! per tag its birth gave, with no value and quality `bad` — the batch contract pairs a
//! missing value with `bad`, so "the last value is no longer current" reads the same in the
//! table as a device that stopped answering. An NDEATH marks the node's tags and those of all
//! its devices, at the arrival time (the will's own timestamp is from when the node
//! connected); a DDEATH marks the device's tags at its payload timestamp. An NDEATH whose
//! `bdSeq` is not that of the node's NBIRTH belongs to an earlier session and is ignored.
//! After a death, data is decoded again only after a new birth.
//!
//! # Sequence numbers
//! Every message of an edge node after its NBIRTH (its devices' too) carries `seq`, one more
//! each time, 255 wrapping to 0. A message with another `seq` than the next one is a gap:
//! messages were lost (QoS 0, a broker restart) or reordered. Gaps are counted per edge node in
//! `plantline_mqtt_sparkplug_seq_gaps_total{broker,node}` (node as `<group>/<edge node>`,
//! present at 0 from its first NBIRTH) and logged with the expected and the received value; the
//! message is still decoded. A message the broker delivers again (QoS 1 after a lost
//! acknowledgement) is decoded again and counts as a gap.
//!
//! # Problems
//! A message that cannot be decoded, or a metric of it, is a bad payload as for JSON (counted,
//! logged, dead-lettered with its reason, acknowledged after the dead letter is committed),
//! with these reasons ([`SparkplugError::reason`]): `sparkplug_topic` (not a Sparkplug topic),
//! `sparkplug_decode` (not a Sparkplug protobuf payload), `sparkplug_no_birth` (DBIRTH, data
//! or DDEATH of a node or device whose birth the decoder has not seen), `sparkplug_unknown_alias`
//! and `sparkplug_unknown_metric` (not in the birth), `sparkplug_bad_metric` (a birth metric
//! without a name or datatype, a repeated name or alias, two metrics giving one tag),
//! `sparkplug_bad_value` (a value that is not of its datatype, out of its range, or not finite)
//! and `bad_timestamp`. The good metrics of the same message are still recorded.
//!
//! # Rebirth requests
//! After an agent restart, or a sensor map edit that restarts the broker's source, the agent
//! knows no births while the edge nodes keep sending data. A message that is `sparkplug_no_birth`
//! stays a dead letter (counted, with its reason), and the agent asks its edge node for its
//! births again, as a Sparkplug host application does ([`rebirth`]): an `NCMD` to
//! `spBv1.0/<group>/NCMD/<edge node>` with `Node Control/Rebirth` = true, at QoS 0, at most once
//! per edge node every 30 s ([`REBIRTH_INTERVAL`]). The node answers with an NBIRTH and its
//! DBIRTHs, and its data is decoded from then on. `rebirth = false` on the subscription turns
//! the requests off (for a broker where only another host application may send commands); the
//! agent then waits for the node's next NBIRTH. `probe` never sends requests.
//!
//! # Not done
//! - Births are kept in memory only, not in the buffer file.
//! - Edge node quality properties (Ignition's `Quality`) are not read; the quality of a value is
//!   `good`, of a null metric or a stale mark `bad`.

mod decoder;
mod names;
mod proto;
pub mod rebirth;
mod topic;
mod value;

pub use decoder::{Decoded, Decoder, SparkplugError};
pub use names::tag_name;
pub use rebirth::REBIRTH_INTERVAL;
pub use topic::{NAMESPACE, check_filter};

#[cfg(test)]
mod tests;
