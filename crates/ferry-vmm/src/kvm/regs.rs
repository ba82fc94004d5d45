//! The CPU state a 64-bit Linux entry needs: GDT, identity-mapped page tables, segment and
//! control registers, boot MSRs, FPU defaults and the LAPIC's LINT0/LINT1 modes.
#![forbid(unsafe_code)]

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout;

/// CR0 protection enable.
pub const CR0_PE: u64 = 1;
/// CR0 paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4 physical address extension.
pub const CR4_PAE: u64 = 1 << 5;
/// EFER long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// Page table entry: present | writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page directory entry mapping a 2 MiB page.
const PDE_PS: u64 = 0x80;

/// MSR indices written at boot.
pub mod msr {
    /// IA32_TSC.
    pub const TSC: u32 = 0x10;
    /// IA32_SYSENTER_CS.
    pub const SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// IA32_MISC_ENABLE.
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// IA32_MTRR_DEF_TYPE.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL_MASK (SFMASK).
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// KERNEL_GS_BASE.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// First KVM paravirt MSR (kvmclock and friends live at 0x4b564d00..).
    pub const KVM_PV_FIRST: u32 = 0x4b56_4d00;
    /// Last KVM paravirt MSR ferry saves.
    pub const KVM_PV_LAST: u32 = 0x4b56_4d08;
    /// MSR_KVM_ASYNC_PF_EN.
    pub const KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
    /// MSR_KVM_WALL_CLOCK (the original kvmclock MSR number).
    pub const KVM_WALL_CLOCK: u32 = 0x11;
    /// MSR_KVM_WALL_CLOCK_NEW.
    pub const KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
    /// MSR_KVM_ASYNC_PF_INT (the "page ready" vector).
    pub const KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
    /// IA32_TSC_DEADLINE.
    pub const TSC_DEADLINE: u32 = 0x6e0;
}

/// IA32_MISC_ENABLE fast-strings bit.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// A GDT descriptor from flags, base and limit (Intel SDM 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The KVM segment register described by GDT entry `index`.
pub fn segment(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With granularity, the limit counts 4 KiB pages.
        limit: if g == 1 {
            ((limit << 12) | 0xfff) as u32
        } else {
            limit as u32
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and the identity page tables (2 MiB pages over the first
/// `PD_COUNT` GiB) into guest memory.
pub fn write_boot_tables<M: GuestMemoryBackend>(
    mem: &M,
) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_START))?;
    mem.write_obj(
        layout::PDPT_START | PTE_PRESENT_RW,
        GuestAddress(layout::PML4_START),
    )?;
    for gib in 0..layout::PD_COUNT {
        let pd = layout::PD_START + gib * 0x1000;
        mem.write_obj(
            pd | PTE_PRESENT_RW,
            GuestAddress(layout::PDPT_START + gib * 8),
        )?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            mem.write_obj(phys | PTE_PRESENT_RW | PDE_PS, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// Special registers for the 64-bit entry, starting from KVM's defaults in `sregs`.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(GDT[1], 1);
    let data = segment(GDT[2], 2);
    let tss = segment(GDT[3], 3);
    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = layout::IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.cr3 = layout::PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the kernel's 64-bit entry.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: layout::ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU defaults: x87 control word and MXCSR as after FNINIT / reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs set before the first entry.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(msr::SYSENTER_CS, 0),
        e(msr::SYSENTER_ESP, 0),
        e(msr::SYSENTER_EIP, 0),
        e(msr::STAR, 0),
        e(msr::CSTAR, 0),
        e(msr::KERNEL_GS_BASE, 0),
        e(msr::SYSCALL_MASK, 0),
        e(msr::LSTAR, 0),
        e(msr::TSC, 0),
        e(msr::MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(msr::MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// LAPIC register offsets and LVT delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = |i: usize| l.regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().into_iter().enumerate() {
        l.regs[off + i] = byte as _;
    }
}

/// Sets LINT0 to ExtINT (the PIC) and LINT1 to NMI, as firmware would.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let mode = |v: u32, m: u32| (v & !0x700) | (m << 8);
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_segments_decode_to_long_mode() {
        let cs = segment(GDT[1], 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.s),
            (8, 1, 0, 1, 1)
        );
        assert_eq!((cs.type_, cs.g, cs.limit), (0xb, 1, 0xffff_ffff));
        let ds = segment(GDT[2], 2);
        assert_eq!((ds.selector, ds.db, ds.type_, ds.l), (16, 1, 3, 0));
        let tr = segment(GDT[3], 3);
        assert_eq!((tr.type_, tr.s, tr.unusable), (0xb, 0, 0));
        assert_eq!(segment(GDT[0], 0).unusable, 1);
        assert_eq!(GDT[1], 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_2mib_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4, layout::PDPT_START | 3);
        let pdpt3: u64 = mem.read_obj(GuestAddress(layout::PDPT_START + 24)).unwrap();
        assert_eq!(pdpt3, (layout::PD_START + 0x3000) | 3);
        // The last 2 MiB page of the 4th GiB.
        let pde: u64 = mem
            .read_obj(GuestAddress(layout::PD_START + 0x3000 + 511 * 8))
            .unwrap();
        assert_eq!(pde, ((4u64 << 30) - (2 << 20)) | 0x83);
        let gdt1: u64 = mem.read_obj(GuestAddress(layout::GDT_START + 8)).unwrap();
        assert_eq!(gdt1, GDT[1]);
    }

    #[test]
    fn sregs_and_regs_for_the_64_bit_entry() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cr3, s.cr4 & CR4_PAE), (layout::PML4_START, CR4_PAE));
        assert_eq!((s.cs.selector, s.ss.selector, s.gdt.limit), (8, 16, 31));
        let r = entry_regs(0x100200);
        assert_eq!(
            (r.rip, r.rsi, r.rflags),
            (0x100200, layout::ZERO_PAGE_START, 2)
        );
    }

    #[test]
    fn lint_modes() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0000);
        set_lint(&mut l);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&l, APIC_LVT1), 0x0000_0400);
    }

    #[test]
    fn boot_msrs_are_distinct() {
        let m = boot_msrs();
        let mut idx: Vec<u32> = m.iter().map(|e| e.index).collect();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), m.len());
    }
}
