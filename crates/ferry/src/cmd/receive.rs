//! `ferry receive`: an empty destination VM that waits for one live migration, restores it,
//! resumes the guest and keeps running it (serving its own --api-socket) like `ferry run`.

use anyhow::{bail, Result};
use clap::Args;

use ferry_migration::{Endpoint, ReceiveStats};
use ferry_vmm::receive::ReceiveObserver;
use ferry_vmm::{ExitReason, RunArgs};

use crate::tls::TlsArgs;

/// `ferry receive` arguments.
#[derive(Debug, Clone, Args)]
pub struct ReceiveArgs {
    /// Where to wait for the source: HOST:PORT (port 0 picks one), tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    pub listen: Endpoint,
    /// The VM, as given to `ferry run` on the source (memory size, vCPUs and balloon must
    /// match; the kernel and initrd are not loaded: everything comes from the source).
    #[command(flatten)]
    pub vm: RunArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
}

struct Tell;

impl ReceiveObserver for Tell {
    fn listening(&mut self, endpoint: &Endpoint) {
        eprintln!("ferry: waiting for a migration on {endpoint}");
    }

    fn running(&mut self, stats: &ReceiveStats, state_bytes: usize) {
        eprintln!(
            "ferry: migration received ({} pages with data, {} zeroed, {} rounds, {} bytes of \
             machine state, {:.0} ms); the guest runs here",
            stats.pages, stats.zero_pages, stats.rounds, state_bytes, stats.duration_ms
        );
    }
}

/// Runs `ferry receive` until the migrated VM stops.
pub fn run(args: ReceiveArgs) -> Result<()> {
    let tls = args.tls.load()?;
    match ferry_vmm::receive::receive(args.vm.into_config(), &args.listen, tls, &mut Tell)? {
        ExitReason::Shutdown | ExitReason::GuestPowerOff => Ok(()),
        ExitReason::GuestReset => bail!("the guest reset the machine"),
        ExitReason::Error(e) => bail!("the VM failed: {e}"),
    }
}
