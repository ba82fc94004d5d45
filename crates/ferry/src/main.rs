//! The `ferry` command line.
#![forbid(unsafe_code)]

mod cmd;
mod progress;
mod report;
mod tls;
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
    /// Wait for a live migration, build the VM its source describes, then run the guest.
    Receive(cmd::receive::ReceiveArgs),
    /// Live-migrate a running VM (ask its VMM through --api) to a `ferry receive`.
    Migrate(cmd::migrate::MigrateArgs),
    #[command(flatten)]
    Control(cmd::control::ControlCommand),
    #[cfg(feature = "dev-tools")]
    /// The demo: boot the Debian guest image under ferry's VMM (in the lab without hardware
    /// KVM), free most of its memory, live-migrate it with hints off, then on, and compare.
    Demo(cmd::vmdemo::VmDemoArgs),
    #[cfg(feature = "dev-tools")]
    /// Migrate a simulated guest between two processes over loopback TCP.
    Sim(cmd::sim::SimArgs),
    #[cfg(feature = "dev-tools")]
    /// The engine-only demo: a simulated guest with freed memory migrated between two
    /// processes with hints off, then on (no VM, no lab).
    SimDemo,
    #[cfg(feature = "dev-tools")]
    /// Print the engine's benchmark table.
    Bench(cmd::bench::BenchArgs),
    #[cfg(feature = "dev-tools")]
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
    /// Print the control API's JSON Schema (every request, reply, result and error code) to
    /// stdout; the same as docs/api-schema.json.
    ApiSchema,
    #[cfg(feature = "dev-tools")]
    /// Receiving side of `ferry sim` (started by it).
    #[command(hide = true)]
    SimReceive(cmd::sim::ReceiveArgs),
    #[cfg(feature = "dev-tools")]
    /// Sending side of a simulated migration, alone (for tests that kill it).
    #[command(hide = true)]
    SimSend(cmd::sim::SendArgs),
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
        #[cfg(feature = "dev-tools")]
        Command::Demo(a) => cmd::vmdemo::run(a),
        #[cfg(feature = "dev-tools")]
        Command::Sim(a) => cmd::sim::run(a),
        #[cfg(feature = "dev-tools")]
        Command::SimDemo => {
            let args = cmd::sim::SimArgs::demo();
            cmd::sim::run(&args)
        }
        #[cfg(feature = "dev-tools")]
        Command::Bench(a) => cmd::bench::run(a),
        #[cfg(feature = "dev-tools")]
        Command::BenchVm(a) => cmd::bench_vm::run(a),
        #[cfg(feature = "dev-tools")]
        Command::SimReceive(a) => cmd::sim::receive(a),
        #[cfg(feature = "dev-tools")]
        Command::SimSend(a) => cmd::sim::send(a),
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a write error (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "ferry", &mut script);
            write_stdout(&script, "the completion script")
        }
        Command::ApiSchema => write_stdout(
            ferry_vmm::api_schema::schema_text().as_bytes(),
            "the API schema",
        ),
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
            // The lab is test tooling: only a developer build knows of it.
            #[cfg(feature = "dev-tools")]
            if error_chain(&e).contains("kvm_pvm") {
                eprintln!(
                    "ferry: hint: in a ferry checkout, `lab/run -- ferry ...` runs the command in \
                     the lab, a host with hardware KVM (docs/lab.md)"
                );
            }
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

// The documented command lines include the developer commands.
#[cfg(all(test, feature = "dev-tools"))]
mod docs_examples {
    //! Every `ferry ...` command line shown in a code block of README.md or docs/*.md parses
    //! with this build's command line, so the documentation cannot drift from the CLI.
    //! Notation the docs use for readers is expanded first: `[optional]` parts are kept (the
    //! first alternative of `a | b`), `x|y` takes `x` (each alternative, for the command
    //! word), a trailing `# comment` is dropped, `\` continues a line; lines with `...`
    //! (elided arguments) are skipped.

    use super::*;

    /// The command lines in the fenced code blocks of `text`.
    fn examples(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let (mut in_code, mut pending) = (false, String::new());
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
                continue;
            }
            if !in_code {
                continue;
            }
            let line = line.trim();
            let line = line.strip_prefix("$ ").unwrap_or(line);
            let line = line.strip_prefix("target/release/").unwrap_or(line);
            if pending.is_empty() && !line.starts_with("ferry ") {
                continue;
            }
            let line = match line.find(" #") {
                Some(i) => line[..i].trim_end(),
                None => line,
            };
            match line.strip_suffix('\\') {
                Some(head) => pending.push_str(head),
                None => {
                    pending.push_str(line);
                    out.push(std::mem::take(&mut pending));
                }
            }
        }
        out
    }

    /// `line` with the docs' notation expanded, one argument list per alternative of the
    /// command word.
    fn expand(line: &str) -> Vec<Vec<String>> {
        let mut flat = String::new();
        let mut rest = line;
        while let Some(open) = rest.find('[') {
            flat.push_str(&rest[..open]);
            let close = rest[open..].find(']').map_or(rest.len(), |c| open + c);
            let inner = &rest[open + 1..close.min(rest.len())];
            flat.push_str(inner.split(" | ").next().unwrap_or(""));
            rest = rest.get(close + 1..).unwrap_or("");
        }
        flat.push_str(rest);
        let words: Vec<&str> = flat.split_whitespace().collect();
        let Some(command) = words.get(1) else {
            return Vec::new();
        };
        command
            .split('|')
            .map(|c| {
                let mut args = vec!["ferry".to_owned(), c.to_owned()];
                args.extend(
                    words[2..]
                        .iter()
                        .map(|w| w.split('|').next().unwrap_or(w).to_owned()),
                );
                args
            })
            .collect()
    }

    #[test]
    fn the_notation_is_expanded() {
        assert_eq!(
            expand("ferry pause|resume --api /tmp/a [--json] [--size 1G | --guest-memory 2G]"),
            vec![
                vec!["ferry", "pause", "--api", "/tmp/a", "--json", "--size", "1G"],
                vec!["ferry", "resume", "--api", "/tmp/a", "--json", "--size", "1G"],
            ]
        );
        assert_eq!(
            examples("```sh\nferry a \\\n  --b c   # note\n$ ferry d\n```\nferry e\n"),
            vec!["ferry a --b c", "ferry d"]
        );
    }

    #[test]
    fn every_documented_command_line_parses() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut files = vec![root.join("README.md")];
        let mut docs: Vec<_> = std::fs::read_dir(root.join("docs"))
            .expect("docs/")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "md"))
            .collect();
        docs.sort();
        files.extend(docs);
        let (mut checked, mut failures) = (0, Vec::new());
        for file in &files {
            let text = std::fs::read_to_string(file).expect("readable doc");
            for line in examples(&text).into_iter().filter(|l| !l.contains("...")) {
                for args in expand(&line) {
                    checked += 1;
                    if let Err(e) = Cli::try_parse_from(&args) {
                        let first = e.to_string().lines().next().unwrap_or("").to_owned();
                        failures.push(format!("{}: `{line}`: {first}", file.display()));
                    }
                }
            }
        }
        assert!(
            checked >= 20,
            "only {checked} command lines found in the docs"
        );
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
