//! Applying the raw zone to the Delta table: per gateway, in `seq` order, exactly once.
//!
//! # The delivery chain, collector side
//! 1. A gateway's batches are read in key order, which is `seq` order.
//! 2. Rows with `seq <= watermark` are dropped (replays, overlaps, batches applied by a pass that
//!    crashed before archiving); the rest go into one Delta commit together with the new
//!    watermark (`txn` action), at most `max_files_per_commit` files per commit.
//! 3. Only after the commit are the files archived. A crash between commit and archive is
//!    harmless: the next pass finds the files again, drops all their rows and archives them.
//! 4. A batch that fails the contract stays in place, is reported with its key and reason, and
//!    stops its gateway's progress: applying later batches would move the watermark past rows
//!    that were never applied. Other gateways carry on.

use tracing::{Instrument, error, info, info_span, warn};

use crate::delta::{DeltaError, ReadingsTable};
use crate::raw_zone::{RawZone, RawZoneError, ValidBatch};

/// Errors that stop one gateway's pass (the table and the raw zone are left consistent; the
/// next pass resumes).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("gateway `{gateway}`: {source}")]
    RawZone {
        gateway: String,
        #[source]
        source: RawZoneError,
    },
    #[error("gateway `{gateway}`: {source}")]
    Delta {
        gateway: String,
        #[source]
        source: DeltaError,
    },
    #[error("cannot list the gateways in the raw zone: {0}")]
    ListGateways(#[source] RawZoneError),
}

/// A batch that failed the contract and blocks its gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedBatch {
    /// Full object key.
    pub key: String,
    /// Why it was rejected.
    pub reason: String,
}

/// What one pass did for one gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayReport {
    /// The gateway id.
    pub gateway: String,
    /// Batch files applied (including those whose rows were all duplicates) and archived.
    pub files_applied: usize,
    /// Rows appended to the Delta table.
    pub rows_applied: usize,
    /// Rows dropped because their `seq` was at or below the watermark.
    pub rows_skipped: usize,
    /// The gateway's watermark after the pass (`None`: nothing ever applied).
    pub watermark: Option<i64>,
    /// The Delta version of the pass's last commit for this gateway (`None`: no commit).
    pub delta_version: Option<u64>,
    /// Commits made.
    pub commits: usize,
    /// The batch that stopped this gateway, if one failed the contract.
    pub rejected: Option<RejectedBatch>,
    /// Keys in the gateway's folder that are not batch keys (left alone).
    pub foreign_keys: Vec<String>,
    /// A store or Delta failure that ended this gateway's pass early (retried next pass).
    pub error: Option<String>,
}

/// What one pass over the whole raw zone did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// One entry per gateway folder, sorted by gateway id.
    pub gateways: Vec<GatewayReport>,
    /// Folders under the raw prefix that are not `gateway=<id>/` (left alone).
    pub foreign_folders: Vec<String>,
}

impl IngestReport {
    /// Total rows appended in this pass.
    pub fn rows_applied(&self) -> usize {
        self.gateways.iter().map(|g| g.rows_applied).sum()
    }

    /// The report of one gateway.
    pub fn gateway(&self, id: &str) -> Option<&GatewayReport> {
        self.gateways.iter().find(|g| g.gateway == id)
    }
}

/// Applies every gateway's pending batches. A failing gateway is recorded in its report and does
/// not stop the others; only failing to list the raw zone is an error.
pub async fn ingest_all(
    raw: &RawZone,
    table: &mut ReadingsTable,
    max_files_per_commit: usize,
) -> Result<IngestReport, IngestError> {
    let listing = raw
        .list_gateways()
        .await
        .map_err(IngestError::ListGateways)?;
    for folder in &listing.foreign {
        warn!(component = "ingest", folder = %folder, "folder in the raw zone is not a gateway folder; left alone");
    }
    let mut report = IngestReport {
        gateways: Vec::with_capacity(listing.gateways.len()),
        foreign_folders: listing.foreign,
    };
    for gateway in listing.gateways {
        let mut gw = GatewayReport {
            gateway: gateway.clone(),
            ..GatewayReport::default()
        };
        if let Err(e) = ingest_gateway_into(raw, table, &gateway, max_files_per_commit, &mut gw)
            .instrument(info_span!("ingest", component = "ingest", gateway = %gateway))
            .await
        {
            error!(component = "ingest", gateway = %gateway, error = %e, "gateway pass ended early; retried next pass");
            gw.error = Some(e.to_string());
        }
        report.gateways.push(gw);
    }
    Ok(report)
}

/// Applies one gateway's pending batches, `max_files_per_commit` files per commit, until its
/// folder is drained or a batch fails the contract.
pub async fn ingest_gateway(
    raw: &RawZone,
    table: &mut ReadingsTable,
    gateway: &str,
    max_files_per_commit: usize,
) -> Result<GatewayReport, IngestError> {
    let mut report = GatewayReport {
        gateway: gateway.to_owned(),
        ..GatewayReport::default()
    };
    ingest_gateway_into(raw, table, gateway, max_files_per_commit, &mut report)
        .instrument(info_span!("ingest", component = "ingest", gateway = %gateway))
        .await?;
    Ok(report)
}

async fn ingest_gateway_into(
    raw: &RawZone,
    table: &mut ReadingsTable,
    gateway: &str,
    max_files_per_commit: usize,
    report: &mut GatewayReport,
) -> Result<(), IngestError> {
    let raw_err = |source| IngestError::RawZone {
        gateway: gateway.to_owned(),
        source,
    };
    let delta_err = |source| IngestError::Delta {
        gateway: gateway.to_owned(),
        source,
    };
    // Pick up commits of other collectors before filtering.
    table.reload().await.map_err(delta_err)?;
    report.watermark = table.watermark(gateway).await.map_err(delta_err)?;

    let listing = raw.list_batches(gateway, None).await.map_err(raw_err)?;
    for key in &listing.foreign {
        warn!(key = %key, "object in a gateway folder is not a batch key; left alone");
    }
    report.foreign_keys = listing.foreign;

    for chunk in listing.batches.chunks(max_files_per_commit.max(1)) {
        let mut valid: Vec<ValidBatch> = Vec::with_capacity(chunk.len());
        let mut stop = None;
        for file in chunk {
            match raw.read_batch(file).await {
                Ok(batch) => valid.push(batch),
                Err(RawZoneError::Invalid { key, problem }) => {
                    error!(key = %key, reason = %problem, "batch rejected; this gateway waits until it is removed or fixed");
                    report.rejected = Some(RejectedBatch {
                        key,
                        reason: problem.to_string(),
                    });
                    break;
                }
                Err(e) => {
                    stop = Some(raw_err(e));
                    break;
                }
            }
        }
        // Everything before the first unreadable batch is still applied: it precedes it in seq.
        if !valid.is_empty() {
            let data: Vec<_> = valid.iter().flat_map(|b| b.data.iter().cloned()).collect();
            let outcome = table.apply(gateway, &data).await.map_err(delta_err)?;
            report.rows_applied += outcome.rows_applied;
            report.rows_skipped += outcome.rows_skipped;
            report.watermark = outcome.watermark_after;
            if let Some(version) = outcome.version {
                report.delta_version = Some(version);
                report.commits += 1;
            }
            info!(
                files = valid.len(),
                rows_applied = outcome.rows_applied,
                rows_skipped = outcome.rows_skipped,
                watermark = ?outcome.watermark_after,
                version = ?outcome.version,
                "applied"
            );
            for batch in &valid {
                raw.archive(&batch.file).await.map_err(raw_err)?;
                report.files_applied += 1;
            }
        }
        if let Some(e) = stop {
            return Err(e);
        }
        if report.rejected.is_some() {
            break;
        }
    }
    Ok(())
}
