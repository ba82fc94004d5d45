//! Zero-page detection at memory speed.

/// Whether `page` is all zero bytes.
///
/// The first 64 bytes are checked on their own, so a typical data page is rejected after
/// one cache line; the rest is OR-reduced in 256-byte blocks of 64-bit words, which the
/// compiler turns into vector instructions, stopping at the first non-zero block.
pub fn is_zero(page: &[u8]) -> bool {
    let (head, tail) = page.split_at(page.len().min(64));
    if or_words(head) != 0 {
        return false;
    }
    let mut blocks = tail.chunks_exact(256);
    blocks.all(|b| or_words(b) == 0) && blocks.remainder().iter().all(|&x| x == 0)
}

/// OR of all whole 64-bit words of `b`, and of its trailing bytes.
fn or_words(b: &[u8]) -> u64 {
    let mut words = b.chunks_exact(8);
    let acc = words.by_ref().fold(0u64, |acc, w| {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        acc | u64::from_ne_bytes(a)
    });
    acc | words
        .remainder()
        .iter()
        .fold(0u64, |acc, &x| acc | u64::from(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_any_non_zero_byte() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        for i in [0, 63, 64, 2047, 4095] {
            page[i] = 1;
            assert!(!is_zero(&page), "byte {i}");
            page[i] = 0;
        }
        assert!(is_zero(&[]));
        assert!(!is_zero(&[0, 0, 1]), "remainder shorter than a block");
    }
}
