//! Progress events, for progress bars, logs and the deterministic simulation.

use crate::stats::{MigrationStats, RoundStats};

/// Something the migration did.
#[derive(Debug)]
pub enum Event<'a> {
    /// The handshake finished; hint sources were started.
    Connected {
        /// Guest pages.
        pages: u64,
        /// Connections.
        connections: u16,
    },
    /// A round began with `pages_queued` pages to send.
    RoundStarted {
        /// Round number (0 = bulk).
        round: u32,
        /// Pages queued.
        pages_queued: u64,
        /// Whether this is the stop-and-copy round.
        is_final: bool,
    },
    /// Periodic progress inside a round (every few hundred pages).
    Progress {
        /// Round number.
        round: u32,
        /// Pages handled so far in this round (sent, zero or skipped).
        pages_done: u64,
        /// Pages still queued.
        pages_left: u64,
        /// Bytes written so far in the whole migration.
        bytes: u64,
    },
    /// A round finished.
    RoundFinished(&'a RoundStats),
    /// The VM was paused for switchover.
    Paused,
    /// The destination acknowledged; the migration succeeded.
    Completed(&'a MigrationStats),
}

/// Receives [`Event`]s on the migration thread. Must return quickly.
pub trait Observer {
    /// Called for every event.
    fn event(&mut self, event: &Event<'_>);
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn event(&mut self, _: &Event<'_>) {}
}
