//! Tag catalogs: the gateways' tag metadata, found in the raw zone under
//! `<prefix>tags/gateway=<id>/` (`docs/batch-contract.md`, *Tag catalog*), applied to the `tags`
//! dimension table ([`crate::delta::TagsTable`]) and archived.
//!
//! # Invariants
//! - A gateway's catalogs are applied in key order, which is the order they took effect; a
//!   catalog that cannot be applied now (store or Delta error) stops its gateway for this pass,
//!   so a later catalog never overtakes it.
//! - A catalog is archived (`<archive_prefix>tags/gateway=<id>/<file>`, copy then delete) only
//!   after the commit that applied it, or after finding it at or below the gateway's watermark
//!   (a replay). A crash in between leaves it in the raw zone, where the next pass finds it a
//!   replay.
//! - A catalog whose key or content breaks the format (not JSON, a hash that does not match
//!   its tags, a key that does not match its content, another gateway, a newer format) is moved
//!   to `<quarantine_prefix>tags/gateway=<id>/<file>` with a `.reason.json` beside it; the
//!   gateway's later catalogs are applied.

use std::collections::BTreeMap;

use chrono::{SecondsFormat, Utc};
use edge_agent::tag_catalog::format::CatalogError;
use edge_agent::tag_catalog::{CatalogKey, TagCatalog};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tracing::{info, warn};

use crate::config::CollectorConfig;
use crate::delta::{CatalogOutcome, DeltaError, TAGS_SUFFIX, TagsTable, sibling};
use crate::quarantine::REASON_SUFFIX;
use crate::raw_zone::RawZone;

/// Why catalogs could not be applied in this pass. The catalogs stay in the raw zone and are
/// tried again on the next pass.
#[derive(Debug, thiserror::Error)]
pub enum TagsError {
    #[error("config: {0}")]
    Location(String),
    #[error("cannot list tag catalogs under `{prefix}`: {source}")]
    List {
        prefix: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot read tag catalog `{key}`: {source}")]
    Read {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot move tag catalog `{key}` to `{to}`: {source}")]
    Move {
        key: String,
        to: String,
        #[source]
        source: object_store::Error,
    },
    #[error(transparent)]
    Delta(#[from] DeltaError),
}

/// One catalog this pass dealt with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogReport {
    pub gateway: String,
    /// The raw-zone key it was found under.
    pub key: String,
    pub outcome: CatalogResult,
}

/// What happened to a catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogResult {
    /// Applied (or found applied before) and archived.
    Applied(CatalogOutcome),
    /// Moved to the quarantine for this reason.
    Quarantined(String),
}

/// What one pass did with the tag catalogs.
#[derive(Debug, Default)]
pub struct TagsReport {
    pub catalogs: Vec<CatalogReport>,
    /// Gateways whose catalogs stopped on an error, with the error; retried next pass.
    pub failed: Vec<(String, String)>,
}

impl TagsReport {
    /// Logs what the pass did, one line per catalog.
    pub fn log(&self) {
        for catalog in &self.catalogs {
            match &catalog.outcome {
                CatalogResult::Applied(outcome) => info!(
                    component = "tags",
                    gateway = catalog.gateway,
                    key = catalog.key,
                    replay = outcome.replay,
                    opened = outcome.opened,
                    closed = outcome.closed,
                    "tag catalog applied"
                ),
                CatalogResult::Quarantined(reason) => warn!(
                    component = "tags",
                    gateway = catalog.gateway,
                    key = catalog.key,
                    "tag catalog quarantined: {reason}"
                ),
            }
        }
        for (gateway, error) in &self.failed {
            warn!(
                component = "tags",
                gateway, "tag catalogs not applied this pass; retried next pass: {error}"
            );
        }
    }
}

/// An object found under the catalog folder: its key and what the key parsed as.
type Found = (String, Result<CatalogKey, CatalogError>);

/// The tags table's location: beside the readings table, `<readings>_tags`.
pub fn tags_url(config: &CollectorConfig) -> Result<url::Url, TagsError> {
    let urls = config.table_urls().map_err(TagsError::Location)?;
    sibling(&urls.readings, TAGS_SUFFIX).map_err(TagsError::Location)
}

/// Opens the tags table named by the config and applies every pending catalog in `raw`.
pub async fn apply_pending(
    config: &CollectorConfig,
    raw: &RawZone,
) -> Result<TagsReport, TagsError> {
    let url = tags_url(config)?;
    let mut table = TagsTable::open_or_create(&url, &config.s3.storage_options()).await?;
    apply_catalogs(raw, &mut table).await
}

/// Applies every catalog under the raw zone's `tags/` folder to `table`, gateway by gateway in
/// key order, archiving each one applied and quarantining each one that breaks the format.
pub async fn apply_catalogs(raw: &RawZone, table: &mut TagsTable) -> Result<TagsReport, TagsError> {
    let folder = CatalogKey::folder(raw.prefix());
    let list_err = |source| TagsError::List {
        prefix: folder.clone(),
        source,
    };
    let folder_path = Path::parse(&folder).map_err(|e| list_err(e.into()))?;
    let listed: Vec<_> = raw
        .store()
        .list(Some(&folder_path))
        .try_collect()
        .await
        .map_err(list_err)?;
    // Gateway → its objects, each key with what it parsed as.
    let mut by_gateway: BTreeMap<String, Vec<Found>> = BTreeMap::new();
    for meta in listed {
        let key = meta.location.as_ref().to_owned();
        if meta.location.filename().is_some_and(|n| n.starts_with('.')) {
            // An upload in flight (the agent's folder sink renames it into place).
            continue;
        }
        let parsed = CatalogKey::parse(raw.prefix(), &key);
        let gateway = match &parsed {
            Ok(k) => k.gateway.clone(),
            Err(_) => gateway_of(raw.prefix(), &key),
        };
        by_gateway.entry(gateway).or_default().push((key, parsed));
    }
    let mut report = TagsReport::default();
    for (gateway, mut catalogs) in by_gateway {
        catalogs.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, parsed) in catalogs {
            match apply_one(raw, table, &key, parsed).await {
                Ok(outcome) => report.catalogs.push(CatalogReport {
                    gateway: gateway.clone(),
                    key,
                    outcome,
                }),
                Err(e) => {
                    report.failed.push((gateway.clone(), e.to_string()));
                    break;
                }
            }
        }
    }
    Ok(report)
}

async fn apply_one(
    raw: &RawZone,
    table: &mut TagsTable,
    key: &str,
    parsed: Result<CatalogKey, CatalogError>,
) -> Result<CatalogResult, TagsError> {
    let checked = match parsed {
        Ok(catalog_key) => {
            let bytes = read(raw.store(), key).await?;
            serde_json::from_slice::<TagCatalog>(&bytes)
                .map_err(|e| CatalogError::Json(e.to_string()))
                .and_then(|catalog| catalog.check(&catalog_key))
        }
        Err(e) => Err(e),
    };
    match checked {
        Ok(catalog) => {
            let outcome = table.apply(&catalog).await?;
            move_object(
                raw.store(),
                key,
                &relocate(raw, key, raw.archive_prefix()),
                None,
            )
            .await?;
            Ok(CatalogResult::Applied(outcome))
        }
        Err(problem) => {
            let reason = problem.to_string();
            let to = relocate(raw, key, raw.quarantine_prefix());
            let reason_object = serde_json::json!({
                "key": key,
                "quarantine_key": to,
                "reason": { "kind": "tag_catalog", "message": reason },
                "detected_at": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
                "collector_version": env!("CARGO_PKG_VERSION"),
            });
            move_object(raw.store(), key, &to, Some(reason_object.to_string())).await?;
            Ok(CatalogResult::Quarantined(reason))
        }
    }
}

/// `key` under `prefix` in place of the raw zone's prefix: `raw/tags/...` → `archive/tags/...`.
fn relocate(raw: &RawZone, key: &str, prefix: &str) -> String {
    format!("{prefix}{}", key.strip_prefix(raw.prefix()).unwrap_or(key))
}

/// The gateway folder a key lies in (`tags/gateway=<id>/...`), for grouping a malformed key
/// with its gateway's catalogs; empty when it lies in none.
fn gateway_of(prefix: &str, key: &str) -> String {
    key.strip_prefix(&CatalogKey::folder(prefix))
        .and_then(|rest| rest.strip_prefix("gateway="))
        .and_then(|rest| rest.split_once('/'))
        .map(|(gateway, _)| gateway.to_owned())
        .unwrap_or_default()
}

async fn read(store: &dyn ObjectStore, key: &str) -> Result<bytes::Bytes, TagsError> {
    let read_err = |source| TagsError::Read {
        key: key.to_owned(),
        source,
    };
    let path = Path::parse(key).map_err(|e| read_err(e.into()))?;
    store
        .get(&path)
        .await
        .map_err(read_err)?
        .bytes()
        .await
        .map_err(read_err)
}

/// Copies `key` to `to` (with a reason object beside it, for the quarantine, unless one is
/// there already), then deletes `key`. An original already gone was moved by another
/// collector.
async fn move_object(
    store: &dyn ObjectStore,
    key: &str,
    to: &str,
    reason: Option<String>,
) -> Result<(), TagsError> {
    let move_err = |source| TagsError::Move {
        key: key.to_owned(),
        to: to.to_owned(),
        source,
    };
    let from = Path::parse(key).map_err(|e| move_err(e.into()))?;
    let to_path = Path::parse(to).map_err(|e| move_err(e.into()))?;
    match store.copy(&from, &to_path).await {
        Ok(()) => {}
        Err(object_store::Error::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(move_err(e)),
    }
    if let Some(reason) = reason {
        let reason_path =
            Path::parse(format!("{to}{REASON_SUFFIX}")).map_err(|e| move_err(e.into()))?;
        // The first detection is kept.
        if let Err(object_store::Error::NotFound { .. }) = store.head(&reason_path).await {
            store
                .put(&reason_path, PutPayload::from(reason.into_bytes()))
                .await
                .map_err(move_err)?;
        }
    }
    match store.delete(&from).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(move_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_key_is_grouped_with_its_gateway() {
        assert_eq!(
            gateway_of("raw/", "raw/tags/gateway=gw-1/latest.json"),
            "gw-1"
        );
        assert_eq!(gateway_of("raw/", "raw/tags/readme.txt"), "");
    }
}
