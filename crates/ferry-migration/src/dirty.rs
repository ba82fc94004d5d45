//! Dirty page tracking: the trait the engine consumes and a software implementation.
//!
//! A [`DirtyLog`] has fetch-and-clear semantics, like `KVM_GET_DIRTY_LOG`: each fetch reports
//! every page written since the previous fetch and forgets them. The engine is the only
//! consumer and never clears anything else: hints act on the engine's to-send bitmap, not on
//! the dirty log (see [`crate::hint`]).
//!
//! A log may also *arm lazily* (KVM's manual-protect mode with `KVM_DIRTY_LOG_INITIALLY_SET`):
//! after [`DirtyLog::start`] every page counts as written and is not tracked, so guest writes
//! cost nothing, until the engine [arms](DirtyLog::arm) it. The engine arms pages only in the
//! bulk round, right before reading them, and exactly the pages it reads (no hint is applied
//! in between). A page it skips (hinted free, known zero) stays unarmed, so the next fetch
//! reports it again — a skipped page is never lost, it is looked at again in round 1, when it
//! is cheap (a hinted page reads as zero). The fetch arms every page it reports. This is what
//! makes free page hinting cheap for a guest that zeroes pages before hinting them (Linux
//! with `init_on_alloc=1`): those writes land on unarmed pages and do not fault.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use crate::bitmap::{set_bits, PageBitmap};
use crate::layout::{MemoryLayout, PAGE_SIZE};

/// Errors from a dirty log backend.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// The backend (e.g. a KVM ioctl) failed.
    #[error("dirty log backend failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The backend's idea of guest memory does not match the migrated layout.
    #[error("dirty log does not match the memory layout: {0}")]
    Layout(String),
}

/// Source of "which pages were written since I last asked".
pub trait DirtyLog: Send {
    /// Starts tracking. Every write after this returns is reported by a later fetch.
    fn start(&mut self) -> Result<(), DirtyLogError>;
    /// ORs into `dirty` every page (by page index of `layout`) written since the previous
    /// fetch, or since [`start`](Self::start), and forgets them.
    fn fetch_and_clear(
        &mut self,
        layout: &MemoryLayout,
        dirty: &mut PageBitmap,
    ) -> Result<(), DirtyLogError>;
    /// Stops tracking; called when the migration ends, however it ends.
    fn stop(&mut self);
    /// Whether pages start unarmed (see the module docs). A log that does not arm lazily
    /// tracks every page from [`start`](Self::start) on and ignores [`arm`](Self::arm).
    fn arms_lazily(&self) -> bool {
        false
    }
    /// Starts tracking the pages set in `words` (bit `j` of word `k` = page index
    /// `first + 64k + j`; `first` is a multiple of 64) and forgets whether they were written
    /// before. The caller must read every page it arms after this returns, and must not rely
    /// on an armed page's earlier content.
    fn arm(
        &mut self,
        _layout: &MemoryLayout,
        _first: u64,
        _words: &[u64],
    ) -> Result<(), DirtyLogError> {
        Ok(())
    }
}

/// A software dirty log over vm-memory's per-region [`AtomicBitmap`], which every write
/// through vm-memory's `Bytes` interface marks. It sees device writes and the simulated
/// guest's writes; it cannot see writes by a KVM vCPU (combine it with KVM's log for that).
#[derive(Debug, Clone)]
pub struct BitmapDirtyLog {
    mem: GuestMemoryMmap<AtomicBitmap>,
    lazy: bool,
    /// Pages not armed yet (lazy mode, between start and the first fetch).
    unarmed: Option<PageBitmap>,
}

impl BitmapDirtyLog {
    /// A dirty log over `mem`'s write bitmaps that tracks every page from the start.
    pub fn new(mem: GuestMemoryMmap<AtomicBitmap>) -> Self {
        Self {
            mem,
            lazy: false,
            unarmed: None,
        }
    }

    /// The same log, arming lazily like KVM's manual-protect mode: it models
    /// `KVM_DIRTY_LOG_INITIALLY_SET`, so the simulation checks the engine's arming.
    pub fn lazy(mem: GuestMemoryMmap<AtomicBitmap>) -> Self {
        Self {
            lazy: true,
            ..Self::new(mem)
        }
    }
}

/// The write bitmap of the region holding `gpa`, and the offset of `gpa` in it.
fn region_bitmap(mem: &GuestMemoryMmap<AtomicBitmap>, gpa: u64) -> Option<(&AtomicBitmap, usize)> {
    mem.iter().find_map(|r| {
        let offset = gpa.checked_sub(r.start_addr().0)?;
        (offset < r.len()).then(|| (MmapRegion::bitmap(r), offset as usize))
    })
}

impl DirtyLog for BitmapDirtyLog {
    fn start(&mut self) -> Result<(), DirtyLogError> {
        // Writes before the start are covered by the bulk round, which sends every page.
        for region in self.mem.iter() {
            MmapRegion::bitmap(region).reset();
        }
        if self.lazy {
            let layout = MemoryLayout::from_guest_memory(&self.mem)
                .map_err(|e| DirtyLogError::Layout(e.to_string()))?;
            self.unarmed = Some(PageBitmap::full(layout.pages()));
        }
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
        let Some(unarmed) = self.unarmed.as_mut() else {
            return Ok(());
        };
        for page in set_bits(first, words) {
            unarmed.clear(page);
            // Forget earlier writes, as KVM_CLEAR_DIRTY_LOG does.
            let gpa = layout.gpa_of(page);
            let (bitmap, offset) = region_bitmap(&self.mem, gpa)
                .ok_or_else(|| DirtyLogError::Layout(format!("page {page} at {gpa:#x}")))?;
            bitmap.reset_addr_range(offset, PAGE_SIZE as usize);
        }
        Ok(())
    }

    fn fetch_and_clear(
        &mut self,
        layout: &MemoryLayout,
        dirty: &mut PageBitmap,
    ) -> Result<(), DirtyLogError> {
        for region in self.mem.iter() {
            let bitmap: &AtomicBitmap = MmapRegion::bitmap(region);
            let first = layout
                .index_of(region.start_addr().0)
                .ok_or_else(|| DirtyLogError::Layout(format!("{:#x}", region.start_addr().0)))?;
            if bitmap.len() as u64 * PAGE_SIZE < region.len() {
                return Err(DirtyLogError::Layout(
                    "bitmap shorter than its region".into(),
                ));
            }
            dirty.or_words(first, &bitmap.get_and_reset());
        }
        // The fetch arms every page it reports, unarmed ones included.
        if let Some(unarmed) = self.unarmed.take() {
            dirty.or_with(&unarmed);
        }
        Ok(())
    }

    fn stop(&mut self) {
        self.unarmed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// Two regions of `pages` pages, at 0 and at 1 MiB, and their layout.
    fn two_regions(pages: usize) -> (GuestMemoryMmap<AtomicBitmap>, MemoryLayout) {
        let len = pages * PAGE_SIZE as usize;
        let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0), len),
            (GuestAddress(0x100000), len),
        ])
        .unwrap();
        let layout = MemoryLayout::from_guest_memory(&mem).unwrap();
        (mem, layout)
    }

    #[test]
    fn reports_writes_once_and_across_regions() {
        let (mem, layout) = two_regions(16);
        let mut log = BitmapDirtyLog::new(mem.clone());
        mem.write_obj(1u8, GuestAddress(0)).unwrap();
        log.start().unwrap();
        mem.write_obj(1u64, GuestAddress(3 * PAGE_SIZE + 4092))
            .unwrap();
        mem.write_obj(1u8, GuestAddress(0x100000 + PAGE_SIZE))
            .unwrap();
        let mut d = PageBitmap::new(layout.pages());
        log.fetch_and_clear(&layout, &mut d).unwrap();
        let set: Vec<u64> = (0..layout.pages()).filter(|&i| d.get(i)).collect();
        assert_eq!(set, vec![3, 4, 17], "write before start is not reported");
        let mut again = PageBitmap::new(layout.pages());
        log.fetch_and_clear(&layout, &mut again).unwrap();
        assert_eq!(again.count(), 0, "fetch clears");
    }

    #[test]
    fn a_lazy_log_reports_unarmed_pages_and_forgets_writes_before_arming() {
        let (mem, layout) = two_regions(64);
        let mut log = BitmapDirtyLog::lazy(mem.clone());
        assert!(log.arms_lazily());
        log.start().unwrap();
        // Page 1 is written before it is armed: arming forgets that.
        mem.write_obj(1u8, GuestAddress(PAGE_SIZE)).unwrap();
        // Arm pages 0-2 of region 0 and page 64 (first of region 1).
        log.arm(&layout, 0, &[0b111]).unwrap();
        log.arm(&layout, 64, &[0b1]).unwrap();
        mem.write_obj(1u8, GuestAddress(2 * PAGE_SIZE)).unwrap();
        let mut d = PageBitmap::new(layout.pages());
        log.fetch_and_clear(&layout, &mut d).unwrap();
        let armed = [0u64, 1, 64];
        for i in 0..layout.pages() {
            assert_eq!(d.get(i), !armed.contains(&i), "page {i}");
        }
        // The fetch armed everything it reported: only new writes from now on.
        mem.write_obj(1u8, GuestAddress(0x100000 + 5 * PAGE_SIZE))
            .unwrap();
        let mut again = PageBitmap::new(layout.pages());
        log.fetch_and_clear(&layout, &mut again).unwrap();
        assert_eq!(again.count(), 1);
        assert!(again.get(69));
        // A non-lazy log ignores arming.
        let mut eager = BitmapDirtyLog::new(mem.clone());
        eager.start().unwrap();
        mem.write_obj(1u8, GuestAddress(0)).unwrap();
        eager.arm(&layout, 0, &[1]).unwrap();
        let mut e = PageBitmap::new(layout.pages());
        eager.fetch_and_clear(&layout, &mut e).unwrap();
        assert_eq!(e.count(), 1);
    }
}
