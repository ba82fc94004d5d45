//! State shared between the device (vCPU or device thread) and the hint sources (migration
//! thread): the config space, the interrupt status and the hinting round. One mutex, held only
//! for short, non-blocking sections; the interrupt is triggered after it is released.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ferry_migration::{Epoch, HintSink};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

use crate::round::HintRound;

/// How the device interrupts the guest. The VMM implements it, typically with an irqfd
/// `EventFd` registered for the device's GSI. Must not block.
pub trait IrqTrigger: Send + Sync {
    /// Raises the device's interrupt line (edge).
    fn trigger(&self) -> io::Result<()>;
}

/// Interrupt status bit: a queue has used buffers.
pub(crate) const INT_VRING: u32 = VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration changed.
pub(crate) const INT_CONFIG: u32 = VIRTIO_MMIO_INT_CONFIG;

/// The balloon's device-specific configuration space (virtio 1.2 §5.5.4), host-endian here;
/// it is little-endian on the bus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ConfigSpace {
    /// Pages the device wants in the balloon (device-written).
    pub num_pages: u32,
    /// Pages in the balloon (driver-written).
    pub actual: u32,
    /// Free page hinting command (device-written).
    pub cmd_id: u32,
    /// The value the guest fills free pages with (driver-written).
    pub poison_val: u32,
}

/// Size of the configuration space in bytes.
pub(crate) const CONFIG_LEN: usize = 16;

impl ConfigSpace {
    pub fn to_bytes(self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        for (i, v) in [self.num_pages, self.actual, self.cmd_id, self.poison_val]
            .into_iter()
            .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    pub fn from_bytes(b: &[u8; CONFIG_LEN]) -> Self {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Self {
            num_pages: word(0),
            actual: word(4),
            cmd_id: word(8),
            poison_val: word(12),
        }
    }
}

/// Where discarded ranges are reported to the engine.
#[derive(Debug, Default)]
pub(crate) struct ReportChannel {
    pub sink: Option<HintSink>,
    /// The epoch currently open for the reporting source.
    pub open: Option<Epoch>,
}

/// Everything behind the shared mutex.
#[derive(Debug)]
pub(crate) struct Inner {
    pub config: ConfigSpace,
    pub config_generation: u32,
    pub interrupt_status: u32,
    /// The driver set DRIVER_OK (and the device does not need a reset).
    pub driver_ok: bool,
    /// Negotiated feature bits (valid once FEATURES_OK is set).
    pub acked_features: u64,
    pub hint: HintRound,
    pub hint_sink: Option<HintSink>,
    pub report: ReportChannel,
}

/// The shared state and the interrupt line.
#[derive(Clone)]
pub(crate) struct Shared {
    inner: Arc<Mutex<Inner>>,
    irq: Arc<dyn IrqTrigger>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("inner", &self.inner)
            .finish()
    }
}

impl Shared {
    pub fn new(inner: Inner, irq: Arc<dyn IrqTrigger>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(inner)),
            irq,
        }
    }

    /// Locks the shared state. A panic elsewhere while holding the lock cannot leave it
    /// inconsistent in a way that matters more than losing the device, so poison is ignored.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Triggers the interrupt line, logging failures (the guest will poll or time out).
    pub fn trigger(&self) {
        if let Err(e) = self.irq.trigger() {
            tracing::warn!(error = %e, "virtio-balloon: failed to trigger the interrupt");
        }
    }

    /// Sets `bits` in the interrupt status and triggers the line, if the driver is running.
    pub fn interrupt(&self, bits: u32) {
        let fire = {
            let mut inner = self.lock();
            inner.raise(bits)
        };
        if fire {
            self.trigger();
        }
    }
}

impl Inner {
    /// Sets `bits` in the interrupt status; returns whether the line must be triggered
    /// (only once the driver is running, virtio 1.2 §2.1.2 / §4.2.2).
    pub fn raise(&mut self, bits: u32) -> bool {
        if !self.driver_ok {
            return false;
        }
        self.interrupt_status |= bits;
        true
    }

    /// Records a device-side config change: bumps the generation and requests a
    /// config-change interrupt. Returns whether the line must be triggered.
    pub fn config_changed(&mut self) -> bool {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise(INT_CONFIG)
    }

    /// Whether free page hinting was negotiated and the driver is running.
    pub fn hinting_live(&self) -> bool {
        self.driver_ok && self.acked_features & crate::features::F_FREE_PAGE_HINT != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_is_little_endian() {
        let c = ConfigSpace {
            num_pages: 0x0102_0304,
            actual: 5,
            cmd_id: 0x8000_0000,
            poison_val: 0xaaaa_aaaa,
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..4], &[4, 3, 2, 1]);
        assert_eq!(&b[8..12], &[0, 0, 0, 0x80]);
        assert_eq!(ConfigSpace::from_bytes(&b), c);
    }
}
