//! The engine's view of the VM it migrates: pause, resume, state and throttling.

/// Errors from a [`VmControl`] implementation.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct VmControlError {
    /// What was being attempted, e.g. "pausing the vCPUs".
    pub what: String,
    /// Why it failed.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl VmControlError {
    /// An error for `what` caused by `source`.
    pub fn new(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// Control over the running VM, implemented by the VMM (and by the simulated guest).
pub trait VmControl: Send {
    /// Stops guest execution and every device thread that could write guest memory. When this
    /// returns, guest memory and device state no longer change.
    fn pause(&mut self) -> Result<(), VmControlError>;
    /// Resumes the VM after a failed or cancelled switchover.
    fn resume(&mut self) -> Result<(), VmControlError>;
    /// Serializes vCPU and device state; called while paused, after hint sources finished.
    fn save_state(&mut self) -> Result<Vec<u8>, VmControlError>;
    /// Auto-converge: limit vCPUs to running `(100 - percent)`% of the time. The default
    /// implementation ignores throttling.
    fn set_throttle(&mut self, percent: u8) {
        let _ = percent;
    }
}
