//! Bounds every wait of a running migration from outside the engine's thread.
//!
//! The engine blocks in places where it cannot check anything itself: a lane writing to a
//! peer that stopped reading, the reply reader, a flush. The watchdog is a thread that shuts
//! every connection down (so each of those waits returns an error at once) when the migration
//! is cancelled, when its overall deadline passes, or when the guest has been paused longer
//! than the engine planned plus a margin ([`PAUSE_MARGIN`] by default). The engine then fails
//! the migration with the watchdog's reason and resumes the guest here.
//!
//! Once every Complete record is written the destination may resume the guest, so from
//! [`Watchdog::handed_over`] on the watchdog no longer acts on the pause bound or a cancel:
//! the source then waits (bounded) for the destination's answer, and only the destination's
//! refusal resumes the guest here (see [`crate::MigrationError::OutcomeUnknown`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::transport::Closer;

/// How much longer than the downtime limit the guest may stay paused before the source gives
/// up the switchover and resumes it. The limit is what the final round is sized for; the
/// margin covers saving and sending the device state and a slow acknowledgement path, and a
/// loaded host (everything in the lab runs emulated).
pub const PAUSE_MARGIN: Duration = Duration::from_secs(5);

/// How often the watchdog looks at the cancel flag when nothing wakes it.
const POLL: Duration = Duration::from_millis(20);

/// How long the engine has to notice a cancel or its deadline at its own next checkpoint
/// (it then fails cleanly and tells the destination why) before the watchdog cuts the
/// connections under it (it is blocked on the peer).
pub const GRACE: Duration = Duration::from_secs(1);

/// Why the watchdog cut the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    /// The cancel flag was set.
    Cancelled,
    /// The overall deadline passed.
    Timeout,
    /// The guest was paused for this long without the switchover completing.
    PauseTooLong(Duration),
}

#[derive(Debug, Default)]
struct State {
    /// Set while the guest is paused for the switchover.
    pause_deadline: Option<(Instant, Duration)>,
    /// When the cancel flag or the deadline was first seen: the engine's grace starts.
    noticed: Option<Instant>,
    handed_over: bool,
    /// The engine is failing or done by itself: never cut from here on.
    stood_down: bool,
    finished: bool,
    tripped: Option<Trip>,
}

/// The watchdog of one migration; stops its thread when dropped.
#[derive(Debug)]
pub struct Watchdog {
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Watchdog {
    /// Starts watching: `cancel` and `deadline` from now on, the pause bound once
    /// [`Watchdog::paused`] is called. `closers` cut the connections.
    pub fn start(
        closers: Vec<Closer>,
        cancel: Arc<AtomicBool>,
        deadline: Instant,
    ) -> std::io::Result<Self> {
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let s = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("ferry-watchdog".into())
            .spawn(move || watch(&s, &closers, &cancel, deadline))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The guest was paused at `at`: cut the connections if the switchover has not handed
    /// over by `at + bound` (the engine's bound: the pause it planned plus its margin,
    /// [`PAUSE_MARGIN`] by default).
    pub fn paused(&self, at: Instant, bound: Duration) {
        // A bound too far ahead to represent never trips.
        lock(&self.shared.0).pause_deadline = at.checked_add(bound).map(|d| (d, bound));
        self.shared.1.notify_all();
    }

    /// Every Complete record is written: from now on only the destination's answer (or the
    /// acknowledgement timeout) decides. Returns `false` if the watchdog had already cut the
    /// connections (the records may still reach the destination: the outcome is unknown).
    pub fn handed_over(&self) -> bool {
        let mut s = lock(&self.shared.0);
        s.handed_over = true;
        s.tripped.is_none()
    }

    /// The engine ends the migration itself (it failed, or succeeded): the watchdog must not
    /// cut the connections any more, e.g. while the engine sends its error record.
    pub fn stand_down(&self) {
        lock(&self.shared.0).stood_down = true;
    }

    /// Why the connections were cut, if they were.
    pub fn tripped(&self) -> Option<Trip> {
        lock(&self.shared.0).tripped
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        lock(&self.shared.0).finished = true;
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(
    shared: &(Mutex<State>, Condvar),
    closers: &[Closer],
    cancel: &AtomicBool,
    deadline: Instant,
) {
    let (m, cv) = shared;
    let mut s = lock(m);
    loop {
        if s.finished {
            return;
        }
        let now = Instant::now();
        let reason = if cancel.load(Ordering::Relaxed) {
            Some(Trip::Cancelled)
        } else if now >= deadline {
            Some(Trip::Timeout)
        } else {
            None
        };
        if reason.is_some() && s.noticed.is_none() {
            s.noticed = Some(now);
        }
        let graced = s.noticed.is_some_and(|at| now >= at + GRACE);
        let trip = if s.handed_over || s.stood_down {
            None
        } else {
            match (reason, s.pause_deadline) {
                (Some(r), _) if graced => Some(r),
                (_, Some((at, bound))) if now >= at => Some(Trip::PauseTooLong(bound)),
                _ => None,
            }
        };
        if let Some(t) = trip {
            // Under the lock: `handed_over` cannot be set between the check and the cut.
            s.tripped = Some(t);
            tracing::warn!(reason = ?t, "migration watchdog: cutting the connections");
            closers.iter().for_each(Closer::shutdown);
            return;
        }
        let mut wait = POLL;
        if let Some((at, _)) = s.pause_deadline {
            wait = wait.min(at.saturating_duration_since(now));
        }
        s = cv
            .wait_timeout(s, wait.max(Duration::from_millis(1)))
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Connection;
    use std::io::{Read, Write};

    /// A connection whose peer never reads, and a writer thread blocked on it.
    fn blocked_writer() -> (Closer, Connection, JoinHandle<std::io::Result<()>>) {
        let (a, b) = Connection::pair().unwrap();
        let closer = a.closer();
        let mut writer = a.writer;
        let t = thread::spawn(move || {
            let chunk = vec![0u8; 1 << 16];
            loop {
                writer.write_all(&chunk)?;
            }
        });
        (closer, b, t)
    }

    /// A watchdog over `closer` with an hour's deadline, and its cancel flag.
    fn watch_for_an_hour(closer: Closer) -> (Watchdog, Arc<AtomicBool>) {
        let cancel = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + Duration::from_secs(3600);
        let w = Watchdog::start(vec![closer], cancel.clone(), deadline).unwrap();
        (w, cancel)
    }

    #[test]
    fn cancel_unblocks_a_writer_whose_peer_stopped_reading() {
        let (closer, _peer, t) = blocked_writer();
        let (w, cancel) = watch_for_an_hour(closer);
        thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "the writer blocks while nobody reads");
        let cancelled = Instant::now();
        cancel.store(true, Ordering::Relaxed);
        assert!(t.join().unwrap().is_err(), "the blocked write fails");
        assert!(
            cancelled.elapsed() >= GRACE,
            "the engine had its grace first"
        );
        assert_eq!(w.tripped(), Some(Trip::Cancelled));
        assert!(!w.handed_over(), "cut before the handover");
    }

    #[test]
    fn a_pause_longer_than_its_bound_cuts_the_connections() {
        let (closer, _peer, t) = blocked_writer();
        let (w, _) = watch_for_an_hour(closer);
        // Paused long ago: the bound has passed already.
        let bound = Duration::from_millis(300) + PAUSE_MARGIN;
        w.paused(Instant::now() - bound - Duration::from_secs(1), bound);
        assert!(t.join().unwrap().is_err());
        assert_eq!(w.tripped(), Some(Trip::PauseTooLong(bound)));
    }

    #[test]
    fn a_limit_too_far_ahead_to_represent_never_trips() {
        let (closer, _peer, t) = blocked_writer();
        let (w, cancel) = watch_for_an_hour(closer);
        w.paused(Instant::now(), Duration::MAX);
        thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished() && w.tripped().is_none());
        cancel.store(true, Ordering::Relaxed);
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn nothing_is_cut_once_the_engine_stood_down() {
        let (closer, _peer, t) = blocked_writer();
        let (w, cancel) = watch_for_an_hour(closer);
        cancel.store(true, Ordering::Relaxed);
        w.stand_down();
        thread::sleep(GRACE + Duration::from_millis(200));
        assert_eq!(w.tripped(), None);
        assert!(
            !t.is_finished(),
            "the writer is still blocked: nothing was cut"
        );
        drop(w);
        drop(_peer);
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn nothing_is_cut_after_the_handover_or_before_any_reason() {
        let (a, mut b) = Connection::pair().unwrap();
        let (w, cancel) = watch_for_an_hour(a.closer());
        w.paused(Instant::now(), Duration::from_millis(300));
        thread::sleep(Duration::from_millis(50));
        assert!(w.handed_over());
        // A cancel after the handover is too late: the destination may run the guest.
        cancel.store(true, Ordering::Relaxed);
        thread::sleep(Duration::from_millis(100));
        assert_eq!(w.tripped(), None);
        let mut writer = a.writer;
        writer.write_all(b"still open").unwrap();
        drop(w);
        let mut got = [0u8; 10];
        b.reader.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still open");
    }
}
