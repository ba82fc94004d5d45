//! Faults of the lab itself, told apart from failures of the code under test.
//!
//! The lab host is an emulated machine (nested SVM under QEMU's TCG, see docs/lab.md), and
//! that emulation has been caught corrupting its guests: it writes the lab host's own CR3
//! into a guest vCPU's state. A test that finds such a fault, with evidence no code under
//! test can produce, ends its test binary with [`LAB_FAULT_EXIT`] after printing the
//! evidence; `lab/test` runs that binary once more (`FERRY_LAB_FAULT_RETRIES`) and counts it.
//! Anything without that evidence stays a test failure.

/// Exit status of a test binary stopped by a proven lab fault (the same status `lab/run`
/// gives when the lab host itself crashed).
pub const LAB_FAULT_EXIT: i32 = 125;

/// Prints `evidence` and ends the test process with [`LAB_FAULT_EXIT`]; other tests of the
/// binary do not run (`lab/test` runs the binary again).
pub fn exit_lab_fault(evidence: &str) -> ! {
    eprintln!("LAB FAULT (the lab's emulated host, not the code under test): {evidence}");
    std::process::exit(LAB_FAULT_EXIT)
}
