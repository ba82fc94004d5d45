//! A hint source for host memory that was never populated (or was discarded): holes in the
//! file backing guest RAM, found with `lseek(SEEK_HOLE/SEEK_DATA)` on the memfd.
//!
//! A hole reads as zero, so its pages need not be read; where the destination starts zeroed
//! they need not be sent at all ([`HintKind::Zero`]). The scan runs on its own thread after
//! each epoch begins (after the dirty sync), so a page written after the sync is dirty in the
//! next sync whatever the scan saw. Regions without a backing file yield no hints.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread;

use rustix::fs::SeekFrom;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::hint::{Epoch, HintKind, HintSink, HintSource, Outcome, RANGES_PER_MESSAGE_MAX};
use crate::layout::GuestRange;

/// No epoch is being scanned (the value never names a real epoch).
const NO_EPOCH: u64 = u64::MAX;

/// One file-backed RAM region.
#[derive(Debug, Clone)]
struct Backing {
    gpa: u64,
    size: u64,
    file: Arc<File>,
    offset: u64,
}

/// Reports holes in the memfd backing guest RAM as known-zero pages.
#[derive(Debug)]
pub struct UnpopulatedSource {
    regions: Vec<Backing>,
    tx: Option<SyncSender<Epoch>>,
    /// The epoch the worker may report for; changed by `epoch_end` to stop a scan early.
    current: Arc<AtomicU64>,
}

impl UnpopulatedSource {
    /// A source over the file-backed regions of `mem`.
    pub fn new<M: GuestMemoryBackend>(mem: &M) -> Self {
        let regions = mem
            .iter()
            .filter_map(|r| {
                let fo = r.file_offset()?;
                Some(Backing {
                    gpa: r.start_addr().0,
                    size: r.len(),
                    file: fo.arc().clone(),
                    offset: fo.start(),
                })
            })
            .collect();
        Self {
            regions,
            tx: None,
            current: Arc::new(AtomicU64::new(NO_EPOCH)),
        }
    }

    /// Number of file-backed regions the source scans.
    pub fn regions(&self) -> usize {
        self.regions.len()
    }
}

/// Finds the holes of `b` and delivers them for `epoch`, stopping early if the epoch ends.
fn scan(b: &Backing, epoch: Epoch, current: &AtomicU64, sink: &HintSink) {
    let end = b.offset + b.size;
    let mut off = b.offset;
    let mut ranges = Vec::new();
    while off < end && current.load(Ordering::Relaxed) == epoch.0 {
        let hole = match rustix::fs::seek(&b.file, SeekFrom::Hole(off)) {
            Ok(h) if h < end => h,
            Ok(_) => break,
            Err(e) => {
                tracing::debug!(error = %e, "SEEK_HOLE failed; no unpopulated hints");
                break;
            }
        };
        let data = match rustix::fs::seek(&b.file, SeekFrom::Data(hole)) {
            Ok(d) => d.min(end),
            Err(rustix::io::Errno::NXIO) => end,
            Err(e) => {
                tracing::debug!(error = %e, "SEEK_DATA failed");
                break;
            }
        };
        ranges.push(GuestRange::new(b.gpa + (hole - b.offset), data - hole));
        if ranges.len() == RANGES_PER_MESSAGE_MAX {
            sink.hint(epoch, &ranges);
            ranges.clear();
        }
        off = data;
    }
    if !ranges.is_empty() {
        sink.hint(epoch, &ranges);
    }
}

impl HintSource for UnpopulatedSource {
    fn name(&self) -> &str {
        "unpopulated"
    }

    fn kind(&self) -> HintKind {
        HintKind::Zero
    }

    fn start(&mut self, sink: HintSink) {
        // One pending request at most: if the worker is still scanning, a new epoch's
        // request waits for it or is skipped, never blocking the engine.
        let (tx, rx) = sync_channel::<Epoch>(1);
        let regions = self.regions.clone();
        let current = self.current.clone();
        let spawned = thread::Builder::new()
            .name("ferry-unpopulated".into())
            .spawn(move || {
                for epoch in rx {
                    for b in &regions {
                        scan(b, epoch, &current, &sink);
                    }
                    sink.epoch_complete(epoch);
                }
            });
        match spawned {
            Ok(_) => self.tx = Some(tx),
            Err(e) => tracing::warn!(error = %e, "cannot start the unpopulated-memory scanner"),
        }
    }

    fn epoch_begin(&mut self, epoch: Epoch) {
        self.current.store(epoch.0, Ordering::Relaxed);
        if let Some(tx) = &self.tx {
            if let Err(TrySendError::Full(_)) = tx.try_send(epoch) {
                tracing::debug!(epoch = epoch.0, "scanner busy; skipping this epoch");
            }
        }
    }

    fn epoch_end(&mut self, _epoch: Epoch) {
        self.current.store(NO_EPOCH, Ordering::Relaxed);
    }

    fn finish(&mut self, _outcome: Outcome) {
        self.current.store(NO_EPOCH, Ordering::Relaxed);
        // Dropping the sender ends the worker after its current scan.
        self.tx = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::PageBitmap;
    use crate::hint::{HintInbox, HintTargets};
    use crate::layout::{MemoryLayout, PAGE_SIZE};
    use std::time::{Duration, Instant};
    use vm_memory::{
        Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
    };

    #[test]
    fn reports_holes_of_a_memfd() {
        let fd = rustix::fs::memfd_create("ferry-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let file = File::from(fd);
        file.set_len(64 * PAGE_SIZE).unwrap();
        let region =
            MmapRegion::<()>::from_file(FileOffset::new(file, 0), 64 * PAGE_SIZE as usize).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(
            region,
            GuestAddress(0x10_0000),
        )
        .unwrap()])
        .unwrap();
        // Populate pages 3 and 10..12.
        mem.write_obj(1u8, GuestAddress(0x10_0000 + 3 * PAGE_SIZE))
            .unwrap();
        mem.write_slice(&[7u8; 8192], GuestAddress(0x10_0000 + 10 * PAGE_SIZE))
            .unwrap();

        let layout = MemoryLayout::from_guest_memory(&mem).unwrap();
        let mut src = UnpopulatedSource::new(&mem);
        assert_eq!(src.regions(), 1);
        let mut inbox = HintInbox::new();
        src.start(inbox.register(src.name(), src.kind()));
        let (mut to_send, dest, mut kz) = (
            PageBitmap::full(64),
            PageBitmap::new(64),
            PageBitmap::new(64),
        );
        inbox.open(Epoch(0));
        src.epoch_begin(Epoch(0));
        let t = Instant::now();
        while !inbox.all_complete() && t.elapsed() < Duration::from_secs(10) {
            let mut targets = HintTargets {
                to_send: &mut to_send,
                dest_nonzero: &dest,
                known_zero: &mut kz,
                audit: None,
            };
            inbox.drain(&layout, &mut targets, 100);
            thread::sleep(Duration::from_millis(1));
        }
        let left: Vec<u64> = (0..64).filter(|&i| to_send.get(i)).collect();
        assert_eq!(left, vec![3, 10, 11], "only populated pages stay queued");
        src.finish(Outcome::Switchover);
    }
}
