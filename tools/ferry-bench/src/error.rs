//! Why the benchmark (or one VMM's part of it) failed; shared by the runner and the VMM
//! sessions it drives.

use std::time::Duration;

use ferry_lab::{AgentError, GuestError, ImageError};
use thiserror::Error;

use crate::qmp::QmpError;

/// Why the benchmark (or one VMM's part of it) failed.
#[derive(Debug, Error)]
pub enum BenchError {
    /// No hardware KVM here.
    #[error("no hardware KVM here (PVM or none): run the benchmark through lab/run")]
    NoKvm,
    /// The guest image is missing.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A VMM process could not be started or stopped.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// The guest agent did not answer as expected.
    #[error("{what}: {source}")]
    Agent {
        /// What was asked.
        what: String,
        /// The agent's error.
        source: AgentError,
    },
    /// The agent answered something unexpected.
    #[error("unexpected agent answer to `{command}`: {answer}")]
    Answer {
        /// The command.
        command: String,
        /// Its answer.
        answer: String,
    },
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// A VMM misbehaved (exited, refused, migration failed).
    #[error("{0}")]
    Vmm(String),
    /// Something did not happen in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        timeout: Duration,
    },
    /// A local I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}
