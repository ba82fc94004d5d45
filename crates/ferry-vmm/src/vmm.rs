//! The machine: builds a VM from a [`VmConfig`], boots it, and offers the controls the API
//! and the migration engine need (pause, resume, balloon, state, dirty log, shutdown).
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_balloon::{Balloon, BalloonState, BalloonStats};
use ferry_migration::RegionDesc;
use serde::{Deserialize, Serialize};

use crate::bus::{lock, Bus, BusError, SharedDevice};
use crate::config::{check_kvm, ConfigError, VmConfig};
use crate::devices::{AcpiPm, IrqfdTrigger, I8042};
use crate::gate::Gate;
use crate::kvm::state::{saveable_msrs, StateError, VcpuState, VmState};
use crate::kvm::vcpu::{self, VcpuContext, VcpuControl, VcpuError, Vcpus};
use crate::kvm::vm::{configure_boot, KvmVm, VmError};
use crate::memory::{register_slots, GuestMemory, GuestRam, KvmDirtyLog, MemoryError};
use crate::serial::{self, SerialConsole, SerialError, SerialSnapshot};
use crate::{acpi, boot, layout, ExitReason};

/// Version of [`MachineState`]'s layout.
pub const MACHINE_STATE_VERSION: u32 = 1;
/// Balloon page size (virtio-balloon counts 4 KiB pages).
pub const BALLOON_PAGE_BYTES: u64 = 4096;

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
    /// A balloon target larger than guest RAM.
    #[error("balloon target of {0} bytes exceeds guest RAM")]
    BalloonTarget(u64),
}

/// Whether the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// vCPUs and devices are stopped.
    Paused,
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Running or paused.
    pub state: RunState,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Milliseconds since the VM was started.
    pub uptime_ms: u64,
    /// Balloon summary, if there is a balloon.
    pub balloon: Option<BalloonInfo>,
}

/// The balloon as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonInfo {
    /// Bytes the device asks the guest to give up.
    pub target_bytes: u64,
    /// Bytes the guest says it gave up.
    pub actual_bytes: u64,
    /// Features the driver acknowledged (virtio bits).
    pub acked_features: u64,
    /// Whether FREE_PAGE_HINT was negotiated.
    pub free_page_hint: bool,
    /// Whether PAGE_REPORTING was negotiated.
    pub page_reporting: bool,
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

/// A booted VM.
pub struct Vmm {
    config: VmConfig,
    kvm: KvmVm,
    ram: GuestRam,
    control: Arc<VcpuControl>,
    vcpus: Mutex<Vcpus>,
    gate: Arc<Gate>,
    serial: Arc<Mutex<SerialConsole>>,
    balloon: Option<Arc<Mutex<Balloon>>>,
    started: Instant,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm").field("config", &self.config).finish()
    }
}

fn balloon_config(c: &crate::config::BalloonConfig) -> ferry_balloon::BalloonConfig {
    ferry_balloon::BalloonConfig {
        stats_vq: c.stats,
        deflate_on_oom: c.deflate_on_oom,
        free_page_hint: c.free_page_hint,
        page_reporting: c.page_reporting,
        ..Default::default()
    }
}

impl Vmm {
    /// Validates `config`, builds the VM and starts its vCPUs.
    pub fn boot(config: VmConfig) -> Result<Arc<Self>, VmmError> {
        config.validate()?;
        let allow_pvm = std::env::var_os("FERRY_ALLOW_PVM").is_some_and(|v| v == "1");
        check_kvm(
            &config.kvm_path,
            std::path::Path::new("/sys/module"),
            allow_pvm,
        )?;
        let kvm = KvmVm::new(&config.kvm_path)?;
        let ram = GuestRam::new(&layout::ram_regions(config.memory_bytes))?;
        register_slots(kvm.fd(), &ram.slots(), false)?;
        let mem = ram.memory();

        let kernel = boot::load_kernel(mem, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(p) => Some(boot::load_initrd(mem, p, config.memory_bytes, &kernel)?),
            None => None,
        };
        let cmdline_len = boot::write_cmdline(mem, &config.cmdline, &kernel.header)?;
        crate::kvm::regs::write_boot_tables(mem).map_err(VmError::GuestWrite)?;

        let control = Arc::new(VcpuControl::default());
        let gate = Arc::new(Gate::new());
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let serial_irq = kvm.irqfd(layout::SERIAL_GSI)?;
        let (serial_out, serial_in) = serial::open(&config.serial)?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(serial_irq, serial_out)));
        pio.insert(
            u64::from(layout::COM1_PORT),
            8,
            serial.clone() as SharedDevice,
        )?;
        pio.insert(
            u64::from(I8042::BASE),
            I8042::LEN,
            Arc::new(Mutex::new(I8042::new(control.clone()))),
        )?;
        pio.insert(
            u64::from(AcpiPm::BASE),
            AcpiPm::LEN,
            Arc::new(Mutex::new(AcpiPm::new(control.clone()))),
        )?;

        let mut acpi_devices = Vec::new();
        let balloon = if config.balloon.enabled {
            let gsi = layout::VIRTIO_GSI_START;
            let irq = Arc::new(IrqfdTrigger(kvm.irqfd(gsi)?));
            let dev = Balloon::new(balloon_config(&config.balloon), mem.clone(), irq);
            let dev = Arc::new(Mutex::new(dev));
            let base = layout::VIRTIO_MMIO_START;
            mmio.insert(
                base,
                ferry_balloon::MMIO_WINDOW_LEN,
                dev.clone() as SharedDevice,
            )?;
            acpi_devices.push(acpi::MmioDeviceInfo {
                base,
                size: ferry_balloon::MMIO_WINDOW_LEN,
                gsi,
            });
            Some(dev)
        } else {
            None
        };

        let tables = acpi::build(config.vcpus, &acpi_devices)?;
        tables.write(mem)?;
        let e820 = layout::e820_map(config.memory_bytes);
        boot::ZeroPage {
            header: kernel.header,
            cmdline_addr: layout::CMDLINE_START,
            cmdline_len,
            initrd,
            rsdp_addr: tables.rsdp_addr,
            e820: &e820,
        }
        .write(mem)?;

        vcpu::install_kick_handler()?;
        let mut fds = Vec::with_capacity(usize::from(config.vcpus));
        for id in 0..config.vcpus {
            let opts = crate::kvm::cpuid::CpuOptions {
                xsave: config.xsave,
            };
            let fd = kvm.create_vcpu(id, config.vcpus, opts)?;
            configure_boot(&fd, (id == 0).then_some(kernel.entry))?;
            fds.push(fd);
        }
        let msr_indices = Arc::new(saveable_msrs(kvm.kvm(), &fds[0])?);
        let ctx = VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            control: control.clone(),
            msr_indices,
        };
        let handles = fds
            .into_iter()
            .enumerate()
            .map(|(id, fd)| vcpu::spawn(id as u8, fd, ctx.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        serial_in.spawn_input(serial.clone(), gate.clone())?;
        tracing::info!(
            "booting {} with {} MiB and {} vCPUs",
            config.kernel.display(),
            config.memory_bytes >> 20,
            config.vcpus
        );
        Ok(Arc::new(Self {
            vcpus: Mutex::new(Vcpus::new(handles, control.clone())),
            config,
            kvm,
            ram,
            control,
            gate,
            serial,
            balloon,
            started: Instant::now(),
        }))
    }

    /// Stops the guest and every device thread; idempotent.
    pub fn pause(&self) -> Result<(), VmmError> {
        self.gate.close();
        let vcpus = lock(&self.vcpus);
        if let Err(e) = vcpus.pause() {
            vcpus.resume();
            self.gate.open();
            return Err(e.into());
        }
        if let Some(b) = &self.balloon {
            lock(b).pause();
        }
        Ok(())
    }

    /// Lets the guest run again; idempotent.
    pub fn resume(&self) {
        if let Some(b) = &self.balloon {
            lock(b).resume();
        }
        lock(&self.vcpus).resume();
        self.gate.open();
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

    /// Asks the guest to give up `bytes` of RAM (rounded down to pages).
    pub fn balloon_set_target(&self, bytes: u64) -> Result<(), VmmError> {
        if bytes > self.config.memory_bytes {
            return Err(VmmError::BalloonTarget(bytes));
        }
        let pages = u32::try_from(bytes / BALLOON_PAGE_BYTES)
            .map_err(|_| VmmError::BalloonTarget(bytes))?;
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
