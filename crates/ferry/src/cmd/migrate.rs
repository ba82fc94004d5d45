//! `ferry migrate`: ask a running ferry VMM (through its control API) to live-migrate its VM
//! to a destination started with `ferry receive`, with a progress bar, then print the
//! statistics as a table (or JSON).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use ferry_migration::{Endpoint, Event, MigrationStats, Observer};
use ferry_vmm::migration::{query_progress, request_migration, MigrateOptions, MigrationProgress};
use ferry_vmm::ApiClient;

use crate::progress::Bar;
use crate::report;
use crate::tls::TlsArgs;
use crate::units::{mib, parse_rate};

/// How often the progress bar asks the VMM where the migration is.
const POLL: Duration = Duration::from_millis(200);

/// Free page hints on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Hints {
    /// Skip what the guest does not use: balloon hints, reported ranges, unpopulated memory.
    On,
    /// Send every page.
    Off,
}

/// `ferry migrate` arguments.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// The source VMM's control socket (its --api-socket).
    #[arg(long)]
    pub api: PathBuf,
    /// The destination (`ferry receive --listen`): HOST:PORT, tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    pub to: Endpoint,
    /// Free page hints.
    #[arg(long, value_enum, default_value_t = Hints::On)]
    pub hints: Hints,
    /// With hints on, also ask the guest's balloon driver for free page hints (reported
    /// ranges and never-populated memory are used either way).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub free_page_hint: bool,
    /// Arm KVM's dirty log lazily where KVM supports it (guest writes to pages not sent yet
    /// cost no write fault); `false` write-protects all RAM at the start, which suits guests
    /// booted with init_on_alloc=0.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub lazy_dirty_log: bool,
    /// Check at the switchover that KVM's dirty log missed no write, and send what it
    /// missed: one more read of every sent page while the guest is paused. For hosts whose
    /// dirty log is in doubt; the statistics count what it found.
    #[arg(long)]
    pub audit_dirty_log: bool,
    /// Longest acceptable pause of the guest, in milliseconds.
    #[arg(
        long,
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=crate::units::DOWNTIME_MS_MAX)
    )]
    pub downtime_ms: u64,
    /// Bandwidth limit, e.g. 100M (MiB/s) or 1Gbit (10^9 bit/s); none by default.
    #[arg(long, value_parser = parse_rate)]
    pub bandwidth: Option<u64>,
    /// Parallel connections.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub connections: u16,
    /// Compress page data: `none`, `zstd` (level 1) or `zstd:LEVEL` (1-19), used if the
    /// destination accepts. Pays on a link slower than the CPU compresses (~1 Gbit/s and
    /// below for one connection); each connection compresses on its own thread.
    #[arg(long, default_value = "none")]
    pub compress: ferry_migration::Compression,
    /// Iterative rounds after the bulk round before --if-not-converged applies.
    #[arg(long, default_value_t = ferry_migration::Policy::default().rounds_max)]
    pub rounds_max: u32,
    /// After --rounds-max rounds without reaching --downtime-ms: `switch-over` anyway (the
    /// guest pauses longer) or `cancel` (the guest keeps running here).
    #[arg(long, default_value = "switch-over")]
    pub if_not_converged: ferry_migration::OnNoConvergence,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// With TLS: the name the destination's certificate must carry, when it is not the host
    /// part of --to (e.g. --to 10.0.0.7:4444 --tls-server-name host-b.example).
    #[arg(long, requires = "tls_cert")]
    pub tls_server_name: Option<String>,
    /// Print the statistics as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl MigrateArgs {
    fn options(&self) -> Result<MigrateOptions> {
        Ok(MigrateOptions {
            hints: self.hints == Hints::On,
            free_page_hint: self.free_page_hint,
            lazy_dirty_log: self.lazy_dirty_log,
            audit_dirty_log: self.audit_dirty_log,
            downtime_ms: self.downtime_ms,
            bandwidth: self.bandwidth,
            connections: self.connections,
            compression: self.compress,
            rounds_max: self.rounds_max,
            on_no_convergence: self.if_not_converged,
            tls: self.tls.files()?,
            tls_server_name: self.tls_server_name.clone(),
            ..MigrateOptions::default()
        })
    }
}

/// Feeds polled progress into the bar as the engine's own events would.
fn show(bar: &mut Bar, last: &mut Option<(u32, bool)>, p: &MigrationProgress) {
    if *last != Some((p.round, p.is_final)) && p.pages_queued > 0 {
        *last = Some((p.round, p.is_final));
        bar.event(&Event::RoundStarted {
            round: p.round,
            pages_queued: p.pages_queued,
            is_final: p.is_final,
        });
    }
    bar.event(&Event::Progress {
        round: p.round,
        pages_done: p.pages_done,
        pages_left: p.pages_queued.saturating_sub(p.pages_done),
        bytes: p.bytes,
    });
}

/// Ctrl-C presses seen by `ferry migrate` (set by the signal handler).
static INTERRUPTS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_interrupt(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTS.fetch_add(1, Ordering::SeqCst);
}

/// Asks the VMM behind `api` to cancel its running migration.
fn cancel(api: &Path) -> Result<()> {
    ApiClient::connect(api)
        .and_then(|mut c| c.migrate_cancel())
        .with_context(|| format!("cancelling the migration of the VMM at {}", api.display()))
}

/// Runs `ferry migrate`. Ctrl-C cancels the migration (the guest keeps running on the
/// source); a second Ctrl-C stops waiting for the source to confirm.
pub fn run(args: &MigrateArgs) -> Result<()> {
    // Fail early, with the VMM's own words, if it cannot be reached.
    ApiClient::connect(&args.api)
        .and_then(|mut c| c.status())
        .with_context(|| format!("the source VMM at {}", args.api.display()))?;
    if let Err(e) = vmm_sys_util::signal::register_signal_handler(libc::SIGINT, on_interrupt) {
        tracing::warn!("Ctrl-C will not cancel the migration: {e}");
    }
    let (api, to, options) = (args.api.clone(), args.to.to_string(), args.options()?);
    let migration = std::thread::spawn(move || request_migration(&api, &to, &options));
    let mut bar = Bar::new("migrate");
    let mut last = None;
    let mut cancelled = 0;
    while !migration.is_finished() {
        let presses = INTERRUPTS.load(Ordering::SeqCst);
        if presses > cancelled {
            if cancelled > 0 {
                bar.finish();
                anyhow::bail!(
                    "interrupted again: stopped waiting; see `status` on {} for the outcome",
                    args.api.display()
                );
            }
            cancelled = presses;
            eprintln!("ferry: cancelling the migration (Ctrl-C again to stop waiting)");
            if let Err(e) = cancel(&args.api) {
                eprintln!("ferry: {e:#}");
            }
        }
        if let Ok(Some(p)) = query_progress(&args.api) {
            show(&mut bar, &mut last, &p);
        }
        std::thread::sleep(POLL);
    }
    bar.finish();
    let stats: MigrationStats = migration
        .join()
        .map_err(|_| anyhow::anyhow!("the migration request thread panicked"))?
        .with_context(|| format!("migrating to {}", args.to))?;
    if args.json {
        println!("{}", serde_json::to_string(&stats)?);
    } else {
        println!(
            "migrated {} of guest RAM to {} (hints {}); the source VMM exits\n",
            mib(stats.guest_bytes),
            args.to,
            if args.hints == Hints::On { "on" } else { "off" }
        );
        print!("{}", report::rounds_table(&stats));
    }
    Ok(())
}
