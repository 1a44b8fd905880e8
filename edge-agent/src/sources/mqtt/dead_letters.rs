//! The task that commits one broker's dead letters to the buffer file and tells the acker when
//! each is safe, so a bad message is acknowledged only after its row exists (see
//! [`crate::buffer::dead_letter`] for the table and its bound).
//!
//! Letters that arrive while a commit runs go into the next one, so a sensor that floods the
//! broker with garbage costs one transaction per burst, not one per message. A commit that fails
//! (disk full, the file locked longer than the busy timeout) is retried with backoff while its
//! letters' notifications are held: those messages stay unacknowledged, exactly as readings the
//! buffer does not have yet, and the broker keeps them.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::buffer::BufferError;
use crate::buffer::dead_letter::{DeadLetter, DeadLetterStore};

/// Most dead letters in one transaction.
const MAX_PER_COMMIT: usize = 256;
const RETRY_START: Duration = Duration::from_millis(200);
const RETRY_CAP: Duration = Duration::from_secs(10);

/// A dead letter on its way to the table, with the notification the acker waits for.
#[derive(Debug)]
pub(super) struct Recording {
    pub(super) letter: DeadLetter,
    pub(super) committed: oneshot::Sender<()>,
}

/// The writer side of one broker's dead letters.
pub(super) struct DeadLetterWriter {
    buffer: PathBuf,
    broker: String,
    keep: u32,
    store: Option<DeadLetterStore>,
}

impl DeadLetterWriter {
    /// Opens the table now, so a problem with the buffer file shows at start-up; a store that
    /// cannot be opened yet is opened again at the first dead letter.
    pub(super) async fn open(buffer: PathBuf, broker: String, keep: u32) -> Self {
        let path = buffer.clone();
        let store = match tokio::task::spawn_blocking(move || DeadLetterStore::open(&path)).await {
            Ok(Ok(store)) => Some(store),
            Ok(Err(e)) => {
                warn!(
                    "cannot open the dead-letter table yet: {e}; trying again at the first bad payload"
                );
                None
            }
            Err(e) => {
                error!("opening the dead-letter table failed: {e}");
                None
            }
        };
        Self {
            buffer,
            broker,
            keep,
            store,
        }
    }

    /// Commits what `queue` brings until it closes, or until `stop` while a commit keeps
    /// failing (the held messages then stay with the broker).
    pub(super) async fn run(
        mut self,
        mut queue: mpsc::Receiver<Recording>,
        stop: CancellationToken,
    ) {
        let mut batch: Vec<Recording> = Vec::new();
        loop {
            match queue.recv().await {
                Some(recording) => batch.push(recording),
                None => return,
            }
            while batch.len() < MAX_PER_COMMIT {
                match queue.try_recv() {
                    Ok(recording) => batch.push(recording),
                    Err(_) => break,
                }
            }
            let (letters, notify): (Vec<DeadLetter>, Vec<oneshot::Sender<()>>) =
                batch.drain(..).map(|r| (r.letter, r.committed)).unzip();
            if !self.commit_with_retry(letters, &stop).await {
                // Stopping, or the commit task died: the notifications are dropped unfired, so
                // nothing is acknowledged and the broker sends these messages again.
                if stop.is_cancelled() {
                    return;
                }
                continue;
            }
            for committed in notify {
                // The acker may have stopped waiting (the source is stopping); nothing to do.
                let _ = committed.send(());
            }
        }
    }

    /// Commits `letters`, retrying with backoff until it works (`true`) or `stop` (`false`).
    async fn commit_with_retry(
        &mut self,
        letters: Vec<DeadLetter>,
        stop: &CancellationToken,
    ) -> bool {
        let mut retry = RETRY_START;
        let mut letters = letters;
        loop {
            let Some((back, result)) = self.commit(letters).await else {
                return false;
            };
            letters = back;
            match result {
                Ok(dropped) => {
                    if dropped > 0 {
                        crate::metrics::global().mqtt_dead_letters_dropped(&self.broker, dropped);
                        info!(
                            dropped,
                            max_dead_letters = self.keep,
                            "oldest dead letters dropped to stay within max_dead_letters"
                        );
                    }
                    return true;
                }
                Err(e) => {
                    error!(
                        dead_letters = letters.len(),
                        retry_in_ms = crate::millis(retry),
                        "cannot commit dead letters, their messages stay unacknowledged: {e}"
                    );
                    tokio::select! {
                        () = stop.cancelled() => return false,
                        () = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_CAP);
                }
            }
        }
    }

    /// One transaction on a blocking thread; the letters come back for a retry. `None` when
    /// the blocking task panicked and took the letters with it.
    async fn commit(
        &mut self,
        letters: Vec<DeadLetter>,
    ) -> Option<(Vec<DeadLetter>, Result<u64, BufferError>)> {
        let store = self.store.take();
        let buffer = self.buffer.clone();
        let keep = self.keep;
        let joined = tokio::task::spawn_blocking(move || {
            let mut store = match store {
                Some(store) => store,
                None => match DeadLetterStore::open(&buffer) {
                    Ok(store) => store,
                    Err(e) => return (None, letters, Err(e)),
                },
            };
            let result = store.record(&letters, keep);
            // After a failure the connection is opened afresh: it may be the cause.
            let store = result.is_ok().then_some(store);
            (store, letters, result)
        })
        .await;
        match joined {
            Ok((store, letters, result)) => {
                self.store = store;
                Some((letters, result))
            }
            Err(e) => {
                error!("the dead-letter commit failed: {e}");
                None
            }
        }
    }
}
