//! MQTT: JSON and plain-number messages from a broker become readings, and a QoS 1 message is
//! acknowledged to the broker only after its readings are committed to the buffer (see
//! [`client`] for the tasks and the acknowledgement order, and the agent module for the commit
//! notification). Delivery is at least once: a message whose commit or acknowledgement is lost
//! (a crash, a dropped connection) comes again and is buffered again.

pub(crate) mod check;
mod client;
pub mod payload;
pub mod topic;

pub use client::{BACKOFF_CAP, BACKOFF_START, MqttError, run_broker};
