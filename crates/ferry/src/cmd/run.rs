//! `ferry run`: boot a VM with ferry's VMM until it powers off or is shut down.

use anyhow::{bail, Result};
use ferry_vmm::{ExitReason, RunArgs};

/// Runs the VM in the foreground. A guest reset or a vCPU failure is an error.
pub fn run(args: RunArgs) -> Result<()> {
    match ferry_vmm::run(args.into_config())? {
        ExitReason::Shutdown | ExitReason::GuestPowerOff => Ok(()),
        ExitReason::GuestReset => bail!("the guest reset the machine"),
        ExitReason::Error(e) => bail!("the VM failed: {e}"),
    }
}
