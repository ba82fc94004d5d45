//! The `ferry` subcommands.

pub mod bench;
pub mod run;
pub mod sim;
