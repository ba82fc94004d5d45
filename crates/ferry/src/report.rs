//! Tables of migration statistics for the terminal.

use ferry_migration::{MigrationStats, RoundStats};

use crate::units::mib;

/// A per-round table and a totals line.
pub fn rounds_table(s: &MigrationStats) -> String {
    let mut out = String::new();
    out.push_str("| round | queued | sent | zero | skipped (hints) | bytes | ms | dirtied |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &s.rounds {
        out.push_str(&row(r));
    }
    out.push_str(&format!(
        "\ntotal: {} in {:.0} ms, downtime {:.1} ms, {} pages sent, {} zero, {} skipped ({})\n",
        mib(s.bytes),
        s.total_ms,
        s.downtime_ms,
        s.pages_sent,
        s.pages_zero,
        s.pages_skipped_total(),
        skipped_by_source(s),
    ));
    if s.compression != ferry_migration::Compression::None {
        out.push_str(&format!(
            "compression: {}, {} on the wire ({:.0}% of {})\n",
            s.compression,
            mib(s.wire_bytes),
            100.0 * s.wire_bytes as f64 / s.bytes.max(1) as f64,
            mib(s.bytes)
        ));
    }
    out.push_str(&format!("downtime: {}\n", downtime_breakdown(s)));
    out
}

/// Where the downtime went, e.g. `pause 1.2 ms, dirty sync 3.0 ms, ...` (phases under 0.05 ms
/// left out).
pub fn downtime_breakdown(s: &MigrationStats) -> String {
    let w = &s.switchover;
    let parts = [
        ("pause", w.pause_ms),
        ("dirty sync", w.dirty_sync_ms),
        ("end hints", w.hints_finish_ms),
        ("final round", w.final_round_ms),
        ("audit", w.audit_ms),
        ("save state", w.save_state_ms),
        ("flush", w.flush_ms),
    ];
    let mut out: Vec<String> = parts
        .iter()
        .filter(|(_, ms)| *ms >= 0.05)
        .map(|(name, ms)| format!("{name} {ms:.1} ms"))
        .collect();
    out.push(format!(
        "acknowledgement {:.1} ms (destination restore {:.1} ms)",
        w.ack_wait_ms, w.destination_ms
    ));
    let mut line = format!(
        "{} ({} of machine state)",
        out.join(", "),
        mib(w.state_bytes)
    );
    if w.drain_ms >= 0.05 {
        line.push_str(&format!(
            "; before the pause, {:.1} ms letting queued data drain",
            w.drain_ms
        ));
        if w.settle_ms >= 0.05 {
            line.push_str(&format!(
                " ({:.1} ms of it letting the guest finish its free page hinting)",
                w.settle_ms
            ));
        }
    }
    line
}

fn row(r: &RoundStats) -> String {
    let name = if r.is_final {
        format!("{} (final)", r.round)
    } else if r.closing {
        format!("{} (closing)", r.round)
    } else {
        r.round.to_string()
    };
    format!(
        "| {name} | {} | {} | {} | {} | {} | {:.1} | {} |\n",
        r.pages_queued,
        r.pages_sent,
        r.pages_zero,
        r.pages_skipped_total(),
        mib(r.bytes),
        r.duration_ms,
        r.pages_dirtied
    )
}

/// `name=N, name=M` or `none`.
pub fn skipped_by_source(s: &MigrationStats) -> String {
    if s.pages_skipped.is_empty() {
        return "no hint sources".into();
    }
    s.pages_skipped
        .iter()
        .map(|(n, p)| format!("{n}={p}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Side by side: hints off vs on.
#[cfg(feature = "dev-tools")]
pub fn compare_table(off: &MigrationStats, on: &MigrationStats) -> String {
    let ratio = |a: f64, b: f64| {
        if a > 0.0 {
            format!("{:.2}x", b / a)
        } else {
            "-".into()
        }
    };
    let mut out = String::from("| | hints off | hints on | on/off |\n|---|---:|---:|---:|\n");
    out.push_str(&format!(
        "| bytes sent | {} | {} | {} |\n",
        mib(off.bytes),
        mib(on.bytes),
        ratio(off.bytes as f64, on.bytes as f64)
    ));
    out.push_str(&format!(
        "| total time | {:.0} ms | {:.0} ms | {} |\n",
        off.total_ms,
        on.total_ms,
        ratio(off.total_ms, on.total_ms)
    ));
    out.push_str(&format!(
        "| downtime | {:.1} ms | {:.1} ms | |\n",
        off.downtime_ms, on.downtime_ms
    ));
    out.push_str(&format!(
        "| pages sent | {} | {} | |\n",
        off.pages_sent, on.pages_sent
    ));
    out.push_str(&format!(
        "| pages skipped | {} | {} | |\n",
        off.pages_skipped_total(),
        on.pages_skipped_total()
    ));
    out.push_str(&format!(
        "| rounds | {} | {} | |\n",
        off.rounds.len(),
        on.rounds.len()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_migration::SwitchoverStats;

    #[test]
    fn the_totals_say_what_compression_saved_only_when_it_was_used() {
        let mut s = MigrationStats {
            bytes: 8 << 20,
            wire_bytes: 2 << 20,
            ..MigrationStats::default()
        };
        assert!(!rounds_table(&s).contains("compression"));
        s.compression = ferry_migration::Compression::Zstd { level: 1 };
        let t = rounds_table(&s);
        assert!(
            t.contains("compression: zstd:1, 2.0 MiB on the wire (25% of 8.0 MiB)"),
            "{t}"
        );
    }

    #[test]
    fn the_downtime_line_names_each_phase_and_the_destination_share() {
        let s = MigrationStats {
            switchover: SwitchoverStats {
                pause_ms: 1.25,
                dirty_sync_ms: 0.01,
                save_state_ms: 4.0,
                flush_ms: 2.0,
                ack_wait_ms: 30.0,
                destination_ms: 22.5,
                state_bytes: 3 << 20,
                drain_ms: 12.0,
                ..SwitchoverStats::default()
            },
            ..MigrationStats::default()
        };
        let line = downtime_breakdown(&s);
        assert!(
            line.starts_with("pause 1.2 ms, save state 4.0 ms, flush 2.0 ms, "),
            "{line}"
        );
        assert!(
            line.contains("acknowledgement 30.0 ms (destination restore 22.5 ms)"),
            "{line}"
        );
        assert!(line.contains("3.0 MiB of machine state"), "{line}");
        assert!(
            line.ends_with("before the pause, 12.0 ms letting queued data drain"),
            "{line}"
        );
        // Phases that took no time are left out.
        assert!(
            !line.contains("dirty sync") && !line.contains("audit"),
            "{line}"
        );
        let mut settled = s.clone();
        settled.switchover.settle_ms = 7.5;
        let line = downtime_breakdown(&settled);
        assert!(
            line.ends_with("12.0 ms letting queued data drain (7.5 ms of it letting the guest finish its free page hinting)"),
            "{line}"
        );
    }
}
