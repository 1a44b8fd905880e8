//! Modbus: Modbus TCP devices, one polling task each ([`poller`]), and Modbus RTU buses (a
//! serial port, or RTU framing over TCP to a serial gateway), one task per bus that schedules
//! the slaves on it ([`bus`], on its [`line`]). Both read coils, discrete inputs, holding and
//! input registers with the same coalesced read plan ([`plan`]), decoding, transform and report
//! by exception ([`device`]). What a device teaches the plan (holes on exception 2, a request
//! size limit on exception 3, or the limit the sensor map gives) is kept across restarts in the
//! buffer file ([`memory`], [`crate::buffer::plan_memory`]) when the task is started with
//! [`run_device_with_memory`] or [`run_bus_with_memory`], as the agent does.

mod bus;
pub mod decode;
pub(crate) mod device;
mod error;
pub(crate) mod line;
mod memory;
pub mod plan;
mod poller;
pub mod transform;

pub use bus::{run_bus, run_bus_with_memory};
pub use device::{BACKOFF_CAP, BACKOFF_START, stagger_offset};
pub use error::PollError;
pub use poller::{run_device, run_device_with_memory};
