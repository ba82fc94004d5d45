//! A VM at work: [`run`] boots one and serves its control API until it stops; the destination
//! of a migration ([`crate::receive`]) serves a restored one the same way.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::api::{self, Refusal, Request};
use crate::config::VmConfig;
use crate::exit::ExitReason;
use crate::migration;
use crate::vmm::{Vmm, VmmError as Error};

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
pub(crate) struct ApiVmm(pub(crate) Arc<Vmm>, pub(crate) migration::Supervisor);

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
