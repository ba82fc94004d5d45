//! Runs the fuzz harness on stable: the hand-made seeds under `fuzz/seeds/balloon_queue`
//! and deterministic mutations of them.

mod harness;

use std::path::PathBuf;

fn seed(name: &str) -> Vec<u8> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/balloon_queue");
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("seed {name}: {e}"))
}

fn seeds() -> Vec<Vec<u8>> {
    ["hint", "inflate", "report", "stats"].map(seed).to_vec()
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn seeds_reach_every_queue_handler() {
    let c = harness::run(&seed("inflate")).counters;
    assert_eq!((c.inflated_pages, c.discarded_bytes), (3, 3 * 4096));
    let s = harness::run(&seed("hint"));
    assert_eq!((s.counters.hinted_ranges, s.pages_skipped), (1, 1));
    let s = harness::run(&seed("report"));
    assert_eq!(s.counters.reported_ranges, 2);
    assert_eq!(s.counters.discarded_bytes, 2 * 4096);
    assert_eq!(
        s.pages_skipped, 2,
        "discarded in an open epoch (across a restore)"
    );
    let c = harness::run(&seed("stats")).counters;
    assert_eq!((c.chains_dropped, c.needs_reset), (0, 0));
}

#[test]
fn mutated_seeds_run_clean() {
    let seeds = seeds();
    let mut rng = Rng(0x5eed_ba11_0000_0001);
    for _ in 0..1500 {
        let mut input = seeds[rng.below(seeds.len())].clone();
        for _ in 0..1 + rng.below(16) {
            // Mostly the header, the ops and the rings (first 5 KiB of the image).
            let at = rng.below(input.len().min(3 + 4 * 255 + 0x1400));
            input[at] = rng.next() as u8;
        }
        if rng.below(4) == 0 {
            // Reshuffle the op stream's length.
            input[2] = rng.next() as u8;
        }
        harness::run(&input);
    }
}

/// Every input a fuzzer once failed on (`fuzz/regressions/balloon_queue`, one file each, named
/// for what it found) passes the harness's checks now.
#[test]
fn fuzz_findings_stay_fixed() {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/balloon_queue");
    let mut ran = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let input = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| harness::run(&input));
        assert!(outcome.is_ok(), "{} fails again", path.display());
        ran += 1;
    }
    assert!(ran > 0, "no regression inputs under {}", dir.display());
}
