//! Metrics, health and the status page: a process-wide registry the agent counts into, the live
//! picture of tags and devices, and the HTTP endpoint that serves them as Prometheus text
//! (`/metrics`), a readiness answer (`/health`) and a page for the plant engineer (`/status`).

mod live;
mod registry;
mod server;
mod status;

pub use live::{DeviceState, Live, LiveSnapshot, MapState, TagState, live};
pub use registry::{BATCHER_STALL, Health, Metrics, UPLOAD_BUCKETS, UploadSummary, global};
pub use server::{MetricsError, serve, serve_with_token, start};
