//! Faults of the lab itself, told apart from failures of the code under test.
//!
//! The lab host is an emulated machine (nested SVM under QEMU's TCG, see docs/lab.md), and
//! that emulation has been caught corrupting its guests: it writes the lab host's own CR3
//! into a guest vCPU's state. A test that finds such a fault, with evidence no code under
//! test can produce, ends its test binary with [`LAB_FAULT_EXIT`] after printing the
//! evidence; `lab/test` runs that binary again (`FERRY_LAB_FAULT_RETRIES`, default 2) and
//! counts it.
//! Anything without that evidence stays a test failure.
//!
//! Two kinds of evidence: a vCPU state read from the VMM (its CR3 outside RAM, see
//! `ferry_vmm`'s `VcpuState::page_tables_outside`), and, when KVM has already reset the vCPU
//! (a triple fault), the lab host KVM's trace of nested page faults that `lab/lab-init` keeps
//! ([`page_walks_outside_ram`]).

/// Exit status of a test binary stopped by a proven lab fault (the same status `lab/run`
/// gives when the lab host itself crashed).
pub const LAB_FAULT_EXIT: i32 = 125;

/// Prints `evidence` and ends the test process with [`LAB_FAULT_EXIT`]; other tests of the
/// binary do not run (`lab/test` runs the binary again).
pub fn exit_lab_fault(evidence: &str) -> ! {
    eprintln!("LAB FAULT (the lab's emulated host, not the code under test): {evidence}");
    std::process::exit(LAB_FAULT_EXIT)
}

/// Where the lab host keeps its trace (`lab/lab-init` mounts it and traces KVM's nested page
/// faults above 4 GiB, with the faulting process).
const TRACE: &str = "/sys/kernel/tracing/trace";

/// One nested page fault from the lab host's trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NestedFault {
    tgid: u32,
    rip: u64,
    address: u64,
}

/// Parses a `kvm_page_fault` line of the trace (`record-tgid` on):
/// `vcpu-0-1234 (   1230) [001] d.... 12.345: kvm_page_fault: vcpu 0 rip 0x... address
/// 0x... error_code 0x...`.
fn parse_fault(line: &str) -> Option<NestedFault> {
    let (head, event) = line.split_once(" kvm_page_fault: ")?;
    let tgid = head
        .split_once('(')?
        .1
        .split_once(')')?
        .0
        .trim()
        .parse()
        .ok()?;
    let mut words = event.split_whitespace();
    let mut field = |name: &str| -> Option<u64> {
        words.find(|w| *w == name)?;
        u64::from_str_radix(words.next()?.trim_start_matches("0x"), 16).ok()
    };
    let rip = field("rip")?;
    let address = field("address")?;
    Some(NestedFault { tgid, rip, address })
}

/// The nested page faults of process `tgid` that show a guest walking its *top-level* page
/// table outside its RAM (`ram`: `(start, len)` regions): a fault at an address outside RAM
/// whose offset in its page is the top-level slot of the guest RIP (bits 39-47), which is the
/// first access of a walk that starts at CR3. A guest never loads such a CR3 and ferry never
/// restores one, so this is the lab's fault even after KVM reset the vCPU (a triple fault
/// erases CR3). One line per fault (at most 8); empty without the trace or without such a
/// fault.
pub fn page_walks_outside_ram(tgid: u32, ram: &[(u64, u64)]) -> Vec<String> {
    let Ok(trace) = std::fs::read_to_string(TRACE) else {
        return Vec::new();
    };
    walks_outside_ram(&trace, tgid, ram)
}

fn walks_outside_ram(trace: &str, tgid: u32, ram: &[(u64, u64)]) -> Vec<String> {
    let inside = |a: u64| ram.iter().any(|&(s, l)| a >= s && a - s < l);
    trace
        .lines()
        .filter_map(parse_fault)
        .filter(|f| {
            f.tgid == tgid && !inside(f.address) && (f.address & 0xfff) / 8 == (f.rip >> 39) & 511
        })
        .take(8)
        .map(|f| {
            format!(
                "lab host KVM: process {} took a nested page fault at {:#x} walking the page \
                 tables for guest RIP {:#x} from a top-level table at {:#x}, outside the \
                 guest's RAM",
                f.tgid,
                f.address,
                f.rip,
                f.address & !0xfff
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE_TEXT: &str = "\
# tracer: nop
#
           <...>-4321    (   4300) [001] d.... 100.000001: kvm_page_fault: vcpu 0 rip 0xffffffffc035120c address 0x0000000100ab6ff8 error_code 0x200000014
           <...>-4321    (   4300) [001] d.... 100.000002: kvm_page_fault: vcpu 0 rip 0xffffffffc035120c address 0x0000000100ab6ff0 error_code 0x200000014
          vcpu-1-4400    (   4399) [000] d.... 100.000003: kvm_page_fault: vcpu 1 rip 0xffffffff81a18710 address 0x0000000100ab6ff8 error_code 0x200000014
           <...>-4321    (   4300) [001] d.... 100.000004: kvm_page_fault: vcpu 0 rip 0xffffffffc035120c address 0x0000000000ab6ff8 error_code 0x100000004
";

    #[test]
    fn reads_faults_from_the_trace() {
        let f = parse_fault(TRACE_TEXT.lines().nth(2).unwrap()).unwrap();
        assert_eq!(
            f,
            NestedFault {
                tgid: 4300,
                rip: 0xffff_ffff_c035_120c,
                address: 0x1_00ab_6ff8
            }
        );
        assert_eq!(parse_fault("# tracer: nop"), None);
    }

    #[test]
    fn a_top_level_walk_outside_ram_of_that_process_is_evidence() {
        let ram = [(0, 256 << 20)];
        let found = walks_outside_ram(TRACE_TEXT, 4300, &ram);
        // Slot 511 (RIP 0xffffffffc...) at offset 0xff8: evidence. Offset 0xff0 is another
        // slot (a lower-level entry could point anywhere), 0xab6ff8 is inside RAM, and
        // process 4399 is another VMM.
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("at 0x100ab6ff8"), "{found:?}");
        assert!(
            found[0].contains("top-level table at 0x100ab6000"),
            "{found:?}"
        );
        assert_eq!(
            walks_outside_ram(TRACE_TEXT, 4300, &[(0, 8 << 30)]).len(),
            0
        );
        assert_eq!(walks_outside_ram(TRACE_TEXT, 1, &ram).len(), 0);
    }
}
