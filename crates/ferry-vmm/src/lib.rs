//! # ferry-vmm
//!
//! A minimal KVM micro-VMM that boots a stock Debian kernel with ACPI-described virtio-mmio
//! devices (the ferry balloon), an 8250 console and a JSON control API. It is the VM ferry
//! migrates: it exposes pause/resume, state save, and a dirty log for the migration engine.
//!
//! Entry point: [`run`] (blocking) with a [`VmConfig`], built from [`RunArgs`] by the CLI.
//! Layout of the crate: [`config`] (validation), [`layout`] (memory map), [`boot`] (bzImage,
//! zero page), [`acpi`], [`memory`] (RAM, slots, dirty log), [`kvm`] (VM, vCPUs, CPUID,
//! registers, state), [`bus`], [`serial`], [`devices`], [`vmm`] (the machine), [`api`].
//! `unsafe` lives only in [`memory`] and [`kvm`].
#![deny(missing_docs)]

pub mod acpi;
pub mod api;
pub mod api_schema;
pub mod boot;
pub mod builder;
pub mod bus;
pub mod config;
pub mod console;
pub mod devices;
mod exit;
pub mod gate;
pub mod kvm;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod receive;
pub mod serial;
pub mod state_format;
pub mod status;
pub mod units;
pub mod vmm;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

pub use api::{ApiClient, ApiError, ErrorCode, Refusal, Request};
pub use builder::IncomingVm;
pub use config::{BalloonConfig, ConfigError, RunArgs, SerialTarget, VmConfig};
pub use exit::ExitReason;
pub use vmm::{MachineState, Status, Vmm, VmmError as Error};

/// Boots `config` and blocks until the VM stops; serves the control API meanwhile.
pub fn run(config: VmConfig) -> Result<ExitReason, Error> {
    let api_socket = config.api_socket.clone();
    let vmm = Vmm::boot(config)?;
    let mut server = None;
    if let Some(path) = &api_socket {
        let handler = Arc::new(ApiVmm(vmm.clone(), migration::Supervisor::default()));
        match api::serve(path, handler) {
            Ok(s) => server = Some(s),
            Err(e) => {
                vmm.request_exit(ExitReason::Shutdown);
                vmm.stop();
                return Err(Error::Api(e));
            }
        }
    }
    let reason = vmm.wait_exit();
    tracing::info!("VM stopped: {reason:?}");
    vmm.stop();
    finish_replies(server.as_ref());
    if let Some(path) = &api_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(reason)
}

/// Longest a stopping VMM waits for the API replies it still owes.
const API_DRAIN: Duration = Duration::from_secs(10);

/// Lets the API finish the replies it owes before the process exits (the statistics of the
/// migration that moved the guest away, the answer to `shutdown`): a client must not read
/// end-of-file instead of its answer.
pub(crate) fn finish_replies(server: Option<&api::ApiServer>) {
    if let Some(s) = server {
        if !s.wait_idle(API_DRAIN) {
            tracing::warn!("exiting with an API request still unanswered after {API_DRAIN:?}");
        }
    }
}

/// The VMM as the API sees it, with its migration (if any).
struct ApiVmm(Arc<Vmm>, migration::Supervisor);

fn json<T: Serialize>(v: T) -> Result<Value, Refusal> {
    serde_json::to_value(v).map_err(Refusal::internal)
}

impl api::ApiHandler for ApiVmm {
    fn handle(&self, request: Request) -> Result<Value, Refusal> {
        let vmm = &self.0;
        use migration::StateChange;
        let migration = &self.1;
        match request {
            Request::Status => Ok(migration.annotate(json(vmm.status())?)),
            // Run-state and memory changes are refused while a migration owns the VM.
            Request::Pause => migration.unless_migrating(StateChange::Pause, || {
                vmm.pause().map(|()| Value::Null).map_err(Refusal::from)
            }),
            Request::Resume => migration.unless_migrating(StateChange::Resume, || {
                vmm.resume();
                Ok(Value::Null)
            }),
            Request::BalloonSet { target_bytes } => {
                migration.unless_migrating(StateChange::BalloonSet, || {
                    vmm.balloon_set_target(target_bytes)
                        .map(|()| Value::Null)
                        .map_err(Refusal::from)
                })
            }
            Request::BalloonGet => json(vmm.balloon_info()?),
            Request::BalloonStats => json(vmm.balloon_stats()?),
            Request::Shutdown => {
                vmm.request_exit(ExitReason::Shutdown);
                Ok(Value::Null)
            }
            Request::Migrate { to, options } => migration.handle(vmm, &to, options),
            Request::MigrateCancel => migration.cancel().map(|()| Value::Null),
            Request::Vcpus => {
                migration.unless_migrating(StateChange::Vcpus, || json(vmm.vcpu_reports()?))
            }
        }
    }
}
