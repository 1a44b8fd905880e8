//! One polling task per Modbus TCP device. The per-device logic (plan, splitting, decode,
//! transform, report by exception) lives in [`super::device`] and is shared with the RTU bus task.
//!
//! # What always holds
//! - Every poll tick reads every tag once, with the requests of the device's read plan
//!   ([`super::plan`]): neighbouring tags of one table share a request. Readings are sent in
//!   the sensor map's tag order, whatever the plan.
//! - A request refused with exception 2 (illegal data address) or 3 (illegal data value) is
//!   split in halves and retried, down to single tags, within the same tick; the plan then
//!   remembers what the device taught (a tag it refuses alone is read alone; registers between
//!   two answered halves are not asked for again; a request size it refuses is not sent again,
//!   see [`super::device`]), so the next tick sends the learned plan. Any other exception makes
//!   the tags of that request `bad` and is not retried.
//! - Started with [`run_device_with_memory`] (as the agent does), what the device taught is
//!   kept in the buffer file and restored at the next start for the same device, address and
//!   map ([`super::memory`]), so a restart does not send the refused requests again.
//! - The first tick of a device comes a deterministic offset (from its name) into its poll
//!   interval, so the devices of a gateway are not all asked at the same instant.
//! - Without report by exception (the default) every tick yields exactly one reading per tag,
//!   good, uncertain or bad: while the device is unreachable its tags are reported `bad` at the
//!   poll rate, so an outage is visible in the data, not only in the logs. A tag with a deadband
//!   or heartbeat sends what [`super::transform::ExceptionFilter`] lets through, which always
//!   includes quality changes.
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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_modbus::Slave;
use tokio_modbus::client::{Client, Context};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::device::{
    self, Answer, Backoff, CallError, DeviceState, Exchange, Tick, stagger_offset, wall_clock_us,
};
use super::error::PollError;
use super::memory::PlanKeeper;
use super::plan::PlannedRequest;
use crate::Reading;
use crate::buffer::plan_memory::PlanMemory;
use crate::config::ModbusDevice;

/// Polls one device until `shutdown` is cancelled or the receiver of `tx` is gone. What the
/// device teaches about its register map is kept in memory only.
pub async fn run_device(
    device: impl Into<Arc<ModbusDevice>>,
    tx: mpsc::Sender<Reading>,
    shutdown: CancellationToken,
) {
    poll_device(device.into(), None, tx, shutdown).await;
}

/// Like [`run_device`], and keeps what the device teaches in the buffer file `buffer` (which
/// must exist) for the next start.
pub async fn run_device_with_memory(
    device: impl Into<Arc<ModbusDevice>>,
    buffer: PathBuf,
    tx: mpsc::Sender<Reading>,
    shutdown: CancellationToken,
) {
    poll_device(device.into(), Some(buffer), tx, shutdown).await;
}

async fn poll_device(
    device: Arc<ModbusDevice>,
    buffer: Option<PathBuf>,
    tx: mpsc::Sender<Reading>,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!("source", component = "modbus", device = %device.name);
    DevicePoller::new(device, buffer, tx, shutdown)
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

/// A request sent on the device's own TCP connection.
struct TcpExchange<'a>(&'a mut Context);

impl Exchange for TcpExchange<'_> {
    async fn exchange(
        &mut self,
        request: &PlannedRequest,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        device::call(self.0, request, timeout).await
    }
}

struct DevicePoller {
    state: DeviceState,
    keeper: PlanKeeper,
    tx: mpsc::Sender<Reading>,
    shutdown: CancellationToken,
    conn: Option<Context>,
    link: Link,
    backoff: Backoff,
    /// No connection attempt before this instant.
    retry_at: Instant,
}

impl DevicePoller {
    fn new(
        device: Arc<ModbusDevice>,
        buffer: Option<PathBuf>,
        tx: mpsc::Sender<Reading>,
        shutdown: CancellationToken,
    ) -> Self {
        let link = format!(
            "tcp {}:{} unit {}",
            device.host, device.port, device.unit_id
        );
        let state = DeviceState::new(device);
        Self {
            keeper: PlanKeeper::new(buffer.map(|path| PlanMemory::new(&path)), &state, link),
            state,
            tx,
            shutdown,
            conn: None,
            link: Link::Starting,
            backoff: Backoff::new(),
            retry_at: Instant::now(),
        }
    }

    async fn run(mut self) {
        self.keeper.recall(&mut self.state).await;
        let device = &self.state.device;
        let interval = device.poll_interval.0;
        let offset = stagger_offset(&device.name, interval);
        tracing::info!(
            host = %device.host,
            port = device.port,
            unit_id = device.unit_id,
            tags = device.tags.len(),
            requests = self.state.planned_requests(),
            poll_interval = %device.poll_interval,
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
            let _ = tokio::time::timeout(self.state.device.timeout.0, conn.disconnect()).await;
        }
        self.keeper.finish_save().await;
        tracing::info!("stopped polling device");
    }

    /// Reads every tag once and sends the readings. Returns false when the task must stop.
    async fn poll_once(&mut self) -> bool {
        let ts_us = wall_clock_us();
        if self.conn.is_none() && Instant::now() >= self.retry_at {
            let connected = tokio::select! {
                () = self.shutdown.cancelled() => return false,
                result = connect(&self.state.device) => result,
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
                    crate::metrics::global().modbus_error(&self.state.device.name, &err);
                    self.connection_failed(&err);
                }
            }
        }
        let tick = match self.conn.as_mut() {
            Some(conn) => {
                let Some(tick) = self
                    .state
                    .read_tick(&mut TcpExchange(conn), &self.shutdown)
                    .await
                else {
                    return false;
                };
                tick
            }
            None => Tick {
                results: self.state.unavailable(),
                answered: false,
                failure: None,
            },
        };
        if tick.answered {
            self.backoff.reset();
        }
        self.keeper.after_tick(&mut self.state).await;
        if let Some(err) = &tick.failure {
            // A late or partial answer would otherwise be taken for the next request's.
            self.conn = None;
            self.connection_failed(err);
        }
        let readings = self.state.readings(&tick.results, ts_us);
        device::send_readings(&self.tx, readings, &self.shutdown).await
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
}

/// Resolves `host` and opens a TCP connection to it, both under `timeout`.
pub(crate) async fn connect_tcp(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, PollError> {
    let resolve_error = |reason: String| PollError::Resolve {
        host: host.to_owned(),
        port,
        reason,
    };
    let addr: SocketAddr =
        match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
            Err(_) => return Err(resolve_error(format!("no answer within {timeout:?}"))),
            Ok(Err(err)) => return Err(resolve_error(err.to_string())),
            Ok(Ok(mut addrs)) => addrs
                .next()
                .ok_or_else(|| resolve_error("no address".to_owned()))?,
        };
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => Err(PollError::Connect {
            target: addr.to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ),
        }),
        Ok(Err(source)) => Err(PollError::Connect {
            target: addr.to_string(),
            source,
        }),
        Ok(Ok(stream)) => {
            // Requests are small and answered one at a time: send each at once.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

/// Opens the device's Modbus TCP connection under the device's timeout.
async fn connect(device: &ModbusDevice) -> Result<Context, PollError> {
    let stream = connect_tcp(&device.host, device.port, device.timeout.0).await?;
    Ok(tokio_modbus::client::tcp::attach_slave(
        stream,
        Slave(device.unit_id),
    ))
}
