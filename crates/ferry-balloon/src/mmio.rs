//! The virtio-mmio transport, version 2 register layout (virtio 1.2 §4.2.2).
//!
//! Registers below `0x100` are 32-bit and must be accessed with aligned 4-byte accesses;
//! the configuration space at `0x100` may be accessed with 1, 2 or 4 bytes. Bad accesses
//! are logged (rate-limited) and ignored; reads of them return zeros.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_bindings::virtio_mmio::*;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use crate::device::{Balloon, QUEUE_SIZE_MAX};
use crate::features::{F_PAGE_POISON, F_VERSION_1};
use crate::shared::{ConfigSpace, CONFIG_LEN};

/// `MagicValue`: "virt".
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// `Version` of the register layout (2 = modern).
pub const MMIO_VERSION: u32 = 2;
/// `VendorID` the device reports.
pub const MMIO_VENDOR_ID: u32 = 0x7972_7266; // "ferry"-ish, little-endian "fry"
/// Size of the MMIO window the VMM must map.
pub const MMIO_WINDOW_LEN: u64 = 0x1000;

/// A device behind an MMIO window. Offsets are relative to the window's base.
pub trait MmioDevice {
    /// A guest read of `data.len()` bytes at `offset`.
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn mmio_write(&mut self, offset: u64, data: &[u8]);
}

const STATUS_DRIVER_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FAILED;

/// Config-space byte ranges the driver may write: `actual` and `poison_val`.
const CONFIG_ACTUAL: std::ops::Range<usize> = 4..8;
const CONFIG_POISON: std::ops::Range<usize> = 12..16;

impl MmioDevice for Balloon {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.config_read(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            self.guest_error(offset, "register read that is not an aligned 4-byte access");
            return;
        }
        match self.read_reg(offset as u32) {
            Some(v) => data.copy_from_slice(&v.to_le_bytes()),
            None => self.guest_error(offset, "read of a write-only or unknown register"),
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.config_write(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.guest_error(offset, "register write that is not a 4-byte access");
            return;
        };
        if offset % 4 != 0 {
            self.guest_error(offset, "misaligned register write");
            return;
        }
        self.write_reg(offset as u32, u32::from_le_bytes(bytes));
    }
}

impl Balloon {
    fn guest_error(&mut self, offset: u64, what: &str) {
        if self.warn.allow() {
            tracing::warn!(
                offset = format_args!("{offset:#x}"),
                "virtio-balloon: {what}"
            );
        }
    }

    fn selected(&self) -> Option<usize> {
        let i = self.queue_sel as usize;
        (i < self.layout.len()).then_some(i)
    }

    fn read_reg(&self, offset: u32) -> Option<u32> {
        let features = self.config.device_features();
        Some(match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => VIRTIO_ID_BALLOON,
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected().map_or(0, |_| u32::from(QUEUE_SIZE_MAX)),
            VIRTIO_MMIO_QUEUE_READY => self
                .selected()
                .map_or(0, |i| u32::from(self.queues[i].ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.shared.lock().interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.shared.lock().config_generation,
            // No shared memory regions: length and base read as -1 (§4.2.2.1).
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => return None,
        })
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(v),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_reg(offset, v),
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(v),
            VIRTIO_MMIO_QUEUE_NOTIFY => match u16::try_from(v) {
                Ok(index) => self.process_queue(index),
                Err(_) => self.guest_error(u64::from(offset), "notify for a queue index > 65535"),
            },
            VIRTIO_MMIO_INTERRUPT_ACK => self.shared.lock().interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => self.write_status(v),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => self.guest_error(
                u64::from(offset),
                "write to a read-only or unknown register",
            ),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        let allowed = self.status & VIRTIO_CONFIG_S_DRIVER != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        if !allowed {
            self.guest_error(
                u64::from(VIRTIO_MMIO_DRIVER_FEATURES),
                "driver features written outside feature negotiation",
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            _ if v == 0 => {}
            _ => self.guest_error(
                u64::from(VIRTIO_MMIO_DRIVER_FEATURES),
                "driver features beyond bit 63",
            ),
        }
    }

    /// The selected queue, if the driver may configure it now.
    fn configurable_queue(&mut self, offset: u32) -> Option<usize> {
        let ok = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0;
        match self.selected() {
            Some(i) if ok && !self.queues[i].ready() => Some(i),
            _ => {
                self.guest_error(
                    u64::from(offset),
                    "queue register written for a missing, live or not yet negotiated queue",
                );
                None
            }
        }
    }

    fn write_queue_reg(&mut self, offset: u32, v: u32) {
        let Some(i) = self.configurable_queue(offset) else {
            return;
        };
        let r = &mut self.regs[i];
        let set_lo = |a: &mut u64| *a = (*a & !0xffff_ffff) | u64::from(v);
        let set_hi = |a: &mut u64| *a = (*a & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            VIRTIO_MMIO_QUEUE_NUM => r.size = u16::try_from(v).unwrap_or(0),
            VIRTIO_MMIO_QUEUE_DESC_LOW => set_lo(&mut r.desc),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => set_hi(&mut r.desc),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => set_lo(&mut r.avail),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => set_hi(&mut r.avail),
            VIRTIO_MMIO_QUEUE_USED_LOW => set_lo(&mut r.used),
            _ => set_hi(&mut r.used),
        }
    }

    fn write_queue_ready(&mut self, v: u32) {
        if v == 0 {
            if let Some(i) = self.selected() {
                self.queues[i].set_ready(false);
            }
            return;
        }
        let Some(i) = self.configurable_queue(VIRTIO_MMIO_QUEUE_READY) else {
            return;
        };
        let r = self.regs[i];
        let q = &mut self.queues[i];
        let configured = q.try_set_size(r.size).is_ok()
            && q.try_set_desc_table_address(GuestAddress(r.desc)).is_ok()
            && q.try_set_avail_ring_address(GuestAddress(r.avail)).is_ok()
            && q.try_set_used_ring_address(GuestAddress(r.used)).is_ok()
            // virtio-queue treats an avail ring at 0 as "not set up".
            && r.avail != 0;
        q.set_ready(true);
        if !configured || !q.is_valid(&self.mem) {
            q.set_ready(false);
            self.guest_error(
                u64::from(VIRTIO_MMIO_QUEUE_READY),
                "queue made ready with a bad size or rings outside guest RAM",
            );
            self.enter_needs_reset();
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut new = v & STATUS_DRIVER_BITS;
        let keep = self.status & STATUS_DRIVER_BITS;
        if new & keep != keep {
            self.guest_error(
                u64::from(VIRTIO_MMIO_STATUS),
                "driver tried to clear status bits",
            );
            return;
        }
        // §3.1.1: ACKNOWLEDGE, then DRIVER, then FEATURES_OK. A status out of that order is
        // ignored, so that the device only ever holds a status a restore accepts (a guest must
        // not be able to make its own migration fail: found by the balloon_queue fuzzer).
        let out_of_order = (new & VIRTIO_CONFIG_S_DRIVER != 0
            && new & VIRTIO_CONFIG_S_ACKNOWLEDGE == 0)
            || (new & VIRTIO_CONFIG_S_FEATURES_OK != 0 && new & VIRTIO_CONFIG_S_DRIVER == 0);
        if out_of_order {
            self.guest_error(
                u64::from(VIRTIO_MMIO_STATUS),
                "status bits set out of order (ACKNOWLEDGE, DRIVER, FEATURES_OK)",
            );
            return;
        }
        let added = new & !keep;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.config.device_features();
            let f = self.driver_features;
            if f & !offered != 0 || f & F_VERSION_1 == 0 {
                // §3.1.1: the driver re-reads status and sees FEATURES_OK unset.
                self.guest_error(
                    u64::from(VIRTIO_MMIO_STATUS),
                    "driver accepted unoffered features or not VERSION_1",
                );
                new &= !VIRTIO_CONFIG_S_FEATURES_OK;
            } else {
                self.accept_features(f);
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if new & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                self.guest_error(
                    u64::from(VIRTIO_MMIO_STATUS),
                    "DRIVER_OK before FEATURES_OK",
                );
                new &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else {
                self.shared.lock().driver_ok = true;
            }
        }
        self.status = new | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
        if new & added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.process_pending();
        }
    }

    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.shared.lock().config.to_bytes();
        match config_window(offset, data.len()) {
            Some(r) => data.copy_from_slice(&bytes[r]),
            None => self.guest_error(offset + 0x100, "config read outside the config space"),
        }
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        let Some(r) = config_window(offset, data.len()) else {
            self.guest_error(offset + 0x100, "config write outside the config space");
            return;
        };
        let within = |f: &std::ops::Range<usize>| f.start <= r.start && r.end <= f.end;
        let poison = within(&CONFIG_POISON);
        if !within(&CONFIG_ACTUAL) && !poison {
            self.guest_error(offset + 0x100, "write to a read-only config field");
            return;
        }
        if poison {
            // §5.5.6.6.1: poison_val exists with PAGE_POISON and is set before DRIVER_OK.
            let ok = self.driver_features & F_PAGE_POISON != 0
                && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
            if !ok {
                self.guest_error(
                    offset + 0x100,
                    "poison_val written without PAGE_POISON or after DRIVER_OK",
                );
                return;
            }
        }
        let mut inner = self.shared.lock();
        let mut bytes = inner.config.to_bytes();
        bytes[r].copy_from_slice(data);
        let new = ConfigSpace::from_bytes(&bytes);
        inner.config.actual = new.actual;
        inner.config.poison_val = new.poison_val;
    }
}

/// The byte range of a config access, if it is 1, 2 or 4 bytes inside the config space.
fn config_window(offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
    if !matches!(len, 1 | 2 | 4) {
        return None;
    }
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(len)?;
    (end <= CONFIG_LEN).then_some(start..end)
}
