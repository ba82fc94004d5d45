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
    /// Migrate a simulated guest between two processes over loopback TCP.
    Sim(cmd::sim::SimArgs),
    /// The demo: a simulated guest with freed memory migrated with hints off, then on.
    Demo,
    /// Print the engine's benchmark table.
    Bench(cmd::bench::BenchArgs),
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
        Command::Sim(a) => cmd::sim::run(a),
        Command::Demo => {
            let args = cmd::sim::SimArgs::demo();
            cmd::sim::run(&args)
        }
        Command::Bench(a) => cmd::bench::run(a),
        Command::SimReceive(a) => cmd::sim::receive(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
