//! Guest memory helpers: range checks and host-side discard (punching holes in the file that
//! backs guest RAM, so the host frees the memory and the guest reads zeros afterwards).

use std::io;

use rustix::fs::{fallocate, FallocateFlags};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The guest memory type the device works with: mmap-backed regions whose `AtomicBitmap`
/// records every write the device makes (used rings), so migration re-sends those pages.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// The page size of balloon pfns and of the alignment required of hinted ranges.
pub const BALLOON_PAGE_SIZE: u64 = 4096;

/// Why a range could not be discarded.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// Part of the range is not guest RAM (callers validate first; defensive).
    #[error("range {gpa:#x}+{len:#x} is not guest RAM")]
    NotRam {
        /// Guest-physical start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The region holding the range is not backed by a file (anonymous memory cannot be
    /// discarded without unsafe code here).
    #[error("region at {0:#x} has no backing file to punch holes in")]
    NoBackingFile(u64),
    /// `fallocate(PUNCH_HOLE)` failed.
    #[error("punching a hole at file offset {offset:#x} (len {len:#x}) failed: {source}")]
    Punch {
        /// File offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The OS error.
        source: io::Error,
    },
}

/// Whether `[gpa, gpa + len)` is non-empty and lies wholly in guest RAM (possibly across
/// adjacent regions).
pub fn ram_contains(mem: &GuestMemory, gpa: u64, len: u64) -> bool {
    let Some(end) = gpa.checked_add(len) else {
        return false;
    };
    if len == 0 {
        return false;
    }
    let mut cur = gpa;
    while cur < end {
        let Some(region) = mem.find_region(GuestAddress(cur)) else {
            return false;
        };
        match region.start_addr().raw_value().checked_add(region.len()) {
            Some(region_end) => cur = region_end,
            None => return true,
        }
    }
    true
}

/// Whether `[gpa, gpa + len)` is whole, aligned balloon pages in guest RAM.
pub fn valid_page_range(mem: &GuestMemory, gpa: u64, len: u64) -> bool {
    gpa % BALLOON_PAGE_SIZE == 0 && len % BALLOON_PAGE_SIZE == 0 && ram_contains(mem, gpa, len)
}

/// Discards `[gpa, gpa + len)`: punches a hole in the backing file of every region it
/// touches. The guest reads zeros there afterwards; the host frees the memory.
pub fn discard(mem: &GuestMemory, gpa: u64, len: u64) -> Result<(), DiscardError> {
    if !ram_contains(mem, gpa, len) {
        return Err(DiscardError::NotRam { gpa, len });
    }
    let end = gpa + len; // cannot overflow: checked by ram_contains
    let mut cur = gpa;
    while cur < end {
        let region = mem
            .find_region(GuestAddress(cur))
            .ok_or(DiscardError::NotRam { gpa, len })?;
        let start = region.start_addr().raw_value();
        let in_region = cur - start;
        let chunk = (end - cur).min(region.len() - in_region);
        let fo = region
            .file_offset()
            .ok_or(DiscardError::NoBackingFile(start))?;
        let offset = fo.start() + in_region;
        fallocate(
            fo.file(),
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            chunk,
        )
        .map_err(|e| DiscardError::Punch {
            offset,
            len: chunk,
            source: e.into(),
        })?;
        cur += chunk;
    }
    Ok(())
}

/// Guest RAM of `regions` (`(gpa, len)`, in order) backed by one new memfd, as a VMM that
/// lets the balloon discard memory sets it up: region `i` starts in the file where region
/// `i - 1` ends. Returns the memory and the file.
pub fn memfd_guest_memory(
    name: &str,
    regions: &[(u64, u64)],
) -> Result<(GuestMemory, std::fs::File), io::Error> {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
    let file = std::fs::File::from(fd);
    file.set_len(regions.iter().map(|r| r.1).sum())?;
    let mut off = 0;
    let mut ranges = Vec::with_capacity(regions.len());
    for &(gpa, len) in regions {
        let fo = vm_memory::FileOffset::new(file.try_clone()?, off);
        off += len;
        ranges.push((GuestAddress(gpa), len as usize, Some(fo)));
    }
    let mem = GuestMemory::from_ranges_with_files(&ranges)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    Ok((mem, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn memfd_memory(regions: &[(u64, u64)]) -> GuestMemory {
        memfd_guest_memory("balloon-test", regions).unwrap().0
    }

    #[test]
    fn ranges_must_be_ram_and_aligned() {
        let mem = memfd_memory(&[(0, 0x4000), (0x4000, 0x2000), (0x10000, 0x1000)]);
        assert!(ram_contains(&mem, 0x3000, 0x2000), "spans adjacent regions");
        assert!(!ram_contains(&mem, 0x5000, 0x2000), "runs into the hole");
        assert!(!ram_contains(&mem, 0, 0));
        assert!(!ram_contains(&mem, u64::MAX - 1, 4));
        assert!(valid_page_range(&mem, 0x10000, 0x1000));
        assert!(!valid_page_range(&mem, 0x10000, 0x800));
        assert!(!valid_page_range(&mem, 0x10800, 0x800));
    }

    #[test]
    fn discard_punches_holes_across_regions() {
        let mem = memfd_memory(&[(0, 0x4000), (0x4000, 0x4000)]);
        mem.write_slice(&[0xab; 0x8000], GuestAddress(0)).unwrap();
        discard(&mem, 0x2000, 0x4000).unwrap();
        let mut buf = [0u8; 0x8000];
        mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert!(buf[..0x2000].iter().all(|&b| b == 0xab));
        assert!(buf[0x2000..0x6000].iter().all(|&b| b == 0));
        assert!(buf[0x6000..].iter().all(|&b| b == 0xab));
        assert!(matches!(
            discard(&mem, 0x7000, 0x2000),
            Err(DiscardError::NotRam { .. })
        ));
    }

    #[test]
    fn anonymous_memory_cannot_be_discarded() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        assert!(matches!(
            discard(&mem, 0, 0x1000),
            Err(DiscardError::NoBackingFile(0))
        ));
    }
}
