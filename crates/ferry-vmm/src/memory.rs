//! Guest RAM: a memfd mapped through vm-memory with a per-page write bitmap, registered with
//! KVM as one memory slot per region, and the dirty log the migration engine reads.
//!
//! The memfd (rather than anonymous memory) lets ranges be discarded with
//! `fallocate(PUNCH_HOLE)` and lets a later version share RAM with another process.
//!
//! Dirty tracking ORs two sources: KVM's per-slot dirty bitmap (vCPU writes) and vm-memory's
//! [`AtomicBitmap`] (writes by the VMM and its devices through `Bytes`, which KVM cannot see).
//! Where KVM offers it, the KVM log runs in manual-protect mode with every page initially
//! dirty (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `KVM_DIRTY_LOG_INITIALLY_SET`, as the KVM
//! API documentation recommends and QEMU uses): turning logging on write-protects nothing,
//! the engine arms pages (`KVM_CLEAR_DIRTY_LOG`) right before the bulk round reads them, and
//! a guest that writes pages the engine has not reached yet — Linux clearing the free
//! blocks it hints — takes no write faults. See `ferry_migration::dirty`.
//! This is one of the two modules allowed to use `unsafe` (memory slot registration and
//! `KVM_CLEAR_DIRTY_LOG`, which kvm-ioctls does not wrap).

use std::fs::File;
use std::sync::Arc;

use ferry_migration::{
    set_bits, BitmapDirtyLog, DirtyLog, DirtyLogError, MemoryLayout, PageBitmap,
};
use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_userspace_memory_region,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

/// Guest memory with a write bitmap, as every part of ferry sees it (one definition, the
/// balloon's, so that the VMM hands the device the very type it expects).
pub use ferry_balloon::GuestMemory;

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

    /// Whether a migration destination should write received pages through the memfd
    /// ([`ferry_migration::ReceiveConfig::write_through_file`]) rather than through the
    /// mapping: yes when the host gives file writes the same page size as the mapping (4 KiB
    /// for both with shmem THP off, huge for both with `always`/`within_size`), where a write
    /// then spares a page fault per page; no with `advise`, where only the mapping (advised
    /// `MADV_HUGEPAGE`) gets huge pages, which fault in 2 MiB at a time.
    pub fn prefers_file_writes() -> bool {
        std::fs::read_to_string(SHMEM_THP_SYSFS).is_ok_and(|mode| file_writes_keep_page_size(&mode))
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

    /// Writes a CRC-32 of every 4 KiB page of RAM, in the order of the memfd (= the
    /// engine's page index), as little-endian `u32`s to `path`. Reads the memfd rather than
    /// the mapping, so that never-populated pages read as zero without being allocated. A
    /// debugging aid for lost writes (see [`debug_digest`]).
    pub fn write_digest(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::FileExt;
        let total = self.memfd.metadata()?.len();
        let mut out = std::io::BufWriter::new(File::create(path)?);
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0;
        while offset < total {
            let len = buf.len().min((total - offset) as usize);
            self.memfd.read_exact_at(&mut buf[..len], offset)?;
            for page in buf[..len].chunks(ferry_migration::PAGE_SIZE as usize) {
                out.write_all(&crc32fast::hash(page).to_le_bytes())?;
            }
            offset += len as u64;
        }
        out.flush()
    }

    /// The engine's view of this RAM.
    pub fn layout(&self) -> MemoryLayout {
        // Regions come from `ram_regions`, which are page aligned and sorted.
        MemoryLayout::from_guest_memory(&self.mem).expect("guest RAM regions form a valid layout")
    }
}

/// With `FERRY_DEBUG_RAM_DIGEST=PREFIX` in its environment, a VMM writes a digest of guest
/// RAM ([`GuestRam::write_digest`]) at every switchover: a source to `PREFIX.sent.crc` once
/// its guest is paused for good, a destination to `PREFIX.received.crc` once it has restored
/// the guest and before it runs it. The two files of one migration must be equal; a page
/// that differs is a write the migration lost (the soak compares them, docs/migration.md).
/// Costs a read of all RAM inside the downtime: for debugging only.
pub const DEBUG_DIGEST_ENV: &str = "FERRY_DEBUG_RAM_DIGEST";

/// Writes the switchover digest `PREFIX.{role}.crc` if [`DEBUG_DIGEST_ENV`] asks for it.
pub fn debug_digest(ram: &GuestRam, role: &str) {
    let Some(prefix) = std::env::var_os(DEBUG_DIGEST_ENV) else {
        return;
    };
    let mut path = prefix;
    path.push(format!(".{role}.crc"));
    let path = std::path::PathBuf::from(path);
    let started = std::time::Instant::now();
    match ram.write_digest(&path) {
        Ok(()) => tracing::info!(
            "wrote the RAM digest {} in {:?}",
            path.display(),
            started.elapsed()
        ),
        Err(e) => tracing::warn!("cannot write the RAM digest {}: {e}", path.display()),
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

/// Whether, under shmem THP `mode`, a write to the memfd gets the page size a fault through
/// an `MADV_HUGEPAGE` mapping gets (see [`GuestRam::prefers_file_writes`]).
fn file_writes_keep_page_size(mode: &str) -> bool {
    ["[never]", "[deny]", "[always]", "[within_size]", "[force]"]
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

mod ioctls {
    use kvm_bindings::{kvm_clear_dirty_log, KVMIO};
    // kvm-ioctls 0.25 has no wrapper for this one (include/uapi/linux/kvm.h: 0xc0).
    vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
}

/// One `KVM_CLEAR_DIRTY_LOG` request for a slot: bit `i` of `bits` is the slot's page
/// `first + i`; KVM looks at `num_pages` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClearRequest {
    first: u64,
    num_pages: u64,
    bits: Vec<u64>,
}

impl ClearRequest {
    /// A request for `bits` from slot page `first` (a multiple of 64) on, cut at the slot's
    /// end: KVM refuses a range past it.
    fn new(slot_pages: u64, first: u64, bits: Vec<u64>) -> Self {
        let num_pages = (bits.len() as u64 * 64).min(slot_pages.saturating_sub(first));
        Self {
            first,
            num_pages,
            bits,
        }
    }

    /// Whether KVM takes it, by the checks of Linux's `kvm_clear_dirty_log_protect`
    /// (virt/kvm/kvm.c): `first` 64-aligned and inside the slot, the range inside the slot,
    /// and `num_pages` a multiple of 64 unless the range reaches the slot's end. Also that
    /// the bitmap holds `num_pages` bits (KVM reads that many, whatever we allocated).
    fn fits(&self, slot_pages: u64) -> bool {
        self.first % 64 == 0
            && self.first < slot_pages
            && self.num_pages <= slot_pages - self.first
            && (self.num_pages % 64 == 0 || self.first + self.num_pages == slot_pages)
            && self.num_pages <= self.bits.len() as u64 * 64
    }
}

/// The part of an [`DirtyLog::arm`] of the layout's pages `first + 64k + j` (bit `j` of
/// `words[k]`, `first` a multiple of 64) that falls in a slot covering the layout's pages
/// `[slot_first, slot_first + slot_pages)`, as a slot-relative request; `None` when no set
/// bit falls in the slot. The slot need not start at a multiple of 64 pages in the layout
/// (a region of an odd size shifts the next one), so the bits are re-based, not copied.
fn arm_request(
    slot_first: u64,
    slot_pages: u64,
    first: u64,
    words: &[u64],
) -> Option<ClearRequest> {
    let end = first + words.len() as u64 * 64;
    let (lo, hi) = (first.max(slot_first), end.min(slot_first + slot_pages));
    if lo >= hi {
        return None;
    }
    // Slot-relative, 64-aligned window holding [lo, hi).
    let base = (lo - slot_first) / 64 * 64;
    let mut bits = vec![0u64; ((hi - slot_first) - base).div_ceil(64) as usize];
    let mut any = false;
    for page in set_bits(first, words).filter(|p| (lo..hi).contains(p)) {
        let r = page - slot_first - base;
        bits[(r / 64) as usize] |= 1 << (r % 64);
        any = true;
    }
    any.then(|| ClearRequest::new(slot_pages, base, bits))
}

/// What [`KvmDirtyLog`] needs of KVM's per-slot log; a model stands in for KVM in the tests.
trait SlotLog {
    /// `KVM_GET_DIRTY_LOG`: the slot's bitmap (cleared by KVM unless manual protection is on).
    fn get(&self, slot: &Slot) -> Result<Vec<u64>, DirtyLogError>;
    /// `KVM_CLEAR_DIRTY_LOG`: forget and write-protect the pages of `req`.
    fn clear(&self, slot: &Slot, req: &mut ClearRequest) -> Result<(), DirtyLogError>;
}

fn slot_pages(slot: &Slot) -> u64 {
    slot.size / ferry_migration::PAGE_SIZE
}

fn slot_first(layout: &MemoryLayout, slot: &Slot) -> Result<u64, DirtyLogError> {
    layout
        .index_of(slot.gpa)
        .ok_or_else(|| DirtyLogError::Layout(format!("slot at {:#x}", slot.gpa)))
}

/// Arms (clears, so KVM write-protects) the pages of `words` in every slot they touch.
fn arm_slots(
    kvm: &impl SlotLog,
    slots: &[Slot],
    layout: &MemoryLayout,
    first: u64,
    words: &[u64],
) -> Result<(), DirtyLogError> {
    for slot in slots {
        if let Some(mut req) =
            arm_request(slot_first(layout, slot)?, slot_pages(slot), first, words)
        {
            kvm.clear(slot, &mut req)?;
        }
    }
    Ok(())
}

/// ORs every slot's log into `dirty`; with manual protection (`lazy`), clears what it
/// reported, which KVM's get did not.
fn fetch_slots(
    kvm: &impl SlotLog,
    slots: &[Slot],
    layout: &MemoryLayout,
    lazy: bool,
    dirty: &mut PageBitmap,
) -> Result<(), DirtyLogError> {
    for slot in slots {
        let (first, pages) = (slot_first(layout, slot)?, slot_pages(slot));
        if first + pages > dirty.len() {
            return Err(DirtyLogError::Layout(format!(
                "slot at {:#x} ends past the bitmap",
                slot.gpa
            )));
        }
        let bits = kvm.get(slot)?;
        dirty.or_words(first, &bits);
        if lazy && bits.iter().any(|&w| w != 0) {
            // Manual protection: the fetch did not clear; arm what it reported. A write in
            // between is read by the round that sends the page, which comes after this clear.
            kvm.clear(slot, &mut ClearRequest::new(pages, 0, bits))?;
        }
    }
    Ok(())
}

/// KVM's log of one VM, through its ioctls.
#[derive(Debug)]
struct VmSlotLog(Arc<VmFd>);

impl SlotLog for VmSlotLog {
    fn get(&self, slot: &Slot) -> Result<Vec<u64>, DirtyLogError> {
        self.0
            .get_dirty_log(slot.slot, slot.size as usize)
            .map_err(KvmDirtyLog::backend)
    }

    fn clear(&self, slot: &Slot, req: &mut ClearRequest) -> Result<(), DirtyLogError> {
        if !req.fits(slot_pages(slot)) {
            return Err(DirtyLogError::Layout(format!(
                "clear request {req:?} does not fit slot {} ({} pages)",
                slot.slot,
                slot_pages(slot)
            )));
        }
        let arg = kvm_clear_dirty_log {
            slot: slot.slot,
            num_pages: req.num_pages as u32,
            first_page: req.first,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: req.bits.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `req.fits` checked that the bitmap holds `num_pages` bits and that the
        // range is 64-aligned and inside the slot; the bitmap outlives the call and KVM
        // only reads it.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(
                self.0.as_ref(),
                ioctls::KVM_CLEAR_DIRTY_LOG(),
                &arg,
            )
        };
        if ret < 0 {
            return Err(KvmDirtyLog::backend(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// The VMM's dirty log: KVM's per-slot log (vCPU writes) OR the device write bitmap that
/// vm-memory keeps for every write through `Bytes` (device writes).
#[derive(Debug)]
pub struct KvmDirtyLog {
    kvm: VmSlotLog,
    /// Keeps the mapping KVM's slots point into alive as long as the slots exist.
    _ram: GuestRam,
    device: BitmapDirtyLog,
    slots: Vec<Slot>,
    active: bool,
    /// Use manual protection with initially-set bits when KVM offers it.
    want_lazy: bool,
    /// Manual protection is on for this run of dirty logging.
    lazy: bool,
}

impl KvmDirtyLog {
    /// A dirty log over `ram`'s slots in `vm`; inactive until [`DirtyLog::start`]. It arms
    /// lazily where KVM supports that, unless [`KvmDirtyLog::eager`] is called.
    pub fn new(vm: Arc<VmFd>, ram: GuestRam) -> Self {
        let slots = ram.slots();
        Self {
            kvm: VmSlotLog(vm),
            device: BitmapDirtyLog::new(ram.memory().clone()),
            _ram: ram,
            slots,
            active: false,
            want_lazy: true,
            lazy: false,
        }
    }

    /// Write-protects all of guest RAM when logging starts (classic `KVM_GET_DIRTY_LOG`),
    /// even where KVM could arm lazily. Better for a guest that does not clear the pages it
    /// hints (Linux with `init_on_alloc=0`): its hints then save the pages for good, while
    /// a lazily armed log looks at hinted pages again in round 1.
    pub fn eager(mut self) -> Self {
        self.want_lazy = false;
        self
    }

    fn backend(e: impl std::error::Error + Send + Sync + 'static) -> DirtyLogError {
        DirtyLogError::Backend(Box::new(e))
    }

    /// Turns manual protection on or off (before logging is turned on for the slots: the
    /// initially-set state is taken when a slot starts logging). Returns whether it is on.
    fn set_manual_protect(&self, on: bool) -> bool {
        let vm = &self.kvm.0;
        let wanted = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
        let supported = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
        if on && (supported < 0 || supported as u32 & wanted != wanted) {
            return false;
        }
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = if on { u64::from(wanted) } else { 0 };
        match vm.enable_cap(&cap) {
            Ok(()) => on,
            Err(e) if on => {
                tracing::info!("KVM manual dirty-log protection unavailable ({e}); write-protecting all RAM at start");
                false
            }
            Err(_) => false,
        }
    }
}

impl DirtyLog for KvmDirtyLog {
    fn start(&mut self) -> Result<(), DirtyLogError> {
        self.device.start()?;
        self.lazy = self.set_manual_protect(self.want_lazy);
        register_slots(&self.kvm.0, &self.slots, true).map_err(Self::backend)?;
        self.active = true;
        tracing::debug!(lazy = self.lazy, "dirty logging on");
        Ok(())
    }

    fn arms_lazily(&self) -> bool {
        self.lazy
    }

    fn arm(
        &mut self,
        layout: &MemoryLayout,
        first: u64,
        words: &[u64],
    ) -> Result<(), DirtyLogError> {
        if !self.lazy {
            return Ok(());
        }
        arm_slots(&self.kvm, &self.slots, layout, first, words)
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
        fetch_slots(&self.kvm, &self.slots, layout, self.lazy, dirty)
    }

    fn stop(&mut self) {
        if self.active {
            if let Err(e) = register_slots(&self.kvm.0, &self.slots, false) {
                tracing::warn!("cannot turn dirty logging off: {e}");
            }
            if self.lazy {
                self.set_manual_protect(false);
                self.lazy = false;
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
    fn the_digest_has_one_crc_per_page_in_memfd_order() {
        let ram = GuestRam::new(&[(0, 2 << 20), (4 << 20, 1 << 20)]).unwrap();
        ram.memory()
            .write_slice(&[7; 4], GuestAddress(4 << 20))
            .unwrap();
        let path = std::env::temp_dir().join(format!("ferry-digest-{}", std::process::id()));
        ram.write_digest(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let crcs: Vec<u32> = bytes
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(crcs.len(), 768);
        let zero = crc32fast::hash(&[0; 4096]);
        let mut page = [0u8; 4096];
        page[..4].copy_from_slice(&[7; 4]);
        assert_eq!(
            crcs[512],
            crc32fast::hash(&page),
            "the second region follows the first"
        );
        assert!(crcs.iter().enumerate().all(|(i, &c)| i == 512 || c == zero));
    }

    #[test]
    fn an_arm_is_rebased_into_a_slot_that_starts_off_a_word() {
        // Slot = layout pages 37..137; the arm covers pages 0..128: slot pages 0..91.
        let req = arm_request(37, 100, 0, &[!0, !0]).unwrap();
        assert_eq!((req.first, req.num_pages), (0, 100));
        assert_eq!(req.bits, vec![!0, (1 << 27) - 1]);
        assert!(req.fits(100));
        // Layout page 128 = slot page 91: the window starts at slot page 64.
        let req = arm_request(37, 300, 128, &[1]).unwrap();
        assert_eq!((req.first, req.num_pages, req.bits[0]), (64, 128, 1 << 27));
        assert!(req.fits(300));
        // Nothing of the arm in the slot.
        assert_eq!(arm_request(37, 100, 192, &[!0]), None);
        assert_eq!(arm_request(37, 100, 0, &[(1 << 37) - 1]), None);
    }

    #[test]
    fn kvm_refuses_what_fits_rejects() {
        let req = |first, num_pages| ClearRequest {
            first,
            num_pages,
            bits: vec![!0; 4],
        };
        assert!(req(0, 256).fits(256));
        assert!(
            req(64, 100).fits(164),
            "a short tail reaching the slot's end"
        );
        assert!(!req(32, 64).fits(256), "unaligned first page");
        assert!(!req(0, 100).fits(256), "short range ending inside the slot");
        assert!(!req(192, 128).fits(256), "past the slot's end");
        assert!(!req(256, 64).fits(256), "starts at the slot's end");
        assert!(!req(0, 320).fits(512), "more pages than the bitmap holds");
    }

    /// KVM's per-slot log with manual protection and initially-set bits, as Linux's
    /// virt/kvm/kvm.c implements it: every page dirty when logging starts, a write sets its
    /// page's bit, GET reads without clearing, CLEAR clears (KVM also write-protects, so
    /// the next write sets the bit again). It refuses what KVM refuses.
    struct ModelKvm {
        bits: std::cell::RefCell<Vec<Vec<bool>>>,
    }

    impl ModelKvm {
        fn start(slots: &[Slot]) -> Self {
            let bits = slots.iter().map(|s| vec![true; slot_pages(s) as usize]);
            Self {
                bits: std::cell::RefCell::new(bits.collect()),
            }
        }

        fn write(&self, slot: usize, page: u64) {
            self.bits.borrow_mut()[slot][page as usize] = true;
        }
    }

    impl SlotLog for ModelKvm {
        fn get(&self, slot: &Slot) -> Result<Vec<u64>, DirtyLogError> {
            let bits = &self.bits.borrow()[slot.slot as usize];
            let mut words = vec![0u64; bits.len().div_ceil(64)];
            for (i, _) in bits.iter().enumerate().filter(|(_, &b)| b) {
                words[i / 64] |= 1 << (i % 64);
            }
            Ok(words)
        }

        fn clear(&self, slot: &Slot, req: &mut ClearRequest) -> Result<(), DirtyLogError> {
            if !req.fits(slot_pages(slot)) {
                return Err(DirtyLogError::Layout(format!("EINVAL: {req:?}")));
            }
            let bits = &mut self.bits.borrow_mut()[slot.slot as usize];
            for i in set_bits(0, &req.bits).take_while(|&i| i < req.num_pages) {
                bits[(req.first + i) as usize] = false;
            }
            Ok(())
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64),
        /// An arm of the 64-page window `.0` (modulo the windows) with bits `.1`.
        Arm(u64, Vec<u64>),
        Fetch,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => any::<u64>().prop_map(Op::Write),
            2 => (any::<u64>(), proptest::collection::vec(any::<u64>(), 1..4))
                .prop_map(|(w, bits)| Op::Arm(w, bits)),
            1 => Just(Op::Fetch),
        ]
    }

    proptest::proptest! {
        /// The slot/window math and the get-then-clear order of `KvmDirtyLog`, run against a
        /// model of KVM, report exactly what the software log `BitmapDirtyLog::lazy` reports
        /// for the same writes, arms and fetches, over regions whose sizes are not multiples
        /// of 64 pages (so slots start off a bitmap word). Arms come before the first fetch,
        /// as the engine arms only in its bulk round.
        #[test]
        fn the_kvm_log_reports_what_the_lazy_software_log_reports(
            sizes in proptest::collection::vec(1u64..200, 1..4),
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let page = ferry_migration::PAGE_SIZE;
            let mut gpa = 0;
            let regions: Vec<(u64, u64)> = sizes
                .iter()
                .map(|&pages| {
                    let r = (gpa, pages * page);
                    gpa += (pages + 16) * page; // a hole after each region
                    r
                })
                .collect();
            let ram = GuestRam::new(&regions).unwrap();
            let (layout, slots) = (ram.layout(), ram.slots());
            let total = layout.pages();
            let mut software = BitmapDirtyLog::lazy(ram.memory().clone());
            software.start().unwrap();
            let kvm = ModelKvm::start(&slots);
            let mut fetched = false;
            for op in ops {
                match op {
                    Op::Write(p) => {
                        let p = p % total;
                        let gpa = layout.gpa_of(p);
                        ram.memory().write_obj(1u8, GuestAddress(gpa)).unwrap();
                        let slot = slots.iter().find(|s| (s.gpa..s.gpa + s.size).contains(&gpa)).unwrap();
                        kvm.write(slot.slot as usize, (gpa - slot.gpa) / page);
                    }
                    Op::Arm(w, mut bits) if !fetched => {
                        let first = w % total.div_ceil(64) * 64;
                        // As `PageBitmap::words_in` gives them: no bit past the last page.
                        for (k, word) in bits.iter_mut().enumerate() {
                            let base = first + 64 * k as u64;
                            if base >= total {
                                *word = 0;
                            } else if total - base < 64 {
                                *word &= (1 << (total - base)) - 1;
                            }
                        }
                        software.arm(&layout, first, &bits).unwrap();
                        arm_slots(&kvm, &slots, &layout, first, &bits).unwrap();
                    }
                    Op::Arm(..) => {}
                    Op::Fetch => {
                        fetched = true;
                        let (mut want, mut got) = (PageBitmap::new(total), PageBitmap::new(total));
                        software.fetch_and_clear(&layout, &mut want).unwrap();
                        fetch_slots(&kvm, &slots, &layout, true, &mut got).unwrap();
                        proptest::prop_assert_eq!(got, want);
                    }
                }
            }
        }
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
        // Writes to the file: wherever they get the mapping's page size, not with `advise`
        // (huge pages only through the advised mapping).
        assert!(!file_writes_keep_page_size(
            "always within_size [advise] never deny force\n"
        ));
        for mode in ["[always]", "[within_size]", "[never]", "[deny]"] {
            assert!(file_writes_keep_page_size(mode), "{mode}");
        }
    }
}
