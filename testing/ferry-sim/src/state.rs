//! The simulated VM's "device state": the guest's view of its pages, carried to the
//! destination so that the destination can verify its copy on its own.

use crate::guest::PageState;

/// Encodes page states: one little-endian u32 per page, 0 for not in use, else generation + 1.
pub fn encode(states: &[PageState]) -> Vec<u8> {
    states
        .iter()
        .flat_map(|s| match s {
            PageState::Used(g) => g.wrapping_add(1).max(1).to_le_bytes(),
            PageState::Free | PageState::Held => [0; 4],
        })
        .collect()
}

/// Decodes what [`encode`] made; `None` if the length is not a whole number of pages.
pub fn decode(bytes: &[u8]) -> Option<Vec<PageState>> {
    if bytes.len() % 4 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| match u32::from_le_bytes([c[0], c[1], c[2], c[3]]) {
                0 => PageState::Free,
                g => PageState::Used(g - 1),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_used_pages() {
        let s = vec![
            PageState::Used(0),
            PageState::Free,
            PageState::Held,
            PageState::Used(7),
        ];
        let d = decode(&encode(&s)).unwrap();
        assert_eq!(
            d,
            vec![
                PageState::Used(0),
                PageState::Free,
                PageState::Free,
                PageState::Used(7)
            ]
        );
        assert!(decode(&[1, 2, 3]).is_none());
    }
}
