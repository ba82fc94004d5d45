//! The control API: one JSON object per line over a Unix socket, one reply line per request.
//! Protocol reference: `docs/vmm.md`. [`ApiClient`] is the client the `ferry` CLI uses.
//! Each connection starts with the server's greeting, which carries the API version
//! ([`API_VERSION`]), as QMP's does.
//!
//! ```text
//! <- {"ferry":{"api":1,"vmm":"ferry-vmm 0.1.0"}}
//! -> {"cmd":"status"}
//! <- {"ok":true,"result":{"state":"running","vcpus":2,...}}
//! -> {"cmd":"balloon-set","target_bytes":268435456}
//! <- {"ok":true,"result":null}
//! -> {"cmd":"nonsense"}
//! <- {"ok":false,"code":"bad-request","error":"bad request: unknown variant `nonsense`, ..."}
//! ```
//!
//! A failed request carries a stable [`ErrorCode`] (what a program matches on) besides the
//! sentence (what a person reads, which may change between releases).
#![forbid(unsafe_code)]

mod client;
mod server;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use client::ApiClient;
pub use server::{serve, ApiServer};

/// Longest request line accepted; longer lines close the connection.
pub const REQUEST_BYTES_MAX: u64 = 64 * 1024;
/// Clients served at once; further connections are refused with an error line.
pub const CLIENTS_MAX: usize = 16;
/// How long [`ApiClient`] waits for a reply (except to `migrate`, which lasts as long as the
/// migration).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The version of this protocol, in every connection's greeting. It changes when a request
/// or reply changes incompatibly (a new request or an added reply field does not change it);
/// a client refuses a server of another version.
pub const API_VERSION: u32 = 1;

/// The first line the server writes on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Greeting {
    /// Who answers.
    pub ferry: ServerInfo,
}

/// What the greeting says about the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ServerInfo {
    /// [`API_VERSION`] of the server.
    pub api: u32,
    /// The serving program and its version.
    pub vmm: String,
}

impl Greeting {
    pub(crate) fn this() -> Self {
        Self {
            ferry: ServerInfo {
                api: API_VERSION,
                vmm: concat!("ferry-vmm ", env!("CARGO_PKG_VERSION")).to_owned(),
            },
        }
    }
}

/// Errors of the API server and client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket cannot be bound.
    #[error("cannot listen on the API socket {path}: {source}")]
    Bind {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The client cannot reach the VMM.
    #[error("cannot talk to the VMM at {path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM's reply is not valid JSON or not a reply object.
    #[error("malformed reply from the VMM: {0}")]
    Reply(String),
    /// The VMM refused or failed the request.
    #[error("the VMM refused the request ({code}): {message}")]
    Refused {
        /// Why, for a program.
        code: ErrorCode,
        /// Why, for a person.
        message: String,
    },
    /// The VMM closed the connection before it answered (it exited, or was killed).
    #[error("the VMM at {0} closed the connection without answering (did it exit?)")]
    Closed(PathBuf),
    /// The VMM speaks another version of the API.
    #[error(
        "the VMM at {path} speaks API version {theirs} ({vmm}); this client speaks version \
         {API_VERSION}: use the ferry command of the same release"
    )]
    Version {
        /// Path.
        path: PathBuf,
        /// The server's version.
        theirs: u32,
        /// The server's program.
        vmm: String,
    },
}

/// Why a request failed, in a form that stays the same across releases (the sentence next to
/// it may change). Written in kebab-case on the wire: `"code":"migration-active"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The line is not a request: not JSON, an unknown `cmd`, a missing or unknown field, or
    /// a value of the wrong type.
    BadRequest,
    /// The request line is longer than [`REQUEST_BYTES_MAX`]; the connection is closed.
    RequestTooLong,
    /// [`CLIENTS_MAX`] clients are connected already; the connection is closed.
    TooManyClients,
    /// An argument was understood but cannot be used: a balloon target above the guest's
    /// RAM, migration options out of range, a destination address that does not parse.
    InvalidArgument,
    /// The VM has no balloon device.
    NoBalloon,
    /// The request needs a running guest and the VM is paused.
    VmPaused,
    /// A migration owns the VM: run-state and memory changes, and a second migration, are
    /// refused until it ends.
    MigrationActive,
    /// The VM was migrated and runs at the destination now.
    MigratedAway,
    /// `migrate-cancel` without a running migration.
    NoMigration,
    /// `migrate-cancel` after the guest was handed over: too late, it may run at the
    /// destination already.
    HandedOver,
    /// The migration ran and failed; the guest runs here (or stopped here, as the sentence
    /// says), and `status` keeps the error.
    MigrationFailed,
    /// The migration's outcome is unknown (the acknowledgement was lost after the handover):
    /// the guest stays paused here until the operator decides (docs/migration.md).
    OutcomeUnknown,
    /// The VMM could not carry the request out (a KVM or host error).
    Internal,
    /// A code this client does not know (a newer VMM): read the sentence.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The wire name, e.g. `migration-active`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::RequestTooLong => "request-too-long",
            Self::TooManyClients => "too-many-clients",
            Self::InvalidArgument => "invalid-argument",
            Self::NoBalloon => "no-balloon",
            Self::VmPaused => "vm-paused",
            Self::MigrationActive => "migration-active",
            Self::MigratedAway => "migrated-away",
            Self::NoMigration => "no-migration",
            Self::HandedOver => "handed-over",
            Self::MigrationFailed => "migration-failed",
            Self::OutcomeUnknown => "outcome-unknown",
            Self::Internal => "internal",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request the VMM refused or failed: its code and a sentence for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What a program matches on.
    pub code: ErrorCode,
    /// What a person reads.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code`, saying `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The VMM failed to do what was asked (`code` internal).
    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::Internal, message.to_string())
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A request: `{"cmd": "<name>", ...arguments}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Run state, resources, balloon summary.
    Status,
    /// Stop the guest and devices.
    Pause,
    /// Run again.
    Resume,
    /// Set the balloon target in bytes.
    BalloonSet {
        /// Bytes the guest should give up.
        target_bytes: u64,
    },
    /// Balloon target, actual size and negotiated features.
    BalloonGet,
    /// The guest's last memory statistics (and ask it for fresh ones).
    BalloonStats,
    /// Stop the VM; the VMM process exits.
    Shutdown,
    /// Live-migrate to a destination; answers when the migration ended, with its statistics.
    Migrate {
        /// Destination address.
        to: String,
        /// Migration options (`ferry_vmm::migration::MigrateOptions`); defaults when absent.
        #[serde(default)]
        options: Value,
    },
    /// Cancel the running migration: the guest keeps running here, the destination discards
    /// what it received. Refused when no migration runs, or once the guest was handed over.
    MigrateCancel,
    /// What every vCPU is doing, for diagnosing a guest that stopped answering (the vCPUs
    /// stop for the read; refused while a migration owns the VM).
    Vcpus,
}

/// A reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why it failed, for a program (absent on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    /// Why it failed, for a person (absent on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub(crate) fn from_result(r: Result<Value, Refusal>) -> Self {
        match r {
            Ok(v) => Self {
                ok: true,
                result: Some(v),
                code: None,
                error: None,
            },
            Err(e) => Self {
                ok: false,
                result: None,
                code: Some(e.code),
                error: Some(e.message),
            },
        }
    }

    /// The reply line refusing with `code` and `message`.
    fn refusal_line(code: ErrorCode, message: &str) -> String {
        serde_json::to_string(&Self::from_result(Err(Refusal::new(code, message))))
            .unwrap_or_else(|_| r#"{"ok":false}"#.to_owned())
    }

    /// The client's error for a failed reply (a reply from a VMM before error codes, or
    /// without one, counts as `unknown`).
    fn refused(self) -> ApiError {
        ApiError::Refused {
            code: self.code.unwrap_or(ErrorCode::Unknown),
            message: self.error.unwrap_or_default(),
        }
    }
}

/// What serves requests (the VMM; a fake in tests).
pub trait ApiHandler: Send + Sync + 'static {
    /// Handles one request; `Err` says why it failed, with a code and a sentence.
    fn handle(&self, request: Request) -> Result<Value, Refusal>;
}

/// Parses and answers one request line.
pub fn answer(handler: &dyn ApiHandler, line: &str) -> Reply {
    let result = match serde_json::from_str::<Request>(line) {
        Ok(req) => handler.handle(req),
        Err(e) => Err(Refusal::new(
            ErrorCode::BadRequest,
            format!("bad request: {e}"),
        )),
    };
    Reply::from_result(result)
}
