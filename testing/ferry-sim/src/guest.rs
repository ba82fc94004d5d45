//! The simulated guest: memfd-backed RAM, a Linux-like page allocator and self-describing
//! page contents.
//!
//! Every page the guest uses holds content derived from its page index and a generation
//! counter, with a checksum, so any copy of the memory can be checked against the guest's
//! own view. Freed pages keep their old bytes (Linux does not clear on free by default), so
//! sending them costs real bandwidth unless a hint says they are free.

use std::fs::File;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use ferry_migration::{GuestRange, MemoryLayout, PAGE_SIZE};

/// Guest memory as the engine sees it: writes mark vm-memory's dirty bitmap.
pub type SimMemory = GuestMemoryMmap<AtomicBitmap>;

/// Errors creating a simulated guest.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Creating or mapping the memfd failed.
    #[error("creating guest memory: {0}")]
    Memory(String),
}

/// Where the second RAM region starts when memory is split (above a 3-4 GiB "MMIO hole").
pub const HIGH_RAM_START: u64 = 4 << 30;

/// Allocates memfd-backed guest RAM of `bytes` bytes, split into a low and a high region
/// like a PC's. `bytes` must be a positive multiple of 2 pages.
pub fn create_memory(bytes: u64) -> Result<SimMemory, SimError> {
    if bytes == 0 || bytes % (2 * PAGE_SIZE) != 0 {
        return Err(SimError::Memory(format!(
            "{bytes} bytes is not a multiple of 8 KiB"
        )));
    }
    let half = bytes / 2;
    let regions = [(0, half), (HIGH_RAM_START, half)]
        .into_iter()
        .map(|(gpa, size)| {
            let fd = rustix::fs::memfd_create("ferry-sim-ram", rustix::fs::MemfdFlags::CLOEXEC)
                .map_err(|e| SimError::Memory(e.to_string()))?;
            let file = File::from(fd);
            file.set_len(size)
                .map_err(|e| SimError::Memory(e.to_string()))?;
            let region =
                MmapRegion::<AtomicBitmap>::from_file(FileOffset::new(file, 0), size as usize)
                    .map_err(|e| SimError::Memory(e.to_string()))?;
            GuestRegionMmap::new(region, GuestAddress(gpa))
                .ok_or_else(|| SimError::Memory("region wraps the address space".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|e| SimError::Memory(e.to_string()))
}

/// The state of one guest page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// On the allocator's free list.
    Free,
    /// Taken out of the free list by the balloon driver to hint it; not reusable until the
    /// hinting ends (unless the shrinker takes it back).
    Held,
    /// In use, holding content of the given generation.
    Used(u32),
}

/// Bytes of the self-describing header at the start of each used page.
const HEADER: usize = 16;
const MAGIC: u32 = 0x6665_7272; // "ferr"

/// The content a used page with `index` and `generation` holds: a header naming the page,
/// then a fill derived from both, so any stale or misplaced copy differs. Odd pages are
/// pseudo-random (incompressible), even ones repeat one word (compressible), as real memory
/// mixes both.
pub fn page_content(index: u64, generation: u32, out: &mut [u8]) {
    let mut x = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(generation) | 1;
    for chunk in out[HEADER..].chunks_exact_mut(8) {
        if index % 2 == 1 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    out[..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&generation.to_le_bytes());
    out[8..16].copy_from_slice(&index.to_le_bytes());
}

/// The guest: memory plus its own view of which pages are in use.
#[derive(Debug)]
pub struct Guest {
    mem: SimMemory,
    layout: MemoryLayout,
    pages: Vec<PageState>,
    /// LIFO free list, like the buddy allocator's hot end.
    free: Vec<u64>,
    rng: SmallRng,
    buf: Vec<u8>,
    /// Pages written by guest operations so far.
    pub writes: u64,
}

impl Guest {
    /// A guest over `mem` with every page free, driven by `seed`.
    pub fn new(mem: SimMemory, seed: u64) -> Self {
        let layout = MemoryLayout::from_guest_memory(&mem).expect("simulated memory is valid");
        let n = layout.pages();
        Self {
            mem,
            pages: vec![PageState::Free; n as usize],
            // Lowest pages on top: allocation starts low, like a freshly booted guest.
            free: (0..n).rev().collect(),
            layout,
            rng: SmallRng::seed_from_u64(seed),
            buf: vec![0; PAGE_SIZE as usize],
            writes: 0,
        }
    }

    /// Guest memory.
    pub fn memory(&self) -> &SimMemory {
        &self.mem
    }

    /// The memory layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The guest's view of every page.
    pub fn page_states(&self) -> &[PageState] {
        &self.pages
    }

    /// The random number generator (deterministic per seed).
    pub fn rng(&mut self) -> &mut SmallRng {
        &mut self.rng
    }

    /// Number of used pages.
    pub fn used_pages(&self) -> u64 {
        self.pages
            .iter()
            .filter(|p| matches!(p, PageState::Used(_)))
            .count() as u64
    }

    fn write_page(&mut self, index: u64, generation: u32) {
        page_content(index, generation, &mut self.buf);
        let gpa = self.layout.gpa_of(index);
        self.mem
            .write_slice(&self.buf, GuestAddress(gpa))
            .expect("page is guest RAM");
        self.pages[index as usize] = PageState::Used(generation);
        self.writes += 1;
    }

    /// Allocates a free page and fills it. `None` when memory is exhausted.
    pub fn alloc(&mut self) -> Option<u64> {
        while let Some(i) = self.free.pop() {
            // Held pages were removed from the free list logically; skip stale entries.
            if self.pages[i as usize] == PageState::Free {
                self.write_page(i, 0);
                return Some(i);
            }
        }
        None
    }

    /// Frees a used page (its bytes stay as they are).
    pub fn free(&mut self, index: u64) {
        if matches!(self.pages[index as usize], PageState::Used(_)) {
            self.pages[index as usize] = PageState::Free;
            self.free.push(index);
        }
    }

    /// Discards a free page's memory, as a balloon does with a page the guest reported free:
    /// a hole in the memfd, reading as zero from now on. Not a write, so no dirty log sees
    /// it (KVM's does not either).
    pub fn discard(&mut self, index: u64) {
        debug_assert_eq!(self.pages[index as usize], PageState::Free);
        let gpa = self.layout.gpa_of(index);
        let region = self
            .mem
            .iter()
            .find(|r| (r.start_addr().0..r.start_addr().0 + r.len()).contains(&gpa))
            .expect("page is guest RAM");
        let fo = region.file_offset().expect("simulated RAM is memfd-backed");
        let offset = fo.start() + (gpa - region.start_addr().0);
        rustix::fs::fallocate(
            fo.file(),
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            offset,
            PAGE_SIZE,
        )
        .expect("memfd supports hole punching");
    }

    /// Rewrites a used page with the next generation.
    pub fn rewrite(&mut self, index: u64) {
        if let PageState::Used(g) = self.pages[index as usize] {
            self.write_page(index, g.wrapping_add(1));
        }
    }

    /// A random used page, if any (tries a bounded number of times).
    pub fn random_used(&mut self) -> Option<u64> {
        let n = self.pages.len() as u64;
        (0..64)
            .map(|_| self.rng.random_range(0..n))
            .find(|&i| matches!(self.pages[i as usize], PageState::Used(_)))
    }

    /// Takes up to `max_pages` free pages out of the allocator, as the balloon driver does
    /// when it hints, and returns them as coalesced guest-physical ranges.
    pub fn hold_free(&mut self, max_pages: u64, zero: bool) -> Vec<GuestRange> {
        let mut ranges: Vec<GuestRange> = Vec::new();
        let mut taken = 0;
        for i in 0..self.pages.len() as u64 {
            if taken == max_pages {
                break;
            }
            if self.pages[i as usize] != PageState::Free {
                continue;
            }
            self.pages[i as usize] = PageState::Held;
            taken += 1;
            let gpa = self.layout.gpa_of(i);
            if zero {
                // Linux with init_on_alloc=1 clears the block it takes before hinting it.
                self.buf.fill(0);
                self.mem
                    .write_slice(&self.buf, GuestAddress(gpa))
                    .expect("page is guest RAM");
            }
            match ranges.last_mut() {
                Some(r) if r.gpa + r.len == gpa => r.len += PAGE_SIZE,
                _ => ranges.push(GuestRange::new(gpa, PAGE_SIZE)),
            }
        }
        ranges
    }

    /// The shrinker: takes a held page back and uses it at once (a write after the hint).
    pub fn reclaim_held(&mut self) -> Option<u64> {
        let n = self.pages.len() as u64;
        let i = (0..64)
            .map(|_| self.rng.random_range(0..n))
            .find(|&i| self.pages[i as usize] == PageState::Held)?;
        self.write_page(i, 0);
        Some(i)
    }

    /// Hinting is over (cmd_id DONE): held pages go back to the free list.
    pub fn release_held(&mut self) {
        for i in 0..self.pages.len() {
            if self.pages[i] == PageState::Held {
                self.pages[i] = PageState::Free;
                self.free.push(i as u64);
            }
        }
    }
}

/// A page that does not hold what the guest expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Page index.
    pub index: u64,
    /// The generation the guest expects.
    pub generation: u32,
}

/// Checks that every page `states` marks used holds exactly its expected content in `mem`.
pub fn verify(states: &[PageState], mem: &SimMemory, layout: &MemoryLayout) -> Vec<Mismatch> {
    let mut want = vec![0u8; PAGE_SIZE as usize];
    let mut got = vec![0u8; PAGE_SIZE as usize];
    let mut bad = Vec::new();
    for (i, s) in states.iter().enumerate() {
        if let PageState::Used(generation) = *s {
            let index = i as u64;
            page_content(index, generation, &mut want);
            let ok = mem
                .read_slice(&mut got, GuestAddress(layout.gpa_of(index)))
                .is_ok();
            if !ok || got != want {
                bad.push(Mismatch { index, generation });
            }
        }
    }
    bad
}

/// A seeded RNG for callers that need one derived from a guest seed.
pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}
