//! Why a tag has no value this tick.

use std::time::Duration;

use tokio_modbus::ExceptionCode;

use super::decode::DecodeError;
use crate::config::Addressing;

/// Why a tag has no value this tick.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// No connection to the device (not yet connected, or waiting to reconnect), or, on a bus,
    /// the slave is silent and waiting for its next retry.
    #[error("not connected to {device}")]
    NotConnected { device: String },
    /// The host name did not resolve, or resolved to nothing.
    #[error("cannot resolve {host}:{port}: {reason}")]
    Resolve {
        host: String,
        port: u16,
        reason: String,
    },
    /// The TCP connection could not be opened, or the serial port could not be opened.
    /// `target` names it: `10.0.0.7:502`, or `serial port /dev/ttyUSB0 (19200 8E1)`.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    /// The configured address has no wire address (0 under one-based addressing).
    #[error("{kind} {address} does not exist with addressing = \"{}\"", addressing.name())]
    NoSuchAddress {
        kind: &'static str,
        address: u16,
        addressing: Addressing,
    },
    /// The device did not answer within the configured timeout.
    #[error("no answer within {timeout:?} for {kind} {address}")]
    Timeout {
        kind: &'static str,
        address: u16,
        timeout: Duration,
    },
    /// The device answered with a Modbus exception.
    #[error("the device refused {kind} {address}: {code}")]
    Exception {
        kind: &'static str,
        address: u16,
        code: ExceptionCode,
    },
    /// The connection broke or the device answered out of protocol (one failed request fails
    /// every tag it carried, so the cause is kept as text).
    #[error("transport error reading {kind} {address}: {reason}")]
    Transport {
        kind: &'static str,
        address: u16,
        reason: String,
    },
    /// The answer arrived but could not be decoded as the configured type.
    #[error("{kind} {address}: {source}")]
    Decode {
        kind: &'static str,
        address: u16,
        source: DecodeError,
    },
}
