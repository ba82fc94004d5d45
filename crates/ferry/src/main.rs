//! The `ferry` command line.
#![forbid(unsafe_code)]

mod cmd;
mod progress;
mod report;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;

/// ferry: live migration for Rust VMMs that does not send the guest's free memory.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Append log lines to this file instead of writing them to stderr (the level comes from
    /// FERRY_LOG, e.g. `info` or `ferry_migration=debug`; default `warn`).
    #[arg(long, global = true, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Log line format: `text`, or `json` (one object per line, for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// One readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

/// Sends `tracing` events to stderr or `--log-file`, as text or JSON, filtered by FERRY_LOG.
fn init_logging(cli: &Cli) -> std::io::Result<()> {
    let filter = EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let (writer, ansi) = match &cli.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            (BoxMakeWriter::new(std::sync::Mutex::new(file)), false)
        }
        None => (BoxMakeWriter::new(std::io::stderr), true),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match cli.log_format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
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
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout, e.g.
    /// `ferry completions bash > /etc/bash_completion.d/ferry`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print ferry's manual page (roff) to stdout, e.g. `ferry man | man -l -`.
    Man,
    /// Receiving side of `ferry sim` (started by it).
    #[command(hide = true)]
    SimReceive(cmd::sim::ReceiveArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("ferry: error: cannot open the log file {e}");
        return ExitCode::FAILURE;
    }
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
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a write error (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "ferry", &mut script);
            write_stdout(&script, "the completion script")
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut page)
                .map_err(|e| anyhow::anyhow!("rendering the manual page: {e}"))
                .and_then(|()| write_stdout(&page, "the manual page"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Writes generated text to stdout; a reader that went away (`| head`) is not an error.
fn write_stdout(bytes: &[u8], what: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::anyhow!("writing {what}: {e}"))
        }
        _ => Ok(()),
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
