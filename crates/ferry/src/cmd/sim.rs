//! `ferry sim`: migrate a simulated guest between two processes over loopback TCP.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use ferry_migration::{
    connect, BitmapDirtyLog, Destination, Endpoint, Listener, MemoryLayout, Migration,
    MigrationConfig, MigrationStats, Policy, ReceiveConfig, UnpopulatedSource,
};
use ferry_sim::{
    create_memory, verify, Guest, HintBehavior, SimConfig, SimDriver, SimVm, Workload,
};

use crate::progress::Bar;
use crate::report;
use crate::tls::TlsArgs;
use crate::units::{mib, parse_rate, parse_size};

/// What the simulated guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadArg {
    /// Nothing.
    Idle,
    /// Touch 75% of RAM, then free it, before migrating.
    Freed,
    /// Keep rewriting in-use pages at --dirty-rate.
    Dirty,
    /// Allocate, write and free pages at --dirty-rate.
    Churn,
}

/// Hints on, off, or both one after the other for comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HintsArg {
    /// Use free page hints and unpopulated memory.
    On,
    /// Send every page.
    Off,
    /// Migrate twice, off then on, and compare.
    Both,
}

/// `ferry sim` arguments.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Guest RAM size (e.g. 512M, 4G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub memory: u64,
    /// Guest workload.
    #[arg(long, value_enum, default_value_t = WorkloadArg::Freed)]
    pub workload: WorkloadArg,
    /// Free page hints.
    #[arg(long, value_enum, default_value_t = HintsArg::On)]
    pub hints: HintsArg,
    /// Share of RAM in use with data, percent.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub used_percent: u8,
    /// Rate at which the dirty and churn workloads write, e.g. 64M (MiB/s).
    #[arg(long, default_value = "64M", value_parser = parse_rate)]
    pub dirty_rate: u64,
    /// Parallel connections.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub connections: u16,
    /// Bandwidth limit, e.g. 100M (MiB/s) or 1Gbit (10^9 bit/s); none by default.
    #[arg(long, value_parser = parse_rate)]
    pub bandwidth: Option<u64>,
    /// Downtime target in milliseconds.
    #[arg(
        long,
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=crate::units::DOWNTIME_MS_MAX)
    )]
    pub downtime_ms: u64,
    /// Seed of the guest's behaviour.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the statistics as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `ferry sim-receive` arguments (started by `ferry sim`).
#[derive(Debug, Clone, Args)]
pub struct ReceiveArgs {
    /// Where to listen (HOST:PORT or unix:PATH); port 0 picks a free port.
    #[arg(long)]
    pub listen: Endpoint,
    /// Guest RAM size; must match the source.
    #[arg(long, value_parser = parse_size)]
    pub memory: u64,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `ferry sim-send` arguments: the sending side alone, against a given destination (a test
/// kills this process at chosen moments of its migration).
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// Where the destination listens (HOST:PORT or unix:PATH).
    #[arg(long)]
    pub connect: Endpoint,
    /// Guest RAM size; must match the destination.
    #[arg(long, value_parser = parse_size)]
    pub memory: u64,
    /// Seed of the guest's behaviour.
    #[arg(long, default_value_t = 5)]
    pub seed: u64,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// With TLS: the name the destination's certificate must carry.
    #[arg(long, requires = "tls_cert")]
    pub tls_server_name: Option<String>,
}

/// What the receiving process reports on stdout, as one JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    /// Pages the guest considered in use, checked.
    pub pages_checked: u64,
    /// Of those, pages whose content differs.
    pub mismatches: u64,
    /// Receive statistics.
    pub stats: ferry_migration::ReceiveStats,
}

const TICK: Duration = Duration::from_millis(1);

/// Runs `ferry sim`.
pub fn run(args: &SimArgs) -> Result<()> {
    let modes: &[bool] = match args.hints {
        HintsArg::On => &[true],
        HintsArg::Off => &[false],
        HintsArg::Both => &[false, true],
    };
    let mut results = Vec::new();
    for &hints in modes {
        let (stats, verdict) = migrate_once(args, hints)?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "hints": hints, "stats": stats, "verdict": verdict })
            );
        } else {
            println!("\n## hints {}\n", if hints { "on" } else { "off" });
            print!("{}", report::rounds_table(&stats));
            println!(
                "destination integrity check: {} of {} in-use pages identical{}",
                verdict.pages_checked - verdict.mismatches,
                verdict.pages_checked,
                if verdict.mismatches == 0 {
                    " - PASS"
                } else {
                    " - FAIL"
                }
            );
        }
        if verdict.mismatches > 0 {
            bail!(
                "{} in-use pages differ at the destination",
                verdict.mismatches
            );
        }
        results.push(stats);
    }
    if let [off, on] = &results[..] {
        if !args.json {
            println!(
                "\n## {} guest, workload {:?}: hints off vs on\n",
                mib(args.memory),
                args.workload
            );
            print!("{}", report::compare_table(off, on));
        }
    }
    Ok(())
}

/// Starts the receiving process and returns it with the endpoint it listens on.
fn spawn_receiver(memory: u64) -> Result<(Child, Endpoint)> {
    let exe = std::env::current_exe().context("finding the ferry executable")?;
    let mut child = Command::new(exe)
        .args([
            "sim-receive",
            "--listen",
            "127.0.0.1:0",
            "--memory",
            &format!("{memory}B"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the receiving process")?;
    let stdout = child.stdout.as_mut().context("receiver stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the receiver's address")?;
    let ep = line
        .trim()
        .strip_prefix("LISTENING ")
        .with_context(|| format!("unexpected receiver output {line:?}"))?
        .parse::<Endpoint>()
        .map_err(anyhow::Error::msg)?;
    Ok((child, ep))
}

fn migrate_once(args: &SimArgs, hints: bool) -> Result<(MigrationStats, Verdict)> {
    let (child, endpoint) = spawn_receiver(args.memory)?;
    let mem = create_memory(args.memory).context("allocating guest memory")?;
    let pages_per_tick = (args.dirty_rate / 4096 / 1000).max(1) as u32;
    let workload = match args.workload {
        WorkloadArg::Idle => Workload::Idle,
        WorkloadArg::Freed => Workload::Freed { percent: 75 },
        WorkloadArg::Dirty => Workload::Dirty { pages_per_tick },
        WorkloadArg::Churn => Workload::Churn { pages_per_tick },
    };
    let behavior = hints.then_some(HintBehavior::Honest { delay_ticks: 2 });
    let vm = SimVm::new(
        Guest::new(mem.clone(), args.seed),
        SimConfig {
            used_percent: args.used_percent,
            workload,
            hints: behavior,
            zero_on_alloc: false,
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = vm.spawn_ticker(TICK, stop.clone());

    let config = MigrationConfig {
        policy: Policy {
            downtime_max: Duration::from_millis(args.downtime_ms),
            ..Policy::default()
        },
        bandwidth_limit: args.bandwidth,
        hints,
        ..MigrationConfig::default()
    };
    let mut dirty = BitmapDirtyLog::new(mem.clone());
    let mut control = vm.clone();
    let mut bar = Bar::new(if hints { "hints on" } else { "hints off" });
    let mut sim_hints = vm.hint_source();
    let mut unpopulated = UnpopulatedSource::new(&mem);
    let result = (|| {
        let conns =
            connect(&endpoint, args.connections, None).context("connecting to the receiver")?;
        let mut m = Migration::new(&mem, &mut dirty, &mut control, &mut bar, config)?;
        if let Some(h) = sim_hints.as_mut() {
            m.add_source(h);
        }
        m.add_source(&mut unpopulated);
        Ok::<_, anyhow::Error>(m.run(conns)?)
    })();
    bar.finish();
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let output = child
        .wait_with_output()
        .context("waiting for the receiver")?;
    let stats = result.context("migration failed")?;
    if !output.status.success() {
        bail!("the receiving process failed ({})", output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let verdict: Verdict = serde_json::from_str(text.trim())
        .with_context(|| format!("reading the receiver's verdict from {text:?}"))?;
    Ok((stats, verdict))
}

/// Runs `ferry sim-receive`: receive, verify against the transferred guest state, report.
pub fn receive(args: &ReceiveArgs) -> Result<()> {
    let mem = create_memory(args.memory).context("allocating guest memory")?;
    let mut listener =
        Listener::bind(&args.listen).with_context(|| format!("listening on {}", args.listen))?;
    if let Some(tls) = args.tls.load()? {
        listener = listener.with_tls(tls);
    }
    println!("LISTENING {}", listener.local_endpoint()?);
    let dest = Destination::new(&mem, ReceiveConfig::default())?;
    let received = dest.accept(&listener)?;
    let Some(states) = ferry_sim::state::decode(&received.device_state) else {
        received.reject("the simulated guest's state does not decode");
        bail!("the simulated guest's state does not decode");
    };
    // Acknowledge first, as a VMM does once the state is restored, so the source's downtime
    // does not include this check, which only a test needs.
    let stats = received.stats.clone();
    received.acknowledge()?;
    let layout = MemoryLayout::from_guest_memory(&mem)?;
    let pages_checked = states
        .iter()
        .filter(|s| matches!(s, ferry_sim::PageState::Used(_)))
        .count() as u64;
    let mismatches = verify(&states, &mem, &layout).len() as u64;
    println!(
        "{}",
        serde_json::to_string(&Verdict {
            pages_checked,
            mismatches,
            stats
        })?
    );
    if mismatches > 0 {
        bail!("{mismatches} in-use pages differ");
    }
    Ok(())
}

/// Runs `ferry sim-send`: a simulated guest that churns memory and hints honestly, migrated
/// to `--connect`. Deterministic for a seed: the guest moves only when the engine reports
/// progress, so two runs send the same bytes. Prints `SENT` and the statistics on success.
pub fn send(args: &SendArgs) -> Result<()> {
    let mem = create_memory(args.memory).context("allocating guest memory")?;
    let vm = SimVm::new(
        Guest::new(mem.clone(), args.seed),
        SimConfig {
            used_percent: 40,
            workload: Workload::Churn { pages_per_tick: 16 },
            hints: Some(HintBehavior::Honest { delay_ticks: 1 }),
            zero_on_alloc: true,
        },
    );
    for _ in 0..20 {
        vm.tick();
    }
    let config = MigrationConfig {
        handshake_timeout: Duration::from_secs(5),
        stall_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(60),
        ..MigrationConfig::default()
    };
    let mut dirty = BitmapDirtyLog::lazy(mem.clone());
    let (mut control, mut driver) = (vm.clone(), SimDriver(vm.clone()));
    let mut hints = vm.hint_source();
    let tls = match (args.tls.load()?, &args.tls_server_name) {
        (Some(t), Some(name)) => Some(t.with_server_name(name)?),
        (t, _) => t,
    };
    let conns = connect(&args.connect, 1, tls.as_ref()).context("connecting to the destination")?;
    let mut m = Migration::new(&mem, &mut dirty, &mut control, &mut driver, config)?;
    if let Some(h) = hints.as_mut() {
        m.add_source(h);
    }
    let stats = m.run(conns).context("migration failed")?;
    println!("SENT {}", serde_json::to_string(&stats)?);
    Ok(())
}

impl SimArgs {
    /// The demo's settings: a 2 GiB guest with 75% of RAM freed, hints off then on.
    pub fn demo() -> Self {
        Self {
            memory: 2 << 30,
            workload: WorkloadArg::Freed,
            hints: HintsArg::Both,
            used_percent: 10,
            dirty_rate: 64 << 20,
            connections: 1,
            bandwidth: None,
            downtime_ms: 300,
            seed: 1,
            json: false,
        }
    }
}
