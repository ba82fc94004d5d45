//! The source side: drives a precopy migration of guest RAM.
//!
//! ```text
//! setup ─▶ bulk round (every page) ─▶ iterative dirty rounds ─▶ drain queued data ─▶ pause
//!       ─▶ final round ─▶ device state ─▶ Complete on every connection ─▶ wait for the
//!       destination's Ack
//! ```
//!
//! Every failure before every Complete was written leaves the VM running here: hint sources
//! are told `finish(Failed)` (or `Cancelled`), dirty logging is stopped, the throttle is
//! lifted, a paused VM is resumed, and the connections are shut down. After that the
//! destination may resume the guest at any moment, so only its explicit refusal resumes the
//! VM here; a lost acknowledgement (timeout, closed or cut connection) ends the migration
//! with [`MigrationError::OutcomeUnknown`] and the VM paused: never two running copies.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::audit::Audit;
use crate::bitmap::PageBitmap;
use crate::compress::{Codec, Compression};
use crate::convergence::{Convergence, Decision, OnNoConvergence, Policy};
use crate::dirty::{DirtyLog, DirtyLogError};
use crate::hint::{Epoch, HintInbox, HintKind, HintSource, HintTargets, Outcome};
use crate::lane::{Lane, LaneError, CHUNK_PAGES};
use crate::layout::{LayoutError, MemoryLayout, PAGE_SIZE};
use crate::progress::{Event, Observer};
use crate::stats::{MigrationStats, RoundStats};
use crate::transport::{Closer, Connection, RateLimiter, CONNECTIONS_MAX};
use crate::vm::{VmControl, VmControlError};
use crate::watchdog::{Trip, Watchdog, PAUSE_MARGIN};
use crate::wire::{
    self, Decoder, Encoder, Hello, Record, WireError, DESCRIPTION_BYTES_MAX,
    DEVICE_STATE_BYTES_MAX, MAGIC_DEST, MAGIC_SOURCE,
};
use crate::zero::page_is_zero;

/// Pages handled between two checkpoints (hint drain, progress, cancel and peer checks).
const CHECKPOINT_PAGES: u64 = 256;
/// Pages armed at once in the bulk round of a lazily arming dirty log (2 MiB, a multiple of
/// the 64 pages KVM_CLEAR_DIRTY_LOG needs).
const ARM_WINDOW_PAGES: u64 = 512;
/// Work a checkpoint may spend applying hints ([`crate::hint::HintInbox::drain`]: about a
/// message, a range or a 64-page bitmap word per unit): 65536 units cover 16 GiB of hinted
/// RAM in well under a millisecond, against about a millisecond to send the checkpoint's
/// 256 pages, so a guest's hints cannot slow the scan by more than a small factor, while an
/// honest guest (at most one hint per free page per epoch) is never held back for long.
pub const HINT_DRAIN_BUDGET: u64 = 1 << 16;
/// How long a failing source lets connection 0 drain so its error record reaches the peer.
const ERROR_DRAIN: Duration = Duration::from_secs(1);
/// How long the source lets queued data drain before it pauses the guest.
const DRAIN_MAX: Duration = Duration::from_secs(2);
/// How long, within [`DRAIN_MAX`], the source waits before the pause for the guest to finish
/// work a hint source asked of it ([`HintSource::busy`]). The balloon driver's free page hint
/// loop holds a vCPU in the guest's kernel; a pause that catches the guest there adds the
/// rest of that stall to what the guest's outside world sees as the switchover. In the lab
/// one turn of that loop (allocating and zeroing a 4 MiB block) took up to ~100 ms.
pub const SETTLE_MAX: Duration = Duration::from_millis(500);
/// After a busy guest finished its hint work, how long it runs on before the pause: a guest
/// that just spent a second in its kernel's hint loop has starved tasks to run. Without this
/// the lab showed pauses right after the driver's STOP, with the guest's userspace not yet
/// back: 1.1-1.2 s of guest pause for 25-28 ms of downtime.
pub const SETTLE_GRACE: Duration = Duration::from_millis(20);
/// Over how long a span the bulk round's head start judges whether the guest's hints still
/// pay (see [`MigrationConfig::hint_rate_floor`]), judged continuously once it has run that
/// long. Long enough that a guest whose hint loop stalls for a moment (in the lab one turn of
/// it took up to ~100 ms) is not taken for one that stopped; short, because a guest whose
/// hints dried up (in the lab: after ~0.3 s, its free memory down to the kernel's
/// watermarks, while it stays in its loop) costs it once.
pub const HINT_RATE_WINDOW: Duration = Duration::from_millis(250);
/// [`MigrationConfig::hint_rate_floor`] without a bandwidth limit: 1 Gbit/s, the slower end
/// of a link between hosts.
pub const HINT_RATE_FLOOR_DEFAULT: u64 = 125_000_000;
/// How long to wait for the destination's acknowledgement after the last byte.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);

/// Migration settings.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// Convergence policy (downtime target, round limit, auto-converge).
    pub policy: Policy,
    /// Give up (the VM keeps running here) after this long.
    pub timeout: Duration,
    /// Average send rate limit, bytes per second.
    pub bandwidth_limit: Option<u64>,
    /// How long each round waits for hint sources to answer before it starts scanning.
    /// Bounded, and cut short as soon as every source reports it is done.
    pub hint_head_start: Duration,
    /// How long the bulk round may wait for hints in all, counted from its start: past
    /// `hint_head_start` its head start runs on while a source's guest is still at work on
    /// the request ([`HintSource::busy`]) and its hints pay, and its scan stops to wait
    /// whenever they pay again: every page hinted before the scan reaches it is a page not
    /// sent. A guest that finishes or leaves its hint loop ends the wait at once, one whose
    /// hints spare less than [`Self::hint_rate_floor`] within a [`HINT_RATE_WINDOW`] ends it
    /// then. As waiting goes on only while it spares more than the link would send
    /// meanwhile, RAM divided by the floor bounds it too (8.6 s per GiB at 1 Gbit/s); this
    /// bounds it for any size. Later rounds do not run on: their queue is what was written
    /// since, mostly blocks the guest itself holds for its hints (which it cannot hint
    /// again), and in the lab waiting there spared no page (0-512 of 13,000-20,000 queued)
    /// for 200-280 ms a round.
    pub hint_head_start_max: Duration,
    /// Guest memory per second, in bytes, that the hints of free-page sources
    /// ([`HintKind::Free`]) must spare for the bulk round to wait for them (its head start to
    /// run on, its scan to stop): while the guest hints faster than the link could send what
    /// it hints, waiting costs less time than sending and saves every byte it spares. `None`: the bandwidth limit, or
    /// [`HINT_RATE_FLOOR_DEFAULT`] without one. In the lab a 1 GiB guest whose free memory
    /// the host had populated took over 2 s to hint it, at ~350 MB/s, while the link
    /// moved ~150 MB/s: a fixed 2 s limit cut it off and the scan sent ~130 MiB of free
    /// memory.
    pub hint_rate_floor: Option<u64>,
    /// Whether hint sources are used at all.
    pub hints: bool,
    /// Set to `true` from any thread to cancel.
    pub cancel: Arc<AtomicBool>,
    /// How long the destination may take to answer the handshake.
    pub handshake_timeout: Duration,
    /// A write to the destination that makes no progress for this long fails the migration
    /// (a peer that stopped reading must not stall it until the overall timeout).
    pub stall_timeout: Duration,
    /// Check at the switchover that the dirty log missed no write, and send what it missed
    /// (see [`crate::audit`]); costs downtime.
    pub audit_dirty_log: bool,
    /// What the destination needs to build the empty VM (see [`Hello::description`]); sent
    /// as it is, at most [`DESCRIPTION_BYTES_MAX`] bytes.
    pub description: Vec<u8>,
    /// Compression of page data, offered to the destination in the handshake; used only if
    /// it accepts (see [`crate::compress`]). `bandwidth_limit` counts the data before
    /// compression, so a compressed stream stays below the limit on the wire.
    pub compression: Compression,
    /// How much longer than planned the guest may stay paused before the switchover is given
    /// up and the guest resumed here (see [`crate::watchdog`]). Planned is the downtime
    /// limit, or, when the round limit forces a switchover
    /// ([`OnNoConvergence::SwitchOver`]), the downtime then expected.
    pub pause_margin: Duration,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            timeout: Duration::from_secs(30 * 60),
            bandwidth_limit: None,
            hint_head_start: Duration::from_millis(50),
            hint_head_start_max: Duration::from_secs(30),
            hint_rate_floor: None,
            hints: true,
            cancel: Arc::new(AtomicBool::new(false)),
            handshake_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(60),
            audit_dirty_log: false,
            description: Vec::new(),
            compression: Compression::None,
            pause_margin: PAUSE_MARGIN,
        }
    }
}

/// The longest duration a migration setting may have: a year, far beyond any real one, and
/// far enough below `Instant`'s range that deadlines computed from it cannot overflow.
pub const SETTING_DURATION_MAX: Duration = Duration::from_secs(365 * 24 * 3600);

impl MigrationConfig {
    /// Checks the settings a migration cannot run with; says which one is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let durations = [
            ("downtime limit", self.policy.downtime_max),
            ("timeout", self.timeout),
            ("hint head start", self.hint_head_start),
            ("longest hint head start", self.hint_head_start_max),
            ("handshake timeout", self.handshake_timeout),
            ("stall timeout", self.stall_timeout),
            ("pause margin", self.pause_margin),
        ];
        for (what, d) in durations {
            if d > SETTING_DURATION_MAX {
                return Err(format!(
                    "the {what} of {d:?} is longer than {SETTING_DURATION_MAX:?}"
                ));
            }
        }
        self.compression.validate().map(|_| ())
    }
}

/// Why a migration failed. In every case the VM is left running on the source.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Guest memory cannot be described.
    #[error("guest memory layout: {0}")]
    Layout(#[from] LayoutError),
    /// Bad argument.
    #[error("{0}")]
    Config(String),
    /// The stream failed.
    #[error("migration stream: {0}")]
    Wire(#[from] WireError),
    /// A connection's writer failed.
    #[error(transparent)]
    Lane(#[from] LaneError),
    /// Dirty tracking failed.
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
    /// VM control failed.
    #[error(transparent)]
    Vm(#[from] VmControlError),
    /// Reading guest memory failed.
    #[error("reading guest memory at {gpa:#x}: {source}")]
    Memory {
        /// Address.
        gpa: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The destination refused or failed.
    #[error("the destination reported: {0}")]
    Destination(String),
    /// The destination broke protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The overall timeout expired.
    #[error("migration timed out after {0:?}")]
    Timeout(Duration),
    /// The source handed the VM over (every byte, Complete included, was sent) but got
    /// neither the destination's acknowledgement nor its refusal. The destination may be
    /// running the guest, so the VM stays paused here: resuming it could give two running
    /// copies. The operator finds out which side runs and resumes or discards this one.
    #[error(
        "the VM was handed over to the destination but the outcome is unknown ({0}); it \
         stays paused here: resume it only once the destination is known not to run it"
    )]
    OutcomeUnknown(String),
    /// Cancelled by the user.
    #[error("migration cancelled")]
    Cancelled,
    /// `rounds_max` rounds did not converge and the policy says cancel.
    #[error(
        "the guest dirties memory faster than it can be sent: after {rounds} rounds the \
         switchover would pause it for about {expected_ms} ms (limit {limit_ms} ms), and the \
         policy is to cancel"
    )]
    NotConverged {
        /// Rounds run.
        rounds: u32,
        /// Expected downtime of a switchover now, milliseconds.
        expected_ms: u64,
        /// The downtime limit, milliseconds.
        limit_ms: u64,
    },
    /// The guest stayed paused longer than the downtime limit plus the watchdog's margin
    /// without the switchover completing; it was resumed here.
    #[error(
        "the switchover did not complete within {0:?} of pausing the guest; it runs here again"
    )]
    PauseTooLong(Duration),
}

/// The destination's replies, read on connection 0 by a helper thread.
type PeerReply = Result<wire::Ack, MigrationError>;

/// Where a migration is in its life; decides what cleanup a failure needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Precopy,
    Paused,
    /// Everything, Complete included, was written: the destination may resume the guest at
    /// any moment now. Only its acknowledgement (success) or its explicit refusal (resume
    /// here) decides; anything else leaves the VM paused here with the outcome unknown.
    HandedOver,
}

/// A migration of one VM's RAM to one destination.
pub struct Migration<'a, M: GuestMemoryBackend> {
    mem: &'a M,
    layout: MemoryLayout,
    dirty_log: &'a mut dyn DirtyLog,
    vm: &'a mut dyn VmControl,
    sources: Vec<&'a mut dyn HintSource>,
    observer: &'a mut dyn Observer,
    config: MigrationConfig,
}

/// The mutable state of a running migration.
struct Run {
    lanes: Vec<Lane>,
    closers: Vec<Closer>,
    /// Cuts the connections on cancel, timeout or an overlong pause (see [`crate::watchdog`]).
    watchdog: Watchdog,
    replies: Receiver<PeerReply>,
    /// Rounds the destination reports applied on every connection (`RoundApplied`).
    applied: Arc<AtomicU64>,
    inbox: HintInbox,
    to_send: PageBitmap,
    dest_nonzero: PageBitmap,
    known_zero: PageBitmap,
    limiter: Option<RateLimiter>,
    stats: MigrationStats,
    started: Instant,
    deadline: Instant,
    phase: Phase,
    sources_finished: bool,
    dirty_started: bool,
    /// The dirty log arms lazily and has not been fetched yet: pages must be armed right
    /// before they are read (see [`crate::dirty`]).
    arming: bool,
    /// The page the scanner is at (for logs).
    scan_at: u64,
    /// Per-source counters at the end of the previous round.
    skip_mark: Vec<crate::hint::SourceStats>,
    /// Time spent waiting for busy sources before a closing round: the wait before the pause
    /// gets what is left of [`SETTLE_MAX`].
    settle_spent: Duration,
    /// When that wait saw the guest leave the work a source asked of it.
    idle_since: Option<Instant>,
    /// Per source, pages hinted and skipped when the open epoch began.
    epoch_mark: Vec<(u64, u64)>,
    /// Per source, pages hinted in the open epoch as last told to it (`epoch_progress`).
    progress_told: Vec<u64>,
    /// What the destination holds, for the dirty-log audit (when it is on).
    audit: Option<Audit>,
    /// During the bulk round: how its hints pay, for the scan to wait while they do.
    pace: Option<HintPace>,
}

/// How fast the hints of free-page sources spare pages, over the last [`HINT_RATE_WINDOW`],
/// against the floor rate they must beat for the bulk round to wait for them.
struct HintPace {
    /// (when, pages spared by then); the front is the newest sample a window old or older.
    samples: VecDeque<(Instant, u64)>,
    /// Pages the hints must spare per window.
    floor: u64,
    /// The bulk round waits for hints until then at the latest.
    until: Instant,
}

impl HintPace {
    fn new(now: Instant, spared: u64, floor: u64, until: Instant) -> Self {
        Self {
            samples: VecDeque::from([(now, spared)]),
            floor,
            until,
        }
    }

    /// Records that `spared` pages were spared by `now`. Returns whether the hints beat the
    /// floor over the last window, or `None` before a window has passed.
    fn note(&mut self, now: Instant, spared: u64) -> Option<bool> {
        self.samples.push_back((now, spared));
        while self.samples.len() > 1 && now - self.samples[1].0 >= HINT_RATE_WINDOW {
            self.samples.pop_front();
        }
        let (since, then) = self.samples[0];
        (now - since >= HINT_RATE_WINDOW).then(|| spared.saturating_sub(then) >= self.floor)
    }
}

impl<'a, M: GuestMemoryBackend + Sync> Migration<'a, M> {
    /// Prepares a migration of `mem`. Nothing happens until [`run`](Self::run).
    pub fn new(
        mem: &'a M,
        dirty_log: &'a mut dyn DirtyLog,
        vm: &'a mut dyn VmControl,
        observer: &'a mut dyn Observer,
        config: MigrationConfig,
    ) -> Result<Self, MigrationError> {
        config.validate().map_err(MigrationError::Config)?;
        Ok(Self {
            layout: MemoryLayout::from_guest_memory(mem)?,
            mem,
            dirty_log,
            vm,
            sources: Vec::new(),
            observer,
            config,
        })
    }

    /// Registers a hint source. Ignored when the configuration turns hints off.
    pub fn add_source(&mut self, source: &'a mut dyn HintSource) {
        if self.config.hints {
            self.sources.push(source);
        }
    }

    /// Runs the migration over `connections` (1 to 16). Returns the statistics once the
    /// destination acknowledged everything; the caller may then stop the VM for good.
    pub fn run(mut self, connections: Vec<Connection>) -> Result<MigrationStats, MigrationError> {
        let mut run = self.setup(connections)?;
        let result = self.drive(&mut run);
        match result {
            Ok(()) => {
                run.watchdog.stand_down();
                run.stats.total_ms = ms(run.started.elapsed());
                run.stats.wire_bytes = run.lanes.iter().map(Lane::wire_bytes).sum();
                run.stats.sources = run.inbox.stats();
                self.observer.event(&Event::Completed(&run.stats));
                Ok(run.stats)
            }
            Err(e) => {
                // A wait the watchdog cut short fails with an I/O error; say why instead.
                let e = match (run.watchdog.tripped(), e) {
                    (_, e @ MigrationError::OutcomeUnknown(_)) => e,
                    (Some(Trip::Cancelled), _) => MigrationError::Cancelled,
                    (Some(Trip::Timeout), _) => MigrationError::Timeout(self.config.timeout),
                    (Some(Trip::PauseTooLong(d)), _) => MigrationError::PauseTooLong(d),
                    (None, e) => e,
                };
                self.fail(&mut run, &e);
                Err(e)
            }
        }
    }

    /// Handshake on every connection; starts writers, the reply reader and the sources.
    fn setup(&mut self, mut conns: Vec<Connection>) -> Result<Run, MigrationError> {
        let n = conns.len();
        if n == 0 || n > usize::from(CONNECTIONS_MAX) {
            return Err(MigrationError::Config(format!(
                "connections must be between 1 and {CONNECTIONS_MAX}, got {n}"
            )));
        }
        if self.config.description.len() > DESCRIPTION_BYTES_MAX {
            return Err(MigrationError::Config(format!(
                "the VM description is {} bytes long, more than the {DESCRIPTION_BYTES_MAX} \
                 the stream carries",
                self.config.description.len()
            )));
        }
        let closers: Vec<Closer> = conns.iter().map(Connection::closer).collect();
        let shut = |e: MigrationError| {
            closers.iter().for_each(Closer::shutdown);
            e
        };
        // Greet on every connection first: the destination answers only once all arrived.
        for (i, c) in conns.iter_mut().enumerate() {
            let mut enc = Encoder::new();
            enc.hello(&Hello {
                connection: i as u16,
                connections: n as u16,
                page_size: PAGE_SIZE as u32,
                regions: self.layout.regions().to_vec(),
                description: if i == 0 {
                    self.config.description.clone()
                } else {
                    Vec::new()
                },
                compression: self.config.compression.codec(),
            });
            wire::write_preamble(&mut c.writer, MAGIC_SOURCE)
                .and_then(|()| c.writer.write_all(enc.bytes()))
                .map_err(|e| shut(WireError::Io(e).into()))?;
        }
        let mut zeroed = true;
        let mut accepted = Vec::with_capacity(n);
        for c in conns.iter_mut() {
            // A peer that accepts but never answers (not a ferry destination, or one that
            // waits for connections that never come) must not hang the source.
            c.set_read_timeout(Some(self.config.handshake_timeout))
                .map_err(|e| shut(WireError::Io(e).into()))?;
            wire::read_preamble(&mut c.reader, MAGIC_DEST)
                .map_err(|e| shut(handshake_err(e, self.config.handshake_timeout)))?;
            match Decoder::new(&mut c.reader)
                .next_record()
                .map_err(|e| shut(handshake_err(e, self.config.handshake_timeout)))?
            {
                Record::HelloReply(r) => {
                    zeroed &= r.zeroed;
                    accepted.push(r.compression);
                }
                Record::Error(msg) => return Err(shut(MigrationError::Destination(msg))),
                r => {
                    return Err(shut(MigrationError::Protocol(format!(
                        "expected hello-reply, got {r:?}"
                    ))))
                }
            }
        }
        let compression = self.agreed_compression(&accepted).map_err(shut)?;
        let mut readers = Vec::with_capacity(n);
        let mut lanes = Vec::with_capacity(n);
        for (i, c) in conns.into_iter().enumerate() {
            c.set_read_timeout(None)
                .and_then(|()| c.set_write_timeout(Some(self.config.stall_timeout)))
                .map_err(|e| shut(WireError::Io(e).into()))?;
            readers.push(c.reader);
            lanes.push(
                Lane::spawn(i, c.writer, compression).map_err(|e| shut(WireError::Io(e).into()))?,
            );
        }
        let applied = Arc::new(AtomicU64::new(0));
        let replies = spawn_reply_reader(readers.swap_remove(0), applied.clone());
        let pages = self.layout.pages();
        let mut inbox = HintInbox::new();
        for s in self.sources.iter_mut() {
            let sink = inbox.register(s.name(), s.kind());
            s.start(sink);
        }
        let started = Instant::now();
        let deadline = started + self.config.timeout;
        let watchdog = Watchdog::start(closers.clone(), self.config.cancel.clone(), deadline)
            .map_err(|e| shut(WireError::Io(e).into()))?;
        self.observer.event(&Event::Connected {
            pages,
            connections: n as u16,
        });
        Ok(Run {
            lanes,
            closers,
            watchdog,
            replies,
            applied,
            inbox,
            to_send: PageBitmap::full(pages),
            dest_nonzero: if zeroed {
                PageBitmap::new(pages)
            } else {
                PageBitmap::full(pages)
            },
            known_zero: PageBitmap::new(pages),
            limiter: self.config.bandwidth_limit.map(RateLimiter::new),
            stats: MigrationStats {
                guest_bytes: self.layout.bytes(),
                connections: n as u16,
                compression,
                ..Default::default()
            },
            started,
            deadline,
            phase: Phase::Setup,
            sources_finished: false,
            dirty_started: false,
            arming: false,
            scan_at: 0,
            skip_mark: Vec::new(),
            settle_spent: Duration::ZERO,
            idle_since: None,
            epoch_mark: Vec::new(),
            progress_told: Vec::new(),
            audit: self.config.audit_dirty_log.then(|| Audit::new(pages)),
            pace: None,
        })
    }

    /// The compression every connection's destination accepted: the offer, or none when
    /// the destination declined it (logged; the migration goes on uncompressed).
    fn agreed_compression(&self, accepted: &[Codec]) -> Result<Compression, MigrationError> {
        let offer = self.config.compression;
        if accepted
            .iter()
            .any(|&c| c != offer.codec() && c != Codec::None)
            || accepted.windows(2).any(|w| w[0] != w[1])
        {
            return Err(MigrationError::Protocol(format!(
                "the destination answered the offer of {offer} with {accepted:?}"
            )));
        }
        if accepted.first() == Some(&Codec::None) && offer != Compression::None {
            tracing::warn!(
                "the destination declined {offer} compression; sending pages uncompressed"
            );
            return Ok(Compression::None);
        }
        Ok(offer)
    }

    /// Bulk round, iterative rounds, switchover.
    fn drive(&mut self, run: &mut Run) -> Result<(), MigrationError> {
        self.dirty_log.start()?;
        run.dirty_started = true;
        run.arming = self.dirty_log.arms_lazily();
        run.phase = Phase::Precopy;
        let mut conv = Convergence::new(self.config.policy.clone());
        let mut round = 0u32;
        // Whether this round's epoch asked the sources (a closing round does not).
        let mut asked = true;
        // How long the pause is planned to last: the limit, unless the round limit forces a
        // switchover expected to take longer.
        let mut pause_planned = self.config.policy.downtime_max;
        self.begin_epoch(run, Epoch(0));
        let mut head_start = self.head_start(run, true)?;
        loop {
            let t = Instant::now();
            let mut stats = self.send_round(run, round, true)?;
            // The bulk round's waits during its scan count with its head start.
            stats.head_start_ms += ms(head_start);
            run.pace = None;
            stats.closing = !asked;
            let mut answered = false;
            if asked {
                // The round's skips are in source (registration) order.
                for (s, (_, skipped)) in self.sources.iter_mut().zip(&stats.pages_skipped) {
                    s.epoch_yield(Epoch(u64::from(round)), *skipped);
                }
                // Whether a guest answered: hints of a free-kind source arrived, sparing pages
                // or not (a guest whose request ended early spared none, and wrote).
                let counts = run.inbox.page_counts().zip(&run.epoch_mark);
                for (s, ((hinted, _), mark)) in self.sources.iter().zip(counts) {
                    answered |= hinted > mark.0 && s.kind() == HintKind::Free;
                }
                // The fence: close the epoch, then sync.
                self.end_epoch(run, Epoch(u64::from(round)));
                answered |= self.sources.iter().any(|s| s.busy());
            }
            debug_assert!(
                run.inbox.is_closed(),
                "dirty log synced with hints still applicable"
            );
            self.dirty_log
                .fetch_and_clear(&self.layout, &mut run.to_send)?;
            run.arming = false;
            let elapsed = t.elapsed();
            stats.pages_dirtied = run.to_send.count();
            stats.dirty_rate_pages_per_s = stats.pages_dirtied as f64 / elapsed.as_secs_f64();
            stats.duration_ms = ms(elapsed);
            stats.throttle_percent = conv.throttle();
            self.finish_round(run, stats);
            let decision = conv.after_round(
                round,
                run.stats.rounds.last().map_or(0, |r| r.bytes),
                elapsed,
                run.to_send.count(),
            );
            match decision {
                Decision::Iterate if !asked => {
                    // Closing rounds go on without hint requests while they pay (the
                    // guest may have written much while it stopped answering).
                    self.vm.set_throttle(conv.throttle());
                    round += 1;
                    head_start = Duration::ZERO;
                }
                Decision::Iterate => {
                    self.vm.set_throttle(conv.throttle());
                    round += 1;
                    self.begin_epoch(run, Epoch(u64::from(round)));
                    // Every later round starts with the base head start (without running
                    // on): after a lazily armed bulk round, round 1 holds every page the
                    // bulk round skipped, and the never-populated ones must be hinted again
                    // before the scanner would read (and so populate) them.
                    head_start = self.head_start(run, false)?;
                }
                Decision::SwitchOver if asked && answered && round < conv.policy().rounds_max => {
                    // The guest answered hint requests in the last epoch: what it wrote to
                    // answer them (Linux with init_on_alloc clears every block it hints) is
                    // in the dirty set now and is not written again. A closing round sends
                    // it while the guest runs instead of in the pause: no hint request (its
                    // answer would write more), once the guest has stopped (bounded), and
                    // after one more sync for what it wrote while stopping.
                    round += 1;
                    asked = false;
                    head_start = self.settle(run)?;
                    self.dirty_log
                        .fetch_and_clear(&self.layout, &mut run.to_send)?;
                    conv.requeued(run.to_send.count());
                }
                Decision::SwitchOver => break,
                Decision::RoundLimit => {
                    let expected = conv.expected_downtime(run.to_send.count());
                    // Switching over anyway plans a longer pause: the watchdog must not cut
                    // it at the limit it was decided to exceed (in the lab a guest over a
                    // slow link was paused, expected 7.7 s, and cut at 5.3 s: a failed
                    // migration after the longest pause of all).
                    pause_planned = pause_planned.max(expected);
                    if conv.policy().on_no_convergence == OnNoConvergence::Cancel {
                        return Err(MigrationError::NotConverged {
                            rounds: round + 1,
                            expected_ms: expected.as_millis().min(u128::from(u64::MAX)) as u64,
                            limit_ms: conv.policy().downtime_max.as_millis() as u64,
                        });
                    }
                    tracing::warn!(
                        rounds = round + 1,
                        expected_downtime_ms = ms(expected),
                        "round limit reached before convergence; switching over anyway"
                    );
                    break;
                }
            }
        }
        self.drain_before_pause(run)?;
        self.switch_over(run, round + 1, pause_planned)
    }

    /// Waits, within what is left of [`SETTLE_MAX`], for every source to say the guest is
    /// done with the work it asked of it ([`HintSource::busy`]). Returns how long it waited.
    fn settle(&mut self, run: &mut Run) -> Result<Duration, MigrationError> {
        let start = Instant::now();
        let bound = SETTLE_MAX.saturating_sub(run.settle_spent);
        let mut was_busy = false;
        while self.sources.iter().any(|s| s.busy()) {
            was_busy = true;
            if start.elapsed() >= bound {
                break;
            }
            for lane in &mut run.lanes {
                lane.check_writer()?;
            }
            self.check(run)?;
            thread::sleep(Duration::from_millis(1));
        }
        let waited = start.elapsed();
        run.settle_spent += waited;
        if was_busy && !self.sources.iter().any(|s| s.busy()) {
            run.idle_since = Some(Instant::now());
        }
        Ok(waited)
    }

    /// Lets the destination apply everything sent so far while the guest still runs (it
    /// reports each round applied on every connection), so that the pause does not wait for a
    /// backlog of earlier rounds (in this end's queues, in socket buffers, or behind a
    /// destination slower than this end), and lets the guest finish work a hint source asked
    /// of it ([`HintSource::busy`], at most [`SETTLE_MAX`]), so that the pause does not
    /// stretch a guest stall. Bounded by [`DRAIN_MAX`]; pages the guest writes meanwhile are
    /// in the dirty log and go in the final round. A guest that never finishes costs the
    /// bound and nothing else.
    /// A failed writer, a cancel, the timeout or the destination's error ends the migration
    /// here, before the pause.
    fn drain_before_pause(&mut self, run: &mut Run) -> Result<(), MigrationError> {
        let t = Instant::now();
        let deadline = t + DRAIN_MAX;
        let mut settled = None;
        // A closing round's wait counts: its guest gets the grace from when it stopped, and
        // the two waits share one bound.
        let (mut seen_busy, mut idle_since) = (run.idle_since.is_some(), run.idle_since);
        let settle_max = SETTLE_MAX.saturating_sub(run.settle_spent);
        loop {
            for lane in &mut run.lanes {
                lane.check_writer()?;
            }
            self.check(run)?;
            if run.watchdog.tripped().is_some() {
                // The caller reports the trip (cancel, timeout) as the cause.
                return Err(MigrationError::Cancelled);
            }
            let now = Instant::now();
            if settled.is_none() {
                if self.sources.iter().any(|s| s.busy()) {
                    seen_busy = true;
                    idle_since = None;
                } else {
                    // A guest that was busy gets a moment to catch up; one that was not
                    // is paused at once.
                    let since = *idle_since.get_or_insert(now);
                    if !seen_busy || now - since >= SETTLE_GRACE {
                        settled = Some(now);
                    }
                }
                if settled.is_none() && now >= t + settle_max {
                    tracing::debug!(
                        "the guest is still busy with hint work after {SETTLE_MAX:?}; pausing it"
                    );
                    settled = Some(now);
                }
            }
            // Everything sent is in the destination's memory: the rounds' ends too.
            let rounds = run.stats.rounds.len() as u64;
            let drained = run.lanes.iter().all(|l| l.queued_bytes() == 0)
                && run.applied.load(Ordering::SeqCst) >= rounds;
            if (drained && settled.is_some()) || now >= deadline {
                run.stats.switchover.settle_ms = ms(settled.unwrap_or(now) - t);
                run.stats.switchover.applied_before_pause = drained;
                if !drained {
                    tracing::debug!(
                        "the destination has not applied everything after {DRAIN_MAX:?}; \
                         pausing the guest with a backlog"
                    );
                }
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        run.stats.switchover.drain_ms = ms(t.elapsed());
        Ok(())
    }

    /// Opens epoch `epoch` for hint application and tells the sources.
    fn begin_epoch(&mut self, run: &mut Run, epoch: Epoch) {
        run.inbox.open(epoch);
        run.epoch_mark = run.inbox.page_counts().collect();
        run.progress_told = vec![0; run.epoch_mark.len()];
        for s in self.sources.iter_mut() {
            s.epoch_begin(epoch);
        }
    }

    /// Tells the sources the epoch ends and closes it: the fence before every sync.
    fn end_epoch(&mut self, run: &mut Run, epoch: Epoch) {
        for s in self.sources.iter_mut() {
            s.epoch_end(epoch);
        }
        run.inbox.close();
        run.known_zero.clear_all();
        // Whatever is queued now is stale: count it and make room.
        self.drain_hints(run);
    }

    /// Lets sources answer the epoch before the scan starts: `hint_head_start`, then (in the
    /// `bulk` round) on while a busy source's hints keep arriving, up to
    /// `hint_head_start_max`; cut short once every source is done. Returns how long it waited.
    fn head_start(&mut self, run: &mut Run, bulk: bool) -> Result<Duration, MigrationError> {
        let start = Instant::now();
        if self.sources.is_empty() {
            return Ok(Duration::ZERO);
        }
        let base = start + self.config.hint_head_start;
        let cap = if bulk {
            start
                + self
                    .config
                    .hint_head_start_max
                    .max(self.config.hint_head_start)
        } else {
            base
        };
        // Pages the free-page sources' hints must spare per window for the wait to go on.
        let floor = self
            .config
            .hint_rate_floor
            .or(self.config.bandwidth_limit)
            .unwrap_or(HINT_RATE_FLOOR_DEFAULT)
            .saturating_mul(HINT_RATE_WINDOW.as_millis() as u64)
            / 1000
            / PAGE_SIZE;
        let mut pace = HintPace::new(start, self.pages_spared(run), floor, cap);
        let waited = loop {
            let now = Instant::now();
            self.drain_hints(run);
            if run.inbox.all_complete() || now >= cap {
                break now - start;
            }
            let busy = self.sources.iter().any(|s| s.busy());
            let paying = pace.note(now, self.pages_spared(run));
            if now >= base && (!busy || paying == Some(false)) {
                break now - start;
            }
            self.check(run)?;
            thread::sleep(Duration::from_millis(1));
        };
        // The bulk round's scan goes on waiting whenever the hints pay again.
        run.pace = bulk.then_some(pace);
        Ok(waited)
    }

    /// During the bulk round's scan, once hints were applied: waits (up to the head start's
    /// limit, counted from its start) while the guest's hints pay, applying them, so that
    /// what they cover is not sent. A guest's hint loop can stall for longer than the
    /// judging window and then go on at full speed (in the lab a 4 GiB guest whose head start
    /// ended at 0.9 s hinted another 2.2 GiB during the scan, which had sent 872 MiB of it).
    /// Returns the pages spared and how long it waited.
    fn wait_while_hints_pay(&mut self, run: &mut Run) -> Result<(u64, Duration), MigrationError> {
        let start = Instant::now();
        let mut skipped = 0;
        loop {
            let spared = self.pages_spared(run);
            let done = run.inbox.all_complete() || !self.sources.iter().any(|s| s.busy());
            let Some(pace) = run.pace.as_mut() else {
                break;
            };
            let now = Instant::now();
            if done || now >= pace.until || pace.note(now, spared) != Some(true) {
                break;
            }
            self.check(run)?;
            thread::sleep(Duration::from_millis(1));
            skipped += self.drain_hints(run);
        }
        Ok((skipped, start.elapsed()))
    }

    /// Applies queued hints at a point of a round's scan where that is allowed, then (in the
    /// bulk round) waits while they pay; the wait counts in the round's `head_start_ms`.
    /// Returns the pages spared.
    fn hints_during_scan(
        &mut self,
        run: &mut Run,
        stats: &mut RoundStats,
    ) -> Result<u64, MigrationError> {
        let drained = self.drain_hints(run);
        let (spared, waited) = self.wait_while_hints_pay(run)?;
        stats.head_start_ms += ms(waited);
        Ok(drained + spared)
    }

    /// Pages the hints of free-page sources spared so far (hints repeating what a source of
    /// never-populated memory reported spare nothing).
    fn pages_spared(&self, run: &Run) -> u64 {
        self.sources
            .iter()
            .zip(run.inbox.page_counts())
            .filter(|(s, _)| s.kind() == HintKind::Free)
            .map(|(_, (_, skipped))| skipped)
            .sum()
    }

    fn drain_hints(&mut self, run: &mut Run) -> u64 {
        let mut targets = HintTargets {
            to_send: &mut run.to_send,
            dest_nonzero: &run.dest_nonzero,
            known_zero: &mut run.known_zero,
            audit: run.audit.as_mut(),
        };
        let drained = run
            .inbox
            .drain(&self.layout, &mut targets, HINT_DRAIN_BUDGET);
        run.stats.hint_work += drained.work;
        run.stats.hint_drain_work_max = run.stats.hint_drain_work_max.max(drained.work);
        if let Some(epoch) = run.inbox.open_epoch().filter(|_| drained.work > 0) {
            // Tell each source how its hints of the epoch fared, when more were applied.
            let counts = run.inbox.page_counts().zip(&run.epoch_mark);
            for ((s, told), ((hinted, skipped), mark)) in self
                .sources
                .iter_mut()
                .zip(run.progress_told.iter_mut())
                .zip(counts)
            {
                let hinted = hinted - mark.0;
                if hinted > *told {
                    *told = hinted;
                    s.epoch_progress(epoch, hinted, skipped - mark.1);
                }
            }
        }
        let skipped = drained.pages_skipped;
        if skipped > 0 {
            tracing::debug!(
                skipped,
                scan_at = run.scan_at,
                left = run.to_send.count(),
                ms = ms(run.started.elapsed()),
                "hints applied"
            );
        }
        skipped
    }

    /// Cancel, timeout and destination-failure checks.
    fn check(&self, run: &Run) -> Result<(), MigrationError> {
        if self.config.cancel.load(Ordering::Relaxed) {
            return Err(MigrationError::Cancelled);
        }
        if Instant::now() >= run.deadline {
            return Err(MigrationError::Timeout(self.config.timeout));
        }
        match run.replies.try_recv() {
            Ok(Err(e)) => Err(e),
            Ok(Ok(_)) => Err(MigrationError::Protocol(
                "acknowledged before completion".into(),
            )),
            Err(_) => Ok(()),
        }
    }

    /// Sends every page queued in `to_send`, applying hints between batches if `hinting`.
    fn send_round(
        &mut self,
        run: &mut Run,
        round: u32,
        hinting: bool,
    ) -> Result<RoundStats, MigrationError> {
        let queued = run.to_send.count();
        self.observer.event(&Event::RoundStarted {
            round,
            pages_queued: queued,
            is_final: !hinting,
        });
        let mut stats = RoundStats {
            round,
            is_final: !hinting,
            pages_queued: queued,
            ..Default::default()
        };
        let lanes = run.lanes.len() as u64;
        let mut cursor = 0;
        let mut done = 0u64;
        let mut skipped = 0u64;
        let mut next_checkpoint = CHECKPOINT_PAGES;
        // While arming (bulk round of a lazily arming log), hints are applied only at arm
        // window boundaries: every page armed is then read, as the log requires.
        let mut armed_until = 0u64;
        while let Some(mut i) = run.to_send.next_set(cursor) {
            if run.arming && i >= armed_until {
                if hinting {
                    skipped += self.hints_during_scan(run, &mut stats)?;
                    match run.to_send.next_set(cursor) {
                        Some(j) => i = j,
                        None => break,
                    }
                }
                let start = i - i % ARM_WINDOW_PAGES;
                armed_until = (start + ARM_WINDOW_PAGES).min(run.to_send.len());
                let words = run.to_send.words_in(start, armed_until, &run.known_zero);
                self.dirty_log.arm(&self.layout, start, &words)?;
            }
            run.to_send.clear(i);
            run.scan_at = i;
            cursor = i + 1;
            let gpa = self.layout.gpa_of(i);
            let lane = &mut run.lanes[((i / CHUNK_PAGES) % lanes) as usize];
            let zero = if run.known_zero.get(i) {
                true
            } else {
                let page = self
                    .mem
                    .get_slice(GuestAddress(gpa), PAGE_SIZE as usize)
                    .map_err(|source| MigrationError::Memory { gpa, source })?;
                // Checked in place: a zero page is not copied at all.
                if page_is_zero(&page) {
                    true
                } else {
                    let slot = lane.page_slot(gpa);
                    page.copy_to(slot);
                    if let Some(a) = run.audit.as_mut() {
                        a.sent(i, slot);
                    }
                    run.dest_nonzero.set(i);
                    stats.pages_sent += 1;
                    stats.bytes += lane.keep_page(run.limiter.as_mut())?;
                    false
                }
            };
            if zero {
                if let Some(a) = run.audit.as_mut() {
                    a.sent_zero(i);
                }
                stats.pages_zero += 1;
                if run.dest_nonzero.get(i) {
                    run.dest_nonzero.clear(i);
                    stats.bytes += lane.zero_page(gpa, run.limiter.as_mut())?;
                }
            }
            done += 1;
            if done >= next_checkpoint {
                next_checkpoint = done + CHECKPOINT_PAGES;
                if hinting && !run.arming {
                    skipped += self.hints_during_scan(run, &mut stats)?;
                }
                self.check(run)?;
                self.observer.event(&Event::Progress {
                    round,
                    pages_done: done + skipped,
                    pages_left: queued.saturating_sub(done + skipped),
                    bytes: run.stats.bytes + stats.bytes,
                });
            }
        }
        for lane in &mut run.lanes {
            stats.bytes += lane.end_round(round, run.limiter.as_mut())?;
        }
        // Attribute skips since the previous round (including the head start) to this one.
        let now = run.inbox.stats();
        stats.pages_skipped = now
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let before = run.skip_mark.get(i).map_or(0, |b| b.pages_skipped);
                (a.name.clone(), a.pages_skipped - before)
            })
            .collect();
        run.skip_mark = now;
        Ok(stats)
    }

    fn finish_round(&mut self, run: &mut Run, mut stats: RoundStats) {
        stats.bandwidth_bytes_per_s = stats.bytes as f64 / (stats.duration_ms / 1000.0).max(1e-9);
        self.observer.event(&Event::RoundFinished(&stats));
        run.stats.push_round(stats);
    }

    /// Pause, final round without hints, device state, completion, acknowledgement; the
    /// switchover is given up if it has not handed over `planned` plus the pause margin
    /// after the pause.
    fn switch_over(
        &mut self,
        run: &mut Run,
        round: u32,
        planned: Duration,
    ) -> Result<(), MigrationError> {
        let paused_at = Instant::now();
        let mut lap = Lap(paused_at);
        let bound = planned.saturating_add(self.config.pause_margin);
        run.stats.switchover.pause_bound_ms = ms(bound);
        run.watchdog.paused(paused_at, bound);
        self.vm.pause()?;
        run.phase = Phase::Paused;
        run.stats.switchover.pause_ms = lap.next();
        self.observer.event(&Event::Paused);
        debug_assert!(run.inbox.is_closed());
        self.dirty_log
            .fetch_and_clear(&self.layout, &mut run.to_send)?;
        run.arming = false;
        run.stats.switchover.dirty_sync_ms = lap.next();
        // Hinting is over before the device state is saved, so the guest finds its hinted
        // pages released (cmd_id DONE) when it resumes at the destination.
        self.finish_sources(run, Outcome::Switchover);
        run.stats.switchover.hints_finish_ms = lap.next();
        let t = Instant::now();
        let mut stats = self.send_round_final(run, round)?;
        run.stats.switchover.final_round_ms = lap.next();
        self.audit(run, round + 1, &mut stats)?;
        run.stats.switchover.audit_ms = lap.next();
        let state = self.vm.save_state()?;
        run.stats.switchover.save_state_ms = lap.next();
        run.stats.switchover.state_bytes = state.len() as u64;
        if state.len() > DEVICE_STATE_BYTES_MAX {
            return Err(MigrationError::Config(format!(
                "device state of {} bytes exceeds the format's limit of {DEVICE_STATE_BYTES_MAX}",
                state.len()
            )));
        }
        run.lanes[0].device_state(&state);
        // Until every Complete is written the destination cannot resume the guest: a failure
        // up to here resumes it here.
        for lane in &mut run.lanes {
            stats.bytes += lane.complete()?;
        }
        run.phase = Phase::HandedOver;
        run.stats.switchover.flush_ms = lap.next();
        if !run.watchdog.handed_over() {
            // Cut while the last records were in flight: they may still arrive.
            return Err(MigrationError::OutcomeUnknown(
                "the connections were cut right after the last record was written".into(),
            ));
        }
        stats.duration_ms = ms(t.elapsed());
        self.finish_round(run, stats);
        let ack = match run.replies.recv_timeout(ACK_TIMEOUT) {
            Ok(Ok(ack)) => ack,
            // An explicit refusal: the destination discarded its copy.
            Ok(Err(e @ MigrationError::Destination(_))) => return Err(e),
            Ok(Err(e)) => return Err(MigrationError::OutcomeUnknown(e.to_string())),
            Err(_) => {
                return Err(MigrationError::OutcomeUnknown(format!(
                    "no acknowledgement within {ACK_TIMEOUT:?}"
                )))
            }
        };
        run.stats.switchover.ack_wait_ms = lap.next();
        run.stats.switchover.destination_ms = ack.destination_us as f64 / 1000.0;
        let sent: u64 = run.lanes.iter().map(|l| l.summary.pages).sum();
        if ack.summary.pages != sent {
            // The destination runs the guest, but did not count what was sent: a bug on one
            // side. Its copy is the one that runs; this one stays paused.
            return Err(MigrationError::OutcomeUnknown(format!(
                "destination acknowledged {} pages, {sent} were sent",
                ack.summary.pages
            )));
        }
        run.stats.downtime_ms = ms(paused_at.elapsed());
        self.dirty_log.stop();
        self.vm.set_throttle(0);
        Ok(())
    }

    fn send_round_final(
        &mut self,
        run: &mut Run,
        round: u32,
    ) -> Result<RoundStats, MigrationError> {
        let mut stats = self.send_round(run, round, false)?;
        stats.pages_dirtied = 0;
        Ok(stats)
    }

    /// The dirty-log audit (when on): sends, as one more round, every page whose content
    /// changed since it was sent without the dirty log reporting it. The guest is paused.
    fn audit(
        &mut self,
        run: &mut Run,
        round: u32,
        stats: &mut RoundStats,
    ) -> Result<(), MigrationError> {
        let Some(audit) = run.audit.as_ref() else {
            return Ok(());
        };
        let t = Instant::now();
        let stale = audit
            .stale(self.mem, &self.layout)
            .map_err(|(gpa, source)| MigrationError::Memory { gpa, source })?;
        let missed = stale.count();
        if missed > 0 {
            tracing::warn!(
                pages = missed,
                first = stale.next_set(0).map(|i| self.layout.gpa_of(i)),
                "dirty-log audit: pages were written without the dirty log reporting them; \
                 sending them in the downtime"
            );
            run.to_send.or_with(&stale);
            let extra = self.send_round(run, round, false)?;
            stats.pages_queued += extra.pages_queued;
            stats.pages_sent += extra.pages_sent;
            stats.pages_zero += extra.pages_zero;
            stats.bytes += extra.bytes;
        }
        run.stats.pages_missed_by_dirty_log = missed;
        run.stats.audit_ms = ms(t.elapsed());
        Ok(())
    }

    fn finish_sources(&mut self, run: &mut Run, outcome: Outcome) {
        if !run.sources_finished {
            run.sources_finished = true;
            for s in self.sources.iter_mut() {
                s.finish(outcome);
            }
        }
    }

    /// Leaves the VM running here after a failure, unless it was handed over and the
    /// destination did not refuse it (then it stays paused: see [`Phase::HandedOver`]).
    fn fail(&mut self, run: &mut Run, e: &MigrationError) {
        run.watchdog.stand_down();
        let keep_paused = matches!(e, MigrationError::OutcomeUnknown(_));
        if keep_paused {
            tracing::error!(error = %e, "migration outcome unknown; the VM stays paused here");
        } else {
            tracing::warn!(error = %e, "migration failed; the VM keeps running on the source");
        }
        let outcome = if matches!(e, MigrationError::Cancelled) {
            Outcome::Cancelled
        } else {
            Outcome::Failed
        };
        run.inbox.close();
        self.finish_sources(run, outcome);
        if run.dirty_started {
            self.dirty_log.stop();
        }
        self.vm.set_throttle(0);
        // Tell the destination why, best effort, then cut the connections so that no
        // writer stays blocked on a peer that stopped reading.
        if run.phase != Phase::HandedOver {
            if let Some(lane) = run.lanes.first_mut() {
                lane.send_error(&e.to_string(), ERROR_DRAIN);
            }
        }
        run.closers.iter().for_each(Closer::shutdown);
        run.lanes.iter_mut().for_each(Lane::abort);
        if matches!(run.phase, Phase::Paused | Phase::HandedOver) && !keep_paused {
            if let Err(re) = self.vm.resume() {
                tracing::error!(error = %re, "could not resume the VM after a failed migration");
            }
        }
    }
}

/// A handshake read error, with a timeout said as such.
fn handshake_err(e: WireError, timeout: Duration) -> MigrationError {
    match &e {
        WireError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            MigrationError::Protocol(format!(
                "the destination did not answer the handshake within {timeout:?}"
            ))
        }
        _ => e.into(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A stopwatch for consecutive phases.
struct Lap(Instant);

impl Lap {
    /// Milliseconds since the last call (or the start), and starts the next phase.
    fn next(&mut self) -> f64 {
        let now = Instant::now();
        let elapsed = ms(now - self.0);
        self.0 = now;
        elapsed
    }
}

/// Reads the destination's replies on connection 0: `RoundApplied` records count into
/// `applied`; the first `Ack`, `Error` or anything else ends it and goes to the channel.
fn spawn_reply_reader(
    r: Box<dyn std::io::Read + Send>,
    applied: Arc<AtomicU64>,
) -> Receiver<PeerReply> {
    let (tx, rx) = mpsc::sync_channel(1);
    let spawned = thread::Builder::new()
        .name("ferry-rx-reply".into())
        .spawn(move || {
            let mut d = Decoder::new(r);
            let mut record = d.next_record();
            // Rounds come in order, each once.
            while let Ok(Record::RoundApplied(round)) = record {
                if u64::from(round) != applied.load(Ordering::SeqCst) {
                    record = Err(WireError::Invalid("round-applied out of order"));
                    break;
                }
                applied.store(u64::from(round) + 1, Ordering::SeqCst);
                record = d.next_record();
            }
            let reply = match record {
                Ok(Record::Ack(s)) => Ok(s),
                Ok(Record::Error(msg)) => Err(MigrationError::Destination(msg)),
                Ok(r) => Err(MigrationError::Protocol(format!(
                    "unexpected {r:?} from the destination"
                ))),
                // Not a refusal: a destination that acknowledged and then lost the
                // connection looks the same from here.
                Err(WireError::Closed) => Err(MigrationError::Protocol(
                    "the destination closed the connection without a reply".into(),
                )),
                Err(e) => Err(e.into()),
            };
            let _ = tx.send(reply);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the reply reader");
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replies(records: impl FnOnce(&mut Encoder)) -> (PeerReply, u64) {
        let mut e = Encoder::new();
        records(&mut e);
        let applied = Arc::new(AtomicU64::new(0));
        let rx = spawn_reply_reader(Box::new(std::io::Cursor::new(e.take())), applied.clone());
        let reply = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        (reply, applied.load(Ordering::SeqCst))
    }

    #[test]
    fn applied_rounds_count_up_until_the_acknowledgement() {
        let ack = wire::Ack {
            summary: wire::Summary::default(),
            destination_us: 7,
        };
        let (reply, applied) = replies(|e| {
            e.round_applied(0);
            e.round_applied(1);
            e.ack(ack);
        });
        assert_eq!((reply.unwrap(), applied), (ack, 2));
        // Out of order (a round skipped or repeated) is a protocol error.
        let (reply, applied) = replies(|e| {
            e.round_applied(0);
            e.round_applied(2);
        });
        assert!(
            matches!(reply, Err(MigrationError::Wire(WireError::Invalid(_)))),
            "{reply:?}"
        );
        assert_eq!(applied, 1);
    }
}
