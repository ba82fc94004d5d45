//! The dirty-log audit: a check, at the switchover, that the dirty log missed no write.
//!
//! The engine trusts the [`DirtyLog`](crate::DirtyLog) to report every page written after it
//! was sent. A log that drops a write (a hypervisor bug; the lab's emulated nested paging
//! does, see docs/lab.md) leaves an old copy of the page at the destination, and nothing in
//! precopy would ever notice. With [`MigrationConfig::audit_dirty_log`] on, the engine keeps a
//! 64-bit hash of every page as it sent it (a zero page as zero), and once the guest is paused for
//! good and the final round is sent, it reads every such page again: a page whose hash changed
//! was written without the log reporting it. It is sent now, before the device state, and
//! counted in [`MigrationStats::pages_missed_by_dirty_log`]; the destination ends up with
//! the source's RAM either way.
//!
//! What the audit does not cover: pages a free-page hint removed from the migration (their
//! content does not matter to the guest, by the hinting protocol) and pages never read (the
//! never-populated ones the engine skipped without sending). Its price is one hash per page
//! sent and one read of every sent page while the guest is paused, which adds to the
//! downtime (the statistics report it as `audit_ms`): a check for test runs and for hosts
//! whose dirty log is in doubt, off by default.
//!
//! [`MigrationConfig::audit_dirty_log`]: crate::MigrationConfig::audit_dirty_log
//! [`MigrationStats::pages_missed_by_dirty_log`]: crate::MigrationStats::pages_missed_by_dirty_log

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{MemoryLayout, PAGE_SIZE};
use crate::PageBitmap;

/// A 64-bit hash of a page: four independent multiply-xor lanes over its 64-bit words, plain
/// integer arithmetic that is fast on any x86 CPU and under emulation alike (the audit reads
/// every sent page while the guest is paused).
/// Not cryptographic: it detects changes, it does not resist a guest that tries to collide.
pub fn page_hash(page: &[u8]) -> u64 {
    const K: [u64; 4] = [
        0x9e37_79b9_7f4a_7c15,
        0xc2b2_ae3d_27d4_eb4f,
        0x1656_67b1_9e37_79f9,
        0x85eb_ca77_c2b2_ae63,
    ];
    let mut lanes = K;
    let mut blocks = page.chunks_exact(32);
    for b in blocks.by_ref() {
        for (j, lane) in lanes.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[j * 8..j * 8 + 8]);
            *lane = (*lane ^ u64::from_le_bytes(w))
                .wrapping_mul(K[j])
                .rotate_left(29);
        }
    }
    let tail = blocks
        .remainder()
        .iter()
        .fold(0u64, |h, &x| (h ^ u64::from(x)).wrapping_mul(K[0]));
    let mut h = (page.len() as u64).wrapping_mul(K[3]) ^ tail;
    for lane in lanes {
        h = (h ^ lane).wrapping_mul(K[1]).rotate_left(31);
    }
    h ^ (h >> 29)
}

/// What the destination holds of every audited page, as a [`page_hash`].
#[derive(Debug, Clone)]
pub struct Audit {
    hashes: Vec<u64>,
    /// Pages with a hash in `hashes` (sent, or sent as zero).
    known: PageBitmap,
    zero_hash: u64,
}

impl Audit {
    /// An audit of `pages` pages, none known yet.
    pub fn new(pages: u64) -> Self {
        Self {
            hashes: vec![0; pages as usize],
            known: PageBitmap::new(pages),
            zero_hash: page_hash(&[0u8; PAGE_SIZE as usize]),
        }
    }

    /// The destination now holds `page` as page `index`.
    pub fn sent(&mut self, index: u64, page: &[u8]) {
        self.hashes[index as usize] = page_hash(page);
        self.known.set(index);
    }

    /// The destination now holds zeros as page `index`.
    pub fn sent_zero(&mut self, index: u64) {
        self.hashes[index as usize] = self.zero_hash;
        self.known.set(index);
    }

    /// Pages `[start, end)` no longer matter (a free-page hint covered them).
    pub fn forget(&mut self, start: u64, end: u64) {
        self.known.clear_range(start, end);
    }

    /// Number of pages the audit will check.
    pub fn known(&self) -> u64 {
        self.known.count()
    }

    /// Reads every known page of `mem` again and returns those whose content is not what
    /// was sent. The guest must be paused.
    pub fn stale<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        layout: &MemoryLayout,
    ) -> Result<PageBitmap, (u64, vm_memory::GuestMemoryError)> {
        let mut stale = PageBitmap::new(self.known.len());
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut cursor = 0;
        while let Some(i) = self.known.next_set(cursor) {
            cursor = i + 1;
            let gpa = layout.gpa_of(i);
            mem.read_slice(&mut page, GuestAddress(gpa))
                .map_err(|e| (gpa, e))?;
            if page_hash(&page) != self.hashes[i as usize] {
                stale.set(i);
            }
        }
        Ok(stale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    type Mem = GuestMemoryMmap<()>;

    fn memory(pages: u64) -> (Mem, MemoryLayout) {
        let mem = Mem::from_ranges(&[(GuestAddress(0), (pages * PAGE_SIZE) as usize)]).unwrap();
        let layout = MemoryLayout::from_guest_memory(&mem).unwrap();
        (mem, layout)
    }

    fn page_of(mem: &Mem, i: u64) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE as usize];
        mem.read_slice(&mut p, GuestAddress(i * PAGE_SIZE)).unwrap();
        p
    }

    #[test]
    fn the_hash_sees_any_one_byte_or_bit_change() {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let zero = page_hash(&page);
        for at in [0, 7, 8, 31, 32, 2048, 4095] {
            for bit in [0, 7] {
                page[at] ^= 1 << bit;
                assert_ne!(page_hash(&page), zero, "byte {at} bit {bit}");
                page[at] ^= 1 << bit;
            }
        }
        // Swapping two words is a change too (the lanes are position-sensitive).
        page[..8].copy_from_slice(&1u64.to_le_bytes());
        let a = page_hash(&page);
        page[..8].fill(0);
        page[8..16].copy_from_slice(&1u64.to_le_bytes());
        assert_ne!(page_hash(&page), a);
    }

    #[test]
    fn a_write_after_the_send_makes_the_page_stale() {
        let (mem, layout) = memory(8);
        let mut audit = Audit::new(8);
        mem.write_slice(&[7u8; 16], GuestAddress(PAGE_SIZE))
            .unwrap();
        audit.sent(1, &page_of(&mem, 1));
        audit.sent_zero(2);
        audit.sent_zero(3);
        assert_eq!(audit.stale(&mem, &layout).unwrap().count(), 0);
        // Written after it was sent: page 1 changes, page 2 (sent as zero) gets data.
        mem.write_slice(&[8u8], GuestAddress(PAGE_SIZE + 5))
            .unwrap();
        mem.write_slice(&[1u8], GuestAddress(2 * PAGE_SIZE + 4095))
            .unwrap();
        // Never sent: not audited, whatever it holds.
        mem.write_slice(&[9u8], GuestAddress(6 * PAGE_SIZE))
            .unwrap();
        let stale = audit.stale(&mem, &layout).unwrap();
        assert_eq!(
            (0..8).filter(|&i| stale.get(i)).collect::<Vec<_>>(),
            vec![1, 2]
        );
        // Sent again with its new content: no longer stale.
        audit.sent(1, &page_of(&mem, 1));
        audit.forget(2, 3);
        assert_eq!(audit.stale(&mem, &layout).unwrap().count(), 0);
        assert_eq!(audit.known(), 2);
    }
}
