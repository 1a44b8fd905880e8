//! Modbus: Modbus TCP devices, one polling task each ([`poller`]), and Modbus RTU buses (a
//! serial port, or RTU framing over TCP to a serial gateway), one task per bus that schedules
//! the slaves on it ([`bus`]). Both read coils, discrete inputs, holding and input registers
//! with the same coalesced read plan, decoding, transform and report by exception
//! ([`device`]).

mod bus;
pub mod decode;
mod device;
mod error;
mod line;
pub mod plan;
mod poller;
pub mod transform;

pub use bus::run_bus;
pub use device::{BACKOFF_CAP, BACKOFF_START, stagger_offset};
pub use error::PollError;
pub use poller::run_device;
