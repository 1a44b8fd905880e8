//! The three tables one pass writes: readings, gaps and quarantined rows.

use std::collections::HashMap;

use url::Url;

use super::gaps::GapsTable;
use super::quarantined_rows::QuarantinedRowsTable;
use super::table::{DeltaError, ReadingsTable};

/// Suffix of the gaps table's default location, beside the readings table.
pub const GAPS_SUFFIX: &str = "_gaps";
/// Suffix of the quarantined-rows table's default location, beside the readings table.
pub const QUARANTINED_ROWS_SUFFIX: &str = "_quarantined_rows";

/// The readings table and its two data-quality tables, each loaded at its latest version.
#[derive(Debug)]
pub struct Tables {
    pub readings: ReadingsTable,
    pub gaps: GapsTable,
    pub quarantined_rows: QuarantinedRowsTable,
}

/// Where the three tables live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableUrls {
    pub readings: Url,
    pub gaps: Url,
    pub quarantined_rows: Url,
}

impl TableUrls {
    /// The readings table at `readings`, the other two beside it with the default suffixes
    /// (`s3://lake/readings/` → `s3://lake/readings_gaps/`, `s3://lake/readings_quarantined_rows/`).
    pub fn beside(readings: &Url) -> Result<Self, String> {
        Ok(Self {
            readings: readings.clone(),
            gaps: sibling(readings, GAPS_SUFFIX)?,
            quarantined_rows: sibling(readings, QUARANTINED_ROWS_SUFFIX)?,
        })
    }
}

/// The URL of a folder beside `url`'s last path segment, named like it plus `suffix`.
pub fn sibling(url: &Url, suffix: &str) -> Result<Url, String> {
    let path = url.path().trim_end_matches('/');
    let name = path.rsplit('/').next().unwrap_or_default();
    if name.is_empty() {
        return Err(format!(
            "`{url}` has no folder name to put `{suffix}` after; the table needs a path like \"s3://lake/readings\""
        ));
    }
    let mut sibling = url.clone();
    sibling.set_path(&format!("{path}{suffix}/"));
    Ok(sibling)
}

impl Tables {
    /// Opens (or creates) the three tables.
    pub async fn open_or_create(
        urls: &TableUrls,
        storage_options: HashMap<String, String>,
    ) -> Result<Self, DeltaError> {
        let gaps = GapsTable::open_or_create(&urls.gaps, &storage_options).await?;
        let quarantined_rows =
            QuarantinedRowsTable::open_or_create(&urls.quarantined_rows, &storage_options).await?;
        let readings = ReadingsTable::open_or_create(&urls.readings, storage_options).await?;
        Ok(Self {
            readings,
            gaps,
            quarantined_rows,
        })
    }

    /// How many times a pass retries a gateway's commits after losing a race.
    #[must_use]
    pub fn with_commit_attempts(mut self, attempts: u32) -> Self {
        self.readings = self.readings.with_commit_attempts(attempts);
        self
    }

    /// Loads the newest version of all three.
    pub async fn reload(&mut self) -> Result<(), DeltaError> {
        self.readings.reload().await?;
        self.gaps.reload().await?;
        self.quarantined_rows.reload().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_quality_tables_sit_beside_the_readings_table() {
        let urls = TableUrls::beside(&Url::parse("s3://lake/plant/readings").unwrap()).unwrap();
        assert_eq!(urls.gaps.as_str(), "s3://lake/plant/readings_gaps/");
        assert_eq!(
            urls.quarantined_rows.as_str(),
            "s3://lake/plant/readings_quarantined_rows/"
        );
        let local =
            TableUrls::beside(&Url::parse("file:///var/lib/lake/readings/").unwrap()).unwrap();
        assert_eq!(local.gaps.as_str(), "file:///var/lib/lake/readings_gaps/");
        assert!(sibling(&Url::parse("s3://lake/").unwrap(), GAPS_SUFFIX).is_err());
    }
}
