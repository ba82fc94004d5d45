//! # ferry-migration
//!
//! A hypervisor-agnostic precopy RAM migration engine that does not send memory the guest
//! does not use. It knows nothing of KVM, virtio or any VMM: the VMM plugs in through the
//! traits defined here.
//!
//! - [`DirtyLog`]: fetch-and-clear dirty page tracking (KVM's dirty log, vm-memory's write
//!   bitmap, or both OR-ed together).
//! - [`HintSource`]: anything that knows pages need not be sent (the balloon's free page
//!   hints, its reported and discarded pages, never-populated host memory). Hints arrive
//!   asynchronously and are applied under the epoch fence described in [`hint`].
//! - [`VmControl`]: pause, resume, device state and throttling.
//!
//! The engine sends guest RAM over one or more byte streams in the versioned [`wire`]
//! format; the destination side receives into its own guest memory and refuses to report
//! success for an incomplete or corrupt stream. See `docs/ARCHITECTURE.md`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod audit;
pub mod bitmap;
pub mod compress;
pub mod convergence;
pub mod dest;
pub mod dirty;
pub mod hint;
mod lane;
pub mod layout;
pub mod progress;
mod socket;
pub mod source;
pub mod stats;
pub mod tls;
pub mod transport;
pub mod unpopulated;
pub mod vm;
pub mod watchdog;
pub mod wire;
pub mod zero;

pub use bitmap::{set_bits, PageBitmap};
pub use compress::Compression;
pub use convergence::{OnNoConvergence, Policy, DOWNTIME_NEGLIGIBLE};
pub use dest::{Destination, Incoming, ReceiveConfig, ReceiveError, ReceiveStats, Received};
pub use dirty::{BitmapDirtyLog, DirtyLog, DirtyLogError};
pub use hint::{Epoch, HintInbox, HintKind, HintSink, HintSource, Outcome, SourceStats};
pub use layout::{GuestRange, MemoryLayout, RegionDesc, PAGE_SHIFT, PAGE_SIZE};
pub use progress::{Event, NoObserver, Observer};
pub use source::{
    Migration, MigrationConfig, MigrationError, HINT_DRAIN_BUDGET, HINT_RATE_FLOOR_DEFAULT,
    HINT_RATE_WINDOW, SETTING_DURATION_MAX, SETTLE_GRACE, SETTLE_MAX,
};
pub use stats::{MigrationStats, RoundStats, SwitchoverStats};
pub use tls::{Tls, TlsError, TlsFiles};
pub use transport::{connect, Connection, Endpoint, Listener};
pub use unpopulated::UnpopulatedSource;
pub use vm::{VmControl, VmControlError};
