//! The destination side: [`receive`] one migration into an empty VM and run it, serving the
//! VM's control API. A module of its own, above the migration glue and the control API's
//! handler it brings together (neither imports the other through it).

use std::path::PathBuf;
use std::sync::Arc;

use ferry_migration::{Destination, Endpoint, Listener, ReceiveConfig, ReceiveStats};

use crate::api;
use crate::builder::IncomingVm;
use crate::config::{check_socket_free, VmConfig};
use crate::exit::ExitReason;
use crate::migration::{MigrateError, Supervisor};
use crate::state_format;

/// What [`receive`] tells its caller along the way.
pub trait ReceiveObserver {
    /// Listening; the source may connect to `endpoint` now.
    fn listening(&mut self, endpoint: &Endpoint);
    /// The guest was restored, the source acknowledged, and the guest runs here.
    fn running(&mut self, stats: &ReceiveStats, state_bytes: usize);
}

/// Removes the API socket when dropped.
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Runs a migration destination: an empty VM for `config` waits on `listen` for one
/// migration, restores it, resumes the guest and runs it (serving `config.api_socket`) until
/// it stops. With `tls`, only a source with a certificate from its CA gets through (others
/// are logged and the wait goes on). On any failure before the guest resumed, everything is
/// discarded and an error returned; the source then keeps its VM.
pub fn receive(
    config: VmConfig,
    listen: &Endpoint,
    tls: Option<ferry_migration::Tls>,
    observer: &mut dyn ReceiveObserver,
) -> Result<ExitReason, MigrateError> {
    if let Some(path) = &config.api_socket {
        check_socket_free(path)?;
    }
    let api_socket = config.api_socket.clone();
    let incoming = IncomingVm::new(config).map_err(|source| MigrateError::Vm {
        what: "cannot create the destination VM",
        source,
    })?;
    let mut listener = Listener::bind(listen).map_err(|source| MigrateError::Listen {
        endpoint: listen.to_string(),
        source,
    })?;
    if let Some(tls) = tls {
        listener = listener.with_tls(tls);
    }
    let local = listener
        .local_endpoint()
        .map_err(|source| MigrateError::Listen {
            endpoint: listen.to_string(),
            source,
        })?;
    observer.listening(&local);
    let received =
        Destination::new(incoming.memory(), ReceiveConfig::default())?.accept(&listener)?;
    drop(listener);
    let state = match state_format::decode(&received.device_state) {
        Ok(s) => s,
        Err(e) => {
            received.reject(&format!("the destination refused the machine state: {e}"));
            return Err(e.into());
        }
    };
    // Before and after the restore: a difference between the two is a write to guest RAM
    // by the restore itself.
    crate::memory::debug_digest(incoming.ram(), "received-before-restore");
    let vmm = match incoming.restore(&state) {
        Ok(vmm) => vmm,
        Err(source) => {
            received.reject(&format!("the destination cannot restore the VM: {source}"));
            return Err(MigrateError::Vm {
                what: "cannot restore the VM",
                source,
            });
        }
    };
    crate::memory::debug_digest(&vmm.ram, "received");
    // From here on a failure must stop the restored (still paused) VM before returning.
    let discard = |e: MigrateError| {
        vmm.request_exit(ExitReason::Shutdown);
        vmm.stop();
        e
    };
    let socket = SocketFile(api_socket.clone());
    let mut server = None;
    if let Some(path) = &api_socket {
        let handler = Arc::new(crate::serve::ApiVmm(vmm.clone(), Supervisor::default()));
        match api::serve(path, handler) {
            Ok(s) => server = Some(s),
            Err(e) => {
                received.reject(&format!("the destination cannot serve its API: {e}"));
                return Err(discard(e.into()));
            }
        }
    }
    let stats = received.stats.clone();
    let state_bytes = received.device_state.len();
    received
        .acknowledge()
        .map_err(|e| discard(MigrateError::Acknowledge(e)))?;
    vmm.resume();
    tracing::info!(
        "migration received ({} pages, {} zero, {} rounds); the guest runs here",
        stats.pages,
        stats.zero_pages,
        stats.rounds
    );
    observer.running(&stats, state_bytes);
    let reason = vmm.wait_exit();
    tracing::info!("VM stopped: {reason:?}");
    vmm.stop();
    crate::serve::finish_replies(server.as_ref());
    drop(socket);
    Ok(reason)
}
