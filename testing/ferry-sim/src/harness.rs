//! Runs one simulated migration end to end, in process, and checks the result.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use ferry_migration::{
    BitmapDirtyLog, Connection, Destination, DirtyLog, DirtyLogError, Incoming, MemoryLayout,
    Migration, MigrationConfig, MigrationError, MigrationStats, PageBitmap, ReceiveConfig,
    ReceiveError, UnpopulatedSource,
};

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

use crate::guest::{create_memory, verify, Guest, Mismatch};
use crate::sim::{SimConfig, SimDriver, SimVm};

/// One simulated migration's parameters.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Seed of the guest's behaviour.
    pub seed: u64,
    /// Guest setup, workload and hint behaviour.
    pub sim: SimConfig,
    /// Also use the never-populated-memory source.
    pub unpopulated: bool,
    /// Connections.
    pub connections: u16,
    /// The dirty log arms lazily, like KVM's manual-protect mode (what ferry's VMM uses).
    pub lazy_dirty_log: bool,
    /// The dirty log forgets every n-th page it would report (0: none), as a hypervisor
    /// whose dirty log loses writes would (the lab's does: docs/lab.md).
    pub dirty_log_drops_every: u64,
    /// The destination's RAM holds junk rather than zeros (it says so in its hello), as
    /// RAM reused from an earlier VM would: every page the guest has as zero must then be
    /// sent as a zero record, including pages the engine knows are zero without reading.
    pub dest_prefilled: bool,
    /// The destination writes pages through its memfds and punches holes for zero pages
    /// (`ReceiveConfig::write_through_file`) instead of writing through the mappings.
    pub write_through_file: bool,
    /// The destination accepts the compression the source offers
    /// (`ReceiveConfig::accept_compression`).
    pub accept_compression: bool,
    /// Engine settings.
    pub migration: MigrationConfig,
}

/// What a simulated migration produced.
#[derive(Debug)]
pub struct Outcome {
    /// The source's statistics.
    pub stats: MigrationStats,
    /// Used pages (per the source guest) that differ at the destination.
    pub mismatches: Vec<Mismatch>,
    /// Used pages (per the transferred state) that differ, checked by the destination.
    pub dest_mismatches: Vec<Mismatch>,
    /// The simulated VM, for further checks.
    pub vm: SimVm,
}

/// Something that goes wrong on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing.
    None,
    /// Connection 0 is cut after this many bytes from the source.
    CutAfter(u64),
    /// Connection 0 is cut after this many bytes from the destination (its handshake reply,
    /// progress, acknowledgement), both directions at once, like a broken link.
    CutBackAfter(u64),
    /// One byte of connection 0 is flipped at this offset of the source's stream.
    FlipAt(u64),
    /// The destination drops the received VM instead of acknowledging it (a lost
    /// acknowledgement looks the same to the source).
    NoAck,
    /// The destination refuses the received VM with a reason.
    Refuse,
    /// The destination has a different memory size.
    OtherLayout,
    /// The destination refuses the migration as soon as it has read the source's Hellos
    /// (as ferry's VMM does with a VM over its limits), before any memory.
    RefuseAtHello,
}

/// The VM description the simulated source sends in its Hello; the destination checks it
/// arrived intact.
pub const SIM_DESCRIPTION: &[u8] = b"{\"sim\":true}";

/// Copies `from` to `to`, applying `fault` to the bytes, until either side closes. A cut
/// kills both directions, like a broken link; otherwise only this direction ends, so what
/// the other side still says (the destination's error record) gets through.
fn pump(mut from: UnixStream, mut to: UnixStream, fault: Fault, counted: &AtomicU64) {
    let mut buf = vec![0u8; 64 << 10];
    let mut offset = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        match fault {
            Fault::CutAfter(at) if offset + n as u64 > at => {
                let keep = (at - offset.min(at)) as usize;
                let _ = to.write_all(&chunk[..keep]);
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
            Fault::FlipAt(at) if (offset..offset + n as u64).contains(&at) => {
                chunk[(at - offset) as usize] ^= 0x40;
            }
            _ => {}
        }
        offset += n as u64;
        if to.write_all(chunk).is_err() {
            break;
        }
        counted.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = from.shutdown(Shutdown::Read);
    let _ = to.shutdown(Shutdown::Write);
}

/// A connection pair with a tampering proxy, which counts the bytes it passes each way.
fn proxied_pair(fault: Fault, counted: &Arc<[AtomicU64; 2]>) -> (Connection, Connection) {
    let (src, src_proxy) = UnixStream::pair().expect("socket pair");
    let (dst_proxy, dst) = UnixStream::pair().expect("socket pair");
    let (a, b) = (
        src_proxy.try_clone().expect("clone"),
        dst_proxy.try_clone().expect("clone"),
    );
    let (forward, backward) = match fault {
        Fault::CutBackAfter(at) => (Fault::None, Fault::CutAfter(at)),
        other => (other, Fault::None),
    };
    let (there, back) = (counted.clone(), counted.clone());
    thread::spawn(move || pump(src_proxy, dst_proxy, forward, &there[0]));
    thread::spawn(move || pump(b, a, backward, &back[1]));
    (
        Connection::from_unix(src).expect("connection"),
        Connection::from_unix(dst).expect("connection"),
    )
}

/// A dirty log that forgets every `every`-th page its inner log reports.
#[derive(Debug)]
pub struct LossyDirtyLog<D> {
    inner: D,
    every: u64,
    reported: u64,
    /// Pages forgotten so far.
    pub dropped: u64,
}

impl<D: DirtyLog> LossyDirtyLog<D> {
    /// Wraps `inner`; `every == 0` forgets nothing.
    pub fn new(inner: D, every: u64) -> Self {
        Self {
            inner,
            every,
            reported: 0,
            dropped: 0,
        }
    }
}

impl<D: DirtyLog> DirtyLog for LossyDirtyLog<D> {
    fn start(&mut self) -> Result<(), DirtyLogError> {
        self.inner.start()
    }

    fn fetch_and_clear(
        &mut self,
        layout: &MemoryLayout,
        dirty: &mut PageBitmap,
    ) -> Result<(), DirtyLogError> {
        let mut fetched = PageBitmap::new(dirty.len());
        self.inner.fetch_and_clear(layout, &mut fetched)?;
        let mut cursor = 0;
        while let Some(page) = fetched.next_set(cursor) {
            cursor = page + 1;
            self.reported += 1;
            if self.every != 0 && self.reported % self.every == 0 {
                self.dropped += 1;
            } else {
                dirty.set(page);
            }
        }
        Ok(())
    }

    fn stop(&mut self) {
        self.inner.stop();
    }

    fn arms_lazily(&self) -> bool {
        self.inner.arms_lazily()
    }

    fn arm(
        &mut self,
        layout: &MemoryLayout,
        first: u64,
        words: &[u64],
    ) -> Result<(), DirtyLogError> {
        self.inner.arm(layout, first, words)
    }
}

/// Writes `byte` over all of `mem`.
fn fill(mem: &crate::SimMemory, byte: u8) {
    let page = vec![byte; ferry_migration::PAGE_SIZE as usize];
    for region in mem.iter() {
        let start = region.start_addr().0;
        for off in (0..region.len()).step_by(page.len()) {
            mem.write_slice(&page, vm_memory::GuestAddress(start + off))
                .expect("destination RAM");
        }
    }
}

/// Runs `s` and returns the result, or the source's and destination's errors.
pub fn run(s: &Scenario) -> Result<Outcome, (MigrationError, Option<ReceiveError>)> {
    let src_mem = create_memory(s.memory).expect("source memory");
    let vm = SimVm::new(Guest::new(src_mem.clone(), s.seed), s.sim);
    run_faulty(s, &vm, &src_mem, Fault::None)
}

/// Migrates `vm` (whose memory is `src_mem`) as `s` describes, with `fault` injected.
pub fn run_faulty(
    s: &Scenario,
    vm: &SimVm,
    src_mem: &crate::SimMemory,
    fault: Fault,
) -> Result<Outcome, (MigrationError, Option<ReceiveError>)> {
    let a = attempt(s, vm, src_mem, fault);
    match (a.source, a.destination) {
        (Ok(stats), Ok(dest_mismatches)) => Ok(Outcome {
            stats,
            mismatches: a.mismatches,
            dest_mismatches,
            vm: vm.clone(),
        }),
        (Ok(_), Err(e)) => Err((MigrationError::Destination(e.to_string()), Some(e))),
        (Err(e), r) => Err((e, r.err())),
    }
}

/// What one migration attempt left on both sides, whatever happened.
#[derive(Debug)]
pub struct Attempt {
    /// What the source's engine returned.
    pub source: Result<MigrationStats, MigrationError>,
    /// What the destination did: `Ok` when it acknowledged the VM (a real destination then
    /// runs the guest), with its own check of the received RAM against the transferred guest
    /// state; `Err` when it discarded what it received.
    pub destination: Result<Vec<Mismatch>, ReceiveError>,
    /// The destination's RAM against the source guest's pages, when it acknowledged (empty
    /// otherwise): a page written on the source and missing here is a lost write.
    pub mismatches: Vec<Mismatch>,
    /// Bytes the proxy passed on connection 0: source to destination, and back.
    pub bytes: [u64; 2],
}

/// Migrates `vm` as [`run_faulty`] does and reports both sides without judging.
pub fn attempt(s: &Scenario, vm: &SimVm, src_mem: &crate::SimMemory, fault: Fault) -> Attempt {
    let counted = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let vm = vm.clone();
    let src_mem = src_mem.clone();
    let dst_size = if fault == Fault::OtherLayout {
        s.memory * 2
    } else {
        s.memory
    };
    let dst_mem = create_memory(dst_size).expect("destination memory");
    if s.dest_prefilled {
        fill(&dst_mem, 0xa5);
    }
    let receive = ReceiveConfig {
        zeroed: !s.dest_prefilled,
        write_through_file: s.write_through_file,
        accept_compression: s.accept_compression,
        ..ReceiveConfig::default()
    };
    let (src_conns, dst_conns): (Vec<_>, Vec<_>) = (0..s.connections)
        .map(|i| {
            if i == 0 {
                proxied_pair(fault, &counted)
            } else {
                Connection::pair().expect("pair")
            }
        })
        .unzip();

    let dst = dst_mem.clone();
    let receiver = thread::spawn(move || {
        let incoming = Incoming::from_connections(dst_conns, &receive)?;
        if incoming.description() != SIM_DESCRIPTION {
            let e = format!("the description arrived as {:?}", incoming.description());
            incoming.refuse(&e);
            return Err(ReceiveError::Source(e));
        }
        if fault == Fault::RefuseAtHello {
            incoming.refuse("refused at the hello, on purpose");
            return Err(ReceiveError::Source("refused at the hello".into()));
        }
        let d = Destination::new(&dst, receive)?;
        let received = d.receive_incoming(incoming)?;
        let states = crate::state::decode(&received.device_state);
        let layout = ferry_migration::MemoryLayout::from_guest_memory(&dst).expect("layout");
        let mismatches = states.map(|st| verify(&st, &dst, &layout));
        match mismatches {
            Some(_) if fault == Fault::Refuse => {
                received.reject("refused after receiving everything, on purpose");
                Err(ReceiveError::Source("refused on purpose".into()))
            }
            Some(_) if fault == Fault::NoAck => {
                drop(received);
                Err(ReceiveError::Source(
                    "dropped without acknowledging, on purpose".into(),
                ))
            }
            Some(m) => {
                received
                    .acknowledge()
                    .map_err(|e| ReceiveError::Source(e.to_string()))?;
                Ok(m)
            }
            None => {
                received.reject("device state does not decode");
                Err(ReceiveError::Source("device state does not decode".into()))
            }
        }
    });

    let dirty = if s.lazy_dirty_log {
        BitmapDirtyLog::lazy(src_mem.clone())
    } else {
        BitmapDirtyLog::new(src_mem.clone())
    };
    let mut dirty = LossyDirtyLog::new(dirty, s.dirty_log_drops_every);
    let mut control = vm.clone();
    let mut driver = SimDriver(vm.clone());
    let mut hints = vm.hint_source();
    let mut unpopulated = s.unpopulated.then(|| UnpopulatedSource::new(&src_mem));
    let result = (|| {
        let mut m = Migration::new(
            &src_mem,
            &mut dirty,
            &mut control,
            &mut driver,
            MigrationConfig {
                description: SIM_DESCRIPTION.to_vec(),
                ..s.migration.clone()
            },
        )?;
        if let Some(h) = hints.as_mut() {
            m.add_source(h);
        }
        if let Some(u) = unpopulated.as_mut() {
            m.add_source(u);
        }
        m.run(src_conns)
    })();
    let received = receiver.join().expect("receiver thread");
    let mismatches = if received.is_ok() {
        let layout = ferry_migration::MemoryLayout::from_guest_memory(&dst_mem).expect("layout");
        verify(vm.lock().guest.page_states(), &dst_mem, &layout)
    } else {
        Vec::new()
    };
    Attempt {
        source: result,
        destination: received,
        mismatches,
        bytes: [
            counted[0].load(Ordering::Relaxed),
            counted[1].load(Ordering::Relaxed),
        ],
    }
}
