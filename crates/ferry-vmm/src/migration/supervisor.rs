//! The control API's side of migration: one migration at a time on its own thread, its
//! progress in `status`, cancel, and refusing state changes while it owns the VM.

use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use ferry_migration::Endpoint;
use serde_json::Value;

use super::{
    migrate, MigrateError, MigrateOptions, MigrationPhase, MigrationProgress, ProgressTracker,
};
use crate::api::{ErrorCode, Refusal};
use crate::bus::lock;
use crate::exit::ExitReason;
use crate::vmm::Vmm;

/// How long a source VMM keeps serving after a successful migration, so that the API reply
/// with the statistics reaches the client before the process exits.
pub const EXIT_LINGER: Duration = Duration::from_millis(1000);

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
    pub fn handle(&self, vmm: &Arc<Vmm>, to: &str, options: Value) -> Result<Value, Refusal> {
        let options: MigrateOptions = if options.is_null() {
            MigrateOptions::default()
        } else {
            serde_json::from_value(options)
                .map_err(|e| MigrateError::Options(e.to_string()).refusal())?
        };
        let endpoint: Endpoint = to
            .parse()
            .map_err(|e: String| MigrateError::Options(e).refusal())?;
        let progress = self.claim(to, options.hints).map_err(|e| e.refusal())?;
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
            return Err(Refusal::internal(msg));
        }
        match rx.recv() {
            Ok(Ok(stats)) => serde_json::to_value(stats).map_err(Refusal::internal),
            Ok(Err(e)) => Err(e.refusal()),
            Err(_) => Err(Refusal::internal("the migration thread died")),
        }
    }

    /// Runs `change` (an API request that changes the VM's run state or memory: pause,
    /// resume, balloon target) unless a migration owns the VM, which it does from the moment
    /// it is claimed until it fails: a `resume` after the final dirty-log fetch would let the
    /// guest write pages that are never sent, and after a success the guest runs at the
    /// destination. The check and the change happen under the lock that `claim`
    /// takes, so no migration can start in between.
    pub fn unless_migrating<T>(
        &self,
        what: StateChange,
        change: impl FnOnce() -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
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
                    return Err(Refusal::new(
                        ErrorCode::MigratedAway,
                        format!(
                            "{what} refused: the VM was migrated to {} and runs there now",
                            p.to
                        ),
                    ))
                }
                _ => {
                    return Err(Refusal::new(
                        ErrorCode::MigrationActive,
                        format!(
                            "{what} refused: a migration to {} owns the VM until it ends",
                            p.to
                        ),
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
    pub fn cancel(&self) -> Result<(), Refusal> {
        let current = lock(&self.current);
        let Some(p) = current.as_ref() else {
            return Err(Refusal::new(
                ErrorCode::NoMigration,
                "no migration to cancel",
            ));
        };
        let p = lock(p);
        match p.phase {
            MigrationPhase::Connecting | MigrationPhase::Precopy | MigrationPhase::Switchover => {
                lock(&self.cancel).store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::info!("cancelling the migration to {}", p.to);
                Ok(())
            }
            MigrationPhase::Completed => Err(Refusal::new(
                ErrorCode::HandedOver,
                format!(
                    "too late to cancel: the VM was migrated to {} and runs there",
                    p.to
                ),
            )),
            MigrationPhase::OutcomeUnknown => Err(Refusal::new(
                ErrorCode::HandedOver,
                format!(
                    "too late to cancel: the VM was handed over to {} (outcome unknown; see \
                     status)",
                    p.to
                ),
            )),
            MigrationPhase::Failed => Err(Refusal::new(
                ErrorCode::NoMigration,
                "no migration to cancel (the last one failed)",
            )),
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
    /// `vcpus` (stops the vCPUs for the read).
    Vcpus,
}

impl std::fmt::Display for StateChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::BalloonSet => "balloon-set",
            Self::Vcpus => "vcpus",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_migration::{Event, Observer};

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
            assert_eq!(e.code, ErrorCode::MigrationActive);
            assert!(
                e.message
                    .contains("resume refused: a migration to tcp:h:1 owns"),
                "{e}"
            );
        }
        lock(&p).phase = MigrationPhase::Completed;
        let e = change(&s).unwrap_err();
        assert_eq!(e.code, ErrorCode::MigratedAway);
        assert!(e.message.contains("runs there now"), "{e}");
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
        let e = s.cancel().unwrap_err();
        assert_eq!(e.code, ErrorCode::NoMigration);
        assert!(e.message.contains("no migration"), "{e}");
        let p = s.claim("tcp:h:1", true).unwrap();
        let flag = lock(&s.cancel).clone();
        lock(&p).phase = MigrationPhase::Precopy;
        s.cancel().unwrap();
        assert!(flag.load(std::sync::atomic::Ordering::SeqCst));
        lock(&p).phase = MigrationPhase::OutcomeUnknown;
        let e = s.cancel().unwrap_err();
        assert_eq!(e.code, ErrorCode::HandedOver);
        assert!(e.message.contains("too late"), "{e}");
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
