//! The integrity data set: memory whose every page can be recomputed from its index and a
//! generation counter, so that a page lost, zeroed or left stale by a migration is detected.
//!
//! Page `p` at generation `g` holds 512 little-endian words: word 0 is `p`, word 1 is `g`, and
//! word `w >= 2` is `mix(p, g, w) | 1` (never zero, so no page of the set is all zeroes and a
//! page the VMM skipped as "zero" or "free" cannot pass by accident).

use crate::mem::{self, AllocError, PAGE_SIZE};

const WORDS_PER_PAGE: usize = PAGE_SIZE / std::mem::size_of::<u64>();

/// Word `w` of page `page` at `generation`.
fn word(page: u64, generation: u64, w: usize) -> u64 {
    match w {
        0 => page,
        1 => generation,
        _ => {
            // splitmix64 finaliser over a combination of the three inputs.
            let mut z = page
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(generation.wrapping_mul(0xd1b5_4a32_d192_ed03))
                .wrapping_add(w as u64);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) | 1
        }
    }
}

fn fill_page(page: u64, generation: u64, out: &mut [u64]) {
    for (w, slot) in out.iter_mut().enumerate() {
        *slot = word(page, generation, w);
    }
}

/// Result of checking every page.
#[derive(Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub pages: u64,
    pub mismatches: u64,
    pub first_mismatch: Option<u64>,
}

pub struct Dataset {
    words: Vec<u64>,
    generation: u64,
}

impl Dataset {
    /// Allocates and writes `mib` MiB at generation 0.
    pub fn new(mib: u64) -> Result<Self, AllocError> {
        let pages = mem::elements_in::<[u64; WORDS_PER_PAGE]>(mib)?;
        let mut words = mem::reserve::<u64>(mib)?;
        let mut page_words = [0u64; WORDS_PER_PAGE];
        for page in 0..pages as u64 {
            fill_page(page, 0, &mut page_words);
            words.extend_from_slice(&page_words);
        }
        Ok(Self {
            words,
            generation: 0,
        })
    }

    pub fn pages(&self) -> u64 {
        (self.words.len() / WORDS_PER_PAGE) as u64
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Moves to the next generation and rewrites every page.
    pub fn bump(&mut self) {
        self.generation += 1;
        for (page, words) in self.words.chunks_exact_mut(WORDS_PER_PAGE).enumerate() {
            fill_page(page as u64, self.generation, words);
        }
    }

    /// Checks every page against its expected content.
    pub fn verify(&self) -> VerifyReport {
        let mut report = VerifyReport {
            pages: self.pages(),
            mismatches: 0,
            first_mismatch: None,
        };
        for (page, words) in self.words.chunks_exact(WORDS_PER_PAGE).enumerate() {
            let page = page as u64;
            let intact = words
                .iter()
                .enumerate()
                .all(|(w, &v)| v == word(page, self.generation, w));
            if !intact {
                report.mismatches += 1;
                report.first_mismatch.get_or_insert(page);
            }
        }
        report
    }

    #[cfg(test)]
    fn page_mut(&mut self, page: usize) -> &mut [u64] {
        &mut self.words[page * WORDS_PER_PAGE..(page + 1) * WORDS_PER_PAGE]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_and_bumped_sets_verify() {
        let mut d = Dataset::new(2).unwrap();
        assert_eq!(d.pages(), 512);
        assert_eq!(d.verify().first_mismatch, None);
        d.bump();
        assert_eq!(d.generation(), 1);
        assert_eq!(
            d.verify(),
            VerifyReport {
                pages: 512,
                mismatches: 0,
                first_mismatch: None
            }
        );
    }

    #[test]
    fn no_page_is_zero_and_pages_differ() {
        let d = Dataset::new(1).unwrap();
        let pages: Vec<&[u64]> = d.words.chunks_exact(WORDS_PER_PAGE).collect();
        assert!(pages.iter().all(|p| p[2..].iter().all(|&w| w != 0)));
        assert_ne!(pages[1][2..], pages[2][2..]);
    }

    #[test]
    fn finds_zeroed_stale_and_swapped_pages() {
        let mut d = Dataset::new(1).unwrap();
        d.page_mut(7).fill(0);
        let report = d.verify();
        assert_eq!((report.mismatches, report.first_mismatch), (1, Some(7)));

        // A page left at the previous generation (a missed re-send) is caught.
        let mut d = Dataset::new(1).unwrap();
        let stale: Vec<u64> = d.page_mut(3).to_vec();
        d.bump();
        d.page_mut(3).copy_from_slice(&stale);
        // Two pages swapped (a page sent to the wrong address) are both caught.
        let p10: Vec<u64> = d.page_mut(10).to_vec();
        let p11: Vec<u64> = d.page_mut(11).to_vec();
        d.page_mut(10).copy_from_slice(&p11);
        d.page_mut(11).copy_from_slice(&p10);
        let report = d.verify();
        assert_eq!((report.mismatches, report.first_mismatch), (3, Some(3)));
    }
}
