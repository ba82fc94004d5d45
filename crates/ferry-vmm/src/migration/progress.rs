//! Where a running migration is, as `status` reports it, kept current from the engine's
//! events.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_migration::{Event, MigrationStats, Observer};
use serde::{Deserialize, Serialize};

use crate::bus::lock;

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Connecting and handshaking.
    Connecting,
    /// Precopy rounds; the guest runs.
    Precopy,
    /// The guest is paused for the final round.
    Switchover,
    /// The destination acknowledged: the guest runs there now.
    Completed,
    /// The migration failed: the guest keeps running here.
    Failed,
    /// The source handed the guest over but got neither an acknowledgement nor a refusal:
    /// the destination may be running it, so it stays paused here. The operator checks the
    /// destination and then either resumes it here (`resume`, only if the destination does
    /// not run it) or shuts this copy down (docs/migration.md, "After a migration").
    OutcomeUnknown,
}

/// A migration's progress, reported by `status` under `migration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MigrationProgress {
    /// The destination.
    pub to: String,
    /// Whether hint sources are used.
    pub hints: bool,
    /// Where the migration is.
    pub phase: MigrationPhase,
    /// Current round (0 = bulk).
    pub round: u32,
    /// Whether the current round is the final one.
    pub is_final: bool,
    /// Pages queued at the start of the current round.
    pub pages_queued: u64,
    /// Pages handled so far in the current round.
    pub pages_done: u64,
    /// Bytes sent so far.
    pub bytes: u64,
    /// Milliseconds since the migration started.
    pub elapsed_ms: u64,
    /// Pages the guest dirtied during the last finished round (what the next round sends).
    #[serde(default)]
    pub pages_dirty: u64,
    /// The guest's dirty rate in the last finished round, pages per second.
    #[serde(default)]
    pub dirty_rate_pages_per_s: f64,
    /// The send rate of the last finished round, bytes per second.
    #[serde(default)]
    pub throughput_bytes_per_s: f64,
    /// How long a switchover now would pause the guest, at the best send rate seen,
    /// milliseconds (`null` before a round finished).
    #[serde(default)]
    pub expected_downtime_ms: Option<f64>,
    /// The vCPU throttle in force, percent.
    #[serde(default)]
    pub throttle_percent: u8,
    /// Why it failed.
    pub error: Option<String>,
    /// Final statistics, once completed.
    pub stats: Option<MigrationStats>,
}

impl MigrationProgress {
    pub(crate) fn new(to: &str, hints: bool) -> Self {
        Self {
            to: to.to_owned(),
            hints,
            phase: MigrationPhase::Connecting,
            round: 0,
            is_final: false,
            pages_queued: 0,
            pages_done: 0,
            bytes: 0,
            elapsed_ms: 0,
            pages_dirty: 0,
            dirty_rate_pages_per_s: 0.0,
            throughput_bytes_per_s: 0.0,
            expected_downtime_ms: None,
            throttle_percent: 0,
            error: None,
            stats: None,
        }
    }
}

/// An [`Observer`] that keeps a shared [`MigrationProgress`] current and forwards every
/// event to `inner`.
pub struct ProgressTracker<'a> {
    progress: Arc<Mutex<MigrationProgress>>,
    started: Instant,
    inner: &'a mut dyn Observer,
    /// Best send rate seen, bytes per second (as the engine's convergence estimate uses).
    best_bandwidth: f64,
}

impl<'a> ProgressTracker<'a> {
    /// Tracks into `progress`, forwarding to `inner`.
    pub fn new(progress: Arc<Mutex<MigrationProgress>>, inner: &'a mut dyn Observer) -> Self {
        Self {
            progress,
            started: Instant::now(),
            inner,
            best_bandwidth: 0.0,
        }
    }
}

impl Observer for ProgressTracker<'_> {
    fn event(&mut self, event: &Event<'_>) {
        {
            let mut p = lock(&self.progress);
            p.elapsed_ms = self.started.elapsed().as_millis() as u64;
            match event {
                Event::Connected { .. } => p.phase = MigrationPhase::Precopy,
                Event::RoundStarted {
                    round,
                    pages_queued,
                    is_final,
                } => {
                    p.round = *round;
                    p.is_final = *is_final;
                    p.pages_queued = *pages_queued;
                    p.pages_done = 0;
                }
                Event::Progress {
                    pages_done, bytes, ..
                } => {
                    p.pages_done = *pages_done;
                    p.bytes = *bytes;
                }
                Event::RoundFinished(r) => {
                    p.pages_done = r.pages_queued;
                    p.pages_dirty = r.pages_dirtied;
                    p.dirty_rate_pages_per_s = r.dirty_rate_pages_per_s;
                    p.throughput_bytes_per_s = r.bandwidth_bytes_per_s;
                    p.throttle_percent = r.throttle_percent;
                    if r.bandwidth_bytes_per_s.is_finite() && r.duration_ms >= 5.0 {
                        self.best_bandwidth = self.best_bandwidth.max(r.bandwidth_bytes_per_s);
                    }
                    p.expected_downtime_ms = (self.best_bandwidth > 0.0).then(|| {
                        (r.pages_dirtied * ferry_migration::PAGE_SIZE) as f64 / self.best_bandwidth
                            * 1000.0
                    });
                }
                Event::Paused => p.phase = MigrationPhase::Switchover,
                Event::Completed(s) => {
                    p.phase = MigrationPhase::Completed;
                    p.bytes = s.bytes;
                }
            }
        }
        self.inner.event(event);
    }
}
