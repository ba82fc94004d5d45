//! The destination side: receives guest RAM into its own memory, validates everything, and
//! refuses to report success for an incomplete or corrupt stream.
//!
//! Each connection is applied by its own thread; the source assigns pages to connections by
//! chunk, so the order of writes to any one page is the order the source sent them. The
//! result, [`Received`], carries the device state; the VMM restores it and only then calls
//! [`Received::acknowledge`], which lets the source stop its VM for good.

use std::io::Write;
use std::os::unix::fs::FileExt;

use rustix::fs::FallocateFlags;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::compress::Codec;
use crate::lane::CHUNK_PAGES;
use crate::layout::{GuestRange, LayoutError, MemoryLayout, RegionDesc, PAGE_SIZE};
use crate::transport::{Closer, Connection, Listener, CONNECTIONS_MAX};
use crate::wire::{
    self, Ack, Decoder, Encoder, Hello, HelloReply, Record, Summary, WireError, MAGIC_DEST,
    MAGIC_SOURCE,
};

const PAGE: usize = PAGE_SIZE as usize;
const ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Why receiving failed. The destination's memory must then be discarded.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// Local memory cannot be described.
    #[error("guest memory layout: {0}")]
    Layout(#[from] LayoutError),
    /// The stream failed.
    #[error("migration stream on connection {connection}: {source}")]
    Wire {
        /// Connection index.
        connection: usize,
        /// Cause.
        #[source]
        source: WireError,
    },
    /// The source sent something the protocol does not allow.
    #[error("connection {connection}: {reason}")]
    Protocol {
        /// Connection index.
        connection: usize,
        /// What was wrong.
        reason: String,
    },
    /// The source reported a failure.
    #[error("the source reported: {0}")]
    Source(String),
    /// A connection carried nothing for too long.
    #[error("connection {connection} was idle for {timeout:?}: the source stalled or the network is down")]
    Idle {
        /// Connection index.
        connection: usize,
        /// The idle timeout.
        timeout: Duration,
    },
    /// Accepting connections failed or timed out.
    #[error("accepting connections: {0}")]
    Accept(String),
    /// Writing guest memory through its backing file failed.
    #[error("writing guest memory at {gpa:#x} through its file: {source}")]
    File {
        /// Address.
        gpa: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing guest memory failed.
    #[error("writing guest memory at {gpa:#x}: {source}")]
    Memory {
        /// Address.
        gpa: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// What the destination received.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReceiveStats {
    /// Pages written with data.
    pub pages: u64,
    /// Pages zeroed.
    pub zero_pages: u64,
    /// Rounds seen (per connection, they must agree).
    pub rounds: u64,
    /// Time from the first connection to completion, milliseconds.
    pub duration_ms: f64,
}

/// A complete, validated migration stream, applied to guest memory.
#[derive(Debug)]
pub struct Received {
    /// The source VMM's state blob, to be restored by the caller.
    pub device_state: Vec<u8>,
    /// Totals.
    pub stats: ReceiveStats,
    reply: Connection,
    summary: Summary,
    /// When the last record arrived: the acknowledgement tells the source how long the
    /// destination took from there.
    completed: Instant,
}

impl Received {
    /// Tells the source that everything arrived and the VM was restored here; the source
    /// may then stop its copy. Call it only once the VM can run here.
    pub fn acknowledge(mut self) -> Result<(), WireError> {
        let mut enc = Encoder::new();
        enc.ack(Ack {
            summary: self.summary,
            destination_us: u64::try_from(self.completed.elapsed().as_micros()).unwrap_or(u64::MAX),
        });
        self.reply.writer.write_all(enc.bytes())?;
        self.reply.writer.flush()?;
        Ok(())
    }

    /// Tells the source the migration failed here after all (e.g. the state did not
    /// restore); the source then resumes its VM.
    pub fn reject(mut self, reason: &str) {
        let mut enc = Encoder::new();
        enc.error(reason);
        let _ = self.reply.writer.write_all(enc.bytes());
    }
}

/// Receiving settings.
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    /// Whether local guest RAM is all zero (a fresh VM), so the source need not send zeros.
    pub zeroed: bool,
    /// How long to wait for all connections of a migration after the first.
    pub accept_timeout: Duration,
    /// A connection silent for this long fails the migration.
    pub idle_timeout: Duration,
    /// Write received pages through the file behind each memory region (`pwrite`) instead
    /// of through its mapping, and discard zeroed ranges from the file (`fallocate` punching
    /// a hole), wherever a region has a file. Only correct when every file-backed region is
    /// mapped shared (`MAP_SHARED`, as a memfd for guest RAM is), so that the mapping sees
    /// what the file holds.
    ///
    /// Why: into fresh memory, a copy through the mapping takes a page fault per page and the
    /// kernel clears each page before the copy overwrites it; a write to the file allocates
    /// and fills the pages in one pass inside the kernel. `ferry bench` shows the difference.
    pub write_through_file: bool,
    /// Accept the compression a source offers (see [`crate::compress`]); `false` declines
    /// it (saving this host's CPU), and the source sends pages uncompressed.
    pub accept_compression: bool,
}

impl Default for ReceiveConfig {
    fn default() -> Self {
        Self {
            zeroed: true,
            accept_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            write_through_file: false,
            accept_compression: true,
        }
    }
}

/// A migration whose connections have all arrived and announced themselves ([`Hello`]), not
/// yet answered. It tells what the source will send (its memory layout and its VM
/// description) so that the caller can build the memory to receive into, then hands it to
/// [`Destination::receive_incoming`], or [`refuse`](Self::refuse)s it.
///
/// Two phases, as in Cloud Hypervisor's receive path (its source sends the VM's configuration
/// before any memory and the destination creates the VM from it), so that a destination needs
/// no VM settings of its own.
#[derive(Debug)]
pub struct Incoming {
    conns: Vec<Greeted>,
    closers: Vec<Closer>,
    started: Instant,
}

/// A connection whose Hello has been read.
/// Tells the source (`RoundApplied` on connection 0) when a round is in guest memory on
/// every connection. The source pauses the guest only once everything it sent before the
/// switchover is applied here, so that no backlog of earlier rounds (in socket buffers, or
/// behind a destination slower than the source) is left for the downtime.
struct RoundBarrier {
    /// Rounds each connection has applied.
    applied: Vec<AtomicU64>,
    /// Rounds reported so far, and connection 0's sending half.
    reply: Mutex<(u64, Box<dyn Write + Send>)>,
}

impl RoundBarrier {
    fn new(connections: usize, reply: Box<dyn Write + Send>) -> Self {
        Self {
            applied: (0..connections).map(|_| AtomicU64::new(0)).collect(),
            reply: Mutex::new((0, reply)),
        }
    }

    /// Connection `i` has applied `rounds` rounds: reports every round now applied on all.
    fn round_done(&self, i: usize, rounds: u64) -> Result<(), ReceiveError> {
        self.applied[i].store(rounds, Ordering::SeqCst);
        let all = self
            .applied
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .min()
            .unwrap_or(0);
        let mut reply = self.reply.lock().unwrap_or_else(|p| p.into_inner());
        let (reported, writer) = &mut *reply;
        if *reported >= all {
            return Ok(());
        }
        let mut enc = Encoder::new();
        while *reported < all {
            // Round numbers fit in u32 on the wire (the decoder checked them).
            enc.round_applied(*reported as u32);
            *reported += 1;
        }
        writer
            .write_all(enc.bytes())
            .and_then(|()| writer.flush())
            .map_err(|e| ReceiveError::Wire {
                connection: 0,
                source: e.into(),
            })
    }

    fn into_writer(self) -> Box<dyn Write + Send> {
        self.reply.into_inner().unwrap_or_else(|p| p.into_inner()).1
    }
}

struct Greeted {
    conn: Connection,
    hello: Hello,
}

impl std::fmt::Debug for Greeted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Greeted")
            .field("hello", &self.hello)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// Accepts one migration's connections on `listener` (waiting as long as it takes for
    /// the first, then at most `config.accept_timeout` for the others) and reads their Hellos.
    pub fn accept(listener: &Listener, config: &ReceiveConfig) -> Result<Self, ReceiveError> {
        let accept_err = |e: std::io::Error| ReceiveError::Accept(e.to_string());
        let first = greet(0, listener.accept().map_err(accept_err)?, config)?;
        let started = Instant::now();
        let n = usize::from(first.hello.connections);
        if n == 0 || n > usize::from(CONNECTIONS_MAX) {
            // Before waiting for more: a peer must not make this end hold many connections.
            return Self::checked(vec![first], started);
        }
        let mut conns = vec![first];
        let deadline = started + config.accept_timeout;
        while conns.len() < n {
            let conn = listener.accept_until(deadline).map_err(accept_err)?;
            conns.push(greet(conns.len(), conn, config)?);
        }
        Self::checked(conns, started)
    }

    /// Reads the Hellos of a migration's already-connected `connections` (any order).
    pub fn from_connections(
        connections: Vec<Connection>,
        config: &ReceiveConfig,
    ) -> Result<Self, ReceiveError> {
        let started = Instant::now();
        let conns = connections
            .into_iter()
            .enumerate()
            .map(|(i, c)| greet(i, c, config))
            .collect::<Result<Vec<_>, _>>()?;
        Self::checked(conns, started)
    }

    /// Checks that the Hellos agree with each other, puts the connections in order; on a
    /// mismatch tells the source why and closes everything.
    fn checked(conns: Vec<Greeted>, started: Instant) -> Result<Self, ReceiveError> {
        let mut incoming = Self {
            closers: conns.iter().map(|g| g.conn.closer()).collect(),
            conns,
            started,
        };
        match check_hellos(&mut incoming.conns) {
            Ok(()) => Ok(incoming),
            Err(e) => {
                incoming.fail(&e);
                Err(e)
            }
        }
    }

    /// The source's guest RAM layout: the memory to receive into must have exactly these
    /// regions.
    pub fn regions(&self) -> &[RegionDesc] {
        &self.conns[0].hello.regions
    }

    /// The source VMM's description of its VM ([`Hello::description`]); empty if it sent
    /// none.
    pub fn description(&self) -> &[u8] {
        &self.conns[0].hello.description
    }

    /// Refuses the migration: the source is told `reason` (its VM keeps running there) and
    /// every connection is closed.
    pub fn refuse(mut self, reason: &str) {
        tracing::warn!("refusing the incoming migration: {reason}");
        self.fail(&reason);
    }

    /// Tells the source `reason` on connection 0 and shuts every connection down.
    fn fail(&mut self, reason: &dyn std::fmt::Display) {
        if let Some(g) = self.conns.first_mut() {
            let mut enc = Encoder::new();
            enc.error(&reason.to_string());
            let _ = g.conn.writer.write_all(enc.bytes());
        }
        self.closers.iter().for_each(Closer::shutdown);
    }
}

/// Reads the preamble and Hello of a new connection.
fn greet(i: usize, mut conn: Connection, config: &ReceiveConfig) -> Result<Greeted, ReceiveError> {
    let wire_err = |source| ReceiveError::Wire {
        connection: i,
        source,
    };
    conn.set_read_timeout(Some(config.idle_timeout))
        .map_err(|e| wire_err(WireError::Io(e)))?;
    wire::read_preamble(&mut conn.reader, MAGIC_SOURCE).map_err(wire_err)?;
    let hello = match Decoder::new(&mut conn.reader)
        .next_record()
        .map_err(wire_err)?
    {
        Record::Hello(h) => h,
        r => return Err(protocol(i, format!("expected hello, got {r:?}"))),
    };
    // Our preamble only says who we are: acceptance (HelloReply) or refusal (Error)
    // follows once every connection has arrived.
    wire::write_preamble(&mut conn.writer, MAGIC_DEST).map_err(|e| wire_err(e.into()))?;
    Ok(Greeted { conn, hello })
}

/// Checks that every Hello announces the same migration, and sorts them by index.
fn check_hellos(conns: &mut [Greeted]) -> Result<(), ReceiveError> {
    let n = conns.len();
    for (i, g) in conns.iter().enumerate() {
        let h = &g.hello;
        if usize::from(h.connections) != n || n > usize::from(CONNECTIONS_MAX) {
            return Err(protocol(
                i,
                format!("announced {} connections, {n} arrived", h.connections),
            ));
        }
        if u64::from(h.page_size) != PAGE_SIZE {
            return Err(protocol(
                i,
                format!("page size {} is not {PAGE_SIZE}", h.page_size),
            ));
        }
        if h.regions != conns[0].hello.regions {
            return Err(protocol(
                i,
                "the connections announce different memory layouts".into(),
            ));
        }
        if h.compression != conns[0].hello.compression {
            return Err(protocol(
                i,
                "the connections offer different compression".into(),
            ));
        }
        if h.connection != 0 && !h.description.is_empty() {
            return Err(protocol(
                i,
                "a VM description on a connection other than 0".into(),
            ));
        }
    }
    conns.sort_by_key(|g| g.hello.connection);
    if conns
        .iter()
        .enumerate()
        .any(|(i, g)| usize::from(g.hello.connection) != i)
    {
        return Err(protocol(
            0,
            "connection indices are not 0..n, each once".into(),
        ));
    }
    Ok(())
}

/// The receiving end of a migration into `mem`.
#[derive(Debug)]
pub struct Destination<'a, M> {
    mem: &'a M,
    layout: MemoryLayout,
    config: ReceiveConfig,
}

impl<'a, M: GuestMemoryBackend + Sync> Destination<'a, M> {
    /// A destination writing into `mem`.
    pub fn new(mem: &'a M, config: ReceiveConfig) -> Result<Self, ReceiveError> {
        Ok(Self {
            layout: MemoryLayout::from_guest_memory(mem)?,
            mem,
            config,
        })
    }

    /// Accepts one migration's connections on `listener` and receives it.
    pub fn accept(&self, listener: &Listener) -> Result<Received, ReceiveError> {
        self.receive_incoming(Incoming::accept(listener, &self.config)?)
    }

    /// Receives a migration over already-connected `connections` (any order).
    pub fn receive(&self, connections: Vec<Connection>) -> Result<Received, ReceiveError> {
        self.receive_incoming(Incoming::from_connections(connections, &self.config)?)
    }

    /// Checks that `incoming`'s layout is this memory's, answers the source, and applies all
    /// connections in parallel.
    pub fn receive_incoming(&self, mut incoming: Incoming) -> Result<Received, ReceiveError> {
        if incoming.regions() != self.layout.regions() {
            let e = protocol(
                0,
                format!(
                    "guest memory layout differs: the source has {:x?}, this VM has {:x?}",
                    incoming.regions(),
                    self.layout.regions()
                ),
            );
            incoming.fail(&e);
            return Err(e);
        }
        let codec = match incoming.conns.first() {
            Some(g) if self.config.accept_compression => g.hello.compression,
            _ => Codec::None,
        };
        let result = (|| {
            for g in &mut incoming.conns {
                let mut enc = Encoder::new();
                enc.hello_reply(HelloReply {
                    zeroed: self.config.zeroed,
                    compression: codec,
                });
                let i = usize::from(g.hello.connection);
                g.conn
                    .writer
                    .write_all(enc.bytes())
                    .map_err(|e| ReceiveError::Wire {
                        connection: i,
                        source: e.into(),
                    })?;
            }
            self.apply_all(&mut incoming.conns, &incoming.closers, codec)
        })();
        match result {
            Ok((device_state, summary)) => {
                let stats = ReceiveStats {
                    pages: summary.pages,
                    zero_pages: summary.zero_pages,
                    rounds: summary.rounds,
                    duration_ms: incoming.started.elapsed().as_secs_f64() * 1000.0,
                };
                let reply = incoming.conns.swap_remove(0).conn;
                Ok(Received {
                    device_state,
                    stats,
                    reply,
                    summary,
                    completed: Instant::now(),
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "receiving failed; discarding the incoming VM");
                incoming.fail(&e);
                Err(e)
            }
        }
    }

    /// Applies every connection on its own thread; the first failure shuts all down.
    fn apply_all(
        &self,
        conns: &mut [Greeted],
        closers: &[Closer],
        codec: Codec,
    ) -> Result<(Vec<u8>, Summary), ReceiveError> {
        let n = conns.len();
        let device_state = Mutex::new(None);
        // Connection 0's sending half reports applied rounds while its receiving half is
        // read on its own thread; it goes back to the connection afterwards.
        let reply = std::mem::replace(&mut conns[0].conn.writer, Box::new(std::io::sink()));
        let barrier = RoundBarrier::new(n, reply);
        let results: Vec<Result<Summary, ReceiveError>> = thread::scope(|s| {
            let handles: Vec<_> = conns
                .iter_mut()
                .enumerate()
                .map(|(i, g)| {
                    let device_state = &device_state;
                    let barrier = &barrier;
                    s.spawn(move || {
                        let r = self.apply(i, n, &mut g.conn, codec, device_state, barrier);
                        if r.is_err() {
                            closers.iter().for_each(Closer::shutdown_read);
                        }
                        r
                    })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(i, h)| {
                    h.join()
                        .unwrap_or_else(|_| Err(protocol(i, "receiver thread panicked".into())))
                })
                .collect()
        });
        conns[0].conn.writer = barrier.into_writer();
        // Report the root cause: the first error that is not a consequence of the shutdown.
        let mut total = Summary::default();
        let mut first_err = None;
        for r in results {
            match r {
                Ok(s) => {
                    total.page_records += s.page_records;
                    total.pages += s.pages;
                    total.zero_pages += s.zero_pages;
                    total.rounds = total.rounds.max(s.rounds);
                }
                Err(e) => {
                    let secondary = matches!(
                        &e,
                        ReceiveError::Wire {
                            source: WireError::Io(_)
                                | WireError::Closed
                                | WireError::Truncated { .. },
                            ..
                        }
                    );
                    if first_err.is_none()
                        || (!secondary && first_err.as_ref().is_some_and(|(s, _)| *s))
                    {
                        first_err = Some((secondary, e));
                    }
                }
            }
        }
        if let Some((_, e)) = first_err {
            return Err(e);
        }
        let state = device_state
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(|| protocol(0, "the stream completed without device state".into()))?;
        Ok((state, total))
    }

    /// Applies one connection's records until `Complete`.
    fn apply(
        &self,
        i: usize,
        n: usize,
        conn: &mut Connection,
        codec: Codec,
        device_state: &Mutex<Option<Vec<u8>>>,
        barrier: &RoundBarrier,
    ) -> Result<Summary, ReceiveError> {
        let wire_err = |source| ReceiveError::Wire {
            connection: i,
            source,
        };
        let mut d = Decoder::new(&mut conn.reader)
            .accept(codec)
            .map_err(|e| wire_err(e.into()))?;
        let mut got = Summary::default();
        loop {
            match d.next_record().map_err(wire_err)? {
                Record::Pages { gpas, data } => {
                    got.page_records += 1;
                    // Consecutive addresses are written as one run (one system call when
                    // writing through the file).
                    let mut run: Option<(u64, usize)> = None;
                    for (k, gpa) in gpas.iter().enumerate() {
                        self.check_page(i, n, gpa, 1)?;
                        run = match run {
                            Some((start, from))
                                if start + ((k - from) as u64) * PAGE_SIZE == gpa =>
                            {
                                Some((start, from))
                            }
                            Some((start, from)) => {
                                self.write_pages(start, &data[from * PAGE..k * PAGE])?;
                                Some((gpa, k))
                            }
                            None => Some((gpa, k)),
                        };
                    }
                    if let Some((start, from)) = run {
                        self.write_pages(start, &data[from * PAGE..gpas.len() * PAGE])?;
                    }
                    got.pages += gpas.len() as u64;
                }
                Record::ZeroRuns(runs) => {
                    for (gpa, pages) in runs.iter() {
                        self.check_page(i, n, gpa, pages)?;
                        self.zero_pages(gpa, pages)?;
                        got.zero_pages += pages;
                    }
                }
                Record::DeviceState(state) => {
                    let mut slot = device_state.lock().unwrap_or_else(|p| p.into_inner());
                    if i != 0 || slot.is_some() {
                        return Err(protocol(i, "unexpected device state".into()));
                    }
                    *slot = Some(state.to_vec());
                }
                Record::EndOfRound(round) => {
                    if u64::from(round) != got.rounds {
                        return Err(protocol(
                            i,
                            format!("round {round} ended, expected {}", got.rounds),
                        ));
                    }
                    got.rounds += 1;
                    barrier.round_done(i, got.rounds)?;
                }
                Record::Complete(sent) => {
                    if sent != got {
                        return Err(protocol(
                            i,
                            format!("the stream is incomplete: the source sent {sent:?}, {got:?} arrived"),
                        ));
                    }
                    return Ok(got);
                }
                Record::Error(msg) => return Err(ReceiveError::Source(msg)),
                r => return Err(protocol(i, format!("unexpected {r:?}"))),
            }
        }
    }

    /// Writes whole pages `data` at `gpa` (checked guest RAM, possibly across regions).
    fn write_pages(&self, mut gpa: u64, mut data: &[u8]) -> Result<(), ReceiveError> {
        while !data.is_empty() {
            let n = match self.file_span(gpa, data.len() as u64) {
                Some((file, offset, len)) => {
                    let len = len as usize;
                    file.write_all_at(&data[..len], offset)
                        .map_err(|e| ReceiveError::File { gpa, source: e })?;
                    len
                }
                None => {
                    self.mem
                        .write_slice(&data[..PAGE], GuestAddress(gpa))
                        .map_err(|source| ReceiveError::Memory { gpa, source })?;
                    PAGE
                }
            };
            data = &data[n..];
            gpa += n as u64;
        }
        Ok(())
    }

    /// Makes `pages` pages at `gpa` (checked guest RAM of one region) read as zero.
    fn zero_pages(&self, gpa: u64, pages: u64) -> Result<(), ReceiveError> {
        if let Some((file, offset, len)) = self.file_span(gpa, pages * PAGE_SIZE) {
            if len == pages * PAGE_SIZE {
                // A hole reads as zeros and gives the memory back.
                let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                match rustix::fs::fallocate(file, flags, offset, len) {
                    Ok(()) => return Ok(()),
                    // A file system without holes: write the zeros.
                    Err(rustix::io::Errno::OPNOTSUPP) => {}
                    Err(e) => {
                        return Err(ReceiveError::File {
                            gpa,
                            source: e.into(),
                        })
                    }
                }
            }
        }
        for p in 0..pages {
            let at = gpa + p * PAGE_SIZE;
            self.mem
                .write_slice(&ZERO_PAGE, GuestAddress(at))
                .map_err(|source| ReceiveError::Memory { gpa: at, source })?;
        }
        Ok(())
    }

    /// Where `len` bytes at `gpa` are in the file behind their region, when writing through
    /// files is on: the file, the offset, and how many of the bytes that region holds.
    fn file_span(&self, gpa: u64, len: u64) -> Option<(&std::fs::File, u64, u64)> {
        if !self.config.write_through_file {
            return None;
        }
        let region = self.mem.find_region(GuestAddress(gpa))?;
        let file = region.file_offset()?;
        let within = gpa - region.start_addr().0;
        Some((
            file.file(),
            file.start() + within,
            len.min(region.len() - within),
        ))
    }

    /// Checks that `pages` pages at `gpa` are guest RAM in one region and belong to
    /// connection `i` of `n`.
    fn check_page(&self, i: usize, n: usize, gpa: u64, pages: u64) -> Result<(), ReceiveError> {
        let len = pages.checked_mul(PAGE_SIZE).filter(|&l| l > 0);
        let whole = len.and_then(|len| {
            let mut it = self.layout.whole_pages_in(GuestRange::new(gpa, len));
            match (it.next(), it.next()) {
                (Some((s, e)), None) if e - s == pages && gpa % PAGE_SIZE == 0 => Some((s, e)),
                _ => None,
            }
        });
        let Some((start, end)) = whole else {
            return Err(protocol(
                i,
                format!("{pages} page(s) at {gpa:#x} are not guest RAM"),
            ));
        };
        let lane = |p: u64| ((p / CHUNK_PAGES) % n as u64) as usize;
        if lane(start) != i || lane(end - 1) != i {
            return Err(protocol(
                i,
                format!("page {gpa:#x} arrived on the wrong connection"),
            ));
        }
        Ok(())
    }
}

fn protocol(connection: usize, reason: String) -> ReceiveError {
    ReceiveError::Protocol { connection, reason }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;

    use vm_memory::{FileOffset, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

    use super::*;

    const PAGES: u64 = 16;
    const HIGH: u64 = 1 << 32;

    /// Guest memory of two 8-page regions (at 0 and at 4 GiB) on one memfd, the second at
    /// file offset 8 pages, mapped shared: the shape of ferry's VMM's RAM.
    fn memfd_memory() -> (GuestMemoryMmap, File) {
        let fd =
            rustix::fs::memfd_create("ferry-dest-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let file = File::from(fd);
        file.set_len(PAGES * PAGE_SIZE).unwrap();
        let half = PAGES / 2 * PAGE_SIZE;
        let regions = [(0, 0), (HIGH, half)]
            .into_iter()
            .map(|(gpa, offset)| {
                let region = MmapRegion::from_file(
                    FileOffset::new(file.try_clone().unwrap(), offset),
                    half as usize,
                )
                .unwrap();
                GuestRegionMmap::new(region, GuestAddress(gpa)).unwrap()
            })
            .collect();
        (GuestMemoryMmap::from_regions(regions).unwrap(), file)
    }

    /// Page `p` of the test memory: 0..8 low, 8..16 at 4 GiB.
    fn gpa(p: u64) -> u64 {
        if p < PAGES / 2 {
            p * PAGE_SIZE
        } else {
            HIGH + (p - PAGES / 2) * PAGE_SIZE
        }
    }

    /// A complete one-connection stream: pages 1, 2 (one run), 9 and 10 (one run, in the
    /// high region) with data, 4..6 and 12..16 zero.
    fn stream(regions: Vec<crate::layout::RegionDesc>) -> Vec<u8> {
        let mut out = Vec::new();
        wire::write_preamble(&mut out, MAGIC_SOURCE).unwrap();
        let mut e = Encoder::new();
        e.hello(&Hello {
            connection: 0,
            connections: 1,
            page_size: PAGE_SIZE as u32,
            regions,
            description: Vec::new(),
            compression: Codec::None,
        });
        let at = e.begin_pages();
        for (page, byte) in [(1u64, 0x11u8), (2, 0x22), (9, 0x99), (10, 0xaa)] {
            e.page_slot(gpa(page)).fill(byte);
        }
        e.finish_pages(at);
        e.zero_runs(&[(gpa(4), 2), (gpa(12), 4)]);
        e.device_state(b"state");
        e.end_of_round(0);
        e.complete(Summary {
            page_records: 1,
            pages: 4,
            zero_pages: 6,
            rounds: 1,
        });
        out.extend_from_slice(&e.take());
        out
    }

    /// A writer whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        /// The rounds reported so far (and forgets them).
        fn rounds(&self) -> Vec<u32> {
            let bytes = std::mem::take(&mut *self.0.lock().unwrap());
            let mut d = wire::Decoder::new(&bytes[..]);
            let mut out = Vec::new();
            loop {
                match d.next_record() {
                    Ok(Record::RoundApplied(r)) => out.push(r),
                    Err(WireError::Closed) => return out,
                    r => panic!("unexpected {r:?}"),
                }
            }
        }
    }

    #[test]
    fn a_round_is_reported_once_every_connection_applied_it() {
        let out = Shared::default();
        let barrier = RoundBarrier::new(2, Box::new(out.clone()));
        barrier.round_done(0, 1).unwrap();
        assert_eq!(out.rounds(), [] as [u32; 0], "connection 1 is behind");
        barrier.round_done(1, 1).unwrap();
        assert_eq!(out.rounds(), [0]);
        barrier.round_done(1, 2).unwrap();
        assert_eq!(out.rounds(), [] as [u32; 0]);
        // Connection 0 catches up by two rounds, connection 1 is at two: one more.
        barrier.round_done(0, 3).unwrap();
        assert_eq!(out.rounds(), [1]);
        barrier.round_done(1, 3).unwrap();
        assert_eq!(out.rounds(), [2]);
    }

    #[test]
    fn the_source_hears_each_round_applied_before_the_acknowledgement() {
        let (mem, _file) = memfd_memory();
        let dest = Destination::new(&mem, ReceiveConfig::default()).unwrap();
        let (mut source, there) = Connection::pair().unwrap();
        source
            .writer
            .write_all(&stream(dest.layout.regions().to_vec()))
            .unwrap();
        let received = dest.receive(vec![there]).unwrap();
        received.acknowledge().unwrap();
        wire::read_preamble(&mut source.reader, MAGIC_DEST).unwrap();
        let mut d = wire::Decoder::new(&mut source.reader);
        assert!(matches!(d.next_record(), Ok(Record::HelloReply(_))));
        assert_eq!(d.next_record().unwrap(), Record::RoundApplied(0));
        assert!(matches!(d.next_record(), Ok(Record::Ack(_))));
    }

    #[test]
    fn writing_through_the_file_lands_in_the_mapping_and_zero_runs_give_memory_back() {
        for through_file in [false, true] {
            let (mem, file) = memfd_memory();
            // Junk everywhere, so that what arrives (zeros included) is visible.
            for p in 0..PAGES {
                mem.write_slice(&[0xa5; PAGE], GuestAddress(gpa(p)))
                    .unwrap();
            }
            let blocks_before = file.metadata().unwrap().blocks();
            let config = ReceiveConfig {
                zeroed: false,
                write_through_file: through_file,
                ..ReceiveConfig::default()
            };
            let dest = Destination::new(&mem, config).unwrap();
            let (mut source, there) = Connection::pair().unwrap();
            let bytes = stream(dest.layout.regions().to_vec());
            source.writer.write_all(&bytes).unwrap();
            let received = dest.receive(vec![there]).unwrap();
            assert_eq!(received.device_state, b"state");
            // Before reading: a read of a hole through a shared mapping allocates a page.
            let blocks_after = file.metadata().unwrap().blocks();
            let mut page = [0u8; PAGE];
            for (p, want) in [
                (0u64, 0xa5u8),
                (1, 0x11),
                (2, 0x22),
                (3, 0xa5),
                (4, 0),
                (5, 0),
                (6, 0xa5),
                (8, 0xa5),
                (9, 0x99),
                (10, 0xaa),
                (11, 0xa5),
                (12, 0),
                (15, 0),
            ] {
                mem.read_slice(&mut page, GuestAddress(gpa(p))).unwrap();
                assert!(
                    page.iter().all(|&b| b == want),
                    "through_file={through_file}: page {p} holds {:#x}, expected {want:#x}",
                    page[0]
                );
            }
            // The file itself, at each region's offset, holds what the mapping shows.
            let mut at = [0u8; 1];
            file.read_exact_at(&mut at, 9 * PAGE_SIZE).unwrap();
            assert_eq!(at[0], 0x99, "through_file={through_file}");
            if through_file {
                // Six pages became holes: 6 x 4 KiB in 512-byte blocks.
                assert_eq!(
                    blocks_before - blocks_after,
                    6 * 8,
                    "no hole was punched: {blocks_before} -> {blocks_after}"
                );
            } else {
                assert_eq!(blocks_after, blocks_before);
            }
        }
    }
}
