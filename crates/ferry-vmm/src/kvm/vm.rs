//! The KVM VM: creation with the in-kernel irqchip and PIT (before any vCPU), vCPU creation
//! and boot configuration, interrupt eventfds.
#![forbid(unsafe_code)]

use std::ffi::CString;
use std::path::Path;
use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, CpuId, KVM_CAP_EXCEPTION_PAYLOAD, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{cpuid, regs, state};
use crate::layout;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM lacks a capability ferry needs.
    #[error("KVM lacks the {0} capability ferry needs")]
    MissingCap(&'static str),
    /// Eventfd creation failed.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A boot-time register or MSR write failed.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// Writing boot tables into guest memory failed.
    #[error("cannot write the boot page tables: {0}")]
    GuestWrite(#[source] vm_memory::GuestMemoryError),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A KVM VM with its irqchip and PIT.
#[derive(Debug)]
pub struct KvmVm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    supported_cpuid: CpuId,
}

/// Asks KVM to keep a pending exception's payload (a #PF's faulting address, a #DB's DR6)
/// apart from CR2/DR6 until the exception is delivered, and to report it in
/// KVM_GET_VCPU_EVENTS (api.rst, KVM_CAP_EXCEPTION_PAYLOAD). Without it, saving a vCPU with a
/// #PF pending writes the new address into CR2 at KVM_GET_VCPU_EVENTS time, after CR2 was
/// saved with the sregs, so the restored guest would see a stale CR2. Every ferry VM enables
/// it, so a destination accepts the payload a source saved; where KVM lacks it, nothing
/// changes (and the payload flag is never set).
fn enable_exception_payload(fd: &VmFd) {
    if fd.check_extension_raw(u64::from(KVM_CAP_EXCEPTION_PAYLOAD)) <= 0 {
        return;
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_EXCEPTION_PAYLOAD,
        ..Default::default()
    };
    cap.args[0] = 1;
    if let Err(e) = fd.enable_cap(&cap) {
        tracing::debug!("KVM_CAP_EXCEPTION_PAYLOAD not enabled: {e}");
    }
}

impl KvmVm {
    /// Opens `kvm_path`, creates the VM, its TSS area, the in-kernel irqchip and PIT2.
    pub fn new(kvm_path: &Path) -> Result<Self, VmError> {
        let path = CString::new(kvm_path.as_os_str().as_encoded_bytes())
            .map_err(|_| VmError::MissingCap("a NUL-free /dev/kvm path"))?;
        let kvm = Kvm::new_with_path(&path).map_err(ioctl("opening KVM"))?;
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::Pit2, "PIT2"),
            (Cap::Irqfd, "IRQFD"),
            (Cap::UserMemory, "USER_MEMORY"),
            (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
            (Cap::Xsave, "XSAVE"),
            (Cap::Xcrs, "XCRS"),
            (Cap::Debugregs, "DEBUGREGS"),
            (Cap::VcpuEvents, "VCPU_EVENTS"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        enable_exception_payload(&fd);
        fd.set_tss_address(layout::KVM_TSS_ADDRESS)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(Self {
            kvm,
            fd: Arc::new(fd),
            supported_cpuid,
        })
    }

    /// The VM fd, shared with the dirty log.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// A new eventfd registered as an irqfd on `gsi`.
    pub fn irqfd(&self, gsi: u32) -> Result<EventFd, VmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(ioctl("KVM_IRQFD"))?;
        Ok(evt)
    }

    /// Creates vCPU `id` of `count` and sets its CPUID. Registers are set by
    /// [`configure_boot`] (fresh boot) or by restoring a saved state.
    pub fn create_vcpu(
        &self,
        id: u8,
        count: u8,
        opts: cpuid::CpuOptions,
    ) -> Result<VcpuFd, VmError> {
        let vcpu = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        let cpuid = cpuid::for_vcpu(&self.supported_cpuid, id, count, opts);
        vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        Ok(vcpu)
    }
}

/// Puts a freshly created vCPU in the state Linux's 64-bit entry expects. The boot vCPU
/// (`entry` is `Some`) starts at the kernel entry; the others wait for INIT/SIPI.
pub fn configure_boot(vcpu: &VcpuFd, entry: Option<u64>) -> Result<(), VmError> {
    state::set_msrs(vcpu, &regs::boot_msrs())?;
    let mut lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    regs::set_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    vcpu.set_fpu(&regs::boot_fpu())
        .map_err(ioctl("KVM_SET_FPU"))?;
    if let Some(entry) = entry {
        let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&regs::long_mode_sregs(sregs))
            .map_err(ioctl("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs::entry_regs(entry))
            .map_err(ioctl("KVM_SET_REGS"))?;
    }
    Ok(())
}
