//! The edge agent: reads PLCs and sensors, buffers every reading durably in SQLite, cuts batches
//! into Parquet and uploads them to S3 (or a local folder).
//!
//! With the default `runtime` feature off, only [`contract`], [`duration`] and the tag catalog's
//! wire format ([`tag_catalog::format`]) are compiled: that is what the collector imports.

pub mod contract;
pub mod duration;
pub mod exposition;
#[cfg(feature = "cli")]
pub mod process;

#[cfg(feature = "runtime")]
mod agent;

#[cfg(feature = "runtime")]
pub mod batch;
#[cfg(feature = "runtime")]
pub mod buffer;
#[cfg(feature = "runtime")]
pub mod config;
#[cfg(feature = "runtime")]
pub mod memory;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
mod reading;
#[cfg(feature = "runtime")]
pub mod sd_notify;
// Unit tests use it too: the dev-dependency on tokio-modbus turns on its server there.
#[cfg(any(feature = "simulator", all(test, feature = "runtime")))]
pub mod simulator;
#[cfg(feature = "runtime")]
pub mod sinks;
#[cfg(feature = "runtime")]
pub mod sources;
pub mod tag_catalog;
#[cfg(feature = "runtime")]
pub mod tools;

#[cfg(feature = "runtime")]
pub use agent::{AgentError, ReloadOptions, run, run_with_reload};
#[cfg(feature = "runtime")]
pub use reading::Reading;

/// Milliseconds of a duration for log fields, saturating instead of truncating.
#[cfg(feature = "runtime")]
fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
