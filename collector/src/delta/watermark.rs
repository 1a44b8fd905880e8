//! Per-gateway watermarks, stored as Delta `txn` actions (app id + version), the way
//! kafka-delta-ingest stores Kafka offsets per partition. Every table the collector writes
//! (readings, gaps, quarantined rows) carries its own.
//!
//! The readings table also keeps each gateway's fresh range (batch contract v3's fresh lane):
//! two more `txn` actions, app ids `<gateway app id>/fresh_first` and `<gateway app id>/fresh_last`,
//! always written together. A gateway id never contains `/`, so they cannot clash with another
//! gateway's app id.

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

/// Suffixes of the app ids that carry a gateway's fresh range in the readings table.
const FRESH_FIRST_SUFFIX: &str = "/fresh_first";
const FRESH_LAST_SUFFIX: &str = "/fresh_last";

/// The Delta app id that carries the first `seq` of `gateway`'s fresh range.
pub fn fresh_first_app_id(gateway: &str) -> String {
    format!("{}{FRESH_FIRST_SUFFIX}", app_id(gateway))
}

/// The Delta app id that carries the last `seq` of `gateway`'s fresh range.
pub fn fresh_last_app_id(gateway: &str) -> String {
    format!("{}{FRESH_LAST_SUFFIX}", app_id(gateway))
}

/// The `seq`s `first..=last` of a gateway that its fresh lane put into the readings table. Every
/// row of the range above the watermark is in the table; the main lane skips them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreshRange {
    pub first: i64,
    pub last: i64,
}

impl FreshRange {
    /// Whether `seq` lies in the range.
    pub fn contains(&self, seq: i64) -> bool {
        (self.first..=self.last).contains(&seq)
    }

    /// Whether the main lane has not passed the range yet (`watermark < last`): only then does
    /// it hold rows the main lane must skip.
    pub fn is_live(&self, watermark: Option<i64>) -> bool {
        watermark.is_none_or(|w| w < self.last)
    }
}

/// What a table records about one gateway: its watermark and (readings table only) its fresh
/// range. A commit is built on one reading of these and must not land if they changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marks {
    pub watermark: Option<i64>,
    pub fresh: Option<FreshRange>,
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

/// The watermark of `gateway` and, with `with_fresh`, its fresh range, in the loaded snapshot
/// of `table`. A range with only one of its two ends recorded (never written so) counts as none.
pub(super) async fn read_marks(
    table: &DeltaTable,
    url: &Url,
    gateway: &str,
    with_fresh: bool,
) -> Result<Marks, DeltaError> {
    let watermark = read(table, url, gateway).await?;
    if !with_fresh {
        return Ok(Marks {
            watermark,
            fresh: None,
        });
    }
    let Some(state) = table.state.as_ref() else {
        return Ok(Marks::default());
    };
    let txn = |app: String| async move {
        state
            .transaction_version(table.log_store().as_ref(), app)
            .await
            .map_err(|source| DeltaError::Watermark {
                table: url.to_string(),
                gateway: gateway.to_owned(),
                version: state.version(),
                source: Box::new(source),
            })
    };
    let first = txn(fresh_first_app_id(gateway)).await?;
    let last = txn(fresh_last_app_id(gateway)).await?;
    let fresh = match (first, last) {
        (Some(first), Some(last)) if first <= last => Some(FreshRange { first, last }),
        _ => None,
    };
    Ok(Marks { watermark, fresh })
}

/// The two `txn` actions that record `gateway`'s fresh range as `range`.
pub(super) fn fresh_actions(gateway: &str, range: FreshRange) -> [Transaction; 2] {
    let now = Some(chrono::Utc::now().timestamp_millis());
    [
        Transaction::new_with_last_update(fresh_first_app_id(gateway), range.first, now),
        Transaction::new_with_last_update(fresh_last_app_id(gateway), range.last, now),
    ]
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

    #[test]
    fn the_fresh_range_has_app_ids_no_gateway_can_have() {
        assert_eq!(
            fresh_first_app_id("gw-line1"),
            "plantline-gateway-gw-line1/fresh_first"
        );
        let [first, last] = fresh_actions("gw-1", FreshRange { first: 5, last: 9 });
        assert_eq!(
            (first.app_id.as_str(), first.version),
            ("plantline-gateway-gw-1/fresh_first", 5)
        );
        assert_eq!(
            (last.app_id.as_str(), last.version),
            ("plantline-gateway-gw-1/fresh_last", 9)
        );
        // `/` is not allowed in a gateway id, so no gateway's app id equals these.
        assert!(edge_agent::contract::check_gateway_id("gw-1/fresh_first").is_err());
    }

    #[test]
    fn a_range_is_live_until_the_watermark_reaches_its_end() {
        let r = FreshRange {
            first: 50,
            last: 60,
        };
        assert!(r.is_live(None));
        assert!(r.is_live(Some(10)));
        assert!(r.is_live(Some(59)));
        assert!(!r.is_live(Some(60)));
        assert!(r.contains(50) && r.contains(60) && !r.contains(61));
    }
}
