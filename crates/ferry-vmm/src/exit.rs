//! Why a VM stopped: what [`crate::run`] returns and every part of the VMM reports.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The API asked for a shutdown.
    Shutdown,
    /// The guest powered off (ACPI S5).
    GuestPowerOff,
    /// The guest reset the machine (i8042, ACPI reset register or triple fault).
    GuestReset,
    /// A vCPU failed.
    Error(String),
}
