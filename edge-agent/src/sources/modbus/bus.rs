//! One task per Modbus RTU bus: the slaves on one serial line (or behind one serial gateway)
//! share the line, and the task that owns it schedules their polls.
//!
//! # What always holds
//! - One request at a time: a request goes out only after the previous one was answered or
//!   timed out, and after the line has been silent for the inter-frame delay
//!   ([`super::line`]). A slave's tick sends its whole read plan in one go, so its readings are
//!   one consistent snapshot.
//! - Each slave keeps its own poll interval, timeout, inter-frame delay, read plan (with the
//!   exception-2 and exception-3 splitting and learning of [`super::device`], kept across
//!   restarts by [`run_bus_with_memory`]) and report-by-exception state: a slave behaves as it
//!   would as a Modbus TCP device of its own, only on a shared wire.
//! - Ticks are on a fixed grid per slave (first tick staggered by name, as for TCP devices): a
//!   tick that had to wait for the line is late, not moved, so a slave keeps its rate as long
//!   as the line has the capacity. A tick that could not be served before the next one was due
//!   is skipped, not bunched. When several slaves are due at once, slaves that answered last
//!   time go before a retry of a silent one.
//! - A slave that times out (or answers garbage) is backed off on its own, exponentially with
//!   jitter from 0.5 s up to 30 s: until its retry it is not asked at all, and its tags read
//!   `bad` at its poll rate without touching the line. A silent slave therefore costs the bus
//!   one timeout per backoff step and never starves the others, whose ticks keep their rate.
//! - A failed line (the serial port cannot be opened or fails, the gateway connection drops)
//!   makes every slave's tags read `bad` at their rates; the line is reopened with its own
//!   backoff (reset once a slave answers, not when the line opens), and every slave is asked
//!   again once it is.
//! - Every wait watches the shutdown token; the line is closed on the way out.
//! - Logs are written on state changes only (line open, line lost, slave silent, slave
//!   answering again), as for TCP devices.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::device::{
    self, Answer, Backoff, CallError, DeviceState, Exchange, Tick, stagger_offset, wall_clock_us,
};
use super::line::Line;
use super::memory::PlanKeeper;
use super::plan::PlannedRequest;
use crate::Reading;
use crate::buffer::plan_memory::PlanMemory;
use crate::config::{ModbusBus, ModbusDevice};

/// Polls the slaves `devices` (the `[[modbus]]` devices whose `bus` names `bus`) until
/// `shutdown` is cancelled or the receiver of `tx` is gone. What the slaves teach about their
/// register maps is kept in memory only.
pub async fn run_bus(
    bus: ModbusBus,
    devices: Vec<impl Into<Arc<ModbusDevice>>>,
    tx: mpsc::Sender<Reading>,
    shutdown: CancellationToken,
) {
    let devices = devices.into_iter().map(Into::into).collect();
    poll_bus(bus, devices, None, tx, shutdown).await;
}

/// Like [`run_bus`], and keeps what each slave teaches in the buffer file `buffer` (which must
/// exist) for the next start.
pub async fn run_bus_with_memory(
    bus: ModbusBus,
    devices: Vec<impl Into<Arc<ModbusDevice>>>,
    buffer: PathBuf,
    tx: mpsc::Sender<Reading>,
    shutdown: CancellationToken,
) {
    let devices = devices.into_iter().map(Into::into).collect();
    poll_bus(bus, devices, Some(buffer), tx, shutdown).await;
}

async fn poll_bus(
    bus: ModbusBus,
    devices: Vec<Arc<ModbusDevice>>,
    buffer: Option<PathBuf>,
    tx: mpsc::Sender<Reading>,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!("source", component = "modbus", bus = %bus.name);
    BusTask::new(bus, devices, buffer, tx, shutdown)
        .run()
        .instrument(span)
        .await;
}

/// A link's state as last logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No attempt made yet.
    Starting,
    Up,
    Down,
}

struct SlaveTask {
    state: DeviceState,
    keeper: PlanKeeper,
    span: tracing::Span,
    /// When the slave's next tick is due.
    next_tick: Instant,
    interval: Duration,
    /// The silent interval this slave needs before a request to it.
    gap: Duration,
    backoff: Backoff,
    /// No request to the slave before this instant.
    retry_at: Instant,
    answering: State,
}

impl SlaveTask {
    /// Whether its tick would send requests now (it is not waiting for a retry).
    fn asks_at(&self, now: Instant) -> bool {
        now >= self.retry_at
    }

    /// Moves `next_tick` to the first grid point after `now`, skipping any missed.
    fn advance(&mut self, now: Instant) {
        self.next_tick += self.interval;
        if self.next_tick <= now {
            let behind = (now - self.next_tick).as_nanos();
            let interval = self.interval.as_nanos().max(1);
            let skipped = u32::try_from(behind / interval + 1).unwrap_or(u32::MAX);
            self.next_tick += self.interval.saturating_mul(skipped);
        }
    }
}

/// A request to one slave, sent on the shared line.
struct SlaveExchange<'a> {
    line: &'a mut Line,
    unit_id: u8,
    gap: Duration,
}

impl Exchange for SlaveExchange<'_> {
    async fn exchange(
        &mut self,
        request: &PlannedRequest,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        self.line
            .exchange(self.unit_id, self.gap, request, timeout)
            .await
    }
}

struct BusTask {
    bus: ModbusBus,
    line: Line,
    slaves: Vec<SlaveTask>,
    tx: mpsc::Sender<Reading>,
    shutdown: CancellationToken,
    line_state: State,
    line_backoff: Backoff,
    /// No attempt to open the line before this instant.
    line_retry_at: Instant,
}

impl BusTask {
    fn new(
        bus: ModbusBus,
        devices: Vec<Arc<ModbusDevice>>,
        buffer: Option<PathBuf>,
        tx: mpsc::Sender<Reading>,
        shutdown: CancellationToken,
    ) -> Self {
        let now = Instant::now();
        let bus_gap = bus.inter_frame_delay();
        let memory = buffer.map(|path| PlanMemory::new(&path));
        let slaves = devices
            .into_iter()
            .map(|device| {
                let interval = device.poll_interval.0;
                let span =
                    tracing::info_span!("slave", device = %device.name, unit_id = device.unit_id);
                let gap = device
                    .inter_frame_delay
                    .map_or(bus_gap, |own| own.0.max(bus_gap));
                let link = format!(
                    "bus {} ({}) unit {}",
                    bus.name,
                    bus.describe(),
                    device.unit_id
                );
                let state = DeviceState::new(device);
                SlaveTask {
                    keeper: PlanKeeper::new(memory.clone(), &state, link),
                    next_tick: now + stagger_offset(&state.device.name, interval),
                    interval,
                    gap,
                    span,
                    backoff: Backoff::new(),
                    retry_at: now,
                    answering: State::Starting,
                    state,
                }
            })
            .collect();
        Self {
            line: Line::new(bus.clone()),
            bus,
            slaves,
            tx,
            shutdown,
            line_state: State::Starting,
            line_backoff: Backoff::new(),
            line_retry_at: now,
        }
    }

    async fn run(mut self) {
        tracing::info!(
            transport = self.bus.transport.name(),
            line = %self.bus.describe(),
            slaves = self.slaves.len(),
            inter_frame_delay = ?self.bus.inter_frame_delay(),
            "polling bus"
        );
        for slave in &mut self.slaves {
            let span = slave.span.clone();
            slave.keeper.recall(&mut slave.state).instrument(span).await;
            let device = &slave.state.device;
            slave.span.in_scope(|| {
                tracing::info!(
                    tags = device.tags.len(),
                    requests = slave.state.planned_requests(),
                    poll_interval = %device.poll_interval,
                    timeout = %device.timeout,
                    inter_frame_delay = ?slave.gap,
                    "polling slave"
                );
            });
        }
        while let Some(index) = self.next_due().await {
            if !self.tick(index).await {
                break;
            }
        }
        let timeout = self
            .slaves
            .iter()
            .map(|slave| slave.state.device.timeout.0)
            .max()
            .unwrap_or(Duration::from_secs(1));
        self.line.close(timeout).await;
        for slave in &mut self.slaves {
            slave.keeper.finish_save().await;
        }
        tracing::info!("stopped polling bus");
    }

    /// Waits for the next slave tick and returns the slave; `None` on shutdown or without slaves.
    async fn next_due(&mut self) -> Option<usize> {
        // Only the instant is kept across the wait: the task's line is `Send` but not `Sync`.
        let first = self.slaves.iter().map(|slave| slave.next_tick).min()?;
        tokio::select! {
            () = self.shutdown.cancelled() => return None,
            () = tokio::time::sleep_until(first) => {}
        }
        let now = Instant::now();
        // Of the slaves due now, those that answered last time first, then the longest waiting.
        self.slaves
            .iter()
            .enumerate()
            .filter(|(_, slave)| slave.next_tick <= now)
            .min_by_key(|(_, slave)| {
                (
                    slave.answering == State::Down && slave.asks_at(now),
                    slave.next_tick,
                )
            })
            .map(|(index, _)| index)
    }

    /// One tick of slave `index`. Returns false when the task must stop.
    async fn tick(&mut self, index: usize) -> bool {
        let ts_us = wall_clock_us();
        let now = Instant::now();
        self.slaves[index].advance(now);
        if !self.line.is_open() && now >= self.line_retry_at && !self.open_line().await {
            return false;
        }
        let slave = &mut self.slaves[index];
        let span = slave.span.clone();
        // After the time the line took to open, which may have made the slave's retry due.
        let tick = if self.line.is_open() && slave.asks_at(Instant::now()) {
            let mut exchange = SlaveExchange {
                line: &mut self.line,
                unit_id: slave.state.device.unit_id,
                gap: slave.gap,
            };
            let read = slave
                .state
                .read_tick(&mut exchange, &self.shutdown)
                .instrument(span.clone())
                .await;
            let Some(tick) = read else {
                return false;
            };
            tick
        } else {
            Tick {
                results: slave.state.unavailable(),
                answered: false,
                failure: None,
            }
        };
        let stray = self.line.newly_discarded();
        if stray > 0 {
            span.in_scope(|| {
                tracing::debug!(
                    bytes = stray,
                    "discarded bytes that arrived between frames (a late answer or line noise)"
                );
            });
        }
        if tick.answered {
            self.line_backoff.reset();
        }
        if let Some(reason) = self.line.take_failure() {
            self.line_failed(&reason);
        } else {
            span.in_scope(|| self.slaves[index].after_tick(&tick));
        }
        let slave = &mut self.slaves[index];
        slave
            .keeper
            .after_tick(&mut slave.state)
            .instrument(span.clone())
            .await;
        let readings = span.in_scope(|| self.slaves[index].state.readings(&tick.results, ts_us));
        device::send_readings(&self.tx, readings, &self.shutdown).await
    }

    /// Opens the line. Returns false on shutdown.
    async fn open_line(&mut self) -> bool {
        let timeout = self
            .slaves
            .iter()
            .map(|slave| slave.state.device.timeout.0)
            .max()
            .unwrap_or(Duration::from_secs(1));
        let opened = tokio::select! {
            () = self.shutdown.cancelled() => return false,
            opened = self.line.open(timeout) => opened,
        };
        match opened {
            Ok(()) => {
                // The backoff is reset by an answer, not by the open: a gateway that accepts the
                // connection and drops it at once is not reconnected to at every tick.
                if self.line_state != State::Up {
                    tracing::info!(line = %self.bus.describe(), "bus line open");
                }
                self.line_state = State::Up;
                // Every slave is asked at its next tick: their silence may have been the line's.
                let now = Instant::now();
                for slave in &mut self.slaves {
                    slave.retry_at = now;
                }
            }
            Err(err) => {
                // Each slave's tags are affected: the failure is counted, and shown, per device.
                for slave in &self.slaves {
                    crate::metrics::global().modbus_error(&slave.state.device.name, &err);
                }
                self.line_failed(&err);
            }
        }
        true
    }

    fn line_failed(&mut self, err: &dyn std::fmt::Display) {
        let delay = self.line_backoff.next_delay();
        self.line_retry_at = Instant::now() + delay;
        if self.line_state == State::Down {
            tracing::debug!(error = %err, retry_in = ?delay, "bus line still unavailable");
        } else {
            tracing::warn!(error = %err, retry_in = ?delay, "bus line unavailable; the tags of every slave on it read bad until it works again");
        }
        self.line_state = State::Down;
    }
}

impl SlaveTask {
    /// Updates the slave's backoff from what its tick showed. Call within the slave's span.
    fn after_tick(&mut self, tick: &Tick) {
        if tick.answered {
            self.backoff.reset();
        }
        match &tick.failure {
            Some(err) => {
                let delay = self.backoff.next_delay();
                self.retry_at = Instant::now() + delay;
                if self.answering == State::Down {
                    tracing::debug!(error = %err, retry_in = ?delay, "slave still silent");
                } else {
                    tracing::warn!(error = %err, retry_in = ?delay, "slave not answering; its tags read bad and it is asked again after the backoff, the other slaves on the bus are not held up");
                }
                self.answering = State::Down;
            }
            None if tick.answered => {
                if self.answering == State::Down {
                    tracing::info!("slave answering again");
                }
                self.answering = State::Up;
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::error::PollError;
    use super::*;
    use crate::config::ConfigDuration;

    fn slave(interval_ms: u64) -> SlaveTask {
        let device: ModbusDevice = toml::from_str(&format!(
            "name = \"meter\"\nbus = \"b\"\npoll_interval = \"{interval_ms}ms\"\ntags = []\n"
        ))
        .expect("a minimal device parses");
        let interval = device.poll_interval.0;
        let state = DeviceState::new(device);
        SlaveTask {
            keeper: PlanKeeper::new(None, &state, "test".to_owned()),
            next_tick: Instant::now(),
            interval,
            gap: ConfigDuration::from_millis(2).0,
            span: tracing::Span::none(),
            backoff: Backoff::new(),
            retry_at: Instant::now(),
            answering: State::Starting,
            state,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_tick_keeps_the_grid_and_a_missed_one_is_skipped() {
        let mut s = slave(100);
        let start = s.next_tick;
        // Served 30 ms late: the next tick stays on the grid.
        s.advance(start + Duration::from_millis(30));
        assert_eq!(s.next_tick, start + Duration::from_millis(100));
        // Served 250 ms late (a long timeout of another slave held the line): the ticks at
        // 200 and 300 ms are gone, the next is at 400 ms, not three in a row.
        s.advance(start + Duration::from_millis(350));
        assert_eq!(s.next_tick, start + Duration::from_millis(400));
        // Exactly on a grid point counts as missed: the next is one interval later.
        s.advance(start + Duration::from_millis(500));
        assert_eq!(s.next_tick, start + Duration::from_millis(600));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_slave_is_backed_off_and_comes_back_when_it_answers() {
        let mut s = slave(100);
        let failed = Tick {
            results: Vec::new(),
            answered: false,
            failure: Some(PollError::Timeout {
                kind: "holding register",
                address: 0,
                timeout: Duration::from_millis(200),
            }),
        };
        let now = Instant::now();
        s.after_tick(&failed);
        assert!(!s.asks_at(now), "not asked again at once");
        assert!(
            s.asks_at(now + BACKOFF_FIRST_MAX),
            "asked again after the first step"
        );
        s.after_tick(&failed);
        let second = s.retry_at - now;
        assert!(
            second >= Duration::from_millis(500),
            "{second:?}: the step doubled"
        );
        let answered = Tick {
            results: Vec::new(),
            answered: true,
            failure: None,
        };
        s.after_tick(&answered);
        assert_eq!(s.answering, State::Up);
        s.after_tick(&failed);
        assert!(
            s.retry_at - Instant::now() <= BACKOFF_FIRST_MAX,
            "an answer resets the backoff"
        );
    }

    const BACKOFF_FIRST_MAX: Duration = super::super::device::BACKOFF_START;
}
