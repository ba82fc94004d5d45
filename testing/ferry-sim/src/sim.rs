//! Driving the simulated guest during a migration: workloads, the VM-control and hint-source
//! stand-ins, and the tick that advances them.
//!
//! In deterministic mode the engine's progress events drive the guest ([`SimDriver`] is an
//! [`Observer`]): every event runs a fixed number of guest operations and delivers whatever
//! hints are due, all on the migration thread, so a seed fully determines what the engine
//! sees. In real-time mode ([`SimVm::spawn_ticker`]) a background thread ticks instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rand::Rng;

use ferry_migration::hint::RANGES_PER_MESSAGE_MAX;
use ferry_migration::{
    Epoch, Event, GuestRange, HintKind, HintSink, HintSource, Observer, Outcome, VmControl,
    VmControlError, PAGE_SIZE,
};

use crate::guest::{Guest, PageState};

/// What the guest does while it is being migrated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Nothing after setup.
    Idle,
    /// At setup, touch `percent`% of RAM with data and free it again.
    Freed {
        /// Share of RAM touched and freed.
        percent: u8,
    },
    /// Rewrite `pages_per_tick` random pages of the in-use set every tick.
    Dirty {
        /// Pages rewritten per tick.
        pages_per_tick: u32,
    },
    /// Allocate, write and free `pages_per_tick` pages every tick.
    Churn {
        /// Pages allocated and freed per tick.
        pages_per_tick: u32,
    },
    /// `Churn` whose freed pages the guest reports at once and the device discards (free
    /// page reporting): they become holes that read as zero, which the never-populated
    /// source hints as known-zero, and the allocator hands them out again a tick later.
    ReportedChurn {
        /// Pages allocated and freed per tick.
        pages_per_tick: u32,
    },
}

/// How the simulated balloon answers free page hinting requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HintBehavior {
    /// Hints every free page `delay_ticks` ticks after each epoch begins, holding them.
    Honest {
        /// Ticks before the answer.
        delay_ticks: u32,
    },
    /// Like `Honest`, but the guest's shrinker takes hinted pages back and writes them.
    Shrinker {
        /// Ticks before the answer.
        delay_ticks: u32,
    },
    /// Hints without holding: the guest reuses hinted pages freely.
    NoHold {
        /// Ticks before the answer.
        delay_ticks: u32,
    },
    /// Answers each epoch only as it ends, too late to be applied.
    Late,
    /// Sends hints tagged with the next epoch, before it begins.
    Early,
    /// Honest hints mixed with ranges outside RAM, misaligned, empty and overlapping.
    Garbage,
    /// Thousands of tiny hint messages every tick.
    Flood,
    /// Every tick, messages of the most ranges a message carries, each covering all of RAM
    /// (what costs the engine most per message). A lie: used pages are hinted too, so the
    /// guest gives up their content, which only it can do to itself.
    WholeRamFlood,
    /// Never answers.
    Silent,
}

/// Setup parameters of a simulated guest.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    /// Share of RAM in use with data when the migration starts.
    pub used_percent: u8,
    /// The workload.
    pub workload: Workload,
    /// Guest operations per tick are the workload's; this bounds ticks' hint deliveries.
    pub hints: Option<HintBehavior>,
    /// The guest clears the pages it takes for hinting, like Linux with `init_on_alloc=1`
    /// (Debian's default).
    pub zero_on_alloc: bool,
}

/// Shared state of the simulated VM.
#[derive(Debug)]
pub struct SimState {
    /// The guest.
    pub guest: Guest,
    /// Whether the VM is paused (no guest operation may run).
    pub paused: bool,
    workload: Workload,
    hints: Option<HintBehavior>,
    zero_on_alloc: bool,
    sink: Option<HintSink>,
    /// Pending answer: (epoch, ticks left, ranges).
    pending: Option<(Epoch, u32, Vec<GuestRange>)>,
    /// An answer withheld until the epoch is over (the `Late` behavior).
    late: Option<(Epoch, Vec<GuestRange>)>,
    current: Option<Epoch>,
    /// Balloon-style cmd_id state: `true` once DONE was given.
    pub hinting_done: bool,
}

/// A handle to the simulated VM, cloneable across the engine's trait objects.
#[derive(Debug, Clone)]
pub struct SimVm(Arc<Mutex<SimState>>);

impl SimVm {
    /// Sets up `guest` for `config`: fills the in-use share and runs the workload's setup.
    pub fn new(mut guest: Guest, config: SimConfig) -> Self {
        let total = guest.layout().pages();
        let percent = |p: u8| total * u64::from(p.min(100)) / 100;
        if let Workload::Freed { percent: p } = config.workload {
            let touched: Vec<u64> = (0..percent(p)).filter_map(|_| guest.alloc()).collect();
            // Keep the in-use share allocated after the freed share, so freed pages are
            // scattered below the in-use ones as after a real workload exits.
            for _ in 0..percent(config.used_percent) {
                guest.alloc();
            }
            for i in touched {
                guest.free(i);
            }
        } else {
            for _ in 0..percent(config.used_percent) {
                guest.alloc();
            }
        }
        Self(Arc::new(Mutex::new(SimState {
            guest,
            paused: false,
            workload: config.workload,
            hints: config.hints,
            zero_on_alloc: config.zero_on_alloc,
            sink: None,
            pending: None,
            late: None,
            current: None,
            hinting_done: false,
        })))
    }

    /// Locks the state.
    pub fn lock(&self) -> MutexGuard<'_, SimState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one tick: guest operations (unless paused) and due hint deliveries.
    pub fn tick(&self) {
        self.lock().tick();
    }

    /// A hint source answering as configured, or `None` when hints are off.
    pub fn hint_source(&self) -> Option<SimHintSource> {
        self.lock().hints.map(|_| SimHintSource(self.clone()))
    }

    /// Ticks every `period` on a background thread until `stop` is set.
    pub fn spawn_ticker(&self, period: Duration, stop: Arc<AtomicBool>) -> JoinHandle<()> {
        let vm = self.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                vm.tick();
                thread::sleep(period);
            }
        })
    }
}

impl SimState {
    fn tick(&mut self) {
        if self.paused {
            // A paused VM runs nothing, and its balloon processes no queue.
            return;
        }
        self.run_workload();
        self.deliver_hints();
    }

    fn run_workload(&mut self) {
        let g = &mut self.guest;
        match self.workload {
            Workload::Idle | Workload::Freed { .. } => {}
            Workload::Dirty { pages_per_tick } => {
                for _ in 0..pages_per_tick {
                    if let Some(i) = g.random_used() {
                        g.rewrite(i);
                    }
                }
            }
            Workload::Churn { pages_per_tick } | Workload::ReportedChurn { pages_per_tick } => {
                let report = matches!(self.workload, Workload::ReportedChurn { .. });
                let mut fresh = Vec::new();
                for _ in 0..pages_per_tick {
                    fresh.extend(g.alloc());
                }
                for _ in 0..pages_per_tick {
                    if let Some(i) = g.random_used() {
                        g.free(i);
                        if report {
                            g.discard(i);
                        }
                    }
                }
                // Some of the new pages are written again right away.
                for i in fresh.into_iter().step_by(3) {
                    g.rewrite(i);
                }
            }
        }
        if matches!(self.hints, Some(HintBehavior::Shrinker { .. })) {
            for _ in 0..4 {
                self.guest.reclaim_held();
            }
        }
    }

    fn deliver_hints(&mut self) {
        let Some(sink) = self.sink.clone() else {
            return;
        };
        match self.hints {
            Some(HintBehavior::Flood) => {
                if let Some(epoch) = self.current {
                    let n = self.guest.layout().pages();
                    for _ in 0..5000 {
                        // One message per page: free pages hinted (not held, so the guest
                        // may reuse them at once), in-use ones as empty ranges.
                        let i = self.guest.rng().random_range(0..n);
                        let gpa = self.guest.layout().gpa_of(i);
                        let free = self.guest.page_states()[i as usize] == PageState::Free;
                        let len = if free { PAGE_SIZE } else { 0 };
                        sink.hint(epoch, &[GuestRange::new(gpa, len)]);
                    }
                }
            }
            Some(HintBehavior::WholeRamFlood) => {
                if let Some(epoch) = self.current {
                    let end = ram_end(&self.guest);
                    let ranges = vec![GuestRange::new(0, end); RANGES_PER_MESSAGE_MAX];
                    for _ in 0..8 {
                        sink.hint(epoch, &ranges);
                    }
                }
            }
            Some(HintBehavior::Early) => {
                if let Some(Epoch(e)) = self.current {
                    let ranges = free_ranges(&self.guest);
                    sink.hint(Epoch(e + 1), &ranges);
                }
            }
            _ => {}
        }
        if let Some((epoch, ticks, ranges)) = self.pending.take() {
            if ticks > 0 {
                self.pending = Some((epoch, ticks - 1, ranges));
            } else {
                sink.hint(epoch, &ranges);
                sink.epoch_complete(epoch);
            }
        }
    }

    fn epoch_begin(&mut self, epoch: Epoch) {
        self.current = Some(epoch);
        let pages = self.guest.layout().pages();
        let (delay, ranges) = match self.hints {
            Some(HintBehavior::Honest { delay_ticks })
            | Some(HintBehavior::Shrinker { delay_ticks }) => {
                (delay_ticks, self.guest.hold_free(pages, self.zero_on_alloc))
            }
            Some(HintBehavior::NoHold { delay_ticks }) => (delay_ticks, free_ranges(&self.guest)),
            Some(HintBehavior::Late) => {
                self.late = Some((epoch, self.guest.hold_free(pages, self.zero_on_alloc)));
                return;
            }
            Some(HintBehavior::Garbage) => {
                let mut r = self.guest.hold_free(pages, self.zero_on_alloc);
                let end = ram_end(&self.guest);
                r.extend([
                    GuestRange::new(end, 1 << 20),
                    GuestRange::new(u64::MAX - PAGE_SIZE, 2 * PAGE_SIZE),
                    GuestRange::new(123, 5),
                    GuestRange::new(0, 0),
                    GuestRange::new(ferry_sim_hole(), 64 * PAGE_SIZE),
                ]);
                // Overlaps: every range again, shifted by half a page.
                let shifted: Vec<_> = r
                    .iter()
                    .map(|x| GuestRange::new(x.gpa + 2048, x.len))
                    .collect();
                r.extend(shifted);
                (0, r)
            }
            Some(
                HintBehavior::Flood
                | HintBehavior::WholeRamFlood
                | HintBehavior::Early
                | HintBehavior::Silent,
            )
            | None => return,
        };
        self.pending = Some((epoch, delay, ranges));
    }

    fn epoch_end(&mut self) {
        if let (Some((old, ranges)), Some(sink)) = (self.late.take(), &self.sink) {
            sink.hint(old, &ranges);
        }
        self.current = None;
        // An answer not given by now is withheld; the guest keeps its pages held.
        self.pending = None;
    }

    fn finish(&mut self) {
        self.current = None;
        self.pending = None;
        self.late = None;
        self.hinting_done = true;
        self.guest.release_held();
    }
}

/// An address in the gap between the simulated RAM regions.
fn ferry_sim_hole() -> u64 {
    crate::guest::HIGH_RAM_START - (1 << 20)
}

/// The guest-physical address just past the last RAM region.
fn ram_end(g: &Guest) -> u64 {
    g.layout().regions().last().map_or(0, |r| r.gpa + r.size)
}

/// Free pages as ranges without holding them.
/// The guest's free pages (on its allocator's free list) as ranges, in address order.
pub fn free_ranges(g: &Guest) -> Vec<GuestRange> {
    let mut ranges: Vec<GuestRange> = Vec::new();
    for (i, s) in g.page_states().iter().enumerate() {
        if *s == PageState::Free {
            let gpa = g.layout().gpa_of(i as u64);
            match ranges.last_mut() {
                Some(r) if r.gpa + r.len == gpa => r.len += PAGE_SIZE,
                _ => ranges.push(GuestRange::new(gpa, PAGE_SIZE)),
            }
        }
    }
    ranges
}

impl VmControl for SimVm {
    fn pause(&mut self) -> Result<(), VmControlError> {
        self.lock().paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmControlError> {
        self.lock().paused = false;
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmControlError> {
        Ok(crate::state::encode(self.lock().guest.page_states()))
    }
}

/// Drives the guest from the engine's progress events (deterministic mode).
#[derive(Debug, Clone)]
pub struct SimDriver(pub SimVm);

impl Observer for SimDriver {
    fn event(&mut self, event: &Event<'_>) {
        if matches!(event, Event::Progress { .. } | Event::RoundStarted { .. }) {
            self.0.tick();
        }
    }
}

/// The simulated balloon's hint source.
#[derive(Debug)]
pub struct SimHintSource(SimVm);

impl HintSource for SimHintSource {
    fn name(&self) -> &str {
        "sim-balloon"
    }

    fn kind(&self) -> HintKind {
        HintKind::Free
    }

    fn start(&mut self, sink: HintSink) {
        self.0.lock().sink = Some(sink);
    }

    fn epoch_begin(&mut self, epoch: Epoch) {
        self.0.lock().epoch_begin(epoch);
    }

    fn epoch_end(&mut self, _epoch: Epoch) {
        self.0.lock().epoch_end();
    }

    fn finish(&mut self, _outcome: Outcome) {
        self.0.lock().finish();
    }
}
