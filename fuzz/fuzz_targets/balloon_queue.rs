//! Fuzzes the balloon's queue processing; the harness lives with the crate's tests so that
//! `cargo test -p ferry-balloon` replays it on stable (`tests/replay.rs`).
#![no_main]

#[path = "../../crates/ferry-balloon/tests/harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::run(data);
});
