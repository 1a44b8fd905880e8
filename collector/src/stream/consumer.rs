//! The consumer loop: reads every shard, decodes, deduplicates, and commits rows with the
//! shards' new positions every `flush_interval` (or sooner at `max_rows_per_commit`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::checkpoint::Positions;
use super::config::StreamConfig;
use super::decode::decode;
use super::dedupe::RecentKeys;
use super::live_table::{LiveRow, LiveTable, LiveTableError};
use super::metrics::{CommitFailure, ReadFailure, ShardState, StreamMetrics};
use super::shard_reader::{Fetched, KinesisError, ShardInfo, ShardReader, StartAt};
use crate::config::CollectorConfig;
use crate::delta::backoff;

/// How often the shard list is read again to find shards a reshard created.
const SHARD_REFRESH: Duration = Duration::from_secs(30);
/// How many committed (`gateway`, `seq`) keys are remembered to drop readings the agent put
/// twice; about 20 MB.
const RECENT_KEYS: usize = 200_000;
/// How often the consumer logs its totals.
const PROGRESS_EVERY: Duration = Duration::from_mins(1);

/// Why `collector stream` stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(
        "the config has no [stream] section; add one with `stream` (the agents' Kinesis stream) and `table_url` (the live Delta table)"
    )]
    NoSection,
    #[error("`stream.table_url`: {0}")]
    Location(String),
    #[error(transparent)]
    Table(#[from] LiveTableError),
    /// The first ListShards failed: a wrong stream name, endpoint or credentials. Later
    /// failures are retried.
    #[error(
        "{0}; check `stream.stream`, `stream.endpoint`, `stream.region` and the AWS credentials"
    )]
    Kinesis(#[from] KinesisError),
}

/// What a run of the consumer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamReport {
    /// Kinesis records read (good and bad).
    pub records: u64,
    /// Rows committed to the live table.
    pub rows: u64,
    /// Readings dropped because the same (`gateway`, `seq`) was already committed or waiting.
    pub duplicates: u64,
    /// Records that could not be decoded; each was logged with its shard and sequence number.
    pub bad_records: u64,
    /// Commits made (rows and positions together).
    pub commits: u64,
    /// Commits that failed; the consumer started over from the table's positions.
    pub failed_commits: u64,
}

/// Runs `collector stream` with `config.stream` until `shutdown` is cancelled, counting into
/// `metrics` (which [`super::serve_stream_metrics`] serves); the rows read by then are
/// committed before it returns.
pub async fn run_stream(
    config: &CollectorConfig,
    metrics: Arc<StreamMetrics>,
    shutdown: CancellationToken,
) -> Result<StreamReport, StreamError> {
    let settings = config.stream.as_ref().ok_or(StreamError::NoSection)?;
    let reader = ShardReader::connect(settings).await;
    run_stream_with(config, reader, metrics, shutdown).await
}

/// [`run_stream`] with a Kinesis client built elsewhere (other credentials, a test server).
pub async fn run_stream_with(
    config: &CollectorConfig,
    reader: ShardReader,
    metrics: Arc<StreamMetrics>,
    shutdown: CancellationToken,
) -> Result<StreamReport, StreamError> {
    let settings = config.stream.clone().ok_or(StreamError::NoSection)?;
    let url = settings.table_url().map_err(StreamError::Location)?;
    let table =
        LiveTable::open_or_create(&url, &config.s3.storage_options(), &settings.stream).await?;
    let mut consumer = Consumer::new(settings, reader, table, metrics);
    consumer.refresh_shards().await?;
    consumer
        .metrics
        .started(&consumer.committed, SystemTime::now());
    consumer.publish_states();
    info!(
        component = "stream",
        stream = consumer.reader.stream(),
        table = %consumer.table.url(),
        shards = consumer.shards.len(),
        positions = consumer.committed.len(),
        "live stream started"
    );
    consumer.run(&shutdown).await;
    Ok(consumer.report)
}

/// One shard as the consumer tracks it.
#[derive(Debug)]
struct Shard {
    parents: Vec<String>,
    iterator: Option<String>,
    /// The last sequence number read, committed or not: where a reopened iterator starts.
    read_to: Option<String>,
    /// A closed shard read to its end; its children may be read now.
    finished: bool,
    failures: u32,
    not_before: Instant,
}

struct Consumer {
    settings: StreamConfig,
    reader: ShardReader,
    table: LiveTable,
    shards: BTreeMap<String, Shard>,
    /// The positions the live table holds.
    committed: Positions,
    pending_rows: Vec<LiveRow>,
    pending_keys: HashSet<(String, i64)>,
    /// Shards read past their committed position, and how far.
    pending_moved: Positions,
    pending_since: Option<Instant>,
    recent: RecentKeys,
    report: StreamReport,
    listed_at: Option<Instant>,
    commit_failures: u32,
    metrics: Arc<StreamMetrics>,
}

impl Consumer {
    fn new(
        settings: StreamConfig,
        reader: ShardReader,
        table: LiveTable,
        metrics: Arc<StreamMetrics>,
    ) -> Self {
        let committed = table.positions();
        Self {
            settings,
            reader,
            table,
            shards: BTreeMap::new(),
            committed,
            pending_rows: Vec::new(),
            pending_keys: HashSet::new(),
            pending_moved: Positions::new(),
            pending_since: None,
            recent: RecentKeys::new(RECENT_KEYS),
            report: StreamReport::default(),
            listed_at: None,
            commit_failures: 0,
            metrics,
        }
    }

    async fn run(&mut self, shutdown: &CancellationToken) {
        let mut progress_at = Instant::now();
        while !shutdown.is_cancelled() {
            if self
                .listed_at
                .is_none_or(|at| at.elapsed() >= SHARD_REFRESH)
                && let Err(e) = self.refresh_shards().await
            {
                warn!(component = "stream", error = %e, "cannot list the shards; reading the known ones");
                self.listed_at = Some(Instant::now());
            }
            self.poll_round().await;
            self.publish_states();
            self.metrics.pending(
                self.pending_rows.len(),
                self.pending_since.is_some(),
                SystemTime::now(),
            );
            if self.flush_due() {
                self.flush().await;
            }
            if progress_at.elapsed() >= PROGRESS_EVERY {
                progress_at = Instant::now();
                let r = &self.report;
                info!(
                    component = "stream",
                    records = r.records,
                    rows = r.rows,
                    duplicates = r.duplicates,
                    bad_records = r.bad_records,
                    commits = r.commits,
                    failed_commits = r.failed_commits,
                    "live stream progress"
                );
            }
            let mut wait = self.settings.poll_interval.0;
            if let Some(since) = self.pending_since {
                wait = wait.min(
                    (since + self.settings.flush_interval.0)
                        .saturating_duration_since(Instant::now()),
                );
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        // What was read is committed on the way out; a failure here loses nothing, since the
        // positions in the table still point before those records.
        self.flush().await;
        let r = &self.report;
        info!(
            component = "stream",
            records = r.records,
            rows = r.rows,
            duplicates = r.duplicates,
            bad_records = r.bad_records,
            commits = r.commits,
            "live stream stopped"
        );
    }

    /// Reads the shard list and adds shards not seen yet (a reshard's children).
    async fn refresh_shards(&mut self) -> Result<(), KinesisError> {
        let listed: Vec<ShardInfo> = self.reader.list_shards().await?;
        self.listed_at = Some(Instant::now());
        for info in listed {
            self.shards.entry(info.id).or_insert_with(|| Shard {
                parents: info.parents,
                iterator: None,
                read_to: None,
                finished: false,
                failures: 0,
                not_before: Instant::now(),
            });
        }
        Ok(())
    }

    /// Whether `shard` may be read now: not finished, not backing off, and every parent the
    /// stream still lists read to its end (so one device's records stay in order across a
    /// reshard).
    fn ready(&self, shard: &Shard, now: Instant) -> bool {
        !shard.finished
            && now >= shard.not_before
            && shard
                .parents
                .iter()
                .all(|p| self.shards.get(p).is_none_or(|parent| parent.finished))
    }

    /// Where each known shard stands, for the `shards` gauge.
    fn publish_states(&self) {
        self.metrics
            .shard_states(self.shards.iter().map(|(id, shard)| {
                let waiting = shard
                    .parents
                    .iter()
                    .any(|p| self.shards.get(p).is_some_and(|parent| !parent.finished));
                let state = if shard.finished {
                    ShardState::Finished
                } else if waiting {
                    ShardState::Waiting
                } else {
                    ShardState::Reading
                };
                (id.as_str(), state)
            }));
    }

    /// One GetRecords call on every ready shard, concurrently.
    async fn poll_round(&mut self) {
        let now = Instant::now();
        let jobs: Vec<(String, Option<String>, StartAt)> = self
            .shards
            .iter()
            .filter(|(_, s)| self.ready(s, now))
            .map(|(id, s)| {
                let start = match s.read_to.as_ref().or(self.committed.get(id)) {
                    Some(seq) => StartAt::After(seq.clone()),
                    None => StartAt::Start(self.settings.start),
                };
                (id.clone(), s.iterator.clone(), start)
            })
            .collect();
        let reader = &self.reader;
        let results = futures::future::join_all(jobs.into_iter().map(
            |(shard, iterator, start)| async move {
                let fetched = async {
                    let iterator = match iterator {
                        Some(i) => i,
                        None => reader.iterator(&shard, &start).await?,
                    };
                    reader.get_records(&shard, &iterator).await
                }
                .await;
                (shard, fetched)
            },
        ))
        .await;
        for (shard, fetched) in results {
            match fetched {
                Ok(fetched) => self.take(&shard, fetched),
                Err(e) => self.read_failed(&shard, &e),
            }
        }
    }

    /// Decodes what one call returned and queues it for the next commit.
    fn take(&mut self, shard_id: &str, fetched: Fetched) {
        let Some(shard) = self.shards.get_mut(shard_id) else {
            return;
        };
        shard.failures = 0;
        shard.iterator.clone_from(&fetched.next_iterator);
        if fetched.next_iterator.is_none() {
            shard.finished = true;
            // Its children are listed by now; look them up at once.
            self.listed_at = None;
            info!(
                component = "stream",
                shard = shard_id,
                "shard closed and read to its end"
            );
        }
        let records = fetched.records.len() as u64;
        let mut decoded = 0;
        if let Some(last) = fetched.records.last() {
            shard.read_to = Some(last.sequence_number.clone());
            self.pending_moved
                .insert(shard_id.to_owned(), last.sequence_number.clone());
            self.pending_since.get_or_insert_with(Instant::now);
        }
        for record in fetched.records {
            self.report.records += 1;
            let rows = match decode(&record.data) {
                Ok(rows) => rows,
                Err(e) => {
                    self.report.bad_records += 1;
                    self.metrics.bad_record(e.kind());
                    let start = String::from_utf8_lossy(&record.data[..record.data.len().min(200)])
                        .into_owned();
                    warn!(
                        component = "stream",
                        shard = shard_id,
                        sequence_number = record.sequence_number,
                        error = %e,
                        data_start = start,
                        bad_records_total = self.report.bad_records,
                        "skipped a record that is not in the agent's live format"
                    );
                    continue;
                }
            };
            decoded += rows.len() as u64;
            for row in rows {
                if self.recent.contains(&row.gateway, row.seq)
                    || !self.pending_keys.insert((row.gateway.clone(), row.seq))
                {
                    self.report.duplicates += 1;
                    self.metrics.duplicate();
                    continue;
                }
                self.pending_rows.push(LiveRow {
                    row,
                    shard: shard_id.to_owned(),
                    sequence_number: record.sequence_number.clone(),
                    arrival_us: record.arrival_us,
                });
            }
        }
        self.metrics.read(
            shard_id,
            records,
            decoded,
            fetched.millis_behind_latest,
            SystemTime::now(),
        );
    }

    fn read_failed(&mut self, shard_id: &str, e: &KinesisError) {
        let Some(shard) = self.shards.get_mut(shard_id) else {
            return;
        };
        self.metrics.read_failed(
            shard_id,
            match e {
                KinesisError::ExpiredIterator { .. } => ReadFailure::ExpiredIterator,
                KinesisError::Throttled { .. } => ReadFailure::Throttled,
                KinesisError::Call { .. } => ReadFailure::Error,
            },
        );
        match e {
            KinesisError::ExpiredIterator { .. } => {
                debug!(component = "stream", shard = shard_id, "{e}");
                shard.iterator = None;
            }
            KinesisError::Throttled { .. } => {
                shard.failures += 1;
                shard.not_before = Instant::now() + backoff(shard.failures);
                debug!(
                    component = "stream",
                    shard = shard_id,
                    failures = shard.failures,
                    "{e}"
                );
            }
            KinesisError::Call { .. } => {
                shard.failures += 1;
                // Reopened from the last record read, whatever went wrong with the old one.
                shard.iterator = None;
                let pause = backoff(shard.failures);
                shard.not_before = Instant::now() + pause;
                warn!(component = "stream", shard = shard_id, failures = shard.failures, pause_ms = pause.as_millis(), error = %e, "reading the shard failed; retrying");
            }
        }
    }

    fn flush_due(&self) -> bool {
        self.pending_rows.len() >= self.settings.max_rows_per_commit
            || self
                .pending_since
                .is_some_and(|since| since.elapsed() >= self.settings.flush_interval.0)
    }

    /// Commits the waiting rows with the shards' new positions.
    async fn flush(&mut self) {
        if self.pending_moved.is_empty() {
            return;
        }
        let rows = self.pending_rows.len();
        match self
            .table
            .commit(
                &self.pending_rows,
                &self.committed,
                &self.pending_moved,
                &self.metrics,
            )
            .await
        {
            Ok(version) => {
                self.metrics
                    .committed(rows, &self.pending_moved, SystemTime::now());
                self.commit_failures = 0;
                self.report.commits += 1;
                self.report.rows += rows as u64;
                for row in &self.pending_rows {
                    self.recent.insert(&row.row.gateway, row.row.seq);
                }
                self.committed.append(&mut self.pending_moved);
                self.pending_rows.clear();
                self.pending_keys.clear();
                self.pending_since = None;
                debug!(component = "stream", version, rows, "committed live rows");
            }
            Err(e) => {
                self.metrics.commit_failed(match e {
                    LiveTableError::Superseded { .. } => CommitFailure::Superseded,
                    _ => CommitFailure::Error,
                });
                self.report.failed_commits += 1;
                self.commit_failures += 1;
                error!(component = "stream", rows, error = %e, "commit to the live table failed; reading again from the table's positions");
                self.start_over().await;
            }
        }
    }

    /// Drops everything read since the last commit and reads again from the positions the
    /// table holds: whatever state the failed commit left, the table's positions decide.
    async fn start_over(&mut self) {
        let pause = backoff(self.commit_failures);
        tokio::time::sleep(pause).await;
        if let Err(e) = self.table.reload().await {
            warn!(component = "stream", error = %e, "cannot reload the live table; using the positions last seen");
        }
        self.committed = self.table.positions();
        self.pending_rows.clear();
        self.pending_keys.clear();
        self.pending_moved.clear();
        self.pending_since = None;
        for shard in self.shards.values_mut() {
            shard.iterator = None;
            shard.read_to = None;
            shard.finished = false;
        }
    }
}
