//! Units on the command line and in tables: one set for the whole CLI, defined by
//! [`ferry_vmm::units`] (sizes: a bare number is MiB; rates: a unit is required).

pub use ferry_vmm::units::{mib, parse_rate, parse_size};
