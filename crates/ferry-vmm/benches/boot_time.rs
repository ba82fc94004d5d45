//! Boot time of the guest image to the agent's ready line, ferry-vmm next to Debian's QEMU
//! (`-M microvm,acpi=on`) on the same image and command line, interleaved. A measurement that
//! prints a markdown table. Needs hardware KVM; in the lab (where shmem THP must be enabled
//! for ferry's memfd RAM to get huge pages, see docs/vmm.md):
//! ```text
//! cargo bench -p ferry-vmm --bench boot_time --no-run     # prints target/release/deps/boot_time-<hash>
//! lab/run -- sh -c 'echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled &&
//!     target/release/deps/boot_time-<hash> [RUNS]'
//! ```

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ferry_lab::{FerryLaunch, FerryVmm, Guest, GuestConfig, GuestImage, QemuMicrovm, Vmm};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
/// Boots per VMM unless given on the command line.
const RUNS_DEFAULT: usize = 3;

fn boot_once(vmm: &dyn Vmm, config: &GuestConfig) -> Result<Duration> {
    let start = Instant::now();
    let mut guest = Guest::spawn(vmm, config)?;
    guest
        .agent()
        .wait_ready(BOOT_TIMEOUT)
        .with_context(|| guest.vmm_log())?;
    let took = start.elapsed();
    guest.agent().command("shutdown", Duration::from_secs(60))?;
    let status = guest.wait_exit(Duration::from_secs(60))?;
    ensure!(status.success(), "{} exited with {status}", vmm.name());
    Ok(took)
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; a number is the run count.
    let runs = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(RUNS_DEFAULT);
    if !ferry_lab::hw_kvm_usable() {
        println!("boot_time: no hardware KVM here, nothing measured (run it through lab/run)");
        return Ok(());
    }
    let config = GuestConfig::new(GuestImage::locate()?);
    let ferry = FerryVmm::new(env!("CARGO_BIN_EXE_ferry-vmm"), FerryLaunch::Vmm);
    let qemu = QemuMicrovm::default();
    println!("| run | VMM | boot to FERRY-AGENT READY |");
    println!("|---|---|---|");
    for run in 1..=runs {
        for vmm in [&ferry as &dyn Vmm, &qemu] {
            let took = boot_once(vmm, &config)?;
            println!("| {run} | {} | {:.2} s |", vmm.name(), took.as_secs_f64());
        }
    }
    Ok(())
}
