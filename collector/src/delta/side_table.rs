//! What the data-quality tables (gaps, quarantined rows) share: a Delta table the collector
//! owns, appended per gateway with that gateway's `txn` watermark in the same commit.

use std::collections::HashMap;

use arrow_array::RecordBatch;
use deltalake::DeltaTable;
use deltalake::kernel::Version;
use url::Url;

use super::commit::{self, CommitFailure};
use super::open::{self, TableSpec};
use super::table::DeltaError;
use super::watermark;

/// A data-quality table, loaded at its latest version.
#[derive(Debug)]
pub(crate) struct SideTable {
    table: DeltaTable,
    url: Url,
    spec: TableSpec,
}

impl SideTable {
    /// Opens (or creates) the table and checks it has exactly `spec`'s columns, adding the
    /// spec's later columns to a table an earlier collector wrote ([`open::evolve`]).
    pub(crate) async fn open_or_create(
        url: &Url,
        storage_options: &HashMap<String, String>,
        spec: TableSpec,
    ) -> Result<Self, DeltaError> {
        let mut table = open::open_or_create(url, storage_options, &spec).await?;
        open::evolve(&mut table, url, &spec, 5).await?;
        Ok(Self {
            table,
            url: url.clone(),
            spec,
        })
    }

    pub(crate) fn url(&self) -> &Url {
        &self.url
    }

    pub(crate) fn version(&self) -> Option<Version> {
        self.table.version()
    }

    pub(crate) fn delta_table(&self) -> &DeltaTable {
        &self.table
    }

    pub(crate) async fn reload(&mut self) -> Result<(), DeltaError> {
        commit::reload(&mut self.table, &self.url).await
    }

    /// The gateway's watermark in this table: every key at or below it was decided.
    pub(crate) async fn watermark(&self, gateway: &str) -> Result<Option<i64>, DeltaError> {
        watermark::read(&self.table, &self.url, gateway).await
    }

    /// Appends `batch` (in the spec's schema) with the gateway's watermark moved to `watermark`.
    pub(crate) async fn commit(
        &mut self,
        gateway: &str,
        batch: RecordBatch,
        watermark: i64,
    ) -> Result<Version, CommitFailure> {
        debug_assert_eq!(batch.schema(), (self.spec.schema)());
        commit::commit_with_watermark(&mut self.table, &self.url, gateway, vec![batch], watermark)
            .await
    }

    /// The data files whose statistics say they may hold rows of `gateway` with `key_column`
    /// in `lo..=hi` (all files when the log has no statistics for them).
    pub(crate) async fn read_matching(
        &mut self,
        gateway: Option<&str>,
        key_column: &str,
        range: Option<(i64, i64)>,
    ) -> Result<Vec<RecordBatch>, DeltaError> {
        commit::read_files(&self.table, &self.url, |stats| {
            may_hold(stats, gateway, key_column, range)
        })
        .await
    }
}

/// Whether a data file's statistics (`minValues` / `maxValues`) allow rows of `gateway` with
/// `key` in `range`. Missing statistics never exclude a file.
fn may_hold(
    stats: Option<&serde_json::Value>,
    gateway: Option<&str>,
    key: &str,
    range: Option<(i64, i64)>,
) -> bool {
    let Some(stats) = stats else {
        return true;
    };
    let bound = |side: &str, column: &str| stats.get(side).and_then(|m| m.get(column));
    if let Some(gateway) = gateway {
        let min = bound("minValues", "gateway").and_then(serde_json::Value::as_str);
        let max = bound("maxValues", "gateway").and_then(serde_json::Value::as_str);
        // Stats truncate long strings, so a max bound is only a prefix: compare with care.
        if min.is_some_and(|m| gateway < m) {
            return false;
        }
        if max.is_some_and(|m| !gateway.starts_with(m) && gateway > m) {
            return false;
        }
    }
    if let Some((lo, hi)) = range {
        let min = bound("minValues", key).and_then(serde_json::Value::as_i64);
        let max = bound("maxValues", key).and_then(serde_json::Value::as_i64);
        if min.is_some_and(|m| m > hi) || max.is_some_and(|m| m < lo) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn file_statistics_rule_out_files_of_other_gateways_and_ranges() {
        let stats = json!({
            "numRecords": 3,
            "minValues": {"gateway": "gw-b", "seq": 10},
            "maxValues": {"gateway": "gw-d", "seq": 20}
        });
        let s = Some(&stats);
        assert!(may_hold(s, Some("gw-c"), "seq", Some((15, 30))));
        assert!(!may_hold(s, Some("gw-a"), "seq", Some((15, 30))));
        assert!(!may_hold(s, Some("gw-e"), "seq", Some((15, 30))));
        assert!(!may_hold(s, Some("gw-c"), "seq", Some((21, 30))));
        assert!(!may_hold(s, Some("gw-c"), "seq", Some((1, 9))));
        assert!(may_hold(None, Some("gw-a"), "seq", Some((1, 2))));
        assert!(may_hold(s, None, "seq", None));
    }
}
