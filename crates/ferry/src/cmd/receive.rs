//! `ferry receive`: a destination that waits for one live migration, builds the VM the
//! source describes, restores it, resumes the guest and keeps running it (serving its own
//! --api-socket) like `ferry run`. Only what the stream cannot tell is given here.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use ferry_migration::{Endpoint, ReceiveStats};
use ferry_vmm::receive::ReceiveObserver;
use ferry_vmm::{ExitReason, ReceiveSettings, SerialTarget, VmConfig};

use crate::tls::TlsArgs;

/// `ferry receive` arguments.
#[derive(Debug, Clone, Args)]
pub struct ReceiveArgs {
    /// Where to wait for the source: HOST:PORT (port 0 picks one), tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    pub listen: Endpoint,
    /// Serial console here: `stdio`, `file:PATH`, `socket:PATH` (listen, one client) or
    /// `none`. (Memory, vCPUs and devices come from the source.)
    #[arg(long, default_value = "stdio")]
    pub serial: SerialTarget,
    /// Unix socket path for the received VM's JSON control API.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Refuse a VM with more memory than this, e.g. 8G (the source is told why).
    #[arg(long, value_parser = ferry_vmm::units::parse_size)]
    pub max_memory: Option<u64>,
    /// Refuse a VM with more vCPUs than this.
    #[arg(long)]
    pub max_vcpus: Option<u8>,
    /// KVM device node.
    #[arg(long, default_value = "/dev/kvm")]
    pub kvm: PathBuf,
    /// Also append everything the guest prints on the console to this file.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Run even on PVM's /dev/kvm (the kvm_pvm module): for smoke tests.
    #[arg(long)]
    pub allow_pvm: bool,
    /// Accept compressed page data when the source offers it (`ferry migrate --compress`);
    /// `false` saves this host's CPU and the source sends pages as they are.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub accept_compression: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
}

struct Tell;

impl ReceiveObserver for Tell {
    fn listening(&mut self, endpoint: &Endpoint) {
        eprintln!("ferry: waiting for a migration on {endpoint}");
    }

    fn arriving(&mut self, config: &VmConfig) {
        eprintln!(
            "ferry: receiving a VM with {} of memory and {} vCPU(s)",
            ferry_vmm::units::mib(config.memory_bytes),
            config.vcpus
        );
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
    let settings = ReceiveSettings {
        serial: args.serial,
        api_socket: args.api_socket,
        kvm_path: args.kvm,
        console_log: args.console_log,
        allow_pvm: args.allow_pvm,
        max_memory_bytes: args.max_memory,
        max_vcpus: args.max_vcpus,
        accept_compression: args.accept_compression,
    };
    match ferry_vmm::receive::receive(settings, &args.listen, tls, &mut Tell)? {
        ExitReason::Shutdown | ExitReason::GuestPowerOff => Ok(()),
        ExitReason::GuestReset => bail!("the guest reset the machine"),
        ExitReason::Error(e) => bail!("the VM failed: {e}"),
    }
}
