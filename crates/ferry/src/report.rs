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
    out
}

fn row(r: &RoundStats) -> String {
    let name = if r.is_final {
        format!("{} (final)", r.round)
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
