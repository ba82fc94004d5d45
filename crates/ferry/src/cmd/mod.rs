//! The `ferry` subcommands.

pub mod bench;
pub mod bench_vm;
pub mod control;
pub mod migrate;
pub mod receive;
pub mod run;
pub mod sim;
pub mod vmdemo;
