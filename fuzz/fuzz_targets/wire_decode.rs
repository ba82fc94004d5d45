//! Decodes arbitrary bytes as a migration stream: the decoder must never panic, never read
//! past a record, and never allocate more than the format's payload limit.
#![no_main]

use ferry_migration::wire::{Decoder, Record, WireError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut d = Decoder::new(data);
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
