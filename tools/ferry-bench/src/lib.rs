//! # ferry-bench
//!
//! The live-migration benchmark of issue 6: the workload matrix (idle, freed, dirty) migrated by
//! ferry's VMM with hints off and on, and by Debian's QEMU without and with free-page-hint, on
//! the same guest image and guest size, over loopback TCP; the guest's integrity is checked on
//! every destination. Runs where hardware KVM is usable (inside the lab on PVM machines, see
//! `lab/run`); `ferry bench-vm` drives it.
//!
//! - [`runner`]: boots the guests (through `ferry-lab`) and runs the matrix.
//! - [`soak`]: many hops per VMM setting with the guest checking its pages, failures by kind.
//! - [`sessions`]: a guest hopping between VMM processes (ferry: control API; QEMU: QMP).
//! - [`qmp`]: the few QMP commands the QEMU baseline needs.
//! - [`results`]: what was measured, as JSON.
//! - [`report`]: the markdown table, the goals' ratios and their PASS/MISS.
//! - [`chart`]: PNG bar charts (bytes and time per workload and variant).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod chart;
mod error;
pub mod qmp;
pub mod report;
pub mod results;
pub mod runner;
pub mod sessions;
pub mod soak;

pub use results::{Results, Variant, Workload};
pub use runner::{BenchConfig, BenchError};

pub use ferry_lab::workspace_root;
