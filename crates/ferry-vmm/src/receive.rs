//! The destination side: [`receive`] one migration into an empty VM and run it, serving the
//! VM's control API. A module of its own, above the migration glue and the control API's
//! handler it brings together (neither imports the other through it).

use std::path::PathBuf;
use std::sync::Arc;

use ferry_migration::{Destination, Endpoint, Incoming, Listener, ReceiveConfig, ReceiveStats};

use crate::api;
use crate::builder::IncomingVm;
use crate::config::{check_kvm, check_socket_free, SerialTarget, VmConfig};
use crate::description::{ReceiveSettings, VmDescription};
use crate::exit::ExitReason;
use crate::migration::{MigrateError, Supervisor};
use crate::state_format;
use crate::steps::Steps;

/// What [`receive`] tells its caller along the way.
pub trait ReceiveObserver {
    /// Listening; the source may connect to `endpoint` now.
    fn listening(&mut self, endpoint: &Endpoint);
    /// A source arrived and its VM, built here as `config`, is accepted; its memory follows.
    fn arriving(&mut self, config: &VmConfig) {
        let _ = config;
    }
    /// The guest was restored, the source acknowledged, and the guest runs here.
    fn running(&mut self, stats: &ReceiveStats, state_bytes: usize);
}

/// Removes a socket file when dropped.
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Answers the destination's API until the VM runs here.
struct Arriving;

impl api::ApiHandler for Arriving {
    fn handle(&self, _: api::Request) -> Result<serde_json::Value, api::Refusal> {
        Err(api::Refusal::new(
            api::ErrorCode::MigrationActive,
            "no VM runs here yet: this destination waits for a migration, or receives one",
        ))
    }
}

/// Runs a migration destination: waits on `listen` for one migration, builds the empty VM
/// the source describes (checked against `settings`' limits and this host), receives and
/// restores it, resumes the guest and runs it (serving `settings.api_socket`) until it stops.
/// With `tls`, only a source with a certificate from its CA gets through (others are logged
/// and the wait goes on). On any failure before the guest resumed, the source is told why,
/// everything here is discarded and an error returned; the source then keeps its VM.
pub fn receive(
    settings: ReceiveSettings,
    listen: &Endpoint,
    tls: Option<ferry_migration::Tls>,
    observer: &mut dyn ReceiveObserver,
) -> Result<ExitReason, MigrateError> {
    // Everything that can be checked before a source arrives is, so that a destination
    // that could never take a VM says so at once instead of after a source connected.
    if let Some(path) = &settings.api_socket {
        check_socket_free(path)?;
    }
    if let SerialTarget::Socket(path) = &settings.serial {
        check_socket_free(path)?;
    }
    check_kvm(
        &settings.kvm_path,
        std::path::Path::new("/sys/module"),
        settings.allow_pvm,
    )
    .map_err(|e| MigrateError::Vm {
        what: "cannot create the destination VM",
        source: e.into(),
    })?;
    // The API socket is served from the start, refusing requests until the VM runs here:
    // an operator's client gets a sentence instead of a missing socket, and neither
    // binding it nor starting its thread is part of the downtime.
    let (server, socket) = match &settings.api_socket {
        Some(path) => {
            let server = api::serve(path, Arc::new(Arriving))?;
            (Some(server), SocketFile(Some(path.clone())))
        }
        None => (None, SocketFile(None)),
    };
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
    let receive_config = ReceiveConfig {
        write_through_file: crate::memory::GuestRam::prefers_file_writes(),
        accept_compression: settings.accept_compression,
        ..ReceiveConfig::default()
    };
    let arrived = Incoming::accept(&listener, &receive_config)?;
    drop(listener);
    let config = match VmDescription::decode(arrived.description())
        .and_then(|d| d.config(&settings, arrived.regions()))
    {
        Ok(config) => config,
        Err(e) => {
            arrived.refuse(&format!("the destination refuses the VM: {e}"));
            return Err(e.into());
        }
    };
    observer.arriving(&config);
    // The console's socket is bound with the VM (a client may connect while RAM streams
    // in) and goes when this VM does, received or not.
    let _serial_socket = SocketFile(match &config.serial {
        SerialTarget::Socket(path) => Some(path.clone()),
        _ => None,
    });
    let incoming = match IncomingVm::new(config) {
        Ok(vm) => vm,
        Err(source) => {
            arrived.refuse(&format!("the destination cannot create the VM: {source}"));
            return Err(MigrateError::Vm {
                what: "cannot create the destination VM",
                source,
            });
        }
    };
    let destination = match Destination::new(incoming.memory(), receive_config) {
        Ok(d) => d,
        Err(e) => {
            arrived.refuse(&format!(
                "the destination cannot receive into its memory: {e}"
            ));
            return Err(e.into());
        }
    };
    let received = destination.receive_incoming(arrived)?;
    // From the last record to the acknowledgement the guest is paused on both sides: time it.
    let mut steps = Steps::new();
    let state = match state_format::decode(&received.device_state) {
        Ok(s) => s,
        Err(e) => {
            received.reject(&format!("the destination refused the machine state: {e}"));
            return Err(e.into());
        }
    };
    steps.done("decode");
    // Before and after the restore: a difference between the two is a write to guest RAM
    // by the restore itself.
    crate::memory::debug_digest(incoming.ram(), "received-before-restore");
    let vmm = match incoming.restore(state) {
        Ok(vmm) => vmm,
        Err(source) => {
            received.reject(&format!("the destination cannot restore the VM: {source}"));
            return Err(MigrateError::Vm {
                what: "cannot restore the VM",
                source,
            });
        }
    };
    steps.done("restore");
    crate::memory::debug_digest(&vmm.ram, "received");
    // From here on a failure must stop the restored (still paused) VM before returning.
    let discard = |e: MigrateError| {
        vmm.request_exit(ExitReason::Shutdown);
        vmm.stop();
        e
    };
    // Before the acknowledgement: a client that hears from the source that the migration
    // is done finds the VM's API here.
    if let Some(server) = &server {
        let handler = Arc::new(crate::serve::ApiVmm(vmm.clone(), Supervisor::default()));
        server.set_handler(handler);
    }
    steps.done("api");
    let restore_ms = steps.total_ms();
    let stats = received.stats.clone();
    let state_bytes = received.device_state.len();
    received
        .acknowledge()
        .map_err(|e| discard(MigrateError::Acknowledge(e)))?;
    steps.done("acknowledge");
    vmm.resume();
    steps.done("resume");
    tracing::debug!("switchover steps here: {steps}");
    tracing::info!(
        "restored {state_bytes} bytes of machine state in {restore_ms:.1} ms, resumed {:.1} ms \
         after the last record",
        steps.total_ms()
    );
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
