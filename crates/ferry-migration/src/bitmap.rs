//! A plain page bitmap with word-at-a-time range operations.
//!
//! The engine keeps its to-send set and its "destination may hold non-zero data" set in
//! [`PageBitmap`]s indexed by page index (see [`crate::layout`]). Hints are applied as range
//! clears, which cost O(words) rather than O(pages), and the sender finds the next page to
//! send by skipping whole zero words.

/// The pages set in `words` (bit `j` of word `k` = page `offset + 64k + j`), in order: the
/// bitmap format of `KVM_GET_DIRTY_LOG`, vm-memory's `AtomicBitmap` and [`crate::DirtyLog::arm`].
pub fn set_bits(offset: u64, words: &[u64]) -> impl Iterator<Item = u64> + '_ {
    words.iter().enumerate().flat_map(move |(k, &word)| {
        let base = offset + k as u64 * 64;
        std::iter::successors((word != 0).then_some(word), |w| {
            let rest = w & (w - 1);
            (rest != 0).then_some(rest)
        })
        .map(move |w| base + u64::from(w.trailing_zeros()))
    })
}

/// A fixed-size bitmap of pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    bits: u64,
}

/// The mask of bits `[lo, hi)` inside one 64-bit word (`hi` up to 64).
fn word_mask(lo: u32, hi: u32) -> u64 {
    debug_assert!(lo < hi && hi <= 64);
    let upper = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl PageBitmap {
    /// An all-clear bitmap of `bits` pages.
    pub fn new(bits: u64) -> Self {
        Self {
            words: vec![0; bits.div_ceil(64) as usize],
            bits,
        }
    }

    /// An all-set bitmap of `bits` pages.
    pub fn full(bits: u64) -> Self {
        let mut b = Self::new(bits);
        b.set_range(0, bits);
        b
    }

    /// Number of pages the bitmap describes.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// Whether the bitmap describes no pages at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Whether page `i` is set. Out-of-range pages read as clear.
    pub fn get(&self, i: u64) -> bool {
        i < self.bits && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets page `i`. Out-of-range pages are ignored.
    pub fn set(&mut self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Clears page `i`. Out-of-range pages are ignored.
    pub fn clear(&mut self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    /// Applies `f(word, mask)` to each word overlapping `[start, end)` (clipped to the bitmap)
    /// and returns the sum of what `f` returns.
    fn for_range(&mut self, start: u64, end: u64, mut f: impl FnMut(&mut u64, u64) -> u64) -> u64 {
        let end = end.min(self.bits);
        if start >= end {
            return 0;
        }
        let (first, last) = (start / 64, (end - 1) / 64);
        let mut total = 0;
        for w in first..=last {
            let lo = if w == first { (start % 64) as u32 } else { 0 };
            let hi = if w == last {
                ((end - 1) % 64) as u32 + 1
            } else {
                64
            };
            total += f(&mut self.words[w as usize], word_mask(lo, hi));
        }
        total
    }

    /// Sets pages `[start, end)`; returns how many were clear before.
    pub fn set_range(&mut self, start: u64, end: u64) -> u64 {
        self.for_range(start, end, |w, m| {
            let newly = u64::from((!*w & m).count_ones());
            *w |= m;
            newly
        })
    }

    /// Clears pages `[start, end)`; returns how many were set before.
    pub fn clear_range(&mut self, start: u64, end: u64) -> u64 {
        self.for_range(start, end, |w, m| {
            let was = u64::from((*w & m).count_ones());
            *w &= !m;
            was
        })
    }

    /// A known-zero hint over `[start, end)`, a word at a time: clears the pages `nonzero`
    /// lacks (the peer already holds them as zero) and marks in `known` those it keeps (they
    /// must still become zero there). Returns how many were cleared.
    pub fn clear_zero_range(
        &mut self,
        start: u64,
        end: u64,
        nonzero: &PageBitmap,
        known: &mut PageBitmap,
    ) -> u64 {
        debug_assert!(self.bits == nonzero.bits && self.bits == known.bits);
        let mut w = (start / 64) as usize;
        self.for_range(start, end, |word, m| {
            let queued = *word & m;
            let keep = queued & nonzero.words[w];
            known.words[w] |= keep;
            *word &= !(queued & !keep);
            w += 1;
            u64::from((queued & !keep).count_ones())
        })
    }

    /// Number of set pages in `[start, end)`.
    pub fn count_range(&mut self, start: u64, end: u64) -> u64 {
        self.for_range(start, end, |w, m| u64::from((*w & m).count_ones()))
    }

    /// Number of set pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The first set page at or after `from`, if any.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut word = self.words[w] & !((1u64 << (from % 64)) - 1);
        loop {
            if word != 0 {
                let i = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (i < self.bits).then_some(i);
            }
            w += 1;
            word = *self.words.get(w)?;
        }
    }

    /// ORs `words` (bit `j` of word `k` = page `offset + 64k + j`) into the bitmap. Bits
    /// past the end of the bitmap are ignored. `offset` need not be word aligned.
    pub fn or_words(&mut self, offset: u64, words: &[u64]) {
        for page in set_bits(offset, words) {
            self.set(page);
        }
    }

    /// The words covering pages `[start, end)` (`start` a multiple of 64), with the bits of
    /// `minus` cleared and the bits at or past `end` zero: the input of [`crate::DirtyLog::arm`].
    pub fn words_in(&self, start: u64, end: u64, minus: &PageBitmap) -> Vec<u64> {
        debug_assert!(start % 64 == 0);
        let end = end.min(self.bits);
        if start >= end {
            return Vec::new();
        }
        let (first, last) = ((start / 64) as usize, ((end - 1) / 64) as usize);
        let mut out: Vec<u64> = (first..=last)
            .map(|w| self.words[w] & !minus.words.get(w).copied().unwrap_or(0))
            .collect();
        if end % 64 != 0 {
            if let Some(tail) = out.last_mut() {
                *tail &= (1u64 << (end % 64)) - 1;
            }
        }
        out
    }

    /// ORs another bitmap of the same length into this one.
    pub fn or_with(&mut self, other: &PageBitmap) {
        debug_assert_eq!(self.bits, other.bits);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Clears every page.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_across_word_boundaries() {
        let mut b = PageBitmap::new(200);
        assert_eq!(b.set_range(60, 130), 70);
        assert_eq!(b.set_range(0, 64), 60, "only the newly set pages count");
        assert_eq!(b.count(), 130);
        assert_eq!(b.clear_range(63, 65), 2);
        assert!(!b.get(63) && !b.get(64) && b.get(62) && b.get(65));
        assert_eq!(b.next_set(63), Some(65));
        assert_eq!(b.clear_range(0, 1000), 128, "clipped to the bitmap");
        assert_eq!(b.next_set(0), None);
    }

    #[test]
    fn set_bits_walks_every_word_in_order() {
        let got: Vec<u64> = set_bits(100, &[0b1001, 0, 1 << 63 | 1]).collect();
        assert_eq!(got, vec![100, 103, 228, 291]);
        assert_eq!(set_bits(0, &[]).count(), 0);
        assert_eq!(set_bits(0, &[u64::MAX]).count(), 64);
    }

    #[test]
    fn words_in_masks_the_window_and_the_subtrahend() {
        let mut b = PageBitmap::full(200);
        let mut minus = PageBitmap::new(200);
        minus.set(65);
        minus.set(130);
        let w = b.words_in(64, 140, &minus);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0], !0b10, "page 65 removed");
        assert_eq!(
            w[1],
            ((1u64 << 12) - 1) & !(1 << 2),
            "ends at 140, 130 removed"
        );
        b.clear_all();
        assert!(b.words_in(0, 200, &minus).iter().all(|&x| x == 0));
        assert!(b.words_in(256, 300, &minus).is_empty(), "past the end");
        // The last, partial word of the bitmap.
        let full = PageBitmap::full(200);
        assert_eq!(full.words_in(192, 256, &minus), vec![0xff]);
    }

    #[test]
    fn next_set_never_returns_past_the_end() {
        let mut b = PageBitmap::full(70);
        assert_eq!(b.count(), 70);
        b.clear_range(0, 69);
        assert_eq!(b.next_set(0), Some(69));
        assert_eq!(b.next_set(70), None);
    }

    #[test]
    fn or_words_at_unaligned_offset() {
        let mut b = PageBitmap::new(131);
        b.or_words(3, &[0b101, 1 << 63, 1]);
        let set: Vec<u64> = (0..131).filter(|&i| b.get(i)).collect();
        assert_eq!(
            set,
            vec![3, 5, 3 + 127],
            "bit 131 is past the end and ignored"
        );
    }

    proptest! {
        #[test]
        fn range_ops_match_a_naive_model(
            bits in 1u64..300,
            ops in prop::collection::vec((any::<bool>(), 0u64..320, 0u64..320), 1..40)
        ) {
            let mut b = PageBitmap::new(bits);
            let mut model = vec![false; bits as usize];
            for (set, a, z) in ops {
                let (s, e) = (a.min(z), a.max(z));
                let changed = if set { b.set_range(s, e) } else { b.clear_range(s, e) };
                let mut naive = 0;
                for i in s..e.min(bits) {
                    if model[i as usize] != set { naive += 1; }
                    model[i as usize] = set;
                }
                prop_assert_eq!(changed, naive);
            }
            for i in 0..bits {
                prop_assert_eq!(b.get(i), model[i as usize]);
            }
            let first = model.iter().position(|&x| x).map(|p| p as u64);
            prop_assert_eq!(b.next_set(0), first);
        }
    }
}
