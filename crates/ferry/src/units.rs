//! Units on the command line and in tables: one set for the whole CLI, defined by
//! [`ferry_vmm::units`] (sizes: a bare number is MiB; rates: a unit is required).

pub use ferry_vmm::units::{mib, parse_rate, parse_size};

/// The longest downtime limit a command accepts, ms: the engine's limit on any duration
/// setting ([`ferry_migration::SETTING_DURATION_MAX`], a year). Checked as the command line
/// is read, so a typo fails at once rather than after the VMM was reached.
pub const DOWNTIME_MS_MAX: u64 = ferry_migration::SETTING_DURATION_MAX.as_millis() as u64;
