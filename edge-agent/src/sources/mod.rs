//! Sources: the tasks that read devices and turn what they answer into [`Reading`]s.
//!
//! Polled sources (Modbus) send single readings: a reading they lose before the commit is simply
//! read again at the next poll. Sources whose peer must be told when a reading is safe (MQTT
//! acknowledges a message only once the buffer has it) send [`Delivery`]s instead.

pub mod file_drop;
pub mod modbus;
pub mod mqtt;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Reading;
use crate::config::AgentConfig;

/// Readings that travel with a commit notification: the buffer writer fires `committed` after
/// the transaction holding all of `readings` committed, and drops it unfired when it could not
/// (the agent stopped first).
#[derive(Debug)]
pub struct Delivery {
    pub readings: Vec<Reading>,
    pub committed: oneshot::Sender<()>,
}

/// Starts one task per configured device and broker on `tracker`. Every task stops when
/// `shutdown` is cancelled (each gets a child token, so one source can later be stopped on its
/// own) or when the receiving end of its channel is dropped.
pub fn spawn_all(
    config: &AgentConfig,
    tx: &mpsc::Sender<Reading>,
    deliveries: &mpsc::Sender<Delivery>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    for device in &config.modbus {
        tracker.spawn(modbus::run_device(
            device.clone(),
            tx.clone(),
            shutdown.child_token(),
        ));
    }
    for broker in &config.mqtt {
        tracker.spawn(mqtt::run_broker(
            broker.clone(),
            deliveries.clone(),
            shutdown.child_token(),
        ));
    }
    for drop in &config.file_drop {
        tracker.spawn(file_drop::run_file_drop(
            drop.clone(),
            config.buffer.path.clone(),
            deliveries.clone(),
            shutdown.child_token(),
        ));
    }
}
