//! One polling task per Modbus TCP device.
//!
//! # What always holds
//! - Every poll tick reads every tag once, with the requests of the device's read plan
//!   ([`super::plan`]): neighbouring tags of one table share a request. Readings are sent in
//!   the sensor map's tag order, whatever the plan.
//! - A request refused with exception 2 (illegal data address) is split in halves and retried,
//!   down to single tags, within the same tick; the plan then remembers what the device taught
//!   (a tag it refuses alone is read alone; registers between two answered halves are not
//!   asked for again), so the next tick sends the learned plan. Any other exception makes the
//!   tags of that request `bad` and is not retried.
//! - The first tick of a device comes a deterministic offset (from its name) into its poll
//!   interval, so the devices of a gateway are not all asked at the same instant.
//! - Without report by exception (the default) every tick yields exactly one reading per tag, good, uncertain or bad: while the device is unreachable
//!   its tags are reported `bad` at the poll rate, so an outage is visible in the data, not only
//!   in the logs. A tag with a deadband or heartbeat sends what [`ExceptionFilter`] lets
//!   through, which always includes quality changes.
//! - Addresses are converted to wire addresses here, once, by the device's `addressing`; errors
//!   and logs name the address as the sensor map wrote it.
//! - A Modbus exception makes the readings of that request's tags `bad`, an undecodable value
//!   that tag's reading; the other requests and the connection are unaffected.
//! - After a timeout, a transport error or a garbled answer the connection is dropped, because a
//!   late or partial response would otherwise be taken as the answer to the next request. New
//!   connection attempts back off exponentially with jitter (500 ms up to 30 s) until a request
//!   is answered again.
//! - Every network call runs under the device's `timeout`, and every wait also watches the
//!   shutdown token.
//! - Logs are written on state changes only (connected, lost, tag failing, tag recovered, plan
//!   learned), so a dead device does not flood the journal.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_modbus::client::{Client, Context};
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::decode::{self, DecodeError};
use super::plan::{PlannedRequest, Planner, TagSpan};
use super::transform::{self, ExceptionFilter};
use crate::Reading;
use crate::config::{Addressing, ModbusDevice, RegisterKind};
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

impl PollError {}

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

/// Where in its poll interval a device's ticks fall: a hash of its name (FNV-1a, stable across
/// builds and restarts, unlike std's hasher) modulo the interval. Devices of one gateway spread
/// over the interval instead of all being asked at the same instant, and a device keeps its
/// slot across restarts, which keeps its samples evenly spaced in the data.
pub fn stagger_offset(device: &str, interval: Duration) -> Duration {
    let hash = device
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    let nanos = interval.as_nanos();
    if nanos == 0 {
        return Duration::ZERO;
    }
    let offset = u128::from(hash) % nanos;
    // Below the interval, which is a Duration itself, so it fits.
    Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX))
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

type TagResult = Result<(f64, Quality), PollError>;

/// What a request's answer carries.
enum Answer {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

/// A request refused with "illegal data address" and the two halves it was retried as.
struct Split {
    refused: Vec<usize>,
    left: Vec<usize>,
    right: Vec<usize>,
}

/// Why a request has no answer.
enum CallError {
    Exception(ExceptionCode),
    Timeout,
    Transport(String),
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
    /// The requests of one tick, and the holes learned from the device.
    planner: Planner,
    /// Each tag's first wire address; `None` when its address does not exist under the
    /// device's addressing (such a tag reads bad every tick and is never asked for).
    wire: Vec<Option<u16>>,
}

impl DevicePoller {
    fn new(device: ModbusDevice, tx: mpsc::Sender<Reading>, shutdown: CancellationToken) -> Self {
        let tags = device.tags.len();
        let filters = device.tags.iter().map(ExceptionFilter::for_tag).collect();
        let wire: Vec<Option<u16>> = device
            .tags
            .iter()
            .map(|tag| device.addressing.wire_address(tag.address))
            .collect();
        let spans = device
            .tags
            .iter()
            .zip(&wire)
            .enumerate()
            .filter_map(|(index, (tag, wire))| {
                wire.map(|start| TagSpan {
                    tag: index,
                    kind: tag.register,
                    start,
                    count: tag.data_type.register_count(),
                })
            })
            .collect();
        let planner = Planner::new(spans, device.max_gap);
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
            planner,
            wire,
        }
    }

    async fn run(mut self) {
        let interval = self.device.poll_interval.0;
        let offset = stagger_offset(&self.device.name, interval);
        tracing::info!(
            host = %self.device.host,
            port = self.device.port,
            unit_id = self.device.unit_id,
            tags = self.device.tags.len(),
            requests = self.planner.requests().len(),
            poll_interval = %self.device.poll_interval,
            offset = ?offset,
            "polling device"
        );
        let mut ticker = tokio::time::interval_at(Instant::now() + offset, interval);
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
                Err(err) => {
                    crate::metrics::global().modbus_error(&self.device.name, &err);
                    self.connection_failed(&err);
                }
            }
        }
        let Some(mut results) = self.read_all().await else {
            return false;
        };
        for (index, result) in results.iter_mut().enumerate() {
            // Every tag is either planned or unaddressable, so each has a result; should one
            // not, it reads bad rather than silently missing from the tick.
            let result = result.take().unwrap_or_else(|| {
                Err(PollError::NotConnected {
                    device: self.device.name.clone(),
                })
            });
            if let Err(err) = &result {
                crate::metrics::global().modbus_error(&self.device.name, err);
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

    /// Sends the tick's requests, splitting those refused with "illegal data address", and
    /// learns from the answers. Returns each tag's result, or `None` on shutdown.
    async fn read_all(&mut self) -> Option<Vec<Option<TagResult>>> {
        let mut results: Vec<Option<TagResult>> =
            (0..self.device.tags.len()).map(|_| None).collect();
        for (index, wire) in self.wire.iter().enumerate() {
            if wire.is_none() {
                let tag = &self.device.tags[index];
                results[index] = Some(Err(PollError::NoSuchAddress {
                    kind: kind_name(tag.register),
                    address: tag.address,
                    addressing: self.device.addressing,
                }));
            }
        }
        // A stack, so the halves of a split request are read next, first half first.
        let mut pending: Vec<PlannedRequest> =
            self.planner.requests().iter().rev().cloned().collect();
        let mut splits: Vec<Split> = Vec::new();
        let mut isolate = Vec::new();
        let mut restore = Vec::new();
        while let Some(request) = pending.pop() {
            let Some(conn) = self.conn.as_mut() else {
                for &tag in &request.tags {
                    results[tag] = Some(Err(PollError::NotConnected {
                        device: self.device.name.clone(),
                    }));
                }
                continue;
            };
            let call = call(conn, &request, self.device.timeout.0);
            let outcome = tokio::select! {
                () = self.shutdown.cancelled() => return None,
                outcome = call => outcome,
            };
            match outcome {
                Ok(answer) => {
                    // The device answered: the link works, whatever the answer was.
                    self.backoff.reset();
                    for &tag in &request.tags {
                        results[tag] = Some(self.tag_value(tag, &request, &answer));
                    }
                    if let [tag] = request.tags[..]
                        && self.planner.is_isolated(tag)
                    {
                        restore.push(tag);
                    }
                }
                Err(CallError::Exception(code)) => {
                    self.backoff.reset();
                    if code == ExceptionCode::IllegalDataAddress {
                        if let Some((left, right)) = self.planner.split(&request) {
                            splits.push(Split {
                                refused: request.tags.clone(),
                                left: left.tags.clone(),
                                right: right.tags.clone(),
                            });
                            pending.push(right);
                            pending.push(left);
                            continue;
                        }
                        isolate.extend(request.tags.iter().copied());
                    }
                    let failure = CallError::Exception(code);
                    for &tag in &request.tags {
                        results[tag] = Some(Err(self.failure(tag, &failure)));
                    }
                }
                Err(failure) => {
                    for &tag in &request.tags {
                        results[tag] = Some(Err(self.failure(tag, &failure)));
                    }
                    self.conn = None;
                    if let Some(&first) = request.tags.first() {
                        let err = self.failure(first, &failure);
                        self.connection_failed(&err);
                    }
                }
            }
        }
        self.learn(&results, &splits, &isolate, &restore);
        Some(results)
    }

    /// Applies what one tick taught about the device's register map to the plan.
    fn learn(
        &mut self,
        results: &[Option<TagResult>],
        splits: &[Split],
        isolate: &[usize],
        restore: &[usize],
    ) {
        let mut changed = false;
        for &tag in isolate {
            if self.planner.isolate(tag) {
                changed = true;
                let tag = &self.device.tags[tag];
                tracing::info!(tag = %tag.name, address = tag.address, "the device refuses this tag with \"illegal data address\"; it is read alone until it answers");
            }
        }
        for &tag in restore {
            changed |= self.planner.restore(tag);
        }
        let was_split = |tags: &[usize]| splits.iter().any(|split| split.refused == tags);
        for split in splits {
            // A refused request whose two halves were each answered with data, as they were,
            // proves that the registers between the halves do not exist. When a half was
            // refused too, that half explains the refusal and its own split teaches the rest;
            // a connection lost half-way teaches nothing.
            let answered = split
                .refused
                .iter()
                .all(|&tag| matches!(&results[tag], Some(Ok(_) | Err(PollError::Decode { .. }))));
            let Some(&second_half) = split.right.first() else {
                continue;
            };
            if answered
                && !was_split(&split.left)
                && !was_split(&split.right)
                && self.planner.cut_before(second_half)
            {
                changed = true;
                let tag = &self.device.tags[second_half];
                tracing::info!(tag = %tag.name, address = tag.address, "the device refuses reads that span the registers before this tag; they are no longer read together with it");
            }
        }
        if changed {
            tracing::info!(
                requests = self.planner.requests().len(),
                "read plan adjusted to the registers the device has"
            );
        }
    }

    /// The error of `tag` after its request failed with `failure`.
    fn failure(&self, tag: usize, failure: &CallError) -> PollError {
        let config = &self.device.tags[tag];
        let kind = kind_name(config.register);
        let address = config.address;
        match failure {
            CallError::Timeout => PollError::Timeout {
                kind,
                address,
                timeout: self.device.timeout.0,
            },
            CallError::Transport(reason) => PollError::Transport {
                kind,
                address,
                reason: reason.clone(),
            },
            CallError::Exception(code) => PollError::Exception {
                kind,
                address,
                code: *code,
            },
        }
    }

    /// Decodes and transforms `tag` from its part of `request`'s answer: the value after scale,
    /// offset and range, and its quality (`uncertain` when the range clamped it).
    fn tag_value(&self, tag: usize, request: &PlannedRequest, answer: &Answer) -> TagResult {
        let config = &self.device.tags[tag];
        let start = self.wire[tag].unwrap_or(request.start);
        let offset = usize::from(start.saturating_sub(request.start));
        let count = usize::from(config.data_type.register_count());
        // A short answer leaves the tags past its end with too few registers, which the
        // decoder reports; it never panics on a device's say-so.
        let part = |len: usize| offset.min(len)..(offset + count).min(len);
        let decoded = match answer {
            Answer::Words(words) => decode::decode_words(
                &words[part(words.len())],
                config.data_type,
                config.bit,
                config.byte_order,
            ),
            Answer::Bits(bits) => decode::decode_bits(&bits[part(bits.len())], config.data_type),
        };
        decoded
            .map(|raw| transform::apply(raw, config))
            .map_err(|source| PollError::Decode {
                kind: kind_name(config.register),
                address: config.address,
                source,
            })
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
    fn reading(&mut self, index: usize, ts_us: i64, result: &TagResult) -> Option<Reading> {
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

/// Sends one planned request under `timeout`.
async fn call(
    conn: &mut Context,
    request: &PlannedRequest,
    timeout: Duration,
) -> Result<Answer, CallError> {
    let (start, count) = (request.start, request.count);
    let wire_request = match request.kind {
        RegisterKind::Coil => Request::ReadCoils(start, count),
        RegisterKind::Discrete => Request::ReadDiscreteInputs(start, count),
        RegisterKind::Holding => Request::ReadHoldingRegisters(start, count),
        RegisterKind::Input => Request::ReadInputRegisters(start, count),
    };
    // `Client::call` rather than `Reader::read_*`: those assert the register count in debug
    // builds, and a device that sends a short answer must not crash the agent.
    let response = match tokio::time::timeout(timeout, conn.call(wire_request)).await {
        Err(_) => return Err(CallError::Timeout),
        Ok(Err(err)) => return Err(CallError::Transport(err.to_string())),
        Ok(Ok(Err(code))) => return Err(CallError::Exception(code)),
        Ok(Ok(Ok(response))) => response,
    };
    match (request.kind, response) {
        (RegisterKind::Holding, Response::ReadHoldingRegisters(words))
        | (RegisterKind::Input, Response::ReadInputRegisters(words)) => Ok(Answer::Words(words)),
        (RegisterKind::Coil, Response::ReadCoils(bits))
        | (RegisterKind::Discrete, Response::ReadDiscreteInputs(bits)) => Ok(Answer::Bits(bits)),
        // The client already refuses answers with another function code; should a future
        // version not, the stream is out of step and the connection is dropped.
        (_, other) => Err(CallError::Transport(format!(
            "a read was answered with {other:?}"
        ))),
    }
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

    #[test]
    fn devices_are_staggered_deterministically_within_their_interval() {
        let second = Duration::from_secs(1);
        let offsets: Vec<Duration> = ["press-3", "press-4", "meter-1", "oven"]
            .iter()
            .map(|name| stagger_offset(name, second))
            .collect();
        assert!(offsets.iter().all(|offset| *offset < second), "{offsets:?}");
        // FNV-1a of the name: the same slot on every start and every build.
        assert_eq!(stagger_offset("press-3", second), offsets[0]);
        assert_eq!(
            stagger_offset("press-3", Duration::from_hours(1)).as_nanos(),
            u128::from(fnv1a(b"press-3")) % 3_600_000_000_000
        );
        let mut distinct = offsets.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), offsets.len(), "{offsets:?}");
        assert_eq!(stagger_offset("press-3", Duration::ZERO), Duration::ZERO);
    }

    /// FNV-1a written out from its definition, independently of `stagger_offset`.
    fn fnv1a(bytes: &[u8]) -> u64 {
        let mut hash: u64 = 14_695_981_039_346_656_037;
        for &byte in bytes {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(1_099_511_628_211);
        }
        hash
    }
}
