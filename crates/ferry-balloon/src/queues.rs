//! Per-queue protocol: inflate/deflate pfn arrays, statistics, free page hints and free page
//! reports. Every chain is validated before it has any effect; a malformed chain is logged
//! (rate-limited), counted and returned to the driver unused, so the driver never waits on
//! it. A queue whose rings themselves are broken puts the device in DEVICE_NEEDS_RESET.

use std::sync::atomic::{AtomicBool, Ordering};

use ferry_migration::{Epoch, GuestRange, HintSink};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::counters::{BalloonCounters, WarnLimiter};
use crate::features::{QueueKind, F_PAGE_POISON};
use crate::memory::{discard, valid_page_range, GuestMemory, BALLOON_PAGE_SIZE};
use crate::reporting::{deliver, report_target};
use crate::round::OutbufEffect;
use crate::shared::Shared;
use crate::stats::{BalloonStats, STAT_ENTRIES_MAX, STAT_ENTRY_LEN};

/// Most descriptors accepted in one chain (Linux uses 1 for balloon queues and at most 32,
/// `PAGE_REPORTING_CAPACITY`, for reports).
pub const CHAIN_DESCRIPTORS_MAX: usize = 64;
/// Most pfns accepted in one inflate/deflate chain (Linux sends at most 256,
/// `VIRTIO_BALLOON_ARRAY_PFNS_MAX`).
pub const PFNS_PER_CHAIN_MAX: usize = 4096;

/// Why a queue or a chain was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    /// The available ring is unreadable or its index jumped by more than the queue size.
    #[error("the available ring is broken: {0}")]
    Ring(String),
    /// The chain's head index is out of range or its first descriptor unreadable.
    #[error("empty descriptor chain (bad head index or unreadable descriptor)")]
    EmptyChain,
    /// The chain loops, links to a bad index, or has an unreadable descriptor.
    #[error("descriptor chain is truncated: a loop, a bad next index or unreadable memory")]
    TruncatedChain,
    /// The chain has more descriptors than [`CHAIN_DESCRIPTORS_MAX`].
    #[error("descriptor chain has more than {CHAIN_DESCRIPTORS_MAX} descriptors")]
    ChainTooLong,
    /// A buffer has the wrong direction for this queue.
    #[error("buffer direction is wrong for the {0:?} queue")]
    WrongDirection(QueueKind),
    /// A buffer has a size this queue does not accept.
    #[error("buffer of {len} bytes is invalid for the {kind:?} queue")]
    BadLength {
        /// The queue.
        kind: QueueKind,
        /// The offending length.
        len: u64,
    },
    /// A buffer or a page range is not (wholly) guest RAM, or not page aligned.
    #[error("range {gpa:#x}+{len:#x} is not page-aligned guest RAM")]
    BadRange {
        /// Guest-physical start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// Everything a queue handler may touch.
pub(crate) struct QueueCtx<'a> {
    pub mem: &'a GuestMemory,
    pub shared: &'a Shared,
    pub queue: &'a mut Queue,
    pub counters: &'a mut BalloonCounters,
    pub warn: &'a mut WarnLimiter,
    pub stats_head: &'a mut Option<u16>,
    pub stats: &'a mut Option<BalloonStats>,
    pub discard_inhibited: bool,
    /// The VMM wants the VM paused: stop between two chains (see
    /// [`crate::Balloon::pause_request`]).
    pub pause_requested: &'a AtomicBool,
    /// Set when processing stopped for a pause with chains left on the ring.
    pub yielded: bool,
}

/// Whether the driver wants a used-buffer interrupt (no EVENT_IDX is offered, so only the
/// avail ring's NO_INTERRUPT flag counts; Linux sets it on queues without a callback such as
/// free_page_vq).
pub(crate) fn needs_irq(q: &Queue, mem: &GuestMemory) -> bool {
    // The used index was just stored; the flags must be read after it is visible. Without a
    // full fence the CPU may read the flags first (x86 reorders a store with a later load):
    // a driver that clears NO_INTERRUPT and then finds no new used entry, while this side
    // read the old flag, would wait for an interrupt that never comes (virtio 1.2 §2.7.7.2;
    // Linux's virtqueue_poll pairs this with virtio_mb).
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    match mem.read_obj::<u16>(GuestAddress(q.avail_ring())) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
        Err(_) => true,
    }
}

/// Reads a chain's descriptors, rejecting loops, bad links and over-long chains.
fn descriptors(chain: DescriptorChain<&GuestMemory>) -> Result<Vec<Descriptor>, QueueError> {
    let mut descs = Vec::new();
    let mut more = false;
    for d in chain {
        if descs.len() == CHAIN_DESCRIPTORS_MAX {
            return Err(QueueError::ChainTooLong);
        }
        more = d.has_next();
        descs.push(d);
    }
    // virtio-queue's iterator stops silently on a loop (its TTL), a next index out of
    // range, an unreadable descriptor or a length overflow; the last descriptor then still
    // says NEXT.
    match (descs.is_empty(), more) {
        (true, _) => Err(QueueError::EmptyChain),
        (false, true) => Err(QueueError::TruncatedChain),
        (false, false) => Ok(descs),
    }
}

/// Reads device-readable buffers into one byte vector of at most `max` bytes.
fn read_all(
    mem: &GuestMemory,
    descs: &[Descriptor],
    kind: QueueKind,
    max: usize,
) -> Result<Vec<u8>, QueueError> {
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if total > max as u64 {
        return Err(QueueError::BadLength { kind, len: total });
    }
    let mut out = vec![0u8; total as usize];
    let mut at = 0usize;
    for d in descs {
        if d.is_write_only() {
            return Err(QueueError::WrongDirection(kind));
        }
        let len = d.len() as usize;
        mem.read_slice(&mut out[at..at + len], d.addr())
            .map_err(|_| QueueError::BadRange {
                gpa: d.addr().raw_value(),
                len: len as u64,
            })?;
        at += len;
    }
    Ok(out)
}

/// The ranges described by device-writable buffers (hints, reports): each must be whole,
/// aligned pages of guest RAM. The device never touches their content.
fn page_ranges(
    mem: &GuestMemory,
    descs: &[Descriptor],
    kind: QueueKind,
) -> Result<Vec<GuestRange>, QueueError> {
    descs
        .iter()
        .map(|d| {
            if !d.is_write_only() {
                return Err(QueueError::WrongDirection(kind));
            }
            let (gpa, len) = (d.addr().raw_value(), u64::from(d.len()));
            if !valid_page_range(mem, gpa, len) {
                return Err(QueueError::BadRange { gpa, len });
            }
            Ok(GuestRange::new(gpa, len))
        })
        .collect()
}

/// Coalesces pfns into ranges of consecutive pages, in the order given.
fn pfn_ranges(pfns: &[u32]) -> Vec<GuestRange> {
    let mut out: Vec<GuestRange> = Vec::new();
    for &pfn in pfns {
        let gpa = u64::from(pfn) * BALLOON_PAGE_SIZE;
        match out.last_mut() {
            Some(r) if r.gpa + r.len == gpa => r.len += BALLOON_PAGE_SIZE,
            _ => out.push(GuestRange::new(gpa, BALLOON_PAGE_SIZE)),
        }
    }
    out
}

/// Hints collected for one epoch, delivered in one message.
#[derive(Default)]
struct HintBatch {
    target: Option<(Epoch, HintSink)>,
    ranges: Vec<GuestRange>,
}

impl HintBatch {
    fn push(&mut self, epoch: Epoch, sink: HintSink, ranges: Vec<GuestRange>) {
        if self.target.as_ref().is_some_and(|(e, _)| *e != epoch) {
            self.flush();
        }
        if self.target.is_none() {
            self.target = Some((epoch, sink));
        }
        self.ranges.extend(ranges);
    }

    fn flush(&mut self) {
        if let Some((epoch, sink)) = &self.target {
            if !self.ranges.is_empty() && !sink.hint(*epoch, &self.ranges) {
                tracing::debug!(?epoch, "balloon: hints dropped by a full inbox");
            }
        }
        self.ranges.clear();
        self.target = None;
    }
}

/// What to do with a chain once handled.
enum Disposition {
    /// Put it in the used ring with this length.
    Used(u32),
    /// Keep it (the stats buffer).
    Hold,
}

impl QueueCtx<'_> {
    /// Handles everything the driver made available. Returns whether used buffers were
    /// added and the driver wants an interrupt.
    pub fn process(&mut self, kind: QueueKind) -> Result<bool, QueueError> {
        let mem = self.mem;
        let first = self.queue.next_avail();
        // At most `size` chains (the iterator refuses an index that ran further ahead).
        let chains: Vec<_> = self
            .queue
            .iter(mem)
            .map_err(|e| QueueError::Ring(e.to_string()))?
            .collect();
        let mut batch = HintBatch::default();
        let report = (kind == QueueKind::Reporting)
            .then(|| report_target(self.shared))
            .flatten();
        let mut discarded = Vec::new();
        let mut used = false;
        let n_chains = chains.len();
        for (taken, chain) in chains.into_iter().enumerate() {
            if self.pause_requested.load(Ordering::Acquire) {
                // Give the chains not started back: the next pass takes them from here.
                self.queue.set_next_avail(first.wrapping_add(taken as u16));
                self.yielded = true;
                break;
            }
            let head = chain.head_index();
            let result = descriptors(chain).and_then(|descs| match kind {
                QueueKind::Inflate | QueueKind::Deflate => self.balloon(kind, &descs),
                QueueKind::Stats => self.stats(&descs, head),
                QueueKind::FreePage => self.free_page(&descs, &mut batch),
                QueueKind::Reporting => self.report(&descs, &mut discarded),
            });
            let disposition = result.unwrap_or_else(|e| {
                self.counters.chains_dropped += 1;
                if self.warn.allow() {
                    tracing::warn!(queue = ?kind, head, error = %e, "virtio-balloon: dropped a descriptor chain");
                }
                Disposition::Used(0)
            });
            if let Disposition::Used(len) = disposition {
                // add_used rejects a head index beyond the queue (nothing to return then).
                if self.queue.add_used(mem, head, len).is_ok() {
                    used = true;
                }
            }
        }
        batch.flush();
        deliver(&report, &discarded);
        tracing::trace!(
            queue = ?kind,
            chains = n_chains,
            next_avail = self.queue.next_avail(),
            next_used = self.queue.next_used(),
            "virtio-balloon: processed"
        );
        Ok(used && needs_irq(self.queue, mem))
    }

    fn balloon(
        &mut self,
        kind: QueueKind,
        descs: &[Descriptor],
    ) -> Result<Disposition, QueueError> {
        let bytes = read_all(self.mem, descs, kind, PFNS_PER_CHAIN_MAX * 4)?;
        if bytes.len() % 4 != 0 {
            return Err(QueueError::BadLength {
                kind,
                len: bytes.len() as u64,
            });
        }
        let pfns: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let ranges = pfn_ranges(&pfns);
        if let Some(bad) = ranges
            .iter()
            .find(|r| !valid_page_range(self.mem, r.gpa, r.len))
        {
            return Err(QueueError::BadRange {
                gpa: bad.gpa,
                len: bad.len,
            });
        }
        let pages = pfns.len() as u64;
        if kind == QueueKind::Deflate {
            self.counters.deflated_pages += pages;
            return Ok(Disposition::Used(0));
        }
        self.counters.inflated_pages += pages;
        // virtio 1.2 §5.5.6.1: the device MAY modify an inflated page's content before
        // using the inflate buffer. PAGE_POISON does not matter here: Linux frees deflated
        // pages through the allocator, which initialises them again.
        if !self.discard_inhibited {
            for r in &ranges {
                self.discard(r);
            }
        }
        Ok(Disposition::Used(0))
    }

    fn discard(&mut self, r: &GuestRange) -> bool {
        match discard(self.mem, r.gpa, r.len) {
            Ok(()) => {
                self.counters.discarded_bytes += r.len;
                true
            }
            Err(e) => {
                if self.warn.allow() {
                    tracing::warn!(error = %e, "virtio-balloon: discard failed");
                }
                false
            }
        }
    }

    fn stats(&mut self, descs: &[Descriptor], head: u16) -> Result<Disposition, QueueError> {
        let bytes = read_all(
            self.mem,
            descs,
            QueueKind::Stats,
            STAT_ENTRIES_MAX * STAT_ENTRY_LEN,
        )?;
        *self.stats = Some(BalloonStats::parse(&bytes));
        // The driver makes at most one buffer available (§5.5.6.3.1); if it made another,
        // give the old one back so it is not lost.
        if let Some(old) = self.stats_head.replace(head) {
            if self.queue.add_used(self.mem, old, 0).is_err() && self.warn.allow() {
                tracing::warn!(old, "virtio-balloon: cannot return an old stats buffer");
            }
        }
        Ok(Disposition::Hold)
    }

    fn free_page(
        &mut self,
        descs: &[Descriptor],
        batch: &mut HintBatch,
    ) -> Result<Disposition, QueueError> {
        let kind = QueueKind::FreePage;
        if !descs[0].is_write_only() {
            // A command: one 4-byte outbuf (§5.5.6.5.1).
            if descs.len() != 1 || descs[0].len() != 4 {
                let len = descs.iter().map(|d| u64::from(d.len())).sum();
                return Err(QueueError::BadLength { kind, len });
            }
            let bytes = read_all(self.mem, descs, kind, 4)?;
            let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let (effect, sink) = {
                let mut inner = self.shared.lock();
                (inner.hint.on_outbuf(value), inner.hint_sink.clone())
            };
            if let (OutbufEffect::Completed(epoch), Some(sink)) = (effect, sink) {
                batch.flush();
                sink.epoch_complete(epoch);
            }
            return Ok(Disposition::Used(0));
        }
        // Hinted blocks: each inbuf's address and length are the free range (Linux's
        // get_free_page_and_send adds the free block itself as the buffer).
        let ranges = page_ranges(self.mem, descs, kind)?;
        let target = {
            let inner = self.shared.lock();
            inner.hint.accepting().zip(inner.hint_sink.clone())
        };
        match target {
            Some((epoch, sink)) => {
                self.counters.hinted_ranges += ranges.len() as u64;
                batch.push(epoch, sink, ranges);
            }
            None => self.counters.hints_ignored += ranges.len() as u64,
        }
        Ok(Disposition::Used(0))
    }

    fn report(
        &mut self,
        descs: &[Descriptor],
        discarded: &mut Vec<GuestRange>,
    ) -> Result<Disposition, QueueError> {
        let ranges = page_ranges(self.mem, descs, QueueKind::Reporting)?;
        self.counters.reported_ranges += ranges.len() as u64;
        let poisoned = {
            let inner = self.shared.lock();
            inner.acked_features & F_PAGE_POISON != 0 && inner.config.poison_val != 0
        };
        // §5.5.6.7.2: with PAGE_POISON the device MUST NOT change a reported page to
        // anything but poison_val; a hole reads as zero, so only a zero poison allows it.
        if !self.discard_inhibited && !poisoned {
            for r in &ranges {
                if self.discard(r) {
                    discarded.push(*r);
                }
            }
        }
        Ok(Disposition::Used(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pfns_coalesce_into_runs() {
        let r = pfn_ranges(&[1, 2, 3, 7, 8, 2]);
        assert_eq!(
            r,
            vec![
                GuestRange::new(0x1000, 0x3000),
                GuestRange::new(0x7000, 0x2000),
                GuestRange::new(0x2000, 0x1000)
            ]
        );
        assert!(pfn_ranges(&[]).is_empty());
        // The largest pfn does not overflow.
        assert_eq!(pfn_ranges(&[u32::MAX])[0].gpa, u64::from(u32::MAX) << 12);
    }
}
