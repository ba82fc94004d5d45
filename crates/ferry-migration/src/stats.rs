//! Migration statistics, per round and in total, serializable to JSON.

use serde::{Deserialize, Serialize};

use crate::hint::SourceStats;

/// What one precopy round did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RoundStats {
    /// Round number; 0 is the bulk round.
    pub round: u32,
    /// Whether this was the final, stop-and-copy round.
    pub is_final: bool,
    /// Pages queued at the start of the round (all pages in the bulk round, dirty pages
    /// after).
    pub pages_queued: u64,
    /// Pages sent with their data.
    pub pages_sent: u64,
    /// Pages found all zero (sent as compact zero runs, or not at all where the destination
    /// already holds zeros).
    pub pages_zero: u64,
    /// Pages not sent thanks to hint sources, per source name.
    pub pages_skipped: Vec<(String, u64)>,
    /// Bytes written to the connections.
    pub bytes: u64,
    /// Wall time of the round in milliseconds.
    pub duration_ms: f64,
    /// Time spent letting hint sources answer, milliseconds: before the round's scan (not in
    /// `duration_ms`) and, in the bulk round, during it whenever the guest's hints paid
    /// again (in `duration_ms`).
    #[serde(default)]
    pub head_start_ms: f64,
    /// A closing round: run after the switch-over decision without asking the hint sources,
    /// to send what the guest wrote answering the previous round's request while it runs
    /// rather than in the pause. Its `head_start_ms` is the wait for the guest to stop.
    #[serde(default)]
    pub closing: bool,
    /// Pages dirtied during the round (found by the sync that ended it).
    pub pages_dirtied: u64,
    /// `pages_dirtied` per second of the round.
    pub dirty_rate_pages_per_s: f64,
    /// Bytes per second over the round.
    pub bandwidth_bytes_per_s: f64,
    /// vCPU throttle in force during the round, percent.
    pub throttle_percent: u8,
}

impl RoundStats {
    /// Total pages skipped by all hint sources in this round.
    pub fn pages_skipped_total(&self) -> u64 {
        self.pages_skipped.iter().map(|(_, n)| n).sum()
    }
}

/// Where the switchover's time went, milliseconds. The guest is paused from `pause_ms`'s
/// start to the acknowledgement: the parts add up to [`MigrationStats::downtime_ms`] (up to
/// the bookkeeping between them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SwitchoverStats {
    /// Before the pause, not part of the downtime: waiting (bounded) for the destination to
    /// report everything earlier rounds sent applied, so that the downtime does not include
    /// a backlog.
    #[serde(default)]
    pub drain_ms: f64,
    /// Whether the destination reported everything sent before the pause applied (false:
    /// the drain's bound ran out first, and the downtime includes the rest).
    #[serde(default)]
    pub applied_before_pause: bool,
    /// The part of `drain_ms` spent waiting (bounded) for the guest to finish work a hint
    /// source asked of it (the balloon driver's free page hint loop) before the pause.
    #[serde(default)]
    pub settle_ms: f64,
    /// Stopping the vCPUs and devices.
    pub pause_ms: f64,
    /// The last fetch-and-clear of the dirty log.
    pub dirty_sync_ms: f64,
    /// Ending free page hinting (the hint sources' `finish`).
    pub hints_finish_ms: f64,
    /// Encoding the final round's pages and queueing them to the connections.
    pub final_round_ms: f64,
    /// The dirty-log audit (0 when off).
    pub audit_ms: f64,
    /// Saving the machine state (vCPUs, irqchip, clocks, devices).
    pub save_state_ms: f64,
    /// Machine state size, bytes.
    pub state_bytes: u64,
    /// Writing the machine state and `Complete`, until every connection sent everything
    /// queued (the tail of the final round included).
    pub flush_ms: f64,
    /// From the last byte written to the destination's acknowledgement.
    pub ack_wait_ms: f64,
    /// The part of `ack_wait_ms` the destination reports it spent between the last record
    /// and its acknowledgement (restoring the VM); the rest is the network and receiving.
    /// It can exceed `ack_wait_ms` by a little: its clock starts when the last record
    /// arrived, which can be before this end's writers reported everything sent.
    pub destination_ms: f64,
    /// How long the guest could stay paused before the source would give the switchover up
    /// and resume it here: the downtime limit, or the downtime expected when the round limit
    /// forced the switchover, plus the pause margin (0 if it never paused).
    #[serde(default)]
    pub pause_bound_ms: f64,
}

/// The whole migration's statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MigrationStats {
    /// Guest RAM size in bytes.
    pub guest_bytes: u64,
    /// Every round, bulk first, final last.
    pub rounds: Vec<RoundStats>,
    /// Total pages sent with data.
    pub pages_sent: u64,
    /// Total zero pages.
    pub pages_zero: u64,
    /// Total pages skipped per hint source.
    pub pages_skipped: Vec<(String, u64)>,
    /// Total bytes of records the engine encoded (page data uncompressed).
    pub bytes: u64,
    /// Bytes written to the connections: `bytes` after compression.
    #[serde(default)]
    pub wire_bytes: u64,
    /// Compression of page data agreed with the destination.
    #[serde(default)]
    pub compression: crate::compress::Compression,
    /// From the start of setup to the destination's acknowledgement, milliseconds.
    pub total_ms: f64,
    /// From pausing the VM to the destination's acknowledgement, milliseconds.
    pub downtime_ms: f64,
    /// Where the downtime went.
    #[serde(default)]
    pub switchover: SwitchoverStats,
    /// Per-source hint counters.
    pub sources: Vec<SourceStats>,
    /// Connections used.
    pub connections: u16,
    /// Pages the dirty-log audit found written without the dirty log reporting them (and
    /// sent in the downtime); 0 when the audit is off (see [`crate::audit`]).
    #[serde(default)]
    pub pages_missed_by_dirty_log: u64,
    /// Time the audit took in the downtime, milliseconds (0 when off).
    #[serde(default)]
    pub audit_ms: f64,
    /// Work spent applying hints, in the units of [`crate::hint::HintInbox::drain`].
    #[serde(default)]
    pub hint_work: u64,
    /// The most work one drain of the hint inbox did: what a guest's hints can cost the
    /// scan per checkpoint ([`crate::source::HINT_DRAIN_BUDGET`] plus one range at most).
    #[serde(default)]
    pub hint_drain_work_max: u64,
}

impl MigrationStats {
    /// Adds a finished round to the totals.
    pub fn push_round(&mut self, r: RoundStats) {
        self.pages_sent += r.pages_sent;
        self.pages_zero += r.pages_zero;
        self.bytes += r.bytes;
        for (name, n) in &r.pages_skipped {
            match self.pages_skipped.iter_mut().find(|(m, _)| m == name) {
                Some((_, total)) => *total += n,
                None => self.pages_skipped.push((name.clone(), *n)),
            }
        }
        self.rounds.push(r);
    }

    /// Total pages skipped by all hint sources.
    pub fn pages_skipped_total(&self) -> u64 {
        self.pages_skipped.iter().map(|(_, n)| n).sum()
    }
}
