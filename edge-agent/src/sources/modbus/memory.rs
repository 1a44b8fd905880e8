//! Keeps a device's learned read plan across restarts, in the buffer file
//! ([`crate::buffer::plan_memory`]).
//!
//! # What always holds
//! - A device's plan is loaded once, before its first request, and only when it was learned for
//!   the same device name, link (address and unit id, or bus, line and unit id) and fingerprint
//!   ([`DeviceState::fingerprint`]); otherwise the device starts from the map's own plan.
//! - It is saved only after a tick that changed it, off the polling task (SQLite runs on the
//!   blocking pool), one save at a time and in order: a save waits for the one before it, so
//!   the row always ends up with the latest plan. Polling never waits for a save, except at
//!   the next change while the previous save still runs, and at shutdown, for at most
//!   [`SAVE_DEADLINE`].
//! - The memory is a cache: a buffer that cannot be read or written (a wrong path in a test, a
//!   full disk) is logged once and the device goes on with what it learns in memory.

use std::time::Duration;

use tokio::task::JoinHandle;

use super::device::{DeviceState, wall_clock_us};
use crate::buffer::plan_memory::{PlanKey, PlanMemory, Recalled};

/// How long shutdown waits for the last save.
pub(crate) const SAVE_DEADLINE: Duration = Duration::from_secs(5);

/// One device's plan memory.
pub(crate) struct PlanKeeper {
    memory: Option<PlanMemory>,
    key: PlanKey,
    saving: Option<JoinHandle<()>>,
}

impl PlanKeeper {
    /// The memory of the device `state` in `memory` (`None`: nothing is kept), reached over
    /// `link` (as text, see [`PlanKey::link`]).
    pub(crate) fn new(memory: Option<PlanMemory>, state: &DeviceState, link: String) -> Self {
        Self {
            memory,
            key: PlanKey {
                device: state.device.name.clone(),
                link,
                fingerprint: state.fingerprint(),
            },
            saving: None,
        }
    }

    /// Loads what the device learned in an earlier run into `state`. Call within the device's
    /// span.
    pub(crate) async fn recall(&mut self, state: &mut DeviceState) {
        let Some(memory) = self.memory.clone() else {
            return;
        };
        let key = self.key.clone();
        let loaded = tokio::task::spawn_blocking(move || memory.load(&key)).await;
        match loaded {
            Ok(Ok(Recalled::Plan(learned))) => {
                state.restore_learned(&learned);
                tracing::info!(
                    requests = state.planned_requests(),
                    holes = learned.isolated.len(),
                    cuts = learned.cuts.len(),
                    max_registers = learned.max_registers,
                    max_bits = learned.max_bits,
                    "read plan learned in an earlier run restored"
                );
            }
            Ok(Ok(Recalled::Nothing)) => {}
            Ok(Ok(Recalled::Discarded { reason })) => {
                tracing::info!(
                    "the read plan learned in an earlier run is not used, {reason}; learning afresh"
                );
            }
            Ok(Err(err)) => self.disable(&err),
            Err(err) => self.disable(&err),
        }
    }

    /// Saves the plan when the last tick changed it. Call within the device's span.
    pub(crate) async fn after_tick(&mut self, state: &mut DeviceState) {
        let Some(learned) = state.take_changed_plan() else {
            return;
        };
        let Some(memory) = self.memory.clone() else {
            return;
        };
        self.finish_save().await;
        let key = self.key.clone();
        let span = tracing::Span::current();
        self.saving = Some(tokio::task::spawn_blocking(move || {
            if let Err(err) = memory.save(&key, &learned, wall_clock_us()) {
                span.in_scope(|| {
                    tracing::warn!(error = %err, "cannot keep the learned read plan for the next start; it is learned again then");
                });
            }
        }));
    }

    /// Waits for a save in flight, at most [`SAVE_DEADLINE`].
    pub(crate) async fn finish_save(&mut self) {
        if let Some(saving) = self.saving.take() {
            let _ = tokio::time::timeout(SAVE_DEADLINE, saving).await;
        }
    }

    fn disable(&mut self, err: &dyn std::fmt::Display) {
        tracing::warn!(
            error = %err,
            "cannot read learned read plans from the buffer; this device's plan is kept in memory only"
        );
        self.memory = None;
    }
}
