//! Modbus TCP: one polling task per device, reading holding and input registers.

pub mod decode;
mod poller;

pub use poller::{BACKOFF_CAP, BACKOFF_START, PollError, run_device};
