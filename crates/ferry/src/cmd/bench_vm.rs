//! `ferry bench-vm`: the live-migration benchmark with a real guest (issue 6). Runs the
//! workload matrix (idle, freed, dirty) under ferry's VMM with hints off and on and under
//! Debian's QEMU without and with free-page-hint, writes `build/bench/results.json`, prints
//! the markdown table with the goals' ratios and PASS/MISS, and draws `build/bench/bytes.png`
//! and `time.png`.
//!
//! Without hardware KVM (PVM machines) the command re-executes itself inside the lab through
//! `lab/run` with `--in-lab`; that copy runs the matrix and writes the JSON, this one reports.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{ArgAction, Args};

use ferry_bench::{chart, report, runner, BenchConfig, Results, Variant, Workload};

/// `ferry bench-vm` arguments.
#[derive(Debug, Clone, Args)]
pub struct BenchVmArgs {
    /// Migrations per case; the table shows medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Guest RAM in MiB (both VMMs).
    #[arg(long, default_value_t = 1024)]
    pub memory_mib: u64,
    /// Guest vCPUs (both VMMs).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// The agent's integrity data set in MiB, checked on every destination.
    #[arg(long, default_value_t = 32)]
    pub dataset_mib: u64,
    /// What the freed workload touches and frees, MiB [default: 3/4 of the RAM, at most
    /// MemAvailable - 192 MiB].
    #[arg(long)]
    pub freed_mib: Option<u64>,
    /// The dirty workload's working set, MiB.
    #[arg(long, default_value_t = 64)]
    pub dirty_mib: u64,
    /// The dirty workload's rate, MiB/s.
    #[arg(long, default_value_t = 16)]
    pub dirty_rate: u64,
    /// Downtime limit for both VMMs, ms.
    #[arg(
        long,
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=crate::units::DOWNTIME_MS_MAX)
    )]
    pub downtime_ms: u64,
    /// A slow link between the hosts, Mbit/s, the same for both VMMs: in the lab a token
    /// bucket on the lab host's loopback that all their connections share (`tc ... tbf`);
    /// on a hardware host each VMM's own limiter (ferry `--bandwidth`, QEMU
    /// `max-bandwidth`), leaving the host's loopback alone [default: none].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub link_mbit: Option<u64>,
    /// Workloads, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "idle,freed,dirty")]
    pub workloads: Vec<Workload>,
    /// Variants, comma separated: ferry-off, ferry-on (hints), qemu-off, qemu-hint
    /// (free-page-hint), and the compressed ferry-zstd (hints, zstd level 1, 2 connections)
    /// and qemu-zstd (multifd zstd level 1, 2 channels).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ferry-off,ferry-on,qemu-off,qemu-hint"
    )]
    pub variants: Vec<Variant>,
    /// The QEMU binary of the baseline.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// QEMU's balloon offers free page reporting too, as ferry's does (true or false).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub qemu_reporting: bool,
    /// ferry's balloon offers free page reporting (true or false). Reported pages are
    /// discarded on the host while the guest runs; off, nothing is discarded.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub ferry_reporting: bool,
    /// ferry arms KVM's dirty log lazily (as `ferry migrate --lazy-dirty-log`).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub lazy_dirty_log: bool,
    /// ferry audits KVM's dirty log at every switchover and sends what it missed (as
    /// `ferry migrate --audit-dirty-log`); the soak reports the pages it found per hop.
    #[arg(long)]
    pub audit_dirty_log: bool,
    /// Output directory [default: build/bench in the workspace].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep each VMM setting's logs, guest consoles and QMP transcripts in `<out>/logs/`
    /// (deleted otherwise). ferry's VMMs log at the level FERRY_LOG sets, e.g.
    /// `FERRY_LOG=ferry_balloon=debug,ferry_migration=debug`.
    #[arg(long)]
    pub keep_logs: bool,
    /// Time limit of the lab run, seconds.
    #[arg(long, default_value_t = 3600)]
    pub lab_timeout: u64,
    /// The lab host's memory in GiB [default: room for a source and a destination guest
    /// plus 4 GiB, at least 8].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub lab_mem_gib: Option<u64>,
    /// Print the table and draw the charts of an existing results.json; run nothing.
    #[arg(long, value_name = "RESULTS_JSON")]
    pub render: Option<PathBuf>,
    /// Soak instead of the matrix: each VMM setting's guest hops HOPS times along a chain of
    /// fresh VMM processes while it checks its pages; prints failures by kind per setting.
    #[arg(long, value_name = "HOPS", value_parser = clap::value_parser!(u32).range(1..))]
    pub soak: Option<u32>,
    /// The soak's longest random gap between two hops, ms.
    #[arg(long, default_value_t = 10_000, requires = "soak")]
    pub soak_gap_ms: u64,
    /// The soak's seed for the gaps [default: the time; printed].
    #[arg(long, requires = "soak")]
    pub soak_seed: Option<u64>,
    /// In the soak, ferry digests guest RAM at every switchover and each hop compares the
    /// source's with the destination's (finds lost writes the guest does not notice; adds a
    /// read of all RAM to the downtime).
    #[arg(long, requires = "soak")]
    pub soak_ram_digests: bool,
    /// Run the matrix here and only write results.json (how the lab copy is started).
    #[arg(long, hide = true)]
    pub in_lab: bool,
    /// Where the lab copy writes results.json instead of --out: a directory the lab shares
    /// (--out may be anywhere on this host, e.g. /tmp, which the lab cannot see).
    #[arg(long, hide = true, requires = "in_lab")]
    pub lab_results: Option<PathBuf>,
}

impl BenchVmArgs {
    /// The lab host's memory: during a migration both the source's and the destination's
    /// guest RAM can be populated (hints off sends every page), plus the lab's own use.
    fn lab_mem_gib(&self) -> u64 {
        self.lab_mem_gib
            .unwrap_or_else(|| ((2 * self.memory_mib).div_ceil(1024) + 4).max(8))
    }

    fn out_dir(&self) -> Result<PathBuf> {
        match &self.out {
            Some(dir) => Ok(dir.clone()),
            None => Ok(ferry_lab::workspace_root()?.join("build/bench")),
        }
    }

    fn config(&self) -> Result<BenchConfig> {
        let exe = std::env::current_exe().context("locating the ferry binary")?;
        let mut config = BenchConfig::new(exe);
        config.qemu_binary = self.qemu.clone();
        config.memory_mib = self.memory_mib;
        config.vcpus = self.vcpus;
        config.dataset_mib = self.dataset_mib;
        config.freed_mib = self.freed_mib;
        config.dirty_mib = self.dirty_mib;
        config.dirty_rate_mib_s = self.dirty_rate;
        config.repeat = self.repeat;
        config.downtime_limit_ms = self.downtime_ms;
        config.qemu_reporting = self.qemu_reporting;
        config.ferry_reporting = self.ferry_reporting;
        config.lazy_dirty_log = self.lazy_dirty_log;
        config.audit_dirty_log = self.audit_dirty_log;
        config.link_mbit = self.link_mbit;
        config.workloads = self.workloads.clone();
        config.variants = self.variants.clone();
        if self.keep_logs {
            let base = match &self.lab_results {
                Some(dir) => dir.clone(),
                None => self.out_dir()?,
            };
            config.keep_logs = Some(base.join("logs"));
        }
        config.command = command_line();
        Ok(config)
    }
}

/// `ferry bench-vm ...` as typed (without the hidden `--in-lab`).
fn command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--in-lab")
        .collect();
    format!("ferry {}", args.join(" "))
}

/// Runs `ferry bench-vm`.
pub fn run(args: &BenchVmArgs) -> Result<()> {
    let out = args.out_dir()?;
    let json = out.join("results.json");
    if let Some(path) = &args.render {
        return render(&Results::load(path)?, &out);
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "ferry: warning: this is a debug build; benchmark numbers want \
             `cargo build --release -p ferry`"
        );
    }
    if let Some(hops) = args.soak {
        if args.in_lab || ferry_lab::hw_kvm_usable() {
            return soak(args, hops);
        }
        return run_in_lab(args, None);
    }
    if args.in_lab || ferry_lab::hw_kvm_usable() {
        let json = match &args.lab_results {
            Some(dir) => dir.join("results.json"),
            None => json,
        };
        let results = runner::run_matrix(&args.config()?, &mut |line| eprintln!("bench: {line}"))?;
        results.save(&json)?;
        eprintln!("bench: wrote {}", json.display());
        if args.in_lab {
            return Ok(());
        }
        return render(&results, &out);
    }
    // The lab writes into the checkout (which it shares), and the results move to --out.
    let staging =
        ferry_lab::workspace_root()?.join(format!("build/bench/lab-{}", std::process::id()));
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let ran = run_in_lab(args, Some(&staging));
    // The logs are kept even when the run failed: that is when they are wanted.
    if args.keep_logs && staging.join("logs").is_dir() {
        let logs = out.join("logs");
        match ferry_bench::runner::copy_dir(&staging.join("logs"), &logs) {
            Ok(()) => eprintln!("ferry: the VMMs' logs are in {}", logs.display()),
            Err(e) => eprintln!("ferry: could not copy the logs to {}: {e}", logs.display()),
        }
    }
    let moved = ran.and_then(|()| {
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        std::fs::copy(staging.join("results.json"), &json)
            .with_context(|| format!("copying the lab's results to {}", json.display()))
    });
    let _ = std::fs::remove_dir_all(&staging);
    moved?;
    render(&Results::load(&json)?, &out)
}

/// Runs the soak here and prints its table; fails if a hop failed.
fn soak(args: &BenchVmArgs, hops: u32) -> Result<()> {
    let seed = args.soak_seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut soak = ferry_bench::soak::SoakConfig::new(hops, seed);
    soak.gap_ms = args.soak_gap_ms;
    soak.ram_digests = args.soak_ram_digests;
    let config = args.config()?;
    eprintln!(
        "soak: {hops} hops per setting, {} MiB, {} vCPUs, gaps 0-{} ms, --soak-seed {seed}",
        config.memory_mib, config.vcpus, soak.gap_ms
    );
    let tallies =
        ferry_bench::soak::run_soak(&config, &soak, &mut |line| eprintln!("soak: {line}"))?;
    println!(
        "soak summary ({}, --soak-seed {seed}):\n{}",
        config.command,
        ferry_bench::soak::table(&tallies)
    );
    let failed: u32 = tallies.iter().map(|t| t.failed() + t.boot_failures).sum();
    if failed > 0 {
        bail!("{failed} hop(s) or boot(s) failed: see the log above");
    }
    Ok(())
}

/// Re-executes this command inside the lab (`lab/run`); the benchmark there writes its
/// results.json into `results` (a fresh directory inside the checkout, which the lab shares).
fn run_in_lab(args: &BenchVmArgs, results: Option<&Path>) -> Result<()> {
    ferry_lab::GuestImage::locate().context("the guest image")?;
    let lab_run = ferry_lab::workspace_root()?.join("lab/run");
    if !lab_run.is_file() {
        bail!("no hardware KVM here and no {}", lab_run.display());
    }
    eprintln!("ferry: no hardware KVM here: running the benchmark inside the lab (lab/run)");
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    let mut command = Command::new(&lab_run);
    let mem = format!("{}G", args.lab_mem_gib());
    eprintln!("ferry: lab host with {mem} of memory (--lab-mem-gib)");
    command
        .args([
            "--timeout",
            &args.lab_timeout.to_string(),
            "--mem",
            &mem,
            "--",
        ])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .arg("--in-lab");
    if let Some(dir) = results {
        command.arg("--lab-results").arg(dir);
    }
    let status = command
        .status()
        .with_context(|| format!("starting {}", lab_run.display()))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(124) => bail!("the lab run timed out after {} s", args.lab_timeout),
        Some(125) => bail!("the lab host crashed (an infrastructure failure, not a result)"),
        _ => bail!("the benchmark failed inside the lab ({status}): see its log above"),
    }
}

/// Prints the table and writes the charts; fails if a migration failed or lost data.
fn render(results: &Results, out: &Path) -> Result<()> {
    println!("{}", report::markdown(results));
    match chart::write_charts(results, out) {
        Ok(paths) => {
            for p in paths {
                eprintln!("ferry: wrote {}", p.display());
            }
        }
        Err(chart::ChartError::Empty) => eprintln!("ferry: nothing measured, no charts"),
        Err(e) => return Err(e.into()),
    }
    let lost = results
        .cases
        .iter()
        .flat_map(|c| &c.samples)
        .filter(|s| !s.verified || !s.kernel_errors.is_empty())
        .count();
    if !results.failures.is_empty() || lost > 0 {
        bail!(
            "{} part(s) of the matrix failed and {lost} migration(s) failed the integrity check",
            results.failures.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchVmArgs,
    }

    fn parse(args: &[&str]) -> BenchVmArgs {
        Cli::try_parse_from(std::iter::once("bench-vm").chain(args.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn the_lab_host_has_room_for_both_guests() {
        assert_eq!(parse(&[]).lab_mem_gib(), 8);
        assert_eq!(parse(&["--memory-mib", "4096"]).lab_mem_gib(), 12);
        assert_eq!(parse(&["--memory-mib", "8192"]).lab_mem_gib(), 20);
        assert_eq!(
            parse(&["--memory-mib", "8192", "--lab-mem-gib", "18"]).lab_mem_gib(),
            18
        );
        assert!(Cli::try_parse_from(["bench-vm", "--lab-mem-gib", "0"]).is_err());
    }

    #[test]
    fn logs_are_kept_beside_the_results_only_when_asked() {
        assert_eq!(
            parse(&["--out", "/tmp/b"]).config().unwrap().keep_logs,
            None
        );
        assert_eq!(
            parse(&["--out", "/tmp/b", "--keep-logs"])
                .config()
                .unwrap()
                .keep_logs,
            Some(PathBuf::from("/tmp/b/logs"))
        );
        // The lab copy writes where the host copy will look for them.
        let lab = parse(&[
            "--out",
            "/tmp/b",
            "--keep-logs",
            "--in-lab",
            "--lab-results",
            "/w/build/bench/lab-1",
        ]);
        assert_eq!(
            lab.config().unwrap().keep_logs,
            Some(PathBuf::from("/w/build/bench/lab-1/logs"))
        );
    }
}
