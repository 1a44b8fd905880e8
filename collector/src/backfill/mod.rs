//! `collector backfill` and `collector reprocess`: replaying archived batches into the readings
//! table, and giving quarantined batches a second chance after a rule or schema fix.
//!
//! Both go through the same per-gateway apply path as a pass ([`crate::ingest`]): rules, gaps,
//! quarantined rows and the `txn` watermark in the readings commit. So:
//! - a backfill into a table that already holds the rows drops them all as duplicates, and a
//!   backfill into a new table rebuilds it exactly, each (gateway, `seq`) once;
//! - a killed backfill re-run starts listing each gateway's archive at the watermark it reached;
//! - a reprocessed file whose `seq` range lies at or below the gateway's watermark is a no-op
//!   replay: its rows are dropped as duplicates and the file is archived.
//!
//! The work is counted before it starts (files and bytes), and progress goes to stderr
//! ([`progress`]).

mod archive;
mod progress;
mod reprocess;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::CollectorError;
use crate::delta::DeltaError;
use crate::ingest::{ChunkHook, IngestReport};
use crate::raw_zone::RawZoneError;

pub use archive::{BackfillOptions, backfill};
pub use reprocess::{ReprocessOptions, reprocess};

use progress::{Progress, human_bytes, human_duration};

/// Why a backfill or reprocess could not start or had to stop (a single gateway's failure is
/// in its [`crate::ingest::GatewayReport`] instead).
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// Boxed: a pass's error is large, and this one travels through every helper here.
    #[error(transparent)]
    Open(Box<CollectorError>),
    #[error("config: {0}")]
    Location(String),
    #[error(transparent)]
    RawZone(#[from] RawZoneError),
    #[error(transparent)]
    Delta(#[from] DeltaError),
    #[error(
        "gateway `{gateway}` has no folder under `{prefix}`; gateways there: {found}; check `--gateway`"
    )]
    NoSuchGateway {
        gateway: String,
        prefix: String,
        found: String,
    },
    #[error(
        "cannot move `{key}` back to the raw zone as `{raw_key}`: {source}; it stays in the quarantine, run reprocess again"
    )]
    MoveBack {
        key: String,
        raw_key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot read the reason object `{reason_key}`: {source}")]
    ReadReason {
        reason_key: String,
        #[source]
        source: object_store::Error,
    },
}

impl From<CollectorError> for BackfillError {
    fn from(e: CollectorError) -> Self {
        Self::Open(Box::new(e))
    }
}

/// What a backfill or reprocess did.
#[derive(Debug)]
pub struct WorkReport {
    /// `backfill` or `reprocess`.
    pub command: &'static str,
    /// Per gateway, as a pass reports it.
    pub ingest: IngestReport,
    /// Batch files counted before the work started.
    pub files_total: usize,
    /// Their size in bytes.
    pub bytes_total: u64,
    /// Quarantined files moved back to the raw zone (reprocess).
    pub moved_back: Vec<String>,
    /// Quarantined objects left where they are because they are not batch files (reprocess).
    pub left_in_quarantine: Vec<String>,
    /// Wall-clock time of the work.
    pub elapsed: Duration,
}

impl WorkReport {
    /// True when no gateway failed. Files that went (back) to the quarantine do not count
    /// against it, as in `run-once`.
    pub fn is_clean(&self) -> bool {
        self.ingest.gateways.iter().all(|g| g.error.is_none())
    }

    /// The lines `collector backfill` and `collector reprocess` print at the end.
    pub fn summary(&self) -> String {
        let ingest = &self.ingest;
        let files: usize = ingest.gateways.iter().map(|g| g.files_applied).sum();
        let skipped: usize = ingest.gateways.iter().map(|g| g.rows_skipped).sum();
        let mut out = String::new();
        if !self.moved_back.is_empty() || self.command == "reprocess" {
            let _ = writeln!(
                out,
                "{}: {} quarantined files moved back to the raw zone",
                self.command,
                self.moved_back.len()
            );
        }
        for key in &self.left_in_quarantine {
            let _ = writeln!(out, "  left in the quarantine (not a batch file): {key}");
        }
        let _ = writeln!(
            out,
            "{}: {files} of {} files ({}) applied, {} rows applied, {skipped} duplicate rows filtered, {} files quarantined, {} rows quarantined by rules, in {}",
            self.command,
            self.files_total,
            human_bytes(self.bytes_total),
            ingest.rows_applied(),
            ingest.files_quarantined(),
            ingest.rows_quarantined(),
            elapsed(self.elapsed),
        );
        for gw in &ingest.gateways {
            let _ = write!(
                out,
                "gateway {}: {} files, {} rows applied, {} duplicate rows filtered, watermark {}",
                gw.gateway,
                gw.files_applied,
                gw.rows_applied,
                gw.rows_skipped,
                gw.watermark
                    .map_or_else(|| "none".to_owned(), |w| w.to_string()),
            );
            if !gw.quarantined.is_empty() {
                let _ = write!(out, ", {} quarantined", gw.quarantined.len());
            }
            if let Some(error) = &gw.error {
                let _ = write!(out, "; ERROR {error}");
            }
            out.push('\n');
            for file in &gw.quarantined {
                let _ = writeln!(
                    out,
                    "  quarantined {} -> {}: {}: {}",
                    file.key, file.quarantine_key, file.reason.kind, file.reason.message
                );
            }
        }
        out
    }
}

/// `0.4s` for short runs, as [`human_duration`] for long ones.
fn elapsed(d: Duration) -> String {
    if d < Duration::from_mins(1) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        human_duration(d)
    }
}

/// A progress display shared with the ingest's chunk hook.
fn progress_hook(progress: &Arc<Mutex<Progress>>) -> ChunkHook {
    let progress = Arc::clone(progress);
    ChunkHook::new(move |done| {
        // A poisoned lock only means an earlier redraw panicked; the counts are still usable.
        let mut p = progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        p.advance(done.files, done.bytes, done.rows_applied);
    })
}

/// Keeps the gateways named by `wanted` (all of them when empty); a name without a folder is
/// an error that lists the folders there are.
fn select_gateways(
    found: Vec<String>,
    wanted: &[String],
    prefix: &str,
) -> Result<Vec<String>, BackfillError> {
    if wanted.is_empty() {
        return Ok(found);
    }
    if let Some(missing) = wanted.iter().find(|w| !found.contains(w)) {
        return Err(BackfillError::NoSuchGateway {
            gateway: missing.clone(),
            prefix: prefix.to_owned(),
            found: if found.is_empty() {
                "none".to_owned()
            } else {
                found.join(", ")
            },
        });
    }
    Ok(found.into_iter().filter(|g| wanted.contains(g)).collect())
}
