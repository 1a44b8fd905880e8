//! MQTT: JSON, plain-number and Sparkplug B ([`sparkplug`]) messages from a broker become
//! readings, and a QoS 1 message is acknowledged to the broker only after its readings are
//! committed to the buffer (see [`client`] for the tasks and the acknowledgement order, and the
//! agent module for the commit notification). Delivery is at least once: a message whose
//! commit or acknowledgement is lost (a crash, a dropped connection) comes again and is
//! buffered again.
//!
//! # Protocols and TLS
//! A broker speaks MQTT 3.1.1 or MQTT 5 (`protocol`), over TCP or TLS (`[mqtt.tls]`, see
//! [`tls`]). Only [`connection`] knows which: the tasks of [`client`] and the routing of
//! [`route`] are the same for both, and so are the guarantees (manual acknowledgements after
//! the commit, a persistent session, the subscriptions sent again after every connect).
//!
//! # Bad payloads
//! A message whose payload gives no reading, or not all of them (not JSON, not UTF-8 text, not a
//! number, a missing field, a value that is not numeric (or, for `type = "string"`, not
//! text) or not finite, a bad timestamp, an empty
//! device or tag name), is
//! - counted in `plantline_mqtt_bad_payloads_total{broker, subscription, reason}`, where
//!   `reason` is the code of its first problem ([`payload::PayloadError::reason`]: `not_json`,
//!   `not_text`, `not_a_number`, `missing_field`, `not_numeric`, `not_string` (a `type =
//!   "string"` value that is null, an object or an array), `not_finite`, `bad_timestamp`,
//!   `empty_name`, `topic_level`, and for Sparkplug B the `sparkplug_…` codes of
//!   [`sparkplug::SparkplugError::reason`]);
//! - logged as `bad payload`, one line per problem;
//! - kept as one row in the buffer's dead-letter table ([`crate::buffer::dead_letter`]): time,
//!   broker, subscription, topic, reason, every problem in words, and the first 256 bytes of the
//!   payload. Each broker keeps at most `max_dead_letters` rows (1000 by default); older ones are
//!   dropped and counted in `plantline_mqtt_dead_letters_dropped_total{broker}`;
//! - acknowledged in its turn, but only after its dead-letter row (and its good readings, for a
//!   multi-field message) are committed, so a `kill -9` either leaves the row or leaves the
//!   message with the broker. A bad payload never stops the source; a dead-letter table that
//!   cannot be written holds the acknowledgements, as a buffer that cannot be written does.
//!
//! `edge-agent probe --mqtt` ([`crate::tools::probe`]) takes messages through the same
//! [`route::Router`] and shows what this source would record or refuse.

pub(crate) mod check;
mod client;
mod connection;
mod dead_letters;
pub mod payload;
pub mod route;
pub mod sparkplug;
mod tls;
pub mod topic;

pub use client::{BACKOFF_CAP, BACKOFF_START, MqttError, run_broker};
pub(crate) use connection::{Connection, Happened, Message, Requests, connect};
pub use tls::TlsError;
