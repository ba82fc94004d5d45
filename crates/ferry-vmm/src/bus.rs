//! Address-decoding buses for port I/O and MMIO exits.
//!
//! A device sees only offsets into its own window; it knows nothing of the bus or of KVM.
//! Windows may not overlap, which [`Bus::insert`] enforces.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. Reads fill `data` (whose length is the access size); writes consume it.
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes at `offset` into the device's window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` into the device's window.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner (for pause, state, API access).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors inserting a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The window overlaps one already on the bus.
    #[error("bus window {base:#x}+{len:#x} overlaps the window at {other:#x}+{other_len:#x}")]
    Overlap {
        /// New window base.
        base: u64,
        /// New window length.
        len: u64,
        /// Existing window base.
        other: u64,
        /// Existing window length.
        other_len: u64,
    },
    /// Empty window or one that wraps the address space.
    #[error("bus window {base:#x}+{len:#x} is empty or wraps the address space")]
    BadWindow {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping windows, each backed by a device.
#[derive(Clone, Default)]
pub struct Bus {
    /// Keyed by window base.
    windows: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.windows.iter().map(|(b, e)| (b, e.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadWindow { base, len })?;
        // The only candidates for overlap: the last window starting before `end`.
        if let Some((&other, e)) = self.windows.range(..end).next_back() {
            if other + e.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other,
                    other_len: e.len,
                });
            }
        }
        self.windows.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device whose window holds the whole access `[addr, addr + size)`, and the offset.
    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, e) = self.windows.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= e.len).then_some((offset, &e.device))
    }

    /// Dispatches a read; returns `false` (leaving `data` alone) if no device decodes it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns `false` if no device decodes it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a panic in another thread holding it (the device state
/// is still the best we have; the panic itself is reported where it happened).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses; reads return the offset's low byte.
    #[derive(Default)]
    struct Probe {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn decodes_offsets_within_windows() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Probe::default()));
        let b = Arc::new(Mutex::new(Probe::default()));
        bus.insert(0x1000, 0x100, a.clone()).unwrap();
        bus.insert(0x1100, 0x100, b.clone()).unwrap();
        let mut d = [0u8; 4];
        assert!(bus.read(0x1010, &mut d));
        assert_eq!(d, [0x10; 4]);
        assert!(bus.write(0x1150, &[1, 2]));
        assert_eq!(b.lock().unwrap().writes, vec![(0x50, vec![1, 2])]);
        assert!(a.lock().unwrap().writes.is_empty());
        // Unclaimed addresses and accesses straddling a window's end are not decoded.
        assert!(!bus.read(0xfff, &mut d));
        assert!(!bus.read(0x11fe, &mut d));
        assert!(!bus.write(0x1200, &[0]));
        assert!(!bus.read(u64::MAX, &mut d));
    }

    #[test]
    fn rejects_overlaps_and_bad_windows() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Probe::default())) as SharedDevice;
        bus.insert(0x1000, 0x100, dev()).unwrap();
        for (base, len) in [(0x1000, 1), (0xf80, 0x81), (0x10ff, 0x10), (0x800, 0x1000)] {
            assert!(
                matches!(bus.insert(base, len, dev()), Err(BusError::Overlap { .. })),
                "{base:#x}+{len:#x}"
            );
        }
        bus.insert(0xf00, 0x100, dev()).unwrap();
        bus.insert(0x1100, 0x100, dev()).unwrap();
        assert!(matches!(
            bus.insert(0x5000, 0, dev()),
            Err(BusError::BadWindow { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev()),
            Err(BusError::BadWindow { .. })
        ));
    }
}
