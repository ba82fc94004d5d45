//! The soak for both VMMs (`ferry bench-vm --soak HOPS`): one guest per VMM setting hops along
//! a chain of fresh VMM processes, each destination becoming the next source, while the guest
//! checks its pages (`workload check`), churns memory and sends heartbeats. Every hop runs the
//! same checks under ferry and under QEMU, in the same lab run, so that a guest lost under
//! both is a fault of the lab (the emulated host), and one lost only under ferry is ferry's.
//!
//! Each hop must: complete; show a heartbeat from the destination within
//! [`HEARTBEAT_AFTER_HOP`] of the migration's end; leave the page checker at 0 mismatches and
//! still progressing; verify the data set; and show no kernel error on the source's console
//! (checked when it is left) or the destination's. A failed hop is counted by kind, its console
//! and VMM output are logged, and the chain starts over with a fresh guest.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use ferry_lab::{checker_pages, hw_kvm_usable, is_heartbeat, GuestConfig, GuestImage};

use crate::runner::{schedule, BenchConfig, BenchError, Group};
use crate::sessions::{FerrySession, QemuSession, Session};
use crate::Variant;

/// How soon after a migration's end the destination must show a heartbeat.
pub const HEARTBEAT_AFTER_HOP: Duration = Duration::from_secs(5);
/// Heartbeat interval in the guest, ms.
const HEARTBEAT_MS: u64 = 500;
/// Boot under nested KVM in a loaded lab: up to minutes.
const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
/// One agent command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Console lines shown with a failure.
const CONSOLE_TAIL: usize = 40;
/// VMM output lines shown with a failure.
const VMM_TAIL: usize = 40;

/// What the soak runs, besides the guest and VMM settings of [`BenchConfig`].
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// Hops per VMM setting.
    pub hops: u32,
    /// Longest random gap between two hops, ms.
    pub gap_ms: u64,
    /// Seed of the gaps (the same seed replays the same gaps).
    pub seed: u64,
    /// The page checker's working set, MiB.
    pub check_mib: u64,
    /// The page checker's rate, MiB/s.
    pub check_mib_per_s: u64,
    /// The churn workload's size, MiB.
    pub churn_mib: u64,
    /// Each hop compares the source's RAM with the destination's at the switchover (ferry:
    /// `FERRY_DEBUG_RAM_DIGEST`, adding a read of all RAM to each downtime; QEMU: the
    /// destination is held with `-S` and both sides `pmemsave`): a lost write is found even
    /// where the guest does not notice it.
    pub ram_digests: bool,
}

impl SoakConfig {
    /// `hops` hops per setting, gaps up to 10 s, the checker at 64 MiB and 16 MiB/s, 32 MiB
    /// of churn (as the ferry-only soak test).
    pub fn new(hops: u32, seed: u64) -> Self {
        Self {
            hops,
            gap_ms: 10_000,
            seed,
            check_mib: 64,
            check_mib_per_s: 16,
            churn_mib: 32,
            ram_digests: false,
        }
    }
}

/// What went wrong in a hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// The migration failed or a VMM process misbehaved.
    Migration,
    /// No heartbeat from the destination within [`HEARTBEAT_AFTER_HOP`].
    Silent,
    /// The page checker found a lost write, or the data set did not verify.
    LostWrite,
    /// The page checker stopped progressing or the agent stopped answering.
    Stalled,
    /// A kernel error on a console.
    Kernel,
    /// The destination's guest reset (a triple fault) or its VMM stopped.
    Reset,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The hops of one VMM setting.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// The setting (`ferry`, `qemu-off`, `qemu-hint`).
    pub setting: String,
    /// Hops tried.
    pub hops: u32,
    /// Failed hops by kind.
    pub failures: BTreeMap<Failure, u32>,
    /// Guests that never reached their first hop (boot or workload start failed).
    pub boot_failures: u32,
    /// Per successful hop: MiB sent, total ms, downtime ms.
    pub samples: Vec<(f64, f64, f64)>,
}

impl Tally {
    /// Failed hops.
    pub fn failed(&self) -> u32 {
        self.failures.values().sum()
    }

    /// One markdown table row.
    pub fn row(&self) -> String {
        let kinds: Vec<String> = self
            .failures
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let median = |f: fn(&(f64, f64, f64)) -> f64| {
            let mut v: Vec<f64> = self.samples.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        format!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.0} | {:.1} |",
            self.setting,
            self.hops,
            self.failed(),
            if kinds.is_empty() {
                "-".to_owned()
            } else {
                kinds.join(", ")
            },
            self.boot_failures,
            median(|s| s.0),
            median(|s| s.1),
            median(|s| s.2),
        )
    }
}

/// The summary table of a soak.
pub fn table(tallies: &[Tally]) -> String {
    let mut lines = vec![
        "| setting | hops | failed | by kind | boot failures | MiB sent (median) | total ms (median) | downtime ms (median) |".to_owned(),
        "|---|---:|---:|---|---:|---:|---:|---:|".to_owned(),
    ];
    lines.extend(tallies.iter().map(Tally::row));
    lines.join("\n")
}

/// A small deterministic generator for the gaps (xorshift64*), so a seed replays a run.
#[derive(Debug)]
pub struct Gaps(u64);

impl Gaps {
    /// Gaps from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// A gap in `0..=max_ms` ms.
    pub fn next(&mut self, max_ms: u64) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        Duration::from_millis(self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % (max_ms + 1))
    }
}

struct HopError {
    kind: Failure,
    message: String,
}

fn hop_err(kind: Failure) -> impl FnOnce(String) -> HopError {
    move |message| HopError { kind, message }
}

fn command(session: &mut dyn Session, command: &str) -> Result<String, String> {
    session
        .agent()
        .command(command, COMMAND_TIMEOUT)
        .map_err(|e| format!("`{command}`: {e}"))
}

/// Boots a guest for `group` and starts its workloads; returns it and the checker's count.
fn start_guest(
    config: &BenchConfig,
    soak: &SoakConfig,
    group: Group,
    image: &GuestImage,
    dir: &std::path::Path,
) -> Result<(Box<dyn Session>, u64), String> {
    let mut guest = GuestConfig::new(image.clone());
    guest.mem_mib = u32::try_from(config.memory_mib).unwrap_or(u32::MAX);
    guest.vcpus = config.vcpus;
    guest.free_page_hint = group != Group::QemuOff;
    guest.free_page_reporting = if group == Group::Ferry {
        config.ferry_reporting
    } else {
        config.qemu_reporting
    };
    let mut session: Box<dyn Session> = match group {
        Group::Ferry => {
            let mut s =
                FerrySession::boot_with(&config.ferry_binary, dir, &guest, soak.ram_digests)
                    .map_err(|e| e.to_string())?;
            s.set_lazy_dirty_log(config.lazy_dirty_log);
            s.set_audit_dirty_log(config.audit_dirty_log);
            Box::new(s)
        }
        _ => Box::new(
            QemuSession::boot_with(&config.qemu_binary, dir, &guest, soak.ram_digests)
                .map_err(|e| e.to_string())?,
        ),
    };
    session
        .agent()
        .wait_ready(BOOT_TIMEOUT)
        .map_err(|e| format!("booting: {e}"))?;
    for c in [
        format!("dataset {}", config.dataset_mib),
        format!("heartbeat {HEARTBEAT_MS}"),
        format!("workload check {} {}", soak.check_mib, soak.check_mib_per_s),
        format!("workload churn {}", soak.churn_mib),
    ] {
        command(session.as_mut(), &c)?;
    }
    let status = command(session.as_mut(), "workload status")?;
    let pages = checker_pages(&status)?;
    Ok((session, pages))
}

/// One hop of `session` with every check; returns the sample and the checker's new count.
fn hop(
    session: &mut dyn Session,
    config: &BenchConfig,
    hints: bool,
    pages_before: u64,
) -> Result<((f64, f64, f64), u64), HopError> {
    let m = session
        .migrate(hints, false, config.downtime_limit_ms)
        .map_err(|e| HopError {
            kind: Failure::Migration,
            message: e.to_string(),
        })?;
    let ended = Instant::now();
    if let Some(differences) = session.ram_differences() {
        return Err(HopError {
            kind: Failure::LostWrite,
            message: differences,
        });
    }
    if !m.kernel_errors.is_empty() {
        return Err(HopError {
            kind: Failure::Kernel,
            message: format!(
                "kernel errors on the source's console:\n{}",
                m.kernel_errors.join("\n")
            ),
        });
    }
    let left = HEARTBEAT_AFTER_HOP.saturating_sub(ended.elapsed());
    session
        .agent()
        .wait_for("a heartbeat", left, is_heartbeat)
        .map_err(|e| HopError {
            kind: Failure::Silent,
            message: format!(
                "no heartbeat within {HEARTBEAT_AFTER_HOP:?} of the migration's end: {e}"
            ),
        })?;
    let status = command(session, "workload status").map_err(hop_err(Failure::Stalled))?;
    let pages = checker_pages(&status).map_err(hop_err(Failure::LostWrite))?;
    if pages <= pages_before {
        return Err(HopError {
            kind: Failure::Stalled,
            message: format!("the page checker made no progress: {pages_before} -> {status}"),
        });
    }
    let verify = command(session, "verify").map_err(hop_err(Failure::LostWrite))?;
    if verify != format!("verify pages={}", config.dataset_mib * 256) {
        return Err(HopError {
            kind: Failure::LostWrite,
            message: format!("data set: {verify}"),
        });
    }
    let errors = session.agent().kernel_errors();
    if !errors.is_empty() {
        return Err(HopError {
            kind: Failure::Kernel,
            message: format!(
                "kernel errors on the destination's console:\n{}",
                errors.join("\n")
            ),
        });
    }
    let sample = (
        m.bytes as f64 / f64::from(1 << 20),
        m.total_ms,
        m.downtime_ms,
    );
    Ok((sample, pages))
}

/// What the current VMM and its guest printed last, for a failure's log.
fn tails(session: &dyn Session, console: &[String]) -> String {
    let log = session.vmm_log();
    let log: Vec<&str> = log.lines().collect();
    format!(
        "the VMM's output (last {VMM_TAIL} lines):\n{}\nthe guest console (last {CONSOLE_TAIL} lines):\n{}",
        log[log.len().saturating_sub(VMM_TAIL)..].join("\n"),
        console[console.len().saturating_sub(CONSOLE_TAIL)..].join("\n")
    )
}

/// The hints setting of hop `i` (1-based) of a setting: ferry alternates between its
/// variants that were asked for, QEMU's is fixed by its balloon.
fn hints_of(variants: &[Variant], i: u32) -> bool {
    let v = variants[(i as usize - 1) % variants.len()];
    v == Variant::FerryOn || v == Variant::QemuHint
}

/// Runs the soak for every VMM setting of `config` (its variants), one after the other in the
/// order of the variants, in this lab run. `log` receives one line per hop and every failure's details.
pub fn run_soak(
    config: &BenchConfig,
    soak: &SoakConfig,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<Tally>, BenchError> {
    if !hw_kvm_usable() {
        return Err(BenchError::NoKvm);
    }
    let image = GuestImage::locate()?;
    let mut gaps = Gaps::new(soak.seed);
    let mut tallies = Vec::new();
    // The settings run in the order their variants were given.
    let mut settings = schedule(config, 1);
    settings.sort_by_key(|(_, v)| config.variants.iter().position(|w| v.contains(w)));
    for (group, variants) in settings {
        let name = group.name();
        let dir = std::env::temp_dir().join(format!("ferry-soak-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| BenchError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mut tally = Tally {
            setting: name.to_owned(),
            ..Tally::default()
        };
        let mut current: Option<(Box<dyn Session>, u64)> = None;
        let mut i = 0;
        while i < soak.hops {
            let (session, pages) = match current.as_mut() {
                Some(c) => c,
                None => match start_guest(config, soak, group, &image, &dir) {
                    Ok(c) => current.insert(c),
                    Err(e) => {
                        log(&format!("{name}: a fresh guest failed to start: {e}"));
                        tally.boot_failures += 1;
                        if tally.boot_failures > soak.hops / 4 + 2 {
                            log(&format!("{name}: too many boot failures, giving up"));
                            break;
                        }
                        continue;
                    }
                },
            };
            i += 1;
            let gap = gaps.next(soak.gap_ms);
            std::thread::sleep(gap);
            let hints = hints_of(&variants, i);
            tally.hops += 1;
            let what = format!(
                "{name}: hop {i}/{} (hints {}, after {gap:?})",
                soak.hops,
                if hints { "on" } else { "off" }
            );
            match hop(session.as_mut(), config, hints, *pages) {
                Ok((sample, p)) => {
                    log(&format!(
                        "{what}: {:.1} MiB, {:.0} ms, downtime {:.1} ms, checker at {p} pages",
                        sample.0, sample.1, sample.2
                    ));
                    tally.samples.push(sample);
                    *pages = p;
                }
                Err(HopError { mut kind, message }) => {
                    let console = session.agent().transcript();
                    let vmm_log = session.vmm_log();
                    if vmm_log.contains("triple fault") || vmm_log.contains("reset the machine") {
                        kind = Failure::Reset;
                    }
                    log(&format!(
                        "{what} FAILED ({kind}): {message}\n{}",
                        tails(session.as_ref(), &console)
                    ));
                    *tally.failures.entry(kind).or_default() += 1;
                    current = None;
                }
            }
        }
        if let Some((mut session, _)) = current.take() {
            let _ = session.agent().command("shutdown", COMMAND_TIMEOUT);
        }
        let _ = std::fs::remove_dir_all(&dir);
        log(&format!(
            "{name}: {} hops, {} failed",
            tally.hops,
            tally.failed()
        ));
        tallies.push(tally);
    }
    Ok(tallies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_replay_from_a_seed_and_stay_in_range() {
        let a: Vec<Duration> = (0..50).map(|_| Gaps::new(7).next(3000)).collect();
        let mut g = Gaps::new(7);
        let b: Vec<Duration> = (0..50).map(|_| g.next(3000)).collect();
        let mut h = Gaps::new(7);
        let c: Vec<Duration> = (0..50).map(|_| h.next(3000)).collect();
        assert_eq!(b, c, "the same seed gives the same gaps");
        assert!(b.iter().all(|d| *d <= Duration::from_millis(3000)));
        assert!(b.windows(2).any(|w| w[0] != w[1]), "the gaps vary");
        assert!(a.iter().all(|d| *d == a[0]));
        assert_eq!(Gaps::new(1).next(0), Duration::ZERO);
    }

    #[test]
    fn ferry_alternates_its_variants_and_qemu_keeps_its_own() {
        let ferry = [Variant::FerryOff, Variant::FerryOn];
        let got: Vec<bool> = (1..=4).map(|i| hints_of(&ferry, i)).collect();
        assert_eq!(got, [false, true, false, true]);
        assert!((1..=3).all(|i| hints_of(&[Variant::QemuHint], i)));
        assert!((1..=3).all(|i| !hints_of(&[Variant::QemuOff], i)));
    }

    #[test]
    fn the_table_counts_failures_by_kind() {
        let mut t = Tally {
            setting: "ferry".into(),
            hops: 3,
            ..Tally::default()
        };
        t.failures.insert(Failure::Silent, 1);
        t.samples = vec![(10.0, 100.0, 5.0), (30.0, 300.0, 15.0)];
        let table = table(&[t]);
        assert!(
            table.contains("| ferry | 3 | 1 | Silent 1 | 0 | 30.0 | 300 | 15.0 |"),
            "{table}"
        );
    }
}
