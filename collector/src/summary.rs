//! Human-readable summaries: what a pass did, and what a table holds per tag.

use std::collections::BTreeMap;
use std::fmt::Write;

use edge_agent::contract::{Quality, Row};

use crate::PassReport;
use crate::maintenance::{OptimizeReport, VacuumReport};
use crate::tags::CatalogResult;

/// One line per gateway, one per quarantined file and per recorded gap below its gateway, one
/// per data-quality rule that did something, one per tag catalog and per catalog failure, and
/// one for Snowflake, for `collector run-once`.
pub fn pass_summary(report: &PassReport) -> String {
    let mut out = String::new();
    if report.ingest.gateways.is_empty() {
        out.push_str("no gateway folders in the raw zone\n");
    }
    for gw in &report.ingest.gateways {
        let _ = write!(
            out,
            "gateway {}: {} files, {} rows applied, {} duplicate rows skipped, watermark {}",
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
        if gw.rows_quarantined > 0 {
            let _ = write!(out, ", {} rows quarantined by rules", gw.rows_quarantined);
        }
        if gw.rows_flagged > 0 {
            let _ = write!(out, ", {} rows flagged", gw.rows_flagged);
        }
        if !gw.gaps.is_empty() {
            let _ = write!(out, ", {} gaps recorded", gw.gaps.len());
        }
        if gw.fresh_files_applied > 0 {
            let _ = write!(
                out,
                ", fresh lane {} files, {} rows",
                gw.fresh_files_applied, gw.fresh_rows_applied
            );
        }
        if !gw.fresh_deferred.is_empty() {
            let _ = write!(out, ", {} fresh files deferred", gw.fresh_deferred.len());
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
        for gap in &gw.gaps {
            let _ = writeln!(
                out,
                "  gap seq {}..={} ({} readings): {} ({})",
                gap.first_seq, gap.last_seq, gap.readings, gap.reason, gap.file_key
            );
        }
    }
    for (rule, counts) in report.ingest.rule_counts() {
        let _ = writeln!(
            out,
            "rule {rule}: {} rows flagged, {} rows quarantined, {} files failed",
            counts.flagged, counts.quarantined, counts.failed_files
        );
    }
    tags_summary(&mut out, &report.tags);
    match &report.snowflake {
        None => out.push_str("snowflake: not configured\n"),
        Some(sf) => {
            let _ = writeln!(
                out,
                "snowflake: {} Delta versions loaded, {} rows inserted, loaded up to version {}",
                sf.versions_loaded,
                sf.rows_inserted,
                sf.loaded_version
                    .map_or_else(|| "none".to_owned(), |v| v.to_string())
            );
        }
    }
    out
}

/// One line per tag catalog the pass dealt with and per catalog failure.
fn tags_summary(out: &mut String, tags: &Result<crate::tags::TagsReport, String>) {
    match tags {
        Ok(tags) => {
            for catalog in &tags.catalogs {
                let _ = match &catalog.outcome {
                    CatalogResult::Applied(o) if o.replay => writeln!(
                        out,
                        "tags {}: catalog {} applied before; archived",
                        catalog.gateway, catalog.key
                    ),
                    CatalogResult::Applied(o) => writeln!(
                        out,
                        "tags {}: catalog {} applied, {} rows opened, {} closed",
                        catalog.gateway, catalog.key, o.opened, o.closed
                    ),
                    CatalogResult::Quarantined(reason) => writeln!(
                        out,
                        "tags {}: catalog {} quarantined: {reason}",
                        catalog.gateway, catalog.key
                    ),
                };
            }
            for (gateway, error) in &tags.failed {
                let _ = writeln!(out, "tags {gateway}: ERROR {error}");
            }
        }
        Err(error) => {
            let _ = writeln!(out, "tags: ERROR {error}");
        }
    }
}

/// What `collector optimize` did, in one or two lines.
pub fn optimize_summary(report: &OptimizeReport) -> String {
    match report.version {
        None => format!(
            "optimize: nothing to compact ({} data files)\n",
            report.files_after
        ),
        Some(version) => format!(
            "optimize: {} files ({}) rewritten into {} ({}), {} rows, dataChange=false, version {version}; {} data files now\n",
            report.files_removed,
            bytes(report.bytes_removed),
            report.files_added,
            bytes(report.bytes_added),
            report.rows,
            report.files_after,
        ),
    }
}

/// What `collector vacuum` did: one line per table, then the files (a dry run lists them all).
pub fn vacuum_summary(reports: &[(url::Url, VacuumReport)]) -> String {
    let mut out = String::new();
    for (url, report) in reports {
        let verb = if report.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        let _ = writeln!(out, "vacuum {url}: {verb} {} files", report.files.len());
        if report.dry_run {
            for file in &report.files {
                let _ = writeln!(out, "  {file}");
            }
        }
    }
    out
}

/// A byte count for people: `812 B`, `3.4 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Statistics of one tag.
#[derive(Debug, Clone, PartialEq)]
pub struct TagStats {
    pub rows: usize,
    pub bad: usize,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// The value of the reading with the highest `seq` (null when it was bad).
    pub last: Option<f64>,
    pub unit: Option<String>,
}

/// Rows per (gateway, device, tag) with min, max and last value of the good readings.
pub fn tag_stats(rows: &[Row]) -> BTreeMap<(String, String, String), TagStats> {
    let mut stats: BTreeMap<(String, String, String), TagStats> = BTreeMap::new();
    let mut last_seq: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    for row in rows {
        let key = (row.gateway.clone(), row.device.clone(), row.tag.clone());
        let s = stats.entry(key.clone()).or_insert(TagStats {
            rows: 0,
            bad: 0,
            min: None,
            max: None,
            last: None,
            unit: None,
        });
        s.rows += 1;
        if row.quality == Quality::Bad {
            s.bad += 1;
        }
        if let Some(v) = row.value {
            s.min = Some(s.min.map_or(v, |m| m.min(v)));
            s.max = Some(s.max.map_or(v, |m| m.max(v)));
        }
        let seq = last_seq.entry(key).or_insert(i64::MIN);
        if row.seq > *seq {
            *seq = row.seq;
            s.last = row.value;
            s.unit.clone_from(&row.unit);
        }
    }
    stats
}

/// A fixed-width table of [`tag_stats`].
pub fn tag_table(rows: &[Row]) -> String {
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    let mut out = format!(
        "{:<12} {:<12} {:<22} {:>6} {:>4} {:>10} {:>10} {:>10}  unit\n",
        "gateway", "device", "tag", "rows", "bad", "min", "max", "last"
    );
    for ((gateway, device, tag), s) in tag_stats(rows) {
        let _ = writeln!(
            out,
            "{gateway:<12} {device:<12} {tag:<22} {:>6} {:>4} {:>10} {:>10} {:>10}  {}",
            s.rows,
            s.bad,
            fmt(s.min),
            fmt(s.max),
            fmt(s.last),
            s.unit.as_deref().unwrap_or("")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, tag: &str, value: Option<f64>) -> Row {
        Row {
            seq,
            ts_us: seq,
            site: "s".into(),
            gateway: "gw-1".into(),
            device: "plc".into(),
            tag: tag.into(),
            value,
            quality: if value.is_some() {
                Quality::Good
            } else {
                Quality::Bad
            },
            value_text: None,
            unit: Some("bar".into()),
        }
    }

    #[test]
    fn maintenance_summaries_name_what_changed() {
        let report = OptimizeReport {
            version: Some(7),
            files_removed: 12,
            files_added: 2,
            bytes_removed: 3 * 1024 * 1024 + 512 * 1024,
            bytes_added: 900,
            rows: 1200,
            files_after: 3,
        };
        assert_eq!(
            optimize_summary(&report),
            "optimize: 12 files (3.5 MiB) rewritten into 2 (900 B), 1200 rows, dataChange=false, version 7; 3 data files now\n"
        );
        assert_eq!(
            optimize_summary(&OptimizeReport {
                files_after: 4,
                ..OptimizeReport::default()
            }),
            "optimize: nothing to compact (4 data files)\n"
        );
        let url = url::Url::parse("file:///lake/readings/").unwrap();
        let dry = VacuumReport {
            files: vec!["part-1.parquet".into()],
            dry_run: true,
        };
        assert_eq!(
            vacuum_summary(&[(url, dry)]),
            "vacuum file:///lake/readings/: would delete 1 files\n  part-1.parquet\n"
        );
    }

    #[test]
    fn stats_per_tag_take_min_max_of_good_values_and_last_by_seq() {
        let rows = [
            row(3, "p", Some(2.0)),
            row(1, "p", Some(5.0)),
            row(2, "p", None),
            row(4, "t", Some(-1.5)),
        ];
        let stats = tag_stats(&rows);
        let p = &stats[&("gw-1".into(), "plc".into(), "p".into())];
        assert_eq!(
            *p,
            TagStats {
                rows: 3,
                bad: 1,
                min: Some(2.0),
                max: Some(5.0),
                last: Some(2.0),
                unit: Some("bar".into())
            }
        );
        assert_eq!(stats.len(), 2);
        let table = tag_table(&rows);
        assert!(table.contains("gw-1         plc          p                           3    1       2.00       5.00       2.00  bar"), "{table}");
    }
}
