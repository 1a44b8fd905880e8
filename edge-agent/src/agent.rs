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
//!
//! # Config reloads
//! With [`run_with_reload`] the agent applies edits of its config file while it runs: on SIGHUP
//! and when a poll of the file ([`ReloadOptions::watch_interval`]) finds new content. An edit is
//! read and validated exactly as at startup; the sources part is handed to the
//! [`Supervisor`](crate::sources::Supervisor), which restarts only the sources that changed
//! (see its module doc for what always holds). The buffer, batch, upload, metrics and Kinesis
//! settings and `site` take effect only at a restart: an edit of them is logged with the
//! sections to restart for, and its sources part is still applied. An edit that does not load
//! (TOML syntax, validation) or that changes `gateway` is rejected as a whole: the validation
//! report is logged, the running map stays in force, and a later edit is tried afresh. Each
//! attempt counts in `plantline_agent_config_reloads_total{result="applied"|"rejected"}`.
//! Every applied edit (and the start) offers the map's tag catalog ([`crate::tag_catalog`]),
//! which is uploaded when its content changed; `[assets]` and descriptions apply without a
//! restart.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::Signal;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::Reading;
use crate::batch::{Batcher, BatcherError};
use crate::buffer::{Buffer, BufferError};
use crate::config::{self, AgentConfig, ConfigError};
use crate::sinks::kinesis::{KinesisShipper, LiveQueue};
use crate::sinks::{BatchSink, SinkError};
use crate::sources::supervisor::{self, Applied, UnitKey};
use crate::sources::{Delivery, SourceContext, Supervisor};
use crate::tag_catalog::CatalogPublisher;

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

/// How the running agent learns that its config file was edited (see [`run_with_reload`]).
#[derive(Debug, Clone)]
pub struct ReloadOptions {
    /// The config file the agent was started from.
    pub path: PathBuf,
    /// How often the file is looked at (size, modification time and inode; the content when
    /// those changed). `None`: only SIGHUP asks for a reload.
    pub watch_interval: Option<Duration>,
    /// Whether SIGHUP asks for a reload. Listening for it also keeps SIGHUP from ending the
    /// process.
    pub sighup: bool,
    /// The [`config::digest`] of the file's bytes that the starting config was parsed from
    /// ([`config::load_file_with_digest`]). When the file still holds them at the first look,
    /// it is not parsed a second time. `None`: the first look parses the file and compares.
    pub started_digest: Option<u64>,
}

impl ReloadOptions {
    /// The file is looked at this often unless told otherwise.
    pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(3);

    /// Reloads `path` on SIGHUP and when it changes, looking every
    /// [`DEFAULT_WATCH_INTERVAL`](Self::DEFAULT_WATCH_INTERVAL).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            watch_interval: Some(Self::DEFAULT_WATCH_INTERVAL),
            sighup: true,
            started_digest: None,
        }
    }
}

/// Runs the agent until `shutdown` is cancelled, then stops the sources, commits every reading
/// they produced, and uploads what it can within a deadline. Whatever is not uploaded stays in
/// the buffer for the next start. The sensor map stays as given; see [`run_with_reload`] for
/// an agent that follows edits of its config file.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    run_agent(config, None, shutdown).await
}

/// Runs the agent like [`run`], and applies edits of the config file at `reload.path` (which
/// `config` was loaded from) while it runs; see the module doc for what an edit may change.
pub async fn run_with_reload(
    config: AgentConfig,
    reload: ReloadOptions,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    run_agent(config, Some(reload), shutdown).await
}

async fn run_agent(
    config: AgentConfig,
    reload: Option<ReloadOptions>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    // First of all, so that a SIGHUP sent as soon as the process runs does not end it.
    let hangup = listen_for_hangup(reload.as_ref());
    let buffer = {
        let path = config.buffer.path.clone();
        let durability = config.buffer.durability;
        let gateway = config.gateway.clone();
        let bounds = crate::buffer::Bounds::from_config(&config.buffer);
        Arc::new(
            tokio::task::spawn_blocking(move || {
                Buffer::open_bounded(&path, durability, &gateway, bounds)
            })
            .await
            .map_err(|e| AgentError::Writer(e.to_string()))??,
        )
    };
    let sink = Arc::new(BatchSink::from_config(&config.upload).await?);
    // Beside the batcher, never in its way: a slow or failing catalog upload holds up nothing.
    let (catalog, publishing) = CatalogPublisher::start(&sink, &config, buffer.path(), &shutdown);
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
    let (deliveries_tx, deliveries_rx) = mpsc::channel::<Delivery>(DELIVERY_CAPACITY);
    let sources_stop = shutdown.child_token();
    // The supervisor holds the only senders: the writer ends once it dropped them at shutdown.
    let senders = (tx, deliveries_tx);
    let sources = start_sources(
        &config,
        senders,
        (reload, catalog.clone()),
        hangup,
        &sources_stop,
    )
    .await;
    // Under systemd (Type=notify): collecting from here on; the watchdog is fed while healthy.
    let watchdog_stop = shutdown.child_token();
    let notifier = crate::sd_notify::ready(&config.gateway, watchdog_stop.clone());

    let live = start_live_stream(&config).await;
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
    // Every part has what it needs now; a large sensor map is megabytes per copy. What parsing
    // it took (tens of MB for a large map) is free, but glibc keeps it until asked, and the
    // kernel keeps the code that did it mapped.
    drop(config);
    crate::memory::release_in_background(crate::memory::After::StartUp);
    let batcher_stop = shutdown.child_token();
    let batcher_result = batcher.run(batcher_stop).await;
    crate::metrics::global().batcher_stopped();
    watchdog_stop.cancel();
    if let Some(notifier) = &notifier {
        notifier.notify("STOPPING=1\nSTATUS=stopping: committing and uploading what was read");
    }

    // Shutdown: the sources stop, the writer commits what they sent and ends when the channel
    // closes, then the last batches go out.
    sources_stop.cancel();
    if let Err(e) = sources.await {
        error!(component = "agent", "the source supervisor failed: {e}");
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
    let _ = publishing.await;
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

/// The Kinesis live stream, when configured: its queue, its stop token and its task. It is a
/// tee after the commit and never holds up the buffer (see `sinks::kinesis`).
async fn start_live_stream(
    config: &AgentConfig,
) -> Option<(LiveQueue, CancellationToken, tokio::task::JoinHandle<()>)> {
    let kinesis = config.kinesis.as_ref()?;
    let queue = LiveQueue::new(kinesis.queue_capacity);
    let shipper = KinesisShipper::new(kinesis, &config.gateway, queue.clone()).await;
    crate::metrics::global().kinesis_enabled();
    // Not a child of the agent's shutdown: it stops after the writer's last commit was queued.
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        shipper
            .run(stop.clone())
            .instrument(info_span!("kinesis", component = "kinesis")),
    );
    Some((queue, stop, task))
}

/// How often a writer held back by a full buffer looks again.
const ROOM_POLL: Duration = Duration::from_millis(100);

/// Returns once the buffer has room for another commit, at once unless the buffer applies
/// backpressure and is at `max_bytes`. Also returns when every source has gone (shutdown), so
/// what they handed over is still committed.
async fn wait_for_room(
    buffer: &Arc<Buffer>,
    rx: &mpsc::Receiver<Reading>,
    deliveries: &mpsc::Receiver<Delivery>,
) -> Result<(), AgentError> {
    if buffer.bounds().on_full != crate::config::FullPolicy::Backpressure {
        return Ok(());
    }
    let mut since: Option<tokio::time::Instant> = None;
    loop {
        let buf = Arc::clone(buffer);
        let room = tokio::task::spawn_blocking(move || buf.has_room())
            .await
            .map_err(|e| AgentError::Writer(e.to_string()))??;
        if room || (rx.is_closed() && deliveries.is_closed()) {
            if let Some(since) = since {
                info!(
                    held_ms = crate::millis(since.elapsed()),
                    "the buffer has room again; taking readings from the sources"
                );
            }
            return Ok(());
        }
        if since.is_none() {
            since = Some(tokio::time::Instant::now());
            let used = buffer.used_bytes().unwrap_or(0);
            tracing::warn!(
                used_bytes = used,
                max_bytes = buffer.bounds().max_bytes,
                "the buffer is full (on_full = \"backpressure\"); holding the sources back until an upload frees room"
            );
        }
        tokio::time::sleep(ROOM_POLL).await;
    }
}

/// Readings the writer's commit buffer keeps room for between commits (about 130 KB).
const PENDING_KEPT: usize = 1024;

/// Commits readings to the buffer in batched transactions until every sender is gone.
async fn write_readings(
    mut rx: mpsc::Receiver<Reading>,
    mut deliveries: mpsc::Receiver<Delivery>,
    buffer: Arc<Buffer>,
    interval: Duration,
    live: Option<LiveQueue>,
) -> Result<(), AgentError> {
    let mut pending = Vec::with_capacity(PENDING_KEPT);
    // Fired after the commit that holds their readings (see the module doc).
    let mut committed: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    let mut readings_open = true;
    let mut deliveries_open = true;
    while readings_open || deliveries_open {
        // With on_full = "backpressure" a full buffer takes nothing more until the batcher
        // frees room: the channels fill and the sources wait (the README says what each source
        // does meanwhile). One commit's worth can go over the bound, never more.
        wait_for_room(&buffer, &rx, &deliveries).await?;
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
                    // A large gateway's commit holds thousands of readings once a second;
                    // between them the room goes back (it is its own mapping at that size).
                    pending.shrink_to(PENDING_KEPT);
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

/// SIGHUP, when `reload` asks for it and it can be had.
fn listen_for_hangup(reload: Option<&ReloadOptions>) -> Option<Signal> {
    if !reload.is_some_and(|options| options.sighup) {
        return None;
    }
    crate::process::listen_for_reload()
        .inspect_err(|e| {
            error!(
                component = "config",
                "cannot listen for SIGHUP ({e}); config edits are applied only by the file watch"
            );
        })
        .ok()
}

/// Starts the sources of `config` and the task that supervises them (and applies config edits,
/// with `reload`) until `stop` is cancelled.
async fn start_sources(
    config: &AgentConfig,
    (readings, deliveries): (mpsc::Sender<Reading>, mpsc::Sender<Delivery>),
    (reload, catalog): (Option<ReloadOptions>, CatalogPublisher),
    hangup: Option<Signal>,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let context = SourceContext {
        readings,
        deliveries,
        buffer: config.buffer.path.clone(),
    };
    let map_path = reload
        .as_ref()
        .map(|options| options.path.display().to_string())
        .unwrap_or_default();
    crate::metrics::live().map_loaded(&map_path, &config.site, &config.gateway);
    let supervisor = Supervisor::start(config, context, stop);
    let reloader = match reload {
        Some(options) => Some(Reloader::new(options, config, hangup, catalog).await),
        None => None,
    };
    tokio::spawn(
        supervise(supervisor, reloader, stop.clone())
            .instrument(info_span!("config", component = "config")),
    )
}

/// Runs the sources until `stop` is cancelled, applying config edits as `reloader` finds them,
/// then stops every source within [`SOURCE_STOP_DEADLINE`].
async fn supervise(
    mut supervisor: Supervisor,
    reloader: Option<Reloader>,
    stop: CancellationToken,
) {
    if let Some(mut reloader) = reloader {
        loop {
            let edit = tokio::select! {
                () = stop.cancelled() => break,
                edit = reloader.next_edit() => edit,
            };
            reloader.apply(edit, &mut supervisor).await;
            // Checking an edit parsed the whole file again; its parser state is free now.
            crate::memory::release_in_background(crate::memory::After::Edit);
        }
    } else {
        stop.cancelled().await;
    }
    supervisor.shutdown(SOURCE_STOP_DEADLINE).await;
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The file changed between the load at startup and the watch's first look.
    Startup,
    Hangup,
    FileChanged,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "changed during startup",
            Trigger::Hangup => "SIGHUP",
            Trigger::FileChanged => "file changed",
        }
    }
}

/// The config file's text at one reload.
#[derive(Debug)]
struct Edit {
    trigger: Trigger,
    text: Result<String, ConfigError>,
}

/// Why an edit was not applied.
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    /// The same report `edge-agent validate` prints.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error(
        "{}: gateway: the running agent is gateway `{running}` and the edited file says `{edited}`; the gateway id cannot change while the agent runs (readings are numbered per gateway and the buffer belongs to `{running}`), so put back gateway = \"{running}\"",
        path.display()
    )]
    GatewayChanged {
        path: PathBuf,
        running: String,
        edited: String,
    },
}

/// Unit keys for a log line: `modbus/press-3, mqtt/line2`.
fn names(keys: &[UnitKey]) -> String {
    keys.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a reload did to the sources, in words: `restarted modbus/press-3; stopped
/// file_drop/stand-1; 4 unchanged`.
fn summary(plan: &supervisor::Plan) -> String {
    let mut parts = Vec::new();
    for (what, keys) in [
        ("started", &plan.start),
        ("restarted", &plan.restart),
        ("stopped", &plan.stop),
    ] {
        if !keys.is_empty() {
            parts.push(format!("{what} {}", names(keys)));
        }
    }
    if parts.is_empty() {
        parts.push("no source changed".to_owned());
    }
    parts.push(format!("{} unchanged", plan.keep.len()));
    parts.join("; ")
}

/// The settings of `edited` that differ from `running` and apply only at a restart, named as
/// in the file.
fn restart_only_changes(running: &AgentConfig, edited: &AgentConfig) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if running.site != edited.site {
        changed.push("`site`");
    }
    if running.buffer != edited.buffer {
        changed.push("[buffer]");
    }
    if running.batch != edited.batch {
        changed.push("[batch]");
    }
    if running.upload != edited.upload {
        changed.push("[upload]");
    }
    if running.metrics != edited.metrics {
        changed.push("[metrics]");
    }
    if running.kinesis != edited.kinesis {
        changed.push("[kinesis]");
    }
    changed
}

/// `config` without the sources of its sensor map (devices, buses, brokers, drop folders and
/// assets): what a reload compares with the start once the supervisor runs the sources. A map of
/// 10,000 tags is megabytes per copy, and the reloader keeps this one for the agent's lifetime.
fn without_sources(config: &AgentConfig) -> AgentConfig {
    AgentConfig {
        site: config.site.clone(),
        gateway: config.gateway.clone(),
        buffer: config.buffer.clone(),
        batch: config.batch.clone(),
        upload: config.upload.clone(),
        modbus: Vec::new(),
        modbus_bus: Vec::new(),
        mqtt: Vec::new(),
        file_drop: Vec::new(),
        metrics: config.metrics.clone(),
        kinesis: config.kinesis.clone(),
        assets: config::Assets::default(),
    }
}

/// Whether `edited` differs from `running` in anything a reload looks at.
fn differs(running: &AgentConfig, edited: &AgentConfig) -> bool {
    running.gateway != edited.gateway
        || !restart_only_changes(running, edited).is_empty()
        || supervisor::units(running) != supervisor::units(edited)
}

/// Reads the config file, with the stamp it had just before (see [`FileWatch`]).
async fn read_config(path: &Path) -> (Option<Stamp>, Result<Vec<u8>, ConfigError>) {
    let stamp = Stamp::read(path).await.ok();
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        });
    (stamp, bytes)
}

/// The file's bytes as text, refused like `load_file` refuses a file that is not UTF-8.
fn into_text(path: &Path, bytes: Vec<u8>) -> Result<String, ConfigError> {
    String::from_utf8(bytes).map_err(|e| ConfigError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
    })
}

/// Finds config edits and applies them (see the module doc).
struct Reloader {
    path: PathBuf,
    /// The config the agent started with, without its sources ([`without_sources`]): gateway
    /// and restart-only settings are compared with it, so an edit of them is reported at every
    /// reload until the agent restarts.
    started: AgentConfig,
    watch: Option<FileWatch>,
    hangup: Option<Signal>,
    /// An edit to apply before waiting for the next one.
    pending: Option<Edit>,
    /// The Modbus devices of the map in force, so the status page forgets removed ones.
    modbus_devices: BTreeSet<String>,
    /// Publishes the tag catalog of every map applied.
    catalog: CatalogPublisher,
}

impl Reloader {
    async fn new(
        options: ReloadOptions,
        started: &AgentConfig,
        hangup: Option<Signal>,
        catalog: CatalogPublisher,
    ) -> Self {
        crate::metrics::global().config_reload_enabled();
        let mut pending = None;
        let watch = match options.watch_interval {
            Some(interval) => {
                let mut watch = FileWatch::new(options.path.clone(), interval);
                // The file may have changed since it was loaded for the start: what the watch
                // takes as its baseline must be what runs.
                let (stamp, bytes) = read_config(&options.path).await;
                let text = bytes.and_then(|bytes| {
                    watch.saw(stamp, &bytes);
                    into_text(&options.path, bytes)
                });
                // `saw` took the digest of what was read, if anything was.
                let same_bytes =
                    options.started_digest.is_some() && watch.content == options.started_digest;
                let unchanged = same_bytes
                    || text
                        .as_ref()
                        .ok()
                        .and_then(|text| config::load_str(text, &options.path).ok())
                        .is_some_and(|edited| !differs(started, &edited));
                if !unchanged {
                    pending = Some(Edit {
                        trigger: Trigger::Startup,
                        text,
                    });
                }
                Some(watch)
            }
            None => None,
        };
        let triggers = match (options.watch_interval, hangup.is_some()) {
            (Some(every), true) => format!(
                "on SIGHUP and when the file changes (looked at every {})",
                crate::duration::ConfigDuration(every)
            ),
            (Some(every), false) => format!(
                "when the file changes (looked at every {})",
                crate::duration::ConfigDuration(every)
            ),
            (None, true) => "on SIGHUP".to_owned(),
            (None, false) => "never (no SIGHUP, no file watch)".to_owned(),
        };
        info!(
            file = %options.path.display(),
            "config edits are applied while the agent runs: {triggers}"
        );
        Self {
            path: options.path,
            modbus_devices: modbus_devices(started),
            started: without_sources(started),
            watch,
            hangup,
            pending,
            catalog,
        }
    }

    /// Waits for SIGHUP or a changed file, and returns the file's text then.
    async fn next_edit(&mut self) -> Edit {
        if let Some(edit) = self.pending.take() {
            return edit;
        }
        let (hangup_slot, watch_slot) = (&mut self.hangup, &mut self.watch);
        let hangup = async move {
            loop {
                match hangup_slot {
                    Some(signal) => {
                        if signal.recv().await.is_some() {
                            return;
                        }
                        // The signal driver is gone; only the file watch is left.
                        *hangup_slot = None;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
        };
        let watched = async move {
            match watch_slot {
                Some(watch) => watch.changed().await,
                None => std::future::pending().await,
            }
        };
        let edit = tokio::select! {
            () = hangup => None,
            text = watched => Some(Edit { trigger: Trigger::FileChanged, text }),
        };
        if let Some(edit) = edit {
            return edit;
        }
        info!(file = %self.path.display(), "SIGHUP: reading the config file again");
        let (stamp, bytes) = read_config(&self.path).await;
        let text = bytes.and_then(|bytes| {
            if let Some(watch) = &mut self.watch {
                watch.saw(stamp, &bytes);
            }
            into_text(&self.path, bytes)
        });
        Edit {
            trigger: Trigger::Hangup,
            text,
        }
    }

    /// Loads and checks `edit`; applies it to the sources or rejects it, and says which.
    async fn apply(&mut self, edit: Edit, supervisor: &mut Supervisor) {
        let trigger = edit.trigger.as_str();
        let checked = edit
            .text
            .and_then(|text| config::load_str(&text, &self.path))
            .map_err(ReloadError::from)
            .and_then(|edited| {
                if edited.gateway == self.started.gateway {
                    Ok(edited)
                } else {
                    Err(ReloadError::GatewayChanged {
                        path: self.path.clone(),
                        running: self.started.gateway.clone(),
                        edited: edited.gateway,
                    })
                }
            });
        let edited = match checked {
            Ok(edited) => edited,
            Err(e) => {
                crate::metrics::global().config_reloaded(false);
                crate::metrics::live().map_rejected(&e.to_string());
                error!(
                    trigger,
                    "the edited config is rejected and the running sensor map stays in force; fix the file and save it again:\n{e}"
                );
                return;
            }
        };
        let Applied { plan, overran } = supervisor.apply(&edited).await;
        // `site` changes only at a restart; the catalog must describe the readings being sent.
        let mut in_force = edited.clone();
        in_force.site.clone_from(&self.started.site);
        self.catalog.offer(&in_force);
        crate::metrics::global().config_reloaded(true);
        let live = crate::metrics::live();
        live.map_loaded(
            &self.path.display().to_string(),
            &edited.site,
            &edited.gateway,
        );
        let now = modbus_devices(&edited);
        for gone in self.modbus_devices.difference(&now) {
            live.forget_device(gone);
        }
        self.modbus_devices = now;
        info!(trigger, "config reloaded: {}", summary(&plan));
        if !overran.is_empty() {
            warn!(
                trigger,
                "sources still stopping: {}; each starts again once it has stopped",
                names(&overran)
            );
        }
        let restart = restart_only_changes(&self.started, &edited);
        if !restart.is_empty() {
            warn!(
                trigger,
                "restart the agent to apply changes to {}; the sources part of the edit is applied",
                restart.join(", ")
            );
        }
    }
}

/// The names of the Modbus devices (TCP and bus slaves) of `config`.
fn modbus_devices(config: &AgentConfig) -> BTreeSet<String> {
    config.modbus.iter().map(|d| d.name.clone()).collect()
}

/// What the file looked like from outside: an edit in place changes the size or modification
/// time, an editor that writes a new file and renames it over the old one changes the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    device: u64,
    inode: u64,
}

/// A changed file is read only once it has looked the same for this long, so a file an editor
/// is still writing in place is not taken for an invalid edit.
const SETTLE: Duration = Duration::from_millis(250);
/// Modification times this close to now are not trusted to show the next write: a filesystem
/// that stores them coarsely (FAT: 2 s) can give two writes of the same size the same time.
/// Such a file's content is compared at every look until its time is older.
const COARSE_MTIME: Duration = Duration::from_secs(3);

impl Stamp {
    async fn read(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = tokio::fs::metadata(path).await?;
        Ok(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            device: meta.dev(),
            inode: meta.ino(),
        })
    }

    fn is_recent(&self, now: SystemTime) -> bool {
        self.modified
            .is_none_or(|t| now.duration_since(t).map_or(true, |age| age < COARSE_MTIME))
    }
}

/// Polls the config file for new content: its [`Stamp`] at every look, its content (by hash)
/// when the stamp changed or is too recent to trust.
#[derive(Debug)]
struct FileWatch {
    path: PathBuf,
    interval: Duration,
    stamp: Option<Stamp>,
    content: Option<u64>,
    /// Whether the last look failed (logged once until the file is back).
    unreadable: bool,
}

impl FileWatch {
    fn new(path: PathBuf, interval: Duration) -> Self {
        Self {
            path,
            interval,
            stamp: None,
            content: None,
            unreadable: false,
        }
    }

    /// Records content read elsewhere (at startup, on SIGHUP) with the stamp taken just before
    /// reading it, so the watch does not report it again.
    fn saw(&mut self, stamp: Option<Stamp>, bytes: &[u8]) {
        self.stamp = stamp;
        self.content = Some(config::digest(bytes));
    }

    /// Waits until the file's content differs from the last content seen.
    async fn changed(&mut self) -> Result<String, ConfigError> {
        loop {
            tokio::time::sleep(self.interval).await;
            if let Some(bytes) = self.look().await {
                return into_text(&self.path, bytes);
            }
        }
    }

    /// One look: the new content, if it changed.
    async fn look(&mut self) -> Option<Vec<u8>> {
        let stamp = match Stamp::read(&self.path).await {
            Ok(stamp) => stamp,
            Err(e) => {
                self.unreadable(&e);
                return None;
            }
        };
        if self.stamp == Some(stamp) && !stamp.is_recent(SystemTime::now()) {
            return None;
        }
        if self.stamp != Some(stamp) {
            tokio::time::sleep(SETTLE).await;
            if Stamp::read(&self.path).await.ok() != Some(stamp) {
                // Still being written: the next look tries again.
                return None;
            }
        }
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(bytes) => bytes,
            Err(e) => {
                self.unreadable(&e);
                return None;
            }
        };
        if self.unreadable {
            info!(file = %self.path.display(), "the config file can be read again");
            self.unreadable = false;
        }
        // Taken before the read: a write after it shows as a new stamp at the next look.
        self.stamp = Some(stamp);
        let hash = config::digest(&bytes);
        if self.content == Some(hash) {
            return None;
        }
        self.content = Some(hash);
        Some(bytes)
    }

    fn unreadable(&mut self, e: &std::io::Error) {
        if !self.unreadable {
            warn!(
                file = %self.path.display(),
                "cannot read the config file ({e}); the running sensor map stays in force until it can be read again"
            );
            self.unreadable = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = r#"site = "plant-ost"
gateway = "gw-1"

[upload.dir]
path = "outbox"

[[modbus]]
name = "press-3"
host = "127.0.0.1"

  [[modbus.tags]]
  name = "oil_temp"
  register = "holding"
  address = 0
  type = "u16"
"#;

    fn load(text: &str) -> AgentConfig {
        config::load_str(text, Path::new("/etc/edge-agent/agent.toml")).unwrap()
    }

    #[test]
    fn settings_outside_the_sensor_map_are_named_for_a_restart() {
        let running = load(MAP);
        assert!(restart_only_changes(&running, &load(MAP)).is_empty());
        let edited = load(
            &(MAP
                .replace("plant-ost", "plant-west")
                .replace("path = \"outbox\"", "path = \"elsewhere\"")
                + "\n[batch]\nmax_rows = 10\n\n[metrics]\nenabled = false\n"),
        );
        assert_eq!(
            restart_only_changes(&running, &edited),
            ["`site`", "[batch]", "[upload]", "[metrics]"]
        );
        let edited = load(&(MAP.to_owned() + "\n[buffer]\ncommit_interval = \"1s\"\n"));
        assert_eq!(restart_only_changes(&running, &edited), ["[buffer]"]);
        let edited = load(&(MAP.to_owned() + "\n[kinesis]\nstream = \"live\"\n"));
        assert_eq!(restart_only_changes(&running, &edited), ["[kinesis]"]);
    }

    #[test]
    fn a_comment_is_no_change_and_a_tag_is() {
        let running = load(MAP);
        assert!(!differs(
            &running,
            &load(&format!("# edited by hand\n{MAP}"))
        ));
        assert!(differs(
            &running,
            &load(&MAP.replace("type = \"u16\"", "type = \"i16\""))
        ));
        assert!(differs(&running, &load(&MAP.replace("gw-1", "gw-2"))));
    }

    #[test]
    fn a_gateway_change_is_refused_with_the_fix() {
        let err = ReloadError::GatewayChanged {
            path: PathBuf::from("/etc/edge-agent/agent.toml"),
            running: "gw-1".to_owned(),
            edited: "gw-2".to_owned(),
        };
        assert_eq!(
            err.to_string(),
            "/etc/edge-agent/agent.toml: gateway: the running agent is gateway `gw-1` and the edited file says `gw-2`; the gateway id cannot change while the agent runs (readings are numbered per gateway and the buffer belongs to `gw-1`), so put back gateway = \"gw-1\""
        );
    }

    #[test]
    fn the_reload_summary_names_what_changed() {
        let key = |name: &str| UnitKey::new(supervisor::UnitKind::Modbus, name);
        let plan = supervisor::Plan {
            keep: vec![key("a"), key("b")],
            restart: vec![key("c")],
            start: vec![],
            stop: vec![key("d"), key("e")],
        };
        assert_eq!(
            summary(&plan),
            "restarted modbus/c; stopped modbus/d, modbus/e; 2 unchanged"
        );
        let unchanged = supervisor::Plan {
            keep: vec![key("a")],
            ..supervisor::Plan::default()
        };
        assert_eq!(summary(&unchanged), "no source changed; 1 unchanged");
    }

    #[tokio::test]
    async fn an_edit_saved_while_the_agent_started_is_applied_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, MAP).unwrap();
        let started = config::load_file(&path).unwrap();
        let options = ReloadOptions {
            sighup: false,
            ..ReloadOptions::new(&path)
        };
        let reloader = Reloader::new(
            options.clone(),
            &started,
            None,
            CatalogPublisher::unstarted(),
        )
        .await;
        assert!(reloader.pending.is_none(), "the file is what runs");
        assert!(
            reloader.started.modbus.is_empty() && !started.modbus.is_empty(),
            "the supervisor holds the sources; the reloader keeps no second copy of them"
        );
        assert_eq!(reloader.started.gateway, started.gateway);
        assert_eq!(reloader.started.upload, started.upload);

        std::fs::write(&path, format!("# a comment only\n{MAP}")).unwrap();
        let reloader = Reloader::new(
            options.clone(),
            &started,
            None,
            CatalogPublisher::unstarted(),
        )
        .await;
        assert!(reloader.pending.is_none(), "a comment changes nothing");

        std::fs::write(&path, MAP.replace("oil_temp", "oil_pressure")).unwrap();
        assert!(
            startup_edit(options, &started)
                .await
                .contains("oil_pressure")
        );
    }

    /// The text of the edit a reloader starting from `started` finds at its first look, which
    /// must find one.
    async fn startup_edit(options: ReloadOptions, started: &AgentConfig) -> String {
        let mut reloader =
            Reloader::new(options, started, None, CatalogPublisher::unstarted()).await;
        let edit = reloader.next_edit().await;
        assert_eq!(edit.trigger, Trigger::Startup);
        edit.text.unwrap()
    }

    #[tokio::test]
    async fn the_first_look_trusts_the_digest_of_the_bytes_the_agent_started_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, MAP).unwrap();
        let (started, digest) = config::load_file_with_digest(&path).unwrap();
        assert_eq!(digest, config::digest(MAP.as_bytes()));
        // A config other than the file's: only a parse of the file could tell them apart, so a
        // reloader that trusts the digest sees nothing to apply.
        let other = config::load_str(
            &MAP.replace("oil_temp", "oil_pressure"),
            Path::new("/etc/edge-agent/agent.toml"),
        )
        .unwrap();
        assert!(differs(&started, &other));
        let options = ReloadOptions {
            sighup: false,
            started_digest: Some(digest),
            ..ReloadOptions::new(&path)
        };
        let reloader =
            Reloader::new(options.clone(), &other, None, CatalogPublisher::unstarted()).await;
        assert!(
            reloader.pending.is_none(),
            "the bytes are those parsed at start"
        );

        // Bytes that differ are parsed and compared as without a digest.
        std::fs::write(&path, MAP.replace("oil_temp", "oil_level")).unwrap();
        assert!(startup_edit(options, &other).await.contains("oil_level"));
    }

    /// A watch whose baseline is the file as it is now.
    async fn watching(path: &Path) -> FileWatch {
        let mut watch = FileWatch::new(path.to_owned(), Duration::from_millis(10));
        let (stamp, bytes) = read_config(path).await;
        watch.saw(stamp, &bytes.unwrap());
        watch
    }

    /// Makes the file's modification time old enough to be trusted, as it is a few seconds
    /// after an edit.
    fn age(path: &Path) {
        let old = SystemTime::now() - Duration::from_mins(1);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }

    #[tokio::test]
    async fn the_watch_reports_new_content_once_whether_written_in_place_or_renamed_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "a = 1\n").unwrap();
        age(&path);
        let mut watch = watching(&path).await;
        assert_eq!(watch.look().await, None, "nothing changed");

        std::fs::write(&path, "a = 2\n").unwrap();
        assert_eq!(watch.look().await.as_deref(), Some(&b"a = 2\n"[..]));
        assert_eq!(watch.look().await, None, "reported once");

        // An editor that saves a new file and renames it over the old one.
        let saved = dir.path().join(".agent.toml.swp");
        std::fs::write(&saved, "a = 3\n").unwrap();
        std::fs::rename(&saved, &path).unwrap();
        assert_eq!(watch.look().await.as_deref(), Some(&b"a = 3\n"[..]));
        assert_eq!(watch.look().await, None);
    }

    #[tokio::test]
    async fn a_touched_file_with_the_same_content_is_no_edit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "a = 1\n").unwrap();
        age(&path);
        let mut watch = watching(&path).await;
        std::fs::write(&path, "a = 1\n").unwrap();
        assert_eq!(watch.look().await, None);
    }

    #[tokio::test]
    async fn a_same_size_rewrite_within_the_same_mtime_is_still_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "a = 1\n").unwrap();
        let mut watch = watching(&path).await;
        let stamp = Stamp::read(&path).await.unwrap();
        // Same size and, as on a filesystem with coarse timestamps, the same mtime and inode.
        std::fs::write(&path, "a = 9\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(stamp.modified.unwrap())
            .unwrap();
        assert_eq!(Stamp::read(&path).await.unwrap(), stamp);
        assert_eq!(watch.look().await.as_deref(), Some(&b"a = 9\n"[..]));
    }

    #[tokio::test]
    async fn a_missing_file_is_no_edit_and_its_return_with_new_content_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "a = 1\n").unwrap();
        let mut watch = watching(&path).await;
        std::fs::remove_file(&path).unwrap();
        assert_eq!(watch.look().await, None);
        assert!(watch.unreadable);
        std::fs::write(&path, "a = 1\n").unwrap();
        assert_eq!(watch.look().await, None, "the same content came back");
        assert!(!watch.unreadable);
        std::fs::write(&path, "a = 2\n").unwrap();
        assert_eq!(watch.look().await.as_deref(), Some(&b"a = 2\n"[..]));
    }

    #[test]
    fn a_file_that_is_not_utf8_is_refused_like_at_startup() {
        let err = into_text(Path::new("agent.toml"), vec![b'a', 0xff]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("agent.toml: cannot read the configuration file"),
            "{err}"
        );
    }
}
