//! The per-device half of polling, shared by the Modbus TCP task ([`super::poller`]) and the bus
//! task ([`super::bus`]): one tick's requests through the read plan, splitting and learning on
//! exceptions 2 and 3, decoding and transform, report by exception, and the tag state logs. How
//! a request reaches the device (a TCP connection of its own, or its turn on a shared line) is
//! the caller's [`Exchange`]; keeping what was learned across restarts is [`super::memory`]'s.
//!
//! # What the device teaches
//! - Exception 2 (illegal data address) on a request of several tags: the request is halved and
//!   both halves are read in the same tick, down to single tags. A tag refused alone is read
//!   alone from then on (a hole); when both halves of a refused request answered, the registers
//!   between them do not exist and the two halves are never merged again (a cut).
//! - Exception 3 (illegal data value) on a request of several tags: the request may be too long
//!   for the device. It is halved and retried the same way. When every tag of the refused
//!   request was answered in the end, it was its length that was refused: the largest request
//!   the device answered that tick below the shortest such refusal becomes the device's limit
//!   for that kind of table (registers or bits), and later plans never exceed it. A single tag
//!   refused with exception 3 reads bad with the exception and is read alone from then on, as a
//!   hole is; a refusal that held it teaches no limit.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;

use super::decode::{self, TagValue};
use super::error::PollError;
use super::plan::{Learned, Limits, PlannedRequest, Planner, TagSpan};
use super::transform::{self, ExceptionFilter};
use crate::Reading;
use crate::config::{ModbusDevice, RegisterKind};
use crate::contract::Quality;

/// First retry delay after a failure (a connection, a serial line, or a silent slave).
pub const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest retry delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);

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
    let hash = fnv1a(device.as_bytes());
    let nanos = interval.as_nanos();
    if nanos == 0 {
        return Duration::ZERO;
    }
    let offset = u128::from(hash) % nanos;
    // Below the interval, which is a Duration itself, so it fits.
    Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX))
}

/// FNV-1a, 64 bits: stable across builds and restarts, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub(crate) type TagResult = Result<(TagValue, Quality), PollError>;

/// What a request's answer carries.
pub(crate) enum Answer {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

/// Why a request has no answer.
pub(crate) enum CallError {
    /// The device answered with a Modbus exception.
    Exception(ExceptionCode),
    /// No (complete) answer within the timeout.
    Timeout,
    /// Something arrived that is not the answer: a bad CRC, a frame that does not parse, an
    /// answer to another function. The link itself still works.
    Garbled(String),
    /// A well-formed answer that belongs to another request: from another slave (on a shared
    /// line, a late answer that crossed this request) or with another transaction id.
    Stray(String),
    /// The link failed: connection reset or closed, serial port gone.
    Broken(String),
}

/// How one request reaches the device and its answer comes back.
pub(crate) trait Exchange {
    /// Sends `request` and waits at most `timeout` for the answer.
    fn exchange(
        &mut self,
        request: &PlannedRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<Answer, CallError>> + Send;
}

/// Sends one planned request on `conn` under `timeout`.
pub(crate) async fn call(
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
        Ok(Err(tokio_modbus::Error::Protocol(
            err @ tokio_modbus::ProtocolError::HeaderMismatch { .. },
        ))) => {
            return Err(CallError::Stray(err.to_string()));
        }
        Ok(Err(tokio_modbus::Error::Protocol(err))) => {
            return Err(CallError::Garbled(err.to_string()));
        }
        // The codecs report a bad CRC or an unparsable frame as invalid data.
        Ok(Err(tokio_modbus::Error::Transport(err)))
            if err.kind() == std::io::ErrorKind::InvalidData =>
        {
            return Err(CallError::Garbled(err.to_string()));
        }
        Ok(Err(tokio_modbus::Error::Transport(err))) => {
            return Err(CallError::Broken(err.to_string()));
        }
        Ok(Ok(Err(code))) => return Err(CallError::Exception(code)),
        Ok(Ok(Ok(response))) => response,
    };
    match (request.kind, response) {
        (RegisterKind::Holding, Response::ReadHoldingRegisters(words))
        | (RegisterKind::Input, Response::ReadInputRegisters(words)) => Ok(Answer::Words(words)),
        (RegisterKind::Coil, Response::ReadCoils(bits))
        | (RegisterKind::Discrete, Response::ReadDiscreteInputs(bits)) => Ok(Answer::Bits(bits)),
        // The client already refuses answers with another function code; should a future
        // version not, the stream is out of step.
        (_, other) => Err(CallError::Garbled(format!(
            "a read was answered with {other:?}"
        ))),
    }
}

/// One tick's outcome for one device.
pub(crate) struct Tick {
    /// One result per tag, in the sensor map's order.
    pub(crate) results: Vec<TagResult>,
    /// Whether the device answered at least one request, with data or with an exception: the
    /// link and the device work.
    pub(crate) answered: bool,
    /// The timeout or transport failure that ended the tick early (the error of the failed
    /// request's first tag); the requests after it were not sent and their tags read
    /// [`PollError::NotConnected`].
    pub(crate) failure: Option<PollError>,
}

/// A request refused with "illegal data address" or "illegal data value" and the two halves it
/// was retried as.
struct Split {
    code: ExceptionCode,
    refused: Vec<usize>,
    left: Vec<usize>,
    right: Vec<usize>,
}

/// The sizes of the requests one tick sent, for learning a request limit.
#[derive(Default)]
struct Sizes {
    /// (table, count) of every request answered with data.
    answered: Vec<(RegisterKind, u16)>,
    /// (table, count, tags) of every request of several tags refused with "illegal data value".
    too_long: Vec<(RegisterKind, u16, Vec<usize>)>,
}

/// One device's tags, read plan and per-tag state.
pub(crate) struct DeviceState {
    /// Shared with the supervisor, which compares it with edited maps: a device of thousands of
    /// tags is held once.
    pub(crate) device: Arc<ModbusDevice>,
    /// Whether each tag's last reading was good, to log changes only.
    tag_good: Vec<Option<bool>>,
    /// Each tag's report-by-exception gate; `None` for a tag that sends every sample (most
    /// tags), so a device of thousands of plain tags holds a pointer per tag, not a gate.
    filters: Vec<Option<Box<ExceptionFilter>>>,
    /// The requests of one tick, and the holes learned from the device.
    planner: Planner,
    /// Each tag's first wire address; `None` when its address does not exist under the
    /// device's addressing (such a tag reads bad every tick and is never asked for).
    wire: Vec<Option<u16>>,
    /// Whether the plan changed since [`DeviceState::take_changed_plan`] last looked.
    plan_changed: bool,
}

impl DeviceState {
    pub(crate) fn new(device: impl Into<Arc<ModbusDevice>>) -> Self {
        let device = device.into();
        let tags = device.tags.len();
        let filters = device
            .tags
            .iter()
            .map(|tag| {
                let filter = ExceptionFilter::for_tag(tag);
                (!filter.sends_everything()).then(|| Box::new(filter))
            })
            .collect();
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
                    count: tag.register_count(),
                })
            })
            .collect();
        let limits = Limits::new(
            device.max_registers_per_request,
            device.max_bits_per_request,
        );
        let planner = Planner::with_limits(spans, device.max_gap, limits);
        Self {
            device,
            tag_good: vec![None; tags],
            filters,
            planner,
            wire,
            plan_changed: false,
        }
    }

    /// A hash of everything that shapes the read plan: each tag's name, table, wire address and
    /// width, the device's addressing, `max_gap` and request limits (FNV-1a, stable across
    /// builds). A learned plan is only valid for the same fingerprint. Scale, unit, byte order
    /// and the like do not change which requests are sent, so editing them keeps what was
    /// learned.
    pub(crate) fn fingerprint(&self) -> String {
        let device = &self.device;
        let mut text = format!(
            "addressing={} max_gap={} max_registers={:?} max_bits={:?}\n",
            device.addressing.name(),
            device.max_gap,
            device.max_registers_per_request,
            device.max_bits_per_request
        );
        for (tag, wire) in device.tags.iter().zip(&self.wire) {
            // Writing to a String cannot fail.
            let _ = writeln!(
                text,
                "{} {} {:?} {}",
                tag.name,
                tag.register.name(),
                wire,
                tag.register_count()
            );
        }
        format!("{:016x}", fnv1a(text.as_bytes()))
    }

    /// Takes back a plan this device learned before (see [`super::memory`]).
    pub(crate) fn restore_learned(&mut self, learned: &Learned) -> bool {
        self.planner.restore_learned(learned)
    }

    /// What the device taught so far, when the plan changed since the last call.
    pub(crate) fn take_changed_plan(&mut self) -> Option<Learned> {
        std::mem::take(&mut self.plan_changed).then(|| self.planner.learned())
    }

    /// How many requests one tick sends now.
    pub(crate) fn planned_requests(&self) -> usize {
        self.planner.requests().len()
    }

    /// The results of a tick in which the device cannot be asked: every tag reads
    /// [`PollError::NotConnected`], or [`PollError::NoSuchAddress`] when it has no wire address.
    pub(crate) fn unavailable(&self) -> Vec<TagResult> {
        (0..self.device.tags.len())
            .map(|index| Err(self.unasked(index)))
            .collect()
    }

    fn unasked(&self, index: usize) -> PollError {
        let tag = &self.device.tags[index];
        if self.wire[index].is_none() {
            PollError::NoSuchAddress {
                kind: kind_name(tag.register),
                address: tag.address,
                addressing: self.device.addressing,
            }
        } else {
            PollError::NotConnected {
                device: self.device.name.clone(),
            }
        }
    }

    /// Sends the tick's requests through `link`, splitting those refused with "illegal data
    /// address", and learns from the answers. Stops sending at the first timeout or transport
    /// failure. Returns `None` on shutdown.
    pub(crate) async fn read_tick<L: Exchange>(
        &mut self,
        link: &mut L,
        shutdown: &CancellationToken,
    ) -> Option<Tick> {
        let mut results: Vec<Option<TagResult>> =
            (0..self.device.tags.len()).map(|_| None).collect();
        for (index, wire) in self.wire.iter().enumerate() {
            if wire.is_none() {
                results[index] = Some(Err(self.unasked(index)));
            }
        }
        // A stack, so the halves of a split request are read next, first half first.
        let mut pending: Vec<PlannedRequest> =
            self.planner.requests().iter().rev().cloned().collect();
        let mut splits: Vec<Split> = Vec::new();
        let mut sizes = Sizes::default();
        let mut isolate = Vec::new();
        let mut restore = Vec::new();
        let mut answered = false;
        let mut failure = None;
        while let Some(request) = pending.pop() {
            if failure.is_some() {
                for &tag in &request.tags {
                    results[tag] = Some(Err(self.unasked(tag)));
                }
                continue;
            }
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return None,
                outcome = link.exchange(&request, self.device.timeout.0) => outcome,
            };
            match outcome {
                Ok(answer) => {
                    answered = true;
                    sizes.answered.push((request.kind, request.count));
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
                    answered = true;
                    let splits_on = matches!(
                        code,
                        ExceptionCode::IllegalDataAddress | ExceptionCode::IllegalDataValue
                    );
                    if splits_on && let Some((left, right)) = self.planner.split(&request) {
                        if code == ExceptionCode::IllegalDataValue {
                            sizes.too_long.push((
                                request.kind,
                                request.count,
                                request.tags.clone(),
                            ));
                        }
                        splits.push(Split {
                            code,
                            refused: request.tags.clone(),
                            left: left.tags.clone(),
                            right: right.tags.clone(),
                        });
                        pending.push(right);
                        pending.push(left);
                        continue;
                    }
                    if splits_on {
                        isolate.extend(request.tags.iter().map(|&tag| (tag, code)));
                    }
                    let failure = CallError::Exception(code);
                    for &tag in &request.tags {
                        results[tag] = Some(Err(self.failure(tag, &failure)));
                    }
                }
                Err(other) => {
                    for &tag in &request.tags {
                        results[tag] = Some(Err(self.failure(tag, &other)));
                    }
                    failure = request.tags.first().map(|&tag| self.failure(tag, &other));
                }
            }
        }
        self.learn(&results, &splits, &isolate, &restore);
        self.learn_limits(&results, &sizes);
        let results = results
            .into_iter()
            .enumerate()
            // Every tag is either planned or unaddressable, so each has a result; should one
            // not, it reads bad rather than silently missing from the tick.
            .map(|(index, result)| result.unwrap_or_else(|| Err(self.unasked(index))))
            .collect();
        Some(Tick {
            results,
            answered,
            failure,
        })
    }

    /// Applies what one tick taught about the device's register map to the plan.
    fn learn(
        &mut self,
        results: &[Option<TagResult>],
        splits: &[Split],
        isolate: &[(usize, ExceptionCode)],
        restore: &[usize],
    ) {
        let mut changed = false;
        for &(tag, code) in isolate {
            if self.planner.isolate(tag) {
                changed = true;
                let tag = &self.device.tags[tag];
                tracing::info!(tag = %tag.name, address = tag.address, "the device refuses this tag on its own with \"{code}\"; it is read alone until it answers");
            }
        }
        for &tag in restore {
            changed |= self.planner.restore(tag);
        }
        let was_split = |tags: &[usize]| splits.iter().any(|split| split.refused == tags);
        // A request refused as too long says nothing about which registers exist.
        for split in splits
            .iter()
            .filter(|split| split.code == ExceptionCode::IllegalDataAddress)
        {
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
            self.plan_changed = true;
            tracing::info!(
                requests = self.planner.requests().len(),
                "read plan adjusted to the registers the device has"
            );
        }
    }

    /// Lowers the request limit of a kind of table (registers, bits) to the largest request the
    /// device answered this tick below the shortest it refused as too long. A refusal counts
    /// only when every tag of it was answered in the end: then it was its length the device
    /// refused, not one of its tags.
    fn learn_limits(&mut self, results: &[Option<TagResult>], sizes: &Sizes) {
        let answered = |tags: &[usize]| {
            tags.iter()
                .all(|&tag| matches!(&results[tag], Some(Ok(_) | Err(PollError::Decode { .. }))))
        };
        for bits in [false, true] {
            let Some((kind, refused)) = sizes
                .too_long
                .iter()
                .filter(|(kind, _, tags)| kind.is_bits() == bits && answered(tags))
                .map(|(kind, count, _)| (*kind, *count))
                .min_by_key(|(_, count)| *count)
            else {
                continue;
            };
            let accepted = sizes
                .answered
                .iter()
                .filter(|(kind, count)| kind.is_bits() == bits && *count < refused)
                .map(|(_, count)| *count)
                .max();
            // Nothing shorter was answered (the halves failed otherwise): nothing to learn yet.
            let Some(accepted) = accepted else {
                continue;
            };
            if self.planner.limit_to(kind, accepted) {
                self.plan_changed = true;
                let unit = if bits { "bits" } else { "registers" };
                let key = if bits {
                    "max_bits_per_request"
                } else {
                    "max_registers_per_request"
                };
                tracing::info!(
                    refused,
                    limit = accepted,
                    requests = self.planner.requests().len(),
                    "the device refuses a read of {refused} {unit} with \"illegal data value\"; requests are kept to at most {accepted} {unit} from now on (set {key} on the device to skip the learning)"
                );
            }
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
            CallError::Garbled(reason) | CallError::Stray(reason) | CallError::Broken(reason) => {
                PollError::Transport {
                    kind,
                    address,
                    reason: reason.clone(),
                }
            }
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
        let count = usize::from(config.register_count());
        // A short answer leaves the tags past its end with too few registers, which the
        // decoder reports; it never panics on a device's say-so.
        let part = |len: usize| offset.min(len)..(offset + count).min(len);
        let decoded = match answer {
            Answer::Words(words) => decode::decode_register_tag(&words[part(words.len())], config),
            Answer::Bits(bits) => {
                decode::decode_bits(&bits[part(bits.len())], config.data_type).map(TagValue::Number)
            }
        };
        decoded
            .map(|raw| transform::apply_value(raw, config))
            .map_err(|source| PollError::Decode {
                kind: kind_name(config.register),
                address: config.address,
                source,
            })
    }

    /// The readings of one tick, stamped `ts_us`: counts every error, logs tags that change
    /// between good and bad, and leaves out what report by exception holds back.
    pub(crate) fn readings(&mut self, results: &[TagResult], ts_us: i64) -> Vec<Reading> {
        let mut readings = Vec::with_capacity(results.len());
        for (index, result) in results.iter().enumerate() {
            if let Err(err) = result {
                crate::metrics::global().modbus_error(&self.device.name, err);
            }
            if let Some(reading) = self.reading(index, ts_us, result) {
                readings.push(reading);
            }
        }
        readings
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
            Ok((value, quality)) => (Some(value), *quality),
            Err(_) => (None, Quality::Bad),
        };
        if let Some(filter) = &mut self.filters[index]
            && !filter.should_send_value(value, quality, Instant::now())
        {
            return None;
        }
        Some(Reading {
            ts_us,
            device: self.device.name.clone(),
            tag: tag.name.clone(),
            value: value.and_then(TagValue::number),
            value_text: value.and_then(TagValue::text).map(str::to_owned),
            quality,
            unit: tag.unit.clone(),
        })
    }
}

/// Sends a tick's readings in order. Returns false when the task must stop (shutdown, or the
/// receiver is gone).
pub(crate) async fn send_readings(
    tx: &mpsc::Sender<Reading>,
    readings: Vec<Reading>,
    shutdown: &CancellationToken,
) -> bool {
    for reading in readings {
        tokio::select! {
            () = shutdown.cancelled() => return false,
            sent = tx.send(reading) => if sent.is_err() {
                tracing::debug!("reading receiver closed");
                return false;
            },
        }
    }
    true
}

/// The table's name in errors and logs, followed by the address.
pub(crate) fn kind_name(kind: RegisterKind) -> &'static str {
    match kind {
        RegisterKind::Coil => "coil",
        RegisterKind::Discrete => "discrete input",
        RegisterKind::Holding => "holding register",
        RegisterKind::Input => "input register",
    }
}

pub(crate) fn wall_clock_us() -> i64 {
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
