//! The matrix runner: for each repetition and VMM setting, boot one guest, write the agent's
//! integrity data set, then for every workload migrate it to a fresh destination process over
//! loopback TCP and check the data set there. ferry's guest hops with hints off and on per
//! workload; QEMU's balloon decides hinting when it boots, so QEMU gets one guest without and
//! one with `free-page-hint`. The order of the settings rotates between repetitions.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_lab::{hw_kvm_usable, AgentError, GuestConfig, GuestImage};

pub use crate::error::BenchError;
use crate::results::{now_utc, Results, Setup, Variant, Workload, HEARTBEAT_MS};
use crate::sessions::{FerrySession, QemuSession, Session};

/// Boot under nested KVM in a loaded lab: up to minutes.
const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
/// Agent commands (`verify` of the data set, the freed workload) in the lab.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// More time for the freed workload's start, per MiB it touches.
const FREED_TIMEOUT_PER_MIB: Duration = Duration::from_millis(100);
/// Console lines shown when a VMM setting fails.
const CONSOLE_TAIL: usize = 40;
/// Room the freed workload leaves below the first guest's MemAvailable, MiB. The size is
/// used for every VMM setting, and another VMM's guest can have less available after its
/// first migration (QEMU's had 709 of 1024 MiB where ferry's had 890): with 64 MiB of room,
/// `workload freed` was refused there.
const FREED_HEADROOM_MIB: u64 = 192;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The `ferry` binary (its `run` and `receive` commands are ferry's VMM).
    pub ferry_binary: PathBuf,
    /// Debian's `qemu-system-x86_64`.
    pub qemu_binary: PathBuf,
    /// Guest RAM, MiB (both VMMs).
    pub memory_mib: u64,
    /// Guest vCPUs (both VMMs).
    pub vcpus: u32,
    /// Integrity data set, MiB.
    pub dataset_mib: u64,
    /// Freed workload size, MiB; by default 3/4 of the guest's RAM, at most its MemAvailable
    /// less 192 MiB (measured on the first guest and then used for all).
    pub freed_mib: Option<u64>,
    /// Dirty workload working set, MiB.
    pub dirty_mib: u64,
    /// Dirty workload rate, MiB/s.
    pub dirty_rate_mib_s: u64,
    /// Migrations per case.
    pub repeat: u32,
    /// Downtime limit for both VMMs, ms.
    pub downtime_limit_ms: u64,
    /// QEMU's balloon also offers free page reporting, as ferry's does.
    pub qemu_reporting: bool,
    /// ferry's balloon offers free page reporting.
    pub ferry_reporting: bool,
    /// ferry arms KVM's dirty log lazily (`ferry migrate --lazy-dirty-log`).
    pub lazy_dirty_log: bool,
    /// ferry audits the dirty log at every switchover (`ferry migrate --audit-dirty-log`).
    pub audit_dirty_log: bool,
    /// A slow link between the hosts, Mbit/s, the same for both VMMs: in the lab a token
    /// bucket on the lab host's loopback (`tc`), elsewhere each VMM's own bandwidth limit
    /// (ferry `--bandwidth`, QEMU `max-bandwidth`); `None`: loopback at full speed.
    pub link_mbit: Option<u64>,
    /// Workloads to run.
    pub workloads: Vec<Workload>,
    /// Variants to run.
    pub variants: Vec<Variant>,
    /// Where each VMM setting's work directory (VMM logs, guest consoles, QMP transcripts) is
    /// copied when its guest is done, as `run<N>-<setting>/`; `None`: they are deleted. The
    /// VMMs log at the level `FERRY_LOG` sets (e.g. `ferry_balloon=debug`).
    pub keep_logs: Option<PathBuf>,
    /// The command line, for the results.
    pub command: String,
}

impl BenchConfig {
    /// The defaults of `ferry bench-vm`: 1 GiB, 1 vCPU, data set 32 MiB, freed 3/4 of RAM,
    /// dirty 64 MiB at 16 MiB/s, one run, 300 ms, every workload and variant.
    pub fn new(ferry_binary: PathBuf) -> Self {
        Self {
            ferry_binary,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            memory_mib: 1024,
            vcpus: 1,
            dataset_mib: 32,
            freed_mib: None,
            dirty_mib: 64,
            dirty_rate_mib_s: 16,
            repeat: 1,
            downtime_limit_ms: 300,
            qemu_reporting: true,
            ferry_reporting: true,
            lazy_dirty_log: true,
            audit_dirty_log: false,
            link_mbit: None,
            workloads: Workload::ALL.to_vec(),
            variants: Variant::DEFAULT.to_vec(),
            keep_logs: None,
            command: String::new(),
        }
    }
}

impl BenchConfig {
    /// The link's bandwidth in bytes/s (1 Mbit = 10^6 bits), if limited.
    pub fn link_bytes_per_s(&self) -> Option<u64> {
        self.link_mbit.map(|m| m * 1_000_000 / 8)
    }
}

/// A VMM setting: one booted guest migrated for each of `variants`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    Ferry,
    QemuOff,
    QemuHint,
}

impl Group {
    fn variants(self) -> &'static [Variant] {
        match self {
            Self::Ferry => &[Variant::FerryOff, Variant::FerryOn, Variant::FerryZstd],
            Self::QemuOff => &[Variant::QemuOff, Variant::QemuZstd],
            Self::QemuHint => &[Variant::QemuHint],
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Ferry => "ferry",
            Self::QemuOff => "qemu-off",
            Self::QemuHint => "qemu-hint",
        }
    }
}

fn qemu_version(binary: &std::path::Path) -> String {
    std::process::Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("{} (version unknown)", binary.display()))
}

/// A bandwidth limit on the lab host's loopback interface, where both VMMs' migration
/// streams run: a token bucket (`tc qdisc ... tbf`), so that the link limits ferry and QEMU
/// the same way whatever they send and on however many connections. Removed when dropped.
struct LoopbackLink;

impl LoopbackLink {
    /// Limits loopback to `mbit` Mbit/s (10^6 bit/s).
    fn shape(mbit: u64) -> Result<Self, BenchError> {
        let bytes_per_s = mbit * 1_000_000 / 8;
        // The bucket must hold loopback's largest packets (64 KiB plus headers); 10 ms of
        // the rate on top keeps the rate from depending on the timer.
        let burst = (bytes_per_s / 100).max(256 << 10);
        tc(&[
            "qdisc",
            "replace",
            "dev",
            "lo",
            "root",
            "tbf",
            "rate",
            &format!("{mbit}mbit"),
            "burst",
            &burst.to_string(),
            "latency",
            "50ms",
        ])?;
        Ok(Self)
    }
}

impl Drop for LoopbackLink {
    fn drop(&mut self) {
        let _ = tc(&["qdisc", "del", "dev", "lo", "root"]);
    }
}

fn tc(args: &[&str]) -> Result<(), BenchError> {
    let binary = ["/usr/sbin/tc", "/sbin/tc"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("tc");
    let out = std::process::Command::new(binary)
        .args(args)
        .output()
        .map_err(|source| BenchError::Io {
            what: format!("running {binary} (iproute2)"),
            source,
        })?;
    if !out.status.success() {
        return Err(BenchError::Vmm(format!(
            "`tc {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Runs the matrix; `log` receives one line per step. A failing VMM setting is recorded in
/// [`Results::failures`] and the others still run; only a missing KVM or image is an error.
pub fn run_matrix(config: &BenchConfig, log: &mut dyn FnMut(&str)) -> Result<Results, BenchError> {
    if !hw_kvm_usable() {
        return Err(BenchError::NoKvm);
    }
    let image = GuestImage::locate()?;
    let in_lab = std::path::Path::new("/run/ferry-lab").exists();
    // In the lab both VMMs share one shaped loopback; elsewhere (a real host, whose loopback
    // others use too) each VMM limits itself.
    let link = match config.link_mbit {
        Some(mbit) if in_lab => Some(LoopbackLink::shape(mbit)?),
        _ => None,
    };
    let vmm_limit = if link.is_some() {
        None
    } else {
        config.link_bytes_per_s()
    };
    let mut results = Results {
        date: now_utc(),
        command: config.command.clone(),
        setup: Setup {
            memory_mib: config.memory_mib,
            vcpus: config.vcpus,
            dataset_mib: config.dataset_mib,
            freed_mib: config.freed_mib.unwrap_or(0),
            dirty_mib: config.dirty_mib,
            dirty_rate_mib_s: config.dirty_rate_mib_s,
            repeat: config.repeat,
            downtime_limit_ms: config.downtime_limit_ms,
            qemu_reporting: config.qemu_reporting,
            qemu_version: qemu_version(&config.qemu_binary),
            link_mbit: config.link_mbit,
            link_by: config
                .link_mbit
                .map(|_| if link.is_some() { "tc" } else { "limiter" }.to_string()),
            host: if in_lab {
                "lab (nested KVM under TCG)".into()
            } else {
                "hardware KVM".into()
            },
        },
        cases: Vec::new(),
        failures: Vec::new(),
    };
    let mut freed_mib = config.freed_mib;
    for run in 1..=config.repeat {
        for (group, variants) in schedule(config, run) {
            run_setting(
                config,
                vmm_limit,
                &image,
                run,
                group,
                &variants,
                &mut freed_mib,
                &mut results,
                log,
            )?;
        }
    }
    results.setup.freed_mib = freed_mib.unwrap_or(0);
    Ok(results)
}

/// The VMM settings of repetition `run` (1-based) and their variants, in the order to run
/// them: the order rotates from one repetition to the next (and ferry's hints off/on swap), so
/// that a machine whose load drifts during the run does not always favour the same setting.
pub(crate) fn schedule(config: &BenchConfig, run: u32) -> Vec<(Group, Vec<Variant>)> {
    let mut groups = vec![Group::Ferry, Group::QemuOff, Group::QemuHint];
    let shift = (run.saturating_sub(1) as usize) % groups.len();
    groups.rotate_left(shift);
    groups
        .into_iter()
        .filter_map(|group| {
            let mut variants: Vec<Variant> = group
                .variants()
                .iter()
                .copied()
                .filter(|v| config.variants.contains(v))
                .collect();
            if run % 2 == 0 {
                variants.reverse();
            }
            (!variants.is_empty()).then_some((group, variants))
        })
        .collect()
}

/// Boots a guest for `group` and runs repetition `run` on it; a failure is recorded in
/// `results.failures` (only local I/O errors are returned).
#[allow(clippy::too_many_arguments)]
fn run_setting(
    config: &BenchConfig,
    vmm_limit: Option<u64>,
    image: &GuestImage,
    run: u32,
    group: Group,
    variants: &[Variant],
    freed_mib: &mut Option<u64>,
    results: &mut Results,
    log: &mut dyn FnMut(&str),
) -> Result<(), BenchError> {
    let mut guest = GuestConfig::new(image.clone());
    guest.mem_mib = u32::try_from(config.memory_mib).unwrap_or(u32::MAX);
    guest.vcpus = config.vcpus;
    guest.free_page_hint = group != Group::QemuOff;
    guest.free_page_reporting = if group == Group::Ferry {
        config.ferry_reporting
    } else {
        config.qemu_reporting
    };
    let dir = std::env::temp_dir().join(format!(
        "ferry-bench-{}-{}",
        std::process::id(),
        group.name()
    ));
    std::fs::create_dir_all(&dir).map_err(|source| BenchError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    log(&format!("run {run}, {}: booting the guest", group.name()));
    let outcome = (|| {
        let mut session: Box<dyn Session> = match group {
            Group::Ferry => {
                let mut s = FerrySession::boot(&config.ferry_binary, &dir, &guest)?;
                s.set_lazy_dirty_log(config.lazy_dirty_log);
                s.set_audit_dirty_log(config.audit_dirty_log);
                s.set_bandwidth(vmm_limit);
                Box::new(s)
            }
            _ => {
                let mut s = QemuSession::boot(&config.qemu_binary, &dir, &guest)?;
                s.set_bandwidth(vmm_limit);
                Box::new(s)
            }
        };
        let outcome = run_group(
            session.as_mut(),
            config,
            run,
            variants,
            freed_mib,
            results,
            log,
        );
        if outcome.is_err() {
            let console = session.agent().transcript();
            let tail = &console[console.len().saturating_sub(CONSOLE_TAIL)..];
            log(&format!(
                "{}: the current VMM's output:\n{}\nthe end of its guest console:\n{}",
                group.name(),
                session.vmm_log(),
                tail.join("\n")
            ));
        }
        outcome
    })();
    if let Err(e) = outcome {
        log(&format!("run {run}, {}: FAILED: {e}", group.name()));
        results
            .failures
            .push(format!("run {run}, {}: {e}", group.name()));
    }
    if let Some(keep) = &config.keep_logs {
        let to = keep.join(format!("run{run}-{}", group.name()));
        match copy_dir(&dir, &to) {
            Ok(()) => log(&format!("kept the logs in {}", to.display())),
            Err(e) => log(&format!("could not keep the logs in {}: {e}", to.display())),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Copies the regular files of `from` (and of its subdirectories) into `to`, which it
/// creates; sockets (the VMMs' API and console sockets) and other special files are left
/// out. The work directory may be on another file system than `to` (the lab's /tmp and the
/// checkout it shares), so renaming it would not do.
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn command(session: &mut dyn Session, command: &str) -> Result<String, BenchError> {
    command_within(session, command, COMMAND_TIMEOUT)
}

fn command_within(
    session: &mut dyn Session,
    command: &str,
    timeout: Duration,
) -> Result<String, BenchError> {
    session
        .agent()
        .command(command, timeout)
        .map_err(|source| BenchError::Agent {
            what: format!("`{command}`"),
            source,
        })
}

fn expect(answer: String, command: &str, ok: bool) -> Result<String, BenchError> {
    if ok {
        Ok(answer)
    } else {
        Err(BenchError::Answer {
            command: command.to_string(),
            answer,
        })
    }
}

/// The freed workload's size for this guest: 3/4 of its RAM, at most MemAvailable less
/// [`FREED_HEADROOM_MIB`].
fn freed_size(session: &mut dyn Session, memory_mib: u64) -> Result<u64, BenchError> {
    let meminfo = command(session, "meminfo")?;
    let available_kib = meminfo
        .split_whitespace()
        .find_map(|f| f.strip_prefix("available_kib="))
        .and_then(|n| n.parse::<u64>().ok());
    let Some(available_kib) = available_kib else {
        return Err(BenchError::Answer {
            command: "meminfo".into(),
            answer: meminfo,
        });
    };
    Ok((memory_mib * 3 / 4).min((available_kib / 1024).saturating_sub(FREED_HEADROOM_MIB)))
}

fn ms_or_unknown(ms: Option<f64>) -> String {
    ms.map_or_else(|| "?".to_string(), |ms| format!("{ms:.1}"))
}

/// The guest's memory counters (the agent's `meminfo`), KiB.
struct GuestMemory {
    total_kib: u64,
    free_kib: u64,
    /// Free in blocks of the largest order, what Linux's balloon driver can hint (an agent
    /// older than this field does not say).
    hintable_kib: Option<u64>,
}

impl GuestMemory {
    fn read(session: &mut dyn Session) -> Result<Self, BenchError> {
        let meminfo = command(session, "meminfo")?;
        let field = |name: &str| {
            meminfo
                .split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .and_then(|n| n.parse::<u64>().ok())
        };
        match (field("total_kib="), field("free_kib=")) {
            (Some(total_kib), Some(free_kib)) => Ok(Self {
                total_kib,
                free_kib,
                hintable_kib: field("hintable_kib="),
            }),
            _ => Err(BenchError::Answer {
                command: "meminfo".into(),
                answer: meminfo,
            }),
        }
    }

    /// Memory in use (MemTotal - MemFree), MiB.
    fn in_use_mib(&self) -> u64 {
        self.total_kib.saturating_sub(self.free_kib) / 1024
    }
}

/// One repetition (`run`) of the matrix for one VMM setting, on a freshly booted guest.
fn run_group(
    session: &mut dyn Session,
    config: &BenchConfig,
    run: u32,
    variants: &[Variant],
    freed_mib: &mut Option<u64>,
    results: &mut Results,
    log: &mut dyn FnMut(&str),
) -> Result<(), BenchError> {
    session
        .agent()
        .wait_ready(BOOT_TIMEOUT)
        .map_err(|source| BenchError::Agent {
            what: "waiting for the guest to boot".into(),
            source,
        })?;
    let features = command(session, "features")?;
    log(&format!("guest up; balloon: {features}"));
    log(&format!(
        "guest memory at boot: {}",
        command(session, "meminfo")?
    ));
    let dataset = format!("dataset {}", config.dataset_mib);
    let pages = config.dataset_mib * 256;
    let answer = command(session, &dataset)?;
    expect(
        answer.clone(),
        &dataset,
        answer.starts_with("dataset pages="),
    )?;
    let freed = match *freed_mib {
        Some(n) => n,
        None => {
            let n = freed_size(session, config.memory_mib)?;
            *freed_mib = Some(n);
            n
        }
    };
    for &workload in &config.workloads {
        for &variant in variants {
            let start = match workload {
                Workload::Idle => "workload idle".to_string(),
                Workload::Freed => format!("workload freed {freed}"),
                Workload::Dirty => format!(
                    "workload dirty {} {}",
                    config.dirty_mib, config.dirty_rate_mib_s
                ),
            };
            let in_use_mib = GuestMemory::read(session)?.in_use_mib();
            // The freed workload touches its memory before it answers: in the lab a QEMU
            // guest took over 300 s for 6 GiB.
            let touched = if workload == Workload::Freed {
                freed
            } else {
                0
            };
            command_within(
                session,
                &start,
                COMMAND_TIMEOUT + FREED_TIMEOUT_PER_MIB * u32::try_from(touched).unwrap_or(0),
            )?;
            // What a free-page source could know of as the migration starts: the guest's RAM
            // less MemFree must go whatever the source; of MemFree, Linux hints only blocks of
            // its largest order.
            let before = GuestMemory::read(session)?;
            // Heartbeats through the migration: the guest-visible pause is their largest gap.
            command(session, &format!("heartbeat {HEARTBEAT_MS}"))?;
            let mut m = session.migrate(
                variant.hints(),
                variant.compress(),
                config.downtime_limit_ms,
            )?;
            m.in_use_mib = Some(in_use_mib);
            m.not_free_mib = Some(config.memory_mib.saturating_sub(before.free_kib / 1024));
            m.hintable_mib = before.hintable_kib.map(|k| k / 1024);
            let verify = session.agent().command("verify", COMMAND_TIMEOUT);
            if let Some(gaps) = session.heartbeat_gaps() {
                m.guest_pause_ms = Some(gaps.switchover.as_secs_f64() * 1000.0);
                m.guest_stall_ms = Some(gaps.largest.as_secs_f64() * 1000.0);
            }
            let verified = matches!(&verify, Ok(a) if *a == format!("verify pages={pages}"));
            // A guest that answered (even `ERR verify mismatches=...`) can go on; a silent
            // or gone one ends this VMM setting once the sample is recorded.
            let silent = matches!(
                &verify,
                Err(AgentError::Timeout { .. } | AgentError::Closed { .. })
            );
            m.verified = verified;
            m.verify_answer = match verify {
                Ok(a) => a,
                Err(e) => e.to_string(),
            };
            if silent {
                let lost = format!(
                    "run {run}, {workload}, {variant}: the guest did not answer on the \
                     destination: {}",
                    m.verify_answer
                );
                results.push(workload, variant, m);
                return Err(BenchError::Vmm(lost));
            }
            command(session, "heartbeat 0")?;
            if workload == Workload::Dirty {
                let stop = command(session, "workload stop")?;
                expect(stop.clone(), "workload stop", stop.contains("kind=dirty"))?;
            }
            log(&format!(
                "run {run}, {workload}, {variant}: {:.1} MiB, {:.0} ms, downtime {:.1} ms, \
                 guest pause {} ms (largest stall {} ms), {} rounds; {}",
                m.bytes as f64 / f64::from(1 << 20),
                m.total_ms,
                m.downtime_ms,
                ms_or_unknown(m.guest_pause_ms),
                ms_or_unknown(m.guest_stall_ms),
                m.rounds,
                m.verify_answer
            ));
            if !verified {
                // Start over with a fresh data set so the next cases are checked again.
                command(session, &dataset)?;
            }
            results.push(workload, variant, m);
        }
    }
    command(session, "shutdown")?;
    let errors = session.agent().kernel_errors();
    if !errors.is_empty() {
        return Err(BenchError::Vmm(format!(
            "kernel errors on the last guest console:\n{}",
            errors.join("\n")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_logs_are_copied_with_their_subdirectories() {
        let root = std::env::temp_dir().join(format!("ferry-copy-dir-{}", std::process::id()));
        let from = root.join("work");
        std::fs::create_dir_all(from.join("sub")).unwrap();
        std::fs::write(from.join("vm0.log"), "source").unwrap();
        std::fs::write(from.join("sub/q1.qmp"), "qmp").unwrap();
        // A VMM's API socket is in there too, and cannot be copied.
        let _api = std::os::unix::net::UnixListener::bind(from.join("vm0.api")).unwrap();
        let to = root.join("kept/run1-ferry");
        copy_dir(&from, &to).unwrap();
        assert_eq!(
            std::fs::read_to_string(to.join("vm0.log")).unwrap(),
            "source"
        );
        assert_eq!(
            std::fs::read_to_string(to.join("sub/q1.qmp")).unwrap(),
            "qmp"
        );
        assert!(!to.join("vm0.api").exists());
        assert!(copy_dir(&root.join("missing"), &root.join("x")).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_schedule_rotates_settings_and_swaps_hints() {
        let mut config = BenchConfig::new("/bin/ferry".into());
        let names = |config: &BenchConfig, run| -> Vec<String> {
            schedule(config, run)
                .into_iter()
                .flat_map(|(_, v)| v)
                .map(|v| v.name().to_string())
                .collect()
        };
        assert_eq!(
            names(&config, 1),
            ["ferry-off", "ferry-on", "qemu-off", "qemu-hint"]
        );
        assert_eq!(
            names(&config, 2),
            ["qemu-off", "qemu-hint", "ferry-on", "ferry-off"]
        );
        assert_eq!(
            names(&config, 3),
            ["qemu-hint", "ferry-off", "ferry-on", "qemu-off"]
        );
        assert_eq!(
            names(&config, 4),
            ["ferry-on", "ferry-off", "qemu-off", "qemu-hint"]
        );
        config.variants = vec![Variant::FerryOn, Variant::QemuHint];
        assert_eq!(names(&config, 1), ["ferry-on", "qemu-hint"]);
        // Compressed migrations run on the guests of the settings they compare with.
        config.variants = Variant::ALL.to_vec();
        let groups: Vec<(Group, Vec<Variant>)> = schedule(&config, 1);
        assert_eq!(
            groups[0],
            (
                Group::Ferry,
                vec![Variant::FerryOff, Variant::FerryOn, Variant::FerryZstd]
            )
        );
        assert_eq!(
            groups[1],
            (Group::QemuOff, vec![Variant::QemuOff, Variant::QemuZstd])
        );
    }

    #[test]
    fn a_link_in_mbit_is_a_limit_in_bytes_per_second() {
        let mut config = BenchConfig::new("/bin/ferry".into());
        assert_eq!(config.link_bytes_per_s(), None);
        config.link_mbit = Some(100);
        assert_eq!(config.link_bytes_per_s(), Some(12_500_000));
    }
}
