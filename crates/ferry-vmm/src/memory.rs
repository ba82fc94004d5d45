//! Guest RAM: a memfd mapped through vm-memory with a per-page write bitmap, registered with
//! KVM as one memory slot per region, and the dirty log the migration engine reads.
//!
//! The memfd (rather than anonymous memory) lets ranges be discarded with
//! `fallocate(PUNCH_HOLE)` and lets a later version share RAM with another process.
//!
//! Dirty tracking ORs two sources: KVM's per-slot dirty bitmap (vCPU writes, fetched and
//! cleared with `KVM_GET_DIRTY_LOG`) and vm-memory's [`AtomicBitmap`] (writes by the VMM and
//! its devices through `Bytes`, which KVM cannot see).
//! This is one of the two modules allowed to use `unsafe` (memory slot registration).

use std::fs::File;
use std::sync::Arc;

use ferry_migration::{BitmapDirtyLog, DirtyLog, DirtyLogError, MemoryLayout, PageBitmap};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

/// Guest memory with a write bitmap, as every part of ferry sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Errors creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create the guest RAM memfd of {size} bytes: {source}")]
    Memfd {
        /// Total RAM size.
        size: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Mapping a region failed.
    #[error("cannot map guest RAM: {0}")]
    Mmap(String),
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot} ({gpa:#x}, {size:#x} bytes): {source}")]
    Slot {
        /// Slot number.
        slot: u32,
        /// Guest-physical start.
        gpa: u64,
        /// Size.
        size: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// One RAM region as registered with KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the mapping.
    pub host_addr: u64,
}

/// Guest RAM and the memfd that backs it.
#[derive(Debug, Clone)]
pub struct GuestRam {
    mem: GuestMemory,
    memfd: Arc<File>,
}

impl GuestRam {
    /// Creates RAM for `regions` (`(gpa, size)`, sorted, page aligned) on one memfd; region
    /// `i` starts at the file offset equal to the sum of the sizes before it.
    pub fn new(regions: &[(u64, u64)]) -> Result<Self, MemoryError> {
        let total: u64 = regions.iter().map(|r| r.1).sum();
        let memfd_err = |source| MemoryError::Memfd {
            size: total,
            source,
        };
        let fd = memfd_create("ferry-guest-ram", MemfdFlags::CLOEXEC)
            .map_err(|e| memfd_err(e.into()))?;
        ftruncate(&fd, total).map_err(|e| memfd_err(e.into()))?;
        let memfd = Arc::new(File::from(fd));
        let mut offset = 0u64;
        let mut mapped = Vec::with_capacity(regions.len());
        for &(gpa, size) in regions {
            let len = usize::try_from(size).map_err(|e| MemoryError::Mmap(e.to_string()))?;
            let region = MmapRegion::<AtomicBitmap>::from_file(
                FileOffset::from_arc(memfd.clone(), offset),
                len,
            )
            .map_err(|e| MemoryError::Mmap(e.to_string()))?;
            let region = GuestRegionMmap::new(region, GuestAddress(gpa))
                .ok_or_else(|| MemoryError::Mmap(format!("region at {gpa:#x} overflows")))?;
            mapped.push(region);
            offset += size;
        }
        let mem =
            GuestMemory::from_regions(mapped).map_err(|e| MemoryError::Mmap(e.to_string()))?;
        for region in mem.iter() {
            advise_huge_pages(region.as_ptr(), region.len());
        }
        if let Ok(mode) = std::fs::read_to_string(SHMEM_THP_SYSFS) {
            if !shmem_thp_usable(&mode) {
                tracing::warn!(
                    "{SHMEM_THP_SYSFS} is {:?}: guest RAM gets 4 KiB pages, which makes every \
                     first touch of guest memory slow (write `advise` there to fix)",
                    mode.trim()
                );
            }
        }
        Ok(Self { mem, memfd })
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The memfd backing all regions.
    pub fn memfd(&self) -> &Arc<File> {
        &self.memfd
    }

    /// The slots these regions occupy, numbered from 0.
    pub fn slots(&self) -> Vec<Slot> {
        self.mem
            .iter()
            .enumerate()
            .map(|(i, r)| Slot {
                slot: i as u32,
                gpa: r.start_addr().0,
                size: r.len(),
                host_addr: r.as_ptr() as u64,
            })
            .collect()
    }

    /// The engine's view of this RAM.
    pub fn layout(&self) -> MemoryLayout {
        // Regions come from `ram_regions`, which are page aligned and sorted.
        MemoryLayout::from_guest_memory(&self.mem).expect("guest RAM regions form a valid layout")
    }
}

/// Where Linux says whether shmem (and so memfd) mappings may use transparent huge pages.
const SHMEM_THP_SYSFS: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// Whether the selected mode (in brackets) lets an MADV_HUGEPAGE memfd get huge pages.
fn shmem_thp_usable(mode: &str) -> bool {
    ["[always]", "[within_size]", "[advise]", "[force]"]
        .iter()
        .any(|m| mode.contains(m))
}

/// Asks for transparent huge pages on a RAM mapping. With 4 KiB pages every first touch of
/// guest memory is a separate nested page fault, which dominates boot time under nested
/// virtualization (measured in the lab: ~29,000 faults vs ~400 with huge pages). For a memfd
/// this takes effect when `/sys/kernel/mm/transparent_hugepage/shmem_enabled` is `advise` (or
/// `within_size`/`always`); the kernel then also aligns the mapping to 2 MiB. Best effort.
fn advise_huge_pages(addr: *mut u8, len: u64) {
    // SAFETY: `addr..addr + len` is a mapping owned by a live `MmapRegion`; MADV_HUGEPAGE only
    // changes how the kernel backs it, never its contents or validity.
    let ret = unsafe { libc::madvise(addr.cast(), len as usize, libc::MADV_HUGEPAGE) };
    if ret != 0 {
        tracing::debug!(
            "MADV_HUGEPAGE on guest RAM failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Registers (or re-registers, changing flags) every slot with KVM.
pub fn register_slots(vm: &VmFd, slots: &[Slot], log_dirty: bool) -> Result<(), MemoryError> {
    for s in slots {
        let region = kvm_userspace_memory_region {
            slot: s.slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: s.gpa,
            memory_size: s.size,
            userspace_addr: s.host_addr,
        };
        // SAFETY: `userspace_addr..+memory_size` is a live mapping of a `GuestRam` region.
        // Every owner of the VM fd keeps that `GuestRam` too (`Vmm` and `IncomingVm` drop the
        // VM fd before the RAM; `KvmDirtyLog` holds both), so KVM never sees the mapping
        // unmapped while the slot exists. Slots come from distinct, non-overlapping regions.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::Slot {
            slot: s.slot,
            gpa: s.gpa,
            size: s.size,
            source,
        })?;
    }
    Ok(())
}

/// The VMM's dirty log: KVM's per-slot log (vCPU writes) OR the device write bitmap that
/// vm-memory keeps for every write through `Bytes` (device writes).
#[derive(Debug)]
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    /// Keeps the mapping KVM's slots point into alive as long as the slots exist.
    _ram: GuestRam,
    device: BitmapDirtyLog,
    slots: Vec<Slot>,
    active: bool,
}

impl KvmDirtyLog {
    /// A dirty log over `ram`'s slots in `vm`; inactive until [`DirtyLog::start`].
    pub fn new(vm: Arc<VmFd>, ram: GuestRam) -> Self {
        let slots = ram.slots();
        Self {
            vm,
            device: BitmapDirtyLog::new(ram.memory().clone()),
            _ram: ram,
            slots,
            active: false,
        }
    }

    fn backend(e: impl std::error::Error + Send + Sync + 'static) -> DirtyLogError {
        DirtyLogError::Backend(Box::new(e))
    }
}

impl DirtyLog for KvmDirtyLog {
    fn start(&mut self) -> Result<(), DirtyLogError> {
        self.device.start()?;
        register_slots(&self.vm, &self.slots, true).map_err(Self::backend)?;
        self.active = true;
        Ok(())
    }

    fn fetch_and_clear(
        &mut self,
        layout: &MemoryLayout,
        dirty: &mut PageBitmap,
    ) -> Result<(), DirtyLogError> {
        if !self.active {
            return Err(DirtyLogError::Layout(
                "dirty logging was not started".into(),
            ));
        }
        // Device writes first: a write racing with this fetch is then either in the bitmap
        // taken now or in the next fetch; KVM's log is get-and-clear atomically.
        self.device.fetch_and_clear(layout, dirty)?;
        for slot in &self.slots {
            let first = layout
                .index_of(slot.gpa)
                .ok_or_else(|| DirtyLogError::Layout(format!("slot at {:#x}", slot.gpa)))?;
            let pages = slot.size / ferry_migration::PAGE_SIZE;
            if first + pages > dirty.len() {
                return Err(DirtyLogError::Layout(format!(
                    "slot at {:#x} ends past the bitmap",
                    slot.gpa
                )));
            }
            let kvm = self
                .vm
                .get_dirty_log(slot.slot, slot.size as usize)
                .map_err(Self::backend)?;
            dirty.or_words(first, &kvm);
        }
        Ok(())
    }

    fn stop(&mut self) {
        if self.active {
            if let Err(e) = register_slots(&self.vm, &self.slots, false) {
                tracing::warn!("cannot turn dirty logging off: {e}");
            }
            self.active = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ram_is_one_memfd_with_a_write_bitmap() {
        let ram = GuestRam::new(&[(0, 1 << 20), (2 << 20, 1 << 20)]).unwrap();
        assert_eq!(ram.memfd().metadata().unwrap().len(), 2 << 20);
        let slots = ram.slots();
        assert_eq!(slots.len(), 2);
        assert_eq!(
            (slots[1].slot, slots[1].gpa, slots[1].size),
            (1, 2 << 20, 1 << 20)
        );
        ram.memory()
            .write_obj(7u32, GuestAddress((2 << 20) + 8192))
            .unwrap();
        let region = ram.memory().iter().nth(1).unwrap();
        assert!(MmapRegion::bitmap(region).is_bit_set(2));
        let layout = ram.layout();
        assert_eq!(layout.pages(), 512);
    }

    #[test]
    fn reads_the_shmem_thp_mode() {
        assert!(shmem_thp_usable(
            "always within_size [advise] never deny force\n"
        ));
        assert!(!shmem_thp_usable(
            "always within_size advise [never] deny force\n"
        ));
        assert!(!shmem_thp_usable(
            "always within_size advise never [deny] force"
        ));
    }
}
