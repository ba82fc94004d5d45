//! Memory statistics from the stats queue (virtio 1.2 §5.5.6.3): an array of packed
//! 10-byte entries, le16 tag then le64 value, in any order; unknown tags are ignored.

use serde::{Deserialize, Serialize};

/// Size of one `struct virtio_balloon_stat`.
pub const STAT_ENTRY_LEN: usize = 10;
/// Most entries read from one stats buffer; the spec defines 10 tags and Linux 6.x sends at
/// most 16, so anything longer is a driver bug or an attack and the rest is ignored.
pub const STAT_ENTRIES_MAX: usize = 64;

/// The latest statistics the guest reported. Fields the guest did not supply are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BalloonStats {
    /// Memory swapped in, bytes (tag 0).
    pub swap_in: Option<u64>,
    /// Memory swapped out, bytes (tag 1).
    pub swap_out: Option<u64>,
    /// Major page faults (tag 2).
    pub major_faults: Option<u64>,
    /// Minor page faults (tag 3).
    pub minor_faults: Option<u64>,
    /// Memory not used for any purpose, bytes (tag 4).
    pub free_memory: Option<u64>,
    /// Total memory, bytes (tag 5).
    pub total_memory: Option<u64>,
    /// Estimate of memory available for new applications, bytes (tag 6).
    pub available_memory: Option<u64>,
    /// Memory reclaimable without I/O, bytes (tag 7).
    pub disk_caches: Option<u64>,
    /// Successful hugetlb page allocations (tag 8).
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb page allocations (tag 9).
    pub hugetlb_failures: Option<u64>,
    /// Entries with tags this device does not know.
    pub unknown_entries: u32,
}

impl BalloonStats {
    /// Parses a stats buffer. Trailing bytes that do not make a whole entry are ignored, as
    /// are entries past [`STAT_ENTRIES_MAX`].
    pub fn parse(buf: &[u8]) -> Self {
        let mut s = Self::default();
        for e in buf.chunks_exact(STAT_ENTRY_LEN).take(STAT_ENTRIES_MAX) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..]);
            let val = u64::from_le_bytes(v);
            let slot = match tag {
                0 => &mut s.swap_in,
                1 => &mut s.swap_out,
                2 => &mut s.major_faults,
                3 => &mut s.minor_faults,
                4 => &mut s.free_memory,
                5 => &mut s.total_memory,
                6 => &mut s.available_memory,
                7 => &mut s.disk_caches,
                8 => &mut s.hugetlb_allocations,
                9 => &mut s.hugetlb_failures,
                _ => {
                    s.unknown_entries += 1;
                    continue;
                }
            };
            *slot = Some(val);
        }
        s
    }
}

/// Encodes one stats entry (for tests and driver-side tools).
pub fn encode_stat(tag: u16, val: u64) -> [u8; STAT_ENTRY_LEN] {
    let mut e = [0u8; STAT_ENTRY_LEN];
    e[..2].copy_from_slice(&tag.to_le_bytes());
    e[2..].copy_from_slice(&val.to_le_bytes());
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_in_any_order_and_ignores_unknown_tags() {
        let mut buf = Vec::new();
        buf.extend(encode_stat(5, 4 << 30));
        buf.extend(encode_stat(77, 1));
        buf.extend(encode_stat(4, 1 << 30));
        buf.extend([1, 2, 3]); // a partial entry
        let s = BalloonStats::parse(&buf);
        assert_eq!(s.total_memory, Some(4 << 30));
        assert_eq!(s.free_memory, Some(1 << 30));
        assert_eq!(s.swap_in, None);
        assert_eq!(s.unknown_entries, 1);
    }

    #[test]
    fn long_buffers_are_capped() {
        let buf: Vec<u8> = (0..STAT_ENTRIES_MAX + 10)
            .flat_map(|_| encode_stat(99, 0))
            .collect();
        assert_eq!(
            BalloonStats::parse(&buf).unknown_entries as usize,
            STAT_ENTRIES_MAX
        );
    }
}
