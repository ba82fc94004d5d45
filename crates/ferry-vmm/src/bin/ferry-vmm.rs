//! `ferry-vmm`: boots one VM from the command line (the same arguments as `ferry run`).
//! Exit status: 0 after a guest power-off or API shutdown, 2 after a guest reset, 1 on error.

use clap::Parser;
use ferry_vmm::{ExitReason, RunArgs};

#[derive(Parser)]
#[command(version, about = "Boot a Linux guest under KVM (ferry's VMM)")]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match ferry_vmm::run(cli.run.into_config()) {
        Ok(ExitReason::Shutdown | ExitReason::GuestPowerOff) => std::process::ExitCode::SUCCESS,
        Ok(ExitReason::GuestReset) => std::process::ExitCode::from(2),
        Ok(ExitReason::Error(e)) => {
            eprintln!("ferry-vmm: the VM failed: {e}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("ferry-vmm: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            std::process::ExitCode::FAILURE
        }
    }
}
