//! Free page hinting (virtio 1.2 §5.5.6.5): the engine's hint source, built on the
//! command-id state machine of `crate::round` (whose public parts are re-exported here).

use ferry_migration::{Epoch, HintKind, HintSink, HintSource, Outcome};

pub use crate::round::{HintRoundState, HintStateError, CMD_ID_DONE, CMD_ID_MIN, CMD_ID_STOP};
use crate::shared::Shared;

/// The fewest pages an epoch's hints must spare for the next epoch to ask the guest again:
/// one hint block (4 MiB). Every request costs the guest: its driver allocates, and with
/// Debian's `init_on_alloc` zeroes, every free block in a kernel loop that holds a vCPU, and
/// the zeroed blocks it keeps are written pages the next round reads again. In the lab the
/// bulk round's request spared 69,632 pages (freed workload) and every later one none, while
/// each later one left 1,500-8,700 zeroed pages for the next round, the final one included.
pub const HINT_MIN_YIELD_PAGES: u64 = 1024;

/// How many pages the guest's hints must cover before the source judges whether its
/// request pays, and again after each as many: 4 hint blocks (16 MiB). Short, because in
/// the lab each block of never-populated memory took the driver 100 ms or more: a window of
/// 16 blocks outlasted the whole bulk round.
pub const HINT_WINDOW_PAGES: u64 = 4 * 1024;

/// A request goes on while at least one page in this many of a window's hints is spared
/// (still to be sent when the hint arrived). Below that the guest's hints mostly repeat what
/// the engine knows from elsewhere (never-populated memory) or come after the scan: each
/// costs the guest a 4 MiB block allocated and, with `init_on_alloc`, zeroed, which also
/// populates never-populated host memory. In the lab an idle 1 GiB guest's driver spent
/// 1.1-1.8 s of a single vCPU on a request whose hints spared no page at all.
pub const HINT_WINDOW_MIN_SHARE: u64 = 8;

/// The engine's free page hint source (kind [`HintKind::Free`], name `"balloon-hint"`).
///
/// Get it from [`crate::Balloon::hint_source`] and register it with the engine. Its methods
/// take the device's shared mutex briefly and never wait for the guest. It asks the guest
/// in the bulk round's epoch, then in each next one only while the previous one's hints
/// spared at least [`HINT_MIN_YIELD_PAGES`] pages; and it ends a request early when a window
/// of [`HINT_WINDOW_PAGES`] hinted pages spared less than one in [`HINT_WINDOW_MIN_SHARE`].
#[derive(Debug)]
pub struct BalloonHintSource {
    shared: Shared,
    /// Whether the next epoch asks the guest for hints.
    asking: bool,
    /// The epoch's hinted and spared pages when the current window began.
    window: Option<(Epoch, u64, u64)>,
}

impl BalloonHintSource {
    pub(crate) fn new(shared: Shared) -> Self {
        Self {
            shared,
            asking: true,
            window: None,
        }
    }

    /// Sets `cmd_id` to STOP if `epoch` is the one asked; returns the sink, to tell the engine
    /// when stopping early that the epoch is complete (the driver's own STOP will not: it
    /// no longer matches the id).
    fn stop(&mut self, epoch: Epoch) -> Option<HintSink> {
        let (fire, sink) = {
            let mut inner = self.shared.lock();
            if !inner.hint.end(epoch) {
                return None;
            }
            inner.config.cmd_id = inner.hint.cmd_id();
            (inner.config_changed(), inner.hint_sink.clone())
        };
        if fire {
            self.shared.trigger();
        }
        sink
    }
}

impl HintSource for BalloonHintSource {
    fn name(&self) -> &str {
        "balloon-hint"
    }

    fn kind(&self) -> HintKind {
        HintKind::Free
    }

    fn start(&mut self, sink: HintSink) {
        self.shared.lock().hint_sink = Some(sink);
    }

    fn epoch_begin(&mut self, epoch: Epoch) {
        let (fire, complete_now) = {
            let mut inner = self.shared.lock();
            if inner.hinting_live() && self.asking {
                let id = inner.hint.begin(epoch);
                inner.config.cmd_id = id;
                tracing::debug!(
                    cmd_id = format_args!("{id:#x}"),
                    ?epoch,
                    "balloon: hint round"
                );
                (inner.config_changed(), None)
            } else {
                // No driver to ask, or no point in asking: nothing will come for this epoch.
                (false, inner.hint_sink.clone())
            }
        };
        if fire {
            self.shared.trigger();
        }
        if let Some(sink) = complete_now {
            sink.epoch_complete(epoch);
        }
    }

    fn epoch_end(&mut self, epoch: Epoch) {
        self.stop(epoch);
    }

    fn finish(&mut self, outcome: Outcome) {
        let fire = {
            let mut inner = self.shared.lock();
            inner.hint_sink = None;
            if inner.hint.done() {
                inner.config.cmd_id = inner.hint.cmd_id();
                inner.config_changed()
            } else {
                false
            }
        };
        tracing::debug!(?outcome, "balloon: hinting done");
        if fire {
            self.shared.trigger();
        }
    }

    fn epoch_yield(&mut self, epoch: Epoch, pages_skipped: u64) {
        let asking = pages_skipped >= HINT_MIN_YIELD_PAGES;
        if self.asking && !asking {
            tracing::debug!(
                ?epoch,
                pages_skipped,
                "balloon: hints spared too little; not asking the guest again"
            );
        }
        self.asking = asking;
    }

    fn epoch_progress(&mut self, epoch: Epoch, hinted: u64, spared: u64) {
        let (_, hinted0, spared0) = match self.window {
            Some(w) if w.0 == epoch => w,
            _ => *self.window.insert((epoch, 0, 0)),
        };
        let (h, s) = (
            hinted.saturating_sub(hinted0),
            spared.saturating_sub(spared0),
        );
        if h < HINT_WINDOW_PAGES {
            return;
        }
        self.window = Some((epoch, hinted, spared));
        if s * HINT_WINDOW_MIN_SHARE >= h {
            return;
        }
        if let Some(sink) = self.stop(epoch) {
            tracing::debug!(
                ?epoch,
                window_hinted = h,
                window_spared = s,
                "balloon: the guest's hints stopped sparing pages; ending the request"
            );
            sink.epoch_complete(epoch);
        }
    }

    /// The driver is still in a hint loop it was told to stop: it has not yet closed its
    /// round with STOP. Linux's loop allocates (and, with `init_on_alloc`, zeroes) a 4 MiB
    /// block per turn without yielding, so until then it holds a vCPU in the kernel.
    fn busy(&self) -> bool {
        let inner = self.shared.lock();
        inner.hinting_live() && inner.hint.driver_busy()
    }
}
