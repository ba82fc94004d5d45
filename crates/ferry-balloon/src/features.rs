//! Feature bits, the VMM's feature switches and the queue layout they imply.
//!
//! virtio 1.2 §5.5.3: queues exist only for negotiated features, in the order inflateq,
//! deflateq, statsq, free_page_vq, reporting_vq, so a queue's index depends on what the
//! driver accepted.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

// virtio-bindings 0.2 has no balloon header; bit numbers from virtio 1.2 §5.5.3. Bit 0
// (MUST_TELL_HOST) is never offered; bit 6 is contested between two proposals and unused.

/// Bit mask of `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
/// Bit mask of `VIRTIO_BALLOON_F_STATS_VQ` (bit 1).
pub const F_STATS_VQ: u64 = 1 << 1;
/// Bit mask of `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` (bit 2).
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// Bit mask of `VIRTIO_BALLOON_F_FREE_PAGE_HINT` (bit 3).
pub const F_FREE_PAGE_HINT: u64 = 1 << 3;
/// Bit mask of `VIRTIO_BALLOON_F_PAGE_POISON` (bit 4).
pub const F_PAGE_POISON: u64 = 1 << 4;
/// Bit mask of `VIRTIO_BALLOON_F_REPORTING` (bit 5).
pub const F_PAGE_REPORTING: u64 = 1 << 5;

/// The most queues a balloon can have (all optional features negotiated).
pub const QUEUES_MAX: usize = 5;

/// What the VMM lets the device offer. `VERSION_1` is always offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    /// Offer the statistics queue.
    pub stats_vq: bool,
    /// Offer `DEFLATE_ON_OOM` (the guest may take pages back under memory pressure).
    pub deflate_on_oom: bool,
    /// Offer free page hinting (the migration hint source).
    pub free_page_hint: bool,
    /// Offer page poison (lets the guest tell which value its free pages hold).
    pub page_poison: bool,
    /// Offer free page reporting (reported pages are discarded on the host).
    pub page_reporting: bool,
    /// Never discard guest memory (inflated or reported pages), e.g. while another device or
    /// process has the memory pinned. Can be changed later with
    /// [`crate::Balloon::set_discard_inhibited`].
    pub discard_inhibited: bool,
}

impl Default for BalloonConfig {
    /// Everything on except discard inhibition.
    fn default() -> Self {
        Self {
            stats_vq: true,
            deflate_on_oom: true,
            free_page_hint: true,
            page_poison: true,
            page_reporting: true,
            discard_inhibited: false,
        }
    }
}

impl BalloonConfig {
    /// The feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        let mut f = F_VERSION_1;
        for (on, bit) in [
            (self.stats_vq, F_STATS_VQ),
            (self.deflate_on_oom, F_DEFLATE_ON_OOM),
            (self.free_page_hint, F_FREE_PAGE_HINT),
            (self.page_poison, F_PAGE_POISON),
            (self.page_reporting, F_PAGE_REPORTING),
        ] {
            if on {
                f |= bit;
            }
        }
        f
    }
}

/// The role of a virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueKind {
    /// Pages the guest gives to the balloon (pfn arrays).
    Inflate,
    /// Pages the guest takes back (pfn arrays).
    Deflate,
    /// Memory statistics.
    Stats,
    /// Free page hints.
    FreePage,
    /// Free page reports.
    Reporting,
}

/// The queue kinds present for negotiated `features`, in queue-index order.
pub fn queue_layout(features: u64) -> Vec<QueueKind> {
    let mut kinds = vec![QueueKind::Inflate, QueueKind::Deflate];
    for (bit, kind) in [
        (F_STATS_VQ, QueueKind::Stats),
        (F_FREE_PAGE_HINT, QueueKind::FreePage),
        (F_PAGE_REPORTING, QueueKind::Reporting),
    ] {
        if features & bit != 0 {
            kinds.push(kind);
        }
    }
    kinds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_indices_follow_negotiated_features() {
        use QueueKind::*;
        assert_eq!(queue_layout(F_VERSION_1), vec![Inflate, Deflate]);
        assert_eq!(
            queue_layout(F_FREE_PAGE_HINT | F_PAGE_REPORTING),
            vec![Inflate, Deflate, FreePage, Reporting]
        );
        assert_eq!(
            queue_layout(F_STATS_VQ | F_PAGE_REPORTING),
            vec![Inflate, Deflate, Stats, Reporting]
        );
        assert_eq!(queue_layout(u64::MAX).len(), QUEUES_MAX);
    }

    #[test]
    fn version_1_is_always_offered() {
        let none = BalloonConfig {
            stats_vq: false,
            deflate_on_oom: false,
            free_page_hint: false,
            page_poison: false,
            page_reporting: false,
            discard_inhibited: false,
        };
        assert_eq!(none.device_features(), F_VERSION_1);
        assert_eq!(
            BalloonConfig::default().device_features(),
            F_VERSION_1 | 0b11_1110
        );
    }
}
