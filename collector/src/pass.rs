//! One collector pass: raw zone → Delta tables (readings, gaps, quarantined rows) → Snowflake
//! → log cleanup; and the service loop that repeats passes, serves `/metrics` and `/health`,
//! and runs OPTIMIZE and VACUUM on the schedule in `[run]`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use deltalake::DeltaTable;
use deltalake::kernel::Version;
use deltalake::table::config::TablePropertiesExt as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{CollectorConfig, StoreLocation};
use crate::delta::{DeltaError, ReadingsTable, Tables};
use crate::ingest::{IngestError, IngestOptions, IngestReport};
use crate::maintenance::{self, MaintenanceError, VacuumOptions};
use crate::metrics::{self, HealthSettings};
use crate::raw_zone::{RawZone, RawZoneError};
use crate::snowflake::{LoadError, LoadReport, SnowflakeClient, SnowflakeError, load_tables};
use crate::tags::TagsReport;

/// Why a pass could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error("config: {0}")]
    Location(String),
    #[error(transparent)]
    RawZone(#[from] RawZoneError),
    #[error(transparent)]
    Delta(#[from] DeltaError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("snowflake: {0}")]
    SnowflakeLogin(#[from] SnowflakeError),
    #[error("snowflake: {0}")]
    SnowflakeLoad(#[from] LoadError),
    #[error(transparent)]
    Maintenance(#[from] MaintenanceError),
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
}

/// What one pass did.
#[derive(Debug)]
pub struct PassReport {
    pub ingest: IngestReport,
    /// The tag catalogs (after the readings): `Err` when they could not be looked at at all
    /// (the tags table or the raw zone's `tags/` folder could not be reached).
    pub tags: Result<TagsReport, String>,
    /// `None` when no Snowflake is configured.
    pub snowflake: Option<LoadReport>,
}

impl PassReport {
    /// A report of `ingest` alone: no tag catalog seen, no Snowflake configured.
    pub fn of_ingest(ingest: IngestReport) -> Self {
        Self {
            ingest,
            tags: Ok(TagsReport::default()),
            snowflake: None,
        }
    }

    /// True when every gateway was applied completely and every tag catalog was dealt with.
    /// Quarantined files and catalogs do not count against it: the data problem was handled
    /// (the files and their reasons are in the report), while an error needs a person or the
    /// next pass.
    pub fn is_clean(&self) -> bool {
        self.ingest.gateways.iter().all(|g| g.error.is_none()) && !self.tags_failed()
    }

    /// True when the tag catalogs, or those of some gateway, stopped on an error this pass.
    pub fn tags_failed(&self) -> bool {
        self.tags.as_ref().map_or(true, |t| !t.failed.is_empty())
    }
}

/// Opens the raw zone and the readings Delta table named by the config.
pub async fn open_stores(
    config: &CollectorConfig,
) -> Result<(RawZone, ReadingsTable), CollectorError> {
    let raw_location = config.raw_location().map_err(CollectorError::Location)?;
    let raw = open_raw_zone(config, &raw_location)?;
    let url = config
        .delta_location()
        .and_then(|l| l.to_url())
        .map_err(CollectorError::Location)?;
    let table = ReadingsTable::open_or_create(&url, config.s3.storage_options())
        .await?
        .with_commit_attempts(config.run.commit_attempts);
    Ok((raw, table))
}

/// Opens the raw zone and all three Delta tables (readings, gaps, quarantined rows) named by
/// the config, creating the tables that are missing and recording the `[maintenance]` table
/// properties (checkpoint interval, log retention) on them.
pub async fn open_tables(config: &CollectorConfig) -> Result<(RawZone, Tables), CollectorError> {
    let raw_location = config.raw_location().map_err(CollectorError::Location)?;
    let raw = open_raw_zone(config, &raw_location)?;
    let urls = config.table_urls().map_err(CollectorError::Location)?;
    let mut tables = Tables::open_or_create(&urls, config.s3.storage_options())
        .await?
        .with_commit_attempts(config.run.commit_attempts);
    maintenance::apply_table_properties(&mut tables, &config.maintenance).await?;
    Ok((raw, tables))
}

fn open_raw_zone(
    config: &CollectorConfig,
    raw_location: &StoreLocation,
) -> Result<RawZone, RawZoneError> {
    let raw = RawZone::open(
        raw_location,
        &config.s3,
        &config.raw.prefix,
        &config.raw.archive_prefix,
    )?
    .with_quarantine_prefix(&config.raw.quarantine_prefix);
    Ok(raw)
}

/// One pass: applies every gateway's pending batches to the Delta table, then loads Snowflake
/// (when configured) up to the table's latest version, then deletes expired commit files if the
/// pass crossed a checkpoint. The pass is counted in the process's metrics ([`crate::metrics`]).
///
/// Bad files are quarantined and listed in the result; a gateway that fails (a store, quarantine
/// or Delta error) is reported in the result and does not stop the others; Snowflake is loaded
/// with whatever the table holds.
pub async fn run_once(config: &CollectorConfig) -> Result<PassReport, CollectorError> {
    let started = Instant::now();
    let result = pass(config).await;
    let registry = metrics::global();
    match &result {
        Ok(report) => registry.pass_finished(report, started.elapsed(), SystemTime::now()),
        Err(e) => registry.pass_failed(e, started.elapsed(), SystemTime::now()),
    }
    result
}

async fn pass(config: &CollectorConfig) -> Result<PassReport, CollectorError> {
    let (raw, mut tables) = open_tables(config).await?;
    let versions_before = versions(&tables);
    let options = IngestOptions::new(config.run.max_files_per_commit)
        .with_rules(config.rule_set().map_err(CollectorError::Location)?)
        .with_commit_attempts(config.run.commit_attempts);
    let discovery = crate::discovery::Discovery::open(config).await?;
    let ingest = discovery.ingest(&raw, &mut tables, &options).await?;
    // After the readings, so a catalog problem never holds them up; retried next pass, and the
    // pass is not clean (`run-once` exits 1, the pass counts as partial).
    let tags = match crate::tags::apply_pending(config, &raw).await {
        Ok(tags) => {
            tags.log();
            Ok(tags)
        }
        Err(e) => {
            warn!(
                component = "tags",
                "tag catalogs not applied this pass; retried next pass: {e}"
            );
            Err(e.to_string())
        }
    };
    for gw in &ingest.gateways {
        info!(
            component = "ingest",
            gateway = gw.gateway,
            files = gw.files_applied,
            rows = gw.rows_applied,
            duplicates_skipped = gw.rows_skipped,
            quarantined = gw.quarantined.len(),
            rows_quarantined = gw.rows_quarantined,
            rows_flagged = gw.rows_flagged,
            gaps = gw.gaps.len(),
            fresh_files = gw.fresh_files_applied,
            fresh_rows = gw.fresh_rows_applied,
            fresh_deferred = gw.fresh_deferred.len(),
            fresh_range = ?gw.fresh_range.map(|r| (r.first, r.last)),
            watermark = gw.watermark,
            "gateway applied"
        );
    }
    for (rule, counts) in ingest.rule_counts() {
        info!(
            component = "rules",
            rule,
            flagged = counts.flagged,
            quarantined = counts.quarantined,
            failed_files = counts.failed_files,
            "rule counts of this pass"
        );
    }
    let registry = metrics::global();
    registry.table_version(tables.readings.version());
    registry.last_readings(&newest_readings(tables.readings.delta_table()));
    let snowflake = match &config.snowflake {
        None => None,
        Some(sf) => {
            let loaded = async {
                let mut client = SnowflakeClient::login(sf).await?;
                Ok::<_, CollectorError>(load_tables(&mut client, &tables, sf).await?)
            }
            .await;
            let report = loaded.inspect_err(|_| registry.snowflake_load_failed())?;
            info!(
                component = "snowflake",
                versions = report.versions_loaded,
                rows = report.rows_inserted,
                loaded_version = report.loaded_version,
                "snowflake loaded"
            );
            Some(report)
        }
    };
    // The loader reads every commit after its watermark: those stay in the log.
    let keep_from = snowflake
        .as_ref()
        .map(|sf: &LoadReport| sf.loaded_version.map_or(0, |v| v + 1));
    tidy_logs_after_pass(&tables, versions_before, keep_from).await;
    Ok(PassReport {
        ingest,
        tags,
        snowflake,
    })
}

/// The loaded versions of the readings, gaps and quarantined-rows tables.
fn versions(tables: &Tables) -> [Option<Version>; 3] {
    [
        tables.readings.version(),
        tables.gaps.version(),
        tables.quarantined_rows.version(),
    ]
}

/// Cleans the log of every table whose versions crossed a checkpoint in this pass (once per
/// `delta.checkpointInterval` commits, so the listing of the log this takes stays rare). A
/// failure is logged: the next checkpoint tries again.
async fn tidy_logs_after_pass(
    tables: &Tables,
    before: [Option<Version>; 3],
    readings_keep_from: Option<Version>,
) {
    let after = versions(tables);
    let targets: [(&DeltaTable, &url::Url, Option<Version>); 3] = [
        (
            tables.readings.delta_table(),
            tables.readings.url(),
            readings_keep_from,
        ),
        (tables.gaps.delta_table(), tables.gaps.url(), None),
        (
            tables.quarantined_rows.delta_table(),
            tables.quarantined_rows.url(),
            None,
        ),
    ];
    for (i, (table, url, keep_from)) in targets.into_iter().enumerate() {
        let Ok(snapshot) = table.snapshot() else {
            continue;
        };
        let interval = snapshot.table_config().checkpoint_interval().get();
        if !maintenance::checkpoint_crossed(before[i], after[i], interval) {
            continue;
        }
        if let Err(e) = maintenance::tidy_logs(table, url, keep_from).await {
            warn!(component = "maintenance", table = %url, error = %e, "expired-log cleanup failed; the next checkpoint tries again");
        }
    }
}

/// The newest reading (`ts`, microseconds) of each gateway, from the statistics of the
/// readings table's data files that hold one gateway only (every file the collector and its
/// OPTIMIZE write does).
pub(crate) fn newest_readings(table: &DeltaTable) -> BTreeMap<String, i64> {
    let mut newest = BTreeMap::new();
    let Ok(snapshot) = table.snapshot() else {
        return newest;
    };
    for file in snapshot.log_data().iter() {
        let Some(stats) = file
            .stats()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        else {
            continue;
        };
        let gateway = |side: &str| {
            stats
                .pointer(&format!("/{side}/gateway"))
                .and_then(serde_json::Value::as_str)
        };
        let (Some(min), Some(max)) = (gateway("minValues"), gateway("maxValues")) else {
            continue;
        };
        if min != max {
            continue;
        }
        let Some(ts) = stats
            .pointer("/maxValues/ts")
            .and_then(serde_json::Value::as_str)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        else {
            continue;
        };
        let ts = ts.timestamp_micros();
        let slot = newest.entry(min.to_owned()).or_insert(ts);
        *slot = (*slot).max(ts);
    }
    newest
}

/// Repeats passes every `run.interval` until `shutdown` is cancelled, serving `/metrics` and
/// `/health` (`[metrics]`) meanwhile, and runs OPTIMIZE and VACUUM when their interval in
/// `[run]` has passed (first one interval after the start). A failed pass is logged and retried
/// at the next interval; a pass in progress finishes before the loop stops.
pub async fn run(
    config: CollectorConfig,
    shutdown: CancellationToken,
) -> Result<(), CollectorError> {
    let interval = config.run.interval.0;
    let registry = metrics::global();
    registry.service_started(
        HealthSettings {
            interval,
            unhealthy_after_passes: config.metrics.unhealthy_after_passes,
            freshness_alert: config.run.freshness_alert.map(|d| d.0),
        },
        SystemTime::now(),
    );
    let server = metrics::start(&config.metrics, shutdown.child_token()).await;
    let mut next_optimize = config.run.optimize_interval.map(|d| Instant::now() + d.0);
    let mut next_vacuum = config.run.vacuum_interval.map(|d| Instant::now() + d.0);
    loop {
        match run_once(&config).await {
            Ok(report) if report.is_clean() => {}
            Ok(_) => warn!(
                component = "collector",
                "pass finished with failed gateways; retried next pass"
            ),
            Err(e) => error!(component = "collector", "pass failed: {e}"),
        }
        registry.check_freshness(SystemTime::now());
        if let (Some(due), Some(every)) = (next_optimize, config.run.optimize_interval)
            && Instant::now() >= due
        {
            match maintenance::optimize_readings(&config).await {
                Ok(report) => info!(
                    component = "maintenance",
                    files_removed = report.files_removed,
                    files_added = report.files_added,
                    "scheduled OPTIMIZE done"
                ),
                Err(e) => error!(component = "maintenance", "scheduled OPTIMIZE failed: {e}"),
            }
            next_optimize = Some(Instant::now() + every.0);
        }
        if let (Some(due), Some(every)) = (next_vacuum, config.run.vacuum_interval)
            && Instant::now() >= due
        {
            let options = VacuumOptions {
                retention: config.maintenance.vacuum_retention.0,
                full: false,
                dry_run: false,
            };
            match maintenance::vacuum_tables(&config, &options, config.maintenance.snowflake_check)
                .await
            {
                Ok(reports) => info!(
                    component = "maintenance",
                    files_deleted = reports.iter().map(|(_, r)| r.files.len()).sum::<usize>(),
                    "scheduled VACUUM done"
                ),
                Err(e) => error!(component = "maintenance", "scheduled VACUUM failed: {e}"),
            }
            next_vacuum = Some(Instant::now() + every.0);
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(interval) => {}
        }
    }
    if let Some(server) = server {
        // The server's token is a child of `shutdown`: it has stopped accepting.
        let _ = server.await;
    }
    Ok(())
}
