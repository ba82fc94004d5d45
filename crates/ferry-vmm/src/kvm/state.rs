//! KVM vCPU and VM state for migration: plain serializable structs, saved and restored in
//! the orders KVM requires (see `docs/vmm.md`).
//!
//! Save, per vCPU (while paused): mp_state first (reading it can change LAPIC state), then
//! regs, sregs, xsave, xcrs, debugregs, lapic, MSRs, and vcpu_events last. Then the VM: PIT,
//! clock, PIC master, PIC slave, IOAPIC.
//! Restore: VM irqchip and PIT exist before vCPUs; per vCPU cpuid, mp_state, regs, sregs,
//! xsave, xcrs, debugregs, lapic (before MSRs: TSC_DEADLINE needs it), MSRs, vcpu_events last;
//! then PIT, clock, irqchips.

use ferry_migration::RegionDesc;
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation, e.g. "KVM_GET_SREGS".
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM handled fewer MSRs than given.
    #[error("KVM {op} {done} of {total} MSRs (first missing: {missing:#x})")]
    PartialMsrs {
        /// "read" or "wrote".
        op: &'static str,
        /// How many it handled.
        done: usize,
        /// How many were asked for.
        total: usize,
        /// The first MSR not handled.
        missing: u32,
    },
    /// The destination cannot give the guest the TSC frequency it ran at.
    #[error(
        "the guest's TSC runs at {wanted} kHz; this host's runs at {here} kHz and KVM cannot \
         scale it ({source}): the guest's clock would drift, choose a host with the same TSC \
         frequency or with TSC scaling"
    )]
    TscFrequency {
        /// The guest's frequency.
        wanted: u32,
        /// This host's frequency for the vCPU.
        here: u32,
        /// KVM's refusal.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A list too long for KVM's fixed-size arrays.
    #[error("too many {0} entries for KVM")]
    TooMany(&'static str),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (= APIC id).
    pub id: u8,
    /// CPUID the vCPU was configured with.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (legacy 4 KiB KVM_GET_XSAVE area; enough without AVX-512/AMX).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// MSRs (the saveable set, see [`saveable_msrs`]).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub vcpu_events: kvm_vcpu_events,
    /// The guest's TSC frequency (`KVM_GET_TSC_KHZ`): what its kvmclock and TSC-deadline
    /// timer were calibrated against. Absent in (JSON) states saved before it was recorded.
    /// Always written: the binary format has no absent fields.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

/// Everything KVM holds for the VM outside the vCPUs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// i8254 PIT.
    pub pit2: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// 8259 master.
    pub pic_master: kvm_irqchip,
    /// 8259 slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl VmState {
    /// Saves the VM's state; call with every vCPU paused.
    pub fn save(vm: &VmFd) -> Result<Self, StateError> {
        Ok(Self {
            pit2: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Restores into a VM whose irqchip and PIT were created, after its vCPUs were restored.
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        vm.set_pit2(&self.pit2).map_err(kvm("KVM_SET_PIT2"))?;
        let mut clock = self.clock;
        // Only the clock value is settable (KVM_CLOCK_REALTIME needs the host's realtime,
        // which a later version will use to account for the downtime).
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        clock.flags = 0;
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

/// The MSRs worth saving: those of KVM's index list that this vCPU can read, plus
/// MTRRdefType and the KVM paravirt range (kvmclock, async PF, steal time, PV EOI).
pub fn saveable_msrs(kvm: &kvm_ioctls::Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut candidates: Vec<u32> = list.as_slice().to_vec();
    candidates.push(super::regs::msr::MTRR_DEF_TYPE);
    candidates.extend(super::regs::msr::KVM_PV_FIRST..=super::regs::msr::KVM_PV_LAST);
    candidates.sort_unstable();
    candidates.dedup();
    candidates.retain(|&m| is_state(m));
    // KVM_GET_MSRS stops at the first MSR it cannot read: probe each one.
    Ok(candidates
        .into_iter()
        .filter(|&index| {
            let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }]) else {
                return false;
            };
            matches!(vcpu.get_msrs(&mut one), Ok(1))
        })
        .collect())
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    kvm(what)
}

/// Whether MSR `index` is vCPU state worth saving. The wall-clock MSRs are requests, not
/// state: writing one makes KVM write the host's wall clock into guest RAM at that moment
/// (KVM's msr.rst: "only guaranteed to update this data at the moment of MSR write"), and
/// Linux asks once at boot. Restored, they made every destination write its own boot time
/// into the guest's `wall_clock` (the first page of a 2 MiB-aligned section) before the guest
/// ran again: the one page by which the destination's RAM differed from the source's in
/// issue 11's RAM digests (QEMU restores it too).
fn is_state(index: u32) -> bool {
    use super::regs::msr;
    !matches!(index, msr::KVM_WALL_CLOCK | msr::KVM_WALL_CLOCK_NEW)
}

/// Where an MSR goes when a saved vCPU is restored: most in any order, then the KVM
/// paravirt ones with MSR_KVM_ASYNC_PF_INT before MSR_KVM_ASYNC_PF_EN (KVM's msr.rst: "The
/// vector has to be set up before asynchronous page fault mechanism is enabled"), and
/// IA32_TSC_DEADLINE last, after IA32_TSC it is relative to (Firecracker defers it too).
fn restore_rank(index: u32) -> u8 {
    use super::regs::msr;
    match index {
        msr::TSC_DEADLINE => 4,
        msr::KVM_ASYNC_PF_EN => 3,
        msr::KVM_ASYNC_PF_INT => 2,
        msr::KVM_PV_FIRST..=msr::KVM_PV_LAST => 1,
        _ => 0,
    }
}

/// Writes `entries` to the vCPU, failing unless KVM took every one.
pub fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), StateError> {
    let msrs = Msrs::from_entries(entries).map_err(|_| StateError::TooMany("MSR"))?;
    let done = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if done != entries.len() {
        return Err(StateError::PartialMsrs {
            op: "wrote",
            done,
            total: entries.len(),
            missing: entries[done].index,
        });
    }
    Ok(())
}

fn get_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut all = Vec::with_capacity(indices.len());
    // KVM_MAX_MSR_ENTRIES bounds one call.
    for chunk in indices.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::TooMany("MSR"))?;
        let done = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if done != chunk.len() {
            return Err(StateError::PartialMsrs {
                op: "read",
                done,
                total: chunk.len(),
                missing: chunk[done],
            });
        }
        all.extend_from_slice(msrs.as_slice());
    }
    Ok(all)
}

impl VcpuState {
    /// Saves vCPU `id`'s state; call on a paused vCPU (outside KVM_RUN).
    pub fn save(vcpu: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<Self, StateError> {
        let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let xsave = vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
        let xcrs = vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
        let debugregs = vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        let msrs = get_msrs(vcpu, msr_indices)?;
        let cpuid = vcpu
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let vcpu_events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        // Not fatal: a kernel without KVM_CAP_GET_TSC_KHZ (before 3.x) cannot tell.
        let tsc_khz = vcpu.get_tsc_khz().ok();
        Ok(Self {
            id,
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Restores into a fresh vCPU of a VM whose irqchip exists.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| StateError::TooMany("CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        // SAFETY: `self.xsave` is a complete legacy `kvm_xsave` area as KVM_GET_XSAVE returned
        // it; KVM_SET_XSAVE reads exactly `size_of::<kvm_xsave>()` bytes from it.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        // The frequency before the TSC value (QEMU orders them so too): KVM converts a
        // written TSC at the vCPU's rate.
        self.restore_tsc_khz(vcpu)?;
        let mut msrs = self.msrs.clone();
        msrs.sort_by_key(|e| restore_rank(e.index));
        set_msrs(vcpu, &msrs)?;
        vcpu.set_vcpu_events(&self.vcpu_events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        // Tell the guest's kvmclock it was paused (avoids soft-lockup warnings); not fatal.
        if let Err(e) = vcpu.kvmclock_ctrl() {
            tracing::debug!("KVM_KVMCLOCK_CTRL: {e}");
        }
        Ok(())
    }
}

/// A 32-bit local APIC register from a `KVM_GET_LAPIC` page.
fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| lapic.regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// The highest vector set in one of the APIC's 256-bit registers (ISR at 0x100, IRR at
/// 0x200): eight 32-bit words 16 bytes apart.
fn lapic_highest(lapic: &kvm_lapic_state, base: usize) -> Option<u32> {
    (0..8usize).rev().find_map(|w| {
        let word = lapic_reg(lapic, base + w * 16);
        (word != 0).then(|| w as u32 * 32 + 31 - word.leading_zeros())
    })
}

impl VcpuState {
    /// The value of a saved MSR.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|e| e.index == index).map(|e| e.data)
    }

    /// Gives the vCPU the TSC frequency it was saved with. KVM accepts a rate within its
    /// tolerance (250 ppm) of the host's without scaling, and any rate where the CPU scales
    /// TSCs (AMD since family 10h, Intel since Skylake); otherwise the guest's kvmclock and
    /// deadline timer would run at the wrong speed, so the restore fails instead.
    fn restore_tsc_khz(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        let Some(wanted) = self.tsc_khz else {
            return Ok(());
        };
        let here = vcpu.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?;
        if here == wanted {
            return Ok(());
        }
        vcpu.set_tsc_khz(wanted)
            .map_err(|source| StateError::TscFrequency {
                wanted,
                here,
                source,
            })
    }

    /// The guest-physical address of the vCPU's top-level page table when paging is on and
    /// that table is not inside any of the `ram` regions; `None` otherwise.
    ///
    /// A guest kernel never loads such a CR3 (its very next instruction fetch would fault), so
    /// one seen in a saved state means something below the guest rewrote it: in the lab, the
    /// emulated SVM of its host has been caught writing the host's own CR3 into a guest's
    /// (docs/lab.md, "The lab writes its own CR3 into the guest"). Restoring such a state would
    /// only start a guest that cannot run.
    pub fn page_tables_outside(&self, ram: &[RegionDesc]) -> Option<u64> {
        const CR0_PG: u64 = 1 << 31;
        // CR3 bits 12-51 hold the table; the low bits are PCID or cache control, the top
        // bit is the PCID no-flush hint.
        const TABLE: u64 = 0x000f_ffff_ffff_f000;
        if self.sregs.cr0 & CR0_PG == 0 {
            return None;
        }
        let table = self.sregs.cr3 & TABLE;
        let inside = ram.iter().any(|r| table >= r.gpa && table - r.gpa < r.size);
        (!inside).then_some(table)
    }

    /// One line on what the vCPU was doing, for diagnosing a guest that stopped: where it
    /// ran (RIP; LSTAR is the guest kernel's `entry_SYSCALL_64`, which gives its KASLR
    /// offset against System.map), whether it could take interrupts, what was pending, and
    /// its local APIC timer.
    pub fn describe(&self) -> String {
        use super::regs::msr;
        let e = &self.vcpu_events;
        let hex = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:#x}"));
        format!(
            "vCPU {}: mp_state={} cs={:#x} rip={:#x} rsp={:#x} rflags={:#x} (IF={}) cr0={:#x} \
             cr3={:#x} cr4={:#x} efer={:#x} cr2={:#x} lstar={} gs={:#x} kernel_gs={}; events: exception injected={} pending={} \
             nr={} error_code={:#x} payload={} interrupt injected={} nr={} shadow={} \
             nmi injected={} pending={} masked={}; \
             lapic: svr={:#x} tpr={:#x} isr_max={:?} irr_max={:?} lvt_timer={:#x} tmict={:#x} \
             tmcct={:#x}; tsc={} tsc_deadline={}",
            self.id,
            self.mp_state.mp_state,
            self.sregs.cs.selector,
            self.regs.rip,
            self.regs.rsp,
            self.regs.rflags,
            (self.regs.rflags >> 9) & 1,
            self.sregs.cr0,
            self.sregs.cr3,
            self.sregs.cr4,
            self.sregs.efer,
            self.sregs.cr2,
            hex(self.msr(msr::LSTAR)),
            self.sregs.gs.base,
            hex(self.msr(msr::KERNEL_GS_BASE)),
            e.exception.injected,
            e.exception.pending,
            e.exception.nr,
            e.exception.error_code,
            hex((e.exception_has_payload != 0).then_some(e.exception_payload)),
            e.interrupt.injected,
            e.interrupt.nr,
            e.interrupt.shadow,
            e.nmi.injected,
            e.nmi.pending,
            e.nmi.masked,
            lapic_reg(&self.lapic, 0xf0),
            lapic_reg(&self.lapic, 0x80),
            lapic_highest(&self.lapic, 0x100),
            lapic_highest(&self.lapic, 0x200),
            lapic_reg(&self.lapic, 0x320),
            lapic_reg(&self.lapic, 0x380),
            lapic_reg(&self.lapic, 0x390),
            hex(self.msr(msr::TSC)),
            hex(self.msr(msr::TSC_DEADLINE)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_highest_vector_of_an_apic_bitmap() {
        let mut lapic = kvm_lapic_state::default();
        assert_eq!(lapic_highest(&lapic, 0x100), None);
        // Vector 236 (the local timer): word 7, bit 12; vector 34: word 1, bit 2.
        lapic.regs[0x100 + 7 * 16 + 1] = 0x10;
        lapic.regs[0x100 + 16] = 0x04;
        assert_eq!(lapic_highest(&lapic, 0x100), Some(236));
        lapic.regs[0x100 + 7 * 16 + 1] = 0;
        assert_eq!(lapic_highest(&lapic, 0x100), Some(34));
        for (i, b) in [0x78u8, 0x56, 0x34, 0x12].into_iter().enumerate() {
            lapic.regs[0x380 + i] = b as _;
        }
        assert_eq!(lapic_reg(&lapic, 0x380), 0x1234_5678);
    }

    #[test]
    fn page_tables_outside_ram_are_found_only_with_paging_on() {
        let region = |gpa, size| RegionDesc { gpa, size };
        let ram = [region(0, 0xc000_0000), region(0x1_0000_0000, 0x4000_0000)];
        let mut v = VcpuState {
            id: 0,
            cpuid: Vec::new(),
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: Vec::new(),
            vcpu_events: Default::default(),
            tsc_khz: None,
        };
        v.sregs.cr3 = 0x1_00ab_6000;
        // Real mode or paging off: CR3 means nothing.
        assert_eq!(v.page_tables_outside(&ram), None);
        v.sregs.cr0 = 0x8005_0033;
        assert_eq!(v.page_tables_outside(&ram), None, "in the high region");
        v.sregs.cr3 = 0xc000_0000;
        assert_eq!(
            v.page_tables_outside(&ram),
            Some(0xc000_0000),
            "in the hole"
        );
        v.sregs.cr3 = 0x1_4000_0000;
        assert_eq!(
            v.page_tables_outside(&ram),
            Some(0x1_4000_0000),
            "past the end"
        );
        // PCID and the no-flush bit are not part of the address.
        v.sregs.cr3 = (1 << 63) | 0x0273_8000 | 0x5;
        assert_eq!(v.page_tables_outside(&ram), None);
    }

    #[test]
    fn wall_clock_requests_are_not_saved_but_kvmclock_is() {
        use crate::kvm::regs::msr;
        assert!(!is_state(msr::KVM_WALL_CLOCK));
        assert!(!is_state(msr::KVM_WALL_CLOCK_NEW));
        // MSR_KVM_SYSTEM_TIME_NEW (kvmclock), async PF, steal time: state.
        assert!(is_state(0x4b56_4d01));
        assert!(is_state(msr::KVM_ASYNC_PF_EN));
        assert!(is_state(0x4b56_4d03));
        assert!(is_state(msr::TSC));
    }

    #[test]
    fn msrs_are_restored_with_the_async_pf_vector_first_and_the_deadline_last() {
        use crate::kvm::regs::msr;
        let order = [
            msr::KVM_ASYNC_PF_EN,
            msr::TSC_DEADLINE,
            0x4b56_4d01, // kvmclock
            msr::KVM_ASYNC_PF_INT,
            msr::TSC,
            msr::LSTAR,
        ];
        let mut entries: Vec<kvm_msr_entry> = order
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        entries.sort_by_key(|e| restore_rank(e.index));
        let got: Vec<u32> = entries.iter().map(|e| e.index).collect();
        assert_eq!(
            got,
            [
                msr::TSC,
                msr::LSTAR,
                0x4b56_4d01,
                msr::KVM_ASYNC_PF_INT,
                msr::KVM_ASYNC_PF_EN,
                msr::TSC_DEADLINE
            ]
        );
    }

    #[test]
    fn vcpu_state_round_trips_through_json() {
        let mut s = VcpuState {
            id: 1,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 7,
                ..Default::default()
            }],
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs {
                rip: 0x1234,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 99,
                ..Default::default()
            }],
            vcpu_events: kvm_vcpu_events::default(),
            tsc_khz: Some(2_994_374),
        };
        s.lapic.regs[0x20] = 5;
        let j = serde_json::to_vec(&s).unwrap();
        let back: VcpuState = serde_json::from_slice(&j).unwrap();
        assert_eq!(back.regs.rip, 0x1234);
        assert_eq!(back.msrs[0].data, 99);
        assert_eq!(back.lapic.regs[0x20], 5);
        assert_eq!(back.cpuid[0].eax, 7);
        assert_eq!(back.tsc_khz, Some(2_994_374));
        // What a stopped guest's diagnosis shows.
        let line = back.describe();
        assert!(
            line.starts_with("vCPU 1: mp_state=0 cs=0x0 rip=0x1234 "),
            "{line}"
        );
        assert!(line.contains(" gs=0x0 kernel_gs=-;"), "{line}");
        assert!(line.contains("tsc=0x63 tsc_deadline=-"), "{line}");
    }
}
