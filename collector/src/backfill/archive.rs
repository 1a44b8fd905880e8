//! `collector backfill`: the archived batches (`<archive_prefix>gateway=<id>/`, the raw zone's
//! key layout) applied again to the configured tables, per gateway in `seq` order. The archive
//! is read in place: applied files are neither moved nor deleted. Only the main lane is replayed:
//! it holds every reading, so the archived fresh-lane copies (`gateway=<id>/fresh/`) are left
//! alone.

use std::sync::{Arc, Mutex};

use tracing::{Instrument as _, error, info_span};

use super::{BackfillError, Progress, WorkReport, progress_hook, select_gateways};
use crate::config::CollectorConfig;
use crate::ingest::{GatewayReport, IngestOptions, IngestReport, ingest_gateway};
use crate::raw_zone::RawZone;

/// What to backfill.
#[derive(Debug, Clone, Default)]
pub struct BackfillOptions {
    /// Only these gateways (all gateways with an archive folder when empty).
    pub gateways: Vec<String>,
    /// Only archived files whose first `seq` is at or above this.
    pub from_seq: Option<i64>,
}

/// Applies the archive to the tables the config names (creating them when missing). A gateway
/// that fails is reported and does not stop the others.
pub async fn backfill(
    config: &CollectorConfig,
    options: &BackfillOptions,
) -> Result<WorkReport, BackfillError> {
    let (_, mut tables) = crate::open_tables(config).await?;
    let location = config.raw_location().map_err(BackfillError::Location)?;
    // The archive plays the raw zone; bad files still go to the configured quarantine.
    let archive = RawZone::open(
        &location,
        &config.s3,
        &config.raw.archive_prefix,
        &config.raw.archive_prefix,
    )?
    .with_quarantine_prefix(&config.raw.quarantine_prefix)
    .leaving_applied_in_place();
    let listing = archive.list_gateways().await?;
    let gateways = select_gateways(listing.gateways, &options.gateways, archive.prefix())?;

    // Count first, so the progress can show a total and an ETA.
    let mut plan = Vec::with_capacity(gateways.len());
    let (mut files_total, mut bytes_total) = (0, 0);
    for gateway in gateways {
        let watermark = tables.readings.watermark(&gateway).await?;
        let batches = archive.list_main_batches(&gateway, None).await?.batches;
        // Resume at the last file that starts at or below the watermark: batches are contiguous
        // `seq` ranges (batch contract), so only that one can hold rows above it.
        let resume = watermark.and_then(|w| {
            batches
                .iter()
                .rev()
                .find(|b| b.key.first_seq <= w)
                .map(|b| b.key.first_seq - 1)
        });
        let start_after = resume.max(options.from_seq.map(|n| n.saturating_sub(1)));
        for file in batches
            .iter()
            .filter(|b| start_after.is_none_or(|a| b.key.first_seq > a))
        {
            files_total += 1;
            bytes_total += file.size;
        }
        plan.push((gateway, start_after));
    }

    let progress = Arc::new(Mutex::new(Progress::new(
        "backfill",
        files_total,
        bytes_total,
    )));
    let base = IngestOptions::new(config.run.max_files_per_commit)
        .with_rules(config.rule_set().map_err(BackfillError::Location)?)
        .with_commit_attempts(config.run.commit_attempts)
        .with_chunk_hook(progress_hook(&progress))
        .without_fresh_lane();
    let mut report = IngestReport::default();
    for (gateway, start_after) in plan {
        let options = base.clone().with_start_after(start_after);
        let gw = match ingest_gateway(&archive, &mut tables, &gateway, &options)
            .instrument(info_span!("backfill", component = "backfill", gateway = %gateway))
            .await
        {
            Ok(gw) => gw,
            Err(e) => {
                error!(component = "backfill", gateway = %gateway, error = %e, "gateway backfill stopped; run backfill again to resume from its watermark");
                GatewayReport {
                    watermark: tables.readings.watermark(&gateway).await.ok().flatten(),
                    gateway,
                    error: Some(e.to_string()),
                    ..GatewayReport::default()
                }
            }
        };
        report.gateways.push(gw);
    }
    let progress = progress
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    progress.finish();
    Ok(WorkReport {
        command: "backfill",
        ingest: report,
        files_total,
        bytes_total,
        moved_back: Vec::new(),
        left_in_quarantine: Vec::new(),
        elapsed: progress.elapsed(),
    })
}
