//! The machine: builds a VM from a [`VmConfig`], boots it, and offers the controls the API
//! and the migration engine need (pause, resume, balloon, state, dirty log, shutdown).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_balloon::{Balloon, BalloonState, BalloonStats};
use ferry_migration::RegionDesc;
use serde::{Deserialize, Serialize};

use crate::bus::{lock, BusError};
use crate::config::{ConfigError, VmConfig};
use crate::exit::ExitReason;
use crate::gate::Gate;
use crate::kvm::state::{StateError, VcpuState, VmState};
use crate::kvm::vcpu::{VcpuControl, VcpuError, Vcpus};
use crate::kvm::vm::{KvmVm, VmError};
use crate::memory::{GuestMemory, GuestRam, KvmDirtyLog, MemoryError};
use crate::serial::{SerialConsole, SerialError, SerialSnapshot};
pub use crate::status::{BalloonInfo, RunState, Status, VcpuReport};
use crate::{acpi, boot};

/// Version of [`MachineState`]'s layout.
pub const MACHINE_STATE_VERSION: u32 = 1;
/// Balloon page size (virtio-balloon counts 4 KiB pages).
use ferry_balloon::memory::BALLOON_PAGE_SIZE as BALLOON_PAGE_BYTES;

/// Everything that can go wrong building or controlling the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM VM creation or setup failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the kernel failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The console failed.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// vCPU control failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Device placement failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Saving KVM state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The VM has no balloon device.
    #[error("the VM has no balloon device (start it with --balloon)")]
    NoBalloon,
    /// The control API failed.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// A saved state that does not fit this VM.
    #[error("the saved VM state does not fit this VM: {0}")]
    Incompatible(String),
    /// A device state that cannot be restored.
    #[error("cannot restore the balloon: {0}")]
    BalloonState(#[from] ferry_balloon::StateError),
    /// The operation needs a running VM.
    #[error("the VM is paused: resume it first")]
    Paused,
    /// A balloon target larger than guest RAM.
    #[error("balloon target of {0} bytes exceeds guest RAM")]
    BalloonTarget(u64),
}

impl VmmError {
    /// The control API's code for this error.
    pub fn code(&self) -> crate::api::ErrorCode {
        use crate::api::ErrorCode;
        match self {
            VmmError::NoBalloon => ErrorCode::NoBalloon,
            VmmError::Paused => ErrorCode::VmPaused,
            VmmError::BalloonTarget(_) => ErrorCode::InvalidArgument,
            _ => ErrorCode::Internal,
        }
    }
}

impl From<VmmError> for crate::api::Refusal {
    fn from(e: VmmError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

/// Everything needed to recreate the VM elsewhere, except guest RAM (sent by the engine).
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// [`MACHINE_STATE_VERSION`].
    pub version: u32,
    /// RAM regions.
    pub memory: Vec<RegionDesc>,
    /// Per-vCPU state, in vCPU order.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// COM1.
    pub serial: SerialSnapshot,
    /// The balloon, if any.
    pub balloon: Option<BalloonState>,
}

/// A running (or paused) VM. Built by [`Vmm::boot`] or [`crate::IncomingVm::restore`].
pub struct Vmm {
    /// First, so that dropping a `Vmm` stops the vCPU threads before the VM fd and RAM go.
    pub(crate) vcpus: Mutex<Vcpus>,
    pub(crate) config: VmConfig,
    /// Before `ram`: the VM fd closes before its memory is unmapped.
    pub(crate) kvm: KvmVm,
    pub(crate) ram: GuestRam,
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) gate: Arc<Gate>,
    pub(crate) serial: Arc<Mutex<SerialConsole>>,
    pub(crate) balloon: Option<Arc<Mutex<Balloon>>>,
    /// The balloon's [`Balloon::pause_request`], reachable without its lock.
    pub(crate) balloon_pause: Option<Arc<AtomicBool>>,
    pub(crate) started: Instant,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm").field("config", &self.config).finish()
    }
}

impl Vmm {
    /// Stops the guest and every device thread; idempotent.
    pub fn pause(&self) -> Result<(), VmmError> {
        self.gate.close();
        // First, so that a vCPU thread handling a balloon notification stops between two
        // chains instead of doing all the work the guest queued before it can park.
        self.request_balloon_pause(true);
        let vcpus = lock(&self.vcpus);
        if let Err(e) = vcpus.pause() {
            vcpus.resume();
            self.gate.open();
            self.request_balloon_pause(false);
            if let Some(b) = &self.balloon {
                // Takes up the chains left on the ring for the pause that did not happen.
                let mut b = lock(b);
                b.pause();
                b.resume();
            }
            return Err(e.into());
        }
        if let Some(b) = &self.balloon {
            lock(b).pause();
        }
        self.request_balloon_pause(false);
        Ok(())
    }

    fn request_balloon_pause(&self, on: bool) {
        if let Some(flag) = &self.balloon_pause {
            flag.store(on, Ordering::Release);
        }
    }

    /// Lets the guest run again; idempotent. Devices raise what a restore left pending
    /// first: by now the interrupt controller state is in place.
    pub fn resume(&self) {
        lock(&self.serial).resume();
        if let Some(b) = &self.balloon {
            lock(b).resume();
        }
        lock(&self.vcpus).resume();
        self.gate.open();
    }

    /// Auto-converge: limits the vCPUs to `100 - percent`% of the time; 0 lifts it.
    pub fn set_throttle(&self, percent: u8) {
        lock(&self.vcpus).set_throttle(percent);
    }

    /// Current status.
    pub fn status(&self) -> Status {
        Status {
            state: if self.control.is_paused() {
                RunState::Paused
            } else {
                RunState::Running
            },
            vcpus: self.config.vcpus,
            memory_bytes: self.config.memory_bytes,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            throttle_percent: self.control.throttle(),
            balloon: self.balloon_info().ok(),
        }
    }

    fn balloon(&self) -> Result<&Arc<Mutex<Balloon>>, VmmError> {
        self.balloon.as_ref().ok_or(VmmError::NoBalloon)
    }

    /// The balloon's target and negotiated features.
    pub fn balloon_info(&self) -> Result<BalloonInfo, VmmError> {
        let b = lock(self.balloon()?);
        let acked = b.acked_features();
        Ok(BalloonInfo {
            target_bytes: u64::from(b.target()) * BALLOON_PAGE_BYTES,
            actual_bytes: u64::from(b.actual()) * BALLOON_PAGE_BYTES,
            acked_features: acked,
            free_page_hint: acked & ferry_balloon::features::F_FREE_PAGE_HINT != 0,
            page_reporting: acked & ferry_balloon::features::F_PAGE_REPORTING != 0,
        })
    }

    /// Asks the guest to give up `bytes` of RAM (rounded down to pages). Refused while the VM
    /// is paused.
    pub fn balloon_set_target(&self, bytes: u64) -> Result<(), VmmError> {
        if bytes > self.config.memory_bytes {
            return Err(VmmError::BalloonTarget(bytes));
        }
        let pages = u32::try_from(bytes / BALLOON_PAGE_BYTES)
            .map_err(|_| VmmError::BalloonTarget(bytes))?;
        // A paused VM's device state may be being saved: changing it now (and raising an
        // interrupt into the paused guest) could be lost or half-captured.
        if self.control.is_paused() {
            return Err(VmmError::Paused);
        }
        lock(self.balloon()?).set_target(pages);
        Ok(())
    }

    /// The last statistics the guest sent, after asking it for fresh ones.
    pub fn balloon_stats(&self) -> Result<Option<BalloonStats>, VmmError> {
        let mut b = lock(self.balloon()?);
        let last = b.stats().cloned();
        b.request_stats();
        Ok(last)
    }

    /// The balloon device, for registering its hint sources with the migration engine.
    pub fn balloon_device(&self) -> Option<&Arc<Mutex<Balloon>>> {
        self.balloon.as_ref()
    }

    /// Saves the machine state; the VM must be paused.
    pub fn save_state(&self) -> Result<MachineState, VmmError> {
        let vcpus = lock(&self.vcpus).save_state()?;
        let vm = VmState::save(self.kvm.fd())?;
        Ok(MachineState {
            version: MACHINE_STATE_VERSION,
            memory: self.ram.layout().regions().to_vec(),
            vcpus,
            vm,
            serial: lock(&self.serial).snapshot(),
            balloon: self.balloon.as_ref().map(|b| lock(b).save()),
        })
    }

    /// One line per vCPU on what it is doing ([`VcpuState::describe`]), for diagnosing a
    /// guest that stopped answering. Pauses the VM for the read and resumes it if it ran.
    pub fn describe_vcpus(&self) -> Result<Vec<String>, VmmError> {
        Ok(self
            .save_vcpus_for_diagnosis()?
            .iter()
            .map(VcpuState::describe)
            .collect())
    }

    /// One [`VcpuReport`] per vCPU, for the `vcpus` request. Pauses the vCPUs for the read
    /// and resumes them if they ran.
    pub fn vcpu_reports(&self) -> Result<Vec<VcpuReport>, VmmError> {
        let ram = self.ram.layout().regions().to_vec();
        Ok(self
            .save_vcpus_for_diagnosis()?
            .iter()
            .map(|v| VcpuReport {
                id: v.id,
                state: v.describe(),
                page_tables_outside_ram: v.page_tables_outside(&ram),
            })
            .collect())
    }

    /// Every vCPU's state, read for diagnosis: pauses the vCPUs for the read (not the
    /// devices) and resumes them if they ran.
    pub fn save_vcpus_for_diagnosis(&self) -> Result<Vec<VcpuState>, VmmError> {
        let vcpus = lock(&self.vcpus);
        let was_running = !self.control.is_paused();
        vcpus.pause()?;
        let states = vcpus.save_state();
        if was_running {
            vcpus.resume();
        }
        Ok(states?)
    }

    /// A dirty log over guest RAM (KVM's log OR device writes), for the migration engine.
    pub fn dirty_log(&self) -> KvmDirtyLog {
        KvmDirtyLog::new(self.kvm.fd().clone(), self.ram.clone())
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        self.ram.memory()
    }

    /// Asks the VM to stop; [`Vmm::wait_exit`] returns `reason`.
    pub fn request_exit(&self, reason: ExitReason) {
        self.control.request_exit(reason);
    }

    /// Why the VM stopped, if something asked it to (the guest, a vCPU error or the API).
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.control.exit_reason()
    }

    /// Blocks until the guest or the API stops the VM.
    pub fn wait_exit(&self) -> ExitReason {
        self.control.wait_exit()
    }

    /// Stops every vCPU thread (after [`Vmm::wait_exit`]).
    pub fn stop(&self) {
        self.gate.open();
        lock(&self.vcpus).stop();
    }
}
