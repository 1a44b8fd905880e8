//! List mode restricted to one shard: the gateways of the raw zone whose shard is this
//! instance's, each applied by the same per-gateway pass as an unsharded pass.

use tracing::{Instrument as _, error, info_span, warn};

use super::shard::Shard;
use crate::delta::Tables;
use crate::ingest::{GatewayReport, IngestError, IngestOptions, IngestReport, ingest_gateway};
use crate::raw_zone::RawZone;

/// Applies the pending batches of the gateways `shard` owns. A failing gateway is recorded in
/// its report and does not stop the others; only failing to list the raw zone is an error.
pub(crate) async fn ingest_shard(
    raw: &RawZone,
    tables: &mut Tables,
    options: &IngestOptions,
    shard: Shard,
) -> Result<IngestReport, IngestError> {
    let listing = raw
        .list_gateways()
        .await
        .map_err(IngestError::ListGateways)?;
    for folder in &listing.foreign {
        warn!(component = "ingest", folder = %folder, "folder in the raw zone is not a gateway folder; left alone");
    }
    let mut report = IngestReport {
        gateways: Vec::new(),
        foreign_folders: listing.foreign,
    };
    for gateway in listing.gateways.into_iter().filter(|g| shard.owns(g)) {
        let gw = match ingest_gateway(raw, tables, &gateway, options)
            .instrument(info_span!("shard", component = "discovery", shard = %shard))
            .await
        {
            Ok(gw) => gw,
            Err(e) => {
                error!(component = "ingest", gateway = %gateway, error = %e, "gateway pass ended early; retried next pass");
                GatewayReport {
                    gateway,
                    error: Some(e.to_string()),
                    ..GatewayReport::default()
                }
            }
        };
        report.gateways.push(gw);
    }
    Ok(report)
}
