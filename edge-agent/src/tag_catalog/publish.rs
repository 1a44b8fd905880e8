//! Uploading the tag catalog: a task beside the batcher that takes the newest catalog offered
//! (at start, after each accepted reload) and puts it into the raw zone through the agent's
//! upload target, unless the gateway already published that content.
//!
//! The last published hash is kept in a small state file beside the buffer
//! (`<buffer>.tag-catalog`), written only after the store confirmed the PUT. Losing the file
//! costs one re-upload of the same content under a new time, which the collector takes as "no
//! change".

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::build::build;
use super::format::TagCatalog;
use crate::config::AgentConfig;
use crate::sinks::BatchSink;

/// The first retry of a failed upload waits this long; each further one twice as long.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// No retry waits longer than this, however long the store has been away.
const MAX_RETRY: Duration = Duration::from_mins(5);

/// The handle that offers catalogs to the publishing task; cheap to clone.
#[derive(Debug, Clone)]
pub struct CatalogPublisher {
    latest: Arc<watch::Sender<Option<Arc<TagCatalog>>>>,
}

impl CatalogPublisher {
    /// Starts the task that publishes through `sink`, remembering what it published beside
    /// the buffer at `buffer_path`, until `shutdown` is cancelled (a catalog not uploaded by then
    /// is uploaded at the next start), and offers the catalog of `config`, the map it starts with.
    pub fn start(
        sink: &Arc<BatchSink>,
        config: &AgentConfig,
        buffer_path: &Path,
        shutdown: &CancellationToken,
    ) -> (Self, JoinHandle<()>) {
        let (latest, offered) = watch::channel(Some(Arc::new(build(config, now_us()))));
        let latest = Arc::new(latest);
        let publisher = Publisher {
            sink: Arc::clone(sink),
            state_file: state_file(buffer_path),
            offered,
            latest: Arc::downgrade(&latest),
            stop: shutdown.child_token(),
        };
        let task = tokio::spawn(
            publisher
                .run()
                .instrument(info_span!("tag_catalog", component = "tag_catalog")),
        );
        (Self { latest }, task)
    }

    /// A handle whose catalogs go nowhere, for tests of the code that offers them.
    #[cfg(test)]
    pub(crate) fn unstarted() -> Self {
        Self {
            latest: Arc::new(watch::channel(None).0),
        }
    }

    /// Offers the catalog of the sensor map `config`, effective now. It replaces a catalog
    /// still waiting for its upload; it is uploaded only if its content differs from what the
    /// gateway last published.
    pub fn offer(&self, config: &AgentConfig) {
        let catalog = build(config, now_us());
        self.latest.send_replace(Some(Arc::new(catalog)));
    }
}

/// Where the hash of the last published catalog is kept: beside the buffer, which lives on the
/// gateway's persistent storage.
pub fn state_file(buffer_path: &Path) -> PathBuf {
    let mut name = buffer_path.as_os_str().to_owned();
    name.push(".tag-catalog");
    PathBuf::from(name)
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

struct Publisher {
    sink: Arc<BatchSink>,
    state_file: PathBuf,
    offered: watch::Receiver<Option<Arc<TagCatalog>>>,
    /// The channel's sending side, to empty its slot once a catalog is done with. Weak, so
    /// the channel still closes when every [`CatalogPublisher`] is gone.
    latest: Weak<watch::Sender<Option<Arc<TagCatalog>>>>,
    stop: CancellationToken,
}

/// How one upload attempt series ended.
enum Outcome {
    Published,
    /// A newer catalog was offered while this one waited for a retry.
    Superseded,
    Stopped,
}

impl Publisher {
    async fn run(mut self) {
        let mut published = read_state(&self.state_file).await;
        loop {
            let current = self.offered.borrow_and_update().clone();
            if let Some(catalog) = current {
                if published.as_deref() == Some(catalog.hash.as_str()) {
                    debug!(
                        hash = catalog.hash,
                        "tag catalog unchanged since the last one published; not uploaded"
                    );
                } else {
                    match self.upload(&catalog).await {
                        Outcome::Published => published = Some(catalog.hash.clone()),
                        // The newest catalog is taken at the top of the loop.
                        Outcome::Superseded => continue,
                        Outcome::Stopped => return,
                    }
                }
                self.done_with(&catalog);
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                changed = self.offered.changed() => {
                    if changed.is_err() {
                        // Every handle is gone: no catalog will come any more.
                        return;
                    }
                }
            }
        }
    }

    /// Lets go of `catalog` once it is published or found unchanged: a catalog is about 400
    /// bytes a tag (4 MB at 10,000 tags) and nothing needs it until the next edit offers a new
    /// one. The channel's slot is emptied only if it still holds this very catalog (a newer one
    /// offered meanwhile stays), and without a change notice, so nothing is uploaded for it.
    fn done_with(&self, catalog: &Arc<TagCatalog>) {
        if let Some(latest) = self.latest.upgrade() {
            latest.send_if_modified(|slot| {
                if slot.as_ref().is_some_and(|held| Arc::ptr_eq(held, catalog)) {
                    *slot = None;
                }
                false
            });
        }
    }

    /// Puts `catalog` until the store confirms it, a newer one is offered, or the agent stops.
    async fn upload(&mut self, catalog: &TagCatalog) -> Outcome {
        let key = catalog.key().to_key(self.sink.prefix());
        let body = match serde_json::to_vec_pretty(catalog) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                // Strings and integers only: serialising cannot fail.
                warn!(key, "tag catalog cannot be serialised: {e}");
                return Outcome::Stopped;
            }
        };
        let mut retry = FIRST_RETRY;
        loop {
            let put = tokio::select! {
                () = self.stop.cancelled() => return Outcome::Stopped,
                put = self.sink.put(&key, body.clone()) => put,
            };
            match put {
                Ok(()) => {
                    info!(
                        key,
                        tags = catalog.tags.len(),
                        hash = catalog.hash,
                        "tag catalog published"
                    );
                    if let Err(e) = write_state(&self.state_file, &catalog.hash).await {
                        warn!(
                            file = %self.state_file.display(),
                            "cannot record the published tag catalog ({e}); it is uploaded again at the next start"
                        );
                    }
                    return Outcome::Published;
                }
                Err(e) => {
                    warn!(
                        key,
                        retry_in_ms = crate::millis(retry),
                        "tag catalog upload failed, readings are not affected: {e}"
                    );
                    let (offered, stop) = (&mut self.offered, &self.stop);
                    let newer = async {
                        // A closed channel offers nothing newer: wait out the pause.
                        if offered.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    };
                    tokio::select! {
                        () = stop.cancelled() => return Outcome::Stopped,
                        () = newer => return Outcome::Superseded,
                        () = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }
}

async fn read_state(path: &Path) -> Option<String> {
    match tokio::fs::read_to_string(path).await {
        Ok(text) => Some(text.trim().to_owned()).filter(|hash| !hash.is_empty()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            warn!(
                file = %path.display(),
                "cannot read the record of the published tag catalog ({e}); the catalog is uploaded again"
            );
            None
        }
    }
}

/// Writes the hash through a temporary file and a rename, so a power cut leaves the old record
/// or the new one, never half of one.
async fn write_state(path: &Path, hash: &str) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    tokio::fs::write(&temporary, format!("{hash}\n")).await?;
    tokio::fs::rename(&temporary, path).await
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;
    use crate::tag_catalog::CatalogKey;

    fn map(dir: &Path, tags: &[&str]) -> AgentConfig {
        let mut text = format!(
            "site = \"plant-ost\"\ngateway = \"gw-1\"\n[upload.dir]\npath = \"{}\"\n\n[[modbus]]\nname = \"press-3\"\nhost = \"127.0.0.1\"\n",
            dir.join("outbox").display()
        );
        for (address, tag) in tags.iter().enumerate() {
            let _ = write!(
                text,
                "[[modbus.tags]]\nname = \"{tag}\"\nregister = \"holding\"\naddress = {address}\ntype = \"u16\"\n"
            );
        }
        crate::config::load_str(&text, &dir.join("agent.toml"))
            .unwrap_or_else(|e| panic!("the test map is valid: {e}"))
    }

    /// The catalogs in the outbox, as their tag names, oldest first.
    fn published(dir: &Path) -> Vec<Vec<String>> {
        let folder = dir
            .join("outbox")
            .join(CatalogKey::gateway_prefix("raw/", "gw-1"));
        pipeline_e2e::sorted_files(&folder)
            .iter()
            .map(|f| {
                let catalog: TagCatalog =
                    serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
                catalog.tags.iter().map(|t| t.tag.clone()).collect()
            })
            .collect()
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "{what} within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_published_catalog_is_let_go_and_the_next_edit_is_still_published() {
        let dir = tempfile::tempdir().unwrap();
        let first = map(dir.path(), &["oil_temp", "stroke_count"]);
        let sink = Arc::new(BatchSink::from_config(&first.upload).await.unwrap());
        let shutdown = CancellationToken::new();
        let buffer = dir.path().join("buffer.db");
        let (publisher, task) = CatalogPublisher::start(&sink, &first, &buffer, &shutdown);
        let held = Arc::downgrade(
            publisher
                .latest
                .borrow()
                .as_ref()
                .expect("the start offers the first map's catalog"),
        );
        until("the first catalog is published", || {
            published(dir.path()).len() == 1
        })
        .await;
        // Once published, nothing holds the catalog any more: not the channel, not the task.
        until("the published catalog is freed", || {
            held.upgrade().is_none()
        })
        .await;
        assert!(publisher.latest.borrow().is_none());

        // The same map offered again is unchanged: not uploaded, and let go as well.
        publisher.offer(&first);
        let again = Arc::downgrade(publisher.latest.borrow().as_ref().unwrap());
        until("the unchanged catalog is freed", || {
            again.upgrade().is_none()
        })
        .await;
        assert_eq!(published(dir.path()).len(), 1);

        // An edit still goes up after the slot was emptied.
        publisher.offer(&map(dir.path(), &["oil_temp", "stroke_count", "pressure"]));
        until("the edited catalog is published", || {
            published(dir.path()).len() == 2
        })
        .await;
        assert_eq!(
            published(dir.path())[1],
            ["oil_temp", "pressure", "stroke_count"]
        );
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn the_state_file_sits_beside_the_buffer() {
        assert_eq!(
            state_file(Path::new("/var/lib/edge-agent/buffer.db")),
            Path::new("/var/lib/edge-agent/buffer.db.tag-catalog")
        );
    }
}
