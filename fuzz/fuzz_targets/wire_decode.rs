//! Decodes arbitrary bytes as a migration stream: the decoder must never panic, never read
//! past a record, and never allocate more than the format's payload limit. The first byte
//! chooses whether zstd was agreed (compressed records are then decompressed, bounded by
//! their page count).
#![no_main]

use ferry_migration::compress::Codec;
use ferry_migration::wire::{Decoder, Record, WireError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let codec = if first & 1 == 1 { Codec::Zstd } else { Codec::None };
    let Ok(mut d) = Decoder::new(stream).accept(codec) else {
        return;
    };
    for _ in 0..1024 {
        match d.next_record() {
            Ok(Record::Pages { gpas, data }) => assert_eq!(gpas.len() * 4096, data.len()),
            Ok(Record::ZeroRuns(runs)) => assert!(runs.len() <= 8192),
            Ok(_) => {}
            Err(WireError::Closed) => break,
            Err(_) => break,
        }
    }
});
