//! # ferry-e2e
//!
//! ferry's end-to-end tests, apart from the product crates (as crosvm keeps its `e2e_tests`):
//! a stock Debian guest with ferry's guest agent under ferry's VMM, booted, paused and restored,
//! and live-migrated along chains of VMM processes while it writes and checks its memory. They
//! need hardware KVM, so they are `#[ignore]`d and run through `lab/test` (docs/lab.md):
//!
//! - `tests/boot.rs`: the guest boots, its balloon inflates and deflates, at 1 and 4 GiB.
//! - `tests/restore.rs`: pause / save / copy RAM / restore in one process, repeatedly.
//! - `tests/migrate.rs`: every workload migrated with hints off and on, throttling, cancel.
//! - `tests/soak.rs`: the soak of `lab/soak`, N hops per vCPU count with random gaps.
//!
//! The VMM binary they start is found next to the test binary
//! ([`ferry_lab::workspace_binary`]); the fixture that starts it is [`ferry_lab::FerryVmm`].
#![forbid(unsafe_code)]
