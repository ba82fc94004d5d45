//! Why a migration failed, on either side.

use ferry_migration::ReceiveError;

use crate::api::{ApiError, ErrorCode, Refusal};
use crate::config::ConfigError;
use crate::exit::ExitReason;
use crate::state_format::StateFormatError;
use crate::vmm::VmmError;

/// Everything that can go wrong migrating out or in.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Bad options.
    #[error("invalid migration options: {0}")]
    Options(String),
    /// The TLS credentials cannot be used.
    #[error("cannot use the TLS credentials: {0}")]
    Tls(#[from] ferry_migration::TlsError),
    /// A migration of this VM is already running.
    #[error("a migration is already running (to {0})")]
    Busy(String),
    /// The destination cannot be reached.
    #[error("cannot connect to the destination {endpoint}: {source}")]
    Connect {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The engine failed; on the source the VM keeps running.
    #[error("migration failed (the VM keeps running here): {0}")]
    Engine(#[from] ferry_migration::MigrationError),
    /// The guest stopped here while it was being migrated (it reset, e.g. on a triple
    /// fault, or powered off): the migration failed and nothing runs on either side.
    #[error(
        "migration failed because the guest stopped here during it ({reason:?}); it runs \
         neither here nor at the destination: {source}"
    )]
    GuestStopped {
        /// Why the guest stopped.
        reason: ExitReason,
        /// What the engine reported.
        #[source]
        source: ferry_migration::MigrationError,
    },
    /// Listening for the source failed.
    #[error("cannot listen on {endpoint}: {source}")]
    Listen {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Receiving failed; nothing was restored.
    #[error("receiving the migration failed, nothing was restored: {0}")]
    Receive(#[from] ReceiveError),
    /// The destination cannot or will not build the source's VM; nothing was received.
    #[error("the destination refused the source's VM, nothing was received: {0}")]
    Refused(#[from] crate::description::IncomingError),
    /// The machine state is damaged or foreign; nothing was restored.
    #[error("the source's machine state was refused, nothing was restored: {0}")]
    State(#[from] StateFormatError),
    /// Creating or restoring the VM failed.
    #[error("{what}: {source}")]
    Vm {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: VmmError,
    },
    /// The destination configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The acknowledgement could not be sent: the source resumes its copy, this one is
    /// discarded.
    #[error("cannot acknowledge the migration to the source, discarding this copy: {0}")]
    Acknowledge(#[source] ferry_migration::wire::WireError),
    /// The VMM's control API failed.
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl MigrateError {
    /// Whether the guest was handed over without an answer: it stays paused here.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            MigrateError::Engine(ferry_migration::MigrationError::OutcomeUnknown(_))
        )
    }

    /// The control API's code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            MigrateError::Options(_) => ErrorCode::InvalidArgument,
            MigrateError::Busy(_) => ErrorCode::MigrationActive,
            e if e.outcome_unknown() => ErrorCode::OutcomeUnknown,
            _ => ErrorCode::MigrationFailed,
        }
    }

    /// This error as the control API's refusal.
    pub fn refusal(&self) -> Refusal {
        Refusal::new(self.code(), self.to_string())
    }
}
