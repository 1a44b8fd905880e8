//! The tables Plantline owns in Snowflake, defined once for the loader and for
//! `collector snowflake init`.
//!
//! # Invariants
//! - The readings table has exactly the batch contract's columns, in its order
//!   ([`READINGS_COLUMNS`]); the loader's staging table has the same columns, so
//!   `INSERT ... SELECT` between them needs no casts.
//! - Every statement here is idempotent (`IF NOT EXISTS`): running it against an account that
//!   already holds the table changes nothing and never drops data.

/// Columns of the readings table, in the order of the batch contract, with their Snowflake types.
pub(crate) const READINGS_COLUMNS: [(&str, &str); 9] = [
    ("SEQ", "NUMBER(19,0) NOT NULL"),
    ("TS", "TIMESTAMP_TZ NOT NULL"),
    ("SITE", "VARCHAR NOT NULL"),
    ("GATEWAY", "VARCHAR NOT NULL"),
    ("DEVICE", "VARCHAR NOT NULL"),
    ("TAG", "VARCHAR NOT NULL"),
    ("VALUE", "FLOAT"),
    ("QUALITY", "VARCHAR NOT NULL"),
    ("UNIT", "VARCHAR"),
];

/// The readings table's clustering key. Dashboards filter by a time range first and a gateway
/// or tag second; clustering on the day (not the raw timestamp, whose cardinality would make
/// reclustering expensive) and then the gateway and tag lets Snowflake prune micro-partitions
/// for both kinds of filter.
pub const READINGS_CLUSTER_KEY: &str = "TO_DATE(TS), GATEWAY, TAG";

/// `NAME TYPE, ...` of the readings table, for the table itself and the loader's staging table.
pub(crate) fn readings_column_list() -> String {
    READINGS_COLUMNS
        .iter()
        .map(|(name, ty)| format!("{name} {ty}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The readings fact table. `table` is written into the SQL as given (qualified or not).
pub(crate) fn create_readings_table(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} ({}) CLUSTER BY ({READINGS_CLUSTER_KEY})",
        readings_column_list()
    )
}

/// The load-control (watermark) table: per readings table, the last Delta version loaded.
pub(crate) fn create_control_table(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (TABLE_NAME VARCHAR NOT NULL PRIMARY KEY, LAST_VERSION NUMBER(19,0) NOT NULL, LOADED_AT TIMESTAMP_NTZ)"
    )
}

/// The tags dimension: one row per tag of a device on a gateway, with what the sensor map says
/// about it. Filled by a later stage of the collector from the gateways' sensor maps.
pub(crate) fn create_tags_table(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (SITE VARCHAR NOT NULL, GATEWAY VARCHAR NOT NULL, DEVICE VARCHAR NOT NULL, TAG VARCHAR NOT NULL, UNIT VARCHAR, DESCRIPTION VARCHAR, SOURCE VARCHAR, ADDRESS VARCHAR, DATA_TYPE VARCHAR, SCALE FLOAT, VALUE_OFFSET FLOAT, UPDATED_AT TIMESTAMP_TZ, PRIMARY KEY (GATEWAY, DEVICE, TAG))"
    )
}

/// Known gaps: `seq` ranges of a gateway that will never arrive (a damaged buffer, a quarantined
/// batch), so reports can tell "no data" from "data lost".
pub(crate) fn create_gaps_table(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (GATEWAY VARCHAR NOT NULL, FIRST_SEQ NUMBER(19,0) NOT NULL, LAST_SEQ NUMBER(19,0) NOT NULL, FIRST_TS TIMESTAMP_TZ, LAST_TS TIMESTAMP_TZ, REASON VARCHAR NOT NULL, DETECTED_AT TIMESTAMP_TZ NOT NULL, PRIMARY KEY (GATEWAY, FIRST_SEQ))"
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

    #[test]
    fn readings_table_follows_the_batch_contract_and_is_clustered_by_day_gateway_and_tag() {
        let names: Vec<&str> = READINGS_COLUMNS.iter().map(|(n, _)| *n).collect();
        let contract: Vec<String> = edge_agent::contract::schema()
            .fields()
            .iter()
            .map(|f| f.name().to_ascii_uppercase())
            .collect();
        assert_eq!(names, contract);
        assert_eq!(
            create_readings_table("PLANT.RAW.READINGS"),
            "CREATE TABLE IF NOT EXISTS PLANT.RAW.READINGS (SEQ NUMBER(19,0) NOT NULL, TS TIMESTAMP_TZ NOT NULL, SITE VARCHAR NOT NULL, GATEWAY VARCHAR NOT NULL, DEVICE VARCHAR NOT NULL, TAG VARCHAR NOT NULL, VALUE FLOAT, QUALITY VARCHAR NOT NULL, UNIT VARCHAR) CLUSTER BY (TO_DATE(TS), GATEWAY, TAG)"
        );
    }
}
