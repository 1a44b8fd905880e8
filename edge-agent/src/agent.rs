//! The agent's main loop: sources → buffer writer → batcher → upload target.

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
use crate::sinks::{BatchSink, SinkError};

/// How many readings may wait between the sources and the buffer writer. When the buffer falls
/// behind, sources wait instead of the agent's memory growing.
const CHANNEL_CAPACITY: usize = 10_000;
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
    crate::sources::spawn_all(&config, &tx, &sources_stop, &tracker);
    drop(tx);
    tracker.close();

    let writer = tokio::spawn(
        write_readings(rx, Arc::clone(&buffer), config.buffer.commit_interval.0)
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

    // Shutdown: the sources stop, the writer commits what they sent and ends when the channel
    // closes, then the last batches go out.
    sources_stop.cancel();
    if tokio::time::timeout(SOURCE_STOP_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        error!(component = "agent", "sources did not stop in time");
    }
    writer
        .await
        .map_err(|e| AgentError::Writer(e.to_string()))??;
    batcher_result?;
    batcher.flush(FLUSH_DEADLINE).await?;
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
    buffer: Arc<Buffer>,
    interval: Duration,
) -> Result<(), AgentError> {
    let mut pending = Vec::with_capacity(1024);
    let mut open = true;
    while open {
        let deadline = tokio::time::sleep(interval);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                got = rx.recv() => {
                    let Some(r) = got else {
                        open = false;
                        break;
                    };
                    pending.push(r);
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
                Ok(_) => {
                    pending = chunk;
                    pending.clear();
                    break;
                }
                Err(e) => {
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
    }
    Ok(())
}
