//! One collector pass: raw zone → Delta tables (readings, gaps, quarantined rows) → Snowflake.

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{CollectorConfig, StoreLocation};
use crate::delta::{DeltaError, ReadingsTable, Tables};
use crate::ingest::{IngestError, IngestOptions, IngestReport, ingest_all};
use crate::raw_zone::{RawZone, RawZoneError};
use crate::snowflake::{LoadError, LoadReport, SnowflakeClient, SnowflakeError, load};

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
}

/// What one pass did.
#[derive(Debug)]
pub struct PassReport {
    pub ingest: IngestReport,
    /// `None` when no Snowflake is configured.
    pub snowflake: Option<LoadReport>,
}

impl PassReport {
    /// True when every gateway was applied completely. Quarantined files do not count against
    /// it: the data problem was handled (the files and their reasons are in the report), while
    /// an error needs a person or the next pass.
    pub fn is_clean(&self) -> bool {
        self.ingest.gateways.iter().all(|g| g.error.is_none())
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
/// the config, creating the tables that are missing.
pub async fn open_tables(config: &CollectorConfig) -> Result<(RawZone, Tables), CollectorError> {
    let raw_location = config.raw_location().map_err(CollectorError::Location)?;
    let raw = open_raw_zone(config, &raw_location)?;
    let urls = config.table_urls().map_err(CollectorError::Location)?;
    let tables = Tables::open_or_create(&urls, config.s3.storage_options())
        .await?
        .with_commit_attempts(config.run.commit_attempts);
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
/// (when configured) up to the table's latest version.
///
/// Bad files are quarantined and listed in the result; a gateway that fails (a store, quarantine
/// or Delta error) is reported in the result and does not stop the others; Snowflake is loaded
/// with whatever the table holds.
pub async fn run_once(config: &CollectorConfig) -> Result<PassReport, CollectorError> {
    let (raw, mut tables) = open_tables(config).await?;
    let options = IngestOptions::new(config.run.max_files_per_commit)
        .with_rules(config.rule_set().map_err(CollectorError::Location)?)
        .with_commit_attempts(config.run.commit_attempts);
    let ingest = ingest_all(&raw, &mut tables, &options).await?;
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
    let table = tables.readings;
    let snowflake = match &config.snowflake {
        None => None,
        Some(sf) => {
            let mut client = SnowflakeClient::login(sf).await?;
            let report = load(&mut client, table.delta_table(), sf).await?;
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
    Ok(PassReport { ingest, snowflake })
}

/// Repeats passes every `run.interval` until `shutdown` is cancelled. A failed pass is logged
/// and retried at the next interval; a pass in progress finishes before the loop stops.
pub async fn run(
    config: CollectorConfig,
    shutdown: CancellationToken,
) -> Result<(), CollectorError> {
    let interval = config.run.interval.0;
    loop {
        match run_once(&config).await {
            Ok(report) if report.is_clean() => {}
            Ok(_) => warn!(
                component = "collector",
                "pass finished with failed gateways; retried next pass"
            ),
            Err(e) => error!(component = "collector", "pass failed: {e}"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(interval) => {}
        }
    }
}
