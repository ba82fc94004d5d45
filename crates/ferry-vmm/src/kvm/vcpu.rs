//! vCPU threads: the KVM_RUN loop, exit dispatch to the buses, and pause/resume that really
//! stops guest execution.
//!
//! # Pause protocol
//! [`Vcpus::pause`] sets the run state to paused, then kicks every vCPU thread with
//! [`kick_signal`] until all have acknowledged. The signal handler sets `immediate_exit` in the
//! thread's `kvm_run`, so a kick that lands just before `KVM_RUN` still makes it return at once
//! (EINTR); a kick during `KVM_RUN` interrupts it. A parked thread serves requests (state
//! save) and returns to `KVM_RUN` only after [`Vcpus::resume`].
//!
//! # Throttle (auto-converge)
//! [`Vcpus::set_throttle`] limits every vCPU to `100 - percent`% of the time, the way QEMU's
//! cpu-throttle does: a ticker thread kicks the vCPU threads every [`THROTTLE_TIMESLICE`], and
//! a kicked thread that ran at least a timeslice since its last throttle sleeps
//! `timeslice * percent / (100 - percent)` before it enters `KVM_RUN` again. The sleep ends
//! early when the VM is paused or stopped, so it never delays a pause.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::state::{StateError, VcpuState};
use crate::bus::{lock, Bus};
use crate::exit::ExitReason;

/// How long [`Vcpus::pause`] waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a parked vCPU may take to hand over its state (a few ioctls; seconds under
/// nested emulation).
const SAVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Vcpus::stop`] kicks the vCPU threads before it leaves behind the ones that
/// have not ended (a thread blocked in a device's handler, say on a full console pipe).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Interval between kicks while waiting for vCPUs to park.
const KICK_INTERVAL: Duration = Duration::from_millis(10);
/// Exits served while completing a pending access before a pause, at most.
const COMPLETION_EXITS_MAX: usize = 16;
/// How long a throttled vCPU runs between two throttle sleeps (QEMU's cpu-throttle uses the
/// same 10 ms).
pub const THROTTLE_TIMESLICE: Duration = Duration::from_millis(10);
/// The highest throttle accepted, percent.
pub const THROTTLE_MAX: u8 = 99;

/// Errors from vCPU threads and their control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// A thread could not be spawned.
    #[error("cannot start a vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// vCPUs did not park in time.
    #[error("{parked} of {total} vCPUs paused within {PAUSE_TIMEOUT:?}")]
    PauseTimeout {
        /// vCPUs that parked.
        parked: usize,
        /// vCPUs in the VM.
        total: usize,
    },
    /// The operation needs paused vCPUs.
    #[error("the VM is not paused")]
    NotPaused,
    /// A vCPU thread is gone.
    #[error("vCPU {0} has exited")]
    Gone(u8),
    /// The VM stopped (a vCPU saw a reset, a power-off or an error): nothing to save.
    #[error("the VM stopped ({0:?}): its vCPUs cannot be saved")]
    Stopped(ExitReason),
    /// A vCPU did not hand over its state in time.
    #[error("vCPU {0} did not save its state within {SAVE_TIMEOUT:?}")]
    SaveTimeout(u8),
    /// A vCPU did not restore its state in time.
    #[error("vCPU {0} did not restore its state within {SAVE_TIMEOUT:?}")]
    RestoreTimeout(u8),
    /// Saving state failed.
    #[error("vCPU {id}: {source}")]
    State {
        /// vCPU index.
        id: u8,
        /// Why.
        #[source]
        source: StateError,
    },
}

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler; null on non-vCPU threads.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer was set by this very thread to its own vCPU's `kvm_run` mapping,
        // which lives as long as the `VcpuFd` owned by the thread's loop; it is reset to null
        // before the `VcpuFd` is dropped. A one-byte volatile store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler (idempotent).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    Stopping,
}

#[derive(Debug)]
struct Ctl {
    state: RunState,
    parked: usize,
    exit: Option<ExitReason>,
}

/// Run state shared by the VMM and every vCPU thread.
#[derive(Debug)]
pub struct VcpuControl {
    ctl: Mutex<Ctl>,
    changed: Condvar,
    /// The throttle, percent of the time the vCPUs must not run.
    throttle: AtomicU8,
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self {
            ctl: Mutex::new(Ctl {
                state: RunState::Running,
                parked: 0,
                exit: None,
            }),
            changed: Condvar::new(),
            throttle: AtomicU8::new(0),
        }
    }
}

/// How long a vCPU throttled to `percent` sleeps after each [`THROTTLE_TIMESLICE`] it ran.
pub fn throttle_sleep(percent: u8) -> Duration {
    let p = u32::from(percent.min(THROTTLE_MAX));
    THROTTLE_TIMESLICE * p / (100 - p)
}

impl VcpuControl {
    /// Records why the VM should stop (the first reason wins) and wakes the waiter.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut c = lock(&self.ctl);
        c.exit.get_or_insert(reason);
        self.changed.notify_all();
    }

    /// Why the VM should stop, if some thread asked for it.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        lock(&self.ctl).exit.clone()
    }

    /// Blocks until some thread requested the VM to stop; returns why.
    pub fn wait_exit(&self) -> ExitReason {
        let mut c = lock(&self.ctl);
        loop {
            if let Some(r) = c.exit.clone() {
                return r;
            }
            c = self.changed.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Marks the vCPUs paused before their threads start (a restored VM starts paused).
    pub fn set_paused(&self) {
        let mut c = lock(&self.ctl);
        if c.state == RunState::Running {
            c.state = RunState::Paused;
        }
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        lock(&self.ctl).state == RunState::Paused
    }

    /// The throttle in force, percent.
    pub fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::Relaxed)
    }

    /// The throttle sleep of a vCPU thread that last slept (or started) at `since`: if a
    /// throttle is set and the thread ran a timeslice since then, sleeps [`throttle_sleep`]
    /// (less if the VM stops running meanwhile: a pause or stop ends it) and returns
    /// `Some(when it woke)`; `None` if it did not sleep.
    pub fn throttle_point(&self, since: Instant) -> Option<Instant> {
        let percent = self.throttle();
        if percent == 0 || since.elapsed() < THROTTLE_TIMESLICE {
            return None;
        }
        let c = lock(&self.ctl);
        let _ = self
            .changed
            .wait_timeout_while(c, throttle_sleep(percent), |c| c.state == RunState::Running)
            .unwrap_or_else(|p| p.into_inner());
        Some(Instant::now())
    }
}

/// Requests a parked vCPU serves.
enum Request {
    SaveState(SyncSender<Result<VcpuState, StateError>>),
}

/// One running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    thread: Option<JoinHandle<()>>,
    requests: Sender<Request>,
}

impl std::fmt::Debug for VcpuHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuHandle").field("id", &self.id).finish()
    }
}

/// What a vCPU thread needs besides its fd.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Shared run state.
    pub control: Arc<VcpuControl>,
    /// MSRs to save.
    pub msr_indices: Arc<Vec<u32>>,
}

/// Starts vCPU `id`'s thread.
pub fn spawn(id: u8, fd: VcpuFd, ctx: VcpuContext) -> Result<VcpuHandle, VcpuError> {
    let (handle, _restored) = Waiting::spawn(id, fd)?.launch(ctx, None)?;
    Ok(handle)
}

/// The answers of vCPU threads asked at once, in the order asked, by one deadline
/// ([`SAVE_TIMEOUT`] from now): the first failure, timeout or vanished thread ends it.
pub fn collect<T>(
    pending: Vec<(u8, Receiver<Result<T, StateError>>)>,
    timeout: fn(u8) -> VcpuError,
) -> Result<Vec<T>, VcpuError> {
    let deadline = Instant::now() + SAVE_TIMEOUT;
    pending
        .into_iter()
        .map(|(id, rx)| {
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .map_err(|e| match e {
                    RecvTimeoutError::Timeout => timeout(id),
                    RecvTimeoutError::Disconnected => VcpuError::Gone(id),
                })?
                .map_err(|source| VcpuError::State { id, source })
        })
        .collect()
}

/// What a [`Waiting`] thread needs to start.
struct Launch {
    ctx: VcpuContext,
    requests: Receiver<Request>,
    /// Saved state to restore into the vCPU (on its own thread) before it parks.
    state: Option<VcpuState>,
    restored: SyncSender<Result<(), StateError>>,
}

/// A vCPU thread started before its VM's devices exist, waiting to be launched. A
/// migration destination starts its vCPU threads while RAM streams in, so that creating
/// them is not part of the downtime, and each restores its own vCPU's state when
/// launched, in parallel with the others (Firecracker, too, restores each vCPU's state
/// on its own thread). Dropped unlaunched, the thread ends.
#[derive(Debug)]
pub struct Waiting {
    id: u8,
    thread: Option<JoinHandle<()>>,
    launch: Option<SyncSender<Launch>>,
}

impl Waiting {
    /// Starts vCPU `id`'s thread, which waits for [`launch`](Self::launch).
    pub fn spawn(id: u8, fd: VcpuFd) -> Result<Self, VcpuError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Launch>(1);
        let thread = std::thread::Builder::new()
            .name(format!("ferry-vcpu{id}"))
            .spawn(move || {
                // No launch: the VM was abandoned before it ran.
                let Ok(launch) = rx.recv() else {
                    return;
                };
                if let Some(state) = &launch.state {
                    let restored = state.restore(&fd);
                    let failed = restored.is_err();
                    let _ = launch.restored.send(restored);
                    if failed {
                        return;
                    }
                }
                run_loop(id, fd, &launch.ctx, &launch.requests);
            })
            .map_err(VcpuError::Spawn)?;
        Ok(Self {
            id,
            thread: Some(thread),
            launch: Some(tx),
        })
    }

    /// Lets the thread run its vCPU with `ctx`, after restoring `state` into it if given;
    /// the receiver gets the restore's outcome (nothing when there is no state). A VM
    /// restored paused must have its run state paused before this.
    pub fn launch(
        mut self,
        ctx: VcpuContext,
        state: Option<VcpuState>,
    ) -> Result<(VcpuHandle, Receiver<Result<(), StateError>>), VcpuError> {
        let (requests_tx, requests) = std::sync::mpsc::channel();
        let (restored_tx, restored) = std::sync::mpsc::sync_channel(1);
        let sent = match self.launch.take() {
            Some(tx) => tx
                .send(Launch {
                    ctx,
                    requests,
                    state,
                    restored: restored_tx,
                })
                .is_ok(),
            None => false,
        };
        if !sent {
            return Err(VcpuError::Gone(self.id));
        }
        let handle = VcpuHandle {
            id: self.id,
            thread: self.thread.take(),
            requests: requests_tx,
        };
        Ok((handle, restored))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // Unlaunched: closing the channel ends the thread, which holds nothing else.
        self.launch.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The vCPUs of one VM.
#[derive(Debug)]
pub struct Vcpus {
    handles: Vec<VcpuHandle>,
    control: Arc<VcpuControl>,
    ticker: Option<Ticker>,
}

/// The thread that kicks throttled vCPUs every [`THROTTLE_TIMESLICE`].
#[derive(Debug)]
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Vcpus {
    /// Wraps running vCPU threads.
    pub fn new(handles: Vec<VcpuHandle>, control: Arc<VcpuControl>) -> Self {
        Self {
            handles,
            control,
            ticker: None,
        }
    }

    /// Adds a launched vCPU thread.
    pub fn add(&mut self, handle: VcpuHandle) {
        self.handles.push(handle);
    }

    /// Limits every vCPU to running `100 - percent`% of the time (at most
    /// [`THROTTLE_MAX`]); 0 lifts the throttle.
    pub fn set_throttle(&mut self, percent: u8) {
        let percent = percent.min(THROTTLE_MAX);
        self.control.throttle.store(percent, Ordering::Relaxed);
        if percent == 0 {
            self.stop_ticker();
            return;
        }
        if self.ticker.is_some() {
            return;
        }
        let threads: Vec<libc::pthread_t> = self
            .handles
            .iter()
            .filter_map(|h| h.thread.as_ref().map(|t| t.as_pthread_t()))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("ferry-throttle".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    for &t in &threads {
                        // SAFETY: `t` names a vCPU thread of this `Vcpus`, which joins this
                        // ticker (`stop_ticker`) before it joins or drops any vCPU thread,
                        // so the thread is alive; the kick signal has a handler installed
                        // before the vCPU threads start.
                        unsafe { libc::pthread_kill(t, kick_signal()) };
                    }
                    std::thread::sleep(THROTTLE_TIMESLICE);
                }
            });
        match spawned {
            Ok(thread) => self.ticker = Some(Ticker { stop, thread }),
            Err(e) => tracing::warn!("cannot start the throttle thread ({e}); not throttling"),
        }
    }

    fn stop_ticker(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.stop.store(true, Ordering::Relaxed);
            let _ = t.thread.join();
        }
    }

    fn kick_all(&self) {
        for h in &self.handles {
            if let Some(t) = &h.thread {
                let _ = t.kill(kick_signal());
            }
        }
    }

    /// Stops guest execution: returns once every vCPU thread is parked outside KVM_RUN.
    pub fn pause(&self) -> Result<(), VcpuError> {
        let total = self.handles.len();
        lock(&self.control.ctl).state = RunState::Paused;
        // Ends throttle sleeps at once.
        self.control.changed.notify_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            self.kick_all();
            let c = lock(&self.control.ctl);
            let (c, _) = self
                .control
                .changed
                .wait_timeout_while(c, KICK_INTERVAL, |c| c.parked < total)
                .unwrap_or_else(|p| p.into_inner());
            if c.parked >= total {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VcpuError::PauseTimeout {
                    parked: c.parked,
                    total,
                });
            }
        }
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        let mut c = lock(&self.control.ctl);
        if c.state == RunState::Paused {
            c.state = RunState::Running;
        }
        self.control.changed.notify_all();
    }

    /// Saves every vCPU's state; the vCPUs must be paused.
    pub fn save_state(&self) -> Result<Vec<VcpuState>, VcpuError> {
        if !self.control.is_paused() {
            return Err(VcpuError::NotPaused);
        }
        // A thread that left its run loop (the guest reset or powered off) serves no more
        // requests: asking it would wait for ever.
        if let Some(reason) = self.control.exit_reason() {
            return Err(VcpuError::Stopped(reason));
        }
        // Every vCPU thread saves its own state (KVM's vCPU ioctls belong to the thread that
        // runs it): ask them all at once, so that the downtime pays for one vCPU's save, not
        // the sum of them, then collect the answers in id order by one deadline.
        let mut pending = Vec::with_capacity(self.handles.len());
        for h in &self.handles {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            h.requests
                .send(Request::SaveState(tx))
                .map_err(|_| VcpuError::Gone(h.id))?;
            pending.push((h.id, rx));
        }
        self.control.changed.notify_all();
        collect(pending, VcpuError::SaveTimeout)
    }

    /// Stops and joins every vCPU thread, waiting at most [`STOP_TIMEOUT`].
    pub fn stop(&mut self) {
        self.stop_within(STOP_TIMEOUT);
    }

    /// Stops every vCPU thread and joins those that end within `timeout`; returns how
    /// many did not. A thread left behind never runs the guest again: the run state is
    /// `Stopping`, which every thread checks before each `KVM_RUN`, so whatever blocks it
    /// (a device handler, a write to a full console pipe) can only end in its exit.
    fn stop_within(&mut self, timeout: Duration) -> usize {
        self.set_throttle(0);
        lock(&self.control.ctl).state = RunState::Stopping;
        self.control.changed.notify_all();
        let deadline = Instant::now() + timeout;
        let mut left = 0;
        for h in &mut self.handles {
            let Some(t) = h.thread.take() else { continue };
            // Kick until the thread leaves KVM_RUN and sees Stopping.
            while !t.is_finished() && Instant::now() < deadline {
                let _ = t.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::error!(
                    "vCPU {} did not stop within {timeout:?}; its thread is left behind \
                     (it cannot run the guest again)",
                    h.id
                );
                left += 1;
            }
        }
        left
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Finishes an I/O or MMIO access the last exit left half done. KVM completes it (stores
/// the value read, advances RIP past an `OUT`) only on the next `KVM_RUN`, and that pending
/// part is in no state userspace can save; the KVM API documentation requires completing it
/// before saving state. Saved half done, a restored vCPU would run the instruction again: a
/// serial `IN` would pop a second byte from the receive FIFO (the guest loses input), an
/// `OUT` would write twice. `immediate_exit` makes KVM return right after completing,
/// without running guest code; without anything pending it returns at once.
fn complete_pending_io(id: u8, fd: &mut VcpuFd, ctx: &VcpuContext) {
    fd.set_kvm_immediate_exit(1);
    // An instruction can need several round trips (an MMIO access split in fragments,
    // string I/O): serve each exit until KVM reports the interruption.
    for _ in 0..COMPLETION_EXITS_MAX {
        match fd.run() {
            Err(e) if e.errno() == libc::EINTR => break,
            Err(e) => {
                tracing::warn!("vCPU {id}: completing pending I/O before the pause: {e}");
                break;
            }
            Ok(exit) => {
                if let Some(reason) = handle_exit(id, exit, ctx) {
                    ctx.control.request_exit(reason);
                    break;
                }
            }
        }
    }
    fd.set_kvm_immediate_exit(0);
}

/// Parks while paused, serving requests; returns `false` when the thread must exit.
fn park(id: u8, fd: &mut VcpuFd, ctx: &VcpuContext, rx: &Receiver<Request>) -> bool {
    let control = &ctx.control;
    let mut c = lock(&control.ctl);
    if c.state == RunState::Running {
        return true;
    }
    if c.state == RunState::Stopping {
        return false;
    }
    drop(c);
    complete_pending_io(id, fd, ctx);
    c = lock(&control.ctl);
    if c.state != RunState::Paused {
        return c.state == RunState::Running;
    }
    c.parked += 1;
    control.changed.notify_all();
    // Tell the guest's kvmclock it is being stopped, so its soft-lockup watchdog does not
    // fire after a long pause. Fails harmlessly before the guest enabled kvmclock.
    let _ = fd.kvmclock_ctrl();
    while c.state == RunState::Paused {
        drop(c);
        while let Ok(req) = rx.try_recv() {
            match req {
                Request::SaveState(reply) => {
                    let _ = reply.send(VcpuState::save(fd, id, &ctx.msr_indices));
                }
            }
        }
        c = lock(&control.ctl);
        if c.state == RunState::Paused {
            c = control
                .changed
                .wait_timeout(c, KICK_INTERVAL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
    c.parked -= 1;
    c.state != RunState::Stopping
}

fn run_loop(id: u8, mut fd: VcpuFd, ctx: &VcpuContext, rx: &Receiver<Request>) {
    KVM_RUN.with(|p| p.set(fd.get_kvm_run() as *mut kvm_run));
    let mut throttled_at = Instant::now();
    let reason = loop {
        if !park(id, &mut fd, ctx, rx) {
            break None;
        }
        if let Some(woke) = ctx.control.throttle_point(throttled_at) {
            // Look at the run state again: the VM may have been paused meanwhile.
            throttled_at = woke;
            continue;
        }
        match fd.run() {
            Ok(exit) => {
                let triple_fault = matches!(exit, VcpuExit::Shutdown);
                if let Some(r) = handle_exit(id, exit, ctx) {
                    if triple_fault {
                        log_fault_state(id, &fd);
                    }
                    break Some(r);
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
            }
            Err(e) => break Some(ExitReason::Error(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        }
    };
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    if let Some(r) = reason {
        ctx.control.request_exit(r);
    }
    // Keep serving pause accounting until told to stop, so a pause never waits for us.
    let mut c = lock(&ctx.control.ctl);
    c.parked += 1;
    ctx.control.changed.notify_all();
    while c.state != RunState::Stopping {
        c = ctx
            .control
            .changed
            .wait(c)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// Logs what the vCPU looked like when the guest triple-faulted (KVM_EXIT_SHUTDOWN), which
/// a guest-requested reset does not produce: enough to tell a corrupted page table or stack
/// (CR2, CR3, RSP) from an exception lost while it was being delivered (the events).
///
/// On AMD the registers cannot tell that: the VMCB is undefined after a shutdown intercept,
/// so KVM's SVM code clears it and INITs the vCPU before returning KVM_EXIT_SHUTDOWN (Linux
/// arch/x86/kvm/svm/svm.c, `shutdown_interception`). What is read back then is the INIT state
/// (RIP 0xfff0, CS base 0xffff0000, CR0 0x10), not the state at the fault; only the vector
/// numbers of the last exception and interrupt survive in the events. The log says so rather
/// than send a reader looking for who sent an INIT (docs/migration.md).
fn log_fault_state(id: u8, fd: &VcpuFd) {
    let (Ok(r), Ok(s)) = (fd.get_regs(), fd.get_sregs()) else {
        tracing::error!("vCPU {id}: triple fault (KVM_EXIT_SHUTDOWN); registers unreadable");
        return;
    };
    let events = fd
        .get_vcpu_events()
        .map(|e| {
            format!(
                "exception injected={} nr={} pending={} has_error={} error={:#x}; interrupt \
                 injected={} nr={}; nmi injected={} pending={}",
                e.exception.injected,
                e.exception.nr,
                e.exception.pending,
                e.exception.has_error_code,
                e.exception.error_code,
                e.interrupt.injected,
                e.interrupt.nr,
                e.nmi.injected,
                e.nmi.pending
            )
        })
        .unwrap_or_else(|e| format!("events unreadable: {e}"));
    let reset = if r.rip == 0xfff0 && s.cs.base == 0xffff_0000 {
        " (INIT state: KVM reset the vCPU at the shutdown intercept, as on AMD; the state at the \
         fault is lost)"
    } else {
        ""
    };
    tracing::error!(
        "vCPU {id}: triple fault (KVM_EXIT_SHUTDOWN){reset}: rip={:#x} rsp={:#x} rflags={:#x} \
         cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}/{:#x} gdt={:#x}/{:#x} \
         cs={:#x} ss={:#x}; {events}",
        r.rip,
        r.rsp,
        r.rflags,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer,
        s.idt.base,
        s.idt.limit,
        s.gdt.base,
        s.gdt.limit,
        s.cs.selector,
        s.ss.selector
    );
}

/// Dispatches one exit; returns a reason to stop the VM.
fn handle_exit(id: u8, exit: VcpuExit<'_>, ctx: &VcpuContext) -> Option<ExitReason> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !ctx.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            ctx.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio.read(addr, data) {
                tracing::debug!("vCPU {id}: unhandled MMIO read at {addr:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio.write(addr, data) {
                tracing::debug!("vCPU {id}: unhandled MMIO write at {addr:#x}");
            }
        }
        VcpuExit::Shutdown => return Some(ExitReason::GuestReset),
        VcpuExit::Hlt => return Some(ExitReason::GuestPowerOff),
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::GuestPowerOff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::GuestReset,
                other => ExitReason::Error(format!("vCPU {id}: system event {other}")),
            })
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(ExitReason::Error(format!(
                "vCPU {id}: KVM entry failed, hardware reason {reason:#x} on CPU {cpu}"
            )))
        }
        VcpuExit::InternalError => {
            return Some(ExitReason::Error(format!("vCPU {id}: KVM internal error")))
        }
        other => tracing::debug!("vCPU {id}: ignored exit {other:?}"),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saving_a_stopped_vm_fails_at_once_instead_of_waiting_for_its_threads() {
        // A vCPU that saw a triple fault left its run loop and serves no requests; before
        // this check, save_state waited for its answer for ever (a lab run hung so).
        let control = Arc::new(VcpuControl::default());
        control.set_paused();
        control.request_exit(ExitReason::GuestReset);
        let vcpus = Vcpus::new(Vec::new(), control);
        let started = Instant::now();
        match vcpus.save_state() {
            Err(VcpuError::Stopped(ExitReason::GuestReset)) => {}
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn stopping_joins_ended_threads_and_leaves_a_stuck_one_behind_by_the_deadline() {
        // A thread blocked outside KVM_RUN ignores kicks (a channel receive restarts after
        // the signal, as a write to a full pipe would): the stop must not wait for it for
        // ever, and must still join the threads that end.
        install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::default());
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let mut handles = Vec::new();
        for (id, thread) in [
            (0, std::thread::spawn(|| {})),
            (
                1,
                std::thread::spawn(move || {
                    let _ = stuck.recv();
                }),
            ),
        ] {
            let (requests, _) = std::sync::mpsc::channel();
            handles.push(VcpuHandle {
                id,
                thread: Some(thread),
                requests,
            });
        }
        let mut vcpus = Vcpus::new(handles, control.clone());
        let started = Instant::now();
        assert_eq!(vcpus.stop_within(Duration::from_millis(100)), 1);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "stop took {took:?}");
        assert_eq!(lock(&control.ctl).state, RunState::Stopping);
        assert!(vcpus.handles.iter().all(|h| h.thread.is_none()));
        // Dropping the Vcpus stops again: nothing is left to wait for.
        let started = Instant::now();
        drop(vcpus);
        assert!(started.elapsed() < Duration::from_secs(1));
        release.send(()).unwrap();
    }

    #[test]
    fn a_throttled_vcpu_sleeps_in_proportion_and_never_stops_for_good() {
        assert_eq!(throttle_sleep(0), Duration::ZERO);
        assert_eq!(throttle_sleep(20), Duration::from_micros(2500));
        assert_eq!(throttle_sleep(50), THROTTLE_TIMESLICE);
        assert_eq!(throttle_sleep(90), THROTTLE_TIMESLICE * 9);
        // 100% would never run the guest: capped.
        assert_eq!(throttle_sleep(100), THROTTLE_TIMESLICE * 99);
    }

    #[test]
    fn the_throttle_point_sleeps_only_after_a_timeslice_and_a_pause_ends_the_sleep() {
        let c = Arc::new(VcpuControl::default());
        let long_ago = Instant::now() - THROTTLE_TIMESLICE * 2;
        assert_eq!(c.throttle_point(long_ago), None, "no throttle, no sleep");
        c.throttle.store(50, Ordering::Relaxed);
        assert_eq!(
            c.throttle_point(Instant::now()),
            None,
            "a thread that just slept runs a timeslice first"
        );
        assert!(c.throttle_point(long_ago).is_some());
        // At 99% the sleep is ~1 s; a pause must end it at once.
        c.throttle.store(THROTTLE_MAX, Ordering::Relaxed);
        let sleeper = {
            let c = c.clone();
            std::thread::spawn(move || c.throttle_point(long_ago))
        };
        std::thread::sleep(Duration::from_millis(20));
        c.set_paused();
        c.changed.notify_all();
        let woke = sleeper.join().unwrap();
        assert!(woke.is_some());
    }
}
