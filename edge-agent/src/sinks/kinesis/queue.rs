//! The bounded live queue between the buffer writer and the Kinesis shipper.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::warn;

use crate::Reading;

/// A committed reading with its buffer `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveReading {
    pub seq: i64,
    pub reading: Reading,
}

/// A queue of at most `capacity` readings that drops its oldest entries instead of waiting.
/// Cloning gives another handle to the same queue.
#[derive(Debug, Clone)]
pub struct LiveQueue {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    capacity: usize,
    readings: Mutex<VecDeque<LiveReading>>,
    /// Wakes the shipper when readings arrive.
    arrived: Notify,
    /// When the last drop warning was logged, and the drops since then: one line per
    /// [`DROP_LOG_EVERY`] while Kinesis is away, not one per commit.
    drop_log: Mutex<(Option<Instant>, u64)>,
}

/// How often a live queue that keeps dropping says so in the log.
const DROP_LOG_EVERY: Duration = Duration::from_secs(30);

/// A poisoned lock only means a thread panicked mid-push; the queue is still a valid deque.
fn lock(m: &Mutex<VecDeque<LiveReading>>) -> MutexGuard<'_, VecDeque<LiveReading>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LiveQueue {
    /// A queue for at most `capacity` readings (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            inner: Arc::new(Shared {
                capacity,
                readings: Mutex::new(VecDeque::with_capacity(capacity.min(65_536))),
                arrived: Notify::new(),
                drop_log: Mutex::new((None, 0)),
            }),
        }
    }

    /// Adds readings just committed with the contiguous seqs `first_seq..`, dropping the oldest
    /// waiting readings beyond the capacity. Never waits. Returns how many were dropped.
    pub fn push(&self, first_seq: i64, readings: &[Reading]) -> u64 {
        if readings.is_empty() {
            return 0;
        }
        let mut queue = lock(&self.inner.readings);
        let mut dropped = 0_u64;
        for (seq, reading) in (first_seq..).zip(readings) {
            if queue.len() == self.inner.capacity {
                queue.pop_front();
                dropped += 1;
            }
            queue.push_back(LiveReading {
                seq,
                reading: reading.clone(),
            });
        }
        let waiting = queue.len();
        drop(queue);
        self.inner.arrived.notify_one();
        if dropped > 0 {
            crate::metrics::global().kinesis_dropped(dropped);
            let mut log = self
                .inner
                .drop_log
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            log.1 += dropped;
            if log.0.is_none_or(|at| at.elapsed() >= DROP_LOG_EVERY) {
                warn!(
                    component = "kinesis",
                    dropped = log.1,
                    dropped_total = crate::metrics::global().kinesis_dropped_total(),
                    waiting,
                    "live queue full: dropped the oldest readings (they still go to S3)"
                );
                *log = (Some(Instant::now()), 0);
            }
        }
        dropped
    }

    /// Takes up to `max` of the oldest readings.
    pub fn take(&self, max: usize) -> Vec<LiveReading> {
        let mut queue = lock(&self.inner.readings);
        let n = max.min(queue.len());
        queue.drain(..n).collect()
    }

    pub fn len(&self) -> usize {
        lock(&self.inner.readings).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the next push will drop readings.
    pub fn is_full(&self) -> bool {
        self.len() >= self.inner.capacity
    }

    /// Resolves when readings have been pushed since the last wake-up (or already wait).
    pub async fn arrived(&self) {
        if !self.is_empty() {
            return;
        }
        self.inner.arrived.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Quality;

    fn reading(tag: &str) -> Reading {
        Reading {
            ts_us: 1,
            device: "press-3".into(),
            tag: tag.into(),
            value: Some(1.0),
            value_text: None,
            quality: Quality::Good,
            unit: None,
        }
    }

    #[test]
    fn a_full_queue_drops_its_oldest_readings_and_counts_them() {
        let q = LiveQueue::new(3);
        assert_eq!(q.push(10, &[reading("a"), reading("b")]), 0);
        assert_eq!(q.push(12, &[reading("c"), reading("d"), reading("e")]), 2);
        let left: Vec<(i64, String)> = q
            .take(10)
            .into_iter()
            .map(|l| (l.seq, l.reading.tag))
            .collect();
        assert_eq!(
            left,
            [
                (12, "c".to_owned()),
                (13, "d".to_owned()),
                (14, "e".to_owned())
            ]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn take_returns_the_oldest_first_and_leaves_the_rest() {
        let q = LiveQueue::new(10);
        q.push(1, &[reading("a"), reading("b"), reading("c")]);
        assert_eq!(q.take(2).iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(q.len(), 1);
    }
}
