//! Discovery: how a pass finds the batches to apply, and which gateways this instance owns.
//!
//! - `list` (the default): every gateway folder is listed each pass ([`crate::ingest`]);
//!   with `shard = "i/n"` only the gateways of shard `i` ([`shard`]).
//! - `sqs`: S3 event notifications from an SQS queue name the gateways to look at ([`sqs`]).
//!
//! Both feed the same per-gateway pass, so the delivery chain's invariants (seq order, the
//! `txn` watermark in the commit, quarantine rules) hold the same way in both modes.

pub mod config;
pub mod events;
mod list;
mod report;
pub mod shard;
pub mod sqs;

pub use config::{DiscoveryConfig, DiscoveryMode};
pub use shard::Shard;
pub use sqs::{SqsDiscovery, SqsError};

use crate::config::CollectorConfig;
use crate::delta::Tables;
use crate::ingest::{IngestError, IngestOptions, IngestReport, ingest_all};
use crate::raw_zone::RawZone;

/// Why discovery could not run a pass.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Sqs(#[from] SqsError),
    #[error("config: {0}")]
    Config(String),
}

/// The discovery of one pass, set up from `[discovery]`.
#[derive(Debug)]
pub enum Discovery {
    /// List the gateways' folders (of one shard, when set).
    List(Option<Shard>),
    /// Receive S3 notifications.
    Sqs(SqsDiscovery),
}

impl Discovery {
    /// Sets up what `[discovery]` asks for (an SQS client in SQS mode).
    pub async fn open(config: &CollectorConfig) -> Result<Self, DiscoveryError> {
        let d = &config.discovery;
        match d.mode {
            DiscoveryMode::List => Ok(Self::List(d.shard().map_err(DiscoveryError::Config)?)),
            DiscoveryMode::Sqs => {
                let raw = config.raw_location().map_err(DiscoveryError::Config)?;
                Ok(Self::Sqs(SqsDiscovery::connect(d, &config.s3, &raw).await?))
            }
        }
    }

    /// Applies what this discovery finds.
    pub async fn ingest(
        &self,
        raw: &RawZone,
        tables: &mut Tables,
        options: &IngestOptions,
    ) -> Result<IngestReport, DiscoveryError> {
        Ok(match self {
            Self::List(None) => ingest_all(raw, tables, options).await?,
            Self::List(Some(shard)) => list::ingest_shard(raw, tables, options, *shard).await?,
            Self::Sqs(sqs) => sqs.ingest(raw, tables, options).await?,
        })
    }
}
