//! Building a [`Vmm`]: a fresh boot from a kernel ([`Vmm::boot`]), or a VM continuing from a
//! saved [`MachineState`] whose RAM arrived separately ([`IncomingVm`], the migration
//! destination).
//!
//! Both paths create the KVM VM with its irqchip and PIT first, then RAM and its memory
//! slots, then the devices (fresh, or from their saved state), then the vCPUs; except that a
//! destination creates its vCPUs with the RAM, so that only setting their state is left for
//! the downtime.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_balloon::Balloon;
use kvm_ioctls::VcpuFd;

use crate::bus::{lock, Bus, SharedDevice};
use crate::config::{check_kvm, VmConfig};
use crate::console::{self, ConsoleOut, SerialInput};
use crate::devices::{AcpiPm, IrqfdTrigger, I8042};
use crate::gate::Gate;
use crate::kvm::cpuid::CpuOptions;
use crate::kvm::state::saveable_msrs;
use crate::kvm::vcpu::{self, VcpuContext, VcpuControl, VcpuError, Vcpus, Waiting};
use crate::kvm::vm::{configure_boot, KvmVm, VmError};
use crate::memory::{register_slots, GuestMemory, GuestRam};
use crate::serial::SerialConsole;
use crate::steps::Steps;
use crate::vmm::{MachineState, Vmm, VmmError, MACHINE_STATE_VERSION};
use crate::{acpi, boot, layout};

/// The KVM VM and its RAM, before any device or vCPU.
struct Base {
    config: VmConfig,
    kvm: KvmVm,
    ram: GuestRam,
}

impl Base {
    fn new(config: VmConfig) -> Result<Self, VmmError> {
        check_kvm(
            &config.kvm_path,
            std::path::Path::new("/sys/module"),
            config.allow_pvm,
        )?;
        let kvm = KvmVm::new(&config.kvm_path)?;
        let ram = GuestRam::new(&layout::ram_regions(config.memory_bytes))?;
        register_slots(kvm.fd(), &ram.slots(), false)?;
        Ok(Self { config, kvm, ram })
    }

    fn cpu_options(&self) -> CpuOptions {
        CpuOptions {
            xsave: self.config.xsave,
        }
    }
}

/// Devices on their buses.
struct Devices {
    control: Arc<VcpuControl>,
    gate: Arc<Gate>,
    serial: Arc<Mutex<SerialConsole>>,
    serial_in: SerialInput,
    balloon: Option<Arc<Mutex<Balloon>>>,
    pio: Bus,
    mmio: Bus,
    acpi: Vec<acpi::MmioDeviceInfo>,
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

/// The host side of the guest's console (socket bound, files open), opened before its UART.
struct Console {
    out: ConsoleOut,
    input: SerialInput,
}

impl Console {
    /// Opens `config`'s serial target and console log.
    fn open(config: &VmConfig) -> Result<Self, VmmError> {
        let (out, input) = console::open(&config.serial)?;
        let out = match &config.console_log {
            Some(path) => ConsoleOut::with_log(out, path)?,
            None => out.into(),
        };
        Ok(Self { out, input })
    }
}

/// Creates the devices, fresh or (with `state`) continuing from their saved state, with the
/// already opened `console`.
fn devices(
    base: &Base,
    state: Option<&MachineState>,
    console: Console,
) -> Result<Devices, VmmError> {
    let (config, kvm, mem) = (&base.config, &base.kvm, base.ram.memory());
    let control = Arc::new(VcpuControl::default());
    let gate = Arc::new(Gate::new());
    let mut pio = Bus::new();
    let mut mmio = Bus::new();

    let serial_irq = kvm.irqfd(layout::SERIAL_GSI)?;
    let Console {
        out,
        input: serial_in,
    } = console;
    let console = match state {
        Some(s) => SerialConsole::restore(serial_irq, out, &s.serial)?,
        None => SerialConsole::new(serial_irq, out),
    };
    let serial = Arc::new(Mutex::new(console));
    pio.insert(
        u64::from(layout::COM1_PORT),
        8,
        serial.clone() as SharedDevice,
    )?;
    let i8042 = Arc::new(Mutex::new(I8042::new(control.clone())));
    pio.insert(u64::from(I8042::BASE), I8042::LEN, i8042)?;
    let pm = Arc::new(Mutex::new(AcpiPm::new(control.clone())));
    pio.insert(u64::from(AcpiPm::BASE), AcpiPm::LEN, pm)?;

    let mut acpi = Vec::new();
    let balloon = if config.balloon.enabled {
        let gsi = layout::VIRTIO_GSI_START;
        let irq = Arc::new(IrqfdTrigger(kvm.irqfd(gsi)?));
        let cfg = balloon_config(&config.balloon);
        let dev = match state.and_then(|s| s.balloon.as_ref()) {
            Some(saved) => Balloon::restore(cfg, mem.clone(), irq, saved)?,
            None => Balloon::new(cfg, mem.clone(), irq),
        };
        let dev = Arc::new(Mutex::new(dev));
        let base = layout::VIRTIO_MMIO_START;
        let len = ferry_balloon::MMIO_WINDOW_LEN;
        mmio.insert(base, len, dev.clone() as SharedDevice)?;
        acpi.push(acpi::MmioDeviceInfo {
            base,
            size: len,
            gsi,
        });
        Some(dev)
    } else {
        None
    };
    Ok(Devices {
        control,
        gate,
        serial,
        serial_in,
        balloon,
        pio,
        mmio,
        acpi,
    })
}

/// The vCPU threads' shared context; the buses move out of `devices` into it.
fn vcpu_context(devices: &mut Devices, msr_indices: Vec<u32>) -> VcpuContext {
    VcpuContext {
        pio: Arc::new(std::mem::take(&mut devices.pio)),
        mmio: Arc::new(std::mem::take(&mut devices.mmio)),
        control: devices.control.clone(),
        msr_indices: Arc::new(msr_indices),
    }
}

/// Starts the vCPU threads of a booting VM and assembles the [`Vmm`]. The MSRs to save
/// later are probed on the first vCPU.
fn start(base: Base, mut devices: Devices, fds: Vec<VcpuFd>) -> Result<Arc<Vmm>, VmmError> {
    vcpu::install_kick_handler()?;
    let first = fds
        .first()
        .ok_or(VmmError::Incompatible("no vCPU".into()))?;
    let msr_indices = saveable_msrs(base.kvm.kvm(), first)?;
    let ctx = vcpu_context(&mut devices, msr_indices);
    let handles = fds
        .into_iter()
        .enumerate()
        .map(|(id, fd)| vcpu::spawn(id as u8, fd, ctx.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let vcpus = Vcpus::new(handles, devices.control.clone());
    assemble(base, devices, vcpus)
}

/// Starts the console's input and assembles the [`Vmm`] around running vCPU threads.
fn assemble(base: Base, devices: Devices, vcpus: Vcpus) -> Result<Arc<Vmm>, VmmError> {
    devices
        .serial_in
        .spawn_input(devices.serial.clone(), devices.gate.clone())?;
    Ok(Arc::new(Vmm {
        vcpus: Mutex::new(vcpus),
        config: base.config,
        kvm: base.kvm,
        ram: base.ram,
        control: devices.control,
        gate: devices.gate,
        serial: devices.serial,
        balloon_pause: devices.balloon.as_ref().map(|b| lock(b).pause_request()),
        balloon: devices.balloon,
        started: Instant::now(),
    }))
}

impl Vmm {
    /// Validates `config`, loads the kernel, builds the VM and starts its vCPUs.
    pub fn boot(config: VmConfig) -> Result<Arc<Self>, VmmError> {
        config.validate()?;
        let base = Base::new(config)?;
        let (config, mem) = (&base.config, base.ram.memory());
        let kernel = boot::load_kernel(mem, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(p) => {
                let low_end = layout::low_ram_end(config.memory_bytes);
                Some(boot::load_initrd(mem, p, low_end, &kernel)?)
            }
            None => None,
        };
        let cmdline_len = boot::write_cmdline(mem, &config.cmdline, &kernel.header)?;
        crate::kvm::regs::write_boot_tables(mem).map_err(VmError::GuestWrite)?;

        let console = Console::open(&base.config)?;
        let devices = devices(&base, None, console)?;
        let tables = acpi::build(config.vcpus, &devices.acpi)?;
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

        let mut fds = Vec::with_capacity(usize::from(config.vcpus));
        for id in 0..config.vcpus {
            let fd = base.kvm.create_vcpu(id, config.vcpus, base.cpu_options())?;
            configure_boot(&fd, (id == 0).then_some(kernel.entry))?;
            fds.push(fd);
        }
        tracing::info!(
            "booting {} with {} MiB and {} vCPUs",
            config.kernel.display(),
            config.memory_bytes >> 20,
            config.vcpus
        );
        start(base, devices, fds)
    }
}

/// A VM waiting for its RAM and then its state: the migration destination. Its RAM is the
/// same size and layout as the source's (same `memory_bytes`); write it through
/// [`IncomingVm::memory`], then call [`IncomingVm::restore`].
pub struct IncomingVm {
    /// The vCPU threads, created (with their vCPUs and CPUID) while RAM streams in rather
    /// than in the downtime; each restores its vCPU's state when [`IncomingVm::restore`]
    /// launches it. First, so that dropped unlaunched they end before the VM goes.
    vcpus: Vec<Waiting>,
    base: Base,
    /// The console's host side, open while RAM streams in: a console client can connect
    /// before the switchover and sees the guest's first line after it at once (instead of
    /// connecting some time after the guest resumed), and binding the socket is not part
    /// of the downtime. Clients are accepted once the VM is restored.
    console: Console,
}

impl std::fmt::Debug for IncomingVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingVm")
            .field("config", &self.base.config)
            .finish_non_exhaustive()
    }
}

impl IncomingVm {
    /// Creates the KVM VM (irqchip, PIT), zeroed RAM and the waiting vCPU threads for
    /// `config`. The kernel and initrd in `config` are not loaded (RAM comes from the
    /// source), so they need not exist.
    pub fn new(config: VmConfig) -> Result<Self, VmmError> {
        config.validate_resources()?;
        let base = Base::new(config)?;
        vcpu::install_kick_handler()?;
        let count = base.config.vcpus;
        let vcpus = (0..count)
            .map(|id| {
                let fd = base.kvm.create_vcpu(id, count, base.cpu_options())?;
                Ok(Waiting::spawn(id, fd)?)
            })
            .collect::<Result<Vec<_>, VmmError>>()?;
        let console = Console::open(&base.config)?;
        Ok(Self {
            base,
            vcpus,
            console,
        })
    }

    /// Guest RAM to receive into.
    pub fn memory(&self) -> &GuestMemory {
        self.base.ram.memory()
    }

    /// The RAM and its memfd (for the debug digest before the restore).
    pub(crate) fn ram(&self) -> &GuestRam {
        &self.base.ram
    }

    /// The engine's view of this RAM (must equal the source's).
    pub fn layout(&self) -> ferry_migration::MemoryLayout {
        self.base.ram.layout()
    }

    /// Restores devices, vCPUs and VM state from `state` (in KVM's required order) and
    /// returns the VM paused; [`Vmm::resume`] lets it run.
    pub fn restore(self, mut state: MachineState) -> Result<Arc<Vmm>, VmmError> {
        let Self {
            base,
            vcpus: waiting,
            console,
        } = self;
        // This runs inside the downtime: its steps are timed for the debug log.
        let mut steps = Steps::new();
        check_compatible(&base, &state)?;
        let mut devices = devices(&base, Some(&state), console)?;
        steps.done("devices");
        // Probing every MSR again would add to the migration's downtime; the source already
        // told us which ones this guest has.
        let first = state.vcpus.first();
        let msrs = first.map_or_else(Vec::new, |v| v.msrs.iter().map(|e| e.index).collect());
        let ctx = vcpu_context(&mut devices, msrs);
        // The vCPUs park, paused, once restored.
        devices.control.set_paused();
        devices.gate.close();
        // Every thread restores its own vCPU, all at once. Threads launched so far are
        // stopped (dropping `vcpus`) if a later one fails.
        let mut vcpus = Vcpus::new(Vec::with_capacity(waiting.len()), devices.control.clone());
        let mut pending = Vec::with_capacity(waiting.len());
        // check_compatible made sure there is one saved state per vCPU, in id order.
        for (thread, saved) in waiting.into_iter().zip(std::mem::take(&mut state.vcpus)) {
            let id = saved.id;
            let (handle, restored) = thread.launch(ctx.clone(), Some(saved))?;
            vcpus.add(handle);
            pending.push((id, restored));
        }
        vcpu::collect(pending, VcpuError::RestoreTimeout)?;
        steps.done("vcpu state");
        // After the vCPUs: the clock and the interrupt controllers.
        state.vm.restore(base.kvm.fd())?;
        steps.done("vm state");
        if let Some(b) = &devices.balloon {
            // Restored devices come back paused; keep them so until the VM resumes.
            crate::bus::lock(b).pause();
        }
        let vmm = assemble(base, devices, vcpus)?;
        steps.done("assemble");
        tracing::debug!("restore steps: {steps}");
        Ok(vmm)
    }
}

fn check_compatible(base: &Base, state: &MachineState) -> Result<(), VmmError> {
    let bad = |what: String| Err(VmmError::Incompatible(what));
    if state.version != MACHINE_STATE_VERSION {
        return bad(format!(
            "state format version {} (this VMM reads {MACHINE_STATE_VERSION})",
            state.version
        ));
    }
    if state.memory != base.ram.layout().regions() {
        return bad(format!(
            "memory regions {:?} differ from this VM's {:?}",
            state.memory,
            base.ram.layout().regions()
        ));
    }
    if state.vcpus.len() != usize::from(base.config.vcpus) {
        return bad(format!(
            "{} vCPUs saved, {} configured",
            state.vcpus.len(),
            base.config.vcpus
        ));
    }
    if state
        .vcpus
        .iter()
        .enumerate()
        .any(|(i, v)| usize::from(v.id) != i)
    {
        return bad("vCPU ids out of order".into());
    }
    if state.balloon.is_some() != base.config.balloon.enabled {
        return bad("balloon present on one side only".into());
    }
    for v in &state.vcpus {
        if let Some(table) = v.page_tables_outside(&state.memory) {
            return bad(format!(
                "vCPU {}'s page tables at {table:#x} lie outside the guest's RAM: the saved \
                 guest was already broken (CR3 rewritten below it) and could not run",
                v.id
            ));
        }
    }
    Ok(())
}
