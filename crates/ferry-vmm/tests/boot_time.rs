//! Boot time of the guest image to the agent's ready line, ferry-vmm next to Debian's QEMU
//! (`-M microvm,acpi=on`) on the same image and command line. A measurement, not an assertion:
//! it prints a table. Run in the lab, preferably from a release build:
//! ```text
//! cargo test --release -p ferry-vmm --test boot_time --no-run
//! lab/run -- target/release/deps/boot_time-<hash> --ignored --nocapture
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ferry_lab::{Guest, GuestConfig, GuestImage, QemuMicrovm, Vmm};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
/// Boots per VMM.
const RUNS: usize = 2;

struct FerryVmm(PathBuf);

impl Vmm for FerryVmm {
    fn name(&self) -> &str {
        "ferry-vmm"
    }

    fn command(&self, guest: &GuestConfig, serial_socket: &Path) -> Command {
        let mut c = Command::new(&self.0);
        c.arg("--kernel")
            .arg(&guest.image.kernel)
            .arg("--initrd")
            .arg(&guest.image.initrd)
            .args(["--memory", &format!("{}M", guest.mem_mib)])
            .args(["--vcpus", &guest.vcpus.to_string()])
            .args(["--cmdline", &guest.cmdline])
            .args(["--balloon", "hint,report"])
            .arg("--serial")
            .arg(format!("socket:{}", serial_socket.display()))
            .arg("--no-xsave");
        c
    }
}

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

#[test]
#[ignore = "needs hardware KVM: run through lab/run"]
fn boot_time_ferry_vs_qemu() -> Result<()> {
    ensure!(ferry_lab::hw_kvm_usable(), "run this through lab/run");
    let config = GuestConfig::new(GuestImage::locate()?);
    let ferry = FerryVmm(PathBuf::from(env!("CARGO_BIN_EXE_ferry-vmm")));
    let qemu = QemuMicrovm::default();
    println!("| VMM | run | boot to FERRY-AGENT READY |");
    println!("|---|---|---|");
    for vmm in [&ferry as &dyn Vmm, &qemu] {
        for run in 1..=RUNS {
            let took = boot_once(vmm, &config)?;
            println!("| {} | {run} | {:.2} s |", vmm.name(), took.as_secs_f64());
        }
    }
    Ok(())
}
