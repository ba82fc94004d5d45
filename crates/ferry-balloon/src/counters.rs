//! What the device counts (for monitoring and tests) and how it rate-limits its warnings
//! about guest errors; used by the device and by every queue handler.

use serde::{Deserialize, Serialize};

/// Counters for monitoring and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonCounters {
    /// 4 KiB pages received on the inflate queue.
    pub inflated_pages: u64,
    /// 4 KiB pages received on the deflate queue.
    pub deflated_pages: u64,
    /// Hinted ranges handed to the engine's sink (which may still drop late ones).
    pub hinted_ranges: u64,
    /// Hinted ranges ignored (stale or no current command id).
    pub hints_ignored: u64,
    /// Reported ranges received.
    pub reported_ranges: u64,
    /// Bytes discarded on the host (inflated and reported).
    pub discarded_bytes: u64,
    /// Descriptor chains dropped because they were malformed.
    pub chains_dropped: u64,
    /// Times the device entered DEVICE_NEEDS_RESET.
    pub needs_reset: u64,
}

/// Logs the first few guest errors of a kind, then every power of two, so a flood cannot
/// flood the log.
#[derive(Debug, Default, Clone)]
pub(crate) struct WarnLimiter {
    count: u64,
}

impl WarnLimiter {
    pub fn allow(&mut self) -> bool {
        self.count = self.count.saturating_add(1);
        self.count <= 16 || self.count.is_power_of_two()
    }
}
