//! Dirty page tracking: the trait the engine consumes and a software implementation.
//!
//! A [`DirtyLog`] has fetch-and-clear semantics, like `KVM_GET_DIRTY_LOG`: each fetch reports
//! every page written since the previous fetch and forgets them. The engine is the only
//! consumer and never clears anything else: hints act on the engine's to-send bitmap, not on
//! the dirty log (see [`crate::hint`]).

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use crate::bitmap::PageBitmap;
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
}

/// A software dirty log over vm-memory's per-region [`AtomicBitmap`], which every write
/// through vm-memory's `Bytes` interface marks. It sees device writes and the simulated
/// guest's writes; it cannot see writes by a KVM vCPU (combine it with KVM's log for that).
#[derive(Debug, Clone)]
pub struct BitmapDirtyLog {
    mem: GuestMemoryMmap<AtomicBitmap>,
}

impl BitmapDirtyLog {
    /// A dirty log over `mem`'s write bitmaps.
    pub fn new(mem: GuestMemoryMmap<AtomicBitmap>) -> Self {
        Self { mem }
    }
}

impl DirtyLog for BitmapDirtyLog {
    fn start(&mut self) -> Result<(), DirtyLogError> {
        // Writes before the start are covered by the bulk round, which sends every page.
        for region in self.mem.iter() {
            MmapRegion::bitmap(region).reset();
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
        Ok(())
    }

    fn stop(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn reports_writes_once_and_across_regions() {
        let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0), 16 * PAGE_SIZE as usize),
            (GuestAddress(0x100000), 16 * PAGE_SIZE as usize),
        ])
        .unwrap();
        let layout = MemoryLayout::from_guest_memory(&mem).unwrap();
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
}
