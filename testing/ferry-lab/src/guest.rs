//! A guest running under a VMM process, with the agent's console connected.

use std::fs::{self, File};
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::agent::AgentClient;
use crate::vmm::{GuestConfig, Vmm};

/// How long a VMM may take to create its serial socket (QEMU loads many libraries).
const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);

/// Why a guest could not be started or stopped.
#[derive(Debug, Error)]
pub enum GuestError {
    /// Creating the run directory or the log file failed.
    #[error("cannot prepare {path}: {source}")]
    Prepare {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The VMM binary could not be started.
    #[error("cannot start {vmm}: {source}")]
    Spawn {
        /// The VMM's name.
        vmm: String,
        /// The error.
        source: io::Error,
    },
    /// The VMM exited before the console was connected.
    #[error("{vmm} exited ({status}) before its serial socket was ready; its output:\n{log}")]
    EarlyExit {
        /// The VMM's name.
        vmm: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its stdout and stderr.
        log: String,
    },
    /// No serial socket to connect to in time.
    #[error("cannot connect to {vmm}'s serial socket {path} within {SOCKET_TIMEOUT:?}: {source}")]
    Connect {
        /// The VMM's name.
        vmm: String,
        /// The socket.
        path: PathBuf,
        /// The last connection error.
        source: io::Error,
    },
    /// The VMM did not exit in time.
    #[error("{vmm} still running after {timeout:?}")]
    ExitTimeout {
        /// The VMM's name.
        vmm: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// Waiting for the VMM failed.
    #[error("cannot wait for {vmm}: {source}")]
    Wait {
        /// The VMM's name.
        vmm: String,
        /// The error.
        source: io::Error,
    },
}

/// A running VMM process and the agent on its serial console. The process is killed and its
/// run directory removed when this is dropped.
pub struct Guest {
    vmm: String,
    child: Child,
    dir: PathBuf,
    agent: AgentClient,
    /// Guest RAM as `(start, len)` when it is one block from 0 (up to 3 GiB, below every
    /// VMM's 32-bit hole); `None` for larger guests, whose layout this crate does not know.
    ram: Option<(u64, u64)>,
}

impl Guest {
    /// Starts `vmm` with `config` and connects to the guest's serial console.
    pub fn spawn(vmm: &dyn Vmm, config: &GuestConfig) -> Result<Self, GuestError> {
        let dir = run_dir();
        let prepare = |path: &Path, source| GuestError::Prepare {
            path: path.to_path_buf(),
            source,
        };
        fs::create_dir_all(&dir).map_err(|e| prepare(&dir, e))?;
        let socket = dir.join("serial.sock");
        let log_path = dir.join("vmm.log");
        let log = File::create(&log_path).map_err(|e| prepare(&log_path, e))?;
        let log_err = log.try_clone().map_err(|e| prepare(&log_path, e))?;

        let spawned = vmm
            .command(config, &socket)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(source) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(GuestError::Spawn {
                    vmm: vmm.name().to_string(),
                    source,
                });
            }
        };
        let connected = connect(vmm.name(), &mut child, &socket, &log_path).and_then(|stream| {
            let reader = stream.try_clone().map_err(|e| prepare(&socket, e))?;
            Ok(AgentClient::new(reader, stream))
        });
        match connected {
            Ok(agent) => Ok(Self {
                vmm: vmm.name().to_string(),
                child,
                dir,
                agent,
                ram: (config.mem_mib <= 3 << 10).then_some((0, u64::from(config.mem_mib) << 20)),
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// `error`, unless the lab host's trace shows this VMM's guest walking page tables from a
    /// CR3 outside its RAM: then the test binary ends as a lab fault
    /// ([`crate::exit_lab_fault`], with the evidence and `error`).
    pub fn or_lab_fault<E: std::fmt::Display>(&self, error: E) -> E {
        if let Some(ram) = self.ram {
            let walks = crate::page_walks_outside_ram(self.child.id(), &[ram]);
            if !walks.is_empty() {
                crate::exit_lab_fault(&format!(
                    "{} guest:\n{}\ntest error: {error}",
                    self.vmm,
                    walks.join("\n")
                ));
            }
        }
        error
    }

    /// The agent on the guest's console.
    pub fn agent(&mut self) -> &mut AgentClient {
        &mut self.agent
    }

    /// What the VMM process printed so far.
    pub fn vmm_log(&self) -> String {
        fs::read_to_string(self.dir.join("vmm.log")).unwrap_or_default()
    }

    /// Waits for the VMM to exit (e.g. after the agent's `shutdown`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self.child.try_wait().map_err(|source| GuestError::Wait {
                vmm: self.vmm.clone(),
                source,
            })?;
            if let Some(status) = exited {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(GuestError::ExitTimeout {
                    vmm: self.vmm.clone(),
                    timeout,
                });
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Connects to the VMM's serial socket once it exists, failing early if the VMM exits.
fn connect(
    vmm: &str,
    child: &mut Child,
    socket: &Path,
    log_path: &Path,
) -> Result<UnixStream, GuestError> {
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    loop {
        let exited = child.try_wait().map_err(|source| GuestError::Wait {
            vmm: vmm.to_string(),
            source,
        })?;
        if let Some(status) = exited {
            return Err(GuestError::EarlyExit {
                vmm: vmm.to_string(),
                status,
                log: fs::read_to_string(log_path).unwrap_or_default(),
            });
        }
        match UnixStream::connect(socket) {
            Ok(stream) => return Ok(stream),
            Err(source) if Instant::now() >= deadline => {
                return Err(GuestError::Connect {
                    vmm: vmm.to_string(),
                    path: socket.to_path_buf(),
                    source,
                })
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// A fresh directory for one guest's socket and log.
fn run_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "ferry-guest-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::GuestImage;
    use std::process::Command;

    /// A "VMM" that is any shell command.
    struct Shell(&'static str);

    impl Vmm for Shell {
        fn name(&self) -> &str {
            "shell"
        }
        fn command(&self, _: &GuestConfig, _: &Path) -> Command {
            let mut command = Command::new("sh");
            command.args(["-c", self.0]);
            command
        }
    }

    fn config() -> GuestConfig {
        GuestConfig::new(GuestImage {
            kernel: "/nonexistent/vmlinuz".into(),
            initrd: "/nonexistent/initrd".into(),
        })
    }

    #[test]
    fn a_vmm_that_exits_early_is_reported_with_its_output() {
        let err = Guest::spawn(&Shell("echo cannot open /dev/kvm >&2; exit 3"), &config())
            .err()
            .expect("the VMM exited");
        match err {
            GuestError::EarlyExit { status, log, .. } => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(log, "cannot open /dev/kvm\n");
            }
            other => panic!("expected EarlyExit, got {other}"),
        }
    }

    #[test]
    fn a_missing_vmm_binary_is_a_spawn_error() {
        let vmm = crate::QemuMicrovm {
            binary: "/nonexistent/qemu".into(),
            ..crate::QemuMicrovm::default()
        };
        assert!(matches!(
            Guest::spawn(&vmm, &config()),
            Err(GuestError::Spawn { .. })
        ));
    }
}
