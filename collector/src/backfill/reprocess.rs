//! `collector reprocess`: quarantined batch files moved back into the raw zone and applied in a
//! pass, after the rule or schema problem that sent them there was fixed. A file that fails again
//! goes back to the quarantine with a fresh reason object.
//!
//! # A move back
//! 1. Copy `<quarantine_prefix>gateway=<id>/<file>` to `<prefix>gateway=<id>/<file>`.
//! 2. Delete its `.reason.json`, so a second failure writes a fresh one.
//! 3. Delete the quarantined copy.
//!
//! Quarantined fresh-lane files (`gateway=<id>/fresh/`, contract v3) are not moved back: the main
//! lane carries every reading they held. They are listed as left in the quarantine.
//!
//! A crash in between leaves the file in the raw zone (the next pass or reprocess applies it)
//! and maybe a stale copy in the quarantine, which the next reprocess moves back again: the same
//! bytes under the same key, so nothing is applied twice.

use std::sync::{Arc, Mutex};

use object_store::ObjectStoreExt as _;
use object_store::path::Path;
use tracing::{Instrument as _, error, info, info_span};

use super::{BackfillError, Progress, WorkReport, progress_hook, select_gateways};
use crate::config::CollectorConfig;
use crate::ingest::{GatewayReport, IngestOptions, IngestReport, ingest_gateway};
use crate::quarantine::{REASON_SUFFIX, ReasonObject};
use crate::raw_zone::{BatchFile, RawZone};

/// What to reprocess.
#[derive(Debug, Clone, Default)]
pub struct ReprocessOptions {
    /// Only these gateways (all gateways with a quarantine folder when empty).
    pub gateways: Vec<String>,
    /// Only files whose reason object names this kind (`rule_failed`, `foreign_schema`, ...)
    /// or this rule.
    pub reason: Option<String>,
}

/// Moves the selected quarantined batch files back and applies their gateways' raw folders.
pub async fn reprocess(
    config: &CollectorConfig,
    options: &ReprocessOptions,
) -> Result<WorkReport, BackfillError> {
    let (raw, mut tables) = crate::open_tables(config).await?;
    let location = config.raw_location().map_err(BackfillError::Location)?;
    // Only listed through: the quarantine has the raw zone's key layout.
    let quarantine = RawZone::open(
        &location,
        &config.s3,
        &config.raw.quarantine_prefix,
        &config.raw.archive_prefix,
    )?;
    let listing = quarantine.list_gateways().await?;
    let gateways = select_gateways(listing.gateways, &options.gateways, quarantine.prefix())?;

    let mut moved_back = Vec::new();
    let mut left_in_quarantine = Vec::new();
    let mut affected = Vec::new();
    for gateway in gateways {
        let files = quarantine.list_batches(&gateway, None).await?;
        left_in_quarantine.extend(
            files
                .foreign
                .into_iter()
                .map(|o| o.object_key)
                .filter(|k| !k.ends_with(REASON_SUFFIX)),
        );
        left_in_quarantine.extend(files.fresh.into_iter().map(|f| f.object_key));
        let mut any = false;
        for file in &files.batches {
            if let Some(wanted) = &options.reason
                && !reason_matches(&raw, file, wanted).await?
            {
                continue;
            }
            moved_back.push(move_back(&raw, file).await?);
            any = true;
        }
        if any {
            affected.push(gateway);
        }
    }

    let (mut files_total, mut bytes_total) = (0, 0);
    for gateway in &affected {
        for file in raw.list_main_batches(gateway, None).await?.batches {
            files_total += 1;
            bytes_total += file.size;
        }
    }
    let progress = Arc::new(Mutex::new(Progress::new(
        "reprocess",
        files_total,
        bytes_total,
    )));
    let ingest_options = IngestOptions::new(config.run.max_files_per_commit)
        .with_rules(config.rule_set().map_err(BackfillError::Location)?)
        .with_commit_attempts(config.run.commit_attempts)
        .with_chunk_hook(progress_hook(&progress));
    let mut report = IngestReport::default();
    for gateway in affected {
        let gw = match ingest_gateway(&raw, &mut tables, &gateway, &ingest_options)
            .instrument(info_span!("reprocess", component = "reprocess", gateway = %gateway))
            .await
        {
            Ok(gw) => gw,
            Err(e) => {
                error!(component = "reprocess", gateway = %gateway, error = %e, "gateway pass stopped; the moved files wait in the raw zone for the next pass");
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
        command: "reprocess",
        ingest: report,
        files_total,
        bytes_total,
        moved_back,
        left_in_quarantine,
        elapsed: progress.elapsed(),
    })
}

/// True when the reason object beside `file` names `wanted` as its kind or rule; a file without
/// one (a move that crashed before writing it) matches no filter.
async fn reason_matches(
    raw: &RawZone,
    file: &BatchFile,
    wanted: &str,
) -> Result<bool, BackfillError> {
    let reason_key = format!("{}{REASON_SUFFIX}", file.object_key);
    let read_err = |source| BackfillError::ReadReason {
        reason_key: reason_key.clone(),
        source,
    };
    let path = Path::parse(&reason_key).map_err(|e| read_err(e.into()))?;
    let bytes = match raw.store().get(&path).await {
        Ok(got) => got.bytes().await.map_err(read_err)?,
        Err(object_store::Error::NotFound { .. }) => return Ok(false),
        Err(e) => return Err(read_err(e)),
    };
    Ok(
        serde_json::from_slice::<ReasonObject>(&bytes).is_ok_and(|r| {
            r.reason.kind.as_str() == wanted || r.reason.rule.as_deref() == Some(wanted)
        }),
    )
}

/// Moves one quarantined batch file back to its raw-zone key; returns that key.
async fn move_back(raw: &RawZone, file: &BatchFile) -> Result<String, BackfillError> {
    let raw_key = file.key.to_key(raw.prefix());
    let move_err = |source| BackfillError::MoveBack {
        key: file.object_key.clone(),
        raw_key: raw_key.clone(),
        source,
    };
    let from = Path::parse(&file.object_key).map_err(|e| move_err(e.into()))?;
    let to = Path::parse(&raw_key).map_err(|e| move_err(e.into()))?;
    let reason = Path::parse(format!("{}{REASON_SUFFIX}", file.object_key))
        .map_err(|e| move_err(e.into()))?;
    let store = raw.store();
    store.copy(&from, &to).await.map_err(move_err)?;
    for path in [&reason, &from] {
        match store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(move_err(e)),
        }
    }
    info!(component = "reprocess", key = %file.object_key, raw_key = %raw_key, "quarantined file moved back to the raw zone");
    Ok(raw_key)
}
