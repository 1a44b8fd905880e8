//! The batcher loop: cut, encode, upload, forget; in that order, one batch at a time.
//!
//! # Retries
//! A failed upload leaves its batch pending and is retried with capped exponential backoff
//! (0.5 s doubling to 60 s, each wait a random time between half and all of the step, so many
//! gateways coming back at once spread out). The S3 client also retries a request a few times
//! on its own before the batcher sees the failure. A retry re-reads the same `seq` range and
//! re-encodes it to the same bytes under the same key.
//!
//! # Backlog drain
//! After an outage the buffer holds a backlog. Main-lane batches stay contiguous `seq` ranges
//! uploaded in `seq` order (batch contract guarantee 4: the collector applies each gateway's
//! main-lane batches in `seq` order and drops rows at or below its watermark), and the drain is
//! made as fast and as visible as that order allows:
//! - every batch holds at most `batch.max_rows` readings, so each round finishes and frees
//!   buffer space, and a failed upload repeats one bounded batch, not the whole backlog;
//! - while a full batch waits, the next one is cut and sent at once, with no `max_age` wait;
//! - an optional `[upload.s3] max_bytes_per_second` keeps the drain off a metered link's peak;
//! - the drain is logged when it starts, every minute (readings left, readings per second
//!   uploaded, and how long until fresh readings are reached at that rate) and when it ends.
//!
//! # Fresh lane
//! So that fresh readings still reach S3 within about `batch.max_age` while the backlog drains
//! (`batch.fresh_lane`, on by default), the batcher also uploads *copies* of the newest readings
//! under `gateway=<id>/fresh/` (batch contract v3). While a backlog exists (more than
//! `batch.max_rows` readings wait outside the pending batch, or the oldest waiting reading
//! arrived more than `2 × batch.max_age` ago), at most once per `batch.max_age`, and before the
//! main lane's next upload, it plans a fresh batch by the buffer's range rule
//! ([`Buffer::plan_fresh_batch`]), uploads it through the same sink and bandwidth cap, and only
//! then records the run's new end ([`Buffer::fresh_uploaded`]). A fresh batch deletes nothing
//! and touches neither the pending batch, the gap records nor the high-water marks, so the main
//! lane is exactly what it is without it. A failed fresh upload is retried with the same
//! backoff, but the next round tries the main lane first, so a fresh lane that keeps failing
//! never holds the main lane up. Once the backlog is gone, no fresh batches are cut.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use bytes::Bytes;

use super::parquet_file::{BatchEncoder, ENCODE_CHUNK_ROWS};
use crate::buffer::{Buffer, BufferError, FreshBatch, PendingBatch};
use crate::config::BatchConfig;
use crate::contract::{BatchKey, Lane};
use crate::sinks::BatchSink;

/// Problems the batcher cannot retry its way out of.
#[derive(Debug, thiserror::Error)]
pub enum BatcherError {
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error("batch {first_seq}..={last_seq} could not be encoded as Parquet: {message}")]
    Encode {
        first_seq: i64,
        last_seq: i64,
        message: String,
    },
    #[error("buffer task failed: {0}")]
    Join(String),
}

/// Cuts batches from the buffer and uploads them.
pub struct Batcher {
    buffer: Arc<Buffer>,
    sink: Arc<BatchSink>,
    config: BatchConfig,
    site: String,
    /// When the buffer was first seen non-empty since the last cut.
    waiting_since: Option<Instant>,
    /// The backlog being drained, while more than one batch waits.
    backlog: Option<Backlog>,
    /// When the last fresh-lane batch was confirmed (they go at most once per `max_age`).
    last_fresh: Option<Instant>,
    /// A fresh-lane upload just failed: the next round tries the main lane first.
    main_first: bool,
}

/// Progress of a backlog drain, for its log lines.
struct Backlog {
    started: Instant,
    /// Readings waiting when the drain started.
    waiting_at_start: u64,
    uploaded: u64,
    batches: u64,
    last_report: Instant,
    uploaded_at_last_report: u64,
}

/// How often a running drain is logged.
const BACKLOG_REPORT_EVERY: Duration = Duration::from_mins(1);

const TICK: Duration = Duration::from_millis(250);
const RETRY_START: Duration = Duration::from_millis(500);
const RETRY_CAP: Duration = Duration::from_mins(1);

impl Batcher {
    pub fn new(
        buffer: Arc<Buffer>,
        sink: Arc<BatchSink>,
        config: BatchConfig,
        site: String,
    ) -> Self {
        Self {
            buffer,
            sink,
            config,
            site,
            waiting_since: None,
            backlog: None,
            last_fresh: None,
            main_first: false,
        }
    }

    /// Runs until `shutdown` is cancelled. Upload failures are retried with capped exponential
    /// backoff; the batch stays pending (and its rows in the buffer) until a put succeeds.
    pub async fn run(&mut self, shutdown: CancellationToken) -> Result<(), BatcherError> {
        let mut backoff = RETRY_START;
        loop {
            crate::metrics::global().batcher_alive();
            let wait = match self.step(false).await {
                Ok(true) => {
                    backoff = RETRY_START;
                    Duration::ZERO
                }
                Ok(false) => {
                    backoff = RETRY_START;
                    TICK
                }
                Err(StepError::Upload(message)) => {
                    warn!(
                        component = "batcher",
                        retry_in_ms = crate::millis(backoff),
                        "{message}"
                    );
                    let wait = jittered(backoff);
                    backoff = (backoff * 2).min(RETRY_CAP);
                    wait
                }
                Err(StepError::Fatal(e)) => return Err(e),
            };
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Uploads everything the buffer holds, for a clean shutdown. Gives up at `deadline`,
    /// leaving the rest in the buffer for the next start.
    pub async fn flush(&mut self, deadline: Duration) -> Result<(), BatcherError> {
        let until = Instant::now() + deadline;
        loop {
            match tokio::time::timeout_at(until, self.step(true)).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return Ok(()),
                Ok(Err(StepError::Upload(message))) => {
                    warn!(
                        component = "batcher",
                        "{message}; the rest stays buffered for the next start"
                    );
                    return Ok(());
                }
                Ok(Err(StepError::Fatal(e))) => return Err(e),
                Err(_) => {
                    warn!(
                        component = "batcher",
                        "shutdown flush ran out of time; the rest stays buffered for the next start"
                    );
                    return Ok(());
                }
            }
        }
    }

    /// One round: uploads the pending batch, or cuts one when it is due. Returns whether a batch
    /// was uploaded (so the caller can go on at once while a backlog drains).
    async fn step(&mut self, force: bool) -> Result<bool, StepError> {
        // Readings age out here too, so they go while no source commits (an idle gateway, a
        // long outage with the sources stopped).
        self.blocking(Buffer::expire).await?;
        // A shutdown flush ships the main lane only: copies would spend its deadline.
        // After a failed fresh upload this round skips the fresh lane, so the main lane goes.
        if !force && self.config.fresh_lane && !std::mem::take(&mut self.main_first) {
            self.fresh_step().await?;
        }
        let pending = self.blocking(Buffer::pending_batch).await?;
        let batch = if let Some(batch) = pending {
            batch
        } else {
            {
                let stats = self.blocking(Buffer::stats).await?;
                if stats.rows == 0 {
                    self.waiting_since = None;
                    return Ok(false);
                }
                let since = *self.waiting_since.get_or_insert_with(Instant::now);
                let full = stats.rows >= self.config.max_rows as u64;
                let old = since.elapsed() >= self.config.max_age.0;
                if !(force || full || old) {
                    return Ok(false);
                }
                let max_rows = self.config.max_rows;
                let site = self.site.clone();
                let Some(batch) = self.blocking(move |b| b.cut_batch(max_rows, &site)).await?
                else {
                    return Ok(false);
                };
                batch
            }
        };
        self.upload(&batch).await?;
        // Encoding the batch freed its buffers below memory that stays.
        crate::memory::release_in_background(crate::memory::After::Batch);
        // Rows cut later than this batch have waited at most as long; keep the clock running
        // for them only if some remain.
        let left = self.blocking(Buffer::stats).await?.rows;
        if left == 0 {
            self.waiting_since = None;
        }
        let uploaded = u64::try_from(batch.last_seq - batch.first_seq + 1).unwrap_or(0);
        self.track_backlog(uploaded, left);
        Ok(true)
    }

    /// Uploads a fresh-lane batch when one is due: a backlog waits and the last fresh batch went
    /// at least `max_age` ago. A failure makes the next round start with the main lane.
    async fn fresh_step(&mut self) -> Result<(), StepError> {
        let max_age = self.config.max_age.0;
        if self.last_fresh.is_some_and(|at| at.elapsed() < max_age) {
            return Ok(());
        }
        let max_rows = self.config.max_rows;
        if !self
            .blocking(move |b| b.has_backlog(max_rows, max_age))
            .await?
        {
            return Ok(());
        }
        let site = self.site.clone();
        let Some(batch) = self
            .blocking(move |b| b.plan_fresh_batch(max_rows, max_age, &site))
            .await?
        else {
            return Ok(());
        };
        match self.upload_fresh(&batch).await {
            Ok(()) => {
                self.last_fresh = Some(Instant::now());
                Ok(())
            }
            Err(e) => {
                self.main_first = true;
                Err(e)
            }
        }
    }

    /// Follows a backlog drain: one upload of `uploaded` readings just finished and `left`
    /// readings wait. A backlog is more than one full batch waiting.
    fn track_backlog(&mut self, uploaded: u64, left: u64) {
        let max_rows = self.config.max_rows as u64;
        let now = Instant::now();
        match &mut self.backlog {
            None if left > max_rows => {
                info!(
                    component = "batcher",
                    waiting = left,
                    batches = left.div_ceil(max_rows.max(1)),
                    fresh_lane = self.config.fresh_lane,
                    "draining a backlog in seq order; with the fresh lane on, copies of fresh readings go ahead of it"
                );
                self.backlog = Some(Backlog {
                    started: now,
                    waiting_at_start: left,
                    uploaded: 0,
                    batches: 0,
                    last_report: now,
                    uploaded_at_last_report: 0,
                });
            }
            None => {}
            Some(backlog) => {
                backlog.uploaded += uploaded;
                backlog.batches += 1;
                if left <= max_rows {
                    info!(
                        component = "batcher",
                        readings = backlog.uploaded,
                        batches = backlog.batches,
                        waited_at_start = backlog.waiting_at_start,
                        drain_ms = crate::millis(backlog.started.elapsed()),
                        "backlog drained; fresh readings are uploaded within batch.max_age again"
                    );
                    self.backlog = None;
                } else if now - backlog.last_report >= BACKLOG_REPORT_EVERY {
                    let secs = (now - backlog.last_report).as_secs_f64();
                    #[allow(clippy::cast_precision_loss)]
                    let rate = (backlog.uploaded - backlog.uploaded_at_last_report) as f64 / secs;
                    #[allow(clippy::cast_precision_loss)]
                    let eta_s = if rate > 0.0 {
                        (left as f64 / rate).round()
                    } else {
                        f64::INFINITY
                    };
                    info!(
                        component = "batcher",
                        waiting = left,
                        uploaded = backlog.uploaded,
                        readings_per_s = rate.round(),
                        fresh_in_s = eta_s,
                        "backlog draining"
                    );
                    backlog.last_report = now;
                    backlog.uploaded_at_last_report = backlog.uploaded;
                }
            }
        }
    }

    async fn upload(&self, batch: &PendingBatch) -> Result<(), StepError> {
        let buffer = Arc::clone(&self.buffer);
        let for_encode = batch.clone();
        let (body, rows, gaps) =
            tokio::task::spawn_blocking(move || encode_batch(&buffer, &for_encode))
                .await
                .map_err(|e| StepError::Fatal(BatcherError::Join(e.to_string())))??;
        let key = BatchKey::new(self.buffer.gateway(), batch.first_seq).to_key(self.sink.prefix());
        let started = Instant::now();
        self.sink
            .put(&key, body.clone())
            .await
            .inspect_err(|_| crate::metrics::global().upload_failed())
            .map_err(|e| StepError::Upload(e.to_string()))?;
        let done = batch.clone();
        self.blocking(move |b| b.complete_batch(&done)).await?;
        crate::metrics::global().batch_uploaded(rows, started.elapsed());
        info!(
            component = "batcher",
            key,
            rows,
            bytes = body.len(),
            first_seq = batch.first_seq,
            last_seq = batch.last_seq,
            gaps,
            upload_ms = crate::millis(started.elapsed()),
            "batch uploaded"
        );
        Ok(())
    }

    async fn upload_fresh(&self, batch: &FreshBatch) -> Result<(), StepError> {
        let buffer = Arc::clone(&self.buffer);
        let for_encode = batch.clone();
        let (body, rows) = tokio::task::spawn_blocking(move || encode_fresh(&buffer, &for_encode))
            .await
            .map_err(|e| StepError::Fatal(BatcherError::Join(e.to_string())))??;
        if rows == 0 {
            // The bounds dropped the range between planning and reading; nothing to copy.
            return Ok(());
        }
        let key =
            BatchKey::fresh(self.buffer.gateway(), batch.first_seq).to_key(self.sink.prefix());
        let started = Instant::now();
        self.sink
            .put(&key, body.clone())
            .await
            .inspect_err(|_| crate::metrics::global().upload_failed())
            .map_err(|e| StepError::Upload(format!("fresh lane: {e}")))?;
        let done = batch.clone();
        self.blocking(move |b| b.fresh_uploaded(&done)).await?;
        crate::metrics::global().fresh_batch_uploaded(rows);
        info!(
            component = "batcher",
            lane = "fresh",
            key,
            rows,
            bytes = body.len(),
            first_seq = batch.first_seq,
            last_seq = batch.last_seq,
            new_run = batch.starts_run(),
            upload_ms = crate::millis(started.elapsed()),
            "fresh batch uploaded (copies; the main lane still uploads these readings)"
        );
        Ok(())
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StepError>
    where
        T: Send + 'static,
        F: FnOnce(&Buffer) -> Result<T, BufferError> + Send + 'static,
    {
        let buffer = Arc::clone(&self.buffer);
        tokio::task::spawn_blocking(move || f(&buffer))
            .await
            .map_err(|e| StepError::Fatal(BatcherError::Join(e.to_string())))?
            .map_err(|e| StepError::Fatal(e.into()))
    }
}

/// Reads the batch from the buffer and encodes it a slice at a time (see
/// [`super::parquet_file::ENCODE_CHUNK_ROWS`]). Returns the file, its rows and its gap records.
fn encode_batch(buffer: &Buffer, batch: &PendingBatch) -> Result<(Bytes, usize, usize), StepError> {
    let encode_error = |e: parquet::errors::ParquetError| {
        StepError::Fatal(BatcherError::Encode {
            first_seq: batch.first_seq,
            last_seq: batch.last_seq,
            message: e.to_string(),
        })
    };
    let buffer_error = |e: BufferError| StepError::Fatal(e.into());
    let gaps = buffer.batch_gaps(batch).map_err(buffer_error)?;
    let expected = usize::try_from(batch.last_seq - batch.first_seq + 1).unwrap_or(0);
    let mut encoder = BatchEncoder::new(expected).map_err(encode_error)?;
    let mut after = batch.first_seq.saturating_sub(1);
    let mut rows = 0;
    loop {
        let chunk = buffer
            .batch_rows_after(batch, after, ENCODE_CHUNK_ROWS)
            .map_err(buffer_error)?;
        let Some(last) = chunk.last() else { break };
        after = last.seq;
        rows += chunk.len();
        encoder.write(&chunk).map_err(encode_error)?;
        if chunk.len() < ENCODE_CHUNK_ROWS {
            break;
        }
    }
    let body = encoder.finish(&gaps).map_err(encode_error)?;
    Ok((body, rows, gaps.len()))
}

/// Reads a fresh-lane batch from the buffer and encodes it a slice at a time, as
/// [`encode_batch`] does. Returns the file and its rows.
fn encode_fresh(buffer: &Buffer, batch: &FreshBatch) -> Result<(Bytes, usize), StepError> {
    let encode_error = |e: parquet::errors::ParquetError| {
        StepError::Fatal(BatcherError::Encode {
            first_seq: batch.first_seq,
            last_seq: batch.last_seq,
            message: e.to_string(),
        })
    };
    let expected = usize::try_from(batch.rows).unwrap_or(0);
    let mut encoder = BatchEncoder::for_lane(expected, Lane::Fresh).map_err(encode_error)?;
    let mut after = batch.first_seq.saturating_sub(1);
    let mut rows = 0;
    loop {
        let chunk = buffer
            .fresh_rows_after(batch, after, ENCODE_CHUNK_ROWS)
            .map_err(|e| StepError::Fatal(e.into()))?;
        let Some(last) = chunk.last() else { break };
        after = last.seq;
        rows += chunk.len();
        encoder.write(&chunk).map_err(encode_error)?;
        if chunk.len() < ENCODE_CHUNK_ROWS {
            break;
        }
    }
    let body = encoder.finish(&[]).map_err(encode_error)?;
    Ok((body, rows))
}

enum StepError {
    /// The target refused or could not be reached: retry later.
    Upload(String),
    Fatal(BatcherError),
}

/// Spreads retries of many gateways over time: a random wait between half and all of `d`.
fn jittered(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Reading;
    use crate::config::{DirUpload, Durability, UploadConfig};
    use crate::contract::Quality;

    fn readings(range: std::ops::RangeInclusive<i64>) -> Vec<Reading> {
        range
            .map(|i| Reading {
                ts_us: 1_700_000_000_000_000 + i * 1000,
                device: "press-3".into(),
                tag: "oil_temp".into(),
                value: Some(i as f64 / 8.0),
                value_text: None,
                quality: Quality::Good,
                unit: Some("degC".into()),
            })
            .collect()
    }

    async fn setup(dir: &std::path::Path, max_rows: usize) -> (Arc<Buffer>, Batcher) {
        let buffer = Arc::new(Buffer::open(&dir.join("b.db"), Durability::Full, "gw-1").unwrap());
        let sink = BatchSink::from_config(&UploadConfig {
            s3: None,
            dir: Some(DirUpload {
                path: dir.join("landing"),
                prefix: "raw/".into(),
            }),
        })
        .await
        .unwrap();
        let config = BatchConfig {
            max_rows,
            max_age: crate::config::ConfigDuration::from_secs(3600),
            fresh_lane: false,
        };
        let batcher = Batcher::new(
            Arc::clone(&buffer),
            Arc::new(sink),
            config,
            "plant-a".into(),
        );
        (buffer, batcher)
    }

    fn key_path(dir: &std::path::Path, first_seq: i64) -> std::path::PathBuf {
        dir.join("landing")
            .join(BatchKey::new("gw-1", first_seq).to_key("raw/"))
    }

    #[tokio::test]
    async fn a_crash_between_put_and_delete_reuploads_the_same_key_with_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, _) = setup(dir.path(), 4).await;
        buffer.append(&readings(1..=6)).unwrap();
        // The first life of the agent cuts and uploads batch 1..=4, then dies before it could
        // forget the rows.
        let batch = buffer.cut_batch(4, "plant-a").unwrap().unwrap();
        let rows = buffer.batch_rows(&batch).unwrap();
        let first_upload = crate::batch::encode(&rows, &[]).unwrap();
        std::fs::create_dir_all(key_path(dir.path(), 1).parent().unwrap()).unwrap();
        std::fs::write(key_path(dir.path(), 1), &first_upload).unwrap();
        drop(buffer);

        // The next life: more readings arrived, but the pending batch keeps its range.
        let (buffer, mut batcher) = setup(dir.path(), 4).await;
        buffer.append(&readings(7..=9)).unwrap();
        assert!(
            batcher.step(false).await.ok().unwrap(),
            "the pending batch goes out first"
        );
        assert_eq!(
            std::fs::read(key_path(dir.path(), 1)).unwrap(),
            first_upload
        );
        assert_eq!(buffer.pending_batch().unwrap(), None);
        let stats = buffer.stats().unwrap();
        assert_eq!((stats.rows, stats.first_seq), (5, Some(5)));

        // The backlog of 5 rows is over max_rows, so the next batch is cut at once.
        assert!(batcher.step(false).await.ok().unwrap());
        let next = crate::batch::read_rows(std::fs::read(key_path(dir.path(), 5)).unwrap().into())
            .unwrap();
        assert_eq!(next.iter().map(|r| r.seq).collect::<Vec<_>>(), [5, 6, 7, 8]);
        // One row is left and not yet due.
        assert!(!batcher.step(false).await.ok().unwrap());
        assert_eq!(buffer.stats().unwrap().rows, 1);
    }

    #[tokio::test]
    async fn a_batch_encoded_a_slice_at_a_time_equals_the_whole_batch_encoded_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, _) = setup(dir.path(), 4).await;
        let rows = i64::try_from(ENCODE_CHUNK_ROWS * 2 + 5).unwrap();
        buffer.append(&readings(1..=rows)).unwrap();
        let batch = buffer.cut_batch(usize::MAX, "plant-a").unwrap().unwrap();
        let (streamed, count, gaps) = encode_batch(&buffer, &batch).ok().unwrap();
        assert_eq!((count, gaps), (ENCODE_CHUNK_ROWS * 2 + 5, 0));
        let whole = crate::batch::encode(&buffer.batch_rows(&batch).unwrap(), &[]).unwrap();
        assert_eq!(
            streamed, whole,
            "a retry by either path writes the same bytes"
        );
        let back = crate::batch::read_rows(streamed).unwrap();
        assert_eq!(
            back.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (1..=rows).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_fresh_lane_that_keeps_failing_never_holds_up_the_main_lane() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, mut batcher) = setup(dir.path(), 4).await;
        batcher.config.fresh_lane = true;
        buffer.append(&readings(1..=20)).unwrap();
        // A plain file where the fresh lane's folder belongs: every fresh upload fails.
        let gateway = dir.path().join("landing/raw/gateway=gw-1");
        std::fs::create_dir_all(&gateway).unwrap();
        std::fs::write(gateway.join("fresh"), "in the way").unwrap();
        let mut failures = 0;
        for _ in 0..20 {
            match batcher.step(false).await {
                Err(StepError::Upload(message)) => {
                    assert!(message.starts_with("fresh lane: "), "{message}");
                    failures += 1;
                }
                Err(StepError::Fatal(e)) => panic!("{e}"),
                Ok(_) => {}
            }
        }
        assert!(failures > 0, "the fresh lane was tried");
        // Every reading went up in the main lane, between the fresh lane's failures.
        assert_eq!(buffer.stats().unwrap().rows, 0);
        for first in [1, 5, 9, 13, 17] {
            assert!(key_path(dir.path(), first).exists(), "batch {first}");
        }
        assert_eq!(buffer.fresh_run().unwrap(), None);
    }

    #[tokio::test]
    async fn flush_ships_everything_regardless_of_age_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, mut batcher) = setup(dir.path(), 4).await;
        buffer.append(&readings(1..=10)).unwrap();
        batcher.flush(Duration::from_secs(10)).await.unwrap();
        assert_eq!(buffer.stats().unwrap().rows, 0);
        let mut seqs = Vec::new();
        for first in [1, 5, 9] {
            let rows =
                crate::batch::read_rows(std::fs::read(key_path(dir.path(), first)).unwrap().into())
                    .unwrap();
            seqs.extend(rows.iter().map(|r| r.seq));
        }
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    }
}
