//! Per-connection sending lanes: record building on the migration thread, socket writes on a
//! writer thread per connection.
//!
//! Pages are assigned to connections by 2 MiB chunk (`page_index / 512 % connections`), so all
//! records about one page travel on one connection and arrive in the order they were sent;
//! the destination can apply connections independently.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crate::compress::{Compression, PageCompressor};
use crate::transport::RateLimiter;
use crate::wire::{Encoder, Summary, PAGES_PER_RECORD_MAX, ZERO_RUNS_PER_RECORD_MAX};

/// Pages per lane-assignment chunk.
pub const CHUNK_PAGES: u64 = 512;
/// Buffered bytes that make a lane hand its buffer to the writer thread.
const FLUSH_BYTES: usize = 1 << 20;
/// Capacity of a fresh buffer: one full `Pages` record and some zero runs.
const RECORD_BYTES: usize = PAGES_PER_RECORD_MAX * (crate::PAGE_SIZE as usize + 8) + (64 << 10);
/// Buffers in flight per lane (bounds memory and keeps the writer busy).
const BUFFERS_IN_FLIGHT: usize = 4;
/// Buffers a lane owns in all: those in flight, the one being filled and a spare.
const BUFFERS: usize = BUFFERS_IN_FLIGHT + 2;

/// A lane's writer failed; the connection is unusable.
#[derive(Debug, thiserror::Error)]
#[error("writing to connection {lane} failed: {source}")]
pub struct LaneError {
    /// Connection index.
    pub lane: usize,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// One connection's outgoing side.
pub struct Lane {
    index: usize,
    enc: Encoder,
    /// Start offset of the open `Pages` record in `enc`, if any.
    pages_at: Option<usize>,
    zero_runs: Vec<(u64, u64)>,
    /// What has been sent so far, reported in `Complete`.
    pub summary: Summary,
    tx: Option<SyncSender<Vec<u8>>>,
    pool: Receiver<Vec<u8>>,
    /// Buffers created so far (at most [`BUFFERS`]).
    buffers: usize,
    /// Bytes handed to the writer thread and not yet written to the connection.
    queued: Arc<AtomicU64>,
    /// Bytes written to the connection (after compression).
    wire: Arc<AtomicU64>,
    writer: Option<JoinHandle<Result<(), std::io::Error>>>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Lane {
    /// Starts the writer thread for connection `index`, which compresses page data as
    /// `compression` says.
    pub fn spawn(
        index: usize,
        mut w: Box<dyn Write + Send>,
        compression: Compression,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<Vec<u8>>(BUFFERS_IN_FLIGHT);
        let (pool_tx, pool) = sync_channel::<Vec<u8>>(BUFFERS);
        let queued = Arc::new(AtomicU64::new(0));
        let written = queued.clone();
        let wire = Arc::new(AtomicU64::new(0));
        let on_wire = wire.clone();
        let mut compressor = match compression {
            Compression::None => None,
            Compression::Zstd { level } => Some(PageCompressor::new(level)?),
        };
        let writer = thread::Builder::new()
            .name(format!("ferry-tx-{index}"))
            .spawn(move || {
                for buf in rx {
                    let out = match compressor.as_mut() {
                        Some(c) => c.compress(&buf)?,
                        None => &buf[..],
                    };
                    w.write_all(out)?;
                    on_wire.fetch_add(out.len() as u64, Ordering::Relaxed);
                    // Saturating: the failure path's error record is not counted.
                    let n = buf.len() as u64;
                    let _ = written.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                        Some(q.saturating_sub(n))
                    });
                    let _ = pool_tx.try_send(buf);
                }
                w.flush()
            })?;
        Ok(Self {
            index,
            enc: Encoder::new(),
            pages_at: None,
            zero_runs: Vec::new(),
            summary: Summary::default(),
            tx: Some(tx),
            pool,
            buffers: 1,
            queued,
            wire,
            writer: Some(writer),
        })
    }

    /// Bytes handed to the writer and not yet accepted by the connection (a slow receiver
    /// keeps them here).
    pub fn queued_bytes(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Bytes written to the connection so far (after compression).
    pub fn wire_bytes(&self) -> u64 {
        self.wire.load(Ordering::Relaxed)
    }

    /// The writer's error, if it stopped while it should be running (it stops on its own
    /// only when a write fails).
    pub fn check_writer(&mut self) -> Result<(), LaneError> {
        if self.tx.is_some() && self.writer.as_ref().is_some_and(JoinHandle::is_finished) {
            return Err(self.writer_stopped());
        }
        Ok(())
    }

    /// The error of a writer that stopped on its own: its own error (a failed write), or a
    /// broken pipe if it had none.
    fn writer_stopped(&mut self) -> LaneError {
        self.tx = None;
        match self.join() {
            Err(e) => e,
            Ok(()) => LaneError {
                lane: self.index,
                source: std::io::Error::new(std::io::ErrorKind::BrokenPipe, "writer stopped"),
            },
        }
    }

    /// Room for one page at `gpa`, to be filled by the caller; call [`Lane::keep_page`]
    /// afterwards (zero pages are found in guest memory before, and never take a slot).
    pub fn page_slot(&mut self, gpa: u64) -> &mut [u8] {
        if self.pages_at.is_none() {
            self.pages_at = Some(self.enc.begin_pages());
        }
        self.enc.page_slot(gpa)
    }

    /// Keeps the page just filled. Returns bytes handed to the writer, if a flush happened.
    pub fn keep_page(&mut self, limiter: Option<&mut RateLimiter>) -> Result<u64, LaneError> {
        self.summary.pages += 1;
        if self.enc.pages_in_record() >= PAGES_PER_RECORD_MAX {
            self.close_pages();
            if self.enc.bytes().len() >= FLUSH_BYTES {
                return self.flush(limiter);
            }
        }
        Ok(0)
    }

    /// Queues page `gpa` to be zeroed at the destination, coalescing with the previous run.
    /// Returns bytes handed to the writer, if a flush happened.
    pub fn zero_page(
        &mut self,
        gpa: u64,
        limiter: Option<&mut RateLimiter>,
    ) -> Result<u64, LaneError> {
        self.summary.zero_pages += 1;
        if let Some((start, n)) = self.zero_runs.last_mut() {
            if *start + *n * crate::PAGE_SIZE == gpa {
                *n += 1;
                return Ok(0);
            }
        }
        let mut flushed = 0;
        if self.zero_runs.len() == ZERO_RUNS_PER_RECORD_MAX {
            self.close_zero_runs();
            if self.enc.bytes().len() >= FLUSH_BYTES {
                flushed = self.flush(limiter)?;
            }
        }
        self.zero_runs.push((gpa, 1));
        Ok(flushed)
    }

    fn close_pages(&mut self) {
        if let Some(at) = self.pages_at.take() {
            if self.enc.pages_in_record() > 0 {
                self.summary.page_records += 1;
            }
            self.enc.finish_pages(at);
        }
    }

    fn close_zero_runs(&mut self) {
        if !self.zero_runs.is_empty() {
            // Zero runs may refer to pages an earlier record of this round carried; both
            // are in the same stream, so order is preserved.
            self.close_pages();
            self.enc.zero_runs(&self.zero_runs);
            self.zero_runs.clear();
        }
    }

    /// Ends round `round` on this connection and hands everything to the writer.
    pub fn end_round(
        &mut self,
        round: u32,
        limiter: Option<&mut RateLimiter>,
    ) -> Result<u64, LaneError> {
        self.close_pages();
        self.close_zero_runs();
        self.enc.end_of_round(round);
        self.summary.rounds += 1;
        self.flush(limiter)
    }

    /// Sends the device state (lane 0 only, in the final round).
    pub fn device_state(&mut self, state: &[u8]) {
        self.close_pages();
        self.close_zero_runs();
        self.enc.device_state(state);
    }

    /// Sends `Complete` with this lane's totals, flushes, and waits for the writer to finish.
    pub fn complete(&mut self) -> Result<u64, LaneError> {
        self.close_pages();
        self.close_zero_runs();
        self.enc.complete(self.summary);
        let n = self.flush(None)?;
        self.tx = None;
        self.join()?;
        Ok(n)
    }

    /// A buffer to encode into: one the writer returned, a new one while fewer than
    /// [`BUFFERS`] exist, else the next one the writer returns. Reusing a small fixed set keeps
    /// the send path free of allocation and of page faults on fresh memory.
    fn next_buffer(&mut self) -> Vec<u8> {
        if let Ok(b) = self.pool.try_recv() {
            return b;
        }
        if self.buffers < BUFFERS {
            self.buffers += 1;
            return Vec::with_capacity(RECORD_BYTES);
        }
        // The writer is gone if this fails; the send that follows reports its error.
        self.pool.recv().unwrap_or_default()
    }

    /// Hands the encoded bytes to the writer thread; returns how many.
    fn flush(&mut self, limiter: Option<&mut RateLimiter>) -> Result<u64, LaneError> {
        // Close an open record so the buffer ends at a record boundary.
        self.close_pages();
        if self.enc.bytes().is_empty() {
            return Ok(0);
        }
        let next = self.next_buffer();
        let buf = self.enc.take_into(next);
        let n = buf.len() as u64;
        if let Some(l) = limiter {
            l.consume(n);
        }
        self.queued.fetch_add(n, Ordering::Relaxed);
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(buf).is_ok());
        if !sent {
            // The writer exited: its error says why.
            return Err(self.writer_stopped());
        }
        Ok(n)
    }

    fn join(&mut self) -> Result<(), LaneError> {
        match self.writer.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(source))) => Err(LaneError {
                lane: self.index,
                source,
            }),
            Some(Err(_)) => Err(LaneError {
                lane: self.index,
                source: std::io::Error::other("writer thread panicked"),
            }),
        }
    }

    /// Failure path, best effort: queues an `Error` record without blocking, lets the writer
    /// drain for at most `wait`, and reports whether it finished (otherwise the caller must
    /// shut the connection down to unblock it).
    pub fn send_error(&mut self, msg: &str, wait: std::time::Duration) -> bool {
        let mut enc = Encoder::new();
        enc.error(msg);
        if let Some(tx) = self.tx.take() {
            let _ = tx.try_send(enc.take());
        }
        let deadline = std::time::Instant::now() + wait;
        while self.writer.as_ref().is_some_and(|w| !w.is_finished()) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    /// Stops the writer without sending anything more (failure path).
    pub fn abort(&mut self) {
        self.tx = None;
        let _ = self.join();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Sender};
    use std::time::{Duration, Instant};

    use super::*;

    /// A connection that takes each write only when the test says so, or fails it.
    struct Gate(Receiver<bool>);

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            match self.0.recv() {
                Ok(true) => Ok(buf.len()),
                _ => Err(std::io::Error::other("the connection broke")),
            }
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lane() -> (Lane, Sender<bool>) {
        let (open, gate) = channel();
        (
            Lane::spawn(0, Box::new(Gate(gate)), Compression::None).unwrap(),
            open,
        )
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn queued_bytes_count_what_the_connection_has_not_taken() {
        let (mut lane, open) = lane();
        assert_eq!(lane.queued_bytes(), 0);
        lane.page_slot(0x1000).fill(1);
        lane.keep_page(None).unwrap();
        let n = lane.end_round(0, None).unwrap();
        assert!(n > 4096);
        // The writer holds the buffer until the connection takes it.
        assert_eq!(lane.queued_bytes(), n);
        lane.check_writer().unwrap();
        open.send(true).unwrap();
        wait_until("the written bytes were never uncounted", || {
            lane.queued_bytes() == 0
        });
        lane.check_writer().unwrap();
    }

    #[test]
    fn a_writer_that_failed_is_reported_not_waited_for() {
        let (mut lane, open) = lane();
        lane.page_slot(0x1000).fill(1);
        lane.keep_page(None).unwrap();
        lane.end_round(0, None).unwrap();
        open.send(false).unwrap();
        wait_until("the writer did not stop", || {
            lane.writer.as_ref().is_some_and(JoinHandle::is_finished)
        });
        // What it held is still counted: only the writer's error says it will never go.
        assert!(lane.queued_bytes() > 0);
        let e = lane.check_writer().unwrap_err();
        assert!(e.to_string().contains("the connection broke"), "{e}");
    }
}
