//! The `ferry` subcommands.

#[cfg(feature = "dev-tools")]
pub mod bench;
#[cfg(feature = "dev-tools")]
pub mod bench_vm;
pub mod control;
pub mod migrate;
pub mod receive;
pub mod run;
#[cfg(feature = "dev-tools")]
pub mod sim;
#[cfg(feature = "dev-tools")]
pub mod vmdemo;
