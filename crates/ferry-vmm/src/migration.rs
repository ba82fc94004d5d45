//! Live migration of a running [`Vmm`]: the glue between the VMM, the balloon's hint sources
//! and the `ferry-migration` engine, on both sides.
//!
//! Source ([`migrate`]): dirty log = KVM's per-slot log OR the device write bitmap
//! ([`Vmm::dirty_log`]); hint sources (unless hints are off) = the balloon's free page hints,
//! its reported (discarded) ranges and never-populated memory; VM control = pause, resume and
//! the machine state sealed in the [`state_format`] envelope. On any failure the engine
//! leaves the VM running, dirty logging off and the balloon's hinting ended (DONE). After
//! a success the VM stays paused: the destination acknowledged that it runs the guest now.
//!
//! Destination ([`receive`]): an [`IncomingVm`] with zeroed RAM receives the stream; the
//! machine state is decoded and restored, the control API is bound, and only then is the
//! source acknowledged and the guest resumed. A failure before the acknowledgement rejects
//! the migration (the source resumes its VM) and discards everything here.
//!
//! The control API ([`Supervisor`]): `{"cmd":"migrate","to":ADDR,"options":{..}}` runs the
//! migration on its own thread and answers with the final [`MigrationStats`]; meanwhile
//! `status` carries a `migration` object ([`MigrationProgress`]). After a success the source
//! VMM exits shortly after the answer was handed to the API.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_migration::{
    Destination, Endpoint, Event, Listener, Migration, MigrationConfig, MigrationStats, Observer,
    Policy, ReceiveConfig, ReceiveError, ReceiveStats, UnpopulatedSource, VmControl,
    VmControlError,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{self, ApiClient, ApiError, Request};
use crate::bus::lock;
use crate::config::{check_socket_free, ConfigError, VmConfig};
use crate::state_format::{self, StateFormatError};
use crate::vmm::{Vmm, VmmError};
use crate::{ExitReason, IncomingVm};

/// How long a source VMM keeps serving after a successful migration, so that the API reply
/// with the statistics reaches the client before the process exits.
pub const EXIT_LINGER: Duration = Duration::from_millis(1000);

/// Everything that can go wrong migrating out or in.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Bad options.
    #[error("invalid migration options: {0}")]
    Options(String),
    /// A migration of this VM is already running.
    #[error("a migration is already running (to {0})")]
    Busy(String),
    /// The destination cannot be reached.
    #[error("cannot connect to the destination {endpoint}: {source}")]
    Connect {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The engine failed; on the source the VM keeps running.
    #[error("migration failed (the VM keeps running here): {0}")]
    Engine(#[from] ferry_migration::MigrationError),
    /// The guest stopped here while it was being migrated (it reset, e.g. on a triple
    /// fault, or powered off): the migration failed and nothing runs on either side.
    #[error(
        "migration failed because the guest stopped here during it ({reason:?}); it runs \
         neither here nor at the destination: {source}"
    )]
    GuestStopped {
        /// Why the guest stopped.
        reason: ExitReason,
        /// What the engine reported.
        #[source]
        source: ferry_migration::MigrationError,
    },
    /// Listening for the source failed.
    #[error("cannot listen on {endpoint}: {source}")]
    Listen {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Receiving failed; nothing was restored.
    #[error("receiving the migration failed, nothing was restored: {0}")]
    Receive(#[from] ReceiveError),
    /// The machine state is damaged or foreign; nothing was restored.
    #[error("the source's machine state was refused, nothing was restored: {0}")]
    State(#[from] StateFormatError),
    /// Creating or restoring the VM failed.
    #[error("{what}: {source}")]
    Vm {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: VmmError,
    },
    /// The destination configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The acknowledgement could not be sent: the source resumes its copy, this one is
    /// discarded.
    #[error("cannot acknowledge the migration to the source, discarding this copy: {0}")]
    Acknowledge(#[source] ferry_migration::wire::WireError),
    /// The VMM's control API failed.
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl MigrateError {
    /// Whether the guest was handed over without an answer: it stays paused here.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            MigrateError::Engine(ferry_migration::MigrationError::OutcomeUnknown(_))
        )
    }
}

/// Migration settings, as given to `ferry migrate` and in the API's `options` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrateOptions {
    /// Use hint sources (balloon hints, reported ranges, never-populated memory).
    pub hints: bool,
    /// Longest acceptable pause of the guest, milliseconds.
    pub downtime_ms: u64,
    /// Send rate limit in bytes per second; none when absent.
    pub bandwidth: Option<u64>,
    /// Ask the guest's balloon driver for free page hints (with `hints`). The balloon's
    /// reported ranges and never-populated memory are used either way.
    pub free_page_hint: bool,
    /// How long the bulk round may wait for the hint sources' first answers, milliseconds
    /// (bounded, cut short once every source is done); the engine's default when absent.
    pub hint_head_start_ms: Option<u64>,
    /// Parallel connections (1 to 16).
    pub connections: u16,
    /// Arm KVM's dirty log lazily (manual protection, pages initially dirty) where KVM
    /// supports it: the guest's writes to pages not sent yet cost no write fault. `false`
    /// write-protects all RAM at the start, which suits guests that do not clear the pages
    /// they hint (see `ferry_migration::dirty`).
    pub lazy_dirty_log: bool,
    /// Check at the switchover that the dirty log missed no write and send what it missed
    /// (`ferry_migration::audit`); adds a read of the sent pages to the downtime.
    pub audit_dirty_log: bool,
    /// Give up after this many seconds (the VM keeps running here).
    pub timeout_s: u64,
    /// Iterative rounds after the bulk round before the policy below applies.
    pub rounds_max: u32,
    /// After `rounds_max` rounds without convergence: `switch-over` anyway (the pause exceeds
    /// `downtime_ms`) or `cancel` (the guest keeps running here).
    pub on_no_convergence: ferry_migration::OnNoConvergence,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            hints: true,
            downtime_ms: 300,
            bandwidth: None,
            free_page_hint: true,
            hint_head_start_ms: None,
            connections: 1,
            lazy_dirty_log: true,
            audit_dirty_log: false,
            timeout_s: 30 * 60,
            rounds_max: ferry_migration::Policy::default().rounds_max,
            on_no_convergence: ferry_migration::OnNoConvergence::SwitchOver,
        }
    }
}

impl MigrateOptions {
    fn engine_config(&self, cancel: Arc<AtomicBool>) -> Result<MigrationConfig, MigrateError> {
        if self.connections == 0 || self.connections > ferry_migration::transport::CONNECTIONS_MAX {
            return Err(MigrateError::Options(format!(
                "connections must be between 1 and {}, got {}",
                ferry_migration::transport::CONNECTIONS_MAX,
                self.connections
            )));
        }
        if self.bandwidth == Some(0) || self.timeout_s == 0 {
            return Err(MigrateError::Options(
                "bandwidth and timeout must be positive".into(),
            ));
        }
        let defaults = MigrationConfig::default();
        Ok(MigrationConfig {
            audit_dirty_log: self.audit_dirty_log,
            hint_head_start: self
                .hint_head_start_ms
                .map_or(defaults.hint_head_start, Duration::from_millis),
            policy: Policy {
                downtime_max: Duration::from_millis(self.downtime_ms),
                rounds_max: self.rounds_max,
                on_no_convergence: self.on_no_convergence,
                ..Policy::default()
            },
            timeout: Duration::from_secs(self.timeout_s),
            bandwidth_limit: self.bandwidth,
            hints: self.hints,
            cancel,
            ..defaults
        })
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Connecting and handshaking.
    Connecting,
    /// Precopy rounds; the guest runs.
    Precopy,
    /// The guest is paused for the final round.
    Switchover,
    /// The destination acknowledged: the guest runs there now.
    Completed,
    /// The migration failed: the guest keeps running here.
    Failed,
    /// The source handed the guest over but got neither an acknowledgement nor a refusal:
    /// the destination may be running it, so it stays paused here. The operator checks the
    /// destination and then either resumes it here (`resume`, only if the destination does
    /// not run it) or shuts this copy down (docs/migration.md, "After a migration").
    OutcomeUnknown,
}

/// A migration's progress, reported by `status` under `migration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// The destination.
    pub to: String,
    /// Whether hint sources are used.
    pub hints: bool,
    /// Where the migration is.
    pub phase: MigrationPhase,
    /// Current round (0 = bulk).
    pub round: u32,
    /// Whether the current round is the final one.
    pub is_final: bool,
    /// Pages queued at the start of the current round.
    pub pages_queued: u64,
    /// Pages handled so far in the current round.
    pub pages_done: u64,
    /// Bytes sent so far.
    pub bytes: u64,
    /// Milliseconds since the migration started.
    pub elapsed_ms: u64,
    /// Pages the guest dirtied during the last finished round (what the next round sends).
    #[serde(default)]
    pub pages_dirty: u64,
    /// The guest's dirty rate in the last finished round, pages per second.
    #[serde(default)]
    pub dirty_rate_pages_per_s: f64,
    /// The send rate of the last finished round, bytes per second.
    #[serde(default)]
    pub throughput_bytes_per_s: f64,
    /// How long a switchover now would pause the guest, at the best send rate seen,
    /// milliseconds (`null` before a round finished).
    #[serde(default)]
    pub expected_downtime_ms: Option<f64>,
    /// The vCPU throttle in force, percent.
    #[serde(default)]
    pub throttle_percent: u8,
    /// Why it failed.
    pub error: Option<String>,
    /// Final statistics, once completed.
    pub stats: Option<MigrationStats>,
}

impl MigrationProgress {
    fn new(to: &str, hints: bool) -> Self {
        Self {
            to: to.to_owned(),
            hints,
            phase: MigrationPhase::Connecting,
            round: 0,
            is_final: false,
            pages_queued: 0,
            pages_done: 0,
            bytes: 0,
            elapsed_ms: 0,
            pages_dirty: 0,
            dirty_rate_pages_per_s: 0.0,
            throughput_bytes_per_s: 0.0,
            expected_downtime_ms: None,
            throttle_percent: 0,
            error: None,
            stats: None,
        }
    }
}

/// An [`Observer`] that keeps a shared [`MigrationProgress`] current and forwards every
/// event to `inner`.
pub struct ProgressTracker<'a> {
    progress: Arc<Mutex<MigrationProgress>>,
    started: Instant,
    inner: &'a mut dyn Observer,
    /// Best send rate seen, bytes per second (as the engine's convergence estimate uses).
    best_bandwidth: f64,
}

impl<'a> ProgressTracker<'a> {
    /// Tracks into `progress`, forwarding to `inner`.
    pub fn new(progress: Arc<Mutex<MigrationProgress>>, inner: &'a mut dyn Observer) -> Self {
        Self {
            progress,
            started: Instant::now(),
            inner,
            best_bandwidth: 0.0,
        }
    }
}

impl Observer for ProgressTracker<'_> {
    fn event(&mut self, event: &Event<'_>) {
        {
            let mut p = lock(&self.progress);
            p.elapsed_ms = self.started.elapsed().as_millis() as u64;
            match event {
                Event::Connected { .. } => p.phase = MigrationPhase::Precopy,
                Event::RoundStarted {
                    round,
                    pages_queued,
                    is_final,
                } => {
                    p.round = *round;
                    p.is_final = *is_final;
                    p.pages_queued = *pages_queued;
                    p.pages_done = 0;
                }
                Event::Progress {
                    pages_done, bytes, ..
                } => {
                    p.pages_done = *pages_done;
                    p.bytes = *bytes;
                }
                Event::RoundFinished(r) => {
                    p.pages_done = r.pages_queued;
                    p.pages_dirty = r.pages_dirtied;
                    p.dirty_rate_pages_per_s = r.dirty_rate_pages_per_s;
                    p.throughput_bytes_per_s = r.bandwidth_bytes_per_s;
                    p.throttle_percent = r.throttle_percent;
                    if r.bandwidth_bytes_per_s.is_finite() && r.duration_ms >= 5.0 {
                        self.best_bandwidth = self.best_bandwidth.max(r.bandwidth_bytes_per_s);
                    }
                    p.expected_downtime_ms = (self.best_bandwidth > 0.0).then(|| {
                        (r.pages_dirtied * ferry_migration::PAGE_SIZE) as f64 / self.best_bandwidth
                            * 1000.0
                    });
                }
                Event::Paused => p.phase = MigrationPhase::Switchover,
                Event::Completed(s) => {
                    p.phase = MigrationPhase::Completed;
                    p.bytes = s.bytes;
                }
            }
        }
        self.inner.event(event);
    }
}

/// The engine's control over a [`Vmm`], with the machine state in the [`state_format`]
/// envelope.
struct SealedControl(Arc<Vmm>);

impl VmControl for SealedControl {
    fn pause(&mut self) -> Result<(), VmControlError> {
        self.0
            .pause()
            .map_err(|e| VmControlError::new("pausing the VM", e))
    }

    fn resume(&mut self) -> Result<(), VmControlError> {
        self.0.resume();
        Ok(())
    }

    fn set_throttle(&mut self, percent: u8) {
        if percent > 0 {
            tracing::info!("throttling the guest's vCPUs to {}%", 100 - percent);
        }
        self.0.set_throttle(percent);
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmControlError> {
        let state = self
            .0
            .save_state()
            .map_err(|e| VmControlError::new("saving the VM state", e))?;
        crate::memory::debug_digest(&self.0.ram, "sent");
        state_format::encode(&state).map_err(|e| VmControlError::new("encoding the VM state", e))
    }
}

/// Migrates the running `vmm` to `to`. On success the VM is left paused (the destination
/// runs it now) and the caller should stop it; on failure it keeps running here.
pub fn migrate(
    vmm: &Arc<Vmm>,
    to: &Endpoint,
    options: &MigrateOptions,
    observer: &mut dyn Observer,
    cancel: Arc<AtomicBool>,
) -> Result<MigrationStats, MigrateError> {
    let config = options.engine_config(cancel)?;
    let connections = ferry_migration::connect(to, options.connections).map_err(|source| {
        MigrateError::Connect {
            endpoint: to.to_string(),
            source,
        }
    })?;
    let mut dirty_log = vmm.dirty_log();
    if !options.lazy_dirty_log {
        dirty_log = dirty_log.eager();
    }
    let mut control = SealedControl(vmm.clone());
    let (mut hint, mut report) = match vmm.balloon_device() {
        Some(b) => {
            let b = lock(b);
            (Some(b.hint_source()), Some(b.report_source()))
        }
        None => (None, None),
    };
    let mut unpopulated = UnpopulatedSource::new(vmm.memory());
    let mut engine = Migration::new(vmm.memory(), &mut dirty_log, &mut control, observer, config)?;
    if let Some(s) = hint.as_mut().filter(|_| options.free_page_hint) {
        engine.add_source(s);
    }
    if let Some(s) = report.as_mut() {
        engine.add_source(s);
    }
    engine.add_source(&mut unpopulated);
    tracing::info!(
        "migrating to {to} (hints {}, {} connection(s))",
        if options.hints { "on" } else { "off" },
        options.connections
    );
    engine
        .run(connections)
        .map_err(|source| stopped_or_engine(vmm.exit_reason(), source))
}

/// The error of a failed migration: the engine's, unless the guest stopped meanwhile (a vCPU
/// that triple-faults takes the VM down and fails the migration with it), which the operator
/// must not read as "the VM keeps running here".
fn stopped_or_engine(
    stopped: Option<ExitReason>,
    source: ferry_migration::MigrationError,
) -> MigrateError {
    match stopped {
        Some(reason) => MigrateError::GuestStopped { reason, source },
        None => MigrateError::Engine(source),
    }
}

/// The running or last migration of one VMM, for the control API.
#[derive(Debug, Default)]
pub struct Supervisor {
    current: Mutex<Option<Arc<Mutex<MigrationProgress>>>>,
    /// The running migration's cancel flag (the engine and its watchdog watch it).
    cancel: Mutex<Arc<AtomicBool>>,
}

impl Supervisor {
    /// The current or last migration's progress.
    pub fn progress(&self) -> Option<MigrationProgress> {
        lock(&self.current).as_ref().map(|p| lock(p).clone())
    }

    /// `status` with the migration's progress added under `migration` (when there is one).
    pub fn annotate(&self, mut status: Value) -> Value {
        if let (Value::Object(map), Some(p)) = (&mut status, self.progress()) {
            if let Ok(v) = serde_json::to_value(p) {
                map.insert("migration".into(), v);
            }
        }
        status
    }

    /// Handles the API's `migrate` request: runs the migration on its own thread, waits for
    /// it and answers with its statistics. After a success the VMM exits
    /// [`EXIT_LINGER`] later.
    pub fn handle(&self, vmm: &Arc<Vmm>, to: &str, options: Value) -> Result<Value, String> {
        let options: MigrateOptions = if options.is_null() {
            MigrateOptions::default()
        } else {
            serde_json::from_value(options)
                .map_err(|e| MigrateError::Options(e.to_string()).to_string())?
        };
        let endpoint: Endpoint = to
            .parse()
            .map_err(|e: String| MigrateError::Options(e).to_string())?;
        let progress = self.claim(to, options.hints).map_err(|e| e.to_string())?;
        let cancel = lock(&self.cancel).clone();
        let (tx, rx) = mpsc::channel();
        let vmm = vmm.clone();
        let spawned = std::thread::Builder::new()
            .name("ferry-migrate".into())
            .spawn(move || {
                let mut none = ferry_migration::NoObserver;
                let mut tracker = ProgressTracker::new(progress.clone(), &mut none);
                let result = migrate(&vmm, &endpoint, &options, &mut tracker, cancel);
                let ok = result.is_ok();
                let unknown = result.as_ref().is_err_and(MigrateError::outcome_unknown);
                let stopped = matches!(result, Err(MigrateError::GuestStopped { .. }));
                {
                    let mut p = lock(&progress);
                    match &result {
                        Ok(stats) => {
                            p.phase = MigrationPhase::Completed;
                            p.stats = Some(stats.clone());
                        }
                        Err(e) => {
                            p.phase = if e.outcome_unknown() {
                                MigrationPhase::OutcomeUnknown
                            } else {
                                MigrationPhase::Failed
                            };
                            p.error = Some(e.to_string());
                        }
                    }
                }
                let _ = tx.send(result);
                if ok {
                    tracing::info!("migrated to {endpoint}: the guest runs there now; exiting");
                    std::thread::sleep(EXIT_LINGER);
                    vmm.request_exit(ExitReason::Shutdown);
                } else if unknown {
                    tracing::error!(
                        "migration to {endpoint}: outcome unknown; the guest stays paused here \
                         until the operator resumes or shuts it down"
                    );
                } else if stopped {
                    tracing::error!(
                        "migration to {endpoint} failed: the guest stopped here during it"
                    );
                } else {
                    tracing::warn!("migration to {endpoint} failed; the guest keeps running here");
                }
            });
        if let Err(e) = spawned {
            let msg = format!("cannot start the migration thread: {e}");
            if let Some(p) = lock(&self.current).as_ref() {
                let mut p = lock(p);
                p.phase = MigrationPhase::Failed;
                p.error = Some(msg.clone());
            }
            return Err(msg);
        }
        match rx.recv() {
            Ok(Ok(stats)) => serde_json::to_value(stats).map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the migration thread died".into()),
        }
    }

    /// Runs `change` (an API request that changes the VM's run state or memory: pause,
    /// resume, balloon target) unless a migration owns the VM, which it does from the moment
    /// it is claimed until it fails: a `resume` after the final dirty-log fetch would let the
    /// guest write pages that are never sent, and after a success the guest runs at the
    /// destination. The check and the change happen under the lock that [`Supervisor::claim`]
    /// takes, so no migration can start in between.
    pub fn unless_migrating<T>(
        &self,
        what: StateChange,
        change: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, String> {
        let current = lock(&self.current);
        if let Some(p) = current.as_ref() {
            let mut p = lock(p);
            match p.phase {
                MigrationPhase::Failed => {}
                // The operator decides; resuming here ends the wait for an outcome.
                MigrationPhase::OutcomeUnknown => {
                    let result = change();
                    if result.is_ok() && what == StateChange::Resume {
                        tracing::warn!(
                            "the operator resumed the guest here after a migration with an \
                             unknown outcome"
                        );
                        p.phase = MigrationPhase::Failed;
                    }
                    return result;
                }
                MigrationPhase::Completed => {
                    return Err(format!(
                        "{what} refused: the VM was migrated to {} and runs there now",
                        p.to
                    ))
                }
                _ => {
                    return Err(format!(
                        "{what} refused: a migration to {} owns the VM until it ends",
                        p.to
                    ))
                }
            }
        }
        change()
    }

    /// Registers a new migration unless one is running.
    fn claim(&self, to: &str, hints: bool) -> Result<Arc<Mutex<MigrationProgress>>, MigrateError> {
        let mut current = lock(&self.current);
        if let Some(p) = current.as_ref() {
            let p = lock(p);
            if !matches!(p.phase, MigrationPhase::Failed) {
                return Err(MigrateError::Busy(p.to.clone()));
            }
        }
        let progress = Arc::new(Mutex::new(MigrationProgress::new(to, hints)));
        *current = Some(progress.clone());
        *lock(&self.cancel) = Arc::new(AtomicBool::new(false));
        Ok(progress)
    }

    /// Handles the API's `migrate-cancel`: asks the running migration to stop. The engine
    /// then fails it (the guest keeps running here, resumed if it was paused for the
    /// switchover) and the `migrate` request answers with "migration cancelled". Too late
    /// once the guest was handed over: the destination may run it already.
    pub fn cancel(&self) -> Result<(), String> {
        let current = lock(&self.current);
        let Some(p) = current.as_ref() else {
            return Err("no migration to cancel".into());
        };
        let p = lock(p);
        match p.phase {
            MigrationPhase::Connecting | MigrationPhase::Precopy | MigrationPhase::Switchover => {
                lock(&self.cancel).store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::info!("cancelling the migration to {}", p.to);
                Ok(())
            }
            MigrationPhase::Completed => Err(format!(
                "too late to cancel: the VM was migrated to {} and runs there",
                p.to
            )),
            MigrationPhase::OutcomeUnknown => Err(format!(
                "too late to cancel: the VM was handed over to {} (outcome unknown; see status)",
                p.to
            )),
            MigrationPhase::Failed => Err("no migration to cancel (the last one failed)".into()),
        }
    }
}

/// An API request that changes the VM's run state or memory (see
/// [`Supervisor::unless_migrating`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateChange {
    /// `pause`.
    Pause,
    /// `resume`.
    Resume,
    /// `balloon-set`.
    BalloonSet,
}

impl std::fmt::Display for StateChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::BalloonSet => "balloon-set",
        })
    }
}

/// Asks the VMM behind `api_socket` to migrate to `to` and waits (without a time limit) for
/// the final statistics.
pub fn request_migration(
    api_socket: &Path,
    to: &str,
    options: &MigrateOptions,
) -> Result<MigrationStats, MigrateError> {
    let options =
        serde_json::to_value(options).map_err(|e| MigrateError::Options(e.to_string()))?;
    let stats = ApiClient::connect(api_socket)?.migrate(to, options)?;
    serde_json::from_value(stats).map_err(|e| ApiError::Reply(e.to_string()).into())
}

/// The progress of the current or last migration of the VMM behind `api_socket`.
pub fn query_progress(api_socket: &Path) -> Result<Option<MigrationProgress>, MigrateError> {
    let mut client = ApiClient::connect(api_socket)?;
    let status = client.request(&Request::Status)?;
    match status.get("migration") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| ApiError::Reply(e.to_string()).into()),
    }
}

/// What [`receive`] tells its caller along the way.
pub trait ReceiveObserver {
    /// Listening; the source may connect to `endpoint` now.
    fn listening(&mut self, endpoint: &Endpoint);
    /// The guest was restored, the source acknowledged, and the guest runs here.
    fn running(&mut self, stats: &ReceiveStats, state_bytes: usize);
}

/// Removes the API socket when dropped.
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Runs a migration destination: an empty VM for `config` waits on `listen` for one
/// migration, restores it, resumes the guest and runs it (serving `config.api_socket`) until
/// it stops. On any failure before the guest resumed, everything is discarded and an error
/// returned; the source then keeps its VM.
pub fn receive(
    config: VmConfig,
    listen: &Endpoint,
    observer: &mut dyn ReceiveObserver,
) -> Result<ExitReason, MigrateError> {
    if let Some(path) = &config.api_socket {
        check_socket_free(path)?;
    }
    let api_socket = config.api_socket.clone();
    let incoming = IncomingVm::new(config).map_err(|source| MigrateError::Vm {
        what: "cannot create the destination VM",
        source,
    })?;
    let listener = Listener::bind(listen).map_err(|source| MigrateError::Listen {
        endpoint: listen.to_string(),
        source,
    })?;
    let local = listener
        .local_endpoint()
        .map_err(|source| MigrateError::Listen {
            endpoint: listen.to_string(),
            source,
        })?;
    observer.listening(&local);
    let received =
        Destination::new(incoming.memory(), ReceiveConfig::default())?.accept(&listener)?;
    drop(listener);
    let state = match state_format::decode(&received.device_state) {
        Ok(s) => s,
        Err(e) => {
            received.reject(&format!("the destination refused the machine state: {e}"));
            return Err(e.into());
        }
    };
    // Before and after the restore: a difference between the two is a write to guest RAM
    // by the restore itself.
    crate::memory::debug_digest(incoming.ram(), "received-before-restore");
    let vmm = match incoming.restore(&state) {
        Ok(vmm) => vmm,
        Err(source) => {
            received.reject(&format!("the destination cannot restore the VM: {source}"));
            return Err(MigrateError::Vm {
                what: "cannot restore the VM",
                source,
            });
        }
    };
    crate::memory::debug_digest(&vmm.ram, "received");
    // From here on a failure must stop the restored (still paused) VM before returning.
    let discard = |e: MigrateError| {
        vmm.request_exit(ExitReason::Shutdown);
        vmm.stop();
        e
    };
    let socket = SocketFile(api_socket.clone());
    let mut server = None;
    if let Some(path) = &api_socket {
        let handler = Arc::new(crate::ApiVmm(vmm.clone(), Supervisor::default()));
        match api::serve(path, handler) {
            Ok(s) => server = Some(s),
            Err(e) => {
                received.reject(&format!("the destination cannot serve its API: {e}"));
                return Err(discard(e.into()));
            }
        }
    }
    let stats = received.stats.clone();
    let state_bytes = received.device_state.len();
    received
        .acknowledge()
        .map_err(|e| discard(MigrateError::Acknowledge(e)))?;
    vmm.resume();
    tracing::info!(
        "migration received ({} pages, {} zero, {} rounds); the guest runs here",
        stats.pages,
        stats.zero_pages,
        stats.rounds
    );
    observer.running(&stats, state_bytes);
    let reason = vmm.wait_exit();
    tracing::info!("VM stopped: {reason:?}");
    vmm.stop();
    crate::finish_replies(server.as_ref());
    drop(socket);
    Ok(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_that_stopped_during_the_migration_is_not_said_to_keep_running() {
        let engine = || ferry_migration::MigrationError::Config("vCPU 0 has exited".into());
        let e = stopped_or_engine(None, engine()).to_string();
        assert!(e.contains("keeps running here"), "{e}");
        let e = stopped_or_engine(Some(ExitReason::GuestReset), engine());
        assert!(!e.outcome_unknown());
        let e = e.to_string();
        assert!(!e.contains("keeps running"), "{e}");
        assert!(
            e.contains("GuestReset") && e.contains("runs neither here"),
            "{e}"
        );
        assert!(e.contains("vCPU 0 has exited"), "{e}");
    }

    #[test]
    fn options_have_defaults_and_refuse_unknown_fields() {
        let o: MigrateOptions = serde_json::from_str("{}").unwrap();
        assert_eq!(o, MigrateOptions::default());
        assert!(o.hints, "hints are on by default");
        let o: MigrateOptions =
            serde_json::from_str(r#"{"hints":false,"connections":4,"bandwidth":1000}"#).unwrap();
        assert_eq!(
            (o.hints, o.connections, o.bandwidth),
            (false, 4, Some(1000))
        );
        assert!(serde_json::from_str::<MigrateOptions>(r#"{"hint":false}"#).is_err());
    }

    #[test]
    fn options_are_checked_before_anything_happens() {
        let cancel = Arc::new(AtomicBool::new(false));
        let bad = |o: MigrateOptions| o.engine_config(cancel.clone()).unwrap_err().to_string();
        let e = bad(MigrateOptions {
            connections: 0,
            ..Default::default()
        });
        assert!(e.contains("between 1 and 16"), "{e}");
        let e = bad(MigrateOptions {
            connections: 17,
            ..Default::default()
        });
        assert!(e.contains("got 17"), "{e}");
        let e = bad(MigrateOptions {
            bandwidth: Some(0),
            ..Default::default()
        });
        assert!(e.contains("positive"), "{e}");
        let c = MigrateOptions {
            downtime_ms: 50,
            hints: false,
            ..Default::default()
        }
        .engine_config(cancel)
        .unwrap();
        assert_eq!(c.policy.downtime_max, Duration::from_millis(50));
        assert!(!c.hints);
    }

    #[test]
    fn state_changes_are_refused_while_a_migration_owns_the_vm() {
        let s = Supervisor::default();
        let mut ran = 0;
        let mut change = |s: &Supervisor| {
            s.unless_migrating(StateChange::Resume, || {
                ran += 1;
                Ok(())
            })
        };
        change(&s).unwrap();
        let p = s.claim("tcp:h:1", true).unwrap();
        for phase in [
            MigrationPhase::Connecting,
            MigrationPhase::Precopy,
            MigrationPhase::Switchover,
        ] {
            lock(&p).phase = phase;
            let e = change(&s).unwrap_err();
            assert!(
                e.contains("resume refused: a migration to tcp:h:1 owns"),
                "{e}"
            );
        }
        lock(&p).phase = MigrationPhase::Completed;
        let e = change(&s).unwrap_err();
        assert!(e.contains("runs there now"), "{e}");
        // With the outcome unknown the operator decides: a resume here is accepted, and
        // ends the wait (a new migration may be claimed after it, not before).
        lock(&p).phase = MigrationPhase::OutcomeUnknown;
        assert!(s.claim("tcp:h:2", true).is_err());
        change(&s).unwrap();
        assert_eq!(lock(&p).phase, MigrationPhase::Failed);
        // A failed migration hands the VM back.
        change(&s).unwrap();
        assert_eq!(ran, 3, "the change ran only when no migration owned the VM");
    }

    #[test]
    fn cancel_sets_the_running_migrations_flag_only() {
        let s = Supervisor::default();
        assert!(s.cancel().unwrap_err().contains("no migration"));
        let p = s.claim("tcp:h:1", true).unwrap();
        let flag = lock(&s.cancel).clone();
        lock(&p).phase = MigrationPhase::Precopy;
        s.cancel().unwrap();
        assert!(flag.load(std::sync::atomic::Ordering::SeqCst));
        lock(&p).phase = MigrationPhase::OutcomeUnknown;
        assert!(s.cancel().unwrap_err().contains("too late"));
        lock(&p).phase = MigrationPhase::Failed;
        // The next migration starts with a fresh flag.
        s.claim("tcp:h:2", true).unwrap();
        assert!(!lock(&s.cancel).load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn one_migration_at_a_time_and_progress_in_status() {
        let s = Supervisor::default();
        let status = serde_json::json!({"state":"running"});
        assert_eq!(s.annotate(status.clone()), status, "no migration yet");
        let p = s.claim("tcp:h:1", true).unwrap();
        let e = s.claim("tcp:h:2", true).unwrap_err();
        assert!(
            matches!(e, MigrateError::Busy(ref to) if to == "tcp:h:1"),
            "{e}"
        );
        {
            let mut none = ferry_migration::NoObserver;
            let mut t = ProgressTracker::new(p.clone(), &mut none);
            t.event(&Event::Connected {
                pages: 10,
                connections: 1,
            });
            t.event(&Event::RoundStarted {
                round: 0,
                pages_queued: 10,
                is_final: false,
            });
            t.event(&Event::Progress {
                round: 0,
                pages_done: 4,
                pages_left: 6,
                bytes: 4096 * 4,
            });
        }
        let v = s.annotate(status);
        assert_eq!(v["state"], "running");
        assert_eq!(v["migration"]["phase"], "precopy");
        assert_eq!(v["migration"]["pages_done"], 4);
        assert_eq!(v["migration"]["bytes"], 16384);
        // A failed migration may be retried; a completed one may not.
        lock(&p).phase = MigrationPhase::Failed;
        let p2 = s.claim("tcp:h:3", false).unwrap();
        lock(&p2).phase = MigrationPhase::Completed;
        assert!(s.claim("tcp:h:4", true).is_err());
    }
}
