//! One polling task per Modbus TCP device.
//!
//! # What always holds
//! - Every poll tick reads every tag once. Without report by exception (the default) every tick
//!   yields exactly one reading per tag, good, uncertain or bad: while the device is unreachable
//!   its tags are reported `bad` at the poll rate, so an outage is visible in the data, not only
//!   in the logs. A tag with a deadband or heartbeat sends what [`ExceptionFilter`] lets
//!   through, which always includes quality changes.
//! - Addresses are converted to wire addresses here, once, by the device's `addressing`; errors
//!   and logs name the address as the sensor map wrote it.
//! - A Modbus exception or an undecodable answer makes that tag's reading `bad`; the other tags
//!   and the connection are unaffected.
//! - After a timeout, a transport error or a garbled answer the connection is dropped, because a
//!   late or partial response would otherwise be taken as the answer to the next request. New
//!   connection attempts back off exponentially with jitter (500 ms up to 30 s) until a request
//!   is answered again.
//! - Every network call runs under the device's `timeout`, and every wait also watches the
//!   shutdown token.
//! - Logs are written on state changes only (connected, lost, tag failing, tag recovered), so a
//!   dead device does not flood the journal.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_modbus::client::{Client, Context};
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::decode::{self, DecodeError};
use super::transform::{self, ExceptionFilter};
use crate::Reading;
use crate::config::{Addressing, ModbusDevice, ModbusTag, RegisterKind};
use crate::contract::Quality;

/// First reconnect delay after a failure.
pub const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest reconnect delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Why a tag has no value this tick.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// No connection to the device (not yet connected, or waiting to reconnect).
    #[error("not connected to {device}")]
    NotConnected { device: String },
    /// The host name did not resolve, or resolved to nothing.
    #[error("cannot resolve {host}:{port}: {reason}")]
    Resolve {
        host: String,
        port: u16,
        reason: String,
    },
    /// The TCP connection could not be opened.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
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
    /// The connection broke or the device answered out of protocol.
    #[error("transport error reading {kind} {address}: {source}")]
    Transport {
        kind: &'static str,
        address: u16,
        source: tokio_modbus::Error,
    },
    /// The answer arrived but could not be decoded as the configured type.
    #[error("{kind} {address}: {source}")]
    Decode {
        kind: &'static str,
        address: u16,
        source: DecodeError,
    },
}

impl PollError {
    /// Whether the connection must be dropped: after these the request/response stream can no
    /// longer be trusted to be in step.
    fn breaks_connection(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::Transport { .. })
    }
}

/// Capped exponential backoff with "equal jitter": each delay is drawn from the upper half of the
/// current step, so gateways restarted together do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    step: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self {
            step: BACKOFF_START,
        }
    }

    /// The delay before the next attempt; doubles the step for the attempt after.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(BACKOFF_CAP);
        let half = u64::try_from(step.as_millis() / 2).unwrap_or(u64::MAX);
        Duration::from_millis(half + rand::random_range(0..=half))
    }

    pub(crate) fn reset(&mut self) {
        self.step = BACKOFF_START;
    }
}

/// Polls one device until `shutdown` is cancelled or the receiver of `tx` is gone.
pub async fn run_device(
    device: ModbusDevice,
    tx: mpsc::Sender<Reading>,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!("source", component = "modbus", device = %device.name);
    DevicePoller::new(device, tx, shutdown)
        .run()
        .instrument(span)
        .await;
}

/// The device's link as last logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// No attempt made yet.
    Starting,
    Up,
    Down,
}

struct DevicePoller {
    device: ModbusDevice,
    tx: mpsc::Sender<Reading>,
    shutdown: CancellationToken,
    conn: Option<Context>,
    link: Link,
    backoff: Backoff,
    /// No connection attempt before this instant.
    retry_at: Instant,
    /// Whether each tag's last reading was good, to log changes only.
    tag_good: Vec<Option<bool>>,
    /// Each tag's report-by-exception gate.
    filters: Vec<ExceptionFilter>,
}

impl DevicePoller {
    fn new(device: ModbusDevice, tx: mpsc::Sender<Reading>, shutdown: CancellationToken) -> Self {
        let tags = device.tags.len();
        let filters = device.tags.iter().map(ExceptionFilter::for_tag).collect();
        Self {
            device,
            tx,
            shutdown,
            conn: None,
            link: Link::Starting,
            backoff: Backoff::new(),
            retry_at: Instant::now(),
            tag_good: vec![None; tags],
            filters,
        }
    }

    async fn run(mut self) {
        tracing::info!(
            host = %self.device.host,
            port = self.device.port,
            unit_id = self.device.unit_id,
            tags = self.device.tags.len(),
            poll_interval = %self.device.poll_interval,
            "polling device"
        );
        let mut ticker = tokio::time::interval(self.device.poll_interval.0);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            if !self.poll_once().await {
                break;
            }
        }
        if let Some(mut conn) = self.conn.take() {
            // Closing politely frees the PLC's connection slot at once instead of at its idle
            // timeout; a PLC that does not answer the close is not waited for long.
            let _ = tokio::time::timeout(self.device.timeout.0, conn.disconnect()).await;
        }
        tracing::info!("stopped polling device");
    }

    /// Reads every tag once and sends the readings. Returns false when the task must stop.
    async fn poll_once(&mut self) -> bool {
        let ts_us = wall_clock_us();
        if self.conn.is_none() && Instant::now() >= self.retry_at {
            let connected = tokio::select! {
                () = self.shutdown.cancelled() => return false,
                result = connect(&self.device) => result,
            };
            match connected {
                Ok(conn) => {
                    self.conn = Some(conn);
                    if self.link != Link::Up {
                        tracing::info!("connected");
                    }
                    self.link = Link::Up;
                }
                Err(err) => self.connection_failed(&err),
            }
        }
        for index in 0..self.device.tags.len() {
            let result = match self.conn.as_mut() {
                Some(conn) => {
                    let tag = &self.device.tags[index];
                    let read = read_tag(conn, tag, self.device.addressing, self.device.timeout.0);
                    tokio::select! {
                        () = self.shutdown.cancelled() => return false,
                        result = read => result,
                    }
                }
                None => Err(PollError::NotConnected {
                    device: self.device.name.clone(),
                }),
            };
            match &result {
                Ok(_)
                | Err(
                    PollError::Exception { .. }
                    | PollError::Decode { .. }
                    | PollError::NoSuchAddress { .. },
                ) => {
                    // The device answered: the link works, whatever the answer was.
                    self.backoff.reset();
                }
                Err(err) if err.breaks_connection() => {
                    self.conn = None;
                    self.connection_failed(err);
                }
                Err(_) => {}
            }
            let Some(reading) = self.reading(index, ts_us, &result) else {
                continue;
            };
            tokio::select! {
                () = self.shutdown.cancelled() => return false,
                sent = self.tx.send(reading) => if sent.is_err() {
                    tracing::debug!("reading receiver closed");
                    return false;
                },
            }
        }
        true
    }

    fn connection_failed(&mut self, err: &PollError) {
        let delay = self.backoff.next_delay();
        self.retry_at = Instant::now() + delay;
        if self.link == Link::Down {
            tracing::debug!(error = %err, retry_in = ?delay, "still unreachable");
        } else {
            tracing::warn!(error = %err, retry_in = ?delay, "device unreachable; its tags read bad until it answers again");
        }
        self.link = Link::Down;
    }

    /// The reading of one tag this tick, or `None` when report by exception holds it back.
    fn reading(
        &mut self,
        index: usize,
        ts_us: i64,
        result: &Result<(f64, Quality), PollError>,
    ) -> Option<Reading> {
        let tag = &self.device.tags[index];
        // While the device is down the link warning covers every tag, and a tag's own state is
        // left as it was: reconnecting does not log every tag "good again".
        if !matches!(result, Err(PollError::NotConnected { .. })) {
            let was_good = self.tag_good[index].replace(result.is_ok());
            match (result, was_good) {
                (Err(err), Some(true) | None) => {
                    tracing::warn!(tag = %tag.name, error = %err, "tag reads bad");
                }
                (Ok(_), Some(false)) => tracing::info!(tag = %tag.name, "tag reads good again"),
                _ => {}
            }
        }
        let (value, quality) = match result {
            Ok((value, quality)) => (Some(*value), *quality),
            Err(_) => (None, Quality::Bad),
        };
        if !self.filters[index].should_send(value, quality, Instant::now()) {
            return None;
        }
        Some(Reading {
            ts_us,
            device: self.device.name.clone(),
            tag: tag.name.clone(),
            value,
            quality,
            unit: tag.unit.clone(),
        })
    }
}

/// Resolves the device's host and opens the TCP connection, both under the device's timeout.
async fn connect(device: &ModbusDevice) -> Result<Context, PollError> {
    let timeout = device.timeout.0;
    let host = device.host.as_str();
    let port = device.port;
    let resolve_error = |reason: String| PollError::Resolve {
        host: host.to_owned(),
        port,
        reason,
    };
    let addr = match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
        Err(_) => return Err(resolve_error(format!("no answer within {timeout:?}"))),
        Ok(Err(err)) => return Err(resolve_error(err.to_string())),
        Ok(Ok(mut addrs)) => addrs
            .next()
            .ok_or_else(|| resolve_error("no address".to_owned()))?,
    };
    let slave = Slave(device.unit_id);
    match tokio::time::timeout(
        timeout,
        tokio_modbus::client::tcp::connect_slave(addr, slave),
    )
    .await
    {
        Err(_) => Err(PollError::Connect {
            addr,
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ),
        }),
        Ok(Err(source)) => Err(PollError::Connect { addr, source }),
        Ok(Ok(conn)) => Ok(conn),
    }
}

/// The table's name in errors and logs, followed by the address.
fn kind_name(kind: RegisterKind) -> &'static str {
    match kind {
        RegisterKind::Coil => "coil",
        RegisterKind::Discrete => "discrete input",
        RegisterKind::Holding => "holding register",
        RegisterKind::Input => "input register",
    }
}

/// Reads, decodes and transforms one tag with one request: the value after scale, offset and
/// range, and its quality (`uncertain` when the range clamped it).
async fn read_tag(
    conn: &mut Context,
    tag: &ModbusTag,
    addressing: Addressing,
    timeout: Duration,
) -> Result<(f64, Quality), PollError> {
    let kind = kind_name(tag.register);
    let address = tag.address;
    let Some(wire) = addressing.wire_address(address) else {
        return Err(PollError::NoSuchAddress {
            kind,
            address,
            addressing,
        });
    };
    let count = tag.data_type.register_count();
    let request = match tag.register {
        RegisterKind::Coil => Request::ReadCoils(wire, count),
        RegisterKind::Discrete => Request::ReadDiscreteInputs(wire, count),
        RegisterKind::Holding => Request::ReadHoldingRegisters(wire, count),
        RegisterKind::Input => Request::ReadInputRegisters(wire, count),
    };
    // `Client::call` rather than `Reader::read_*`: those assert the register count in debug
    // builds, and a device that sends a short answer must not crash the agent.
    let response = match tokio::time::timeout(timeout, conn.call(request)).await {
        Err(_) => {
            return Err(PollError::Timeout {
                kind,
                address,
                timeout,
            });
        }
        Ok(Err(source)) => {
            return Err(PollError::Transport {
                kind,
                address,
                source,
            });
        }
        Ok(Ok(Err(code))) => {
            return Err(PollError::Exception {
                kind,
                address,
                code,
            });
        }
        Ok(Ok(Ok(response))) => response,
    };
    let decoded = match response {
        Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words) => {
            decode::decode_words(&words, tag.data_type, tag.bit, tag.byte_order)
        }
        Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits) => {
            decode::decode_bits(&bits, tag.data_type)
        }
        // The client already refuses answers with another function code; should a future
        // version not, a mismatched answer still only costs this reading.
        other => {
            return Err(PollError::Transport {
                kind,
                address,
                source: tokio_modbus::Error::Transport(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("a read was answered with {other:?}"),
                )),
            });
        }
    };
    decoded
        .map(|raw| transform::apply(raw, tag))
        .map_err(|source| PollError::Decode {
            kind,
            address,
            source,
        })
}

fn wall_clock_us() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new();
        let mut step = BACKOFF_START;
        for _ in 0..12 {
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} for step {step:?}"
            );
            step = (step * 2).min(BACKOFF_CAP);
        }
        assert_eq!(step, BACKOFF_CAP);
        backoff.reset();
        let delay = backoff.next_delay();
        assert!(delay >= Duration::from_millis(250) && delay <= BACKOFF_START);
    }
}
