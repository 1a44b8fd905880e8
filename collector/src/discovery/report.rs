//! Folding the per-gateway reports of several receives (SQS mode) into one pass report.

use crate::ingest::{GatewayReport, IngestReport};

/// Adds `gw` to the gateway's entry in `report` (a new entry the first time): counts add up,
/// lists grow, the watermark, version and error are the latest.
pub(crate) fn merge_gateway(report: &mut IngestReport, gw: GatewayReport) {
    let Some(into) = report.gateways.iter_mut().find(|g| g.gateway == gw.gateway) else {
        report.gateways.push(gw);
        return;
    };
    into.files_applied += gw.files_applied;
    into.rows_applied += gw.rows_applied;
    into.rows_skipped += gw.rows_skipped;
    into.rows_quarantined += gw.rows_quarantined;
    into.rows_flagged += gw.rows_flagged;
    into.fresh_files_applied += gw.fresh_files_applied;
    into.fresh_rows_applied += gw.fresh_rows_applied;
    // What waits is what the latest pass of the gateway left.
    into.fresh_deferred = gw.fresh_deferred;
    if gw.fresh_range.is_some() {
        into.fresh_range = gw.fresh_range;
    }
    into.commits += gw.commits;
    for (rule, counts) in &gw.rules {
        into.rules.entry(rule.clone()).or_default().add(counts);
    }
    into.gaps.extend(gw.gaps);
    into.quarantined.extend(gw.quarantined);
    into.in_flight = gw.in_flight;
    if gw.watermark.is_some() {
        into.watermark = gw.watermark;
    }
    if gw.delta_version.is_some() {
        into.delta_version = gw.delta_version;
    }
    into.error = gw.error;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_seen_twice_adds_up() {
        let mut report = IngestReport::default();
        let gw = |files, watermark, error: Option<&str>| GatewayReport {
            gateway: "gw-1".into(),
            files_applied: files,
            rows_applied: files * 10,
            watermark,
            error: error.map(str::to_owned),
            ..GatewayReport::default()
        };
        merge_gateway(&mut report, gw(2, Some(20), Some("store down")));
        merge_gateway(&mut report, gw(1, Some(30), None));
        merge_gateway(&mut report, gw(0, None, None));
        assert_eq!(report.gateways.len(), 1);
        let g = &report.gateways[0];
        assert_eq!((g.files_applied, g.rows_applied), (3, 30));
        assert_eq!((g.watermark, g.error.as_deref()), (Some(30), None));
    }
}
