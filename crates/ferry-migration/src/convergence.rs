//! When to stop iterating and switch over, and when to throttle the guest.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::layout::PAGE_SIZE;

/// What to do when `rounds_max` iterative rounds did not bring the expected downtime within
/// the limit (a guest that dirties memory faster than the link, even throttled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum OnNoConvergence {
    /// Switch over anyway: the migration ends, and the guest is paused longer than the limit.
    #[default]
    SwitchOver,
    /// Fail the migration: the guest keeps running here, unpaused.
    Cancel,
}

impl std::str::FromStr for OnNoConvergence {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "switch-over" => Ok(Self::SwitchOver),
            "cancel" => Ok(Self::Cancel),
            other => Err(format!("`{other}`: expected `switch-over` or `cancel`")),
        }
    }
}

/// The convergence policy's knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The longest acceptable pause of the VM.
    pub downtime_max: Duration,
    /// Iterative rounds after the bulk round before switching over regardless.
    pub rounds_max: u32,
    /// Throttle vCPUs when the guest dirties memory faster than we can send it.
    pub auto_converge: bool,
    /// What happens after `rounds_max` rounds without convergence.
    pub on_no_convergence: OnNoConvergence,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            downtime_max: Duration::from_millis(300),
            rounds_max: 30,
            auto_converge: true,
            on_no_convergence: OnNoConvergence::SwitchOver,
        }
    }
}

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run another iterative round.
    Iterate,
    /// The remaining dirty pages fit in the downtime budget: switch over.
    SwitchOver,
    /// The round limit was hit: switch over even though the downtime budget is exceeded.
    RoundLimit,
}

/// Tracks rounds and decides.
#[derive(Debug, Clone)]
pub struct Convergence {
    policy: Policy,
    /// Best bandwidth observed, bytes per second.
    bandwidth: f64,
    throttle: u8,
    hot_rounds: u32,
    /// What the previous round left dirty (for the bulk round: everything).
    last_dirty: u64,
}

/// A final round expected to take at most this long is not worth another round.
pub const DOWNTIME_NEGLIGIBLE: Duration = Duration::from_millis(5);

/// Fraction of the send rate the dirty rate may reach before throttling.
const HOT_RATIO: f64 = 0.5;
/// Consecutive hot rounds before the throttle is raised.
const HOT_ROUNDS_BEFORE_THROTTLE: u32 = 2;
const THROTTLE_FIRST: u8 = 20;
const THROTTLE_STEP: u8 = 10;
const THROTTLE_MAX: u8 = 90;

impl Convergence {
    /// A tracker for `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            bandwidth: 0.0,
            throttle: 0,
            hot_rounds: 0,
            last_dirty: u64::MAX,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The throttle currently asked for, percent.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// Expected time to send `pages` at the best bandwidth seen (all pages counted as data).
    pub fn expected_downtime(&self, pages: u64) -> Duration {
        if self.bandwidth <= 0.0 {
            return Duration::MAX;
        }
        Duration::from_secs_f64((pages * PAGE_SIZE) as f64 / self.bandwidth)
    }

    /// Records that the next round starts with `pages` queued after all (a sync between two
    /// rounds, as before a closing round, added what the guest wrote meanwhile): the next
    /// decision compares what that round leaves with this.
    pub fn requeued(&mut self, pages: u64) {
        self.last_dirty = pages;
    }

    /// Records round `round` (0 = bulk) that wrote `bytes` in `elapsed` and left
    /// `pages_dirty` pages dirty, and decides what comes next.
    ///
    /// The downtime limit is a ceiling, not a target: once what is left fits it, precopy
    /// goes on while each round still halves what the previous one left (the bulk round:
    /// all of RAM) and the rounds allow, unless it is negligible ([`DOWNTIME_NEGLIGIBLE`]),
    /// so the pause holds what the guest writes during one short round rather than whatever
    /// the first fitting round happened to leave. In the lab a guest writing
    /// 16 MiB/s was paused for a final round of 2,438 pages (86 ms of downtime against 22 ms
    /// when the round before had been short); one more round of ~50 ms would have left ~250.
    pub fn after_round(
        &mut self,
        round: u32,
        bytes: u64,
        elapsed: Duration,
        pages_dirty: u64,
    ) -> Decision {
        // Rounds shorter than a few milliseconds say little about the link.
        if elapsed >= Duration::from_millis(5) && bytes > 0 {
            self.bandwidth = self.bandwidth.max(bytes as f64 / elapsed.as_secs_f64());
        }
        let last_dirty = std::mem::replace(&mut self.last_dirty, pages_dirty);
        let expected = self.expected_downtime(pages_dirty);
        if pages_dirty == 0 || expected <= self.policy.downtime_max {
            let halving = pages_dirty.saturating_mul(2) <= last_dirty;
            if halving && expected > DOWNTIME_NEGLIGIBLE && round < self.policy.rounds_max {
                return Decision::Iterate;
            }
            return Decision::SwitchOver;
        }
        if round >= self.policy.rounds_max {
            return Decision::RoundLimit;
        }
        let dirty_bytes = (pages_dirty * PAGE_SIZE) as f64;
        if self.policy.auto_converge && round > 0 && dirty_bytes > HOT_RATIO * bytes as f64 {
            self.hot_rounds += 1;
            if self.hot_rounds >= HOT_ROUNDS_BEFORE_THROTTLE {
                self.throttle = match self.throttle {
                    0 => THROTTLE_FIRST,
                    t => t.saturating_add(THROTTLE_STEP).min(THROTTLE_MAX),
                };
            }
        } else {
            self.hot_rounds = 0;
        }
        Decision::Iterate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn switches_over_when_the_rest_fits_the_budget() {
        let mut c = Convergence::new(Policy::default());
        // 100 MiB in 100 ms: 1 GiB/s; 300 ms fits ~76k pages.
        assert_eq!(
            c.after_round(0, 100 << 20, 100 * MS, 100_000),
            Decision::Iterate
        );
        assert_eq!(
            c.after_round(1, 10 << 20, 10 * MS, 60_000),
            Decision::SwitchOver
        );
        assert_eq!(c.after_round(2, 0, MS, 0), Decision::SwitchOver);
    }

    #[test]
    fn goes_on_while_each_round_halves_what_is_left() {
        let mut c = Convergence::new(Policy::default());
        // 1 GiB/s: 40,000 pages (156 ms) fit the 300 ms limit, but the bulk round left
        // more than twice that, so one more round could leave far less.
        assert_eq!(
            c.after_round(0, 1 << 30, 1000 * MS, 100_000),
            Decision::Iterate
        );
        assert_eq!(c.after_round(1, 1 << 20, MS, 40_000), Decision::Iterate);
        assert_eq!(c.after_round(2, 1 << 20, MS, 8_000), Decision::Iterate);
        // No longer halving: what the guest writes during a round is the floor.
        assert_eq!(c.after_round(3, 1 << 20, MS, 5_000), Decision::SwitchOver);
        // A sync before the next round found much more: that round is compared with it.
        c.requeued(40_000);
        assert_eq!(c.after_round(4, 1 << 20, MS, 10_000), Decision::Iterate);

        // After the bulk round, what is left is compared with all of RAM: one more round
        // unless negligible (1,000 pages at 1 GiB/s: 3.9 ms).
        let mut c = Convergence::new(Policy::default());
        assert_eq!(
            c.after_round(0, 1 << 30, 1000 * MS, 20_000),
            Decision::Iterate
        );
        let mut c = Convergence::new(Policy::default());
        assert_eq!(
            c.after_round(0, 1 << 30, 1000 * MS, 1_000),
            Decision::SwitchOver
        );
        // Negligible, or out of rounds: switch.
        let mut c = Convergence::new(Policy::default());
        c.after_round(0, 1 << 30, 1000 * MS, 100_000);
        assert_eq!(c.after_round(1, 1 << 20, MS, 1_000), Decision::SwitchOver);
        let mut c = Convergence::new(Policy {
            rounds_max: 1,
            ..Policy::default()
        });
        c.after_round(0, 1 << 30, 1000 * MS, 100_000);
        assert_eq!(c.after_round(1, 1 << 20, MS, 40_000), Decision::SwitchOver);
    }

    #[test]
    fn round_limit_and_throttle() {
        let policy = Policy {
            rounds_max: 4,
            ..Policy::default()
        };
        let mut c = Convergence::new(policy);
        let mut throttles = vec![];
        for round in 0..=4 {
            // 1 MiB/s with 1 GiB dirty: never converges.
            let d = c.after_round(round, 1 << 20, 1000 * MS, 262_144);
            throttles.push(c.throttle());
            assert_eq!(d == Decision::RoundLimit, round == 4, "round {round}");
        }
        assert_eq!(throttles, vec![0, 0, 20, 30, 30]);
    }

    #[test]
    fn the_no_convergence_policy_parses_from_its_names() {
        assert_eq!("switch-over".parse(), Ok(OnNoConvergence::SwitchOver));
        assert_eq!("cancel".parse(), Ok(OnNoConvergence::Cancel));
        assert!("abort"
            .parse::<OnNoConvergence>()
            .unwrap_err()
            .contains("switch-over"));
        assert_eq!(
            Policy::default().on_no_convergence,
            OnNoConvergence::SwitchOver
        );
    }

    #[test]
    fn no_throttle_when_disabled() {
        let mut c = Convergence::new(Policy {
            auto_converge: false,
            ..Policy::default()
        });
        for round in 0..5 {
            c.after_round(round, 1 << 20, 1000 * MS, 262_144);
        }
        assert_eq!(c.throttle(), 0);
    }
}
