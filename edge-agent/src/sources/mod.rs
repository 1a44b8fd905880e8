//! Sources: the tasks that read devices and turn what they answer into [`Reading`]s.

pub mod modbus;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Reading;
use crate::config::AgentConfig;

/// Starts one task per configured device on `tracker`. Every task stops when `shutdown` is
/// cancelled (each gets a child token, so one source can later be stopped on its own) or when
/// the receiving end of `tx` is dropped.
pub fn spawn_all(
    config: &AgentConfig,
    tx: &mpsc::Sender<Reading>,
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
}
