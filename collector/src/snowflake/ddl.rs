//! The tables Plantline owns in Snowflake, defined once for the loader and for
//! `collector snowflake init`.
//!
//! # Invariants
//! - The four loaded tables ([`READINGS`], [`GAPS`], [`QUARANTINED_ROWS`], [`TAGS`]) have the
//!   columns of their Delta tables, in their order, upper-cased; the loader's staging tables have
//!   the same columns, so `INSERT ... SELECT` between them needs no casts.
//! - Every statement here is idempotent (`IF NOT EXISTS`): running it against an account that
//!   already holds the table changes nothing and never drops data. A column a newer collector
//!   knows and an existing table lacks is added with `ALTER TABLE ... ADD COLUMN IF NOT EXISTS`,
//!   always nullable, so rows loaded before read it as null; columns are never dropped or
//!   retyped.

/// How a column's values are read from a Delta file and bound into SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A 64-bit whole number (`NUMBER(19,0)`).
    Int,
    /// An instant, microseconds since the epoch (`TIMESTAMP_TZ`).
    Timestamp,
    /// A double (`FLOAT`).
    Float,
    /// A string (`VARCHAR`), possibly from a partition value.
    Text,
}

impl Kind {
    pub(crate) fn sql_type(self) -> &'static str {
        match self {
            Self::Int => "NUMBER(19,0)",
            Self::Timestamp => "TIMESTAMP_TZ",
            Self::Float => "FLOAT",
            Self::Text => "VARCHAR",
        }
    }
}

/// Whether a column must be in every Delta file, and may hold nulls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Presence {
    /// In every file, never null (`NOT NULL`).
    Required,
    /// In every file, may be null.
    Nullable,
    /// Added to the Delta table later: files written before lack it, and it reads as null.
    Added,
}

/// One column of a loaded table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Column {
    /// The Snowflake name (upper case).
    pub(crate) name: &'static str,
    /// The Delta (Parquet) column it is read from.
    pub(crate) delta: &'static str,
    pub(crate) kind: Kind,
    pub(crate) presence: Presence,
}

const fn col(name: &'static str, delta: &'static str, kind: Kind, presence: Presence) -> Column {
    Column {
        name,
        delta,
        kind,
        presence,
    }
}

/// A table the loader fills from a Delta table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableDef {
    /// What it holds, for logs: `readings`, `gaps`, `quarantined_rows`.
    pub(crate) label: &'static str,
    pub(crate) columns: &'static [Column],
    /// The merge key: a row whose key is in the table already is not inserted again.
    pub(crate) key: &'static [&'static str],
    /// `CLUSTER BY` expression, if any.
    pub(crate) cluster_by: Option<&'static str>,
    /// Columns an earlier collector's `init` did not create: `init` adds them to an existing
    /// table (the loader adds any missing column too, when its role may alter the table).
    pub(crate) upgrade_columns: &'static [&'static str],
}

use Kind::{Float, Int, Text, Timestamp};
use Presence::{Added, Nullable, Required};

/// The readings table's clustering key. Dashboards filter by a time range first and a gateway
/// or tag second; clustering on the day (not the raw timestamp, whose cardinality would make
/// reclustering expensive) and then the gateway and tag lets Snowflake prune micro-partitions
/// for both kinds of filter.
pub const READINGS_CLUSTER_KEY: &str = "TO_DATE(TS), GATEWAY, TAG";

/// The batch contract's columns (v1), then the columns added since: `value_text` (contract v2,
/// string tags) and the collector's `dq_flags` (row rules).
const READINGS_COLUMNS: [Column; 11] = [
    col("SEQ", "seq", Int, Required),
    col("TS", "ts", Timestamp, Required),
    col("SITE", "site", Text, Required),
    col("GATEWAY", "gateway", Text, Required),
    col("DEVICE", "device", Text, Required),
    col("TAG", "tag", Text, Required),
    col("VALUE", "value", Float, Nullable),
    col("QUALITY", "quality", Text, Required),
    col("UNIT", "unit", Text, Nullable),
    col("VALUE_TEXT", "value_text", Text, Added),
    col("DQ_FLAGS", "dq_flags", Text, Added),
];

/// The readings fact table, one row per (`GATEWAY`, `SEQ`).
pub(crate) const READINGS: TableDef = TableDef {
    label: "readings",
    columns: &READINGS_COLUMNS,
    key: &["GATEWAY", "SEQ"],
    cluster_by: Some(READINGS_CLUSTER_KEY),
    upgrade_columns: &["VALUE_TEXT", "DQ_FLAGS"],
};

const GAPS_COLUMNS: [Column; 7] = [
    col("GATEWAY", "gateway", Text, Required),
    col("FIRST_SEQ", "first_seq", Int, Required),
    col("LAST_SEQ", "last_seq", Int, Required),
    col("READINGS", "readings", Int, Required),
    col("REASON", "reason", Text, Required),
    col("DETECTED_AT", "detected_at", Timestamp, Required),
    col("FILE_KEY", "file_key", Text, Required),
];

/// Known gaps: `seq` ranges of a gateway that will never arrive, one row per
/// (`GATEWAY`, `FIRST_SEQ`), so reports can tell "no data" from "data lost".
pub(crate) const GAPS: TableDef = TableDef {
    label: "gaps",
    columns: &GAPS_COLUMNS,
    key: &["GATEWAY", "FIRST_SEQ"],
    cluster_by: None,
    // the first PLANTLINE_GAPS had FIRST_TS and LAST_TS instead; they stay, unused and null
    upgrade_columns: &["READINGS", "FILE_KEY"],
};

const QUARANTINED_ROWS_COLUMNS: [Column; 15] = [
    col("SEQ", "seq", Int, Required),
    col("TS", "ts", Timestamp, Required),
    col("SITE", "site", Text, Required),
    col("GATEWAY", "gateway", Text, Required),
    col("DEVICE", "device", Text, Required),
    col("TAG", "tag", Text, Required),
    col("VALUE", "value", Float, Nullable),
    col("QUALITY", "quality", Text, Required),
    col("UNIT", "unit", Text, Nullable),
    col("VALUE_TEXT", "value_text", Text, Added),
    col("RULE", "rule", Text, Required),
    // `CHECK` is a reserved word in SQL
    col("RULE_CHECK", "check", Text, Required),
    col("DETAIL", "detail", Text, Required),
    col("FILE_KEY", "file_key", Text, Required),
    col("QUARANTINED_AT", "quarantined_at", Timestamp, Required),
];

/// Readings a row rule kept out of the readings table, one row per (`GATEWAY`, `SEQ`, `RULE`).
pub(crate) const QUARANTINED_ROWS: TableDef = TableDef {
    label: "quarantined_rows",
    columns: &QUARANTINED_ROWS_COLUMNS,
    key: &["GATEWAY", "SEQ", "RULE"],
    cluster_by: None,
    upgrade_columns: &[],
};

const TAGS_COLUMNS: [Column; 14] = [
    col("GATEWAY", "gateway", Text, Required),
    col("DEVICE", "device", Text, Required),
    col("TAG", "tag", Text, Required),
    col("SITE", "site", Text, Required),
    col("AREA", "area", Text, Nullable),
    col("LINE", "line", Text, Nullable),
    col("MACHINE", "machine", Text, Nullable),
    col("UNIT", "unit", Text, Nullable),
    col("DESCRIPTION", "description", Text, Nullable),
    col("DATA_TYPE", "data_type", Text, Required),
    col("SOURCE", "source", Text, Required),
    col("VALID_FROM", "valid_from", Timestamp, Required),
    col("VALID_TO", "valid_to", Timestamp, Nullable),
    col("CATALOG_HASH", "catalog_hash", Text, Required),
];

/// The tags dimension as type-2 history, one row per (`GATEWAY`, `DEVICE`, `TAG`,
/// `VALID_FROM`): a row holds from `VALID_FROM` (inclusive) to `VALID_TO` (exclusive, null while
/// in force). The loader replaces its rows with the Delta table's snapshot (see `loader`), so
/// the key is not checked on insert; it declares no primary key for the same reason.
pub(crate) const TAGS: TableDef = TableDef {
    label: "tags",
    columns: &TAGS_COLUMNS,
    key: &["GATEWAY", "DEVICE", "TAG", "VALID_FROM"],
    cluster_by: None,
    // The first PLANTLINE_TAGS (created by `init` before the Delta tags table existed, never
    // filled) had one row per tag, PRIMARY KEY (GATEWAY, DEVICE, TAG), and ADDRESS, SCALE,
    // VALUE_OFFSET and UPDATED_AT instead of these; those stay, nullable and null. Its NOT NULL
    // columns (SITE, GATEWAY, DEVICE, TAG) are all filled by the load. Snowflake does not
    // enforce the old primary key, so a tag's several history rows load into it.
    upgrade_columns: &[
        "AREA",
        "LINE",
        "MACHINE",
        "VALID_FROM",
        "VALID_TO",
        "CATALOG_HASH",
    ],
};

impl TableDef {
    /// `NAME TYPE [NOT NULL], ...`, for the table itself and the loader's staging table.
    pub(crate) fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| {
                let not_null = if c.presence == Required {
                    " NOT NULL"
                } else {
                    ""
                };
                format!("{} {}{not_null}", c.name, c.kind.sql_type())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `NAME, ...`.
    pub(crate) fn names(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The table, written into the SQL as given (qualified or not).
    pub(crate) fn create(&self, table: &str) -> String {
        let cluster = self
            .cluster_by
            .map(|c| format!(" CLUSTER BY ({c})"))
            .unwrap_or_default();
        format!(
            "CREATE TABLE IF NOT EXISTS {table} ({}){cluster}",
            self.column_list()
        )
    }

    /// Adds `column` to an existing table that lacks it; always nullable, so existing rows
    /// need no value.
    pub(crate) fn add_column(table: &str, column: &Column) -> String {
        format!(
            "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {} {}",
            column.name,
            column.kind.sql_type()
        )
    }

    /// [`TableDef::upgrade_columns`] as columns.
    pub(crate) fn upgrade_columns(&self) -> impl Iterator<Item = &Column> {
        self.columns
            .iter()
            .filter(|c| self.upgrade_columns.contains(&c.name))
    }
}

/// The readings fact table. `table` is written into the SQL as given (qualified or not).
pub(crate) fn create_readings_table(table: &str) -> String {
    READINGS.create(table)
}

/// The load-control (watermark) table: per loaded table, the last Delta version loaded.
pub(crate) fn create_control_table(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (TABLE_NAME VARCHAR NOT NULL PRIMARY KEY, LAST_VERSION NUMBER(19,0) NOT NULL, LOADED_AT TIMESTAMP_NTZ)"
    )
}

/// Quarantined batch files, one row per file, mirroring the `<file>.reason.json` the collector
/// writes beside each one.
pub(crate) fn create_quarantine_table(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (FILE_KEY VARCHAR NOT NULL PRIMARY KEY, GATEWAY VARCHAR NOT NULL, FIRST_SEQ NUMBER(19,0), QUARANTINE_KEY VARCHAR NOT NULL, REASON_KIND VARCHAR NOT NULL, REASON_MESSAGE VARCHAR NOT NULL, SIZE_BYTES NUMBER(19,0), COLLECTOR_VERSION VARCHAR, DETECTED_AT TIMESTAMP_TZ NOT NULL)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upper_names(schema: &arrow_schema::Schema) -> Vec<String> {
        schema
            .fields()
            .iter()
            .map(|f| f.name().to_ascii_uppercase())
            .collect()
    }

    fn delta_names(def: &TableDef) -> Vec<String> {
        def.columns
            .iter()
            .map(|c| c.delta.to_ascii_uppercase())
            .collect()
    }

    #[test]
    fn loaded_tables_have_the_delta_tables_columns() {
        let mut readings = upper_names(&crate::delta::readings_schema());
        let mut ours = delta_names(&READINGS);
        readings.sort();
        ours.sort();
        assert_eq!(ours, readings, "readings");
        assert_eq!(
            delta_names(&GAPS),
            upper_names(&crate::delta::gaps_schema()),
            "gaps"
        );
        let mut quarantined = upper_names(&crate::delta::quarantined_rows_schema());
        let mut ours = delta_names(&QUARANTINED_ROWS);
        quarantined.sort();
        ours.sort();
        assert_eq!(ours, quarantined, "quarantined_rows");
        assert_eq!(
            delta_names(&TAGS),
            upper_names(&crate::delta::tags_schema()),
            "tags"
        );
        // the history's open end and the catalog's optional attributes are the only nulls
        let tags = crate::delta::tags_schema();
        for c in TAGS.columns {
            let field = tags.field_with_name(c.delta).unwrap();
            assert_eq!(field.is_nullable(), c.presence != Required, "{}", c.name);
        }
        for def in [READINGS, GAPS, QUARANTINED_ROWS, TAGS] {
            assert_eq!(def.upgrade_columns().count(), def.upgrade_columns.len());
            for key in def.key {
                assert!(
                    def.columns
                        .iter()
                        .any(|c| c.name == *key && c.presence == Required)
                );
            }
        }
    }

    #[test]
    fn readings_table_is_clustered_by_day_gateway_and_tag() {
        assert_eq!(
            create_readings_table("PLANT.RAW.READINGS"),
            "CREATE TABLE IF NOT EXISTS PLANT.RAW.READINGS (SEQ NUMBER(19,0) NOT NULL, TS TIMESTAMP_TZ NOT NULL, SITE VARCHAR NOT NULL, GATEWAY VARCHAR NOT NULL, DEVICE VARCHAR NOT NULL, TAG VARCHAR NOT NULL, VALUE FLOAT, QUALITY VARCHAR NOT NULL, UNIT VARCHAR, VALUE_TEXT VARCHAR, DQ_FLAGS VARCHAR) CLUSTER BY (TO_DATE(TS), GATEWAY, TAG)"
        );
        let added: Vec<String> = READINGS
            .upgrade_columns()
            .map(|c| TableDef::add_column("R", c))
            .collect();
        assert_eq!(
            added,
            [
                "ALTER TABLE R ADD COLUMN IF NOT EXISTS VALUE_TEXT VARCHAR",
                "ALTER TABLE R ADD COLUMN IF NOT EXISTS DQ_FLAGS VARCHAR"
            ]
        );
    }
}
