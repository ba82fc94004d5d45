//! # ferry-sim
//!
//! A deterministic, seeded simulated guest for testing ferry's migration engine without a
//! VM: memfd-backed RAM, a Linux-like page allocator whose workloads allocate, write, free
//! and reuse pages during migration, and a balloon stand-in whose free page hints arrive
//! with adversarial timing (late, early, stale, reused right after hinting, flooding, never).
//!
//! The property every test checks: after a migration, every page the guest considers in
//! use is byte-identical at the destination ([`verify`]).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod guest;
pub mod harness;
pub mod sim;
pub mod state;

pub use guest::{create_memory, verify, Guest, Mismatch, PageState, SimMemory};
pub use sim::{free_ranges, HintBehavior, SimConfig, SimDriver, SimHintSource, SimVm, Workload};
