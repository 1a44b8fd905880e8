//! The agent's main loop: sources → buffer writer → batcher → upload target.
//!
//! # The acknowledgement path
//! A source whose peer keeps a message until told it is safe (MQTT QoS 1) sends a
//! [`Delivery`](crate::sources::Delivery): the message's readings with a oneshot sender. The
//! buffer writer takes deliveries on their own channel, puts their readings into the next
//! transaction with the polled readings, and fires every oneshot of that transaction only after
//! it committed. A failed commit is retried with the oneshots held, so the source waits and
//! nothing is acknowledged that the buffer does not have; a writer that stops drops the
//! unfired oneshots, and the source leaves those messages to the broker.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span};

use crate::Reading;
use crate::batch::{Batcher, BatcherError};
use crate::buffer::{Buffer, BufferError};
use crate::config::AgentConfig;
use crate::sinks::kinesis::{KinesisShipper, LiveQueue};
use crate::sinks::{BatchSink, SinkError};
use crate::sources::Delivery;

/// How many readings may wait between the sources and the buffer writer. When the buffer falls
/// behind, sources wait instead of the agent's memory growing.
const CHANNEL_CAPACITY: usize = 10_000;
/// How many acknowledged-on-commit messages (each with its readings) may wait for the writer.
const DELIVERY_CAPACITY: usize = 1_000;
/// A commit happens at least this often when readings keep arriving faster than the interval.
const MAX_READINGS_PER_COMMIT: usize = 5_000;
/// How long the shutdown waits for sources to stop and for the last batches to upload.
const SOURCE_STOP_DEADLINE: Duration = Duration::from_secs(5);
const FLUSH_DEADLINE: Duration = Duration::from_secs(10);

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Batcher(#[from] BatcherError),
    #[error("the buffer writer stopped unexpectedly: {0}")]
    Writer(String),
}

/// Runs the agent until `shutdown` is cancelled, then stops the sources, commits every reading
/// they produced, and uploads what it can within a deadline. Whatever is not uploaded stays in
/// the buffer for the next start.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let buffer = {
        let path = config.buffer.path.clone();
        let durability = config.buffer.durability;
        let gateway = config.gateway.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || Buffer::open(&path, durability, &gateway))
                .await
                .map_err(|e| AgentError::Writer(e.to_string()))??,
        )
    };
    let sink = Arc::new(BatchSink::from_config(&config.upload).await?);
    let metrics_stop = shutdown.child_token();
    let metrics_server = crate::metrics::start(
        &config.metrics,
        buffer.path().to_owned(),
        metrics_stop.clone(),
    )
    .await;
    let stats = buffer.stats()?;
    info!(
        component = "agent",
        gateway = config.gateway,
        buffer = %buffer.path().display(),
        buffered = stats.rows,
        target = sink.describe(),
        "edge agent started"
    );

    let (tx, rx) = mpsc::channel::<Reading>(CHANNEL_CAPACITY);
    let tracker = TaskTracker::new();
    let sources_stop = shutdown.child_token();
    let (deliveries_tx, deliveries_rx) = mpsc::channel::<Delivery>(DELIVERY_CAPACITY);
    crate::sources::spawn_all(&config, &tx, &deliveries_tx, &sources_stop, &tracker);
    drop(tx);
    drop(deliveries_tx);
    tracker.close();

    // The live stream is a tee after the commit: it never holds up the buffer (see sinks::kinesis).
    let live = match &config.kinesis {
        Some(kinesis) => {
            let queue = LiveQueue::new(kinesis.queue_capacity);
            let shipper = KinesisShipper::new(kinesis, &config.gateway, queue.clone()).await;
            crate::metrics::global().kinesis_enabled();
            // Not a child of `shutdown`: it stops after the writer's last commit was queued.
            let stop = CancellationToken::new();
            let task = tokio::spawn(
                shipper
                    .run(stop.clone())
                    .instrument(info_span!("kinesis", component = "kinesis")),
            );
            Some((queue, stop, task))
        }
        None => None,
    };
    let writer = tokio::spawn(
        write_readings(
            rx,
            deliveries_rx,
            Arc::clone(&buffer),
            config.buffer.commit_interval.0,
            live.as_ref().map(|(queue, _, _)| queue.clone()),
        )
        .instrument(info_span!("buffer", component = "buffer")),
    );
    let mut batcher = Batcher::new(
        Arc::clone(&buffer),
        sink,
        config.batch.clone(),
        config.site.clone(),
    );
    let batcher_stop = shutdown.child_token();
    let batcher_result = batcher.run(batcher_stop).await;
    crate::metrics::global().batcher_stopped();

    // Shutdown: the sources stop, the writer commits what they sent and ends when the channel
    // closes, then the last batches go out.
    sources_stop.cancel();
    if tokio::time::timeout(SOURCE_STOP_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        error!(component = "agent", "sources did not stop in time");
    }
    let written = writer.await;
    // Every committed reading is queued now; the live stream sends the rest while the last
    // batches go out.
    if let Some((_, stop, _)) = &live {
        stop.cancel();
    }
    written.map_err(|e| AgentError::Writer(e.to_string()))??;
    batcher_result?;
    batcher.flush(FLUSH_DEADLINE).await?;
    if let Some((_, _, task)) = live {
        let _ = task.await;
    }
    metrics_stop.cancel();
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    let left = buffer.stats()?;
    info!(
        component = "agent",
        buffered = left.rows,
        "edge agent stopped"
    );
    Ok(())
}

/// Commits readings to the buffer in batched transactions until every sender is gone.
async fn write_readings(
    mut rx: mpsc::Receiver<Reading>,
    mut deliveries: mpsc::Receiver<Delivery>,
    buffer: Arc<Buffer>,
    interval: Duration,
    live: Option<LiveQueue>,
) -> Result<(), AgentError> {
    let mut pending = Vec::with_capacity(1024);
    // Fired after the commit that holds their readings (see the module doc).
    let mut committed: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    let mut readings_open = true;
    let mut deliveries_open = true;
    while readings_open || deliveries_open {
        let deadline = tokio::time::sleep(interval);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                got = rx.recv(), if readings_open => {
                    let Some(r) = got else {
                        readings_open = false;
                        if deliveries_open {
                            continue;
                        }
                        break;
                    };
                    pending.push(r);
                    if pending.len() >= MAX_READINGS_PER_COMMIT {
                        break;
                    }
                },
                got = deliveries.recv(), if deliveries_open => {
                    let Some(delivery) = got else {
                        deliveries_open = false;
                        if readings_open {
                            continue;
                        }
                        break;
                    };
                    pending.extend(delivery.readings);
                    committed.push(delivery.committed);
                    if pending.len() >= MAX_READINGS_PER_COMMIT {
                        break;
                    }
                },
                () = &mut deadline => break,
            }
        }
        // A failed commit (disk full, I/O error) keeps the readings and retries; meanwhile the
        // bounded channel makes the sources wait instead of dropping what they read.
        let mut retry = Duration::from_millis(200);
        while !pending.is_empty() {
            let chunk = std::mem::take(&mut pending);
            let buf = Arc::clone(&buffer);
            let (chunk, result) = tokio::task::spawn_blocking(move || {
                let result = buf.append(&chunk);
                (chunk, result)
            })
            .await
            .map_err(|e| AgentError::Writer(e.to_string()))?;
            match result {
                Ok(seqs) => {
                    crate::metrics::global().readings_committed(&chunk);
                    if let (Some(live), Some((first, _))) = (&live, seqs) {
                        live.push(first, &chunk);
                    }
                    pending = chunk;
                    pending.clear();
                    break;
                }
                Err(e) => {
                    crate::metrics::global().commit_failed(&e);
                    error!(
                        readings = chunk.len(),
                        retry_in_ms = crate::millis(retry),
                        "commit to buffer failed: {e}"
                    );
                    pending = chunk;
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(Duration::from_secs(10));
                }
            }
        }
        // Everything taken so far is committed now.
        for notify in committed.drain(..) {
            // A source that stopped waiting no longer needs to know.
            let _ = notify.send(());
        }
    }
    Ok(())
}
