//! The source side: the engine's control over a running [`Vmm`] and [`migrate`].

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ferry_migration::{
    Endpoint, Migration, MigrationStats, Observer, UnpopulatedSource, VmControl, VmControlError,
};

use super::{MigrateError, MigrateOptions};
use crate::bus::lock;
use crate::exit::ExitReason;
use crate::state_format;
use crate::vmm::Vmm;

/// The engine's control over a [`Vmm`], with the machine state in the [`state_format`]
/// envelope.
struct SealedControl(Arc<Vmm>);

impl VmControl for SealedControl {
    fn pause(&mut self) -> Result<(), VmControlError> {
        self.0
            .pause()
            .map_err(|e| VmControlError::new("pausing the VM", e))
    }

    fn resume(&mut self) -> Result<(), VmControlError> {
        self.0.resume();
        Ok(())
    }

    fn set_throttle(&mut self, percent: u8) {
        if percent > 0 {
            tracing::info!("throttling the guest's vCPUs to {}%", 100 - percent);
        }
        self.0.set_throttle(percent);
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmControlError> {
        let started = std::time::Instant::now();
        let state = self
            .0
            .save_state()
            .map_err(|e| VmControlError::new("saving the VM state", e))?;
        let saved = started.elapsed();
        crate::memory::debug_digest(&self.0.ram, "sent");
        let encoded = state_format::encode(&state)
            .map_err(|e| VmControlError::new("encoding the VM state", e))?;
        tracing::debug!(
            "state saved in {:.2} ms, encoded in {:.2} ms ({} bytes)",
            saved.as_secs_f64() * 1000.0,
            (started.elapsed() - saved).as_secs_f64() * 1000.0,
            encoded.len()
        );
        Ok(encoded)
    }
}

/// Migrates the running `vmm` to `to`. On success the VM is left paused (the destination
/// runs it now) and the caller should stop it; on failure it keeps running here.
pub fn migrate(
    vmm: &Arc<Vmm>,
    to: &Endpoint,
    options: &MigrateOptions,
    observer: &mut dyn Observer,
    cancel: Arc<AtomicBool>,
) -> Result<MigrationStats, MigrateError> {
    let mut config = options.engine_config(cancel)?;
    config.description = crate::description::VmDescription::of(&vmm.config).encode();
    let tls = options.tls()?;
    let connections =
        ferry_migration::connect(to, options.connections, tls.as_ref()).map_err(|source| {
            MigrateError::Connect {
                endpoint: to.to_string(),
                source,
            }
        })?;
    let mut dirty_log = vmm.dirty_log();
    if !options.lazy_dirty_log {
        dirty_log = dirty_log.eager();
    }
    let mut control = SealedControl(vmm.clone());
    let (mut hint, mut report) = match vmm.balloon_device() {
        Some(b) => {
            let b = lock(b);
            (Some(b.hint_source()), Some(b.report_source()))
        }
        None => (None, None),
    };
    let mut unpopulated = UnpopulatedSource::new(vmm.memory());
    let mut engine = Migration::new(vmm.memory(), &mut dirty_log, &mut control, observer, config)?;
    if let Some(s) = hint.as_mut().filter(|_| options.free_page_hint) {
        engine.add_source(s);
    }
    if let Some(s) = report.as_mut() {
        engine.add_source(s);
    }
    engine.add_source(&mut unpopulated);
    tracing::info!(
        "migrating to {to} (hints {}, {} connection(s))",
        if options.hints { "on" } else { "off" },
        options.connections
    );
    engine
        .run(connections)
        .map_err(|source| stopped_or_engine(vmm.exit_reason(), source))
}

/// The error of a failed migration: the engine's, unless the guest stopped meanwhile (a vCPU
/// that triple-faults takes the VM down and fails the migration with it), which the operator
/// must not read as "the VM keeps running here".
fn stopped_or_engine(
    stopped: Option<ExitReason>,
    source: ferry_migration::MigrationError,
) -> MigrateError {
    match stopped {
        Some(reason) => MigrateError::GuestStopped { reason, source },
        None => MigrateError::Engine(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_that_stopped_during_the_migration_is_not_said_to_keep_running() {
        let engine = || ferry_migration::MigrationError::Config("vCPU 0 has exited".into());
        let e = stopped_or_engine(None, engine()).to_string();
        assert!(e.contains("keeps running here"), "{e}");
        let e = stopped_or_engine(Some(ExitReason::GuestReset), engine());
        assert!(!e.outcome_unknown());
        let e = e.to_string();
        assert!(!e.contains("keeps running"), "{e}");
        assert!(
            e.contains("GuestReset") && e.contains("runs neither here"),
            "{e}"
        );
        assert!(e.contains("vCPU 0 has exited"), "{e}");
    }
}
