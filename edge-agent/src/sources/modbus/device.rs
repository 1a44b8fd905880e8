//! The per-device half of polling, shared by the Modbus TCP task ([`super::poller`]) and the bus
//! task ([`super::bus`]): one tick's requests through the read plan, splitting and learning on
//! exception 2, decoding and transform, report by exception, and the tag state logs. How a
//! request reaches the device (a TCP connection of its own, or its turn on a shared line) is the
//! caller's [`Exchange`].

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;

use super::decode;
use super::error::PollError;
use super::plan::{PlannedRequest, Planner, TagSpan};
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

pub(crate) type TagResult = Result<(f64, Quality), PollError>;

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
    /// answer from another unit or to another function. The link itself still works.
    Garbled(String),
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

/// A request refused with "illegal data address" and the two halves it was retried as.
struct Split {
    refused: Vec<usize>,
    left: Vec<usize>,
    right: Vec<usize>,
}

/// One device's tags, read plan and per-tag state.
pub(crate) struct DeviceState {
    pub(crate) device: ModbusDevice,
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

impl DeviceState {
    pub(crate) fn new(device: ModbusDevice) -> Self {
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
            tag_good: vec![None; tags],
            filters,
            planner,
            wire,
        }
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
                Err(other) => {
                    for &tag in &request.tags {
                        results[tag] = Some(Err(self.failure(tag, &other)));
                    }
                    failure = request.tags.first().map(|&tag| self.failure(tag, &other));
                }
            }
        }
        self.learn(&results, &splits, &isolate, &restore);
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
            CallError::Garbled(reason) | CallError::Broken(reason) => PollError::Transport {
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
