//! The live path's counters and gauges, their Prometheus text and the `/health` verdict of
//! `collector stream`, served on `stream.metrics_listen` by the collector's metrics server
//! ([`crate::metrics::serve_with`]).
//!
//! # What always holds
//! - One registry per consumer run, handed to it ([`super::run_stream`]); not the process-wide
//!   one of `collector run`, so the two commands never mix their figures. Counters only grow.
//! - Rows are counted as committed once, after the commit that holds them and their shard
//!   positions landed: `rows_committed_total` is what the live table gained in this run, the
//!   same figure as [`super::StreamReport::rows`]. Records and rows read again after a failed
//!   commit are counted again as read and decoded, never again as committed.
//! - A shard's last-commit time moves only with a commit that landed and moved its position;
//!   the positions themselves stay in the live table (as labels they would start a new series
//!   at every move).
//! - `/health` fails until the live table is open and the shards are listed, and afterwards only
//!   when records read [`StreamMetrics::unhealthy_after`] ago are still not committed, or no
//!   shard could be read for that long. A bad record or a duplicate never makes it fail.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edge_agent::exposition::{escape, header};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span};

use super::checkpoint::Positions;
use super::config::DEFAULT_UNHEALTHY_AFTER;
use crate::config::CollectorConfig;
use crate::metrics::{Exposition, Health, MetricsServerError, configured_token, serve_with};

/// Where a shard stands in the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ShardState {
    /// Read every `poll_interval` (or backing off after a failed read).
    Reading,
    /// A child of a reshard whose parents are not read to their end yet.
    Waiting,
    /// Closed by a reshard and read to its end.
    Finished,
}

impl ShardState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Reading => "reading",
            Self::Waiting => "waiting",
            Self::Finished => "finished",
        }
    }
}

/// Why a GetRecords (or GetShardIterator) call on a shard failed, as the metric labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReadFailure {
    Throttled,
    ExpiredIterator,
    Error,
}

impl ReadFailure {
    fn as_str(self) -> &'static str {
        match self {
            Self::Throttled => "throttled",
            Self::ExpiredIterator => "expired_iterator",
            Self::Error => "error",
        }
    }
}

/// Why a commit of the live table failed, as the metric labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CommitFailure {
    /// Another writer moved the shard positions.
    Superseded,
    /// Writing the data files or the commit failed.
    Error,
}

impl CommitFailure {
    fn as_str(self) -> &'static str {
        match self {
            Self::Superseded => "superseded",
            Self::Error => "error",
        }
    }
}

/// Figures of one shard.
#[derive(Debug, Default, Clone)]
struct ShardFigures {
    state: Option<ShardState>,
    records: u64,
    rows: u64,
    /// `MillisBehindLatest` of the last GetRecords answer; `None` before the first and once
    /// the shard is finished.
    lag_ms: Option<i64>,
    /// Unix time (ms) a commit of this run last moved the shard's position; 0 before.
    committed_ms: u64,
    read_failures: BTreeMap<ReadFailure, u64>,
}

/// Every metric of one `collector stream` run.
#[derive(Debug)]
pub struct StreamMetrics {
    unhealthy_after: Duration,
    /// Unix time (ms) the live table was open and the shards listed; 0 before.
    ready_ms: AtomicU64,
    shards: Mutex<BTreeMap<String, ShardFigures>>,
    /// Records that did not decode, by [`super::DecodeError::kind`].
    bad_records: Mutex<BTreeMap<&'static str, u64>>,
    duplicates: AtomicU64,
    rows_committed: AtomicU64,
    commits: AtomicU64,
    commit_retries: AtomicU64,
    commit_failures: Mutex<BTreeMap<CommitFailure, u64>>,
    /// Unix time (ms) of the last commit that landed; 0 before.
    last_commit_ms: AtomicU64,
    /// Unix time (ms) of the last GetRecords call that answered, on any shard; 0 before.
    last_read_ms: AtomicU64,
    /// Unix time (ms) the oldest record not committed yet was read; 0 when none waits.
    pending_since_ms: AtomicU64,
    pending_rows: AtomicU64,
}

impl Default for StreamMetrics {
    fn default() -> Self {
        Self::new(DEFAULT_UNHEALTHY_AFTER)
    }
}

/// A poisoned lock only means another thread panicked mid-increment; the counts stay usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_ms(t: SystemTime) -> u64 {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

impl StreamMetrics {
    /// A registry whose `/health` fails after `unhealthy_after`
    /// ([`super::StreamConfig::unhealthy_after`]).
    pub fn new(unhealthy_after: Duration) -> Self {
        Self {
            unhealthy_after,
            ready_ms: AtomicU64::new(0),
            shards: Mutex::default(),
            bad_records: Mutex::default(),
            duplicates: AtomicU64::new(0),
            rows_committed: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            commit_retries: AtomicU64::new(0),
            commit_failures: Mutex::default(),
            last_commit_ms: AtomicU64::new(0),
            last_read_ms: AtomicU64::new(0),
            pending_since_ms: AtomicU64::new(0),
            pending_rows: AtomicU64::new(0),
        }
    }

    /// The bound `/health` judges by.
    pub fn unhealthy_after(&self) -> Duration {
        self.unhealthy_after
    }

    /// The live table is open at `positions` and the shards are listed: ready.
    pub(super) fn started(&self, positions: &Positions, now: SystemTime) {
        let mut shards = lock(&self.shards);
        for shard in positions.keys() {
            shards.entry(shard.clone()).or_default();
        }
        drop(shards);
        self.ready_ms.store(unix_ms(now).max(1), Ordering::Relaxed);
    }

    /// Where each known shard stands now.
    pub(super) fn shard_states<'a>(&self, states: impl IntoIterator<Item = (&'a str, ShardState)>) {
        let mut shards = lock(&self.shards);
        for (shard, state) in states {
            let f = shards.entry(shard.to_owned()).or_default();
            f.state = Some(state);
            if state == ShardState::Finished {
                f.lag_ms = None;
            }
        }
    }

    /// One GetRecords answer of `shard`: `records` records holding `rows` decodable readings,
    /// `lag_ms` behind the stream's tip (`MillisBehindLatest`, when Kinesis sent it).
    pub(super) fn read(
        &self,
        shard: &str,
        records: u64,
        rows: u64,
        lag_ms: Option<i64>,
        now: SystemTime,
    ) {
        let mut shards = lock(&self.shards);
        let f = shards.entry(shard.to_owned()).or_default();
        f.records += records;
        f.rows += rows;
        if lag_ms.is_some() {
            f.lag_ms = lag_ms;
        }
        drop(shards);
        self.last_read_ms
            .store(unix_ms(now).max(1), Ordering::Relaxed);
    }

    /// A call on `shard` failed.
    pub(super) fn read_failed(&self, shard: &str, failure: ReadFailure) {
        *lock(&self.shards)
            .entry(shard.to_owned())
            .or_default()
            .read_failures
            .entry(failure)
            .or_default() += 1;
    }

    /// A record that did not decode, by the kind of problem.
    pub(super) fn bad_record(&self, kind: &'static str) {
        *lock(&self.bad_records).entry(kind).or_default() += 1;
    }

    /// A reading dropped because its (`gateway`, `seq`) was committed or waits already.
    pub(super) fn duplicate(&self) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
    }

    /// What waits for the next commit: `rows` rows, and whether any record read is not
    /// committed yet (its time is kept until a commit lands, across failed commits).
    pub(super) fn pending(&self, rows: usize, records_waiting: bool, now: SystemTime) {
        self.pending_rows
            .store(u64::try_from(rows).unwrap_or(u64::MAX), Ordering::Relaxed);
        if records_waiting {
            let _ = self.pending_since_ms.compare_exchange(
                0,
                unix_ms(now).max(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        } else {
            self.pending_since_ms.store(0, Ordering::Relaxed);
        }
    }

    /// A commit landed with `rows` rows and moved the shards in `moved` to these positions.
    pub(super) fn committed(&self, rows: usize, moved: &Positions, now: SystemTime) {
        let ms = unix_ms(now).max(1);
        let mut shards = lock(&self.shards);
        for shard in moved.keys() {
            shards.entry(shard.clone()).or_default().committed_ms = ms;
        }
        drop(shards);
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.rows_committed
            .fetch_add(u64::try_from(rows).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.last_commit_ms.store(ms, Ordering::Relaxed);
        self.pending_since_ms.store(0, Ordering::Relaxed);
        self.pending_rows.store(0, Ordering::Relaxed);
    }

    /// A commit attempt that lost the race for its version, or whose outcome was unknown and
    /// had not landed; it is tried again.
    pub(super) fn commit_retried(&self) {
        self.commit_retries.fetch_add(1, Ordering::Relaxed);
    }

    /// A commit failed; the consumer starts over from the table's positions.
    pub(super) fn commit_failed(&self, failure: CommitFailure) {
        *lock(&self.commit_failures).entry(failure).or_default() += 1;
    }

    /// Whether the consumer does its job at `now` (see the module's rules).
    pub fn health(&self, now: SystemTime) -> Health {
        let ready = self.ready_ms.load(Ordering::Relaxed);
        if ready == 0 {
            return Health::Failing(
                "starting: the live table is not open or the shards are not listed yet".to_owned(),
            );
        }
        let now_ms = unix_ms(now);
        let limit = self.unhealthy_after;
        let limit_text = crate::config::ConfigDuration(limit);
        let pending = self.pending_since_ms.load(Ordering::Relaxed);
        if pending != 0 {
            let waiting = Duration::from_millis(now_ms.saturating_sub(pending));
            if waiting > limit {
                return Health::Failing(format!(
                    "records read {}s ago are not committed yet (limit: stream.unhealthy_after = {limit_text}); the log names the commit error",
                    waiting.as_secs()
                ));
            }
        }
        let last_read = self.last_read_ms.load(Ordering::Relaxed).max(ready);
        let silent = Duration::from_millis(now_ms.saturating_sub(last_read));
        if silent > limit {
            return Health::Failing(format!(
                "no shard could be read for {}s (limit: stream.unhealthy_after = {limit_text}); the log names the Kinesis error",
                silent.as_secs()
            ));
        }
        Health::Ok
    }

    /// Every metric in the Prometheus text exposition format (version 0.0.4), judged at `now`.
    pub fn render(&self, now: SystemTime) -> String {
        type Field = fn(&ShardFigures) -> u64;
        let mut out = String::with_capacity(4096);
        let p = "plantline_collector_stream";
        let shards = lock(&self.shards).clone();
        let per_shard: [(&str, &str, Field); 2] = [
            (
                "records_read_total",
                "Kinesis records read from the shard (bad ones included; read again after a failed commit, counted again).",
                |f| f.records,
            ),
            (
                "rows_decoded_total",
                "Readings decoded from the shard's records, before duplicates are dropped.",
                |f| f.rows,
            ),
        ];
        for (name, help, field) in per_shard {
            header(&mut out, &format!("{p}_{name}"), "counter", help);
            for (shard, f) in &shards {
                let _ = writeln!(
                    out,
                    "{p}_{name}{{shard=\"{}\"}} {}",
                    escape(shard),
                    field(f)
                );
            }
        }
        header(
            &mut out,
            &format!("{p}_read_failures_total"),
            "counter",
            "Failed Kinesis reads of the shard, by reason: throttled (backed off), expired_iterator (reopened), error (retried after a backoff).",
        );
        for (shard, f) in &shards {
            for (failure, n) in &f.read_failures {
                let _ = writeln!(
                    out,
                    "{p}_read_failures_total{{shard=\"{}\",reason=\"{}\"}} {n}",
                    escape(shard),
                    failure.as_str()
                );
            }
        }
        header(
            &mut out,
            &format!("{p}_bad_records_total"),
            "counter",
            "Records skipped because they do not decode, by reason: empty, not_utf8, not_json, invalid_reading.",
        );
        for (kind, n) in lock(&self.bad_records).iter() {
            let _ = writeln!(out, "{p}_bad_records_total{{reason=\"{kind}\"}} {n}");
        }
        for (name, help, value) in [
            (
                "duplicates_dropped_total",
                "Readings dropped because the same (gateway, seq) was committed recently in this run or waits in the same commit.",
                &self.duplicates,
            ),
            (
                "rows_committed_total",
                "Rows committed to the live table in this run.",
                &self.rows_committed,
            ),
            (
                "commits_total",
                "Commits to the live table (rows and shard positions together).",
                &self.commits,
            ),
            (
                "commit_retries_total",
                "Commit attempts that lost the race for their table version, or whose outcome was unknown and had not landed; each is tried again.",
                &self.commit_retries,
            ),
        ] {
            header(&mut out, &format!("{p}_{name}"), "counter", help);
            let _ = writeln!(out, "{p}_{name} {}", value.load(Ordering::Relaxed));
        }
        header(
            &mut out,
            &format!("{p}_commit_failures_total"),
            "counter",
            "Commits that failed, by reason: superseded (another writer moved the shard positions), error (the table could not be written); the consumer reads again from the table's positions.",
        );
        let failures = lock(&self.commit_failures);
        for failure in [CommitFailure::Superseded, CommitFailure::Error] {
            let n = failures.get(&failure).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "{p}_commit_failures_total{{reason=\"{}\"}} {n}",
                failure.as_str()
            );
        }
        drop(failures);
        Self::render_shards(&mut out, &shards);
        self.render_progress(&mut out, now);
        out
    }

    fn render_shards(out: &mut String, shards: &BTreeMap<String, ShardFigures>) {
        let p = "plantline_collector_stream";
        header(
            out,
            &format!("{p}_shard_lag_seconds"),
            "gauge",
            "How far the shard's last read was behind the tip of the stream (Kinesis MillisBehindLatest); absent for finished shards.",
        );
        for (shard, f) in shards {
            if let Some(lag) = f.lag_ms {
                let _ = writeln!(
                    out,
                    "{p}_shard_lag_seconds{{shard=\"{}\"}} {}",
                    escape(shard),
                    seconds(u64::try_from(lag).unwrap_or(0))
                );
            }
        }
        header(
            out,
            &format!("{p}_shard_last_commit_timestamp_seconds"),
            "gauge",
            "Unix time a commit of this run last moved the shard's position.",
        );
        for (shard, f) in shards {
            if f.committed_ms != 0 {
                let _ = writeln!(
                    out,
                    "{p}_shard_last_commit_timestamp_seconds{{shard=\"{}\"}} {}",
                    escape(shard),
                    seconds(f.committed_ms)
                );
            }
        }
        header(
            out,
            &format!("{p}_shards"),
            "gauge",
            "Shards the consumer knows, by state: reading, waiting (a reshard's child whose parents are not read to their end), finished (closed and read to its end).",
        );
        for state in [
            ShardState::Reading,
            ShardState::Waiting,
            ShardState::Finished,
        ] {
            let n = shards.values().filter(|f| f.state == Some(state)).count();
            let _ = writeln!(out, "{p}_shards{{state=\"{}\"}} {n}", state.as_str());
        }
    }

    fn render_progress(&self, out: &mut String, now: SystemTime) {
        let p = "plantline_collector_stream";
        header(
            out,
            &format!("{p}_pending_rows"),
            "gauge",
            "Rows read and waiting for the next commit.",
        );
        let _ = writeln!(
            out,
            "{p}_pending_rows {}",
            self.pending_rows.load(Ordering::Relaxed)
        );
        header(
            out,
            &format!("{p}_uncommitted_age_seconds"),
            "gauge",
            "How long the oldest record read but not committed has waited (kept across failed commits); 0 when none waits.",
        );
        let pending = self.pending_since_ms.load(Ordering::Relaxed);
        let age = if pending == 0 {
            0
        } else {
            unix_ms(now).saturating_sub(pending)
        };
        let _ = writeln!(out, "{p}_uncommitted_age_seconds {}", seconds(age));
        header(
            out,
            &format!("{p}_last_commit_timestamp_seconds"),
            "gauge",
            "Unix time of the last commit to the live table that landed; 0 before the first of this run.",
        );
        let _ = writeln!(
            out,
            "{p}_last_commit_timestamp_seconds {}",
            seconds(self.last_commit_ms.load(Ordering::Relaxed))
        );
        header(
            out,
            &format!("{p}_ready"),
            "gauge",
            "1 once the live table is open and the shards are listed.",
        );
        let _ = writeln!(
            out,
            "{p}_ready {}",
            u8::from(self.ready_ms.load(Ordering::Relaxed) != 0)
        );
    }
}

impl Exposition for StreamMetrics {
    fn render(&self, now: SystemTime) -> String {
        StreamMetrics::render(self, now)
    }
    fn health(&self, now: SystemTime) -> Health {
        StreamMetrics::health(self, now)
    }
}

/// Why the live path's endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum StreamMetricsError {
    #[error(
        "stream.metrics_listen `{listen}` is not an IP address with a port; write it like \"127.0.0.1:9466\""
    )]
    Listen { listen: String },
    #[error(
        "cannot listen on {addr} for the live path's /metrics and /health: {source}; free the port or set another `stream.metrics_listen`"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Token(#[from] MetricsServerError),
}

/// Serves `registry` on `stream.metrics_listen`, with `[metrics]`'s token when one is set,
/// until `shutdown` is cancelled. Returns the server task, or `None` when the config has no
/// `[stream]` section or the endpoint could not start (logged: the consumer runs without it).
pub async fn serve_stream_metrics(
    config: &CollectorConfig,
    registry: Arc<StreamMetrics>,
    shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    let listen = config.stream.as_ref()?.metrics_listen.clone();
    let span = info_span!("metrics", component = "stream");
    let started = async {
        let addr: SocketAddr = listen.parse().map_err(|_| StreamMetricsError::Listen {
            listen: listen.clone(),
        })?;
        let token = configured_token(&config.metrics)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StreamMetricsError::Bind { addr, source })?;
        Ok::<_, StreamMetricsError>((listener, token))
    }
    .await;
    match started {
        Ok((listener, token)) => {
            span.in_scope(|| {
                info!(
                    listen = %listen,
                    token = token.is_some(),
                    "serving the live path's /metrics and /health"
                );
            });
            Some(tokio::spawn(
                serve_with(listener, token, registry, shutdown).instrument(span),
            ))
        }
        Err(e) => {
            span.in_scope(|| error!("live path metrics endpoint not started: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn samples(text: &str, prefix: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    const S0: &str = "shardId-000000000000";
    const S1: &str = "shardId-000000000001";

    #[test]
    fn reads_and_commits_are_counted_per_shard() {
        let m = StreamMetrics::default();
        m.started(&Positions::from([(S1.to_owned(), "7".to_owned())]), at(100));
        m.shard_states([(S0, ShardState::Reading), (S1, ShardState::Reading)]);
        m.read(S0, 3, 12, Some(2500), at(101));
        m.read(S1, 1, 0, Some(0), at(101));
        m.bad_record("not_json");
        m.duplicate();
        m.duplicate();
        m.pending(10, true, at(101));
        m.commit_retried();
        m.committed(
            10,
            &Positions::from([(
                S0.to_owned(),
                "49590338271490256608559692538361571095921575989136588898".to_owned(),
            )]),
            at(102),
        );
        let text = m.render(at(103));
        assert_eq!(
            samples(&text, "plantline_collector_stream_records_read_total"),
            [
                "plantline_collector_stream_records_read_total{shard=\"shardId-000000000000\"} 3",
                "plantline_collector_stream_records_read_total{shard=\"shardId-000000000001\"} 1",
            ]
        );
        assert!(text.contains(
            "plantline_collector_stream_rows_decoded_total{shard=\"shardId-000000000000\"} 12\n"
        ));
        assert!(
            text.contains("plantline_collector_stream_bad_records_total{reason=\"not_json\"} 1\n")
        );
        assert!(text.contains("plantline_collector_stream_duplicates_dropped_total 2\n"));
        assert!(text.contains("plantline_collector_stream_rows_committed_total 10\n"));
        assert!(text.contains("plantline_collector_stream_commits_total 1\n"));
        assert!(text.contains("plantline_collector_stream_commit_retries_total 1\n"));
        assert_eq!(
            samples(&text, "plantline_collector_stream_commit_failures_total"),
            [
                "plantline_collector_stream_commit_failures_total{reason=\"superseded\"} 0",
                "plantline_collector_stream_commit_failures_total{reason=\"error\"} 0",
            ]
        );
        assert_eq!(
            samples(&text, "plantline_collector_stream_shard_lag_seconds"),
            [
                "plantline_collector_stream_shard_lag_seconds{shard=\"shardId-000000000000\"} 2.5",
                "plantline_collector_stream_shard_lag_seconds{shard=\"shardId-000000000001\"} 0",
            ]
        );
        assert_eq!(
            samples(
                &text,
                "plantline_collector_stream_shard_last_commit_timestamp_seconds"
            ),
            [
                "plantline_collector_stream_shard_last_commit_timestamp_seconds{shard=\"shardId-000000000000\"} 102"
            ]
        );
        assert!(text.contains("plantline_collector_stream_last_commit_timestamp_seconds 102\n"));
        assert!(text.contains("plantline_collector_stream_pending_rows 0\n"));
        assert!(text.contains("plantline_collector_stream_uncommitted_age_seconds 0\n"));
        assert_eq!(
            samples(&text, "plantline_collector_stream_shards{"),
            [
                "plantline_collector_stream_shards{state=\"reading\"} 2",
                "plantline_collector_stream_shards{state=\"waiting\"} 0",
                "plantline_collector_stream_shards{state=\"finished\"} 0",
            ]
        );
        assert!(text.contains("# TYPE plantline_collector_stream_shard_lag_seconds gauge\n"));
        assert!(text.contains("# TYPE plantline_collector_stream_rows_committed_total counter\n"));
    }

    #[test]
    fn a_finished_shard_loses_its_lag_and_keeps_its_counts() {
        let m = StreamMetrics::default();
        m.started(&Positions::new(), at(1));
        m.read(S0, 5, 5, Some(0), at(2));
        m.read_failed(S0, ReadFailure::Throttled);
        m.shard_states([(S0, ShardState::Finished), (S1, ShardState::Waiting)]);
        // An answer without MillisBehindLatest keeps the last known lag.
        m.read(S1, 0, 0, None, at(3));
        let text = m.render(at(3));
        assert!(samples(&text, "plantline_collector_stream_shard_lag_seconds{").is_empty());
        assert!(text.contains(
            "plantline_collector_stream_records_read_total{shard=\"shardId-000000000000\"} 5\n"
        ));
        assert!(text.contains(
            "plantline_collector_stream_read_failures_total{shard=\"shardId-000000000000\",reason=\"throttled\"} 1\n"
        ));
        assert!(text.contains("plantline_collector_stream_shards{state=\"waiting\"} 1\n"));
        assert!(text.contains("plantline_collector_stream_shards{state=\"finished\"} 1\n"));
    }

    #[test]
    fn health_waits_for_the_table_and_fails_when_records_stay_uncommitted() {
        let m = StreamMetrics::new(Duration::from_mins(1));
        assert_eq!(
            m.health(at(10)),
            Health::Failing(
                "starting: the live table is not open or the shards are not listed yet".into()
            )
        );
        assert!(
            m.render(at(10))
                .contains("plantline_collector_stream_ready 0\n")
        );
        m.started(&Positions::new(), at(100));
        assert_eq!(m.health(at(100)), Health::Ok);
        // Records read at 110; commits keep failing, and a start-over (nothing waiting for a
        // moment) does not reset the clock as long as the records are read again.
        m.read(S0, 1, 1, Some(0), at(110));
        m.pending(1, true, at(110));
        m.commit_failed(CommitFailure::Error);
        m.read(S0, 1, 1, Some(0), at(150));
        m.pending(1, true, at(150));
        assert_eq!(m.health(at(170)), Health::Ok);
        m.read(S0, 1, 1, Some(0), at(171));
        assert_eq!(
            m.health(at(171)),
            Health::Failing(
                "records read 61s ago are not committed yet (limit: stream.unhealthy_after = 1m); the log names the commit error".into()
            )
        );
        let text = m.render(at(171));
        assert!(text.contains("plantline_collector_stream_uncommitted_age_seconds 61\n"));
        assert!(
            text.contains("plantline_collector_stream_commit_failures_total{reason=\"error\"} 1\n")
        );
        m.committed(
            1,
            &Positions::from([(S0.to_owned(), "9".to_owned())]),
            at(172),
        );
        assert_eq!(m.health(at(172)), Health::Ok);
        // Nothing pending, but no shard answered for longer than the bound.
        assert_eq!(
            m.health(at(232)),
            Health::Failing(
                "no shard could be read for 61s (limit: stream.unhealthy_after = 1m); the log names the Kinesis error".into()
            )
        );
    }

    #[test]
    fn shard_labels_are_escaped() {
        let m = StreamMetrics::default();
        m.read("odd\"shard", 1, 1, Some(1000), at(1));
        assert!(
            m.render(at(1)).contains(
                "plantline_collector_stream_records_read_total{shard=\"odd\\\"shard\"} 1\n"
            )
        );
    }
}
