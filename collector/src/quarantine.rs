//! Quarantine: moving a file that can never be applied out of the raw zone, with a reason object
//! beside it, so the gateway's later batches keep flowing.
//!
//! # The rule
//! - *Permanent* problems are properties of the bytes or the key: reading the file again gives the
//!   same answer. They quarantine the object at once: not Parquet, truncated, undecodable, a
//!   foreign schema, an unknown or newer contract version, rows of another gateway than the
//!   folder, unsorted or duplicate `seq`, an unknown quality, a key that does not match the first
//!   `seq`, an empty file, a key that is not a batch key under a gateway folder, and a footer
//!   that does not match the lane of the file's folder (contract v3).
//! - *Transient* problems (the store cannot be reached, a read times out, the quarantine move
//!   itself fails) never quarantine: the gateway stops for this pass and is retried on the next.
//! - The gateway's later batches are applied in the same pass. Its watermark moves past the
//!   quarantined file's `seq` range only through the rows of good files; the bad file's rows are
//!   missing from the table, and the gaps table records the range as `quarantined` once the
//!   next applied reading closes it ([`quarantined_batches`] finds the files for that).
//! - A batch whose reading breaks a row-level rule with action `fail` is quarantined the same
//!   way, with kind `rule_failed` and the rule named.
//!
//! # Invariants of a move
//! 1. Copy the object to `<quarantine_prefix>gateway=<id>/<file name>`.
//! 2. Write `<that key>.reason.json` beside it, unless an earlier pass already did (the first
//!    detection is kept).
//! 3. Delete the original.
//!
//! A crash between any two steps leaves the original in the raw zone: the next pass detects the
//! same problem from the same bytes, copies again (same bytes, same key) and finishes the move.
//! An original that vanished before the copy was moved by another collector.

use chrono::{SecondsFormat, Utc};
use edge_agent::contract::{BatchKey, ContractError, Lane, column};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::gaps::QuarantinedRange;
use crate::raw_zone::{BatchProblem, RawZone};
use crate::rules::{Failure, Rule};

/// Suffix of the reason object written beside each quarantined file.
pub const REASON_SUFFIX: &str = ".reason.json";

/// Why a move into the quarantine did not finish. The original stays in the raw zone and the
/// move is retried on the next pass.
#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error("cannot copy `{key}` to the quarantine as `{quarantine_key}`: {source}")]
    Copy {
        key: String,
        quarantine_key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot write the reason object `{reason_key}` for `{key}`: {source}")]
    Reason {
        key: String,
        reason_key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot delete `{key}` after copying it to the quarantine: {source}")]
    Delete {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot list the quarantine folder `{prefix}`: {source}")]
    List {
        prefix: String,
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

/// The stable, machine-readable name of a quarantine reason (`reason.kind` in the reason object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The bytes do not start with the Parquet magic.
    NotParquet,
    /// Parquet magic at the start but not at the end: a cut-off upload.
    Truncated,
    /// A complete-looking Parquet file whose footer or pages cannot be decoded.
    Unreadable,
    /// Columns, order, types or nullability differ from the batch contract.
    ForeignSchema,
    /// A contract version that is newer than this collector or does not exist.
    ContractVersion,
    /// Rows (or footer metadata) of another gateway than the folder.
    ForeignGateway,
    /// `seq` goes backwards.
    UnsortedSeq,
    /// The same `seq` twice.
    DuplicateSeq,
    /// A `quality` that is not `good`, `bad` or `uncertain`.
    UnknownQuality,
    /// The key's first `seq` differs from the file's.
    FirstSeqMismatch,
    /// No rows at all.
    Empty,
    /// An object under a gateway folder whose key is not a batch key.
    ForeignKey,
    /// The agent's gap records in the footer (`plantline.gaps`) are not valid JSON records.
    MalformedGaps,
    /// A reading broke a row-level rule whose action is `fail`.
    RuleFailed,
    /// The footer does not match the lane of the folder (contract v3): a fresh-lane file without
    /// `plantline.lane = fresh` and contract v3, or a main-lane file claiming the fresh lane.
    LaneMismatch,
}

impl ProblemKind {
    /// The name used in the reason object, logs and the pass summary.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotParquet => "not_parquet",
            Self::Truncated => "truncated",
            Self::Unreadable => "unreadable",
            Self::ForeignSchema => "foreign_schema",
            Self::ContractVersion => "contract_version",
            Self::ForeignGateway => "foreign_gateway",
            Self::UnsortedSeq => "unsorted_seq",
            Self::DuplicateSeq => "duplicate_seq",
            Self::UnknownQuality => "unknown_quality",
            Self::FirstSeqMismatch => "first_seq_mismatch",
            Self::Empty => "empty",
            Self::ForeignKey => "foreign_key",
            Self::MalformedGaps => "malformed_gaps",
            Self::RuleFailed => "rule_failed",
            Self::LaneMismatch => "lane_mismatch",
        }
    }
}

impl std::fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&BatchProblem> for ProblemKind {
    fn from(problem: &BatchProblem) -> Self {
        match problem {
            BatchProblem::NotParquet { .. } => Self::NotParquet,
            BatchProblem::Truncated { .. } => Self::Truncated,
            BatchProblem::Unreadable(_) => Self::Unreadable,
            BatchProblem::Contract(ContractError::Unsorted { prev, next }) if prev == next => {
                Self::DuplicateSeq
            }
            BatchProblem::Contract(ContractError::Unsorted { .. }) => Self::UnsortedSeq,
            BatchProblem::Contract(ContractError::MixedGateway { .. })
            | BatchProblem::ForeignGateway { .. } => Self::ForeignGateway,
            BatchProblem::Contract(ContractError::BadValue { column: name, .. })
                if *name == column::QUALITY =>
            {
                Self::UnknownQuality
            }
            // Only the quality column is checked by value today; any other column's bad value
            // (or a row with both a number and a text) still means the file does not follow the
            // contract's schema.
            BatchProblem::Contract(
                ContractError::Schema { .. }
                | ContractError::BadValue { .. }
                | ContractError::ValueAndText { .. },
            ) => Self::ForeignSchema,
            BatchProblem::Contract(ContractError::GatewayId(_) | ContractError::Key(_)) => {
                Self::ForeignKey
            }
            BatchProblem::FirstSeqMismatch { .. } => Self::FirstSeqMismatch,
            BatchProblem::Empty => Self::Empty,
            BatchProblem::NewerContract { .. } | BatchProblem::UnknownContract { .. } => {
                Self::ContractVersion
            }
            BatchProblem::MalformedGaps { .. } => Self::MalformedGaps,
            BatchProblem::FreshLaneFooter { .. } | BatchProblem::MainLaneClaimsFresh => {
                Self::LaneMismatch
            }
        }
    }
}

/// A reason: the stable kind and the message a person reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    /// Stable, machine-readable kind.
    pub kind: ProblemKind,
    /// What is wrong, for a person.
    pub message: String,
    /// The rule that failed the batch (kind `rule_failed` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

impl Reason {
    /// The reason for a batch file that broke the contract.
    pub fn from_problem(problem: &BatchProblem) -> Self {
        Self {
            kind: problem.into(),
            message: problem.to_string(),
            rule: None,
        }
    }

    /// The reason for a batch with a reading that broke a row-level rule with action `fail`.
    pub fn rule_failed(rule: &Rule, failure: &Failure) -> Self {
        Self {
            kind: ProblemKind::RuleFailed,
            message: format!(
                "reading seq {} ({}/{}) breaks rule `{}` ({} check, action fail): {}",
                failure.seq,
                failure.device,
                failure.tag,
                rule.name,
                rule.check.name(),
                failure.violation.detail
            ),
            rule: Some(rule.name.clone()),
        }
    }

    /// The reason for an object under a gateway folder whose key is not a batch key.
    pub fn foreign_key() -> Self {
        Self {
            kind: ProblemKind::ForeignKey,
            message:
                "is not a batch key; expected `<prefix>gateway=<id>/<first seq, 20 digits>.parquet` (main lane) or `<prefix>gateway=<id>/fresh/<first seq, 20 digits>.parquet` (fresh lane)"
                    .to_owned(),
            rule: None,
        }
    }
}

/// The JSON object written beside a quarantined file as `<file>.reason.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonObject {
    /// The key the file had in the raw zone.
    pub key: String,
    /// The gateway whose folder held it.
    pub gateway: String,
    /// The first `seq` named by its key (`null` when the key is not a batch key): where the
    /// missing rows start.
    pub first_seq: Option<i64>,
    /// The last `seq` of the file when its footer or rows tell it (left out when unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<i64>,
    /// Where the file now is.
    pub quarantine_key: String,
    /// Why it was quarantined.
    pub reason: Reason,
    /// When the collector found the problem, UTC, RFC 3339.
    pub detected_at: String,
    /// The collector version that found it.
    pub collector_version: String,
    /// Size of the file in bytes.
    pub size: u64,
}

/// A file this pass moved into the quarantine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedFile {
    /// The key it had in the raw zone.
    pub key: String,
    /// Where it is now.
    pub quarantine_key: String,
    /// Why.
    pub reason: Reason,
    /// True when an earlier pass had already copied it and crashed before deleting the original.
    pub resumed: bool,
}

/// The quarantine key of `object_key`: the same name below `<quarantine_prefix>gateway=<id>/`.
pub fn quarantine_key(raw: &RawZone, gateway: &str, object_key: &str) -> String {
    let folder = BatchKey::gateway_prefix(raw.prefix(), gateway);
    let name = object_key.strip_prefix(&folder).unwrap_or(object_key);
    format!(
        "{}{name}",
        BatchKey::gateway_prefix(raw.quarantine_prefix(), gateway)
    )
}

/// Moves `object_key` (a file of `gateway`'s folder, `size` bytes, last `seq` when known) into
/// the quarantine with a reason object beside it: copy, reason, delete. `Ok(None)` when the
/// original vanished before the copy (another collector moved it).
pub async fn quarantine(
    raw: &RawZone,
    gateway: &str,
    object_key: &str,
    size: u64,
    last_seq: Option<i64>,
    reason: Reason,
) -> Result<Option<QuarantinedFile>, QuarantineError> {
    let store = raw.store();
    let quarantine_key = quarantine_key(raw, gateway, object_key);
    let reason_key = format!("{quarantine_key}{REASON_SUFFIX}");
    let copy_err = |source| QuarantineError::Copy {
        key: object_key.to_owned(),
        quarantine_key: quarantine_key.clone(),
        source,
    };
    let reason_err = |source| QuarantineError::Reason {
        key: object_key.to_owned(),
        reason_key: reason_key.clone(),
        source,
    };
    let from = Path::parse(object_key).map_err(|e| copy_err(e.into()))?;
    let to = Path::parse(&quarantine_key).map_err(|e| copy_err(e.into()))?;
    let reason_path = Path::parse(&reason_key).map_err(|e| reason_err(e.into()))?;

    let resumed = match store.head(&to).await {
        Ok(_) => true,
        Err(object_store::Error::NotFound { .. }) => false,
        Err(e) => return Err(copy_err(e)),
    };
    // Copied again even when a copy exists: the copy must hold exactly the bytes deleted below.
    match store.copy(&from, &to).await {
        Ok(()) => {}
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(copy_err(e)),
    }
    let reason_exists = match store.head(&reason_path).await {
        Ok(_) => true,
        Err(object_store::Error::NotFound { .. }) => false,
        Err(e) => return Err(reason_err(e)),
    };
    if !reason_exists {
        let object = ReasonObject {
            key: object_key.to_owned(),
            gateway: gateway.to_owned(),
            first_seq: BatchKey::parse(raw.prefix(), object_key)
                .ok()
                .map(|k| k.first_seq),
            last_seq,
            quarantine_key: quarantine_key.clone(),
            reason: reason.clone(),
            detected_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            collector_version: env!("CARGO_PKG_VERSION").to_owned(),
            size,
        };
        let json = serde_json::to_vec_pretty(&object)
            .expect("a struct of strings and integers always serialises to JSON");
        store
            .put(&reason_path, PutPayload::from(json))
            .await
            .map_err(reason_err)?;
    }
    match store.delete(&from).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(source) => {
            return Err(QuarantineError::Delete {
                key: object_key.to_owned(),
                source,
            });
        }
    }
    Ok(Some(QuarantinedFile {
        key: object_key.to_owned(),
        quarantine_key,
        reason,
        resumed,
    }))
}

/// The main-lane batch files of `gateway` in the quarantine whose key's first `seq` lies in
/// `from..=to`, in `seq` order, with their last `seq` when the reason object records it.
pub async fn quarantined_batches(
    raw: &RawZone,
    gateway: &str,
    from: i64,
    to: i64,
) -> Result<Vec<QuarantinedRange>, QuarantineError> {
    let store = raw.store();
    let folder = BatchKey::gateway_prefix(raw.quarantine_prefix(), gateway);
    let list_err = |source| QuarantineError::List {
        prefix: folder.clone(),
        source,
    };
    let folder_path = Path::parse(&folder).map_err(|e| list_err(e.into()))?;
    // Keys sort in seq order: start right before `from`.
    let mut listing = if from > 0 {
        let offset = Path::parse(BatchKey::new(gateway, from - 1).to_key(raw.quarantine_prefix()))
            .map_err(|e| list_err(e.into()))?;
        store.list_with_offset(Some(&folder_path), &offset)
    } else {
        store.list(Some(&folder_path))
    };
    let mut keys = Vec::new();
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(list_err)?;
        let Ok(key) = BatchKey::parse(raw.quarantine_prefix(), meta.location.as_ref()) else {
            continue;
        };
        // A quarantined fresh-lane file explains no gap: the main lane carries its rows.
        if key.gateway == gateway && key.lane == Lane::Main && (from..=to).contains(&key.first_seq)
        {
            keys.push((key.first_seq, meta.location.as_ref().to_owned()));
        }
    }
    keys.sort();
    let mut out = Vec::with_capacity(keys.len());
    for (first_seq, quarantine_key) in keys {
        let reason_key = format!("{quarantine_key}{REASON_SUFFIX}");
        let read_err = |source| QuarantineError::ReadReason {
            reason_key: reason_key.clone(),
            source,
        };
        let path = Path::parse(&reason_key).map_err(|e| read_err(e.into()))?;
        let last_seq = match store.get(&path).await {
            Ok(got) => {
                let bytes = got.bytes().await.map_err(read_err)?;
                serde_json::from_slice::<ReasonObject>(&bytes)
                    .ok()
                    .and_then(|r| r.last_seq)
            }
            // A move that crashed before writing the reason: the range ends where the next
            // file or the jump does.
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(read_err(e)),
        };
        out.push(QuarantinedRange {
            first_seq,
            last_seq: last_seq.filter(|&l| l >= first_seq),
            quarantine_key,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_and_unsorted_seq_have_their_own_kinds() {
        let dup = BatchProblem::Contract(ContractError::Unsorted { prev: 4, next: 4 });
        let back = BatchProblem::Contract(ContractError::Unsorted { prev: 4, next: 3 });
        assert_eq!(ProblemKind::from(&dup), ProblemKind::DuplicateSeq);
        assert_eq!(ProblemKind::from(&back), ProblemKind::UnsortedSeq);
        let quality = BatchProblem::Contract(ContractError::BadValue {
            column: column::QUALITY,
            value: "meh".into(),
            row: 2,
        });
        assert_eq!(
            Reason::from_problem(&quality),
            Reason {
                kind: ProblemKind::UnknownQuality,
                message: "column `quality` has an unknown value `meh` at row 2".into(),
                rule: None,
            }
        );
        assert_eq!(
            serde_json::to_string(&ProblemKind::FirstSeqMismatch).unwrap(),
            "\"first_seq_mismatch\""
        );
    }

    #[test]
    fn a_quarantined_file_keeps_its_name_below_its_gateway_folder() {
        let dir = tempfile::tempdir().unwrap();
        let raw = RawZone::local(dir.path(), "raw/", "archive/")
            .unwrap()
            .with_quarantine_prefix("bad/");
        assert_eq!(
            quarantine_key(
                &raw,
                "gw-1",
                "raw/gateway=gw-1/00000000000000000007.parquet"
            ),
            "bad/gateway=gw-1/00000000000000000007.parquet"
        );
        assert_eq!(
            quarantine_key(&raw, "gw-1", "raw/gateway=gw-1/sub/notes.txt"),
            "bad/gateway=gw-1/sub/notes.txt"
        );
        assert_eq!(
            quarantine_key(
                &raw,
                "gw-1",
                "raw/gateway=gw-1/fresh/00000000000000000007.parquet"
            ),
            "bad/gateway=gw-1/fresh/00000000000000000007.parquet"
        );
    }
}
