//! The markdown table of a run, the goals of issue 6 as ratios, and their verdicts.

use std::fmt::Write as _;

use ferry_migration::SwitchoverStats;

use crate::results::{median, Medians, Results, Variant, Workload};

/// How a goal came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Met.
    Pass,
    /// Not met.
    Miss,
    /// Not measured (a case is missing).
    NotMeasured,
}

impl Verdict {
    /// `PASS`, `MISS` or `n/a`.
    pub fn word(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Miss => "MISS",
            Self::NotMeasured => "n/a",
        }
    }
}

/// One goal: a ratio of medians and its limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Goal {
    /// What is compared.
    pub name: &'static str,
    /// The measured ratio (`None` when a case is missing).
    pub ratio: Option<f64>,
    /// The largest ratio that meets the goal.
    pub limit: f64,
    /// The verdict.
    pub verdict: Verdict,
}

impl Goal {
    fn new(name: &'static str, ratio: Option<f64>, limit: f64) -> Self {
        let verdict = match ratio {
            None => Verdict::NotMeasured,
            Some(r) if r <= limit => Verdict::Pass,
            Some(_) => Verdict::Miss,
        };
        Self {
            name,
            ratio,
            limit,
            verdict,
        }
    }
}

/// `a / b` when both exist and `b` is positive.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => Some(a / b),
        _ => None,
    }
}

/// The goals of issue 6, from the medians of one run:
/// - freed workload: ferry (hints on) sends at most 0.25x the bytes of QEMU with
///   free-page-hint, in at most 0.5x its total time;
/// - idle: ferry (hints on) is no slower than QEMU, hints on or off (the faster of the two);
/// - dirty: ferry with hints on is no slower than with hints off;
/// - every migration of both VMMs passed the guest's integrity check, and no part of the
///   matrix failed.
pub fn goals(results: &Results) -> Vec<Goal> {
    let m = |w, v| results.medians(w, v);
    let time = |w, v| m(w, v).map(|x: Medians| x.total_ms);
    let bytes = |w, v| m(w, v).map(|x: Medians| x.bytes);
    let fastest_qemu = match (
        time(Workload::Idle, Variant::QemuOff),
        time(Workload::Idle, Variant::QemuHint),
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let samples: Vec<_> = results.cases.iter().flat_map(|c| &c.samples).collect();
    let integrity = if samples.is_empty() {
        None
    } else {
        let bad = samples
            .iter()
            .filter(|s| !s.verified || !s.kernel_errors.is_empty())
            .count();
        Some(bad as f64)
    };
    let mut goals = vec![
        Goal::new(
            "freed bytes, ferry on / QEMU hint",
            ratio(
                bytes(Workload::Freed, Variant::FerryOn),
                bytes(Workload::Freed, Variant::QemuHint),
            ),
            0.25,
        ),
        Goal::new(
            "freed total time, ferry on / QEMU hint",
            ratio(
                time(Workload::Freed, Variant::FerryOn),
                time(Workload::Freed, Variant::QemuHint),
            ),
            0.5,
        ),
        Goal::new(
            "idle total time, ferry on / fastest QEMU",
            ratio(time(Workload::Idle, Variant::FerryOn), fastest_qemu),
            1.0,
        ),
        Goal::new(
            "dirty total time, ferry on / ferry off",
            ratio(
                time(Workload::Dirty, Variant::FerryOn),
                time(Workload::Dirty, Variant::FerryOff),
            ),
            1.0,
        ),
        Goal::new(
            "freed bytes, ferry on / guest memory in use at the start",
            ratio(
                bytes(Workload::Freed, Variant::FerryOn).map(|b| b / f64::from(1 << 20)),
                m(Workload::Freed, Variant::FerryOn).and_then(|x| x.in_use_mib),
            ),
            1.3,
        ),
        // The floor of any free-page source: RAM less MemFree also counts what the kernel
        // reserved at boot (its page descriptors alone are 1/64 of RAM), which MemTotal, and
        // with it the goal above, leaves out.
        Goal::new(
            "freed bytes, ferry on / guest RAM not free as the migration starts",
            ratio(
                bytes(Workload::Freed, Variant::FerryOn).map(|b| b / f64::from(1 << 20)),
                m(Workload::Freed, Variant::FerryOn).and_then(|x| x.not_free_mib),
            ),
            1.3,
        ),
    ];
    // Downtime and the pause the guest's outside world sees: ferry against QEMU in the same
    // hint mode (off against off, on against free-page-hint), the worse of the two.
    const PAUSE_GOALS: [(Workload, &str, &str); 3] = [
        (
            Workload::Idle,
            "idle downtime, ferry / QEMU (worse hint mode)",
            "idle guest pause, ferry / QEMU (worse hint mode)",
        ),
        (
            Workload::Freed,
            "freed downtime, ferry / QEMU (worse hint mode)",
            "freed guest pause, ferry / QEMU (worse hint mode)",
        ),
        (
            Workload::Dirty,
            "dirty downtime, ferry / QEMU (worse hint mode)",
            "dirty guest pause, ferry / QEMU (worse hint mode)",
        ),
    ];
    for (w, downtime, pause) in PAUSE_GOALS {
        goals.push(Goal::new(
            downtime,
            same_mode_ratio(results, w, |x| Some(x.downtime_ms)),
            1.0,
        ));
        goals.push(Goal::new(
            pause,
            same_mode_ratio(results, w, |x| x.guest_pause_ms),
            1.0,
        ));
    }
    goals.push(Goal::new(
        "migrations failing verify or with kernel errors",
        integrity,
        0.0,
    ));
    goals.push(Goal::new(
        "VMM settings that failed",
        Some(results.failures.len() as f64),
        0.0,
    ));
    goals
}

/// ferry / QEMU for workload `w` in the same hint mode (ferry off / QEMU off, ferry on /
/// QEMU hint), the larger of the two ratios that were measured.
fn same_mode_ratio(
    results: &Results,
    w: Workload,
    get: fn(&Medians) -> Option<f64>,
) -> Option<f64> {
    let of = |v| results.medians(w, v).and_then(|m| get(&m));
    let off = ratio(of(Variant::FerryOff), of(Variant::QemuOff));
    let on = ratio(of(Variant::FerryOn), of(Variant::QemuHint));
    match (off, on) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn cell(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

fn times(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.2}x"))
}

/// The markdown report: settings, one row per workload and metric with the four variants and
/// the goals' ratio columns, then the goals with PASS/MISS, then failures.
pub fn markdown(results: &Results) -> String {
    let s = &results.setup;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Migration benchmark, {} UTC, {}: guest {} MiB, {} vCPU, data set {} MiB; freed {} MiB; \
         dirty {} MiB at {} MiB/s; downtime limit {} ms; medians of {} run(s); {}; QEMU balloon \
         free-page-reporting {}.\n",
        results.date,
        s.host,
        s.memory_mib,
        s.vcpus,
        s.dataset_mib,
        s.freed_mib,
        s.dirty_mib,
        s.dirty_rate_mib_s,
        s.downtime_limit_ms,
        s.repeat,
        s.qemu_version,
        if s.qemu_reporting { "on" } else { "off" },
    );
    if let Some(mbit) = s.link_mbit {
        let how = match s.link_by.as_deref() {
            Some("tc") => {
                "a token bucket on the lab host's loopback (`tc ... tbf`) that both VMMs' \
                           connections share"
            }
            _ => "each VMM's own bandwidth limit (ferry `--bandwidth`, QEMU `max-bandwidth`)",
        };
        let _ = writeln!(out, "Link: {mbit} Mbit/s, {how}.\n");
    }
    // Columns for the variants that ran; the zstd ratios only when both zstd variants ran.
    let shown = results.variants_run();
    let zstd = shown.contains(&Variant::FerryZstd) && shown.contains(&Variant::QemuZstd);
    out.push_str("| workload | metric |");
    for v in &shown {
        let _ = write!(out, " {} |", v.label());
    }
    out.push_str(" ferry on / QEMU hint | ferry on / ferry off |");
    if zstd {
        out.push_str(" ferry zstd / QEMU zstd | ferry zstd / ferry on |");
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---:|".repeat(shown.len() + if zstd { 4 } else { 2 }));
    out.push('\n');
    let blank = if zstd { " | | | |\n" } else { " | |\n" };
    type Metric = (&'static str, fn(&Medians) -> Option<f64>, usize);
    let metrics: [Metric; 8] = [
        ("MiB sent", |m| Some(m.bytes / f64::from(1 << 20)), 1),
        ("total ms", |m| Some(m.total_ms), 0),
        ("downtime ms", |m| Some(m.downtime_ms), 1),
        ("guest pause ms", |m| m.guest_pause_ms, 1),
        ("largest guest stall ms", |m| m.guest_stall_ms, 1),
        ("in use at start MiB", |m| m.in_use_mib, 0),
        (
            "RAM not free as the migration starts MiB",
            |m| m.not_free_mib,
            0,
        ),
        ("free in hintable 4 MiB blocks MiB", |m| m.hintable_mib, 0),
    ];
    for w in Workload::ALL {
        if Variant::ALL
            .iter()
            .all(|&v| results.medians(w, v).is_none())
        {
            continue;
        }
        for (name, get, digits) in metrics {
            let value = |v| results.medians(w, v).and_then(|m| get(&m));
            let _ = write!(out, "| {w} | {name} |");
            for &v in &shown {
                let _ = write!(out, " {} |", cell(value(v), digits));
            }
            let _ = write!(
                out,
                " {} | {} |",
                times(ratio(value(Variant::FerryOn), value(Variant::QemuHint))),
                times(ratio(value(Variant::FerryOn), value(Variant::FerryOff)))
            );
            if zstd {
                let _ = write!(
                    out,
                    " {} | {} |",
                    times(ratio(value(Variant::FerryZstd), value(Variant::QemuZstd))),
                    times(ratio(value(Variant::FerryZstd), value(Variant::FerryOn)))
                );
            }
            out.push('\n');
        }
        let _ = write!(out, "| {w} | verified |");
        for &v in &shown {
            let text = match results.case(w, v) {
                None => "-".to_string(),
                Some(c) => {
                    let ok = c.samples.iter().filter(|s| s.verified).count();
                    format!("{ok}/{}", c.samples.len())
                }
            };
            let _ = write!(out, " {text} |");
        }
        out.push_str(blank);
        let _ = write!(out, "| {w} | kernel errors |");
        for &v in &shown {
            let text = results.case(w, v).map_or_else(
                || "-".to_string(),
                |c| {
                    let n: usize = c.samples.iter().map(|s| s.kernel_errors.len()).sum();
                    n.to_string()
                },
            );
            let _ = write!(out, " {text} |");
        }
        out.push_str(blank);
    }
    out.push_str("\n| goal | measured | target | result |\n|---|---:|---:|---|\n");
    for g in goals(results) {
        let integrity = g.limit == 0.0;
        let (measured, target) = if integrity {
            (cell(g.ratio, 0), "0".to_string())
        } else {
            (times(g.ratio), format!("<= {:.2}x", g.limit))
        };
        let _ = writeln!(
            out,
            "| {} | {measured} | {target} | {} |",
            g.name,
            g.verdict.word()
        );
    }
    out.push_str(&downtime_breakdown(results));
    let mut first = true;
    for c in &results.cases {
        for (i, line) in c.samples.iter().flat_map(|s| &s.kernel_errors).enumerate() {
            if first {
                out.push_str("\nKernel errors on the source's console:\n");
                first = false;
            }
            if i < 3 {
                let _ = writeln!(out, "- {}, {}: `{line}`", c.workload, c.variant);
            }
        }
    }
    if !results.failures.is_empty() {
        out.push_str("\nFailures:\n");
        for f in &results.failures {
            let _ = writeln!(out, "- {}", f.replace('\n', "\n  "));
        }
    }
    out
}

/// Medians of where ferry's downtime went, one row per workload and ferry setting; empty
/// without any ferry sample that reports it.
fn downtime_breakdown(results: &Results) -> String {
    type Part = (&'static str, fn(&SwitchoverStats) -> f64);
    const PARTS: [Part; 11] = [
        ("pause", |w| w.pause_ms),
        ("dirty sync", |w| w.dirty_sync_ms),
        ("end hints", |w| w.hints_finish_ms),
        ("final round", |w| w.final_round_ms),
        ("audit", |w| w.audit_ms),
        ("save state", |w| w.save_state_ms),
        ("flush", |w| w.flush_ms),
        ("ack wait", |w| w.ack_wait_ms),
        ("of which destination", |w| w.destination_ms),
        ("drain before the pause", |w| w.drain_ms),
        ("of which guest settling", |w| w.settle_ms),
    ];
    let mut out = String::new();
    for c in &results.cases {
        let parts: Vec<&SwitchoverStats> = c
            .samples
            .iter()
            .filter_map(|s| s.switchover.as_ref())
            .collect();
        if parts.is_empty() {
            continue;
        }
        if out.is_empty() {
            out.push_str("\nWhere ferry's downtime goes (medians, ms; the guest is paused from ");
            out.push_str("`pause` to the acknowledgement; the drain comes before it and is ");
            out.push_str("not downtime):\n\n| workload | setting | downtime |");
            for (name, _) in PARTS {
                let _ = write!(out, " {name} |");
            }
            out.push_str(" state KiB | final round pages: queued / sent / zero |\n|---|---|---:|");
            out.push_str(&"---:|".repeat(PARTS.len() + 2));
            out.push('\n');
        }
        let downtime = median(c.samples.iter().map(|s| s.downtime_ms).collect());
        let _ = write!(out, "| {} | {} | {downtime:.1} |", c.workload, c.variant);
        for (_, get) in PARTS {
            let _ = write!(
                out,
                " {:.1} |",
                median(parts.iter().map(|w| get(w)).collect())
            );
        }
        let state = median(parts.iter().map(|w| w.state_bytes as f64).collect());
        let final_pages: Vec<[u64; 3]> = c
            .samples
            .iter()
            .filter_map(|s| s.final_round_pages)
            .collect();
        let pages = |k: usize| median(final_pages.iter().map(|p| p[k] as f64).collect());
        let _ = writeln!(
            out,
            " {:.0} | {:.0} / {:.0} / {:.0} |",
            state / 1024.0,
            pages(0),
            pages(1),
            pages(2)
        );
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::results::{Sample, Setup};

    fn sample(total_ms: f64, mib: u64, verified: bool) -> Sample {
        Sample {
            total_ms,
            downtime_ms: total_ms / 20.0,
            bytes: mib << 20,
            pages_sent: mib * 256,
            pages_zero: 0,
            pages_skipped: 0,
            rounds: 2,
            wall_ms: total_ms + 5.0,
            verified,
            verify_answer: "verify pages=8192".into(),
            kernel_errors: Vec::new(),
            guest_pause_ms: Some(total_ms / 20.0 + 10.0),
            guest_stall_ms: Some(total_ms / 10.0),
            in_use_mib: Some(100),
            not_free_mib: Some(150),
            hintable_mib: Some(600),
            ..Sample::default()
        }
    }

    /// A run shaped like a lab run: ferry beats QEMU on freed and idle, and hints help on
    /// dirty; two repetitions per case.
    pub(crate) fn canned() -> Results {
        let mut r = Results {
            date: "2026-11-27 00:40".into(),
            command: "ferry bench-vm".into(),
            setup: Setup {
                memory_mib: 1024,
                vcpus: 1,
                dataset_mib: 32,
                freed_mib: 768,
                dirty_mib: 64,
                dirty_rate_mib_s: 16,
                repeat: 2,
                downtime_limit_ms: 300,
                qemu_reporting: true,
                qemu_version: "QEMU emulator version 7.2.19".into(),
                host: "lab".into(),
                link_mbit: None,
                link_by: None,
            },
            cases: Vec::new(),
            failures: Vec::new(),
        };
        let table = [
            (Workload::Idle, Variant::FerryOff, 9000.0, 105),
            (Workload::Idle, Variant::FerryOn, 5000.0, 100),
            (Workload::Idle, Variant::QemuOff, 12000.0, 125),
            (Workload::Idle, Variant::QemuHint, 40000.0, 126),
            (Workload::Freed, Variant::FerryOff, 20000.0, 120),
            (Workload::Freed, Variant::FerryOn, 6000.0, 110),
            (Workload::Freed, Variant::QemuOff, 38000.0, 900),
            (Workload::Freed, Variant::QemuHint, 50000.0, 800),
            (Workload::Dirty, Variant::FerryOff, 30000.0, 350),
            (Workload::Dirty, Variant::FerryOn, 15000.0, 110),
            (Workload::Dirty, Variant::QemuOff, 32000.0, 500),
            (Workload::Dirty, Variant::QemuHint, 25000.0, 520),
        ];
        for (w, v, ms, mib) in table {
            r.push(w, v, sample(ms, mib, true));
            r.push(w, v, sample(ms * 1.5, mib + 2, true));
        }
        r
    }

    #[test]
    fn goals_are_ratios_of_medians() {
        let mut r = canned();
        let g = goals(&r);
        assert_eq!(g.len(), 14);
        // Medians: freed ferry on 7500 ms, 111 MiB; QEMU hint 62500 ms, 801 MiB.
        assert!((g[0].ratio.unwrap() - 111.0 / 801.0).abs() < 1e-9);
        assert!((g[1].ratio.unwrap() - 7500.0 / 62500.0).abs() < 1e-9);
        // Idle compares against the faster QEMU (off: 15000 ms median).
        assert!((g[2].ratio.unwrap() - 6250.0 / 15000.0).abs() < 1e-9);
        assert!((g[3].ratio.unwrap() - 0.5).abs() < 1e-9);
        // 111 MiB sent for 100 MiB in use.
        assert!((g[4].ratio.unwrap() - 1.11).abs() < 1e-9);
        // And for 150 MiB of RAM not free.
        assert!((g[5].ratio.unwrap() - 111.0 / 150.0).abs() < 1e-9);
        // Idle downtime medians: ferry off 562.5 / QEMU off 750 is worse than ferry on
        // 312.5 / QEMU hint 2500; the guest pause adds the 10 ms of the canned samples.
        assert!(
            (g[6].ratio.unwrap() - 562.5 / 750.0).abs() < 1e-9,
            "{:?}",
            g[6]
        );
        assert!(
            (g[7].ratio.unwrap() - 572.5 / 760.0).abs() < 1e-9,
            "{:?}",
            g[7]
        );
        assert_eq!(g[12].ratio, Some(0.0));
        assert!(g.iter().all(|g| g.verdict == Verdict::Pass), "{g:#?}");

        // Slower switchovers than QEMU's are misses; without heartbeats the pause is n/a.
        let mut slow = canned();
        for c in &mut slow.cases {
            for s in &mut c.samples {
                if c.variant == Variant::FerryOn {
                    s.downtime_ms *= 100.0;
                }
                if !c.variant.is_ferry() {
                    s.guest_pause_ms = None;
                }
            }
        }
        let g = goals(&slow);
        assert_eq!(g[6].verdict, Verdict::Miss, "{:?}", g[6]);
        assert_eq!(g[7].verdict, Verdict::NotMeasured, "{:?}", g[7]);

        // A failed verify and slower hints under dirty are misses; a missing case is n/a.
        r.push(
            Workload::Dirty,
            Variant::FerryOn,
            sample(90000.0, 100, false),
        );
        r.push(
            Workload::Dirty,
            Variant::FerryOn,
            sample(90000.0, 100, true),
        );
        r.cases
            .retain(|c| !(c.workload == Workload::Freed && c.variant == Variant::QemuHint));
        let g = goals(&r);
        assert_eq!(g[0].verdict, Verdict::NotMeasured);
        assert_eq!(g[1].verdict, Verdict::NotMeasured);
        assert_eq!(g[3].verdict, Verdict::Miss, "{:?}", g[3]);
        assert_eq!((g[12].ratio, g[12].verdict), (Some(1.0), Verdict::Miss));
        r.failures
            .push("qemu-hint: the guest did not answer".into());
        assert_eq!(goals(&r)[12].verdict, Verdict::Miss);
    }

    #[test]
    fn the_table_has_every_case_and_the_verdicts() {
        let text = markdown(&canned());
        assert!(text.contains(
            "| workload | metric | ferry off | ferry on | QEMU off | QEMU hint | ferry on / QEMU hint | ferry on / ferry off |"
        ));
        // Freed bytes: medians 121 / 111 / 901 / 801 MiB.
        assert!(
            text.contains("| freed | MiB sent | 121.0 | 111.0 | 901.0 | 801.0 | 0.14x | 0.92x |"),
            "{text}"
        );
        assert!(
            text.contains(
                "| idle | guest pause ms | 572.5 | 322.5 | 760.0 | 2510.0 | 0.13x | 0.56x |"
            ),
            "{text}"
        );
        assert!(text.contains("| idle | in use at start MiB | 100 | 100 | 100 | 100 |"));
        assert!(text.contains("| freed bytes, ferry on / guest memory in use at the start | 1.11x | <= 1.30x | PASS |"));
        assert!(text.contains("| idle | verified | 2/2 | 2/2 | 2/2 | 2/2 | | |"));
        assert!(text.contains("| dirty | kernel errors | 0 | 0 | 0 | 0 | | |"));
        assert!(text.contains("| freed bytes, ferry on / QEMU hint | 0.14x | <= 0.25x | PASS |"));
        assert!(text.contains("| migrations failing verify or with kernel errors | 0 | 0 | PASS |"));
        assert!(!text.contains("\nFailures:"));
        assert!(!text.contains("Link:"));
        let mut slow = canned();
        slow.setup.link_mbit = Some(100);
        assert!(markdown(&slow).contains("Link: 100 Mbit/s, each VMM's own bandwidth limit"));
        slow.setup.link_by = Some("tc".into());
        assert!(
            markdown(&slow).contains("Link: 100 Mbit/s, a token bucket on the lab host's loopback")
        );
        // Compressed variants get their columns, and their ratios, only when they ran.
        assert!(!text.contains("zstd"));
        let mut zstd = canned();
        for (v, mib) in [(Variant::FerryZstd, 50), (Variant::QemuZstd, 400)] {
            zstd.push(Workload::Freed, v, sample(4000.0, mib, true));
        }
        let text = markdown(&zstd);
        assert!(
            text.contains("| ferry on / QEMU hint | ferry on / ferry off | ferry zstd / QEMU zstd | ferry zstd / ferry on |"),
            "{text}"
        );
        assert!(
            text.contains("| freed | MiB sent | 121.0 | 111.0 | 901.0 | 801.0 | 50.0 | 400.0 | 0.14x | 0.92x | 0.12x | 0.45x |"),
            "{text}"
        );
        assert!(text.contains("| idle | MiB sent | 106.0 | 101.0 | 126.0 | 127.0 | - | - | 0.80x | 0.95x | - | - |"), "{text}");
        let mut r = canned();
        r.failures.push("qemu-hint: boot\nline 2".into());
        r.cases[0].samples[0]
            .kernel_errors
            .push("[ 64.5] watchdog: BUG: soft lockup".into());
        let text = markdown(&r);
        assert!(text.contains("- qemu-hint: boot\n  line 2\n"));
        assert!(text.contains("- idle, ferry off: `[ 64.5] watchdog: BUG: soft lockup`"));
    }

    #[test]
    fn results_round_trip_through_json() {
        let r = canned();
        let path = std::env::temp_dir().join(format!("ferry-bench-{}.json", std::process::id()));
        r.save(&path).unwrap();
        assert_eq!(Results::load(&path).unwrap(), r);
        std::fs::remove_file(&path).unwrap();
    }
}
