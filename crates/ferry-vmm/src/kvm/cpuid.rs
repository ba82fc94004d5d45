//! CPUID for each vCPU: KVM's supported list, normalised so the guest sees a consistent
//! topology (APIC ids matching the MADT), that it runs on a hypervisor, a TSC-deadline LAPIC
//! timer (no calibration needed), no hardware virtualization (VMX/SVM: ferry does not save
//! nested state, so a guest's own guests would not survive a migration), and KVM's paravirt
//! leaves (kvmclock) untouched.
#![forbid(unsafe_code)]

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 ECX: TSC-deadline timer.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: VMX (Intel hardware virtualization).
const LEAF1_ECX_VMX: u32 = 1 << 5;
/// Leaf 0x8000_0001 ECX: SVM (AMD hardware virtualization).
const LEAF_8000_0001_ECX_SVM: u32 = 1 << 2;
/// Leaf 0x4000_0001 EAX: KVM_FEATURE_PV_UNHALT, paravirtual spinlocks. Not offered: their
/// state cannot be migrated. A vCPU waiting for a contended spinlock halts with interrupts
/// off until the holder "kicks" it (KVM_HC_KICK_CPU), and KVM remembers a kick that came
/// before the halt in `pv_unhalted`, which no KVM_GET_* returns (KVM_GET_MP_STATE folds it
/// into RUNNABLE only for a vCPU already halted). A pause between the kick and the `hlt`
/// loses it: the restored vCPU halts with interrupts off for good, a destination whose CPU
/// stops taking interrupts (an RCU stall, then silence; issue 11). Without it Linux spins
/// (`virt_spin_lock`), as under QEMU's default CPU models, which do not offer it either.
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
/// Leaf 1 EDX: HTT (the logical processor count in EBX is valid).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX: XSAVE, OSXSAVE, AVX (AVX needs XSAVE to be usable).
const LEAF1_ECX_XSAVE_FAMILY: u32 = (1 << 26) | (1 << 27) | (1 << 28);
/// Leaf 7 EBX: AVX2, AVX-512 F/DQ/IFMA/PF/ER/CD/BW/VL.
const LEAF7_EBX_XSAVE_FAMILY: u32 = (1 << 5)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);

/// Guest CPU feature choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuOptions {
    /// Offer XSAVE and the AVX family. Turn off where the host's XSAVE CPUID is inconsistent
    /// (nested KVM on QEMU TCG, i.e. the lab), as QEMU's `-cpu host,xsave=off` does.
    pub xsave: bool,
}

impl Default for CpuOptions {
    fn default() -> Self {
        Self { xsave: true }
    }
}

/// x2APIC topology level types in leaf 0xB/0x1F ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` things.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Rewrites `entries` (KVM's supported CPUID) for vCPU `id` of `count`, each vCPU a core of
/// one socket, one thread per core. APIC id = vCPU index.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], id: u8, count: u8, opts: CpuOptions) {
    let (id, count) = (u32::from(id), u32::from(count));
    let core_bits = bits_for(count);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (count.clamp(1, 255) << 16);
                e.ecx |= LEAF1_ECX_TSC_DEADLINE | LEAF1_ECX_HYPERVISOR;
                e.ecx &= !LEAF1_ECX_VMX;
                if !opts.xsave {
                    e.ecx &= !LEAF1_ECX_XSAVE_FAMILY;
                }
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x7 if e.index == 0 && !opts.xsave => e.ebx &= !LEAF7_EBX_XSAVE_FAMILY,
            0xd if !opts.xsave => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x4 => {
                // Intel deterministic cache parameters: cores per package - 1 in EAX[31:26].
                e.eax = (e.eax & 0x03ff_ffff) | ((count.saturating_sub(1) & 0x3f) << 26);
            }
            0xb | 0x1f => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            // Nested virtualization would need KVM_GET/SET_NESTED_STATE in the migration
            // stream; without it a guest hypervisor's guests are lost (issue 12), so the
            // guest is not offered SVM (nor VMX, leaf 1) at all.
            0x8000_0001 => e.ecx &= !LEAF_8000_0001_ECX_SVM,
            0x8000_000a => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x8000_0008 => {
                // AMD: ApicIdSize in ECX[15:12], NC (cores - 1) in ECX[7:0].
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count.saturating_sub(1) & 0xff);
            }
            0x8000_001e => {
                // AMD extended APIC id; one thread per core, core id = APIC id.
                e.eax = id;
                e.ebx = (e.ebx & !0xff) | (id & 0xff);
                e.ecx &= !0xff;
            }
            // KVM's paravirt features (kvmclock, PV EOI, async PF, steal time, PV TLB flush,
            // PV IPIs) as KVM reports them, except PV_UNHALT: see [`KVM_FEATURE_PV_UNHALT`].
            0x4000_0001 => e.eax &= !KVM_FEATURE_PV_UNHALT,
            // 0x4000_0000 (KVM signature) and the rest are kept.
            _ => {}
        }
    }
}

/// The CPUID for vCPU `id` of `count`, derived from KVM's supported list.
pub fn for_vcpu(supported: &CpuId, id: u8, count: u8, opts: CpuOptions) -> CpuId {
    let mut cpuid = supported.clone();
    normalize(cpuid.as_mut_slice(), id, count, opts);
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xdead_0800,
            ..Default::default()
        }
    }

    #[test]
    fn topology_matches_the_madt() {
        let mut e = vec![
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0008, 0),
            entry(0x4000_0001, 0),
        ];
        let kvm_leaf = e[4];
        normalize(&mut e, 2, 3, CpuOptions::default());
        assert_eq!(e[0].ebx >> 24, 2, "initial APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 3, "logical processors");
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e[0].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!((e[1].edx, e[2].edx), (2, 2), "x2APIC id on every subleaf");
        assert_eq!((e[1].ebx, e[2].ebx, e[2].eax), (1, 3, 2));
        assert_eq!((e[1].ecx >> 8, e[2].ecx >> 8), (LEVEL_SMT, LEVEL_CORE));
        assert_eq!(e[3].ecx & 0xff, 2);
        assert_eq!(
            e[4], kvm_leaf,
            "KVM paravirt leaf untouched but for PV_UNHALT"
        );
    }

    #[test]
    fn paravirtual_spinlocks_are_not_offered_the_other_kvm_features_are() {
        // kvmclock (bits 0, 3), PV_UNHALT (7), PV_EOI (6), steal time (5).
        let mut e = vec![kvm_cpuid_entry2 {
            function: 0x4000_0001,
            eax: 0b1110_1001,
            ..Default::default()
        }];
        normalize(&mut e, 0, 2, CpuOptions::default());
        assert_eq!(e[0].eax, 0b0110_1001);
    }

    #[test]
    fn hardware_virtualization_is_hidden() {
        let mut e = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ecx: LEAF1_ECX_VMX | 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0001,
                ecx: LEAF_8000_0001_ECX_SVM | 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_000a,
                eax: 1,
                ebx: 8,
                edx: 0x1ff,
                ..Default::default()
            },
        ];
        normalize(&mut e, 0, 1, CpuOptions::default());
        assert_eq!(e[0].ecx, 1 | LEAF1_ECX_TSC_DEADLINE | LEAF1_ECX_HYPERVISOR);
        assert_eq!(e[1].ecx, 1, "SVM hidden, the rest kept");
        assert_eq!((e[2].eax, e[2].ebx, e[2].edx), (0, 0, 0), "no SVM features");
    }

    #[test]
    fn xsave_can_be_hidden() {
        let mut e = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ecx: LEAF1_ECX_XSAVE_FAMILY | 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: (1 << 5) | (1 << 3),
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xd,
                eax: 7,
                ebx: 0x340,
                ..Default::default()
            },
        ];
        normalize(&mut e, 0, 1, CpuOptions { xsave: false });
        assert_eq!(e[0].ecx & LEAF1_ECX_XSAVE_FAMILY, 0);
        assert_eq!(e[0].ecx & 1, 1, "other features kept");
        assert_eq!(e[1].ebx, 1 << 3, "AVX2 hidden, BMI1 kept");
        assert_eq!((e[2].eax, e[2].ebx), (0, 0));
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut e = vec![kvm_cpuid_entry2 {
            function: 1,
            edx: LEAF1_EDX_HTT,
            ..Default::default()
        }];
        normalize(&mut e, 0, 1, CpuOptions::default());
        assert_eq!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(5), 3);
    }
}
