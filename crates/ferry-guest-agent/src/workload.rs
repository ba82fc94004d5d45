//! Memory workloads: `freed` runs in the foreground; `dirty` and `churn` run on a background
//! thread until stopped. At most one background workload runs at a time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::mem::{self, AllocError, MIB, PAGE_SIZE};

/// How often the dirty workload catches up with its target rate.
const DIRTY_TICK: Duration = Duration::from_millis(10);

#[derive(Debug, Error)]
pub enum WorkloadError {
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error("a {0} workload is already running (send `workload stop` first)")]
    Busy(&'static str),
    #[error("the {kind} workload failed: {source}")]
    Failed {
        kind: &'static str,
        source: AllocError,
    },
    #[error("the {0} workload thread died")]
    Died(&'static str),
    #[error("cannot start a thread: {0}")]
    Spawn(std::io::Error),
}

/// Touches `mib` MiB with non-zero data, then frees it back to the kernel.
pub fn freed(mib: u64) -> Result<(), WorkloadError> {
    let memory = mem::filled(mib, 0xa5)?;
    drop(memory);
    Ok(())
}

struct Background {
    kind: &'static str,
    stop: Arc<AtomicBool>,
    /// Pages written (dirty) or allocate/free cycles completed (churn).
    progress: Arc<AtomicU64>,
    handle: JoinHandle<Result<(), AllocError>>,
}

#[derive(Default)]
pub struct Workloads {
    running: Option<Background>,
}

impl Workloads {
    /// Starts writing `mib_per_s` MiB per second over a working set of `mib` MiB, page by page
    /// in a cycle, one 8-byte store per page (enough to dirty it).
    pub fn start_dirty(&mut self, mib: u64, mib_per_s: u64) -> Result<(), WorkloadError> {
        let set = mem::reserve::<u8>(mib)?;
        let pages_per_s = mib_per_s.saturating_mul(MIB / PAGE_SIZE as u64);
        self.start("dirty", move |stop, progress| {
            dirty(set, mib, pages_per_s, &stop, &progress)
        })
    }

    /// Starts allocating `mib` MiB, touching every page and freeing it, in a loop.
    pub fn start_churn(&mut self, mib: u64) -> Result<(), WorkloadError> {
        // Fail now, not in the thread, if the size cannot be allocated at all.
        drop(mem::reserve::<u8>(mib)?);
        self.start("churn", move |stop, progress| churn(mib, &stop, &progress))
    }

    fn start<F>(&mut self, kind: &'static str, work: F) -> Result<(), WorkloadError>
    where
        F: FnOnce(Arc<AtomicBool>, Arc<AtomicU64>) -> Result<(), AllocError> + Send + 'static,
    {
        if let Some(running) = &self.running {
            return Err(WorkloadError::Busy(running.kind));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let (s, p) = (Arc::clone(&stop), Arc::clone(&progress));
        let handle = thread::Builder::new()
            .name(format!("workload-{kind}"))
            .spawn(move || work(s, p))
            .map_err(WorkloadError::Spawn)?;
        self.running = Some(Background {
            kind,
            stop,
            progress,
            handle,
        });
        Ok(())
    }

    /// Stops the background workload, if any, and describes what it did.
    pub fn stop(&mut self) -> Result<String, WorkloadError> {
        let Some(running) = self.running.take() else {
            return Ok("kind=none".to_string());
        };
        running.stop.store(true, Ordering::Relaxed);
        let kind = running.kind;
        let outcome = running
            .handle
            .join()
            .map_err(|_| WorkloadError::Died(kind))?;
        outcome.map_err(|source| WorkloadError::Failed { kind, source })?;
        let unit = if kind == "dirty" { "pages" } else { "cycles" };
        Ok(format!(
            "kind={kind} {unit}={}",
            running.progress.load(Ordering::Relaxed)
        ))
    }
}

fn dirty(
    mut set: Vec<u8>,
    mib: u64,
    pages_per_s: u64,
    stop: &AtomicBool,
    written: &AtomicU64,
) -> Result<(), AllocError> {
    // Untouched zero pages: the first pass faults them in, later passes only dirty them.
    set.resize(mem::elements_in::<u8>(mib)?, 0);
    let pages = set.len() / PAGE_SIZE;
    let start = Instant::now();
    let mut done: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let due = (start.elapsed().as_secs_f64() * pages_per_s as f64) as u64;
        while done < due && !stop.load(Ordering::Relaxed) {
            let page = (done % pages as u64) as usize;
            let at = page * PAGE_SIZE;
            set[at..at + 8].copy_from_slice(&(done + 1).to_le_bytes());
            done += 1;
            written.store(done, Ordering::Relaxed);
        }
        thread::sleep(DIRTY_TICK);
    }
    Ok(())
}

fn churn(mib: u64, stop: &AtomicBool, cycles: &AtomicU64) -> Result<(), AllocError> {
    let mut fill: u8 = 1;
    while !stop.load(Ordering::Relaxed) {
        let memory = mem::filled(mib, fill)?;
        drop(memory);
        fill = fill.wrapping_add(1).max(1);
        cycles.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_writes_at_roughly_the_asked_rate_and_stops() {
        let mut w = Workloads::default();
        let started = std::time::Instant::now();
        w.start_dirty(1, 4).unwrap();
        assert!(matches!(
            w.start_churn(1),
            Err(WorkloadError::Busy("dirty"))
        ));
        thread::sleep(Duration::from_millis(300));
        let summary = w.stop().unwrap();
        let elapsed = started.elapsed();
        let pages: u64 = summary
            .strip_prefix("kind=dirty pages=")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected summary {summary:?}"));
        // 4 MiB/s is 1024 pages/s. The writer keeps to that schedule, so it never writes more
        // than the schedule allows for the time it actually ran (however loaded the machine
        // is), plus one batch; and in 300 ms it writes something.
        let schedule = (elapsed.as_secs_f64() * 1024.0) as u64 + 64;
        assert!(
            pages > 0 && pages <= schedule,
            "{pages} pages in {elapsed:?}"
        );
        assert_eq!(w.stop().unwrap(), "kind=none");
    }

    #[test]
    fn churn_cycles_until_stopped() {
        let mut w = Workloads::default();
        w.start_churn(1).unwrap();
        thread::sleep(Duration::from_millis(100));
        let summary = w.stop().unwrap();
        assert!(summary.starts_with("kind=churn cycles="), "{summary}");
        assert_ne!(summary, "kind=churn cycles=0");
    }

    #[test]
    fn impossible_sizes_are_errors() {
        assert!(freed(crate::command::MIB_MAX * 1024 * 1024).is_err());
        let mut w = Workloads::default();
        assert!(w.start_dirty(u64::MAX / 2, 1).is_err());
        assert_eq!(w.stop().unwrap(), "kind=none");
    }
}
