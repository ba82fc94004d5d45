//! `HB <n>` lines at a fixed interval, from a thread that a new interval replaces.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::output::emit;

#[derive(Default)]
pub struct Heartbeat {
    /// Last number printed; shared by successive threads so numbers never repeat.
    count: Arc<AtomicU64>,
    running: Option<(Sender<()>, JoinHandle<()>)>,
}

impl Heartbeat {
    /// Replaces the current heartbeat with one every `interval_ms` (0 = none).
    pub fn set_interval(&mut self, interval_ms: u64) {
        if let Some((stop, handle)) = self.running.take() {
            drop(stop);
            let _ = handle.join();
        }
        if interval_ms == 0 {
            return;
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let count = Arc::clone(&self.count);
        let interval = Duration::from_millis(interval_ms);
        let spawned = thread::Builder::new()
            .name("heartbeat".to_string())
            .spawn(move || {
                // Disconnection (the sender dropped) is the stop signal.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                    emit(format_args!("HB {n}"));
                }
            });
        match spawned {
            Ok(handle) => self.running = Some((stop, handle)),
            Err(e) => emit(format_args!("# heartbeat: cannot start a thread: {e}")),
        }
    }
}
