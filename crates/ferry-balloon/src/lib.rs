//! # ferry-balloon
//!
//! A virtio-balloon device (virtio 1.2 §5.5) over the modern virtio-mmio transport, usable
//! by any Rust VMM. It knows nothing of KVM: the VMM forwards MMIO accesses, provides an
//! interrupt trigger and the guest memory, and registers the device's two migration hint
//! sources with the `ferry-migration` engine.
//!
//! - Inflate/deflate with a VMM-set target; inflated pages are discarded on the host.
//! - Memory statistics on request.
//! - Free page hinting: [`BalloonHintSource`] turns the engine's epochs into command ids and
//!   the guest's hinted blocks into hints tagged with the right epoch (see [`hinting`]).
//! - Free page reporting: reported ranges are discarded (hole punched in the memfd backing
//!   guest RAM) unless page poisoning or the VMM forbids it; discarded ranges feed
//!   [`ReportedRangesSource`] (see [`reporting`]).
//! - Device state as a plain serde struct with a validating restore ([`BalloonState`]).
//!
//! # Wiring (VMM side)
//!
//! ```
//! use std::sync::Arc;
//! use ferry_balloon::{memfd_guest_memory, Balloon, BalloonConfig, IrqTrigger, MmioDevice};
//! use ferry_migration::HintSource;
//!
//! /// The VMM's interrupt line (an irqfd in ferry-vmm).
//! struct Line;
//! impl IrqTrigger for Line {
//!     fn trigger(&self) -> std::io::Result<()> {
//!         Ok(())
//!     }
//! }
//!
//! // Guest RAM on a memfd, so that discarded pages read back as zero.
//! let (mem, _file) = memfd_guest_memory("guest-ram", &[(0, 64 << 20)])?;
//! let mut dev = Balloon::new(BalloonConfig::default(), mem, Arc::new(Line));
//! // An MMIO exit in [base, base + MMIO_WINDOW_LEN) goes to the device; a write to
//! // QueueNotify processes that queue.
//! let mut magic = [0u8; 4];
//! dev.mmio_read(0, &mut magic);
//! assert_eq!(&magic, b"virt");
//! // The migration engine learns free pages from the device's two sources.
//! let sources: Vec<Box<dyn HintSource>> =
//!     vec![Box::new(dev.hint_source()), Box::new(dev.report_source())];
//! assert_eq!(sources.len(), 2);
//! // The VMM's pause/resume and resize requests.
//! dev.pause();
//! dev.resume();
//! dev.set_target(1024); // 4 MiB of 4 KiB pages
//! assert_eq!(dev.target(), 1024);
//! // At the switchover the state is saved (after the sources finished); a destination
//! // restores it with `Balloon::restore` and resumes.
//! let _state = dev.save();
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Guest input is never trusted: malformed chains are logged (rate-limited) and returned
//! unused, broken rings put the device in DEVICE_NEEDS_RESET, nothing is read, written,
//! discarded or hinted outside guest RAM, and nothing panics.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod counters;
mod device;
pub mod features;
pub mod hinting;
pub mod memory;
pub mod mmio;
pub mod queues;
pub mod reporting;
mod round;
mod shared;
pub mod state;
pub mod stats;

pub use counters::BalloonCounters;
pub use device::{Balloon, QUEUE_SIZE_MAX};
pub use features::{BalloonConfig, QueueKind};
pub use hinting::{
    BalloonHintSource, CMD_ID_DONE, CMD_ID_MIN, CMD_ID_STOP, HINT_MIN_YIELD_PAGES,
    HINT_WINDOW_MIN_SHARE, HINT_WINDOW_PAGES,
};
pub use memory::{memfd_guest_memory, DiscardError, GuestMemory};
pub use mmio::{MmioDevice, MMIO_WINDOW_LEN};
pub use queues::QueueError;
pub use reporting::ReportedRangesSource;
pub use shared::IrqTrigger;
pub use state::{BalloonState, QueueSnapshot, StateError};
pub use stats::BalloonStats;
