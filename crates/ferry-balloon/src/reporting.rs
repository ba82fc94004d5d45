//! Free page reporting as a hint source: ranges the device discarded while an epoch was open.
//!
//! A reported range is free in the guest until the device acknowledges the report (virtio
//! 1.2 §5.5.6.7: "The driver MUST NOT use the reported pages until the device has
//! acknowledged"), and the device discards it before acknowledging. So a range discarded
//! after sync `S_k` reads as zero on the source until the guest writes it again, and any such
//! write lands in the dirty log for `S_{k+1}`. Ranges discarded before the epoch opened may
//! have been reused since, so they are never hinted.
//!
//! The kind is [`HintKind::Zero`], not `Free`: with `PAGE_POISON` negotiated and a zero
//! `poison_val` (Linux's `init_on_free`), the guest relies on free pages reading as zero, so
//! the destination must not keep stale data for them. `Zero` lets the engine skip pages the
//! destination has no data for and send a cheap zero record for the rest.

use ferry_migration::{Epoch, GuestRange, HintKind, HintSink, HintSource, Outcome};

use crate::shared::Shared;

/// The engine's source for discarded reported ranges (name `"balloon-report"`).
#[derive(Debug)]
pub struct ReportedRangesSource {
    shared: Shared,
}

impl ReportedRangesSource {
    pub(crate) fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

impl HintSource for ReportedRangesSource {
    fn name(&self) -> &str {
        "balloon-report"
    }

    fn kind(&self) -> HintKind {
        HintKind::Zero
    }

    fn start(&mut self, sink: HintSink) {
        self.shared.lock().report.sink = Some(sink);
    }

    fn epoch_begin(&mut self, epoch: Epoch) {
        let sink = {
            let mut inner = self.shared.lock();
            inner.report.open = Some(epoch);
            inner.report.sink.clone()
        };
        // Reports arrive when the guest decides; the engine need not wait for any.
        if let Some(sink) = sink {
            sink.epoch_complete(epoch);
        }
    }

    fn epoch_end(&mut self, epoch: Epoch) {
        let mut inner = self.shared.lock();
        if inner.report.open == Some(epoch) {
            inner.report.open = None;
        }
    }

    fn finish(&mut self, _outcome: Outcome) {
        let mut inner = self.shared.lock();
        inner.report.open = None;
        inner.report.sink = None;
    }
}

/// The epoch and sink to tag discards with, read *before* discarding: a discard tagged `k`
/// then happened after `S_k`.
pub(crate) fn report_target(shared: &Shared) -> Option<(Epoch, HintSink)> {
    let inner = shared.lock();
    Some((inner.report.open?, inner.report.sink.clone()?))
}

/// Delivers discarded ranges (no-op when empty).
pub(crate) fn deliver(target: &Option<(Epoch, HintSink)>, ranges: &[GuestRange]) {
    if let (Some((epoch, sink)), false) = (target, ranges.is_empty()) {
        if !sink.hint(*epoch, ranges) {
            tracing::debug!(?epoch, "balloon: reported ranges dropped by a full inbox");
        }
    }
}
