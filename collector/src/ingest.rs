//! Applying the raw zone to the Delta table: per gateway, in `seq` order, exactly once.
//!
//! # The delivery chain, collector side
//! 1. A gateway's batches are read in key order, which is `seq` order.
//! 2. Rows with `seq <= watermark` are dropped (replays, overlaps, batches applied by a pass that
//!    crashed before archiving); the rest go into one Delta commit together with the new
//!    watermark (`txn` action), at most `max_files_per_commit` files per commit.
//! 3. Only after the commit are the files archived. A crash between commit and archive is
//!    harmless: the next pass finds the files again, drops all their rows and archives them.
//! 4. A file that fails the contract (or a key under a gateway folder that is not a batch key)
//!    is moved to the quarantine with a reason object ([`crate::quarantine`]) and the gateway's
//!    later batches are applied in the same pass: the watermark passes the bad file's `seq`
//!    range only through the rows of good files. This is safe because a gateway uploads its
//!    batches one at a time in `seq` order (batch contract, guarantee 4): nothing the bad file
//!    could have held is still on its way.
//! 5. A transient failure (the store cannot be reached, a read times out, a quarantine move
//!    fails) ends the gateway's pass after applying the batches read before it; later batches
//!    wait for the next pass, so the watermark never passes a file that was not looked at.
//!    Other gateways carry on.

use tracing::{Instrument, error, info, info_span, warn};

use crate::delta::{DeltaError, ReadingsTable};
use crate::quarantine::{QuarantineError, QuarantinedFile, Reason, quarantine};
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
    #[error("gateway `{gateway}`: {source}")]
    Quarantine {
        gateway: String,
        #[source]
        source: QuarantineError,
    },
    #[error("cannot list the gateways in the raw zone: {0}")]
    ListGateways(#[source] RawZoneError),
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
    /// Files moved to the quarantine in this pass, in the order they were found.
    pub quarantined: Vec<QuarantinedFile>,
    /// Uploads in flight (names starting with `.`), left alone.
    pub in_flight: Vec<String>,
    /// A store, quarantine or Delta failure that ended this gateway's pass early (retried next
    /// pass).
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

    /// Total files moved to the quarantine in this pass.
    pub fn files_quarantined(&self) -> usize {
        self.gateways.iter().map(|g| g.quarantined.len()).sum()
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
/// folder is drained or a transient failure stops it; bad files are quarantined on the way.
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
    let quarantine_err = |source| IngestError::Quarantine {
        gateway: gateway.to_owned(),
        source,
    };
    // Pick up commits of other collectors before filtering.
    table.reload().await.map_err(delta_err)?;
    report.watermark = table.watermark(gateway).await.map_err(delta_err)?;

    let listing = raw.list_batches(gateway, None).await.map_err(raw_err)?;
    for key in &listing.in_flight {
        warn!(key = %key, "upload in flight in a gateway folder; left alone");
    }
    report.in_flight = listing.in_flight;
    // Foreign keys hold no batch, so moving them first changes nothing for the seq order.
    for object in &listing.foreign {
        let moved = quarantine(
            raw,
            gateway,
            &object.object_key,
            object.size,
            Reason::foreign_key(),
        )
        .await
        .map_err(quarantine_err)?;
        record_quarantined(report, moved);
    }

    for chunk in listing.batches.chunks(max_files_per_commit.max(1)) {
        let mut valid: Vec<ValidBatch> = Vec::with_capacity(chunk.len());
        let mut stop = None;
        for file in chunk {
            match raw.read_batch(file).await {
                Ok(batch) => valid.push(batch),
                Err(RawZoneError::Invalid { key, problem }) => {
                    match quarantine(
                        raw,
                        gateway,
                        &key,
                        file.size,
                        Reason::from_problem(&problem),
                    )
                    .await
                    {
                        Ok(moved) => record_quarantined(report, moved),
                        Err(e) => {
                            stop = Some(quarantine_err(e));
                            break;
                        }
                    }
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
    }
    Ok(())
}

/// Logs and reports one quarantined file; `None` means another collector moved it first.
fn record_quarantined(report: &mut GatewayReport, moved: Option<QuarantinedFile>) {
    let Some(file) = moved else {
        return;
    };
    error!(
        key = %file.key,
        quarantine_key = %file.quarantine_key,
        kind = %file.reason.kind,
        reason = %file.reason.message,
        resumed = file.resumed,
        "file quarantined; the gateway's later batches carry on without its rows"
    );
    report.quarantined.push(file);
}
