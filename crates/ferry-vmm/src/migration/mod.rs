//! Live migration of a running [`Vmm`](crate::Vmm): the glue between the VMM, the balloon's hint sources
//! and the `ferry-migration` engine, on both sides.
//!
//! Source ([`migrate`]): dirty log = KVM's per-slot log OR the device write bitmap
//! ([`Vmm::dirty_log`](crate::Vmm::dirty_log)); hint sources (unless hints are off) = the balloon's free page hints,
//! its reported (discarded) ranges and never-populated memory; VM control = pause, resume and
//! the machine state sealed in the [`state_format`](crate::state_format) envelope. On any failure the engine
//! leaves the VM running, dirty logging off and the balloon's hinting ended (DONE). After
//! a success the VM stays paused: the destination acknowledged that it runs the guest now.
//!
//! Destination ([`crate::receive`]): an [`IncomingVm`](crate::IncomingVm) with zeroed RAM receives the stream; the
//! machine state is decoded and restored, the control API is bound, and only then is the
//! source acknowledged and the guest resumed. A failure before the acknowledgement rejects
//! the migration (the source resumes its VM) and discards everything here.
//!
//! The control API ([`Supervisor`]): `{"cmd":"migrate","to":ADDR,"options":{..}}` runs the
//! migration on its own thread and answers with the final [`MigrationStats`](ferry_migration::MigrationStats); meanwhile
//! `status` carries a `migration` object ([`MigrationProgress`]). After a success the source
//! VMM exits shortly after the answer was handed to the API.
#![forbid(unsafe_code)]

mod client;
mod error;
mod options;
mod progress;
mod source;
mod supervisor;

pub use client::{query_progress, request_migration};
pub use error::MigrateError;
pub use options::MigrateOptions;
pub use progress::{MigrationPhase, MigrationProgress, ProgressTracker};
pub use source::migrate;
pub use supervisor::{StateChange, Supervisor, EXIT_LINGER};
