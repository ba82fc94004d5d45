//! The `ferry` command line.
#![forbid(unsafe_code)]

mod cmd;
mod progress;
mod report;
mod units;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// ferry: live migration for Rust VMMs that does not send the guest's free memory.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a Linux guest under KVM (ferry's VMM) and serve its control API.
    Run(ferry_vmm::RunArgs),
    /// Start an empty VM that waits for a live migration, then runs the migrated guest.
    Receive(cmd::receive::ReceiveArgs),
    /// Live-migrate a running VM (ask its VMM through --api) to a `ferry receive`.
    Migrate(cmd::migrate::MigrateArgs),
    #[command(flatten)]
    Control(cmd::control::ControlCommand),
    /// The demo: boot the Debian guest image under ferry's VMM (in the lab without hardware
    /// KVM), free most of its memory, live-migrate it with hints off, then on, and compare.
    Demo(cmd::vmdemo::VmDemoArgs),
    /// Migrate a simulated guest between two processes over loopback TCP.
    Sim(cmd::sim::SimArgs),
    /// The engine-only demo: a simulated guest with freed memory migrated between two
    /// processes with hints off, then on (no VM, no lab).
    SimDemo,
    /// Print the engine's benchmark table.
    Bench(cmd::bench::BenchArgs),
    /// Benchmark live migration of a real guest: ferry (hints off/on) vs QEMU (free-page-hint
    /// off/on) on the workload matrix; markdown table, JSON and PNG charts (in the lab without
    /// hardware KVM).
    BenchVm(cmd::bench_vm::BenchVmArgs),
    /// Receiving side of `ferry sim` (started by it).
    #[command(hide = true)]
    SimReceive(cmd::sim::ReceiveArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(a) => cmd::run::run(a.clone()),
        Command::Receive(a) => cmd::receive::run(a.clone()),
        Command::Migrate(a) => cmd::migrate::run(a),
        Command::Control(c) => cmd::control::run(c),
        Command::Demo(a) => cmd::vmdemo::run(a),
        Command::Sim(a) => cmd::sim::run(a),
        Command::SimDemo => {
            let args = cmd::sim::SimArgs::demo();
            cmd::sim::run(&args)
        }
        Command::Bench(a) => cmd::bench::run(a),
        Command::BenchVm(a) => cmd::bench_vm::run(a),
        Command::SimReceive(a) => cmd::sim::receive(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, leaving out a cause whose text its parent already includes.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !last.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
    }
    out
}
