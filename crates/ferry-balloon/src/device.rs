//! The balloon device: lifecycle, VMM-facing controls and queue dispatch. The register
//! interface is in [`crate::mmio`], the per-queue protocol in [`crate::queues`].

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET};
use virtio_queue::{Queue, QueueT};

use crate::counters::{BalloonCounters, WarnLimiter};
use crate::features::{queue_layout, BalloonConfig, QueueKind, QUEUES_MAX};
use crate::hinting::BalloonHintSource;
use crate::memory::GuestMemory;
use crate::queues::QueueCtx;
use crate::reporting::ReportedRangesSource;
use crate::round::HintRound;
use crate::shared::{ConfigSpace, Inner, IrqTrigger, ReportChannel, Shared, INT_CONFIG};
use crate::stats::BalloonStats;

/// Size of every queue the device offers (`QueueNumMax`).
pub const QUEUE_SIZE_MAX: u16 = 256;

/// Per-queue transport registers the driver writes before setting `QueueReady`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QueueRegs {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// A virtio-balloon device with a virtio-mmio (version 2) transport.
///
/// The VMM forwards MMIO accesses to its window through [`crate::MmioDevice`], calls
/// [`Balloon::set_target`] to resize the balloon, [`Balloon::pause`]/[`Balloon::resume`]
/// around VM pauses, registers [`Balloon::hint_source`] and [`Balloon::report_source`] with
/// the migration engine, and saves/restores the device with [`Balloon::save`] and
/// [`Balloon::restore`].
pub struct Balloon {
    pub(crate) config: BalloonConfig,
    pub(crate) mem: GuestMemory,
    pub(crate) shared: Shared,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    pub(crate) driver_features: u64,
    pub(crate) status: u32,
    pub(crate) queue_sel: u32,
    pub(crate) queues: Vec<Queue>,
    pub(crate) regs: [QueueRegs; QUEUES_MAX],
    pub(crate) layout: Vec<QueueKind>,
    pub(crate) paused: bool,
    /// Queues notified while paused (bit per index) and a stats request made while paused.
    pub(crate) pending_notify: u32,
    pub(crate) pending_stats_request: bool,
    /// Set by [`Balloon::restore`] when the saved device had an interrupt pending: the line
    /// is raised again on resume, once the VMM has restored its interrupt controller.
    pub(crate) irq_on_resume: bool,
    pub(crate) stats_head: Option<u16>,
    pub(crate) stats: Option<BalloonStats>,
    pub(crate) discard_inhibited: bool,
    pub(crate) counters: BalloonCounters,
    pub(crate) warn: WarnLimiter,
    /// Set by the VMM, without the device's lock, when it wants the VM paused (see
    /// [`Balloon::pause_request`]).
    pub(crate) pause_requested: Arc<AtomicBool>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("config", &self.config)
            .field("status", &self.status)
            .field("layout", &self.layout)
            .field("paused", &self.paused)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

pub(crate) fn new_queues() -> Vec<Queue> {
    (0..QUEUES_MAX)
        .map(|_| Queue::new(QUEUE_SIZE_MAX).expect("QUEUE_SIZE_MAX is a valid queue size"))
        .collect()
}

impl Balloon {
    /// A device in its reset state, offering the features `config` enables.
    pub fn new(config: BalloonConfig, mem: GuestMemory, irq: Arc<dyn IrqTrigger>) -> Self {
        let inner = Inner {
            config: ConfigSpace::default(),
            config_generation: 0,
            interrupt_status: 0,
            driver_ok: false,
            acked_features: 0,
            hint: HintRound::default(),
            hint_sink: None,
            report: ReportChannel::default(),
        };
        Self {
            config,
            mem,
            shared: Shared::new(inner, irq),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            queue_sel: 0,
            queues: new_queues(),
            regs: [QueueRegs::default(); QUEUES_MAX],
            layout: Vec::new(),
            paused: false,
            pending_notify: 0,
            pending_stats_request: false,
            irq_on_resume: false,
            stats_head: None,
            stats: None,
            discard_inhibited: config.discard_inhibited,
            counters: BalloonCounters::default(),
            warn: WarnLimiter::default(),
            pause_requested: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A flag for the VMM to set when it is about to pause the VM, and to clear once it
    /// called [`Balloon::pause`] (or gave up pausing). A vCPU thread handling a queue
    /// notification holds the device for as long as the guest made work: 256 chains of
    /// 4096 scattered pfns are a million discards, seconds. While the flag is set, queue
    /// processing stops between two chains and leaves the rest on the ring, as if not yet
    /// notified; [`Balloon::resume`] (or a restored device) takes them up. So a pause waits
    /// for one chain at most, whatever the guest queued.
    pub fn pause_request(&self) -> Arc<AtomicBool> {
        self.pause_requested.clone()
    }

    /// The free page hint source to register with the migration engine.
    pub fn hint_source(&self) -> BalloonHintSource {
        BalloonHintSource::new(self.shared.clone())
    }

    /// The discarded-reported-ranges source to register with the migration engine.
    pub fn report_source(&self) -> ReportedRangesSource {
        ReportedRangesSource::new(self.shared.clone())
    }

    /// Asks the guest to hold `num_pages` 4 KiB pages in the balloon (config interrupt).
    pub fn set_target(&mut self, num_pages: u32) {
        let fire = {
            let mut inner = self.shared.lock();
            if inner.config.num_pages == num_pages {
                return;
            }
            inner.config.num_pages = num_pages;
            inner.config_changed()
        };
        if fire {
            self.shared.trigger();
        }
    }

    /// The current target in pages.
    pub fn target(&self) -> u32 {
        self.shared.lock().config.num_pages
    }

    /// Pages the driver says are in the balloon.
    pub fn actual(&self) -> u32 {
        self.shared.lock().config.actual
    }

    /// Negotiated features (0 before `FEATURES_OK`).
    pub fn acked_features(&self) -> u64 {
        self.shared.lock().acked_features
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The latest statistics the guest sent, if any.
    pub fn stats(&self) -> Option<&BalloonStats> {
        self.stats.as_ref()
    }

    /// Counters.
    pub fn counters(&self) -> &BalloonCounters {
        &self.counters
    }

    /// Forbids (or allows again) discarding guest memory, e.g. while it is pinned for DMA.
    pub fn set_discard_inhibited(&mut self, inhibited: bool) {
        self.discard_inhibited = inhibited;
    }

    /// Asks the guest for fresh statistics by returning the stats buffer the device holds.
    /// Returns `false` if the device holds none (stats not negotiated or not yet sent). While
    /// paused, the request is made on [`Balloon::resume`].
    pub fn request_stats(&mut self) -> bool {
        if self.stats_head.is_none() {
            return false;
        }
        if self.paused {
            self.pending_stats_request = true;
            return true;
        }
        self.return_stats_buffer()
    }

    /// Stops all queue processing and all device writes to guest memory: notifications are
    /// remembered and handled on [`Balloon::resume`]. Call when the VM pauses (before the
    /// final dirty-log sync of a migration).
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Resumes queue processing and handles what arrived while paused. After
    /// [`Balloon::restore`] every ready queue is processed, as notifications may have been
    /// lost with the source, and an interrupt the source had pending is raised again.
    pub fn resume(&mut self) {
        if !self.paused {
            return;
        }
        self.paused = false;
        if std::mem::take(&mut self.irq_on_resume) {
            let pending = {
                let inner = self.shared.lock();
                inner.driver_ok && inner.interrupt_status != 0
            };
            if pending {
                self.shared.trigger();
            }
        }
        self.process_pending();
        if std::mem::take(&mut self.pending_stats_request) {
            self.return_stats_buffer();
        }
    }

    /// Processes the queues notified while the device could not process them.
    pub(crate) fn process_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending_notify);
        for index in 0..QUEUES_MAX as u16 {
            if pending & (1 << index) != 0 {
                self.process_queue(index);
            }
        }
    }

    /// Whether the device is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Handles a notification for queue `index` (the value written to `QueueNotify`). The
    /// VMM may call this from an ioeventfd handler instead of routing the MMIO write.
    pub fn process_queue(&mut self, index: u16) {
        if self.paused {
            if usize::from(index) < QUEUES_MAX {
                self.pending_notify |= 1 << index;
            }
            return;
        }
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return;
        }
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            // §3.1.2: no buffer is consumed before DRIVER_OK. Linux kicks the stats queue
            // during probe, before DRIVER_OK; that buffer is taken when DRIVER_OK is set.
            if usize::from(index) < self.layout.len() {
                self.pending_notify |= 1 << index;
            }
            return;
        }
        let Some(&kind) = self.layout.get(usize::from(index)) else {
            if self.warn.allow() {
                tracing::warn!(
                    index,
                    "virtio-balloon: notify for a queue that does not exist"
                );
            }
            return;
        };
        let q = &mut self.queues[usize::from(index)];
        if !q.ready() {
            return;
        }
        let mut ctx = QueueCtx {
            mem: &self.mem,
            shared: &self.shared,
            queue: q,
            counters: &mut self.counters,
            warn: &mut self.warn,
            stats_head: &mut self.stats_head,
            stats: &mut self.stats,
            discard_inhibited: self.discard_inhibited,
            pause_requested: &self.pause_requested,
            yielded: false,
        };
        let result = ctx.process(kind);
        if ctx.yielded {
            // Chains left on the ring for the pause: handled on resume.
            self.pending_notify |= 1 << index;
        }
        match result {
            Ok(true) => self.shared.interrupt(crate::shared::INT_VRING),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(index, error = %e, "virtio-balloon: queue broken, device needs reset");
                self.enter_needs_reset();
            }
        }
    }

    fn return_stats_buffer(&mut self) -> bool {
        let Some(head) = self.stats_head.take() else {
            return false;
        };
        let Some(index) = self.layout.iter().position(|&k| k == QueueKind::Stats) else {
            return false;
        };
        let q = &mut self.queues[index];
        match q.add_used(&self.mem, head, 0) {
            Ok(()) => {
                if crate::queues::needs_irq(q, &self.mem) {
                    self.shared.interrupt(crate::shared::INT_VRING);
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "virtio-balloon: cannot return the stats buffer");
                self.enter_needs_reset();
                false
            }
        }
    }

    /// Sets DEVICE_NEEDS_RESET and tells the driver (virtio 1.2 §2.1.2: the device MUST send
    /// a configuration change notification).
    pub(crate) fn enter_needs_reset(&mut self) {
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return;
        }
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.counters.needs_reset += 1;
        self.shared.interrupt(INT_CONFIG);
    }

    /// Device reset (status written 0): back to the initial state, keeping the VMM-set
    /// target and the hinting command id (the engine's round goes on).
    pub(crate) fn reset(&mut self) {
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.regs = [QueueRegs::default(); QUEUES_MAX];
        self.layout.clear();
        self.pending_notify = 0;
        self.stats_head = None;
        let mut inner = self.shared.lock();
        inner.interrupt_status = 0;
        inner.driver_ok = false;
        inner.acked_features = 0;
        inner.config.actual = 0;
        inner.config.poison_val = 0;
        inner.hint.driver_reset();
    }

    /// Accepts `features` at FEATURES_OK.
    pub(crate) fn accept_features(&mut self, features: u64) {
        self.layout = queue_layout(features);
        self.shared.lock().acked_features = features;
    }
}
