//! Free page hint sources: the one trait through which the engine learns which pages need not
//! be sent, and the fence that makes applying that knowledge safe.
//!
//! # Protocol
//!
//! Precopy runs in rounds. Before round `k` the engine fetches and clears the dirty log
//! (sync `S_k`); the interval from `S_k` to `S_{k+1}` is *epoch* `k`. For every registered
//! source, round by round:
//!
//! ```text
//!  engine                                   source (e.g. the balloon)
//!  ──────                                   ──────
//!  start(sink) ───────────────────────────▶ keep the sink
//!  dirty logging on
//!  ┌▶ sync S_k (fetch-and-clear dirty log)
//!  │  epoch_begin(k) ─────────────────────▶ ask the guest (new cmd_id)
//!  │  send pages; between batches drain  ◀─ sink.hint(k, ranges) (any thread, any time)
//!  │  the inbox and apply hints tagged k ◀─ sink.epoch_complete(k)
//!  │  epoch_end(k) ───────────────────────▶ tell the guest to stop (cmd_id STOP)
//!  │  close the inbox for k: later hints tagged k are dropped
//!  └─ next round
//!  pause VM, final sync, no hinting
//!  finish(outcome) ─────────────────────▶ release the guest's pages (cmd_id DONE)
//! ```
//!
//! # The safety invariant
//!
//! A hint tagged `k` says: "as of some moment after `S_k`, the guest did not care about these
//! pages' content". The engine applies it **only to its own to-send bitmap** (never to the
//! dirty log, which it cannot even reach through [`crate::DirtyLog`]) and **only while epoch
//! `k` is current**. Every hint is applied on the engine's migration thread, the same thread
//! that performs the syncs, so no application can be in flight during a sync: closing the
//! epoch is the fence. If the guest reuses a hinted page after `S_k`, the write is in the
//! dirty log, `S_{k+1}` marks the page again and round `k + 1` sends it. A hint therefore
//! never loses a guest write, however late, early, stale, duplicated or malformed it is; at
//! worst it costs bandwidth. [`HintInbox`] enforces this and asserts it in debug builds.
//!
//! Sources never make the engine wait: the inbox is a bounded queue, a full queue drops the
//! hint (counted, costing only bandwidth), and the engine bounds how long it lets a source get
//! ahead of the page scanner (the head start).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bitmap::PageBitmap;
use crate::layout::{GuestRange, MemoryLayout};

/// Messages a sink may queue before further hints are dropped.
pub const INBOX_MESSAGES_MAX: usize = 4096;
/// Ranges carried by one message; longer hint lists are split.
pub const RANGES_PER_MESSAGE_MAX: usize = 1024;

/// The interval between two dirty-log syncs; hints are tagged with the epoch they belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(pub u64);

/// What a source's hints promise about the hinted pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HintKind {
    /// The guest does not care about the content (free page hints, reported free pages):
    /// the pages need not be sent at all.
    Free,
    /// The pages read as zero on the source (never-populated or discarded host memory): they
    /// need not be read, and need not be sent where the destination already holds zeros.
    Zero,
}

/// How a migration ended, as told to sources in [`HintSource::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The VM is paused for switchover; hinting is over for good.
    Switchover,
    /// The migration was cancelled; the VM keeps running here.
    Cancelled,
    /// The migration failed; the VM keeps running here.
    Failed,
}

/// A source of knowledge about pages that need not be sent.
///
/// Methods are called on the engine's migration thread and must not block: a source that
/// needs the guest's help asks for it and delivers the answer later through its
/// [`HintSink`], from any thread. The engine calls, in order: [`start`](Self::start) once,
/// then for each round [`epoch_begin`](Self::epoch_begin) and [`epoch_end`](Self::epoch_end),
/// and finally [`finish`](Self::finish) exactly once, on success, cancel and failure alike.
pub trait HintSource: Send {
    /// A short name for statistics and logs, e.g. `"balloon-hint"`.
    fn name(&self) -> &str;
    /// What this source's hints promise.
    fn kind(&self) -> HintKind;
    /// Called once before dirty logging starts, with the sink to deliver hints through.
    fn start(&mut self, sink: HintSink);
    /// Epoch `epoch` has begun: the dirty log was just synced and the epoch is already open,
    /// so hints tagged `epoch` are accepted from this call on (even from within it, or from a
    /// guest that answers at once).
    fn epoch_begin(&mut self, epoch: Epoch);
    /// Epoch `epoch` is ending: stop producing hints for it. The engine drops any hint tagged
    /// `epoch` that it has not applied yet, so this needs no synchronisation with the sink.
    fn epoch_end(&mut self, epoch: Epoch);
    /// Hinting is over (`Switchover`, before the device state is saved) or the migration
    /// ended without switchover. Called exactly once.
    fn finish(&mut self, outcome: Outcome);
    /// How many pages this source's hints tagged `epoch` spared from that epoch's round
    /// (called once per precopy epoch, after its round was sent and before the epoch ends).
    /// A source whose guest pays for every request can stop asking when they stop paying.
    fn epoch_yield(&mut self, epoch: Epoch, pages_skipped: u64) {
        let _ = (epoch, pages_skipped);
    }
    /// How this source's hints tagged `epoch` fared so far: they covered `hinted` pages, of
    /// which `spared` were still to be sent in the round and now are not (the rest were sent
    /// already, or another source or an earlier hint had them). Called on the migration
    /// thread while the epoch is open, whenever more of its hints were applied. A source
    /// whose guest pays for every hint can end its request early once they stop sparing
    /// pages, e.g. when they mostly cover never-populated memory another source knows.
    fn epoch_progress(&mut self, epoch: Epoch, hinted: u64, spared: u64) {
        let _ = (epoch, hinted, spared);
    }
    /// Whether the guest is still doing work this source asked of it, e.g. the balloon
    /// driver still in a free page hint loop the last `epoch_end` told it to stop. Before it
    /// pauses the guest the engine waits, briefly and within a bound, for every source to
    /// say no, so that the pause does not catch the guest in the middle of that work. Must
    /// be quick; a source that asks nothing of the guest keeps the default.
    fn busy(&self) -> bool {
        false
    }
}

/// What travels from sinks to the inbox.
#[derive(Debug)]
enum Message {
    Hints {
        source: usize,
        epoch: Epoch,
        ranges: Vec<GuestRange>,
    },
    EpochComplete {
        source: usize,
        epoch: Epoch,
    },
}

/// The handle through which a source delivers hints. Cheap to clone, usable from any thread;
/// never blocks.
#[derive(Debug, Clone)]
pub struct HintSink {
    source: usize,
    tx: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
    /// The inbox's open epoch ([`CLOSED`] when none), shared with the inbox.
    open: Arc<AtomicU64>,
}

/// Value of the shared open-epoch cell while no epoch is open.
const CLOSED: u64 = u64::MAX;

impl HintSink {
    /// Delivers hints for `epoch`. Returns `false` if (part of) it was dropped because the
    /// inbox is full or the migration is over; a dropped hint only costs bandwidth.
    ///
    /// A hint tagged with an epoch that is not open *now* is dropped here: one tagged with
    /// an epoch that has not begun was gathered before that epoch's sync and could hide a
    /// write the sync found (the inbox drops those tagged with an epoch that has ended).
    pub fn hint(&self, epoch: Epoch, ranges: &[GuestRange]) -> bool {
        if self.open.load(Ordering::Acquire) != epoch.0 {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        ranges.chunks(RANGES_PER_MESSAGE_MAX).all(|chunk| {
            self.send(Message::Hints {
                source: self.source,
                epoch,
                ranges: chunk.to_vec(),
            })
        })
    }

    /// Tells the engine this source has nothing more to say about `epoch`, so the engine
    /// need not give it a head start any longer.
    pub fn epoch_complete(&self, epoch: Epoch) -> bool {
        self.send(Message::EpochComplete {
            source: self.source,
            epoch,
        })
    }

    fn send(&self, msg: Message) -> bool {
        match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

/// Per-source counters kept by the inbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SourceStats {
    /// Source name.
    pub name: String,
    /// Hinted ranges received for the current epoch and applied.
    pub ranges_applied: u64,
    /// Pages removed from the to-send set by this source (not counted again by others).
    pub pages_skipped: u64,
    /// Pages the applied ranges covered, whether or not they were still to be sent (already
    /// sent, or skipped by another source or an earlier hint).
    #[serde(default)]
    pub pages_hinted: u64,
    /// Messages dropped because they were tagged with an epoch that was not current.
    pub messages_stale: u64,
    /// Ranges that were empty or lay wholly outside guest RAM.
    pub ranges_invalid: u64,
    /// Messages dropped by the sink: inbox full or gone, or tagged with an epoch that was
    /// not open when they were sent.
    pub messages_dropped: u64,
}

/// The result of draining the inbox once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Messages taken out of the queue.
    pub messages: usize,
    /// Pages removed from the to-send set.
    pub pages_skipped: u64,
    /// Work spent (see [`HintInbox::drain`]).
    pub work: u64,
}

/// A message being applied: ranges from `next` on are still to be looked at.
#[derive(Debug)]
struct Partial {
    source: usize,
    epoch: Epoch,
    ranges: Vec<GuestRange>,
    next: usize,
}

/// The engine's side of the hint queue: applies hints under the epoch fence.
#[derive(Debug)]
pub struct HintInbox {
    rx: Receiver<Message>,
    tx: SyncSender<Message>,
    sources: Vec<(HintKind, Arc<AtomicU64>)>,
    stats: Vec<SourceStats>,
    /// The epoch whose hints may be applied now; `None` while closed (during syncs, the bulk
    /// setup and the final round).
    open: Option<Epoch>,
    /// Sources that said they are done with the open epoch.
    complete: Vec<bool>,
    /// `open` as seen by the sinks.
    shared_open: Arc<AtomicU64>,
    /// The message a drain's budget cut short.
    partial: Option<Partial>,
}

/// Bitmaps a hint is applied to.
#[derive(Debug)]
pub struct HintTargets<'a> {
    /// Pages still to be sent in this round.
    pub to_send: &'a mut PageBitmap,
    /// Pages the destination may hold non-zero data for.
    pub dest_nonzero: &'a PageBitmap,
    /// Pages known to read as zero in this epoch: send a zero record without reading.
    pub known_zero: &'a mut PageBitmap,
    /// The dirty-log audit, if on: pages a free hint covers no longer need to match.
    pub audit: Option<&'a mut crate::audit::Audit>,
}

impl Default for HintInbox {
    fn default() -> Self {
        Self::new()
    }
}

impl HintInbox {
    /// An inbox with no sources, closed.
    pub fn new() -> Self {
        let (tx, rx) = sync_channel(INBOX_MESSAGES_MAX);
        Self {
            rx,
            tx,
            sources: Vec::new(),
            stats: Vec::new(),
            open: None,
            complete: Vec::new(),
            shared_open: Arc::new(AtomicU64::new(CLOSED)),
            partial: None,
        }
    }

    /// Registers a source and returns the sink it must deliver through.
    pub fn register(&mut self, name: &str, kind: HintKind) -> HintSink {
        let dropped = Arc::new(AtomicU64::new(0));
        let source = self.sources.len();
        self.sources.push((kind, dropped.clone()));
        self.stats.push(SourceStats {
            name: name.to_owned(),
            ..Default::default()
        });
        self.complete.push(false);
        HintSink {
            source,
            tx: self.tx.clone(),
            dropped,
            open: self.shared_open.clone(),
        }
    }

    /// Opens epoch `epoch`: from now on hints tagged `epoch` are applied. Must follow a sync.
    pub fn open(&mut self, epoch: Epoch) {
        debug_assert!(
            self.open.is_none(),
            "epoch opened twice without a close (fence broken)"
        );
        self.open = Some(epoch);
        self.complete.fill(false);
        self.shared_open.store(epoch.0, Ordering::Release);
    }

    /// Closes the current epoch: every hint not applied yet becomes stale. This is the fence
    /// that must precede every dirty-log sync.
    pub fn close(&mut self) {
        self.shared_open.store(CLOSED, Ordering::Release);
        self.open = None;
        if let Some(p) = self.partial.take() {
            self.stats[p.source].messages_stale += 1;
        }
    }

    /// Whether no epoch is open (hints cannot be applied); must hold during every sync.
    pub fn is_closed(&self) -> bool {
        self.open.is_none()
    }

    /// The epoch whose hints are applied now, if one is open.
    pub fn open_epoch(&self) -> Option<Epoch> {
        self.open
    }

    /// Whether every registered source said it is done with the open epoch.
    pub fn all_complete(&self) -> bool {
        self.complete.iter().all(|&c| c)
    }

    /// Applies queued hints tagged with the open epoch until about `budget` units of work
    /// are spent, and returns what it did. A unit is a message taken out of the queue, a
    /// range looked at, or one 64-page bitmap word a range covers, so the time a drain
    /// takes is bounded however the guest shapes its hints (1024 ranges of all of RAM in one
    /// message cost as much as they cover, not one message). A message is applied range by
    /// range and the rest waits for the next drain; one range can overshoot the budget by
    /// its own cost, at most a word per 64 pages of RAM. Never blocks.
    pub fn drain(
        &mut self,
        layout: &MemoryLayout,
        targets: &mut HintTargets<'_>,
        budget: u64,
    ) -> Drained {
        let mut drained = Drained::default();
        while drained.work < budget {
            let mut msg = match self.partial.take() {
                Some(p) => p,
                None => {
                    let Ok(msg) = self.rx.try_recv() else { break };
                    drained.messages += 1;
                    drained.work += 1;
                    match msg {
                        Message::EpochComplete { source, epoch } => {
                            if self.open == Some(epoch) {
                                self.complete[source] = true;
                            }
                            continue;
                        }
                        Message::Hints {
                            source,
                            epoch,
                            ranges,
                        } => Partial {
                            source,
                            epoch,
                            ranges,
                            next: 0,
                        },
                    }
                }
            };
            if self.open != Some(msg.epoch) {
                self.stats[msg.source].messages_stale += 1;
                continue;
            }
            while msg.next < msg.ranges.len() && drained.work < budget {
                let (skipped, work) = self.apply(msg.source, layout, targets, msg.ranges[msg.next]);
                msg.next += 1;
                drained.pages_skipped += skipped;
                drained.work += work;
            }
            if msg.next < msg.ranges.len() {
                self.partial = Some(msg);
            }
        }
        drained
    }

    /// Applies one range of a hint of the open epoch; returns the pages it removed from the
    /// to-send set and the work it took (see [`HintInbox::drain`]).
    fn apply(
        &mut self,
        source: usize,
        layout: &MemoryLayout,
        t: &mut HintTargets<'_>,
        range: GuestRange,
    ) -> (u64, u64) {
        debug_assert!(
            self.open.is_some(),
            "hint applied while the epoch is closed"
        );
        let kind = self.sources[source].0;
        let stats = &mut self.stats[source];
        let (mut skipped, mut work) = (0, 1);
        let mut any = false;
        for (start, end) in layout.whole_pages_in(range) {
            any = true;
            stats.pages_hinted += end - start;
            work += (end - 1) / 64 - start / 64 + 1;
            match kind {
                HintKind::Free => {
                    skipped += t.to_send.clear_range(start, end);
                    if let Some(a) = t.audit.as_mut() {
                        a.forget(start, end);
                    }
                }
                // Where the destination may hold data, the page must still become zero
                // there: it stays queued, marked to be sent as a zero record unread.
                HintKind::Zero => {
                    skipped += t
                        .to_send
                        .clear_zero_range(start, end, t.dest_nonzero, t.known_zero);
                }
            }
        }
        if any {
            stats.ranges_applied += 1;
        } else {
            stats.ranges_invalid += 1;
        }
        stats.pages_skipped += skipped;
        (skipped, work)
    }

    /// Per-source hinted and skipped page counts so far, in registration order.
    pub fn page_counts(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.stats.iter().map(|s| (s.pages_hinted, s.pages_skipped))
    }

    /// Per-source statistics so far.
    pub fn stats(&self) -> Vec<SourceStats> {
        let mut stats = self.stats.clone();
        for (s, (_, dropped)) in stats.iter_mut().zip(&self.sources) {
            s.messages_dropped = dropped.load(Ordering::Relaxed);
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{RegionDesc, PAGE_SIZE};

    fn targets<'a>(
        to_send: &'a mut PageBitmap,
        dest_nonzero: &'a PageBitmap,
        known_zero: &'a mut PageBitmap,
    ) -> HintTargets<'a> {
        HintTargets {
            to_send,
            dest_nonzero,
            known_zero,
            audit: None,
        }
    }

    fn setup() -> (MemoryLayout, PageBitmap, PageBitmap, PageBitmap) {
        let layout = MemoryLayout::new(vec![RegionDesc {
            gpa: 0,
            size: 64 * PAGE_SIZE,
        }])
        .unwrap();
        (
            layout,
            PageBitmap::full(64),
            PageBitmap::new(64),
            PageBitmap::new(64),
        )
    }

    #[test]
    fn applies_only_hints_of_the_open_epoch() {
        let (layout, mut to_send, dest, mut kz) = setup();
        let mut inbox = HintInbox::new();
        let sink = inbox.register("test", HintKind::Free);
        let mut t = targets(&mut to_send, &dest, &mut kz);

        // Early: tagged with an epoch that has not begun, refused by the sink.
        inbox.open(Epoch(0));
        assert!(!sink.hint(Epoch(1), &[GuestRange::new(0, 8 * PAGE_SIZE)]));
        assert_eq!(inbox.drain(&layout, &mut t, 100).pages_skipped, 0);
        // Current: applied, with partial pages rounded inwards.
        sink.hint(Epoch(0), &[GuestRange::new(PAGE_SIZE / 2, 4 * PAGE_SIZE)]);
        assert_eq!(inbox.drain(&layout, &mut t, 100).pages_skipped, 3);
        // Late: sent while epoch 0 was open, drained after it closed.
        assert!(sink.hint(Epoch(0), &[GuestRange::new(32 * PAGE_SIZE, 8 * PAGE_SIZE)]));
        inbox.close();
        // Sent after the epoch closed: refused by the sink.
        assert!(!sink.hint(Epoch(0), &[GuestRange::new(48 * PAGE_SIZE, 8 * PAGE_SIZE)]));
        inbox.open(Epoch(1));
        assert_eq!(inbox.drain(&layout, &mut t, 100).pages_skipped, 0);
        assert_eq!(t.to_send.count(), 61);
        let s = &inbox.stats()[0];
        assert_eq!(
            (
                s.messages_stale,
                s.messages_dropped,
                s.ranges_applied,
                s.pages_skipped
            ),
            (1, 2, 1, 3)
        );
    }

    #[test]
    fn garbage_ranges_are_counted_not_applied() {
        let (layout, mut to_send, dest, mut kz) = setup();
        let mut inbox = HintInbox::new();
        let sink = inbox.register("test", HintKind::Free);
        inbox.open(Epoch(0));
        sink.hint(
            Epoch(0),
            &[
                GuestRange::new(u64::MAX - 10, 1000),
                GuestRange::new(64 * PAGE_SIZE, PAGE_SIZE),
                GuestRange::new(0, 0),
                GuestRange::new(1, PAGE_SIZE),
            ],
        );
        let mut t = targets(&mut to_send, &dest, &mut kz);
        assert_eq!(inbox.drain(&layout, &mut t, 100).pages_skipped, 0);
        assert_eq!(inbox.stats()[0].ranges_invalid, 4);
        assert_eq!(to_send.count(), 64);
    }

    #[test]
    fn zero_hints_keep_pages_the_destination_holds_data_for() {
        let (layout, mut to_send, mut dest, mut kz) = setup();
        dest.set_range(4, 6);
        let mut inbox = HintInbox::new();
        let sink = inbox.register("holes", HintKind::Zero);
        inbox.open(Epoch(3));
        sink.hint(Epoch(3), &[GuestRange::new(0, 8 * PAGE_SIZE)]);
        let mut t = targets(&mut to_send, &dest, &mut kz);
        assert_eq!(inbox.drain(&layout, &mut t, 100).pages_skipped, 6);
        assert!(to_send.get(4) && to_send.get(5) && !to_send.get(3) && !to_send.get(6));
        assert!(kz.get(4) && kz.get(5) && !kz.get(3));
    }

    #[test]
    fn a_flood_is_dropped_at_the_sink_and_drained_within_budget() {
        let (layout, mut to_send, dest, mut kz) = setup();
        let mut inbox = HintInbox::new();
        let sink = inbox.register("flood", HintKind::Free);
        inbox.open(Epoch(0));
        let mut accepted = 0;
        for _ in 0..INBOX_MESSAGES_MAX + 10 {
            accepted += usize::from(sink.hint(Epoch(0), &[GuestRange::new(0, PAGE_SIZE)]));
        }
        assert_eq!(accepted, INBOX_MESSAGES_MAX);
        assert_eq!(inbox.stats()[0].messages_dropped, 10);
        let mut t = targets(&mut to_send, &dest, &mut kz);
        // Each message costs 3 units (taken, one range, one word): two are applied, the
        // third taken when the budget runs out waits with its range for the next drain.
        let d = inbox.drain(&layout, &mut t, 7);
        assert_eq!((d.messages, d.work, d.pages_skipped), (3, 7, 1));
        assert_eq!(
            inbox.drain(&layout, &mut t, 2).work,
            2,
            "its range, no new message"
        );
    }

    #[test]
    fn a_message_of_whole_ram_ranges_is_applied_a_budget_at_a_time() {
        // 4096 pages = 64 words; a range of all of RAM costs 65 units.
        let layout = MemoryLayout::new(vec![RegionDesc {
            gpa: 0,
            size: 4096 * PAGE_SIZE,
        }])
        .unwrap();
        let (mut to_send, dest, mut kz) = (
            PageBitmap::full(4096),
            PageBitmap::new(4096),
            PageBitmap::new(4096),
        );
        let mut t = targets(&mut to_send, &dest, &mut kz);
        let mut inbox = HintInbox::new();
        let sink = inbox.register("whole-ram", HintKind::Free);
        inbox.open(Epoch(0));
        let all = GuestRange::new(0, 4096 * PAGE_SIZE);
        assert!(sink.hint(Epoch(0), &[all; RANGES_PER_MESSAGE_MAX]));
        let first = inbox.drain(&layout, &mut t, 200);
        // Taken (1) + 4 ranges (65 each): the fourth crosses the budget, no further one.
        assert_eq!(
            (first.messages, first.work, first.pages_skipped),
            (1, 261, 4096)
        );
        let mut work = first.work;
        let mut drains = 1;
        loop {
            let d = inbox.drain(&layout, &mut t, 200);
            if d.work == 0 {
                break;
            }
            assert!(d.work < 200 + 65, "one drain did {} units", d.work);
            work += d.work;
            drains += 1;
        }
        assert_eq!(work, 1 + 65 * RANGES_PER_MESSAGE_MAX as u64);
        assert_eq!(drains, 256, "1024 ranges, 4 per drain");
        assert_eq!(
            inbox.stats()[0].ranges_applied,
            RANGES_PER_MESSAGE_MAX as u64
        );
    }

    #[test]
    fn closing_the_epoch_drops_the_rest_of_a_message_cut_short() {
        let (layout, mut to_send, dest, mut kz) = setup();
        let mut t = targets(&mut to_send, &dest, &mut kz);
        let mut inbox = HintInbox::new();
        let sink = inbox.register("test", HintKind::Free);
        inbox.open(Epoch(0));
        let ranges: Vec<_> = (0..8)
            .map(|i| GuestRange::new(i * 8 * PAGE_SIZE, 8 * PAGE_SIZE))
            .collect();
        sink.hint(Epoch(0), &ranges);
        // Taken + two ranges of 2 units each.
        assert_eq!(inbox.drain(&layout, &mut t, 5).pages_skipped, 16);
        inbox.close();
        inbox.open(Epoch(1));
        assert_eq!(inbox.drain(&layout, &mut t, 100).pages_skipped, 0);
        assert_eq!(t.to_send.count(), 48);
        assert_eq!(inbox.stats()[0].messages_stale, 1);
    }

    #[test]
    fn completion_counts_only_for_the_open_epoch() {
        let mut inbox = HintInbox::new();
        let a = inbox.register("a", HintKind::Free);
        let b = inbox.register("b", HintKind::Zero);
        let (layout, mut to_send, dest, mut kz) = setup();
        let mut t = targets(&mut to_send, &dest, &mut kz);
        inbox.open(Epoch(2));
        a.epoch_complete(Epoch(1));
        b.epoch_complete(Epoch(2));
        inbox.drain(&layout, &mut t, 100);
        assert!(!inbox.all_complete());
        a.epoch_complete(Epoch(2));
        inbox.drain(&layout, &mut t, 100);
        assert!(inbox.all_complete());
    }
}
