//! Modbus TCP: one polling task per device, reading coils, discrete inputs, holding and input
//! registers with coalesced requests.

pub mod decode;
pub mod plan;
mod poller;
pub mod transform;

pub use poller::{BACKOFF_CAP, BACKOFF_START, PollError, run_device, stagger_offset};
