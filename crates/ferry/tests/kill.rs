//! Either *process* of a migration killed (SIGKILL, as a crash or the OOM killer would) at any
//! phase: the handshake, the bulk round, later rounds, the final round, the state, Complete, the
//! acknowledgement.
//!
//! - A destination process killed: the source, ferry's engine with a simulated guest in this
//!   process, must never report success unless the destination acknowledged first, must keep its
//!   guest running when it fails (or wait paused when the acknowledgement may have been lost:
//!   then no copy runs and the operator decides), and must end within its timeouts.
//! - A source process killed (`ferry sim-send`): the destination, ferry's receiver in this
//!   process, must refuse every stream that ends before its last byte (so nothing half-received
//!   is ever restored), must end within its timeouts, and when it did receive everything, its
//!   memory must hold every page the source's guest wrote (checked against the guest state that
//!   travelled in the stream).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_migration::wire::{Kind, HEADER_LEN, PREAMBLE_LEN};
use ferry_migration::{
    BitmapDirtyLog, Connection, Destination, Endpoint, Listener, MemoryLayout, Migration,
    MigrationConfig, MigrationError, ReceiveConfig,
};
use ferry_sim::{
    create_memory, verify, Guest, HintBehavior, SimConfig, SimDriver, SimVm, Workload,
};

const MEMORY: u64 = 16 << 20;

/// Where the proxy kills a process: after a number of bytes in one direction, or a number of
/// bytes before the end of that direction's last record. The stream's length varies a little
/// from run to run (how many rounds the engine needs depends on the measured bandwidth), so
/// points near the end are found in the stream itself, not counted from an earlier run.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    Never,
    /// After this many bytes from the source.
    Forward(u64),
    /// This many bytes before the end of the source's Complete record.
    ForwardEnd(u64),
    /// After this many bytes from the destination.
    Backward(u64),
    /// This many bytes before the end of the destination's Ack record.
    BackwardEnd(u64),
}

/// Where one pump kills.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// After this many bytes.
    At(u64),
    /// `by` bytes before the end of the first record of the kind the pump watches.
    BeforeEnd(u64),
}

/// What one direction carried.
#[derive(Debug, Default)]
struct Carried {
    /// Bytes read from the sender.
    read: AtomicU64,
    /// Bytes written on to the receiver.
    forwarded: AtomicU64,
    /// Where the first record of the watched kind ends (u64::MAX: none seen).
    watched_end: AtomicU64,
}

impl Carried {
    fn new() -> Arc<Self> {
        let c = Self::default();
        c.watched_end.store(u64::MAX, Ordering::SeqCst);
        Arc::new(c)
    }

    /// Whether the watched record reached the receiver whole.
    fn watched_through(&self) -> bool {
        self.forwarded.load(Ordering::SeqCst) >= self.watched_end.load(Ordering::SeqCst)
    }
}

/// Follows the record boundaries of one direction of a migration stream
/// (docs/wire-format.md: a preamble, then records of header, payload and CRC).
struct Framer {
    offset: u64,
    skip: u64,
    header: Vec<u8>,
}

impl Framer {
    fn new() -> Self {
        Self {
            offset: 0,
            skip: PREAMBLE_LEN as u64,
            header: Vec::new(),
        }
    }

    /// Takes the next bytes of the stream; returns the offset just past the first record of
    /// type `kind` whose header they complete.
    fn feed(&mut self, bytes: &[u8], kind: Kind) -> Option<u64> {
        let mut found = None;
        let mut i = 0;
        while i < bytes.len() {
            let left = (bytes.len() - i) as u64;
            if self.skip > 0 {
                let t = self.skip.min(left);
                self.skip -= t;
                i += t as usize;
                continue;
            }
            let t = (HEADER_LEN - self.header.len()).min(left as usize);
            self.header.extend_from_slice(&bytes[i..i + t]);
            i += t;
            if self.header.len() == HEADER_LEN {
                let payload = u64::from(u32::from_le_bytes(self.header[4..8].try_into().unwrap()));
                // The payload and its CRC follow the header.
                self.skip = payload + 4;
                if self.header[0] == kind as u8 && found.is_none() {
                    found = Some(self.offset + i as u64 + self.skip);
                }
                self.header.clear();
            }
        }
        self.offset += bytes.len() as u64;
        found
    }
}

/// Copies `from` to `to`, noting in `carried` where the first record of kind `watch` ends;
/// once the bytes read would pass the `kill` point, forwards up to it and kills `pid`. Either
/// side closing closes the other, as one connection would.
fn pump(
    mut from: UnixStream,
    mut to: UnixStream,
    carried: Arc<Carried>,
    watch: Kind,
    kill: Option<Target>,
    pid: i32,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut framer = Framer::new();
    let mut kill_after = match kill {
        Some(Target::At(at)) => Some(at),
        _ => None,
    };
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(end) = framer.feed(&buf[..n], watch) {
            let _ = carried.watched_end.compare_exchange(
                u64::MAX,
                end,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            if let Some(Target::BeforeEnd(by)) = kill {
                kill_after.get_or_insert(end - by);
            }
        }
        let before = carried.read.fetch_add(n as u64, Ordering::SeqCst);
        let mut end = n;
        let mut kill = false;
        if let Some(at) = kill_after {
            if before + n as u64 > at && before <= at {
                end = (at - before) as usize;
                kill = true;
            }
        }
        if to.write_all(&buf[..end]).is_err() {
            break;
        }
        carried.forwarded.fetch_add(end as u64, Ordering::SeqCst);
        if kill {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            // The rest of what the source sent dies with the process; and nothing after it
            // (a killed source's socket may still hold bytes it wrote: forwarding them would
            // leave a hole in the stream, a corruption rather than a kill).
            std::thread::sleep(Duration::from_millis(20));
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Both directions between the source's end and the destination, pumped on two threads, with
/// `pid` killed where `kill` says.
/// The source's direction watches its Complete record, the destination's its Ack.
struct Proxy {
    pumps: [std::thread::JoinHandle<()>; 2],
    carried: [Arc<Carried>; 2],
}

impl Proxy {
    fn start(source: UnixStream, dest: UnixStream, kill: KillAt, pid: i32) -> Self {
        let carried = [Carried::new(), Carried::new()];
        let (forward_kill, backward_kill) = match kill {
            KillAt::Never => (None, None),
            KillAt::Forward(at) => (Some(Target::At(at)), None),
            KillAt::ForwardEnd(by) => (Some(Target::BeforeEnd(by)), None),
            KillAt::Backward(at) => (None, Some(Target::At(at))),
            KillAt::BackwardEnd(by) => (None, Some(Target::BeforeEnd(by))),
        };
        let (from, to, c) = (
            source.try_clone().unwrap(),
            dest.try_clone().unwrap(),
            carried[0].clone(),
        );
        let forward =
            std::thread::spawn(move || pump(from, to, c, Kind::Complete, forward_kill, pid));
        let c = carried[1].clone();
        let backward =
            std::thread::spawn(move || pump(dest, source, c, Kind::Ack, backward_kill, pid));
        Self {
            pumps: [forward, backward],
            carried,
        }
    }

    /// Waits for both directions to end; what each carried.
    fn join(self) -> [Arc<Carried>; 2] {
        for p in self.pumps {
            p.join().unwrap();
        }
        self.carried
    }
}

struct Run {
    result: Result<ferry_migration::MigrationStats, MigrationError>,
    source_paused: bool,
    bytes: [u64; 2],
    /// The destination's acknowledgement reached the source whole.
    ack_through: bool,
    killed: bool,
    elapsed: Duration,
}

fn migrate_killing(dir: &std::path::Path, kill: KillAt) -> Run {
    let socket = dir.join(format!("dest-{kill:?}.sock").replace(['(', ')', ' '], "_"));
    let _ = std::fs::remove_file(&socket);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["sim-receive", "--memory", "16M", "--listen"])
        .arg(format!("unix:{}", socket.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ferry sim-receive");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("LISTENING"), "{line:?}");
    let pid = child.id() as i32;

    let dest = UnixStream::connect(&socket).expect("connect to the destination");
    let (source_end, proxy_end) = UnixStream::pair().unwrap();
    let proxy = Proxy::start(proxy_end, dest, kill, pid);

    let mem = create_memory(MEMORY).unwrap();
    let vm = SimVm::new(
        Guest::new(mem.clone(), 5),
        SimConfig {
            used_percent: 40,
            workload: Workload::Churn { pages_per_tick: 16 },
            hints: Some(HintBehavior::Honest { delay_ticks: 1 }),
            zero_on_alloc: true,
        },
    );
    for _ in 0..20 {
        vm.tick();
    }
    let config = MigrationConfig {
        handshake_timeout: Duration::from_secs(5),
        stall_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(60),
        ..MigrationConfig::default()
    };
    let mut dirty = BitmapDirtyLog::lazy(mem.clone());
    let (mut control, mut driver) = (vm.clone(), SimDriver(vm.clone()));
    let mut hints = vm.hint_source();
    let started = Instant::now();
    let result = (|| {
        let mut m = Migration::new(&mem, &mut dirty, &mut control, &mut driver, config)?;
        if let Some(h) = hints.as_mut() {
            m.add_source(h);
        }
        m.run(vec![Connection::from_unix(source_end).unwrap()])
    })();
    let elapsed = started.elapsed();
    let status = child.wait().unwrap();
    let carried = proxy.join();
    let source_paused = vm.lock().paused;
    Run {
        result,
        source_paused,
        bytes: carried.each_ref().map(|c| c.read.load(Ordering::SeqCst)),
        ack_through: carried[1].watched_through(),
        killed: std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL),
        elapsed,
    }
}

#[test]
fn a_destination_killed_at_any_phase_never_leaves_the_source_wrong() {
    let dir = std::env::temp_dir().join(format!("ferry-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let clean = migrate_killing(&dir, KillAt::Never);
    assert!(clean.result.is_ok() && clean.source_paused && !clean.killed);
    let [forward, backward] = clean.bytes;
    assert!(forward > 1 << 20 && backward > 0, "{forward} {backward}");

    let mut points: Vec<KillAt> = (0..8).map(|i| KillAt::Forward(forward * i / 8)).collect();
    points.extend((1..=3).map(KillAt::ForwardEnd));
    points.extend((0..4).map(|i| KillAt::Backward(backward * i / 4)));
    points.extend((1..=4).map(KillAt::BackwardEnd));
    let mut endings = std::collections::BTreeMap::new();
    for kill in points {
        let run = migrate_killing(&dir, kill);
        // Once it has written its acknowledgement the destination may finish (verify, exit)
        // before the signal lands; before that it cannot.
        assert!(
            run.killed || matches!(kill, KillAt::Backward(_) | KillAt::BackwardEnd(_)),
            "{kill:?}: the destination was not killed"
        );
        assert!(
            run.elapsed < Duration::from_secs(30),
            "{kill:?}: the source took {:?}",
            run.elapsed
        );
        // A point past this run's end (streams vary a little in length: the rounds the
        // engine needs depend on the bandwidth it measures) kills nothing before the end.
        let ending = match &run.result {
            Ok(_) if !run.ack_through => panic!("{kill:?}: success reported, but the destination died before its acknowledgement was through"),
            Ok(_) => "succeeded, acknowledgement through",
            Err(MigrationError::OutcomeUnknown(_)) => {
                assert!(run.source_paused, "{kill:?}: outcome unknown, yet the source runs");
                "outcome unknown, source paused"
            }
            Err(e) => {
                assert!(!run.source_paused, "{kill:?}: failed ({e}), yet the source is paused");
                "failed, source runs"
            }
        };
        *endings.entry(ending).or_insert(0) += 1;
    }
    eprintln!("endings: {endings:?}");
    assert!(
        endings.contains_key("outcome unknown, source paused")
            && endings.contains_key("failed, source runs"),
        "both endings of a killed destination reached: {endings:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// How a destination in this process ended when its source process was killed.
#[derive(Debug)]
enum Received {
    /// It refused the migration (nothing would be restored).
    Refused(String),
    /// It received the whole stream: pages of the guest state that differ in its memory (None:
    /// the state did not decode), and whether its acknowledgement was written.
    Whole {
        mismatches: Option<usize>,
        acknowledged: bool,
    },
}

struct SourceRun {
    received: Received,
    /// How long the destination took, from its first connection to its verdict.
    elapsed: Duration,
    bytes: [u64; 2],
    killed: bool,
    source_output: String,
}

fn receive_killing_source(dir: &std::path::Path, kill: KillAt) -> SourceRun {
    let name = format!("{kill:?}").replace(['(', ')', ' '], "_");
    let dest_socket = dir.join(format!("recv-{name}.sock"));
    let proxy_socket = dir.join(format!("proxy-{name}.sock"));
    let _ = std::fs::remove_file(&dest_socket);
    let _ = std::fs::remove_file(&proxy_socket);
    let endpoint: Endpoint = format!("unix:{}", dest_socket.display()).parse().unwrap();
    let listener = Listener::bind(&endpoint).expect("destination listener");
    let receiver = std::thread::spawn(move || {
        let mem = create_memory(MEMORY).unwrap();
        let config = ReceiveConfig {
            accept_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            ..ReceiveConfig::default()
        };
        let dest = Destination::new(&mem, config).unwrap();
        let first = Instant::now();
        let received = match dest.accept(&listener) {
            Err(e) => Received::Refused(e.to_string()),
            Ok(r) => {
                let layout = MemoryLayout::from_guest_memory(&mem).unwrap();
                let mismatches = ferry_sim::state::decode(&r.device_state)
                    .map(|states| verify(&states, &mem, &layout).len());
                Received::Whole {
                    mismatches,
                    acknowledged: r.acknowledge().is_ok(),
                }
            }
        };
        (received, first.elapsed())
    });

    let proxy_listener = std::os::unix::net::UnixListener::bind(&proxy_socket).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["sim-send", "--memory", "16M", "--connect"])
        .arg(format!("unix:{}", proxy_socket.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ferry sim-send");
    let pid = child.id() as i32;
    let (source, _) = proxy_listener.accept().expect("the source connects");
    let dest = UnixStream::connect(&dest_socket).expect("connect to the destination");
    let proxy = Proxy::start(source, dest, kill, pid);
    let (received, elapsed) = receiver.join().expect("the destination thread");
    let mut source_output = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut source_output);
    }
    let status = child.wait().unwrap();
    let carried = proxy.join();
    SourceRun {
        received,
        elapsed,
        bytes: carried.each_ref().map(|c| c.read.load(Ordering::SeqCst)),
        killed: std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL),
        source_output,
    }
}

#[test]
fn a_source_killed_at_any_phase_never_leaves_a_wrong_destination() {
    let dir = std::env::temp_dir().join(format!("ferry-kill-source-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let clean = receive_killing_source(&dir, KillAt::Never);
    assert!(
        matches!(
            clean.received,
            Received::Whole {
                mismatches: Some(0),
                acknowledged: true
            }
        ),
        "{:?}",
        clean.received
    );
    assert!(!clean.killed && clean.source_output.starts_with("SENT "));
    let [forward, backward] = clean.bytes;
    assert!(forward > 1 << 20 && backward > 0, "{forward} {backward}");

    // Spread over the stream, then the last bytes one by one (Complete and its end); on the way
    // back the destination's preamble and reply to the handshake (the source dies before the
    // first page) and the last byte of its acknowledgement (the destination has everything).
    let mut points: Vec<KillAt> = (0..8).map(|i| KillAt::Forward(forward * i / 8)).collect();
    points.extend((1..=3).map(KillAt::ForwardEnd));
    points.extend([KillAt::Backward(0), KillAt::BackwardEnd(1)]);
    let (mut refused, mut whole) = (0, 0);
    for kill in points {
        let run = receive_killing_source(&dir, kill);
        assert!(
            run.elapsed < Duration::from_secs(30),
            "{kill:?}: the destination took {:?}",
            run.elapsed
        );
        let before_the_end = match kill {
            KillAt::Forward(_) | KillAt::ForwardEnd(_) | KillAt::Backward(0) => true,
            KillAt::Backward(_) | KillAt::BackwardEnd(_) | KillAt::Never => false,
        };
        match &run.received {
            Received::Refused(reason) if before_the_end => {
                assert!(run.killed, "{kill:?}: the source was not killed");
                eprintln!("{kill:?}: refused ({reason})");
                refused += 1;
            }
            Received::Whole { .. } if before_the_end => panic!(
                "{kill:?}: the destination accepted a stream the source never finished \
                 ({forward} bytes in a whole one): {:?}",
                run.received
            ),
            Received::Whole {
                mismatches: Some(0),
                ..
            } => whole += 1,
            other => panic!("{kill:?}: {other:?}"),
        }
    }
    eprintln!("source killed: {refused} refused by the destination, {whole} received whole");
    assert_eq!((refused, whole), (12, 1));
    let _ = std::fs::remove_dir_all(&dir);
}
