//! Modbus TCP: one polling task per device, reading coils, discrete inputs, holding and input
//! registers.

pub mod decode;
mod poller;
pub mod transform;

pub use poller::{BACKOFF_CAP, BACKOFF_START, PollError, run_device};
