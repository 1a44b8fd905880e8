//! Sources: the tasks that read devices and turn what they answer into [`Reading`]s.
//!
//! Polled sources (Modbus) send single readings: a reading they lose before the commit is simply
//! read again at the next poll. Sources whose peer must be told when a reading is safe (MQTT
//! acknowledges a message only once the buffer has it) send [`Delivery`]s instead.
//!
//! Every source runs as a unit of the [`Supervisor`], which starts them and, when the sensor
//! map is edited while the agent runs, restarts only the units whose config changed.

pub mod file_drop;
pub mod modbus;
pub mod mqtt;
pub mod supervisor;

pub use supervisor::{SourceContext, Supervisor, UnitKey};

use tokio::sync::oneshot;

use crate::Reading;

/// Readings that travel with a commit notification: the buffer writer fires `committed` after
/// the transaction holding all of `readings` committed, and drops it unfired when it could not
/// (the agent stopped first).
#[derive(Debug)]
pub struct Delivery {
    pub readings: Vec<Reading>,
    pub committed: oneshot::Sender<()>,
}
