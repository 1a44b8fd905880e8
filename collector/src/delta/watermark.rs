//! Per-gateway watermarks, stored as Delta `txn` actions (app id + version), the way
//! kafka-delta-ingest stores Kafka offsets per partition. Every table the collector writes
//! (readings, gaps, quarantined rows) carries its own.

use deltalake::DeltaTable;
use deltalake::kernel::Transaction;
use url::Url;

use super::table::DeltaError;

/// Prefix of every gateway's app id in the table's `txn` actions.
pub const APP_ID_PREFIX: &str = "plantline-gateway-";

/// The Delta app id that carries `gateway`'s watermark.
pub fn app_id(gateway: &str) -> String {
    format!("{APP_ID_PREFIX}{gateway}")
}

/// The last `seq` of `gateway` applied to the loaded snapshot of `table`, or `None` if the
/// gateway never had a row applied (or the table has no snapshot yet).
pub(super) async fn read(
    table: &DeltaTable,
    url: &Url,
    gateway: &str,
) -> Result<Option<i64>, DeltaError> {
    let Some(state) = table.state.as_ref() else {
        return Ok(None);
    };
    state
        .transaction_version(table.log_store().as_ref(), app_id(gateway))
        .await
        .map_err(|source| DeltaError::Watermark {
            table: url.to_string(),
            gateway: gateway.to_owned(),
            version: state.version(),
            source: Box::new(source),
        })
}

/// The `txn` action that moves `gateway`'s watermark to `last_seq`.
pub(super) fn action(gateway: &str, last_seq: i64) -> Transaction {
    Transaction::new_with_last_update(
        app_id(gateway),
        last_seq,
        Some(chrono::Utc::now().timestamp_millis()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_ids_carry_the_gateway_id() {
        assert_eq!(app_id("gw-line1"), "plantline-gateway-gw-line1");
        let txn = action("gw-line1", 42);
        assert_eq!(txn.app_id, "plantline-gateway-gw-line1");
        assert_eq!(txn.version, 42);
    }
}
