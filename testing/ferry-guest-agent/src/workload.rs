//! Memory workloads: `freed` runs in the foreground; `dirty`, `check` and `churn` run on
//! background threads until stopped. Background workloads of different kinds run side by side
//! (a soak test writes and checks pages while churning memory); at most one of each kind.

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

/// What a background workload has done so far; shared with its thread.
#[derive(Default)]
struct Progress {
    /// Pages written (dirty, check) or allocate/free cycles completed (churn).
    done: AtomicU64,
    /// check: pages whose content was not what the workload last wrote there.
    mismatches: AtomicU64,
    /// check: the first such page, or `u64::MAX`.
    first_mismatch: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Self {
            first_mismatch: AtomicU64::new(u64::MAX),
            ..Self::default()
        }
    }

    /// `kind=K pages=N` (or `cycles=N`), and for `check` the mismatches.
    fn describe(&self, kind: &str) -> String {
        let done = self.done.load(Ordering::Relaxed);
        match kind {
            "churn" => format!("kind=churn cycles={done}"),
            "check" => {
                let first = self.first_mismatch.load(Ordering::Relaxed);
                let first = if first == u64::MAX {
                    "-".to_string()
                } else {
                    first.to_string()
                };
                format!(
                    "kind=check pages={done} mismatches={} first={first}",
                    self.mismatches.load(Ordering::Relaxed)
                )
            }
            _ => format!("kind={kind} pages={done}"),
        }
    }
}

struct Background {
    kind: &'static str,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    handle: JoinHandle<Result<(), AllocError>>,
}

#[derive(Default)]
pub struct Workloads {
    /// In the order they were started.
    running: Vec<Background>,
}

impl Workloads {
    /// Starts writing `mib_per_s` MiB per second over a working set of `mib` MiB, page by page
    /// in a cycle, one 8-byte store per page (enough to dirty it).
    pub fn start_dirty(&mut self, mib: u64, mib_per_s: u64) -> Result<(), WorkloadError> {
        let set = mem::reserve::<u8>(mib)?;
        let pages_per_s = mib_per_s.saturating_mul(MIB / PAGE_SIZE as u64);
        self.start("dirty", move |stop, progress| {
            dirty(set, mib, pages_per_s, &stop, &progress.done)
        })
    }

    /// Starts rewriting `mib_per_s` MiB per second over a working set of `mib` MiB, page by
    /// page in a cycle; before each rewrite the whole page is checked against what was last
    /// written to it. A page the VMM lost (or restored from an older copy) during a migration
    /// is counted as a mismatch, whenever in the migration the write happened.
    pub fn start_check(&mut self, mib: u64, mib_per_s: u64) -> Result<(), WorkloadError> {
        let set = mem::reserve::<u64>(mib)?;
        let pages_per_s = mib_per_s.saturating_mul(MIB / PAGE_SIZE as u64);
        self.start("check", move |stop, progress| {
            check(set, mib, pages_per_s, &stop, &progress)
        })
    }

    /// Starts allocating `mib` MiB, touching every page and freeing it, in a loop.
    pub fn start_churn(&mut self, mib: u64) -> Result<(), WorkloadError> {
        // Fail now, not in the thread, if the size cannot be allocated at all.
        drop(mem::reserve::<u8>(mib)?);
        self.start("churn", move |stop, progress| {
            churn(&stop, &progress.done, CHURN_RETRY, |fill| {
                mem::filled(mib, fill)
            })
        })
    }

    fn start<F>(&mut self, kind: &'static str, work: F) -> Result<(), WorkloadError>
    where
        F: FnOnce(Arc<AtomicBool>, Arc<Progress>) -> Result<(), AllocError> + Send + 'static,
    {
        if self.running.iter().any(|b| b.kind == kind) {
            return Err(WorkloadError::Busy(kind));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::new());
        let (s, p) = (Arc::clone(&stop), Arc::clone(&progress));
        let handle = thread::Builder::new()
            .name(format!("workload-{kind}"))
            .spawn(move || work(s, p))
            .map_err(WorkloadError::Spawn)?;
        self.running.push(Background {
            kind,
            stop,
            progress,
            handle,
        });
        Ok(())
    }

    /// What every running background workload has done so far (`kind=none` if none runs),
    /// without stopping them; a workload whose thread ended with an error is reported as one.
    pub fn status(&self) -> Result<String, WorkloadError> {
        if let Some(dead) = self.running.iter().find(|b| b.handle.is_finished()) {
            return Err(WorkloadError::Died(dead.kind));
        }
        Ok(self.describe())
    }

    fn describe(&self) -> String {
        if self.running.is_empty() {
            return "kind=none".to_string();
        }
        let parts: Vec<String> = self
            .running
            .iter()
            .map(|b| b.progress.describe(b.kind))
            .collect();
        parts.join(" ")
    }

    /// Stops every background workload and describes what each did, in the order they were
    /// started (`kind=none` if none ran). All are stopped even when one of them failed.
    pub fn stop(&mut self) -> Result<String, WorkloadError> {
        if self.running.is_empty() {
            return Ok("kind=none".to_string());
        }
        for b in &self.running {
            b.stop.store(true, Ordering::Relaxed);
        }
        let mut failure = None;
        let mut parts = Vec::new();
        for b in self.running.drain(..) {
            let kind = b.kind;
            let outcome = match b.handle.join() {
                Ok(r) => r.map_err(|source| WorkloadError::Failed { kind, source }),
                Err(_) => Err(WorkloadError::Died(kind)),
            };
            if let Err(e) = outcome {
                failure.get_or_insert(e);
            }
            // Read after the thread ended: the numbers are final.
            parts.push(b.progress.describe(kind));
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(parts.join(" ")),
        }
    }
}

/// Calls `write(n)` for n = 0, 1, 2, ... at `pages_per_s` a second (catching up every
/// [`DIRTY_TICK`]) until `stop`, publishing the count in `done`.
fn paced(pages_per_s: u64, stop: &AtomicBool, done: &AtomicU64, mut write: impl FnMut(u64)) {
    let start = Instant::now();
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let due = (start.elapsed().as_secs_f64() * pages_per_s as f64) as u64;
        while n < due && !stop.load(Ordering::Relaxed) {
            write(n);
            n += 1;
            done.store(n, Ordering::Relaxed);
        }
        thread::sleep(DIRTY_TICK);
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
    paced(pages_per_s, stop, written, |n| {
        let at = (n % pages as u64) as usize * PAGE_SIZE;
        set[at..at + 8].copy_from_slice(&(n + 1).to_le_bytes());
    });
    Ok(())
}

/// The value of word `word` of page `page` after the page was written `writes` times; a page
/// never written is all zero. Every word differs from page to page and from write to write.
fn check_word(page: u64, writes: u64, word: u64) -> u64 {
    if writes == 0 {
        return 0;
    }
    ((writes << 32) | page) ^ word.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

const CHECK_WORDS: usize = PAGE_SIZE / 8;

fn check(
    mut set: Vec<u64>,
    mib: u64,
    pages_per_s: u64,
    stop: &AtomicBool,
    progress: &Progress,
) -> Result<(), AllocError> {
    set.resize(mem::elements_in::<u64>(mib)?, 0);
    paced(pages_per_s, stop, &progress.done, |n| {
        check_and_rewrite(&mut set, n, progress)
    });
    Ok(())
}

/// The `done`-th write of the check cycle over `set`: checks the page it falls on against
/// what the earlier writes left there (counting a mismatch in `progress`), then rewrites it.
fn check_and_rewrite(set: &mut [u64], done: u64, progress: &Progress) {
    let pages = (set.len() / CHECK_WORDS) as u64;
    let page = done % pages;
    // Writes so far to this page: the cycle visits each page once per `pages` writes.
    let writes = done / pages;
    let at = page as usize * CHECK_WORDS;
    let words = &mut set[at..at + CHECK_WORDS];
    let intact = words
        .iter()
        .zip(0u64..)
        .all(|(&v, w)| v == check_word(page, writes, w));
    if !intact {
        progress.mismatches.fetch_add(1, Ordering::Relaxed);
        let _ = progress.first_mismatch.compare_exchange(
            u64::MAX,
            page,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    for (v, w) in words.iter_mut().zip(0u64..) {
        *v = check_word(page, writes + 1, w);
    }
}

/// How long the churn waits before asking again when memory is short for a moment.
const CHURN_RETRY: Duration = Duration::from_millis(50);

/// Allocates (through `filled`, with a new fill byte each time), touches and frees memory in a
/// loop until `stop`, counting `cycles`.
fn churn(
    stop: &AtomicBool,
    cycles: &AtomicU64,
    retry: Duration,
    mut filled: impl FnMut(u8) -> Result<Vec<u8>, AllocError>,
) -> Result<(), AllocError> {
    let mut fill: u8 = 1;
    while !stop.load(Ordering::Relaxed) {
        let memory = match filled(fill) {
            Ok(memory) => memory,
            // MemAvailable dips for a while: a free page report in flight holds up to 64 MiB
            // off the free lists (Linux isolates the pages until the device answers), and a
            // hinting round takes every free page until the host is done. Churning is meant
            // to go on through both; a stall that lasts is the host's to see (no progress).
            Err(AllocError::Unavailable { .. }) => {
                std::thread::sleep(retry);
                continue;
            }
            Err(e) => return Err(e),
        };
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
            w.start_dirty(1, 4),
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
    fn churn_waits_out_a_memory_shortage_and_stops_on_a_real_error() {
        let (stop, cycles) = (AtomicBool::new(false), AtomicU64::new(0));
        let mut calls = 0;
        let result = churn(&stop, &cycles, Duration::ZERO, |fill| {
            calls += 1;
            match calls {
                // Short of memory twice (a report in flight), then fine, then gone for good.
                1 | 2 => Err(AllocError::Unavailable {
                    mib: 64,
                    available_mib: 62,
                }),
                3 | 4 => Ok(vec![fill; 8]),
                _ => Err(AllocError::OutOfMemory { mib: 64 }),
            }
        });
        assert!(
            matches!(result, Err(AllocError::OutOfMemory { .. })),
            "{result:?}"
        );
        assert_eq!(cycles.load(Ordering::Relaxed), 2);
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
    fn check_finds_no_mismatch_in_memory_nobody_else_touches() {
        let mut w = Workloads::default();
        // 1 MiB at 64 MiB/s: every page is rewritten (and so checked) many times over.
        w.start_check(1, 64).unwrap();
        w.start_churn(1).unwrap();
        thread::sleep(Duration::from_millis(300));
        let status = w.status().unwrap();
        assert!(status.starts_with("kind=check pages="), "{status}");
        assert!(status.contains(" kind=churn cycles="), "{status}");
        let summary = w.stop().unwrap();
        let pages: u64 = summary
            .split_whitespace()
            .find_map(|f| f.strip_prefix("pages="))
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(pages > 256, "{summary}");
        assert!(summary.contains("mismatches=0 first=-"), "{summary}");
    }

    #[test]
    fn check_counts_a_page_that_lost_a_write() {
        let progress = Progress::new();
        let mut set = vec![0u64; 2 * CHECK_WORDS];
        // Two full cycles over two pages: every check passes.
        for done in 0..4 {
            check_and_rewrite(&mut set, done, &progress);
        }
        assert_eq!(progress.mismatches.load(Ordering::Relaxed), 0);
        // Page 1 goes back to its content after its first write, as if a migration had sent
        // that copy and lost the second write: the next visit finds it.
        let old: Vec<u64> = (0..CHECK_WORDS as u64)
            .map(|w| check_word(1, 1, w))
            .collect();
        set[CHECK_WORDS..].copy_from_slice(&old);
        for done in 4..6 {
            check_and_rewrite(&mut set, done, &progress);
        }
        assert_eq!(progress.mismatches.load(Ordering::Relaxed), 1);
        assert_eq!(progress.first_mismatch.load(Ordering::Relaxed), 1);
        assert_eq!(
            progress.describe("check"),
            "kind=check pages=0 mismatches=1 first=1"
        );
        // A page that was zeroed (lost entirely) is found as well.
        set[..CHECK_WORDS].fill(0);
        check_and_rewrite(&mut set, 6, &progress);
        assert_eq!(progress.mismatches.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn impossible_sizes_are_errors() {
        assert!(freed(crate::command::MIB_MAX * 1024 * 1024).is_err());
        let mut w = Workloads::default();
        assert!(w.start_dirty(u64::MAX / 2, 1).is_err());
        assert_eq!(w.stop().unwrap(), "kind=none");
    }
}
