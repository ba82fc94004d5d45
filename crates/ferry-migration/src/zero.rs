//! Zero-page detection at memory speed.

/// Whether `page` is all zero bytes.
///
/// Works on 64-byte blocks OR-reduced in registers, which the compiler turns into vector
/// instructions, and stops at the first non-zero block: a typical data page is rejected after
/// its first cache line.
pub fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(64);
    let whole = blocks.all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0);
    whole && blocks.remainder().iter().all(|&x| x == 0)
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
