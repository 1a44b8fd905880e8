//! The line of an RTU bus: a serial port, or a TCP connection to a serial gateway, carrying RTU
//! frames (slave address, PDU, CRC) one request at a time.
//!
//! # What always holds
//! - The line is opened once and kept open. A timeout or a garbled answer only resets the
//!   framing (a fresh RTU codec over the same open port); the port is closed and opened again
//!   only when it fails itself (an I/O error: adapter unplugged, connection reset).
//! - Before each request goes out, whatever bytes already wait on the line are read and thrown
//!   away: a slave's answer that came after its timeout, or noise, is never taken for the answer
//!   to the next request. No answer to the new request can be among them, because a slave only
//!   answers a request it has received whole.
//! - A late answer that arrives while the next request waits for its own is recognised by its
//!   slave address and thrown away with the framing, and that request is sent once more within
//!   what is left of its timeout, so one slave's late answer does not fail another slave's poll.
//!   (An answer from the same slave to the same function cannot be told apart: RTU frames have
//!   no transaction id.)
//! - Between the end of one frame (an answer, or the timeout that gave up on it) and the next
//!   request, the line is silent for at least the larger of the inter-frame delays of the slave
//!   just talked to and the slave about to be asked.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_modbus::Slave;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_serial::{DataBits, SerialPortBuilderExt, SerialStream, StopBits};

use super::device::{self, Answer, CallError};
use super::error::PollError;
use super::plan::PlannedRequest;
use super::poller::connect_tcp;
use crate::config::{BusTransport, ModbusBus, Parity};

/// The open byte stream under the RTU framing.
enum Stream {
    Serial(SerialStream),
    Tcp(TcpStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Serial(port) => Pin::new(port).poll_read(cx, buf),
            Stream::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Serial(port) => Pin::new(port).poll_write(cx, buf),
            Stream::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Serial(port) => Pin::new(port).poll_flush(cx),
            Stream::Tcp(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Serial(port) => Pin::new(port).poll_shutdown(cx),
            Stream::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

/// How many stray bytes one write may discard before it sends anyway: a line that never stops
/// talking (a second master, a babbling device) must not hold the bus task forever.
const MAX_DRAIN: usize = 4096;

/// A handle on the open stream for one RTU codec. The stream outlives the codec, so a codec left
/// in a bad state (a timeout mid-frame, a bad CRC) is replaced without closing the port. Only
/// the bus task uses it, one call at a time, so the lock is never contended; it is held within
/// a single poll, never across an await.
#[derive(Clone)]
struct SharedStream {
    stream: Arc<Mutex<Stream>>,
    /// Bytes discarded before requests, for the logs.
    discarded: Arc<AtomicU64>,
}

impl SharedStream {
    fn with<R>(&self, f: impl FnOnce(Pin<&mut Stream>) -> R) -> R {
        let mut stream = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        f(Pin::new(&mut *stream))
    }
}

impl AsyncRead for SharedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.with(|stream| stream.poll_read(cx, buf))
    }
}

impl AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.with(|mut stream| {
            // Throw away what waits on the line before the request goes out (see the module
            // docs). An error or the end of the stream stops the drain; the read that follows
            // the request reports it.
            let mut scratch = [0_u8; 256];
            let mut drained = 0;
            while drained < MAX_DRAIN {
                let mut stray = ReadBuf::new(&mut scratch);
                match stream.as_mut().poll_read(cx, &mut stray) {
                    Poll::Ready(Ok(())) if !stray.filled().is_empty() => {
                        drained += stray.filled().len();
                    }
                    _ => break,
                }
            }
            if drained > 0 {
                self.discarded.fetch_add(
                    u64::try_from(drained).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            }
            stream.poll_write(cx, buf)
        })
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.with(|stream| stream.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.with(|stream| stream.poll_shutdown(cx))
    }
}

/// The bus's line: opened, framed and timed.
pub(crate) struct Line {
    bus: ModbusBus,
    /// The open stream, `None` while the line is closed.
    stream: Option<SharedStream>,
    /// The RTU codec on the stream; replaced after a timeout or a garbled answer.
    framing: Option<Context>,
    /// When the last frame on the line ended (an answer, or the timeout that gave up on one).
    quiet_since: Instant,
    /// The inter-frame delay owed to the slave of that last frame.
    owed_gap: Duration,
    /// Why the line failed during the last call, until [`Line::take_failure`].
    failed: Option<String>,
    /// Stray bytes discarded so far, as last logged.
    discarded_logged: u64,
}

impl Line {
    pub(crate) fn new(bus: ModbusBus) -> Self {
        Self {
            bus,
            stream: None,
            framing: None,
            quiet_since: Instant::now(),
            owed_gap: Duration::ZERO,
            failed: None,
            discarded_logged: 0,
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.stream.is_some()
    }

    /// Opens the serial port or connects to the gateway; `timeout` bounds a TCP connect.
    pub(crate) async fn open(&mut self, timeout: Duration) -> Result<(), PollError> {
        let stream = match self.bus.transport {
            BusTransport::Rtu => Stream::Serial(open_serial(&self.bus)?),
            BusTransport::RtuOverTcp => {
                let host = self.bus.host.as_deref().unwrap_or_default();
                let port = self.bus.port.unwrap_or_default();
                Stream::Tcp(connect_tcp(host, port, timeout).await?)
            }
        };
        self.stream = Some(SharedStream {
            stream: Arc::new(Mutex::new(stream)),
            discarded: Arc::new(AtomicU64::new(0)),
        });
        self.framing = None;
        self.discarded_logged = 0;
        self.quiet_since = Instant::now();
        Ok(())
    }

    /// Closes the line; the next [`Line::open`] starts afresh.
    pub(crate) async fn close(&mut self, timeout: Duration) {
        if let Some(mut framing) = self.framing.take() {
            // A TCP gateway gets a proper close; a serial port has nothing to say goodbye to.
            let _ = tokio::time::timeout(timeout, framing.disconnect()).await;
        }
        self.stream = None;
    }

    /// The line failure of the last call, if any; the line is closed by then.
    pub(crate) fn take_failure(&mut self) -> Option<String> {
        self.failed.take()
    }

    /// Stray bytes discarded since the last call of this function.
    pub(crate) fn newly_discarded(&mut self) -> u64 {
        let total = self
            .stream
            .as_ref()
            .map_or(0, |stream| stream.discarded.load(Ordering::Relaxed));
        let new = total.saturating_sub(self.discarded_logged);
        self.discarded_logged = total;
        new
    }

    /// Sends `request` to slave `unit_id` after the line has been silent for `gap` (and for
    /// the gap owed to the previous slave), and waits at most `timeout` for the answer. An
    /// answer from another slave (a late answer that crossed the request) is thrown away and
    /// the request is sent once more within what is left of `timeout`.
    pub(crate) async fn exchange(
        &mut self,
        unit_id: u8,
        gap: Duration,
        request: &PlannedRequest,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let started = Instant::now();
        let outcome = self.exchange_once(unit_id, gap, request, timeout).await;
        let Err(CallError::Stray(reason)) = &outcome else {
            return outcome;
        };
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return outcome;
        }
        tracing::debug!(
            error = %reason,
            "an answer for another request arrived (a late answer that crossed this request); asking again"
        );
        self.exchange_once(unit_id, gap, request, left).await
    }

    async fn exchange_once(
        &mut self,
        unit_id: u8,
        gap: Duration,
        request: &PlannedRequest,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let Some(stream) = &self.stream else {
            return Err(CallError::Broken("the line is not open".to_owned()));
        };
        let framing = self
            .framing
            .get_or_insert_with(|| tokio_modbus::client::rtu::attach(stream.clone()));
        tokio::time::sleep_until(self.quiet_since + gap.max(self.owed_gap)).await;
        framing.set_slave(Slave(unit_id));
        let outcome = device::call(framing, request, timeout).await;
        self.quiet_since = Instant::now();
        self.owed_gap = gap;
        match &outcome {
            Ok(_) | Err(CallError::Exception(_)) => {}
            // The codec may hold half a frame, or half a request not yet written, or the real
            // answer behind a stray one: start the next call with a fresh one over the same port.
            Err(CallError::Timeout | CallError::Garbled(_) | CallError::Stray(_)) => {
                self.framing = None;
            }
            Err(CallError::Broken(reason)) => {
                self.failed = Some(reason.clone());
                self.framing = None;
                self.stream = None;
            }
        }
        outcome
    }
}

/// Opens the bus's serial port with its framing settings, exclusively (another program that
/// opens the port too would garble every frame).
fn open_serial(bus: &ModbusBus) -> Result<SerialStream, PollError> {
    let path = bus.serial_port.as_deref().unwrap_or_default();
    let data_bits = if bus.data_bits == 7 {
        DataBits::Seven
    } else {
        DataBits::Eight
    };
    let stop_bits = if bus.stop_bits == 2 {
        StopBits::Two
    } else {
        StopBits::One
    };
    let parity = match bus.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    tokio_serial::new(path, bus.baud_rate)
        .data_bits(data_bits)
        .stop_bits(stop_bits)
        .parity(parity)
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()
        .map_err(|err| PollError::Connect {
            target: format!("serial port {}", bus.describe()),
            source: err.into(),
        })
}
