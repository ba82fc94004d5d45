//! The soak: one guest live-migrated along a chain of ferry VMM processes, each destination
//! becoming the next source, while the guest writes and checks pages, churns memory and sends
//! heartbeats.
//!
//! Every hop must: complete; bring a heartbeat from the destination within
//! [`HEARTBEAT_AFTER_RESTORE`] of its restore; leave the guest's page checker (which rewrites
//! 64 MiB at 16 MiB/s and checks each page against its last write before rewriting it, so a
//! write lost *during* the migration is found) at 0 mismatches and still progressing; verify
//! the data set; end the source process cleanly; and show no kernel error on either console.
//! Hints alternate off and on; the guest runs a random 0-10 s between hops.
//!
//! A hop that fails is counted by kind, the chain starts over with a fresh guest, and the test
//! fails at the end with the summary. Knobs (environment):
//! - `FERRY_SOAK_HOPS` hops per vCPU count (default 20);
//! - `FERRY_SOAK_VCPUS` comma-separated vCPU counts, one chain each (default `2`);
//! - `FERRY_SOAK_GAP_MS` longest gap between hops (default 10000);
//! - `FERRY_SOAK_SEED` the gaps' seed (default: the time; printed either way).
//!
//! Needs hardware KVM; on PVM machines run it in the lab (`lab/soak` wraps this):
//! ```text
//! FERRY_SOAK_HOPS=50 FERRY_SOAK_VCPUS=1,2,4 lab/test -p ferry-e2e -- soak
//! ```

mod chain;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use chain::*;
use ferry_migration::MigrationStats;
use ferry_vmm::migration::{request_migration, MigrateOptions};

/// How soon after its restore a destination must show a heartbeat.
const HEARTBEAT_AFTER_RESTORE: Duration = Duration::from_secs(5);
/// The page checker's working set and rate, and the churn's size.
const CHECK_MIB: u64 = 64;
const CHECK_MIB_PER_S: u64 = 16;
const CHURN_MIB: u64 = 32;

/// The body of a destination process (runs only when spawned by this test binary).
#[test]
fn destination_process() -> Result<()> {
    chain::destination_process()
}

/// What went wrong in a hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    /// The destination could not be started.
    Spawn,
    /// The migration request failed (the source reported an error).
    Migration,
    /// The destination never reported the guest running.
    Resume,
    /// The source VMM did not exit cleanly after handing over.
    SourceExit,
    /// No heartbeat from the destination within [`HEARTBEAT_AFTER_RESTORE`].
    Silent,
    /// The page checker found a page that lost a write, or the data set did not verify.
    LostWrite,
    /// The page checker or churn stopped progressing, or the agent stopped answering.
    Stalled,
    /// A kernel error on a console.
    Kernel,
    /// Not ferry's: the destination's guest stopped because the lab's emulated host wrote
    /// its own CR3 into it (a vCPU's page tables outside RAM; docs/lab.md). Counted and shown,
    /// not a failure.
    LabFault,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A hop's error, with its kind.
struct HopError {
    kind: Failure,
    error: anyhow::Error,
}

trait Kind<T> {
    fn kind(self, kind: Failure) -> Result<T, HopError>;
}

impl<T, E: Into<anyhow::Error>> Kind<T> for Result<T, E> {
    fn kind(self, kind: Failure) -> Result<T, HopError> {
        self.map_err(|e| HopError {
            kind,
            error: e.into(),
        })
    }
}

fn fail<T>(kind: Failure, error: anyhow::Error) -> Result<T, HopError> {
    Err(HopError { kind, error })
}

/// `error` as a `kind` failure, or as a lab fault when `node` shows the lab's evidence.
fn classify(node: &Node, kind: Failure, error: anyhow::Error) -> HopError {
    match lab_fault(node) {
        Some(evidence) => HopError {
            kind: Failure::LabFault,
            error: anyhow::anyhow!("{evidence}\n{error:#}"),
        },
        None => HopError { kind, error },
    }
}

/// A small deterministic generator for the gaps (xorshift64*), so a seed replays a run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// The checker's page count from `workload status`/`stop`, failing on any mismatch.
fn checked_pages(status: &str) -> Result<u64> {
    ferry_lab::checker_pages(status).map_err(anyhow::Error::msg)
}

/// Boots a guest and starts its workloads.
fn start_guest(dir: &Path, name: &str, vcpus: u8) -> Result<(Node, u64)> {
    let mut node = boot_source(dir, name, vcpus)?;
    node.command(&format!("workload check {CHECK_MIB} {CHECK_MIB_PER_S}"))?;
    node.command(&format!("workload churn {CHURN_MIB}"))?;
    let status = node.command("workload status")?;
    Ok((node, checked_pages(&status)?))
}

/// One hop: `source` to a new destination `name`, with every check of the soak.
fn soak_hop(
    dir: &Path,
    source: &mut Node,
    name: &str,
    options: &MigrateOptions,
    pages_before: u64,
) -> Result<(Node, MigrationStats, u64), HopError> {
    let pending = spawn_destination(dir, name, source.vcpus).kind(Failure::Spawn)?;
    let stats = match request_migration(&source.api, &pending.endpoint, options) {
        Ok(s) => s,
        Err(e) => {
            let log = source.log();
            let e = anyhow::anyhow!("{} -> {name}: {e}\nsource VMM log:\n{log}", source.name);
            return Err(classify(source, Failure::Migration, e));
        }
    };
    let mut dest = pending.attach().kind(Failure::Resume)?;
    let resumed = Instant::now();
    let status = source.wait_exit().kind(Failure::SourceExit)?;
    if !status.success() {
        return fail(
            Failure::SourceExit,
            anyhow::anyhow!("{} exited with {status}:\n{}", source.name, source.log()),
        );
    }
    let left = HEARTBEAT_AFTER_RESTORE.saturating_sub(resumed.elapsed());
    if let Err(e) = dest.agent.wait_for("heartbeat", left, is_heartbeat) {
        let why = diagnose(&mut dest);
        let e = anyhow::anyhow!(
            "no heartbeat within {HEARTBEAT_AFTER_RESTORE:?} of the restore: {e}\n{why}"
        );
        return Err(classify(&dest, Failure::Silent, e));
    }
    let status = dest
        .command("workload status")
        .map_err(|e| classify(&dest, Failure::Stalled, e))?;
    let pages = checked_pages(&status).kind(Failure::LostWrite)?;
    if pages <= pages_before {
        return fail(
            Failure::Stalled,
            anyhow::anyhow!("the page checker made no progress: {pages_before} -> {status}"),
        );
    }
    let verify = dest.command("verify").kind(Failure::LostWrite)?;
    if verify != format!("verify pages={}", DATASET_MIB * 256) {
        return fail(Failure::LostWrite, anyhow::anyhow!("data set: {verify}"));
    }
    source.check_kernel().kind(Failure::Kernel)?;
    dest.check_kernel().kind(Failure::Kernel)?;
    Ok((dest, stats, pages))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Default)]
struct Tally {
    hops: u64,
    failures: BTreeMap<Failure, u64>,
    mib: Vec<f64>,
    total_ms: Vec<f64>,
    downtime_ms: Vec<f64>,
}

impl Tally {
    fn line(&self, label: &str) -> String {
        let failures: u64 = self.failures.values().sum();
        let kinds: Vec<String> = self
            .failures
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        format!(
            "| {label} | {} | {} | {} | {:.1} | {:.0} | {:.1} |",
            self.hops,
            failures,
            if kinds.is_empty() {
                "-".to_owned()
            } else {
                kinds.join(", ")
            },
            median(self.mib.clone()),
            median(self.total_ms.clone()),
            median(self.downtime_ms.clone()),
        )
    }
}

/// Runs `hops` hops of a `vcpus`-vCPU guest, starting over with a fresh guest after a failure.
fn chain(dir: &Path, vcpus: u8, hops: u64, gap_ms: u64, rng: &mut Rng) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut guest = 0;
    let (mut node, mut pages) = start_guest(dir, &format!("c{vcpus}g{guest}h0"), vcpus)?;
    for i in 1..=hops {
        let gap = Duration::from_millis(rng.below(gap_ms + 1));
        std::thread::sleep(gap);
        let hints = i % 2 == 0;
        let options = MigrateOptions {
            hints,
            ..base_options()
        };
        let name = format!("c{vcpus}g{guest}h{i}");
        tally.hops += 1;
        match soak_hop(dir, &mut node, &name, &options, pages) {
            Ok((dest, stats, p)) => {
                eprintln!(
                    "soak: {vcpus} vCPUs, hop {i}/{hops} ({name}, hints {}, after {gap:?}): {:.1} MiB, {:.0} ms, downtime {:.1} ms, checker at {p} pages; switchover {}",
                    if hints { "on" } else { "off" },
                    stats.bytes as f64 / f64::from(1 << 20),
                    stats.total_ms,
                    stats.downtime_ms,
                    serde_json::to_string(&stats.switchover).unwrap_or_default(),
                );
                tally.mib.push(stats.bytes as f64 / f64::from(1 << 20));
                tally.total_ms.push(stats.total_ms);
                tally.downtime_ms.push(stats.downtime_ms);
                node = dest;
                pages = p;
            }
            Err(HopError { kind, error }) => {
                eprintln!(
                    "soak: {vcpus} vCPUs, hop {i}/{hops} ({name}, hints {}, after {gap:?}) FAILED ({kind}): {error:#}",
                    if hints { "on" } else { "off" },
                );
                *tally.failures.entry(kind).or_default() += 1;
                drop(node);
                guest += 1;
                (node, pages) = start_guest(dir, &format!("c{vcpus}g{guest}h{i}"), vcpus)?;
            }
        }
    }
    let stop = node.command("workload stop")?;
    checked_pages(&stop)?;
    node.command("shutdown")?;
    ensure!(node.wait_exit()?.success(), "{}", node.log());
    node.check_kernel()?;
    Ok(tally)
}

#[test]
#[ignore = "needs hardware KVM: run through lab/run"]
fn soak_a_guest_survives_a_chain_of_live_migrations() -> Result<()> {
    ensure!(ferry_lab::hw_kvm_usable(), "run this test through lab/run");
    let hops = env_u64("FERRY_SOAK_HOPS", 20)?;
    let gap_ms = env_u64("FERRY_SOAK_GAP_MS", 10_000)?;
    let seed = env_u64(
        "FERRY_SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    )?;
    let vcpus: Vec<u8> = std::env::var("FERRY_SOAK_VCPUS")
        .unwrap_or_else(|_| "2".into())
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .with_context(|| format!("FERRY_SOAK_VCPUS: {v:?}"))
        })
        .collect::<Result<_>>()?;
    eprintln!(
        "soak: {hops} hops per chain, vCPUs {vcpus:?}, gaps 0-{gap_ms} ms, FERRY_SOAK_SEED={seed}"
    );
    let mut rng = Rng(seed | 1);
    let dir = test_dir("soak")?;
    let mut table = vec![
        "| vCPUs | hops | failures (lab faults included) | by kind | MiB sent (median) | total ms (median) | downtime ms (median) |".to_owned(),
        "|---|---:|---:|---|---:|---:|---:|".to_owned(),
    ];
    let mut failures = 0;
    for v in vcpus {
        let tally = chain(&dir, v, hops, gap_ms, &mut rng)?;
        failures += tally
            .failures
            .iter()
            .filter(|(k, _)| **k != Failure::LabFault)
            .map(|(_, n)| n)
            .sum::<u64>();
        table.push(tally.line(&v.to_string()));
    }
    eprintln!(
        "\nsoak summary (FERRY_SOAK_SEED={seed}):\n{}\n",
        table.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(
        failures == 0,
        "{failures} hops failed: see the summary above"
    );
    Ok(())
}
