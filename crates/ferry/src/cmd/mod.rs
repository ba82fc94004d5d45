//! The `ferry` subcommands.

pub mod bench;
pub mod sim;
