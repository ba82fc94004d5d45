//! A run/pause gate for device threads: while closed, threads that could change device state
//! or guest memory wait at [`Gate::wait_open`] and acknowledge that they are parked.
#![forbid(unsafe_code)]

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::bus::lock;

#[derive(Debug, Default)]
struct State {
    closed: bool,
    /// Threads currently parked at the gate.
    parked: usize,
}

/// The gate. Open when created.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<State>,
    changed: Condvar,
}

impl Gate {
    /// An open gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Closes the gate: threads stop at their next [`wait_open`](Self::wait_open).
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.notify_all();
    }

    /// Opens the gate and wakes every parked thread.
    pub fn open(&self) {
        lock(&self.state).closed = false;
        self.changed.notify_all();
    }

    /// Whether the gate is closed.
    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Blocks while the gate is closed. Device threads call this before touching state.
    pub fn wait_open(&self) {
        let mut s = lock(&self.state);
        if !s.closed {
            return;
        }
        s.parked += 1;
        self.changed.notify_all();
        while s.closed {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
    }

    /// Waits until `count` threads are parked, or `timeout` passes; returns whether they are.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let s = lock(&self.state);
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| s.parked < count)
            .unwrap_or_else(|p| p.into_inner());
        s.parked >= count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_closed_gate_parks_threads_until_opened() {
        let gate = Arc::new(Gate::new());
        let passed = Arc::new(AtomicUsize::new(0));
        gate.close();
        let t = {
            let (gate, passed) = (gate.clone(), passed.clone());
            std::thread::spawn(move || {
                gate.wait_open();
                passed.fetch_add(1, Ordering::SeqCst);
            })
        };
        assert!(gate.wait_parked(1, Duration::from_secs(5)));
        assert_eq!(passed.load(Ordering::SeqCst), 0);
        gate.open();
        t.join().unwrap();
        assert_eq!(passed.load(Ordering::SeqCst), 1);
    }
}
