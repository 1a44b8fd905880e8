//! systemd's service notification protocol (`sd_notify`): readiness, the watchdog and stopping.
//!
//! Under a unit with `Type=notify`, systemd passes a datagram socket in `NOTIFY_SOCKET`; with
//! `WatchdogSec=`, it also passes `WATCHDOG_USEC` and restarts the service when no `WATCHDOG=1`
//! arrives within that time. The protocol is plain text datagrams (`READY=1`, `WATCHDOG=1`,
//! `STOPPING=1`, `STATUS=...`), written here with the standard library.
//!
//! # What always holds
//! - Without `NOTIFY_SOCKET` (a shell, a test, another supervisor) every call does nothing.
//! - `READY=1` is sent once the buffer is open and the sources are started, so `systemctl start`
//!   returns when the agent is really collecting.
//! - The watchdog is fed at half its period, and only while [`crate::metrics::Metrics::health`]
//!   says the agent can do its job: a buffer that takes no commits or a stalled batcher stops the
//!   pings, and systemd restarts the agent. A hung process stops them too, because the pings
//!   come from the agent's own runtime.
//! - A failed send is logged once and never stops the agent.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::{Health, global};

/// Under systemd: says the agent of `gateway` is collecting (`READY=1`) and feeds the watchdog
/// until `stop`. Returns the notifier for `STOPPING=1`, or `None` outside systemd.
pub fn ready(gateway: &str, stop: CancellationToken) -> Option<Arc<Notifier>> {
    let notifier = Arc::new(Notifier::from_env()?);
    notifier.notify(&format!("READY=1\nSTATUS=collecting for gateway {gateway}"));
    let feeder = Arc::clone(&notifier);
    tokio::spawn(async move { feeder.feed_watchdog(stop).await });
    Some(notifier)
}

/// The systemd notification socket of this process, if it has one.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    address: String,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier systemd set up through the environment, or `None` when not started by
    /// systemd with `Type=notify`.
    pub fn from_env() -> Option<Self> {
        let address = std::env::var("NOTIFY_SOCKET").ok()?;
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|&usec| usec > 0)
            .map(Duration::from_micros);
        // WATCHDOG_PID, when set, names the process meant to send the pings.
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let socket = match UnixDatagram::unbound() {
            Ok(socket) => socket,
            Err(e) => {
                warn!(
                    component = "systemd",
                    "cannot create the sd_notify socket: {e}"
                );
                return None;
            }
        };
        Some(Self {
            socket,
            address,
            watchdog: watchdog.filter(|_| for_us),
        })
    }

    /// Sends one notification (`READY=1`, `STATUS=...`), newline-separated assignments.
    pub fn notify(&self, state: &str) {
        if let Err(e) = self.send(state.as_bytes()) {
            warn!(
                component = "systemd",
                socket = self.address,
                "sd_notify `{}` failed: {e}",
                state.lines().next().unwrap_or("")
            );
        }
    }

    fn send(&self, message: &[u8]) -> std::io::Result<usize> {
        if let Some(name) = self.address.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            self.socket.send_to_addr(message, &addr)
        } else {
            self.socket.send_to(message, &self.address)
        }
    }

    /// The watchdog period systemd expects pings within, if the unit has `WatchdogSec=`.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Pings the watchdog at half its period while the agent is healthy, until `stop`.
    pub async fn feed_watchdog(&self, stop: CancellationToken) {
        let Some(period) = self.watchdog else {
            return;
        };
        // The first ping comes half a period after READY=1, once the batcher has made its first
        // round: before it, health says the batcher is not running yet.
        let half = period / 2;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + half, half);
        let mut withheld = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match global().health(SystemTime::now()) {
                Health::Ok => {
                    if withheld {
                        withheld = false;
                        self.notify("STATUS=collecting");
                    }
                    self.notify("WATCHDOG=1");
                    debug!(component = "systemd", "watchdog fed");
                }
                Health::Failing(reason) => {
                    if !withheld {
                        withheld = true;
                        warn!(
                            component = "systemd",
                            "not feeding the systemd watchdog: {reason}; systemd restarts the agent if this lasts {}s",
                            period.as_secs()
                        );
                        self.notify(&format!("STATUS=failing: {reason}"));
                    }
                }
            }
        }
    }
}
