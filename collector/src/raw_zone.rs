//! The raw zone: the bucket (or local folder) the gateways upload their Parquet batches to.
//!
//! One `object_store` serves both S3 and local folders, so the demo runs without S3. Keys follow
//! the batch contract: `<prefix>gateway=<id>/<first seq, 20 digits>.parquet` for the main lane,
//! `<prefix>gateway=<id>/fresh/<first seq, 20 digits>.parquet` for the fresh lane (contract v3).
//! Applied batches move to `<archive_prefix>gateway=<id>/<same path>` (a fresh batch keeps its
//! `fresh/` folder); files that break the contract move to
//! `<quarantine_prefix>gateway=<id>/<same path>` (see [`crate::quarantine`]).
//!
//! # Invariants
//! - A key that does not parse as a batch key is never read or applied: it is quarantined, except
//!   an in-flight upload (a name starting with `.`, the agent's folder sink renames it into place).
//! - A gateway's fresh folder is listed before its main folder, so a pass that sees a fresh batch
//!   also sees every main batch the gateway uploaded before it.
//! - A batch is handed out only after its bytes passed the contract: Parquet, the schema of a
//!   contract version this collector reads (v1 to v3; the one its footer names, when it names
//!   one), sorted unique `seq`, known quality names, no row with both `value` and `value_text`,
//!   the gateway of its folder, a first `seq` equal to the one in its key, and the lane of its
//!   folder: a fresh-lane file names v3 and carries `plantline.lane = fresh`, a main-lane file
//!   does not carry `plantline.lane = fresh`.
//! - Whatever version a file was written against, its rows are handed out in the current
//!   contract schema: a v1 file's rows get a null `value_text`. The agent's gap records in the footer
//!   ([`crate::gaps::agent`]) are parsed with it; a malformed value quarantines the file.
//! - Archiving copies before it deletes, so a crash in between leaves the batch in the raw zone,
//!   where the next pass filters it by the watermark and archives it again.

use std::path::Path as FsPath;
use std::sync::Arc;

use arrow_array::RecordBatch;
use bytes::Bytes;
use edge_agent::contract::{self, BatchKey, ContractError, Lane};

use crate::gaps::{self, AgentGap};
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tracing::warn;

use crate::config::{S3Config, StoreLocation};

/// Why a batch file is not accepted. Each one is permanent (a property of the bytes, so reading
/// the file again gives the same answer): the file is quarantined.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BatchProblem {
    #[error("is not a Parquet file: it does not start with the `PAR1` magic bytes ({size} bytes)")]
    NotParquet { size: u64 },
    #[error(
        "is a truncated Parquet file: it starts with the `PAR1` magic bytes but does not end with them ({size} bytes); the upload was cut short"
    )]
    Truncated { size: u64 },
    #[error("is a Parquet file that cannot be decoded: {0}")]
    Unreadable(String),
    #[error(transparent)]
    Contract(#[from] ContractError),
    #[error("holds rows of gateway `{found}` but lies in the folder of gateway `{folder}`")]
    ForeignGateway { folder: String, found: String },
    #[error(
        "its first seq is {file_seq} but its key says {key_seq}; keys must be derived from the first seq"
    )]
    FirstSeqMismatch { key_seq: i64, file_seq: i64 },
    #[error("holds no rows; a batch always holds at least one reading")]
    Empty,
    #[error(
        "was written against batch contract v{found}, this collector reads v{} to v{}; upgrade the collector",
        contract::OLDEST_READABLE_VERSION,
        contract::CONTRACT_VERSION
    )]
    NewerContract { found: String },
    #[error(
        "names batch contract version `{found}`, which does not exist; the producer must write `{}` (main lane) or `{}` (fresh lane)",
        contract::MAIN_LANE_VERSION,
        contract::CONTRACT_VERSION
    )]
    UnknownContract { found: String },
    #[error(
        "lies in the fresh lane (`gateway=<id>/fresh/`) but {found}; a fresh-lane file names batch contract v{} and carries `{}` = `fresh`",
        contract::CONTRACT_VERSION,
        contract::metadata::LANE
    )]
    FreshLaneFooter { found: String },
    #[error(
        "carries `{}` = `fresh` but lies in the main lane (directly in `gateway=<id>/`); fresh-lane files belong in `gateway=<id>/fresh/`",
        contract::metadata::LANE
    )]
    MainLaneClaimsFresh,
    #[error(
        "has a malformed `{key}` footer entry: {detail}; the agent writes a JSON array of gap records (docs/data-quality.md)",
        key = crate::gaps::METADATA_KEY
    )]
    MalformedGaps { detail: String },
}

/// Errors of the raw zone; each names the object key or prefix involved.
#[derive(Debug, thiserror::Error)]
pub enum RawZoneError {
    #[error("cannot open the raw zone at {location}: {source}")]
    Open {
        location: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot create the raw zone folder {path}: {source}")]
    CreateFolder {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list `{prefix}` in the raw zone: {source}")]
    List {
        prefix: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot read batch `{key}`: {source}")]
    Read {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("batch `{key}` is rejected: {problem}")]
    Invalid {
        key: String,
        problem: Box<BatchProblem>,
        /// The file's last `seq` when its footer or rows tell it, for the gaps table.
        last_seq: Option<i64>,
    },
    #[error("cannot archive batch `{key}` to `{archive_key}`: {source}")]
    Archive {
        key: String,
        archive_key: String,
        #[source]
        source: object_store::Error,
    },
}

/// A batch file found in the raw zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFile {
    /// The parsed key.
    pub key: BatchKey,
    /// The full object key.
    pub object_key: String,
    /// Size in bytes.
    pub size: u64,
}

/// An object in a gateway's folder whose key is not a batch key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignObject {
    /// The full object key.
    pub object_key: String,
    /// Size in bytes.
    pub size: u64,
}

/// One gateway's folder, listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchListing {
    /// Main-lane batch files in `seq` order.
    pub batches: Vec<BatchFile>,
    /// Fresh-lane batch files (`gateway=<id>/fresh/`) in key order; listed before the main lane.
    pub fresh: Vec<BatchFile>,
    /// Objects whose key is not a batch key (quarantined by the ingest), sorted by key.
    pub foreign: Vec<ForeignObject>,
    /// Names starting with `.`: uploads in flight (the agent's folder sink writes
    /// `.<file>.tmp-<pid>` and renames it into place); left alone, sorted.
    pub in_flight: Vec<String>,
}

/// The gateways that have a folder in the raw zone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayListing {
    /// Gateway ids, sorted.
    pub gateways: Vec<String>,
    /// Folders under the prefix that are not `gateway=<valid id>` (nor the tag catalogs'
    /// `tags/`); left alone.
    pub foreign: Vec<String>,
}

/// A batch that passed the contract.
#[derive(Debug, Clone)]
pub struct ValidBatch {
    /// Where it came from.
    pub file: BatchFile,
    /// Its rows, in the current contract schema (whatever version the file was written
    /// against), sorted by `seq`.
    pub data: Vec<RecordBatch>,
    /// The contract version the file was written against.
    pub contract_version: u32,
    /// First and last `seq`.
    pub first_seq: i64,
    pub last_seq: i64,
    /// Number of rows.
    pub rows: usize,
    /// The agent's gap records from the footer (`plantline.gaps`), in file order.
    pub gaps: Vec<AgentGap>,
}

/// The raw zone, opened.
#[derive(Debug, Clone)]
pub struct RawZone {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    archive_prefix: String,
    quarantine_prefix: String,
    /// Set for a backfill: [`RawZone::archive`] does nothing.
    leave_applied: bool,
}

impl RawZone {
    /// Opens the raw zone at `location` (a local folder is created if missing). S3 credentials
    /// come from the AWS environment variables; commits never happen here, but conditional PUT
    /// is configured anyway so every store in the process behaves the same.
    pub fn open(
        location: &StoreLocation,
        s3: &S3Config,
        prefix: &str,
        archive_prefix: &str,
    ) -> Result<Self, RawZoneError> {
        let store: Arc<dyn ObjectStore> = match location {
            StoreLocation::Local(path) => {
                std::fs::create_dir_all(path).map_err(|source| RawZoneError::CreateFolder {
                    path: path.display().to_string(),
                    source,
                })?;
                Arc::new(LocalFileSystem::new_with_prefix(path).map_err(|source| {
                    RawZoneError::Open {
                        location: location.to_string(),
                        source,
                    }
                })?)
            }
            StoreLocation::S3 { bucket, root } => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(&s3.region)
                    .with_virtual_hosted_style_request(!s3.path_style())
                    .with_allow_http(s3.allow_http)
                    .with_conditional_put(S3ConditionalPut::ETagMatch);
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(c) = &s3.static_credentials {
                    builder = builder
                        .with_access_key_id(&c.access_key_id)
                        .with_secret_access_key(&c.secret_access_key);
                }
                let s3_store = builder.build().map_err(|source| RawZoneError::Open {
                    location: location.to_string(),
                    source,
                })?;
                if root.is_empty() {
                    Arc::new(s3_store)
                } else {
                    Arc::new(PrefixStore::new(s3_store, root.as_str()))
                }
            }
        };
        Ok(Self::from_store(store, prefix, archive_prefix))
    }

    /// Uses an already built store (tests, the in-process demo).
    pub fn from_store(store: Arc<dyn ObjectStore>, prefix: &str, archive_prefix: &str) -> Self {
        Self {
            store,
            prefix: prefix.to_owned(),
            archive_prefix: archive_prefix.to_owned(),
            quarantine_prefix: DEFAULT_QUARANTINE_PREFIX.to_owned(),
            leave_applied: false,
        }
    }

    /// Leaves applied batches where they are instead of archiving them: a backfill reads the
    /// archive itself, which must stay intact.
    #[must_use]
    pub fn leaving_applied_in_place(mut self) -> Self {
        self.leave_applied = true;
        self
    }

    /// Sets the key prefix bad files are moved to (default `quarantine/`).
    #[must_use]
    pub fn with_quarantine_prefix(mut self, quarantine_prefix: &str) -> Self {
        quarantine_prefix.clone_into(&mut self.quarantine_prefix);
        self
    }

    /// Opens a local folder that plays the bucket.
    pub fn local(
        folder: &FsPath,
        prefix: &str,
        archive_prefix: &str,
    ) -> Result<Self, RawZoneError> {
        Self::open(
            &StoreLocation::Local(folder.to_owned()),
            &S3Config::default(),
            prefix,
            archive_prefix,
        )
    }

    /// The key prefix batches are read from.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key prefix applied batches are moved to.
    pub fn archive_prefix(&self) -> &str {
        &self.archive_prefix
    }

    /// The key prefix bad files are moved to.
    pub fn quarantine_prefix(&self) -> &str {
        &self.quarantine_prefix
    }

    /// The store itself, for the quarantine's moves.
    pub(crate) fn store(&self) -> &dyn ObjectStore {
        self.store.as_ref()
    }

    /// The gateways with a `gateway=<id>/` folder under the prefix.
    pub async fn list_gateways(&self) -> Result<GatewayListing, RawZoneError> {
        let list_err = |source| RawZoneError::List {
            prefix: self.prefix.clone(),
            source,
        };
        let prefix = Path::parse(&self.prefix).map_err(|e| list_err(e.into()))?;
        let listed = self
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(list_err)?;
        let mut out = GatewayListing::default();
        for folder in listed.common_prefixes {
            let name = folder.filename().unwrap_or_default();
            match name.strip_prefix("gateway=") {
                Some(id) if contract::check_gateway_id(id).is_ok() => {
                    out.gateways.push(id.to_owned());
                }
                // The gateways' tag catalogs, applied by `crate::tags`.
                None if Some(name)
                    == edge_agent::tag_catalog::format::CATALOG_FOLDER.strip_suffix('/') => {}
                _ => out.foreign.push(format!("{}/", folder.as_ref())),
            }
        }
        out.gateways.sort();
        out.foreign.sort();
        Ok(out)
    }

    /// The batch files of `gateway`: its fresh lane first (all of it), then its main lane from
    /// the first `seq` above `after` (all of it for `None`), each in key order. Keys that are not
    /// batch keys of their folder are returned apart.
    pub async fn list_batches(
        &self,
        gateway: &str,
        after: Option<i64>,
    ) -> Result<BatchListing, RawZoneError> {
        let mut out = self.list_fresh(gateway).await?;
        let main = self.list_main_batches(gateway, after).await?;
        out.batches = main.batches;
        out.foreign.extend(main.foreign);
        out.in_flight.extend(main.in_flight);
        out.foreign.sort_by(|a, b| a.object_key.cmp(&b.object_key));
        out.in_flight.sort();
        Ok(out)
    }

    /// The fresh-lane folder of `gateway` (`gateway=<id>/fresh/`), listed.
    async fn list_fresh(&self, gateway: &str) -> Result<BatchListing, RawZoneError> {
        let folder = BatchKey::lane_prefix(&self.prefix, gateway, Lane::Fresh);
        let list_err = |source| RawZoneError::List {
            prefix: folder.clone(),
            source,
        };
        let folder_path = Path::parse(&folder).map_err(|e| list_err(e.into()))?;
        let objects: Vec<_> = self
            .store
            .list(Some(&folder_path))
            .try_collect()
            .await
            .map_err(list_err)?;
        let mut out = BatchListing::default();
        for meta in objects {
            let object_key = meta.location.as_ref().to_owned();
            match BatchKey::parse(&self.prefix, &object_key) {
                Ok(key) if key.gateway == gateway && key.lane == Lane::Fresh => {
                    out.fresh.push(BatchFile {
                        key,
                        object_key,
                        size: meta.size,
                    });
                }
                _ if meta.location.filename().is_some_and(|n| n.starts_with('.')) => {
                    out.in_flight.push(object_key);
                }
                _ => out.foreign.push(ForeignObject {
                    object_key,
                    size: meta.size,
                }),
            }
        }
        out.fresh.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// The main-lane batch files of `gateway` whose first `seq` is above `after` (all of them for
    /// `None`), in `seq` order, without listing the fresh lane. Keys that are not batch keys are
    /// returned apart; the fresh folder is left out entirely.
    pub async fn list_main_batches(
        &self,
        gateway: &str,
        after: Option<i64>,
    ) -> Result<BatchListing, RawZoneError> {
        let folder = BatchKey::gateway_prefix(&self.prefix, gateway);
        let fresh_folder = BatchKey::lane_prefix(&self.prefix, gateway, Lane::Fresh);
        let list_err = |source| RawZoneError::List {
            prefix: folder.clone(),
            source,
        };
        let folder_path = Path::parse(&folder).map_err(|e| list_err(e.into()))?;
        let objects: Vec<_> = match after {
            // Keys sort in seq order, so the store can skip everything up to `after`.
            Some(seq) => {
                let offset = Path::parse(BatchKey::new(gateway, seq).to_key(&self.prefix))
                    .map_err(|e| list_err(e.into()))?;
                self.store
                    .list_with_offset(Some(&folder_path), &offset)
                    .try_collect()
                    .await
            }
            None => self.store.list(Some(&folder_path)).try_collect().await,
        }
        .map_err(list_err)?;
        let mut out = BatchListing::default();
        for meta in objects {
            let object_key = meta.location.as_ref().to_owned();
            if object_key.starts_with(&fresh_folder) {
                continue;
            }
            match BatchKey::parse(&self.prefix, &object_key) {
                Ok(key)
                    if key.gateway == gateway
                        && key.lane == Lane::Main
                        && after.is_none_or(|a| key.first_seq > a) =>
                {
                    out.batches.push(BatchFile {
                        key,
                        object_key,
                        size: meta.size,
                    });
                }
                Ok(_) => {}
                Err(_) if meta.location.filename().is_some_and(|n| n.starts_with('.')) => {
                    out.in_flight.push(object_key);
                }
                Err(_) => out.foreign.push(ForeignObject {
                    object_key,
                    size: meta.size,
                }),
            }
        }
        out.batches.sort_by(|a, b| a.key.cmp(&b.key));
        out.foreign.sort_by(|a, b| a.object_key.cmp(&b.object_key));
        out.in_flight.sort();
        Ok(out)
    }

    /// Reads a batch and checks it against the contract.
    pub async fn read_batch(&self, file: &BatchFile) -> Result<ValidBatch, RawZoneError> {
        let read_err = |source| RawZoneError::Read {
            key: file.object_key.clone(),
            source,
        };
        let path = Path::parse(&file.object_key).map_err(|e| read_err(e.into()))?;
        let bytes = self
            .store
            .get(&path)
            .await
            .map_err(read_err)?
            .bytes()
            .await
            .map_err(read_err)?;
        let key = file.key.clone();
        // Parquet decoding is CPU work; keep it off the async workers. A panic in the decoder is
        // caused by the bytes, so it is as permanent as any other decoding failure.
        let decoded = tokio::task::spawn_blocking(move || decode(&key, bytes))
            .await
            .unwrap_or_else(|join| Err((BatchProblem::Unreadable(join.to_string()), None)));
        match decoded {
            Ok(decoded) => Ok(ValidBatch {
                file: file.clone(),
                data: decoded.data,
                contract_version: decoded.contract_version,
                first_seq: decoded.first_seq,
                last_seq: decoded.last_seq,
                rows: decoded.rows,
                gaps: decoded.gaps,
            }),
            Err((problem, last_seq)) => Err(RawZoneError::Invalid {
                key: file.object_key.clone(),
                problem: Box::new(problem),
                last_seq,
            }),
        }
    }

    /// The key a batch is archived under.
    pub fn archive_key(&self, key: &BatchKey) -> String {
        key.to_key(&self.archive_prefix)
    }

    /// Moves a batch to the archive prefix: copy, then delete. A batch already gone (archived
    /// by another collector) counts as archived.
    pub async fn archive(&self, file: &BatchFile) -> Result<(), RawZoneError> {
        if self.leave_applied {
            return Ok(());
        }
        let archive_key = self.archive_key(&file.key);
        let archive_err = |source| RawZoneError::Archive {
            key: file.object_key.clone(),
            archive_key: archive_key.clone(),
            source,
        };
        let from = Path::parse(&file.object_key).map_err(|e| archive_err(e.into()))?;
        let to = Path::parse(&archive_key).map_err(|e| archive_err(e.into()))?;
        match self.store.copy(&from, &to).await {
            Ok(()) => {}
            Err(object_store::Error::NotFound { .. }) => {
                warn!(component = "raw_zone", key = %file.object_key, "batch vanished before archiving; another collector archived it");
                return Ok(());
            }
            Err(e) => return Err(archive_err(e)),
        }
        match self.store.delete(&from).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(archive_err(e)),
        }
    }
}

/// The magic bytes a Parquet file starts and ends with.
const PARQUET_MAGIC: &[u8] = b"PAR1";

/// Where bad files go when the config does not say.
pub const DEFAULT_QUARANTINE_PREFIX: &str = "quarantine/";

/// Names a decoding failure by what the bytes look like, so the reason is stable across parquet
/// versions: no magic at the start is not Parquet; no magic at the end is a cut-off upload.
fn unreadable(bytes: &[u8], detail: &dyn std::fmt::Display) -> BatchProblem {
    let size = bytes.len() as u64;
    if !bytes.starts_with(PARQUET_MAGIC) {
        BatchProblem::NotParquet { size }
    } else if bytes.len() < 2 * PARQUET_MAGIC.len() || !bytes.ends_with(PARQUET_MAGIC) {
        BatchProblem::Truncated { size }
    } else {
        BatchProblem::Unreadable(detail.to_string())
    }
}

/// The lane rules of contract v3: a fresh-lane file names v3 and carries `plantline.lane =
/// fresh`; a main-lane file does not carry `plantline.lane = fresh`.
fn check_lane(
    lane: Lane,
    named_version: Option<u32>,
    lane_entry: Option<&str>,
) -> Result<(), BatchProblem> {
    let fresh = Lane::Fresh.metadata_value();
    match lane {
        Lane::Main if lane_entry.is_some() && lane_entry == fresh => {
            Err(BatchProblem::MainLaneClaimsFresh)
        }
        Lane::Main => Ok(()),
        Lane::Fresh => {
            let found = match (named_version, lane_entry) {
                (Some(v), Some(l)) if v == Lane::Fresh.contract_version() && Some(l) == fresh => {
                    return Ok(());
                }
                (None, _) => format!(
                    "its footer names no `{}`",
                    contract::metadata::CONTRACT_VERSION
                ),
                (Some(v), _) if v != Lane::Fresh.contract_version() => {
                    format!("its footer names batch contract v{v}")
                }
                (_, None) => format!("its footer has no `{}` entry", contract::metadata::LANE),
                (_, Some(l)) => format!("its footer says `{}` = `{l}`", contract::metadata::LANE),
            };
            Err(BatchProblem::FreshLaneFooter { found })
        }
    }
}

/// A decoded, contract-checked batch.
struct Decoded {
    data: Vec<RecordBatch>,
    contract_version: u32,
    first_seq: i64,
    last_seq: i64,
    rows: usize,
    gaps: Vec<AgentGap>,
}

/// Parquet bytes to contract-checked record batches, with first/last seq, row count and the
/// agent's gap records. A problem comes with the file's last `seq` when the footer names one
/// (at or above the key's first `seq`), so the gaps table can bound the quarantined range.
fn decode(key: &BatchKey, bytes: Bytes) -> Result<Decoded, (BatchProblem, Option<i64>)> {
    let mut footer_last_seq = None;
    decode_checked(key, bytes, &mut footer_last_seq).map_err(|p| (p, footer_last_seq))
}

// The contract's checks in the order a reader meets them: footer, lane, schema, rows.
#[allow(clippy::too_many_lines)]
fn decode_checked(
    key: &BatchKey,
    bytes: Bytes,
    footer_last_seq: &mut Option<i64>,
) -> Result<Decoded, BatchProblem> {
    let raw = bytes.clone();
    let not_parquet = |e: &dyn std::fmt::Display| unreadable(&raw, e);
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| not_parquet(&e))?;
    let mut gaps = Vec::new();
    let mut named_version = None;
    let mut lane_entry = None;
    if let Some(kv) = builder.metadata().file_metadata().key_value_metadata() {
        *footer_last_seq = kv
            .iter()
            .find(|e| e.key == contract::metadata::LAST_SEQ)
            .and_then(|e| e.value.as_deref()?.parse::<i64>().ok())
            .filter(|&last| last >= key.first_seq);
        for entry in kv {
            let Some(value) = entry.value.as_deref() else {
                continue;
            };
            if entry.key == contract::metadata::CONTRACT_VERSION {
                match value.parse::<u32>() {
                    Ok(v) if v > contract::CONTRACT_VERSION => {
                        return Err(BatchProblem::NewerContract {
                            found: value.to_owned(),
                        });
                    }
                    Ok(v) if v >= contract::OLDEST_READABLE_VERSION => named_version = Some(v),
                    _ => {
                        return Err(BatchProblem::UnknownContract {
                            found: value.to_owned(),
                        });
                    }
                }
            }
            if entry.key == contract::metadata::GATEWAY && value != key.gateway {
                return Err(BatchProblem::ForeignGateway {
                    folder: key.gateway.clone(),
                    found: value.to_owned(),
                });
            }
            if entry.key == contract::metadata::LANE {
                lane_entry = Some(value.to_owned());
            }
            // Gap records ride the main lane only; a fresh-lane file's are not read.
            if entry.key == gaps::METADATA_KEY && key.lane == Lane::Main {
                gaps = gaps::agent::parse(value)
                    .map_err(|detail| BatchProblem::MalformedGaps { detail })?;
            }
        }
    }
    check_lane(key.lane, named_version, lane_entry.as_deref())?;
    // A footer that names its version must come with that version's columns; a file without
    // one (written by hand, or by a tool) is taken as the version its columns match.
    let contract_version = match named_version {
        Some(version) => {
            contract::check_schema_of_version(builder.schema(), version)?;
            version
        }
        None => contract::check_schema(builder.schema())?,
    };
    let reader = builder.build().map_err(|e| not_parquet(&e))?;
    let mut data = Vec::new();
    let mut bounds: Option<(i64, i64)> = None;
    let mut rows = 0;
    for batch in reader {
        let batch = batch.map_err(|e| not_parquet(&e))?;
        if batch.num_rows() == 0 {
            continue;
        }
        // The file may carry extra schema metadata, or be of an older version; the Delta writer
        // wants the current contract schema.
        let batch = contract::upgrade(&batch)?;
        let parsed = contract::rows_from_batch(&batch)?;
        let (first, last) = (&parsed[0], &parsed[parsed.len() - 1]);
        if first.gateway != key.gateway {
            return Err(BatchProblem::ForeignGateway {
                folder: key.gateway.clone(),
                found: first.gateway.clone(),
            });
        }
        bounds = match bounds {
            None => Some((first.seq, last.seq)),
            Some((lo, prev)) => {
                if first.seq <= prev {
                    return Err(ContractError::Unsorted {
                        prev,
                        next: first.seq,
                    }
                    .into());
                }
                Some((lo, last.seq))
            }
        };
        rows += batch.num_rows();
        data.push(batch);
    }
    let (first_seq, last_seq) = bounds.ok_or(BatchProblem::Empty)?;
    if first_seq != key.first_seq {
        return Err(BatchProblem::FirstSeqMismatch {
            key_seq: key.first_seq,
            file_seq: first_seq,
        });
    }
    Ok(Decoded {
        data,
        contract_version,
        first_seq,
        last_seq,
        rows,
        gaps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quarantine::ProblemKind;

    #[test]
    fn a_fresh_lane_file_must_name_v3_and_the_fresh_lane() {
        assert_eq!(check_lane(Lane::Fresh, Some(3), Some("fresh")), Ok(()));
        let found = |version, lane| match check_lane(Lane::Fresh, version, lane) {
            Err(BatchProblem::FreshLaneFooter { found }) => found,
            other => panic!("{other:?}"),
        };
        assert_eq!(found(Some(2), None), "its footer names batch contract v2");
        assert_eq!(
            found(Some(3), None),
            "its footer has no `plantline.lane` entry"
        );
        assert_eq!(
            found(Some(3), Some("bulk")),
            "its footer says `plantline.lane` = `bulk`"
        );
        assert_eq!(
            found(None, Some("fresh")),
            "its footer names no `plantline.contract_version`"
        );
    }

    #[test]
    fn a_main_lane_file_must_not_claim_the_fresh_lane() {
        for version in [None, Some(1), Some(2), Some(3)] {
            assert_eq!(check_lane(Lane::Main, version, None), Ok(()));
        }
        assert_eq!(
            check_lane(Lane::Main, Some(3), Some("fresh")),
            Err(BatchProblem::MainLaneClaimsFresh)
        );
        assert_eq!(
            ProblemKind::from(&BatchProblem::MainLaneClaimsFresh).as_str(),
            "lane_mismatch"
        );
    }
}
