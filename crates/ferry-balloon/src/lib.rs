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
//! ```text
//! let dev = Balloon::new(BalloonConfig::default(), guest_mem.clone(), irqfd_trigger);
//! // MMIO exit in [base, base + MMIO_WINDOW_LEN): dev.mmio_read(off, data) / mmio_write(off, data)
//! // (a write to QueueNotify processes the queue; or call dev.process_queue(i) from an ioeventfd)
//! engine.add_source(Box::new(dev.hint_source()));
//! engine.add_source(Box::new(dev.report_source()));
//! // VM pause -> dev.pause(); VM resume -> dev.resume(); resize -> dev.set_target(pages)
//! // switchover: sources' finish(), then dev.save(); destination: Balloon::restore(...), resume()
//! ```
//!
//! Guest input is never trusted: malformed chains are logged (rate-limited) and returned
//! unused, broken rings put the device in DEVICE_NEEDS_RESET, nothing is read, written,
//! discarded or hinted outside guest RAM, and nothing panics.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod device;
pub mod features;
pub mod hinting;
pub mod memory;
pub mod mmio;
pub mod queues;
pub mod reporting;
mod shared;
pub mod state;
pub mod stats;

pub use device::{Balloon, BalloonCounters, QUEUE_SIZE_MAX};
pub use features::{BalloonConfig, QueueKind};
pub use hinting::{BalloonHintSource, CMD_ID_DONE, CMD_ID_MIN, CMD_ID_STOP};
pub use memory::{memfd_guest_memory, DiscardError, GuestMemory};
pub use mmio::{MmioDevice, MMIO_WINDOW_LEN};
pub use queues::QueueError;
pub use reporting::ReportedRangesSource;
pub use shared::IrqTrigger;
pub use state::{BalloonState, QueueSnapshot, StateError};
pub use stats::BalloonStats;
