//! The `tags` dimension table: every tag of every gateway with its place in the plant (site,
//! area, line, machine), unit, description, data type and source, as type-2 history, so a
//! reading joins to the attributes its tag had when it was read.
//!
//! # Invariants
//! - One row per (`gateway`, `device`, `tag`, `valid_from`). A row holds from `valid_from`
//!   (inclusive) to `valid_to` (exclusive); `valid_to` is null for the attributes in force.
//!   At most one row of a (`gateway`, `device`, `tag`) has a null `valid_to`, and a tag's rows
//!   never overlap.
//! - A catalog effective at `t` leaves the rows of tags whose attributes it repeats untouched,
//!   closes (`valid_to = t`) the rows of tags it changes or no longer lists, and opens rows
//!   from `t` for tags it changes or adds; `catalog_hash` names the catalog that opened a row.
//! - The gateway's `txn` watermark in this table is the `effective_at_us` of the last catalog
//!   applied, moved in the same commit as the rows: a catalog at or below it is a replay and
//!   changes nothing.
//! - A change rewrites the data files that hold rows of the gateway (the table is small: it
//!   grows only when sensor maps change) by removing them and adding their rows, edited, in one
//!   commit, so readers see the old history or the new one, never a mix. A lost race starts the
//!   catalog over on the new version; an uncertain outcome is resolved by the watermark.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use arrow_array::cast::AsArray;
use arrow_array::types::TimestampMicrosecondType;
use arrow_array::{Array, ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Version};
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use edge_agent::tag_catalog::{CatalogTag, TagCatalog};
use tracing::{debug, warn};
use url::Url;

use super::commit::{self, Failure};
use super::open::{self, TableSpec};
use super::table::DeltaError;
use super::watermark;

/// Suffix of the tags table's location, beside the readings table.
pub const TAGS_SUFFIX: &str = "_tags";

/// The tags table's columns.
pub fn tags_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let text = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
        let time = |name: &str, nullable: bool| {
            Field::new(
                name,
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                nullable,
            )
        };
        Arc::new(Schema::new(vec![
            text("gateway", false),
            text("device", false),
            text("tag", false),
            text("site", false),
            text("area", true),
            text("line", true),
            text("machine", true),
            text("unit", true),
            text("description", true),
            text("data_type", false),
            text("source", false),
            time("valid_from", false),
            time("valid_to", true),
            text("catalog_hash", false),
        ]))
    });
    SCHEMA.clone()
}

const TAGS: TableSpec = TableSpec {
    name: "tags",
    comment: "plantline tags: each gateway's tags with their asset hierarchy, unit and type, as type-2 history",
    schema: tags_schema,
    added_columns: &[],
};

/// One row of the tags table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRow {
    pub gateway: String,
    /// Device, tag and attributes, as the catalog gave them.
    pub tag: CatalogTag,
    /// Microseconds since the epoch, UTC (the gateway's clock when its map took effect).
    pub valid_from_us: i64,
    /// `None` while the row is in force.
    pub valid_to_us: Option<i64>,
    pub catalog_hash: String,
}

/// What applying one catalog did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CatalogOutcome {
    /// The catalog was at or below the gateway's watermark: nothing was written.
    pub replay: bool,
    /// Rows opened (new tags, and new versions of changed ones).
    pub opened: usize,
    /// Rows closed (changed and removed tags).
    pub closed: usize,
    /// The version committed, if any.
    pub version: Option<Version>,
}

/// The tags Delta table, loaded at its latest version.
#[derive(Debug)]
pub struct TagsTable {
    table: DeltaTable,
    url: Url,
}

impl TagsTable {
    /// Opens the table at `url`, creating it if nothing is there yet.
    pub async fn open_or_create(
        url: &Url,
        storage_options: &HashMap<String, String>,
    ) -> Result<Self, DeltaError> {
        Ok(Self {
            table: open::open_or_create(url, storage_options, &TAGS).await?,
            url: url.clone(),
        })
    }

    /// The table URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The loaded table version.
    pub fn version(&self) -> Option<Version> {
        self.table.version()
    }

    /// The underlying delta-rs table.
    pub fn delta_table(&self) -> &DeltaTable {
        &self.table
    }

    /// The `effective_at_us` of the last catalog of `gateway` applied.
    pub async fn watermark(&self, gateway: &str) -> Result<Option<i64>, DeltaError> {
        watermark::read(&self.table, &self.url, gateway).await
    }

    /// Every row, for tests and small exports, sorted by gateway, device, tag, `valid_from`.
    pub async fn rows(&mut self) -> Result<Vec<TagRow>, DeltaError> {
        commit::reload(&mut self.table, &self.url).await?;
        let batches = commit::read_files(&self.table, &self.url, |_| true).await?;
        let mut rows: Vec<TagRow> = batches.iter().flat_map(rows_of).collect();
        rows.sort_by(|a, b| {
            (&a.gateway, &a.tag.device, &a.tag.tag, a.valid_from_us).cmp(&(
                &b.gateway,
                &b.tag.device,
                &b.tag.tag,
                b.valid_from_us,
            ))
        });
        Ok(rows)
    }

    /// Applies `catalog` to its gateway's history (see the module doc).
    pub async fn apply(&mut self, catalog: &TagCatalog) -> Result<CatalogOutcome, DeltaError> {
        let gateway = catalog.gateway.as_str();
        let at = catalog.effective_at_us;
        let started = tokio::time::Instant::now();
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            commit::reload(&mut self.table, &self.url).await?;
            let before = self.watermark(gateway).await?;
            if before.is_some_and(|w| w >= at) {
                return Ok(CatalogOutcome {
                    replay: true,
                    ..CatalogOutcome::default()
                });
            }
            let (removes, kept) = self.gateway_files(gateway).await?;
            let mut current = kept;
            let change = diff(&mut current, catalog);
            let mut outcome = CatalogOutcome {
                replay: false,
                opened: change.opened,
                closed: change.closed,
                version: None,
            };
            let mut actions: Vec<Action> = Vec::new();
            if change.opened + change.closed > 0 {
                actions.extend(removes.into_iter().map(Action::Remove));
                actions.extend(self.write(gateway, &current).await?);
            }
            actions.push(Action::Txn(watermark::action(gateway, at)));
            let snapshot = self
                .table
                .snapshot()
                .map_err(|e| write_error(&self.url, gateway, e))?;
            let base_version = snapshot.version();
            let properties = CommitProperties::default()
                .with_max_retries(0)
                .with_create_checkpoint(false)
                .with_cleanup_expired_logs(Some(false))
                .with_metadata([
                    ("plantline.gateway".to_owned(), gateway.into()),
                    (
                        "plantline.catalog_hash".to_owned(),
                        catalog.hash.clone().into(),
                    ),
                ]);
            let operation = DeltaOperation::Write {
                mode: SaveMode::Overwrite,
                partition_by: None,
                predicate: Some(format!("gateway = '{gateway}'")),
            };
            let committed = CommitBuilder::from(properties)
                .with_actions(actions)
                .build(Some(snapshot), self.table.log_store(), operation)
                .await;
            let source = match committed {
                Ok(finalized) => {
                    let version = finalized.version();
                    self.table.state = Some(finalized.snapshot());
                    let label = commit::table_label(&self.table, &self.url);
                    commit::checkpoint_if_due(&self.table, &self.url, &label, version).await;
                    outcome.version = Some(version);
                    return Ok(outcome);
                }
                Err(source) => source,
            };
            let failure = commit::classify(&source);
            if failure == Failure::Definite {
                return Err(commit_error(&self.url, gateway, base_version, source));
            }
            // Lost race or unknown outcome: the watermark says whether this catalog is in.
            commit::reload(&mut self.table, &self.url).await?;
            if self.watermark(gateway).await?.is_some_and(|w| w >= at) {
                debug!(
                    component = "tags",
                    gateway, "the catalog's commit had landed, or another collector applied it"
                );
                outcome.version = self.table.version();
                return Ok(outcome);
            }
            let pause = commit::backoff(attempt);
            if started.elapsed() + pause > commit::RETRY_BUDGET {
                return Err(DeltaError::Contended {
                    gateway: gateway.to_owned(),
                    attempts: attempt,
                });
            }
            if failure == Failure::Ambiguous {
                warn!(component = "tags", gateway, error = %source, "tags commit outcome was uncertain and it had not landed; trying again");
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// The data files that may hold rows of `gateway` (as remove actions) and all their rows.
    async fn gateway_files(
        &self,
        gateway: &str,
    ) -> Result<(Vec<deltalake::kernel::Remove>, Vec<TagRow>), DeltaError> {
        let Ok(snapshot) = self.table.snapshot() else {
            return Ok((Vec::new(), Vec::new()));
        };
        let removes = snapshot
            .log_data()
            .iter()
            .filter(|file| may_hold(file.stats().as_deref(), gateway))
            .map(|file| file.remove_action(true))
            .collect();
        let batches = commit::read_files(&self.table, &self.url, |stats| {
            may_hold_value(stats, gateway)
        })
        .await?;
        Ok((removes, batches.iter().flat_map(rows_of).collect()))
    }

    /// Writes `rows` as new data files (not yet committed).
    async fn write(&mut self, gateway: &str, rows: &[TagRow]) -> Result<Vec<Action>, DeltaError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let batch = to_batch(rows);
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let mut writer = RecordBatchWriter::for_table(&self.table)
            .map_err(|e| write_error(&self.url, gateway, e))?
            .with_writer_properties(properties);
        writer
            .write(batch)
            .await
            .map_err(|e| write_error(&self.url, gateway, e))?;
        let adds = writer
            .flush()
            .await
            .map_err(|e| write_error(&self.url, gateway, e))?;
        Ok(adds.into_iter().map(Action::Add).collect())
    }
}

/// What a catalog changed in the rows of its gateway.
struct Change {
    opened: usize,
    closed: usize,
}

/// Edits `rows` (every row of the files holding the catalog's gateway, other gateways' too)
/// into the history after `catalog`.
fn diff(rows: &mut Vec<TagRow>, catalog: &TagCatalog) -> Change {
    let at = catalog.effective_at_us;
    let wanted: BTreeMap<(&str, &str), &CatalogTag> = catalog
        .tags
        .iter()
        .map(|t| ((t.device.as_str(), t.tag.as_str()), t))
        .collect();
    let mut in_force: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        if row.gateway == catalog.gateway && row.valid_to_us.is_none() {
            in_force.insert((row.tag.device.clone(), row.tag.tag.clone()), i);
        }
    }
    let mut change = Change {
        opened: 0,
        closed: 0,
    };
    for ((device, tag), &i) in &in_force {
        let unchanged = wanted
            .get(&(device.as_str(), tag.as_str()))
            .is_some_and(|t| **t == rows[i].tag);
        if !unchanged {
            rows[i].valid_to_us = Some(at);
            change.closed += 1;
        }
    }
    for (key, tag) in wanted {
        let unchanged = in_force
            .get(&(key.0.to_owned(), key.1.to_owned()))
            .is_some_and(|&i| rows[i].valid_to_us.is_none());
        if !unchanged {
            rows.push(TagRow {
                gateway: catalog.gateway.clone(),
                tag: tag.clone(),
                valid_from_us: at,
                valid_to_us: None,
                catalog_hash: catalog.hash.clone(),
            });
            change.opened += 1;
        }
    }
    change
}

/// Whether a data file's statistics allow rows of `gateway`; missing statistics never
/// exclude a file.
fn may_hold(stats: Option<&str>, gateway: &str) -> bool {
    let parsed = stats.and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok());
    may_hold_value(parsed.as_ref(), gateway)
}

fn may_hold_value(stats: Option<&serde_json::Value>, gateway: &str) -> bool {
    let Some(stats) = stats else {
        return true;
    };
    let bound = |side: &str| {
        stats
            .get(side)
            .and_then(|m| m.get("gateway"))
            .and_then(serde_json::Value::as_str)
    };
    // A max bound may be a truncated prefix: only a gateway past it and not starting with it
    // is outside.
    !(bound("minValues").is_some_and(|m| gateway < m)
        || bound("maxValues").is_some_and(|m| !gateway.starts_with(m) && gateway > m))
}

fn to_batch(rows: &[TagRow]) -> RecordBatch {
    let text = |f: &dyn Fn(&TagRow) -> Option<&str>| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    };
    let time = |f: &dyn Fn(&TagRow) -> Option<i64>| -> ArrayRef {
        Arc::new(
            rows.iter()
                .map(f)
                .collect::<TimestampMicrosecondArray>()
                .with_timezone("UTC"),
        )
    };
    let columns = vec![
        text(&|r| Some(&r.gateway)),
        text(&|r| Some(&r.tag.device)),
        text(&|r| Some(&r.tag.tag)),
        text(&|r| Some(&r.tag.site)),
        text(&|r| r.tag.area.as_deref()),
        text(&|r| r.tag.line.as_deref()),
        text(&|r| r.tag.machine.as_deref()),
        text(&|r| r.tag.unit.as_deref()),
        text(&|r| r.tag.description.as_deref()),
        text(&|r| Some(&r.tag.data_type)),
        text(&|r| Some(&r.tag.source)),
        time(&|r| Some(r.valid_from_us)),
        time(&|r| r.valid_to_us),
        text(&|r| Some(&r.catalog_hash)),
    ];
    // The columns are built from the schema's own list, in its order and nullability.
    RecordBatch::try_new(tags_schema(), columns).expect("the columns follow tags_schema")
}

/// The rows of a data file of the table; columns are looked up by name.
fn rows_of(batch: &RecordBatch) -> Vec<TagRow> {
    let text = |name: &str| {
        batch
            .column_by_name(name)
            .map(|c| c.as_string::<i32>().clone())
    };
    let time = |name: &str| {
        batch
            .column_by_name(name)
            .map(|c| c.as_primitive::<TimestampMicrosecondType>().clone())
    };
    let get = |column: &Option<StringArray>, i: usize| {
        column
            .as_ref()
            .filter(|c| c.is_valid(i))
            .map(|c| c.value(i).to_owned())
    };
    let (gateway, device, tag, site) = (text("gateway"), text("device"), text("tag"), text("site"));
    let (area, line, machine) = (text("area"), text("line"), text("machine"));
    let (unit, description, data_type, source) = (
        text("unit"),
        text("description"),
        text("data_type"),
        text("source"),
    );
    let hash = text("catalog_hash");
    let (from, to) = (time("valid_from"), time("valid_to"));
    (0..batch.num_rows())
        .map(|i| TagRow {
            gateway: get(&gateway, i).unwrap_or_default(),
            tag: CatalogTag {
                device: get(&device, i).unwrap_or_default(),
                tag: get(&tag, i).unwrap_or_default(),
                source: get(&source, i).unwrap_or_default(),
                site: get(&site, i).unwrap_or_default(),
                area: get(&area, i),
                line: get(&line, i),
                machine: get(&machine, i),
                unit: get(&unit, i),
                description: get(&description, i),
                data_type: get(&data_type, i).unwrap_or_default(),
            },
            valid_from_us: from.as_ref().map_or(0, |c| c.value(i)),
            valid_to_us: to.as_ref().filter(|c| c.is_valid(i)).map(|c| c.value(i)),
            catalog_hash: get(&hash, i).unwrap_or_default(),
        })
        .collect()
}

fn write_error(url: &Url, gateway: &str, source: DeltaTableError) -> DeltaError {
    DeltaError::Write {
        table: url.to_string(),
        gateway: gateway.to_owned(),
        source: Box::new(source),
    }
}

fn commit_error(
    url: &Url,
    gateway: &str,
    base_version: Version,
    source: DeltaTableError,
) -> DeltaError {
    DeltaError::Commit {
        table: url.to_string(),
        gateway: gateway.to_owned(),
        base_version,
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(device: &str, name: &str, unit: &str) -> CatalogTag {
        CatalogTag {
            device: device.to_owned(),
            tag: name.to_owned(),
            source: "modbus".to_owned(),
            site: "plant-ost".to_owned(),
            area: None,
            line: Some("line1".to_owned()),
            machine: None,
            unit: Some(unit.to_owned()),
            description: None,
            data_type: "f32".to_owned(),
        }
    }

    #[test]
    fn a_catalog_closes_changed_and_removed_tags_and_leaves_the_rest_alone() {
        let first = TagCatalog::new(
            "gw-1",
            100,
            vec![
                tag("p", "a", "bar"),
                tag("p", "b", "degC"),
                tag("p", "c", "A"),
            ],
        );
        let mut rows = Vec::new();
        let change = diff(&mut rows, &first);
        assert_eq!((change.opened, change.closed), (3, 0));
        let second = TagCatalog::new(
            "gw-1",
            200,
            vec![
                tag("p", "a", "psi"),
                tag("p", "b", "degC"),
                tag("p", "d", "V"),
            ],
        );
        let change = diff(&mut rows, &second);
        // a changed (closed + opened), c removed (closed), d added (opened), b untouched.
        assert_eq!((change.opened, change.closed), (2, 2));
        let summary: Vec<(&str, i64, Option<i64>)> = rows
            .iter()
            .map(|r| (r.tag.tag.as_str(), r.valid_from_us, r.valid_to_us))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", 100, Some(200)),
                ("b", 100, None),
                ("c", 100, Some(200)),
                ("a", 200, None),
                ("d", 200, None),
            ]
        );
        // The same content again, later: nothing to do.
        let again = TagCatalog::new("gw-1", 300, second.tags.clone());
        let change = diff(&mut rows, &again);
        assert_eq!((change.opened, change.closed), (0, 0));
        let batch = to_batch(&rows);
        assert_eq!(rows_of(&batch), rows);
    }
}
