//! The upload bandwidth cap (`[upload.s3] max_bytes_per_second`): request bodies that trickle
//! out no faster than the cap allows.
//!
//! The cap is a strict schedule, not a bucket that fills while idle: every byte is given a send
//! time `1 / rate` after the previous byte's, and a chunk of [`CHUNK`] bytes waits for its
//! first byte's time. So over any stretch longer than one chunk's worth of time the bytes sent
//! stay within the cap, also across the parts of a multipart upload and across retries, and an
//! idle link never earns a burst.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// The most a body hands to the connection at once: small enough that the cap holds over
/// short stretches even on slow links, large enough to keep the overhead per chunk small.
pub(crate) const CHUNK: usize = 16 << 10;

/// The shared schedule of one upload target.
#[derive(Debug)]
pub(crate) struct Pace {
    bytes_per_second: f64,
    /// When the next byte may go.
    next: Mutex<Option<Instant>>,
}

impl Pace {
    pub(crate) fn new(bytes_per_second: u64) -> Self {
        Self {
            // Precision is irrelevant beyond 2^53 bytes per second.
            #[allow(clippy::cast_precision_loss)]
            bytes_per_second: bytes_per_second.max(1) as f64,
            next: Mutex::new(None),
        }
    }

    /// How long sending `bytes` takes at the cap.
    pub(crate) fn time_for(&self, bytes: usize) -> Duration {
        #[allow(clippy::cast_precision_loss)]
        Duration::from_secs_f64(bytes as f64 / self.bytes_per_second)
    }

    /// Books `bytes` on the schedule and returns how long to wait before sending them.
    pub(crate) fn reserve(&self, bytes: usize) -> Duration {
        let now = Instant::now();
        let mut next = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = next.map_or(now, |n| n.max(now));
        *next = Some(start + self.time_for(bytes));
        start - now
    }
}

/// A request body that sends `data` in chunks on the schedule of a [`Pace`].
pub(crate) struct PacedBody {
    rest: Bytes,
    pace: Arc<Pace>,
    /// The chunk booked on the schedule and the wait for its turn.
    waiting: Option<(usize, Pin<Box<Sleep>>)>,
}

impl PacedBody {
    pub(crate) fn new(data: Bytes, pace: Arc<Pace>) -> Self {
        Self {
            rest: data,
            pace,
            waiting: None,
        }
    }
}

impl Body for PacedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.waiting.is_none() {
            if this.rest.is_empty() {
                return Poll::Ready(None);
            }
            let n = CHUNK.min(this.rest.len());
            let wait = this.pace.reserve(n);
            if wait.is_zero() {
                return Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(n)))));
            }
            this.waiting = Some((n, Box::pin(tokio::time::sleep(wait))));
        }
        let (n, sleep) = this
            .waiting
            .as_mut()
            .expect("set just above when it was empty");
        match sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                let n = *n;
                this.waiting = None;
                Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(n)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test(start_paused = true)]
    async fn a_body_is_sent_at_the_cap_and_the_schedule_spans_bodies() {
        let pace = Arc::new(Pace::new(64 << 10));
        let data: Bytes = (0..=255u8).cycle().take(256 << 10).collect();
        let started = Instant::now();
        let sent = PacedBody::new(data.clone(), Arc::clone(&pace))
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(sent, data, "the body arrives whole and in order");
        // 256 KiB at 64 KiB/s: the first chunk goes at once, the last one after 15 others.
        assert_eq!(started.elapsed(), pace.time_for((256 << 10) - CHUNK));

        // A second body right after waits for the first's last chunk to have had its time,
        // so two bodies together keep the cap as well.
        let second = Instant::now();
        PacedBody::new(Bytes::from_static(b"abc"), Arc::clone(&pace))
            .collect()
            .await
            .unwrap();
        assert_eq!(second.elapsed(), pace.time_for(CHUNK));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_link_earns_no_burst() {
        let pace = Pace::new(1 << 20);
        assert_eq!(pace.reserve(CHUNK), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(pace.reserve(1 << 20), Duration::ZERO);
        assert_eq!(pace.reserve(CHUNK), Duration::from_secs(1));
    }
}
