//! Device state for migration: a plain serde struct, saved while the VM is paused and
//! turned back into a live device only through a validating [`Balloon::restore`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};

use crate::device::{Balloon, QueueRegs, QUEUE_SIZE_MAX};
use crate::features::{queue_layout, BalloonConfig, QueueKind, F_VERSION_1, QUEUES_MAX};
use crate::memory::GuestMemory;
use crate::round::{HintRound, HintRoundState, HintStateError};
use crate::shared::{IrqTrigger, INT_CONFIG, INT_VRING};
use crate::stats::BalloonStats;

/// Version of [`BalloonState`]'s layout; bumped on any incompatible change.
pub const STATE_VERSION: u32 = 1;

/// One virtqueue's state (virtio-queue's `QueueState`, which has no serde support).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// `QueueNumMax`.
    pub max_size: u16,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// Whether EVENT_IDX is in use (never: not offered).
    pub event_idx_enabled: bool,
    /// `QueueNum`.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// Everything the destination needs to continue the device where the source left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// [`STATE_VERSION`] at save time.
    pub version: u32,
    /// Features the source device offered.
    pub device_features: u64,
    /// Features the driver wrote (negotiated once FEATURES_OK is set).
    pub driver_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// Device status.
    pub status: u32,
    /// Interrupt status (pending interrupts are raised again on restore).
    pub interrupt_status: u32,
    /// Config generation.
    pub config_generation: u32,
    /// `num_pages`.
    pub num_pages: u32,
    /// `actual`.
    pub actual: u32,
    /// `poison_val`.
    pub poison_val: u32,
    /// Free page hinting round (its `cmd_id` is `free_page_hint_cmd_id`).
    pub hint: HintRoundState,
    /// One entry per negotiated queue, in queue-index order.
    pub queues: Vec<QueueSnapshot>,
    /// The stats buffer the device holds, by head index.
    pub stats_head: Option<u16>,
    /// The latest statistics.
    pub stats: Option<BalloonStats>,
}

/// Why a saved state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Saved by an incompatible version.
    #[error("balloon state version {0} is not supported (expected {STATE_VERSION})")]
    Version(u32),
    /// The source offered features this device does not.
    #[error("the saved device offered features {saved:#x}, this one offers {here:#x}")]
    Features {
        /// Offered by the source.
        saved: u64,
        /// Offered here.
        here: u64,
    },
    /// Negotiated features the source did not offer, or no VERSION_1.
    #[error("negotiated features {0:#x} are not a valid subset of the offered ones")]
    Negotiated(u64),
    /// Status bits that are unknown or out of order.
    #[error("device status {0:#x} is inconsistent")]
    Status(u32),
    /// Interrupt status bits that are unknown.
    #[error("interrupt status {0:#x} has unknown bits")]
    InterruptStatus(u32),
    /// Queue count does not match the negotiated features.
    #[error("{saved} queues saved, the negotiated features have {expected}")]
    QueueCount {
        /// Saved.
        saved: usize,
        /// Expected.
        expected: usize,
    },
    /// A queue's state is invalid.
    #[error("queue {index} is invalid: {reason}")]
    Queue {
        /// Queue index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The stats buffer reference is inconsistent.
    #[error("the held stats buffer {0} does not exist")]
    StatsHead(u16),
    /// The hinting state is invalid.
    #[error(transparent)]
    Hint(#[from] HintStateError),
}

const STATUS_KNOWN: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FAILED
    | VIRTIO_CONFIG_S_NEEDS_RESET;

fn check_status(s: u32) -> Result<(), StateError> {
    let implies = |bit: u32, needs: u32| s & bit == 0 || s & needs == needs;
    let ok = s & !STATUS_KNOWN == 0
        && implies(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE)
        && implies(VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER)
        && implies(VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK);
    if ok {
        Ok(())
    } else {
        Err(StateError::Status(s))
    }
}

impl Balloon {
    /// Saves the device state. Call with the device paused, after the hint source's
    /// `finish` (so `free_page_hint_cmd_id` is DONE).
    pub fn save(&self) -> BalloonState {
        let inner = self.shared.lock();
        BalloonState {
            version: STATE_VERSION,
            device_features: self.config.device_features(),
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: inner.interrupt_status,
            config_generation: inner.config_generation,
            num_pages: inner.config.num_pages,
            actual: inner.config.actual,
            poison_val: inner.config.poison_val,
            hint: inner.hint.state(),
            queues: self.queues[..self.layout.len()]
                .iter()
                .map(|q| q.state().into())
                .collect(),
            stats_head: self.stats_head,
            stats: self.stats.clone(),
        }
    }

    /// Rebuilds a device from `state`, refusing anything inconsistent. The device comes
    /// back paused: call [`Balloon::resume`] when the VM runs. A pending interrupt is raised
    /// again by [`Balloon::resume`], not here: the source's last trigger may not have reached
    /// the interrupt controller state it saved, and a VMM creates devices before it restores
    /// that state, which would swallow a line raised now.
    pub fn restore(
        config: BalloonConfig,
        mem: GuestMemory,
        irq: Arc<dyn IrqTrigger>,
        state: &BalloonState,
    ) -> Result<Self, StateError> {
        if state.version != STATE_VERSION {
            return Err(StateError::Version(state.version));
        }
        let here = config.device_features();
        if state.device_features != here {
            return Err(StateError::Features {
                saved: state.device_features,
                here,
            });
        }
        check_status(state.status)?;
        if state.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return Err(StateError::InterruptStatus(state.interrupt_status));
        }
        let negotiated = state.status & VIRTIO_CONFIG_S_FEATURES_OK != 0;
        if negotiated
            && (state.driver_features & !here != 0 || state.driver_features & F_VERSION_1 == 0)
        {
            return Err(StateError::Negotiated(state.driver_features));
        }
        let layout = if negotiated {
            queue_layout(state.driver_features)
        } else {
            Vec::new()
        };
        if state.queues.len() != layout.len() {
            return Err(StateError::QueueCount {
                saved: state.queues.len(),
                expected: layout.len(),
            });
        }
        let hint = HintRound::restore(&state.hint)?;

        let mut dev = Balloon::new(config, mem, irq);
        for (index, snap) in state.queues.iter().enumerate() {
            let bad = |reason: String| StateError::Queue { index, reason };
            if snap.max_size != QUEUE_SIZE_MAX || snap.event_idx_enabled {
                return Err(bad("max size or event index differ from this device".into()));
            }
            let q = Queue::try_from(QueueState::from(*snap)).map_err(|e| bad(e.to_string()))?;
            if q.ready() && (snap.avail_ring == 0 || !q.is_valid(&dev.mem)) {
                return Err(bad("rings are not in guest RAM".into()));
            }
            dev.regs[index] = QueueRegs {
                size: snap.size,
                desc: snap.desc_table,
                avail: snap.avail_ring,
                used: snap.used_ring,
            };
            dev.queues[index] = q;
        }
        if let Some(head) = state.stats_head {
            let stats_q = layout.iter().position(|&k| k == QueueKind::Stats);
            match stats_q {
                Some(i) if head < state.queues[i].size => {}
                _ => return Err(StateError::StatsHead(head)),
            }
        }
        debug_assert!(dev.queues.len() == QUEUES_MAX);

        dev.driver_features = state.driver_features;
        dev.device_features_sel = state.device_features_sel;
        dev.driver_features_sel = state.driver_features_sel;
        dev.queue_sel = state.queue_sel;
        dev.status = state.status;
        dev.layout = layout;
        dev.stats_head = state.stats_head;
        dev.stats = state.stats.clone();
        dev.paused = true;
        // Whatever the source had pending is processed on resume.
        dev.pending_notify = (1u32 << dev.layout.len()) - 1;
        dev.irq_on_resume = {
            let mut inner = dev.shared.lock();
            inner.acked_features = if negotiated { state.driver_features } else { 0 };
            inner.driver_ok = state.status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
            inner.interrupt_status = state.interrupt_status;
            inner.config_generation = state.config_generation;
            inner.config.num_pages = state.num_pages;
            inner.config.actual = state.actual;
            inner.config.poison_val = state.poison_val;
            inner.config.cmd_id = hint.cmd_id();
            inner.hint = hint;
            inner.driver_ok && inner.interrupt_status != 0
        };
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmio::MmioDevice;
    use vm_memory::GuestAddress;

    struct NoIrq;
    impl IrqTrigger for NoIrq {
        fn trigger(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// A device negotiated with every feature, rings at `0x1000 * (q + 1)`.
    fn live() -> Balloon {
        let mut d = Balloon::new(BalloonConfig::default(), mem(), Arc::new(NoIrq));
        let mut w = |off: u64, v: u32| d.mmio_write(off, &v.to_le_bytes());
        w(0x70, 3);
        w(0x20, 0x3e);
        w(0x24, 1);
        w(0x20, 1);
        w(0x70, 11);
        for q in 0..5u32 {
            let base = 0x1000 * (q + 1);
            w(0x30, q);
            w(0x38, 16);
            w(0x80, base);
            w(0x90, base + 0x100);
            w(0xa0, base + 0x200);
            w(0x44, 1);
        }
        w(0x70, 15);
        d
    }

    fn restore(s: &BalloonState) -> Result<Balloon, StateError> {
        Balloon::restore(BalloonConfig::default(), mem(), Arc::new(NoIrq), s)
    }

    #[test]
    fn a_saved_state_restores_to_the_same_state() {
        let d = live();
        let s = d.save();
        assert_eq!(s.queues.len(), 5);
        let back = restore(&s).unwrap();
        assert!(back.is_paused());
        assert_eq!(back.save(), s);
        // A freshly reset device too.
        let fresh = Balloon::new(BalloonConfig::default(), mem(), Arc::new(NoIrq));
        assert_eq!(restore(&fresh.save()).unwrap().save(), fresh.save());
    }

    #[test]
    fn inconsistent_states_are_refused() {
        let good = live().save();
        type Mutation = Box<dyn Fn(&mut BalloonState)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("version", Box::new(|s| s.version = 99)),
            ("offered", Box::new(|s| s.device_features |= 1)),
            ("negotiated", Box::new(|s| s.driver_features |= 1)),
            ("legacy", Box::new(|s| s.driver_features &= !F_VERSION_1)),
            ("status bits", Box::new(|s| s.status |= 0x20)),
            (
                "status order",
                Box::new(|s| s.status = VIRTIO_CONFIG_S_DRIVER_OK),
            ),
            ("interrupt", Box::new(|s| s.interrupt_status = 4)),
            (
                "queue count",
                Box::new(|s| {
                    s.queues.pop();
                }),
            ),
            ("queue max", Box::new(|s| s.queues[0].max_size = 128)),
            ("queue size", Box::new(|s| s.queues[1].size = 17)),
            ("desc align", Box::new(|s| s.queues[2].desc_table += 1)),
            (
                "ring outside RAM",
                Box::new(|s| s.queues[3].used_ring = 0x20_0000),
            ),
            (
                "event idx",
                Box::new(|s| s.queues[4].event_idx_enabled = true),
            ),
            ("stats head", Box::new(|s| s.stats_head = Some(16))),
            ("cmd id", Box::new(|s| s.hint.cmd_id = 5)),
        ];
        for (what, mutate) in cases {
            let mut s = good.clone();
            mutate(&mut s);
            assert!(restore(&s).is_err(), "{what} accepted");
        }
        // Without the stats queue, no held stats buffer is possible.
        let mut s = good.clone();
        s.driver_features &= !crate::features::F_STATS_VQ;
        s.queues.truncate(4);
        s.stats_head = Some(0);
        assert!(matches!(restore(&s), Err(StateError::StatsHead(0))));
        // A destination that offers fewer features refuses.
        let less = BalloonConfig {
            page_reporting: false,
            ..BalloonConfig::default()
        };
        assert!(matches!(
            Balloon::restore(less, mem(), Arc::new(NoIrq), &good),
            Err(StateError::Features { .. })
        ));
    }
}
