//! The collector's counters, gauges and pass-duration histogram, their Prometheus text, the
//! per-gateway freshness alert and the `/health` verdict; [`server`] serves them over HTTP.
//!
//! # What always holds
//! - One registry per process ([`global`]), as the agent keeps one: the pass loop and the Delta
//!   commit path count into it without being handed a handle. Counters only grow for the life of
//!   the process.
//! - A pass is counted once, when it returned: its files, rows, quarantined files, rule counts
//!   and gap rows are the figures of its [`crate::PassReport`], so after `collector run` applied a
//!   known raw zone the counters equal what `collector run-once` would have printed.
//! - A commit is counted by the commit path itself ([`crate::delta`]), per table: commits made,
//!   version races lost (each retried after a backoff), ambiguous outcomes by how they resolved,
//!   and checkpoints written.
//! - Freshness is judged from the newest reading of each gateway in the readings table, not from
//!   the time the collector last ran: a gateway that stops sending turns stale even while passes
//!   keep succeeding. The stale state and its log line change together, in
//!   [`Metrics::check_freshness`], once per transition.

mod server;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edge_agent::exposition::{Histogram, escape, header};
use tracing::{info, warn};

use crate::PassReport;
use crate::tags::CatalogResult;

pub use server::{Exposition, MetricsServerError, configured_token, serve, serve_with, start};

/// Upper bounds (seconds) of the pass-duration histogram: an idle pass over a local raw zone
/// takes milliseconds, a backlog of thousands of files on S3 minutes.
pub const PASS_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];

/// What the registry needs to know about the running service to judge health and freshness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthSettings {
    /// `run.interval`.
    pub interval: Duration,
    /// `metrics.unhealthy_after_passes`.
    pub unhealthy_after_passes: u32,
    /// `run.freshness_alert`; `None`: no stale gauge, no alert.
    pub freshness_alert: Option<Duration>,
}

/// How a Delta commit's uncertain outcome turned out (see [`crate::delta`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AmbiguousOutcome {
    /// The commit had landed: the table held it when the watermark was read again.
    Landed,
    /// It had not landed and was retried.
    NotLanded,
    /// Another writer moved the gateway's watermark meanwhile; the rows are filtered again.
    Superseded,
}

impl AmbiguousOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Landed => "landed",
            Self::NotLanded => "not_landed",
            Self::Superseded => "superseded",
        }
    }
}

/// Whether the collector can do its job, as `/health` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// Why not, in words for the operator.
    Failing(String),
}

/// Counts of one gateway over the life of the process.
#[derive(Debug, Default, Clone)]
struct GatewayCounts {
    files_seen: u64,
    files_applied: u64,
    rows_applied: u64,
    rows_skipped: u64,
    rows_quarantined: u64,
    rows_flagged: u64,
    errors: u64,
    fresh_files_applied: u64,
    fresh_rows_applied: u64,
    fresh_files_deferred: u64,
    watermark: Option<i64>,
}

/// Counts of one table's commits.
#[derive(Debug, Default, Clone)]
struct TableCounts {
    commits: u64,
    conflicts: u64,
    ambiguous: BTreeMap<AmbiguousOutcome, u64>,
    checkpoints: u64,
    checkpoint_failures: u64,
    log_files_removed: u64,
}

/// The outcome of the last pass, for `/health`.
#[derive(Debug, Clone)]
enum LastPass {
    /// Every gateway applied (or there was none).
    Clean,
    /// Some gateways failed, others did not; or only the tag catalogs failed.
    Partial,
    /// Every gateway failed, or the pass could not start (the error).
    Failed(String),
}

#[derive(Debug, Default)]
struct Freshness {
    /// Newest reading per gateway, microseconds since the epoch.
    last_reading_us: BTreeMap<String, i64>,
    /// Gateways judged stale at the last check.
    stale: BTreeMap<String, bool>,
}

#[derive(Debug, Default)]
struct Snowflake {
    configured: bool,
    loaded_version: Option<u64>,
    table_version: Option<u64>,
    rows_inserted: u64,
    load_failures: u64,
}

/// Every metric of the collector. Use [`global`].
#[derive(Debug, Default)]
pub struct Metrics {
    settings: Mutex<Option<HealthSettings>>,
    /// Unix time (ms) the service started; 0 until [`Metrics::service_started`].
    started_ms: AtomicU64,
    gateways: Mutex<BTreeMap<String, GatewayCounts>>,
    /// Files moved to the quarantine, by (gateway, reason kind).
    quarantined: Mutex<BTreeMap<(String, String), u64>>,
    /// Rule counts by (rule, what: flagged, quarantined, failed_files).
    rules: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Gap rows recorded, by (gateway, reason).
    gaps: Mutex<BTreeMap<(String, String), u64>>,
    /// Tag catalogs by result (`applied`, `quarantined`, `failed`).
    tag_catalogs: Mutex<BTreeMap<&'static str, u64>>,
    tables: Mutex<BTreeMap<String, TableCounts>>,
    /// Passes by result (`clean`, `partial`, `failed`).
    passes: Mutex<BTreeMap<&'static str, u64>>,
    pass_duration: Mutex<Histogram<{ PASS_BUCKETS.len() }>>,
    /// Unix time (ms) of the last pass that applied every gateway; 0 before the first.
    last_success_ms: AtomicU64,
    /// Unix time (ms) of the last pass that completed at all; 0 before the first.
    last_pass_ms: AtomicU64,
    last_pass: Mutex<Option<LastPass>>,
    freshness: Mutex<Freshness>,
    snowflake: Mutex<Snowflake>,
    /// Maintenance runs by (operation, result).
    maintenance: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Files OPTIMIZE rewrote, files it wrote, files VACUUM deleted.
    optimize_files_removed: AtomicU64,
    optimize_files_added: AtomicU64,
    vacuum_files_deleted: AtomicU64,
}

/// The process's registry.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

/// A poisoned lock only means another thread panicked mid-increment; the counts stay usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_ms(t: SystemTime) -> u64 {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl Metrics {
    /// `collector run` started with these settings at `now`: health is judged from here on.
    pub fn service_started(&self, settings: HealthSettings, now: SystemTime) {
        *lock(&self.settings) = Some(settings);
        self.started_ms
            .store(unix_ms(now).max(1), Ordering::Relaxed);
    }

    /// Counts one pass that returned a report, and how long it took.
    pub fn pass_finished(&self, report: &PassReport, took: Duration, now: SystemTime) {
        let mut gateways = lock(&self.gateways);
        let mut failed = 0;
        for gw in &report.ingest.gateways {
            let c = gateways.entry(gw.gateway.clone()).or_default();
            c.files_seen += count(gw.files_applied + gw.quarantined.len());
            c.files_applied += count(gw.files_applied);
            c.rows_applied += count(gw.rows_applied);
            c.rows_skipped += count(gw.rows_skipped);
            c.rows_quarantined += count(gw.rows_quarantined);
            c.rows_flagged += count(gw.rows_flagged);
            c.fresh_files_applied += count(gw.fresh_files_applied);
            c.fresh_rows_applied += count(gw.fresh_rows_applied);
            c.fresh_files_deferred += count(gw.fresh_deferred.len());
            if gw.error.is_some() {
                c.errors += 1;
                failed += 1;
            }
            if gw.watermark.is_some() {
                c.watermark = gw.watermark;
            }
        }
        drop(gateways);
        let mut quarantined = lock(&self.quarantined);
        for gw in &report.ingest.gateways {
            for file in &gw.quarantined {
                *quarantined
                    .entry((gw.gateway.clone(), file.reason.kind.as_str().to_owned()))
                    .or_default() += 1;
            }
        }
        drop(quarantined);
        let mut rules = lock(&self.rules);
        for (rule, counts) in report.ingest.rule_counts() {
            for (what, n) in [
                ("flagged", counts.flagged),
                ("quarantined", counts.quarantined),
                ("failed_files", counts.failed_files),
            ] {
                *rules.entry((rule.clone(), what)).or_default() += count(n);
            }
        }
        drop(rules);
        let mut gaps = lock(&self.gaps);
        for gw in &report.ingest.gateways {
            for gap in &gw.gaps {
                *gaps
                    .entry((gw.gateway.clone(), gap.reason.clone()))
                    .or_default() += 1;
            }
        }
        drop(gaps);
        let mut catalogs = lock(&self.tag_catalogs);
        match &report.tags {
            Ok(tags) => {
                for catalog in &tags.catalogs {
                    let result = match catalog.outcome {
                        CatalogResult::Applied(_) => "applied",
                        CatalogResult::Quarantined(_) => "quarantined",
                    };
                    *catalogs.entry(result).or_default() += 1;
                }
                *catalogs.entry("failed").or_default() += count(tags.failed.len());
            }
            Err(_) => *catalogs.entry("failed").or_default() += 1,
        }
        drop(catalogs);
        if let Some(sf) = &report.snowflake {
            let mut s = lock(&self.snowflake);
            s.configured = true;
            s.loaded_version = sf.loaded_version;
            s.rows_inserted += sf.rows_inserted;
        }
        let total = report.ingest.gateways.len();
        let outcome = if failed == 0 && !report.tags_failed() {
            LastPass::Clean
        } else if failed < total || failed == 0 {
            // Some gateways failed, or only the tag catalogs did.
            LastPass::Partial
        } else {
            LastPass::Failed(format!("every gateway failed in the last pass ({failed})"))
        };
        self.pass_done(outcome, took, now);
    }

    /// Counts one pass that could not run (the raw zone could not be listed, a table could not
    /// be opened, Snowflake refused the login, ...).
    pub fn pass_failed(&self, error: &dyn std::fmt::Display, took: Duration, now: SystemTime) {
        self.pass_done(LastPass::Failed(error.to_string()), took, now);
    }

    fn pass_done(&self, outcome: LastPass, took: Duration, now: SystemTime) {
        let result = match outcome {
            LastPass::Clean => "clean",
            LastPass::Partial => "partial",
            LastPass::Failed(_) => "failed",
        };
        *lock(&self.passes).entry(result).or_default() += 1;
        lock(&self.pass_duration).observe(&PASS_BUCKETS, took.as_secs_f64());
        let ms = unix_ms(now).max(1);
        self.last_pass_ms.store(ms, Ordering::Relaxed);
        if matches!(outcome, LastPass::Clean) {
            self.last_success_ms.store(ms, Ordering::Relaxed);
        }
        *lock(&self.last_pass) = Some(outcome);
    }

    /// The readings table's version after a pass, for the Snowflake load lag.
    pub fn table_version(&self, version: Option<u64>) {
        lock(&self.snowflake).table_version = version;
    }

    /// The Snowflake load of a pass failed (the pass is counted as failed too).
    pub fn snowflake_load_failed(&self) {
        let mut s = lock(&self.snowflake);
        s.configured = true;
        s.load_failures += 1;
    }

    /// The newest reading of each gateway in the readings table (microseconds since the epoch).
    /// Only ever moves a gateway's time forward.
    pub fn last_readings(&self, newest: &BTreeMap<String, i64>) {
        let mut f = lock(&self.freshness);
        for (gateway, &ts) in newest {
            let slot = f.last_reading_us.entry(gateway.clone()).or_insert(ts);
            *slot = (*slot).max(ts);
        }
    }

    /// Judges every gateway's freshness at `now` against `run.freshness_alert`, logs each
    /// gateway that turned stale (a warning) or fresh again (info) since the last check, and
    /// returns the gateways that are stale now.
    pub fn check_freshness(&self, now: SystemTime) -> Vec<String> {
        let Some(limit) = lock(&self.settings).and_then(|s| s.freshness_alert) else {
            return Vec::new();
        };
        let now_us = i64::try_from(unix_ms(now))
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let mut f = lock(&self.freshness);
        let judged: Vec<(String, i64)> = f
            .last_reading_us
            .iter()
            .map(|(g, &ts)| (g.clone(), now_us.saturating_sub(ts)))
            .collect();
        let limit_us = i64::try_from(limit.as_micros()).unwrap_or(i64::MAX);
        let mut stale_now = Vec::new();
        for (gateway, age_us) in judged {
            let stale = age_us > limit_us;
            let was = f.stale.insert(gateway.clone(), stale);
            let age_s = age_us / 1_000_000;
            match (was, stale) {
                (Some(false) | None, true) => warn!(
                    component = "freshness",
                    gateway = %gateway,
                    age_s,
                    limit_s = limit.as_secs(),
                    "gateway is stale: its newest reading in the table is older than run.freshness_alert"
                ),
                (Some(true), false) => info!(
                    component = "freshness",
                    gateway = %gateway,
                    age_s,
                    "gateway is fresh again"
                ),
                _ => {}
            }
            if stale {
                stale_now.push(gateway);
            }
        }
        stale_now
    }

    /// Counts a commit to `table` (`readings`, `gaps`, `quarantined_rows`).
    pub fn commit_made(&self, table: &str) {
        lock(&self.tables)
            .entry(table.to_owned())
            .or_default()
            .commits += 1;
    }

    /// Counts a commit attempt on `table` that lost the race for its version (it is retried).
    pub fn commit_conflict(&self, table: &str) {
        lock(&self.tables)
            .entry(table.to_owned())
            .or_default()
            .conflicts += 1;
    }

    /// Counts a commit on `table` whose outcome was uncertain, by how it resolved.
    pub fn commit_ambiguous(&self, table: &str, outcome: AmbiguousOutcome) {
        *lock(&self.tables)
            .entry(table.to_owned())
            .or_default()
            .ambiguous
            .entry(outcome)
            .or_default() += 1;
    }

    /// Counts a checkpoint written for `table` (or one that failed; the commit stands).
    pub fn checkpoint(&self, table: &str, written: bool) {
        let mut tables = lock(&self.tables);
        let t = tables.entry(table.to_owned()).or_default();
        if written {
            t.checkpoints += 1;
        } else {
            t.checkpoint_failures += 1;
        }
    }

    /// Counts expired commit files deleted from `table`'s log.
    pub fn log_files_removed(&self, table: &str, files: u64) {
        lock(&self.tables)
            .entry(table.to_owned())
            .or_default()
            .log_files_removed += files;
    }

    /// Counts an OPTIMIZE or VACUUM run (`operation`) and whether it worked.
    pub fn maintenance_run(&self, operation: &str, ok: bool) {
        *lock(&self.maintenance)
            .entry((operation.to_owned(), if ok { "ok" } else { "failed" }))
            .or_default() += 1;
    }

    /// Counts the files one OPTIMIZE rewrote and wrote.
    pub fn optimized(&self, files_removed: u64, files_added: u64) {
        self.optimize_files_removed
            .fetch_add(files_removed, Ordering::Relaxed);
        self.optimize_files_added
            .fetch_add(files_added, Ordering::Relaxed);
    }

    /// Counts the files one VACUUM deleted.
    pub fn vacuumed(&self, files: u64) {
        self.vacuum_files_deleted
            .fetch_add(files, Ordering::Relaxed);
    }

    /// Whether the service does its job at `now`: a pass completed within
    /// `unhealthy_after_passes` intervals (from the start, before the first), and the last one
    /// did not fail for every gateway.
    pub fn health(&self, now: SystemTime) -> Health {
        let Some(settings) = *lock(&self.settings) else {
            return Health::Failing("the collector service has not started".to_owned());
        };
        if let Some(LastPass::Failed(reason)) = lock(&self.last_pass).as_ref() {
            return Health::Failing(format!("the last pass failed: {reason}"));
        }
        let last = match self.last_pass_ms.load(Ordering::Relaxed) {
            0 => self.started_ms.load(Ordering::Relaxed),
            ms => ms,
        };
        let silent = Duration::from_millis(unix_ms(now).saturating_sub(last));
        let limit = settings
            .interval
            .saturating_mul(settings.unhealthy_after_passes);
        if silent > limit {
            return Health::Failing(format!(
                "no pass has completed for {}s (limit: {} passes of {}s)",
                silent.as_secs(),
                settings.unhealthy_after_passes,
                settings.interval.as_secs()
            ));
        }
        Health::Ok
    }

    /// Every metric in the Prometheus text exposition format (version 0.0.4), judged at `now`.
    // One exposition read top to bottom; its sections are split out where they stand alone.
    #[allow(clippy::too_many_lines)]
    pub fn render(&self, now: SystemTime) -> String {
        type Field = fn(&GatewayCounts) -> u64;
        let mut out = String::with_capacity(8192);
        let p = "plantline_collector";
        let gateways = lock(&self.gateways).clone();
        let per_gateway: [(&str, &str, Field); 10] = [
            (
                "files_seen_total",
                "Batch files a pass picked up from the gateway's folder (applied or quarantined).",
                |c| c.files_seen,
            ),
            (
                "files_applied_total",
                "Batch files applied to the Delta tables and archived (replays included).",
                |c| c.files_applied,
            ),
            (
                "rows_applied_total",
                "Readings appended to the readings table.",
                |c| c.rows_applied,
            ),
            (
                "rows_skipped_total",
                "Readings dropped because their seq was at or below the gateway's watermark (replays, overlaps).",
                |c| c.rows_skipped,
            ),
            (
                "rows_quarantined_total",
                "Readings a quarantine rule moved to the quarantined_rows table.",
                |c| c.rows_quarantined,
            ),
            (
                "rows_flagged_total",
                "Readings applied with at least one flag rule named in dq_flags.",
                |c| c.rows_flagged,
            ),
            (
                "fresh_files_applied_total",
                "Fresh-lane batch files (contract v3) applied and archived; also counted in files_applied_total.",
                |c| c.fresh_files_applied,
            ),
            (
                "fresh_rows_applied_total",
                "Readings the fresh lane appended ahead of the main lane; also counted in rows_applied_total.",
                |c| c.fresh_rows_applied,
            ),
            (
                "fresh_files_deferred_total",
                "Fresh-lane batch files a pass left for a later one: a new run that waits until the main lane passed the current range.",
                |c| c.fresh_files_deferred,
            ),
            (
                "gateway_errors_total",
                "Passes that ended early for the gateway (store, quarantine or Delta failure; retried next pass).",
                |c| c.errors,
            ),
        ];
        for (name, help, field) in per_gateway {
            header(&mut out, &format!("{p}_{name}"), "counter", help);
            for (gateway, c) in &gateways {
                let _ = writeln!(
                    out,
                    "{p}_{name}{{gateway=\"{}\"}} {}",
                    escape(gateway),
                    field(c)
                );
            }
        }
        header(
            &mut out,
            &format!("{p}_gateway_watermark"),
            "gauge",
            "The gateway's last applied seq (its Delta txn watermark).",
        );
        for (gateway, c) in &gateways {
            if let Some(w) = c.watermark {
                let _ = writeln!(
                    out,
                    "{p}_gateway_watermark{{gateway=\"{}\"}} {w}",
                    escape(gateway)
                );
            }
        }
        header(
            &mut out,
            &format!("{p}_files_quarantined_total"),
            "counter",
            "Files moved to the quarantine, by gateway and reason (not_parquet, truncated, foreign_schema, rule_failed, ...).",
        );
        for ((gateway, reason), n) in lock(&self.quarantined).iter() {
            let _ = writeln!(
                out,
                "{p}_files_quarantined_total{{gateway=\"{}\",reason=\"{}\"}} {n}",
                escape(gateway),
                escape(reason)
            );
        }
        header(
            &mut out,
            &format!("{p}_rule_rows_total"),
            "counter",
            "What each data-quality rule did: readings flagged, readings quarantined, batch files failed (action label).",
        );
        for ((rule, what), n) in lock(&self.rules).iter() {
            let _ = writeln!(
                out,
                "{p}_rule_rows_total{{rule=\"{}\",action=\"{what}\"}} {n}",
                escape(rule)
            );
        }
        header(
            &mut out,
            &format!("{p}_gap_rows_total"),
            "counter",
            "Rows recorded in the gaps table, by gateway and reason (seq_jump, quarantined, buffer_full, max_age, damaged_buffer).",
        );
        for ((gateway, reason), n) in lock(&self.gaps).iter() {
            let _ = writeln!(
                out,
                "{p}_gap_rows_total{{gateway=\"{}\",reason=\"{}\"}} {n}",
                escape(gateway),
                escape(reason)
            );
        }
        header(
            &mut out,
            &format!("{p}_tag_catalogs_total"),
            "counter",
            "Tag catalogs by result: applied to the tags table (replays included), quarantined (see the reason object beside it), failed (a gateway's catalogs stopped on an error, or the tags table or folder could not be reached; retried next pass).",
        );
        let catalogs = lock(&self.tag_catalogs);
        for result in ["applied", "quarantined", "failed"] {
            let n = catalogs.get(result).copied().unwrap_or(0);
            let _ = writeln!(out, "{p}_tag_catalogs_total{{result=\"{result}\"}} {n}");
        }
        drop(catalogs);
        self.render_commits(&mut out);
        self.render_passes(&mut out);
        self.render_freshness(&mut out, now);
        self.render_snowflake(&mut out);
        self.render_maintenance(&mut out);
        out
    }

    fn render_commits(&self, out: &mut String) {
        type Field = fn(&TableCounts) -> u64;
        let p = "plantline_collector";
        let tables = lock(&self.tables).clone();
        let per_table: [(&str, &str, Field); 5] = [
            (
                "commits_total",
                "Delta commits made, by table (readings, gaps, quarantined_rows).",
                |t| t.commits,
            ),
            (
                "commit_conflicts_total",
                "Commit attempts that lost the race for their table version to another writer; each is retried after a capped, jittered backoff.",
                |t| t.conflicts,
            ),
            (
                "checkpoints_total",
                "Checkpoints written after a commit (every maintenance.checkpoint_interval versions).",
                |t| t.checkpoints,
            ),
            (
                "checkpoint_failures_total",
                "Checkpoints that could not be written (the commit stands; the next interval tries again).",
                |t| t.checkpoint_failures,
            ),
            (
                "log_files_removed_total",
                "Expired commit files deleted from the table's log after a checkpoint covered them.",
                |t| t.log_files_removed,
            ),
        ];
        for (name, help, field) in per_table {
            header(out, &format!("{p}_{name}"), "counter", help);
            for (table, t) in &tables {
                let _ = writeln!(
                    out,
                    "{p}_{name}{{table=\"{}\"}} {}",
                    escape(table),
                    field(t)
                );
            }
        }
        header(
            out,
            &format!("{p}_commit_ambiguous_total"),
            "counter",
            "Commits whose outcome was uncertain (an error after the commit may have landed), by how re-reading the gateway's watermark resolved them: landed, not_landed (retried), superseded (filtered again).",
        );
        for (table, t) in &tables {
            for (outcome, n) in &t.ambiguous {
                let _ = writeln!(
                    out,
                    "{p}_commit_ambiguous_total{{table=\"{}\",outcome=\"{}\"}} {n}",
                    escape(table),
                    outcome.as_str()
                );
            }
        }
    }

    fn render_passes(&self, out: &mut String) {
        let p = "plantline_collector";
        header(
            out,
            &format!("{p}_passes_total"),
            "counter",
            "Passes over the raw zone, by result: clean (every gateway and tag catalog applied), partial (some gateways failed, or only the tag catalogs), failed (every gateway failed, or the pass could not run).",
        );
        let passes = lock(&self.passes);
        for result in ["clean", "partial", "failed"] {
            let n = passes.get(result).copied().unwrap_or(0);
            let _ = writeln!(out, "{p}_passes_total{{result=\"{result}\"}} {n}");
        }
        drop(passes);
        lock(&self.pass_duration).render(
            out,
            &format!("{p}_pass_duration_seconds"),
            "Time one pass took: raw zone to Delta tables to Snowflake.",
            &PASS_BUCKETS,
        );
        header(
            out,
            &format!("{p}_last_successful_pass_timestamp_seconds"),
            "gauge",
            "Unix time of the last pass that applied every gateway; 0 before the first.",
        );
        let last = self.last_success_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "{p}_last_successful_pass_timestamp_seconds {last}");
    }

    fn render_freshness(&self, out: &mut String, now: SystemTime) {
        let p = "plantline_collector";
        self.check_freshness(now);
        let now_us = i64::try_from(unix_ms(now))
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let f = lock(&self.freshness);
        header(
            out,
            &format!("{p}_gateway_last_reading_age_seconds"),
            "gauge",
            "Age of the gateway's newest reading in the readings table (by its ts).",
        );
        for (gateway, ts) in &f.last_reading_us {
            let age = (now_us - ts).max(0) as f64 / 1e6;
            let _ = writeln!(
                out,
                "{p}_gateway_last_reading_age_seconds{{gateway=\"{}\"}} {age}",
                escape(gateway)
            );
        }
        if lock(&self.settings)
            .and_then(|s| s.freshness_alert)
            .is_some()
        {
            header(
                out,
                &format!("{p}_gateway_stale"),
                "gauge",
                "1 when the gateway's newest reading is older than run.freshness_alert, else 0.",
            );
            for (gateway, stale) in &f.stale {
                let _ = writeln!(
                    out,
                    "{p}_gateway_stale{{gateway=\"{}\"}} {}",
                    escape(gateway),
                    u8::from(*stale)
                );
            }
        }
    }

    fn render_snowflake(&self, out: &mut String) {
        let s = lock(&self.snowflake);
        if !s.configured {
            return;
        }
        let p = "plantline_collector_snowflake";
        if let Some(loaded) = s.loaded_version {
            header(
                out,
                &format!("{p}_loaded_version"),
                "gauge",
                "The last Delta version of the readings table loaded into Snowflake (the loader's control-table watermark).",
            );
            let _ = writeln!(out, "{p}_loaded_version {loaded}");
        }
        if let Some(table) = s.table_version {
            header(
                out,
                &format!("{p}_load_lag_versions"),
                "gauge",
                "Delta versions of the readings table not loaded into Snowflake yet, after the last pass.",
            );
            let lag = table.saturating_sub(s.loaded_version.unwrap_or(0))
                + u64::from(s.loaded_version.is_none());
            let _ = writeln!(out, "{p}_load_lag_versions {lag}");
        }
        header(
            out,
            &format!("{p}_rows_inserted_total"),
            "counter",
            "Readings inserted into the Snowflake table (replays are not counted).",
        );
        let _ = writeln!(out, "{p}_rows_inserted_total {}", s.rows_inserted);
        header(
            out,
            &format!("{p}_load_failures_total"),
            "counter",
            "Passes whose Snowflake login or load failed.",
        );
        let _ = writeln!(out, "{p}_load_failures_total {}", s.load_failures);
    }

    fn render_maintenance(&self, out: &mut String) {
        let p = "plantline_collector";
        header(
            out,
            &format!("{p}_maintenance_runs_total"),
            "counter",
            "OPTIMIZE and VACUUM runs of the schedule in [run], by operation and result.",
        );
        for ((operation, result), n) in lock(&self.maintenance).iter() {
            let _ = writeln!(
                out,
                "{p}_maintenance_runs_total{{operation=\"{}\",result=\"{result}\"}} {n}",
                escape(operation)
            );
        }
        for (name, help, value) in [
            (
                "optimize_files_removed_total",
                "Small data files OPTIMIZE rewrote (dataChange = false).",
                &self.optimize_files_removed,
            ),
            (
                "optimize_files_added_total",
                "Data files OPTIMIZE wrote in their place.",
                &self.optimize_files_added,
            ),
            (
                "vacuum_files_deleted_total",
                "Data files VACUUM deleted.",
                &self.vacuum_files_deleted,
            ),
        ] {
            header(out, &format!("{p}_{name}"), "counter", help);
            let _ = writeln!(out, "{p}_{name} {}", value.load(Ordering::Relaxed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{GatewayReport, IngestReport};

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn settings(freshness: Option<u64>) -> HealthSettings {
        HealthSettings {
            interval: Duration::from_secs(30),
            unhealthy_after_passes: 3,
            freshness_alert: freshness.map(Duration::from_secs),
        }
    }

    fn report(gateways: Vec<GatewayReport>) -> PassReport {
        PassReport {
            ingest: IngestReport {
                gateways,
                foreign_folders: Vec::new(),
            },
            tags: Ok(crate::tags::TagsReport::default()),
            snowflake: None,
        }
    }

    fn samples(text: &str, prefix: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn health_fails_when_every_gateway_failed_or_passes_stop() {
        let m = Metrics::default();
        assert_eq!(
            m.health(at(0)),
            Health::Failing("the collector service has not started".into())
        );
        m.service_started(settings(None), at(1000));
        assert_eq!(m.health(at(1089)), Health::Ok);
        assert!(
            matches!(m.health(at(1091)), Health::Failing(r) if r.starts_with("no pass has completed for 91s"))
        );

        let ok = GatewayReport {
            gateway: "gw-a".into(),
            ..GatewayReport::default()
        };
        let broken = GatewayReport {
            gateway: "gw-b".into(),
            error: Some("store unreachable".into()),
            ..GatewayReport::default()
        };
        m.pass_finished(
            &report(vec![ok, broken.clone()]),
            Duration::from_millis(20),
            at(1100),
        );
        assert_eq!(m.health(at(1101)), Health::Ok);
        m.pass_finished(&report(vec![broken]), Duration::from_millis(20), at(1130));
        assert_eq!(
            m.health(at(1131)),
            Health::Failing(
                "the last pass failed: every gateway failed in the last pass (1)".into()
            )
        );
        m.pass_finished(&report(vec![]), Duration::from_millis(20), at(1160));
        assert_eq!(m.health(at(1161)), Health::Ok);
        let text = m.render(at(1161));
        assert_eq!(
            samples(&text, "plantline_collector_passes_total"),
            [
                "plantline_collector_passes_total{result=\"clean\"} 1",
                "plantline_collector_passes_total{result=\"partial\"} 1",
                "plantline_collector_passes_total{result=\"failed\"} 1",
            ]
        );
        assert!(text.contains("plantline_collector_last_successful_pass_timestamp_seconds 1160\n"));
        assert!(text.contains("plantline_collector_pass_duration_seconds_bucket{le=\"0.05\"} 3\n"));
    }

    #[test]
    fn a_pass_whose_tag_catalogs_failed_is_partial_and_counted() {
        use crate::delta::CatalogOutcome;
        use crate::tags::{CatalogReport, TagsReport};
        let m = Metrics::default();
        m.service_started(settings(None), at(1000));
        let gw = GatewayReport {
            gateway: "gw-a".into(),
            ..GatewayReport::default()
        };
        let catalog = |key: &str, outcome| CatalogReport {
            gateway: "gw-a".into(),
            key: key.into(),
            outcome,
        };
        let mut one = report(vec![gw.clone()]);
        one.tags = Ok(TagsReport {
            catalogs: vec![
                catalog(
                    "tags/gateway=gw-a/1.json",
                    CatalogResult::Applied(CatalogOutcome::default()),
                ),
                catalog(
                    "tags/gateway=gw-a/2.json",
                    CatalogResult::Quarantined("not JSON".into()),
                ),
            ],
            failed: vec![("gw-b".into(), "tags table unreachable".into())],
        });
        assert!(!one.is_clean());
        m.pass_finished(&one, Duration::from_millis(20), at(1010));
        let mut two = report(vec![gw]);
        two.tags = Err("cannot list tags/".into());
        assert!(!two.is_clean());
        m.pass_finished(&two, Duration::from_millis(20), at(1040));
        // The readings flowed: healthy, but no pass counts as clean or successful.
        assert_eq!(m.health(at(1041)), Health::Ok);
        let text = m.render(at(1041));
        assert_eq!(
            samples(&text, "plantline_collector_tag_catalogs_total"),
            [
                "plantline_collector_tag_catalogs_total{result=\"applied\"} 1",
                "plantline_collector_tag_catalogs_total{result=\"quarantined\"} 1",
                "plantline_collector_tag_catalogs_total{result=\"failed\"} 2",
            ]
        );
        assert_eq!(
            samples(&text, "plantline_collector_passes_total"),
            [
                "plantline_collector_passes_total{result=\"clean\"} 0",
                "plantline_collector_passes_total{result=\"partial\"} 2",
                "plantline_collector_passes_total{result=\"failed\"} 0",
            ]
        );
        assert!(text.contains("plantline_collector_last_successful_pass_timestamp_seconds 0\n"));
    }

    #[test]
    fn a_gateway_turns_stale_once_and_fresh_again_once() {
        let m = Metrics::default();
        m.service_started(settings(Some(900)), at(10_000));
        m.last_readings(&BTreeMap::from([
            ("gw-a".to_owned(), 9_950_000_000),
            ("gw-b".to_owned(), 9_000_000_000),
        ]));
        assert_eq!(m.check_freshness(at(10_000)), vec!["gw-b".to_owned()]);
        // An older time never moves a gateway back.
        m.last_readings(&BTreeMap::from([("gw-a".to_owned(), 1)]));
        let text = m.render(at(10_000));
        assert_eq!(
            samples(&text, "plantline_collector_gateway_"),
            [
                "plantline_collector_gateway_last_reading_age_seconds{gateway=\"gw-a\"} 50",
                "plantline_collector_gateway_last_reading_age_seconds{gateway=\"gw-b\"} 1000",
                "plantline_collector_gateway_stale{gateway=\"gw-a\"} 0",
                "plantline_collector_gateway_stale{gateway=\"gw-b\"} 1",
            ]
        );
        m.last_readings(&BTreeMap::from([("gw-b".to_owned(), 10_100_000_000)]));
        assert!(m.check_freshness(at(10_200)).is_empty());
    }

    #[test]
    fn commit_counts_are_kept_per_table_and_labels_are_escaped() {
        let m = Metrics::default();
        m.commit_made("readings");
        m.commit_made("readings");
        m.commit_conflict("readings");
        m.commit_ambiguous("gaps", AmbiguousOutcome::Landed);
        m.checkpoint("readings", true);
        let text = m.render(at(1));
        assert!(text.contains("plantline_collector_commits_total{table=\"readings\"} 2\n"));
        assert!(
            text.contains("plantline_collector_commit_conflicts_total{table=\"readings\"} 1\n")
        );
        assert!(text.contains(
            "plantline_collector_commit_ambiguous_total{table=\"gaps\",outcome=\"landed\"} 1\n"
        ));
        assert!(text.contains("plantline_collector_checkpoints_total{table=\"readings\"} 1\n"));
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
