//! Metrics and health: a process-wide registry the agent counts into, and the HTTP endpoint
//! that serves it as Prometheus text (`/metrics`) and a readiness answer (`/health`).

mod registry;
mod server;

pub use registry::{BATCHER_STALL, Health, Metrics, UPLOAD_BUCKETS, global};
pub use server::{MetricsError, serve, start};
