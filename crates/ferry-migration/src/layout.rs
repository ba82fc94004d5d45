//! Guest memory layout: the regions the engine migrates and the page numbering it uses.
//!
//! The engine numbers every guest page of every region consecutively ("page index"), so
//! that one flat bitmap can describe the whole guest. [`MemoryLayout`] converts between page
//! indices and guest-physical addresses and is exchanged with the destination during the
//! handshake, which refuses a layout that differs from its own.

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// The page size the engine works in. Guest RAM regions must be aligned to it.
pub const PAGE_SIZE: u64 = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;
/// Upper bound on the number of RAM regions a layout may have (wire-format limit too).
pub const REGIONS_MAX: usize = 64;

/// Errors describing an unusable memory layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// A region is not page aligned.
    #[error("region at {gpa:#x} with size {size:#x} is not aligned to {PAGE_SIZE} bytes")]
    Misaligned {
        /// Guest-physical start.
        gpa: u64,
        /// Size in bytes.
        size: u64,
    },
    /// Regions overlap or are not sorted by address.
    #[error("region at {gpa:#x} overlaps or precedes the region before it")]
    Overlap {
        /// Guest-physical start of the offending region.
        gpa: u64,
    },
    /// Too many regions, or none.
    #[error("a layout needs between 1 and {REGIONS_MAX} regions, got {0}")]
    RegionCount(usize),
    /// A region is empty or wraps around the address space.
    #[error("region at {gpa:#x} with size {size:#x} is empty or wraps the address space")]
    BadSize {
        /// Guest-physical start.
        gpa: u64,
        /// Size in bytes.
        size: u64,
    },
}

/// One contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDesc {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A contiguous range of guest-physical memory in bytes, as hint sources report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRange {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

impl GuestRange {
    /// A range of `len` bytes starting at `gpa`.
    pub const fn new(gpa: u64, len: u64) -> Self {
        Self { gpa, len }
    }
}

/// The validated set of guest RAM regions, sorted and non-overlapping, with the first page
/// index of each region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    regions: Vec<RegionDesc>,
    /// `first_page[i]` is the page index of the first page of `regions[i]`.
    first_page: Vec<u64>,
    pages: u64,
}

impl MemoryLayout {
    /// Builds a layout from region descriptions, validating alignment and order.
    pub fn new(regions: Vec<RegionDesc>) -> Result<Self, LayoutError> {
        if regions.is_empty() || regions.len() > REGIONS_MAX {
            return Err(LayoutError::RegionCount(regions.len()));
        }
        let mut first_page = Vec::with_capacity(regions.len());
        let mut pages = 0u64;
        let mut prev_end = 0u64;
        for (i, r) in regions.iter().enumerate() {
            if r.gpa % PAGE_SIZE != 0 || r.size % PAGE_SIZE != 0 {
                return Err(LayoutError::Misaligned {
                    gpa: r.gpa,
                    size: r.size,
                });
            }
            let end =
                r.gpa
                    .checked_add(r.size)
                    .filter(|_| r.size > 0)
                    .ok_or(LayoutError::BadSize {
                        gpa: r.gpa,
                        size: r.size,
                    })?;
            if i > 0 && r.gpa < prev_end {
                return Err(LayoutError::Overlap { gpa: r.gpa });
            }
            prev_end = end;
            first_page.push(pages);
            pages += r.size >> PAGE_SHIFT;
        }
        Ok(Self {
            regions,
            first_page,
            pages,
        })
    }

    /// The layout of a vm-memory guest memory object.
    pub fn from_guest_memory<M: GuestMemoryBackend>(mem: &M) -> Result<Self, LayoutError> {
        let mut regions: Vec<RegionDesc> = mem
            .iter()
            .map(|r| RegionDesc {
                gpa: r.start_addr().0,
                size: r.len(),
            })
            .collect();
        regions.sort_by_key(|r| r.gpa);
        Self::new(regions)
    }

    /// The regions, sorted by address.
    pub fn regions(&self) -> &[RegionDesc] {
        &self.regions
    }

    /// Total number of guest pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Total guest RAM in bytes.
    pub fn bytes(&self) -> u64 {
        self.pages << PAGE_SHIFT
    }

    /// The page index of the first page of region `i`, and the region's page count.
    pub fn region_pages(&self, i: usize) -> (u64, u64) {
        (self.first_page[i], self.regions[i].size >> PAGE_SHIFT)
    }

    /// Guest-physical address of page `index`. `index` must be below [`Self::pages`].
    pub fn gpa_of(&self, index: u64) -> u64 {
        debug_assert!(index < self.pages);
        let i = self.first_page.partition_point(|&p| p <= index) - 1;
        self.regions[i].gpa + ((index - self.first_page[i]) << PAGE_SHIFT)
    }

    /// Page index of the page containing `gpa`, if `gpa` is guest RAM.
    pub fn index_of(&self, gpa: u64) -> Option<u64> {
        let i = self
            .regions
            .partition_point(|r| r.gpa <= gpa)
            .checked_sub(1)?;
        let r = &self.regions[i];
        let off = gpa - r.gpa;
        (off < r.size).then(|| self.first_page[i] + (off >> PAGE_SHIFT))
    }

    /// The page-index ranges `[start, end)` of the whole pages inside `range`, one per region
    /// it touches. Partial pages at either end are left out (a hint may only cover whole
    /// pages), and parts outside guest RAM are ignored.
    pub fn whole_pages_in(&self, range: GuestRange) -> impl Iterator<Item = (u64, u64)> + '_ {
        let start = range.gpa;
        let end = range.gpa.saturating_add(range.len);
        self.regions.iter().enumerate().filter_map(move |(i, r)| {
            let lo = start.max(r.gpa);
            let hi = end.min(r.gpa + r.size);
            if lo >= hi {
                return None;
            }
            let first = (lo - r.gpa).div_ceil(PAGE_SIZE);
            let last = (hi - r.gpa) / PAGE_SIZE;
            (first < last).then(|| (self.first_page[i] + first, self.first_page[i] + last))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> MemoryLayout {
        MemoryLayout::new(vec![
            RegionDesc {
                gpa: 0,
                size: 16 * PAGE_SIZE,
            },
            RegionDesc {
                gpa: 0x10_0000,
                size: 8 * PAGE_SIZE,
            },
        ])
        .unwrap()
    }

    #[test]
    fn index_and_gpa_round_trip() {
        let l = two_regions();
        assert_eq!(l.pages(), 24);
        for i in 0..l.pages() {
            assert_eq!(l.index_of(l.gpa_of(i)), Some(i));
        }
        assert_eq!(l.gpa_of(16), 0x10_0000);
        assert_eq!(l.index_of(16 * PAGE_SIZE), None, "hole between regions");
        assert_eq!(l.index_of(0x10_0000 + 8 * PAGE_SIZE), None, "past the end");
    }

    #[test]
    fn whole_pages_clip_partial_pages_and_holes() {
        let l = two_regions();
        let r: Vec<_> = l
            .whole_pages_in(GuestRange::new(100, 3 * PAGE_SIZE))
            .collect();
        assert_eq!(r, vec![(1, 3)], "partial first and last pages are dropped");
        let r: Vec<_> = l
            .whole_pages_in(GuestRange::new(14 * PAGE_SIZE, 0x20_0000))
            .collect();
        assert_eq!(
            r,
            vec![(14, 16), (16, 24)],
            "spans the hole, clipped to RAM"
        );
        assert_eq!(
            l.whole_pages_in(GuestRange::new(u64::MAX - 5, 100)).count(),
            0
        );
        assert_eq!(l.whole_pages_in(GuestRange::new(0, 0)).count(), 0);
    }

    #[test]
    fn rejects_bad_layouts() {
        assert_eq!(MemoryLayout::new(vec![]), Err(LayoutError::RegionCount(0)));
        assert!(matches!(
            MemoryLayout::new(vec![RegionDesc {
                gpa: 1,
                size: PAGE_SIZE
            }]),
            Err(LayoutError::Misaligned { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(vec![
                RegionDesc {
                    gpa: 0,
                    size: 2 * PAGE_SIZE
                },
                RegionDesc {
                    gpa: PAGE_SIZE,
                    size: PAGE_SIZE
                }
            ]),
            Err(LayoutError::Overlap { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(vec![RegionDesc {
                gpa: u64::MAX - 4095,
                size: 2 * PAGE_SIZE
            }]),
            Err(LayoutError::BadSize { .. })
        ));
    }
}
