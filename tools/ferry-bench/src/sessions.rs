//! One guest migrating from VMM process to VMM process: under ferry's VMM (`ferry run`, then
//! `ferry receive` destinations, migrated through the control API) or under Debian's QEMU
//! (`-incoming` destinations, migrated through QMP). After each hop the destination is the new
//! source; the old source's console is checked for kernel errors.

use std::ffi::OsString;
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ferry_lab::{
    heartbeat_gaps, AgentClient, FerryLaunch, FerryVmm, Guest, GuestConfig, Heartbeat,
    HeartbeatGaps, QemuMicrovm, Vmm,
};
use ferry_vmm::memory::DEBUG_DIGEST_ENV;
use ferry_vmm::migration::{request_migration, MigrateOptions};
use serde_json::json;

use crate::error::BenchError;
use crate::qmp::Qmp;
use crate::results::Sample;

/// How long a VMM may take to start (QEMU loads its libraries over 9p in the lab).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the source VMM may take to exit after a migration.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest migration the benchmark waits for.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const POLL: Duration = Duration::from_millis(50);
/// zstd level of compressed migrations, both VMMs (the fastest).
pub const ZSTD_LEVEL: i32 = 1;
/// Connections (QEMU: multifd channels) of compressed migrations, both VMMs: each compresses
/// on its own thread. QEMU's multifd default.
pub const COMPRESSED_CONNECTIONS: u16 = 2;
/// QEMU's bandwidth limit is on by default (128 MiB/s); ferry has none. Lift it.
const QEMU_MAX_BANDWIDTH: u64 = 100 << 30;

/// A guest that can be migrated to a fresh destination process on this machine.
pub trait Session {
    /// The agent of the guest where it runs now.
    fn agent(&mut self) -> &mut AgentClient;
    /// Migrates the guest to a new VMM process, which becomes the current one; with
    /// `compress`, page data travels zstd-compressed (level [`ZSTD_LEVEL`]) on
    /// [`COMPRESSED_CONNECTIONS`] connections.
    /// The sample has the source's kernel errors; `verified` and `verify_answer` are for the
    /// caller to fill in after checking the destination.
    fn migrate(
        &mut self,
        hints: bool,
        compress: bool,
        downtime_ms: u64,
    ) -> Result<Sample, BenchError>;
    /// What the current VMM process printed.
    fn vmm_log(&self) -> String;
    /// After a migration: how the destination's RAM differs from the source's at the
    /// switchover, if this VMM can tell (ferry with RAM digests on); `None` if equal or
    /// unknown.
    fn ram_differences(&self) -> Option<String> {
        None
    }
    /// How long the guest went without a heartbeat during the last migration, as this host
    /// saw its consoles ([`heartbeat_gaps`]); `None` without heartbeats on both sides (the
    /// guest's `heartbeat` must run during the migration) or when the destination's console
    /// was connected too late to tell.
    fn heartbeat_gaps(&mut self) -> Option<HeartbeatGaps>;
}

/// What the guest pause of a hop is measured from: when the migration began and the
/// heartbeats the source's console showed.
struct LastHop {
    started: Instant,
    source_beats: Vec<Heartbeat>,
}

impl LastHop {
    fn gaps(&self, destination: &AgentClient) -> Option<HeartbeatGaps> {
        heartbeat_gaps(&self.source_beats, &destination.heartbeats(), self.started)
    }
}

/// Waits until `done` returns `Some`, polling; `what` names it in the timeout error.
fn poll<T>(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> Result<Option<T>, BenchError>,
) -> Result<T, BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = done()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Timeout {
                what: what.to_string(),
                timeout,
            });
        }
        thread::sleep(POLL);
    }
}

/// One ferry VMM process (`ferry run` or `ferry receive`) and, once the guest runs there, the
/// agent on its console. `ferry-lab`'s [`Guest`] connects to the console right after the start,
/// but `ferry receive` creates its serial socket only when it restores the migrated VM, so
/// ferry's processes are managed here. Killed when dropped.
struct FerryNode {
    child: Child,
    serial: PathBuf,
    api: PathBuf,
    log: PathBuf,
    agent: Option<AgentClient>,
}

impl FerryNode {
    /// Starts `ferry run` (no `listen`) or `ferry receive --listen` as hop `hop` in `dir`.
    fn spawn(
        binary: &Path,
        dir: &Path,
        hop: u32,
        listen: Option<&str>,
        config: &GuestConfig,
        digests: bool,
    ) -> Result<Self, BenchError> {
        let (serial, api, log) = (
            dir.join(format!("vm{hop}.serial")),
            dir.join(format!("vm{hop}.api")),
            dir.join(format!("vm{hop}.log")),
        );
        let launch = match listen {
            Some(listen) => FerryLaunch::Receive(listen.to_string()),
            None => FerryLaunch::Run,
        };
        let vmm = FerryVmm::new(binary, launch).with_api_socket(&api);
        let io = |what: &str, source| BenchError::Io {
            what: format!("{what} {}", log.display()),
            source,
        };
        let out = File::create(&log).map_err(|e| io("creating", e))?;
        let err = out.try_clone().map_err(|e| io("opening", e))?;
        let mut command = vmm.command(config, &serial);
        if digests {
            command.env(DEBUG_DIGEST_ENV, dir.join(format!("vm{hop}")));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| BenchError::Io {
                what: format!("starting {}", binary.display()),
                source,
            })?;
        Ok(Self {
            child,
            serial,
            api,
            log,
            agent: None,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> Result<Option<ExitStatus>, BenchError> {
        self.child.try_wait().map_err(|source| BenchError::Io {
            what: "waiting for the VMM".into(),
            source,
        })
    }

    /// Connects to the guest's console once the socket exists.
    fn attach(&mut self) -> Result<&mut AgentClient, BenchError> {
        if self.agent.is_none() {
            let serial = self.serial.clone();
            let stream = poll("the VMM's serial socket", START_TIMEOUT, || {
                if let Some(status) = self.exited()? {
                    return Err(BenchError::Vmm(format!(
                        "the VMM exited ({status}) before its console was up:\n{}",
                        self.log()
                    )));
                }
                Ok(UnixStream::connect(&serial).ok())
            })?;
            let reader = stream.try_clone().map_err(|source| BenchError::Io {
                what: format!("connecting to {}", serial.display()),
                source,
            })?;
            self.agent = Some(AgentClient::new(reader, stream));
        }
        Ok(self.agent.as_mut().expect("attached above"))
    }

    /// Connects to the guest's console as soon as its socket exists, polling until `done`
    /// (the migration ended) or the VMM exited; returns whether it connected before `done`.
    fn attach_while(&mut self, done: impl Fn() -> bool) -> Result<bool, BenchError> {
        loop {
            let ended = done();
            if let Ok(stream) = UnixStream::connect(&self.serial) {
                let reader = stream.try_clone().map_err(|source| BenchError::Io {
                    what: format!("connecting to {}", self.serial.display()),
                    source,
                })?;
                self.agent = Some(AgentClient::new(reader, stream));
                return Ok(!ended);
            }
            if ended || self.exited()?.is_some() {
                return Ok(false);
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn kernel_errors(&self) -> Vec<String> {
        self.agent
            .as_ref()
            .map(AgentClient::kernel_errors)
            .unwrap_or_default()
    }
}

impl Drop for FerryNode {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A guest under ferry's VMM.
pub struct FerrySession {
    binary: PathBuf,
    dir: PathBuf,
    config: GuestConfig,
    node: FerryNode,
    hops: u32,
    digests: bool,
    differences: Option<String>,
    lazy_dirty_log: bool,
    audit_dirty_log: bool,
    bandwidth: Option<u64>,
    last_hop: Option<LastHop>,
}

impl FerrySession {
    /// Boots the guest under `ferry run`; sockets and logs go to `dir`.
    pub fn boot(binary: &Path, dir: &Path, config: &GuestConfig) -> Result<Self, BenchError> {
        Self::boot_with(binary, dir, config, false)
    }

    /// [`FerrySession::boot`], with RAM digests at every switchover when `digests` is set
    /// (`FERRY_DEBUG_RAM_DIGEST`): [`Session::ram_differences`] then compares the source's
    /// RAM with the destination's after each migration.
    pub fn boot_with(
        binary: &Path,
        dir: &Path,
        config: &GuestConfig,
        digests: bool,
    ) -> Result<Self, BenchError> {
        let mut node = FerryNode::spawn(binary, dir, 0, None, config, digests)?;
        node.attach()?;
        Ok(Self {
            binary: binary.to_path_buf(),
            dir: dir.to_path_buf(),
            config: config.clone(),
            node,
            hops: 0,
            digests,
            differences: None,
            lazy_dirty_log: true,
            audit_dirty_log: false,
            bandwidth: None,
            last_hop: None,
        })
    }

    /// Whether migrations arm KVM's dirty log lazily (the default, `ferry migrate
    /// --lazy-dirty-log`).
    pub fn set_lazy_dirty_log(&mut self, lazy: bool) {
        self.lazy_dirty_log = lazy;
    }

    /// Whether migrations audit the dirty log (`ferry migrate --audit-dirty-log`).
    pub fn set_audit_dirty_log(&mut self, audit: bool) {
        self.audit_dirty_log = audit;
    }

    /// The stream's bandwidth limit, bytes/s (`ferry migrate --bandwidth`); `None`: none.
    pub fn set_bandwidth(&mut self, bytes_per_s: Option<u64>) {
        self.bandwidth = bytes_per_s;
    }

    /// Compares the digests of the last hop (`hops - 1` sent, `hops` received).
    fn compare_digests(&self) -> Option<String> {
        let sent = self.dir.join(format!("vm{}.sent.crc", self.hops - 1));
        let received = self.dir.join(format!("vm{}.received.crc", self.hops));
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let (sent, received) = match (read(&sent), read(&received)) {
            (Ok(s), Ok(r)) => (s, r),
            (Err(e), _) | (_, Err(e)) => return Some(format!("no RAM digest: {e}")),
        };
        let differences = digest_differences(&sent, &received)?;
        // Whether the restore wrote guest RAM: the destination's RAM before and after it.
        let before_restore = read(
            &self
                .dir
                .join(format!("vm{}.received-before-restore.crc", self.hops)),
        );
        Some(match before_restore {
            Ok(before) => format!(
                "{differences}\n  transfer (source vs destination before the restore): {}\n  restore: {}",
                summary(digest_differences(&sent, &before)),
                summary(digest_differences(&before, &received)),
            ),
            Err(_) => differences,
        })
    }
}

/// The first line of a [`digest_differences`] answer, or "no change".
fn summary(d: Option<String>) -> String {
    d.map_or("no change".into(), |d| {
        d.lines().next().unwrap_or_default().to_string()
    })
}

/// How two RAM digests ([`ferry_vmm::memory::GuestRam::write_digest`]) differ: the number
/// of pages and the first few, each with whether it is zero on either side.
pub fn digest_differences(sent: &[u8], received: &[u8]) -> Option<String> {
    const SHOWN: usize = 16;
    if sent.len() != received.len() {
        return Some(format!(
            "RAM digests of different sizes: {} and {} pages",
            sent.len() / 4,
            received.len() / 4
        ));
    }
    let zero = crc32fast::hash(&[0u8; 4096]).to_le_bytes();
    let pages: Vec<(usize, &[u8], &[u8])> = sent
        .chunks(4)
        .zip(received.chunks(4))
        .enumerate()
        .filter(|(_, (s, r))| s != r)
        .map(|(i, (s, r))| (i, s, r))
        .collect();
    if pages.is_empty() {
        return None;
    }
    let shown: Vec<String> = pages
        .iter()
        .take(SHOWN)
        .map(|(i, s, r)| {
            let what = match (*s == zero, *r == zero) {
                (true, _) => "zero at the source",
                (_, true) => "zero at the destination",
                _ => "different data",
            };
            format!("page {i} ({:#x} in RAM order): {what}", *i as u64 * 4096)
        })
        .collect();
    Some(format!(
        "{} page(s) of the destination's RAM differ from the source's at the switchover:\n{}",
        pages.len(),
        shown.join("\n")
    ))
}

impl Session for FerrySession {
    fn ram_differences(&self) -> Option<String> {
        self.differences.clone()
    }

    fn heartbeat_gaps(&mut self) -> Option<HeartbeatGaps> {
        let last = self.last_hop.as_ref()?;
        last.gaps(self.node.agent.as_ref()?)
    }

    fn agent(&mut self) -> &mut AgentClient {
        self.node
            .agent
            .get_or_insert_with(|| AgentClient::new(std::io::empty(), std::io::sink()))
    }

    fn vmm_log(&self) -> String {
        self.node.log()
    }

    fn migrate(
        &mut self,
        hints: bool,
        compress: bool,
        downtime_ms: u64,
    ) -> Result<Sample, BenchError> {
        self.hops += 1;
        self.last_hop = None;
        let mut dest = FerryNode::spawn(
            &self.binary,
            &self.dir,
            self.hops,
            Some("127.0.0.1:0"),
            &self.config,
            self.digests,
        )?;
        const MARK: &str = "waiting for a migration on ";
        let endpoint = poll("ferry receive to listen", START_TIMEOUT, || {
            let log = dest.log();
            // Only a whole line: the VMM may be writing it right now.
            let mut lines = log.split_inclusive('\n');
            if let Some(line) = lines.find(|l| l.ends_with('\n') && l.contains(MARK)) {
                let at = line.find(MARK).unwrap_or(0) + MARK.len();
                return Ok(Some(line[at..].trim().to_string()));
            }
            if let Some(status) = dest.exited()? {
                return Err(BenchError::Vmm(format!(
                    "ferry receive exited ({status}) before listening:\n{log}"
                )));
            }
            Ok(None)
        })?;
        let options = MigrateOptions {
            hints,
            downtime_ms,
            lazy_dirty_log: self.lazy_dirty_log,
            audit_dirty_log: self.audit_dirty_log,
            bandwidth: self.bandwidth,
            ..MigrateOptions::default()
        };
        let options = if compress {
            MigrateOptions {
                compression: ferry_migration::Compression::Zstd { level: ZSTD_LEVEL },
                connections: COMPRESSED_CONNECTIONS,
                ..options
            }
        } else {
            options
        };
        let started = Instant::now();
        let api = self.node.api.clone();
        // The destination's console is up while RAM streams in (`ferry receive` binds it
        // with the VM): connect during the migration, so that the guest's first heartbeat
        // after the switchover arrives when the guest prints it.
        let (migrated, early) = thread::scope(|scope| {
            let migration = scope
                .spawn(|| request_migration(&api, &endpoint, &options).map_err(|e| e.to_string()));
            let early = dest.attach_while(|| migration.is_finished());
            let migrated = migration
                .join()
                .unwrap_or_else(|_| Err("the migration thread panicked".to_string()));
            (migrated, early)
        });
        let stats = migrated.map_err(|e| {
            BenchError::Vmm(format!(
                "migration to {endpoint} failed: {e}\ndestination log:\n{}",
                dest.log()
            ))
        })?;
        let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
        let source_beats = self.agent().heartbeats();
        self.last_hop = early?.then_some(LastHop {
            started,
            source_beats,
        });
        if self.audit_dirty_log {
            eprintln!(
                "ferry: hop {}: the dirty-log audit found {} page(s) written without KVM's dirty log reporting them ({:.0} ms in the downtime)",
                self.hops, stats.pages_missed_by_dirty_log, stats.audit_ms
            );
        }
        // Connects now if it was not up before the migration ended.
        dest.attach()?;
        let source = &mut self.node;
        let status = poll("the source VMM to exit", EXIT_TIMEOUT, || source.exited())?;
        if !status.success() {
            return Err(BenchError::Vmm(format!(
                "the source VMM exited with {status} after migrating:\n{}",
                source.log()
            )));
        }
        let kernel_errors = source.kernel_errors();
        self.node = dest;
        self.differences = if self.digests {
            self.compare_digests()
        } else {
            None
        };
        Ok(Sample {
            total_ms: stats.total_ms,
            downtime_ms: stats.downtime_ms,
            // What crossed the link: after compression.
            bytes: if stats.wire_bytes > 0 {
                stats.wire_bytes
            } else {
                stats.bytes
            },
            pages_sent: stats.pages_sent,
            pages_zero: stats.pages_zero,
            pages_skipped: stats.pages_skipped_total(),
            rounds: stats.rounds.len() as u64,
            wall_ms,
            verified: false,
            verify_answer: String::new(),
            kernel_errors,
            switchover: Some(stats.switchover.clone()),
            final_round_pages: stats
                .rounds
                .last()
                .filter(|r| r.is_final)
                .map(|r| [r.pages_queued, r.pages_sent, r.pages_zero]),
            rounds_detail: stats.rounds.clone(),
            sources: stats.sources.clone(),
            ..Sample::default()
        })
    }
}

/// A guest under Debian's QEMU (`-M microvm,acpi=on`), with QMP.
pub struct QemuSession {
    binary: PathBuf,
    dir: PathBuf,
    config: GuestConfig,
    guest: Guest,
    qmp: Qmp,
    hops: u32,
    digests: bool,
    differences: Option<String>,
    bandwidth: Option<u64>,
    last_hop: Option<LastHop>,
}

/// A QEMU command line; `incoming`: a destination on that port (`Some(None)`: one that waits
/// for `migrate-incoming`, so that its migration settings can be set first).
fn qemu(binary: &Path, qmp: &Path, incoming: Option<Option<u16>>, held: bool) -> QemuMicrovm {
    let mut qmp_arg = OsString::from("unix:");
    qmp_arg.push(qmp);
    qmp_arg.push(",server=on,wait=off");
    let mut extra_args = vec!["-qmp".into(), qmp_arg];
    if held {
        // The guest does not run after the migration until `cont`.
        extra_args.push("-S".into());
    }
    match incoming {
        Some(Some(port)) => {
            extra_args.push("-incoming".into());
            extra_args.push(format!("tcp:127.0.0.1:{port}").into());
        }
        Some(None) => {
            extra_args.push("-incoming".into());
            extra_args.push("defer".into());
        }
        None => {}
    }
    QemuMicrovm {
        binary: binary.to_path_buf(),
        extra_args,
    }
}

/// A free loopback TCP port (free when this returns; QEMU binds it right after).
fn free_port() -> Result<u16, BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| BenchError::Io {
        what: "finding a free loopback port".into(),
        source,
    })?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|source| BenchError::Io {
            what: "finding a free loopback port".into(),
            source,
        })
}

impl QemuSession {
    /// Boots the guest under QEMU; `config.free_page_hint` selects the balloon's
    /// `free-page-hint` (on: QEMU hints during every migration). Sockets go to `dir`.
    pub fn boot(binary: &Path, dir: &Path, config: &GuestConfig) -> Result<Self, BenchError> {
        Self::boot_with(binary, dir, config, false)
    }

    /// [`QemuSession::boot`], comparing guest RAM at every switchover when `digests` is set,
    /// as [`FerrySession::boot_with`] does: each destination starts held (`-S`), both sides
    /// save RAM (`pmemsave`) once the migration completed, then the destination runs.
    pub fn boot_with(
        binary: &Path,
        dir: &Path,
        config: &GuestConfig,
        digests: bool,
    ) -> Result<Self, BenchError> {
        let path = dir.join("q0.qmp");
        let guest = Guest::spawn(&qemu(binary, &path, None, false), config)?;
        let qmp = Qmp::connect(&path, START_TIMEOUT)?;
        Ok(Self {
            binary: binary.to_path_buf(),
            dir: dir.to_path_buf(),
            config: config.clone(),
            guest,
            qmp,
            hops: 0,
            digests,
            differences: None,
            bandwidth: None,
            last_hop: None,
        })
    }

    /// QEMU's `max-bandwidth`, bytes/s; `None`: lifted (its 128 MiB/s default would limit
    /// QEMU where ferry has no limit).
    pub fn set_bandwidth(&mut self, bytes_per_s: Option<u64>) {
        self.bandwidth = bytes_per_s;
    }
}

/// CRC-32 of every 4 KiB page of a RAM image, as [`ferry_vmm::memory::GuestRam::write_digest`]
/// writes them.
fn digest_of_image(path: &Path) -> Result<Vec<u8>, BenchError> {
    let bytes = std::fs::read(path).map_err(|source| BenchError::Io {
        what: format!("reading {}", path.display()),
        source,
    })?;
    let _ = std::fs::remove_file(path);
    Ok(bytes
        .chunks(4096)
        .flat_map(|p| crc32fast::hash(p).to_le_bytes())
        .collect())
}

/// Saves guest RAM (`[0, bytes)`) of the QEMU behind `qmp` to `path`.
fn pmemsave(qmp: &mut Qmp, bytes: u64, path: &Path) -> Result<(), BenchError> {
    qmp.execute(
        "pmemsave",
        Some(json!({ "val": 0, "size": bytes, "filename": path.to_string_lossy() })),
    )?;
    Ok(())
}

impl Session for QemuSession {
    fn ram_differences(&self) -> Option<String> {
        self.differences.clone()
    }

    fn heartbeat_gaps(&mut self) -> Option<HeartbeatGaps> {
        self.last_hop.as_ref()?.gaps(self.guest.agent())
    }

    fn agent(&mut self) -> &mut AgentClient {
        self.guest.agent()
    }

    fn vmm_log(&self) -> String {
        self.guest.vmm_log()
    }

    /// `hints` is fixed by the balloon device QEMU was started with; `compress` is multifd
    /// with zstd, set on both ends.
    fn migrate(
        &mut self,
        _hints: bool,
        compress: bool,
        downtime_ms: u64,
    ) -> Result<Sample, BenchError> {
        self.hops += 1;
        self.last_hop = None;
        let path = self.dir.join(format!("q{}.qmp", self.hops));
        let port = free_port()?;
        // A compressed migration's destination listens once multifd is set up there.
        let listen = (!compress).then_some(port);
        let dest = Guest::spawn(
            &qemu(&self.binary, &path, Some(listen), self.digests),
            &self.config,
        )?;
        // QMP is served from QEMU's main loop, which starts after -incoming is listening.
        let mut dest_qmp = Qmp::connect(&path, START_TIMEOUT)?;
        let state = dest_qmp.run_state()?;
        if state != "inmigrate" {
            return Err(BenchError::Vmm(format!(
                "the destination QEMU is {state}, not waiting for a migration"
            )));
        }
        // Multifd is a setting of both ends; the source was itself a destination before and
        // keeps what was set there, so it is set (on or off) every time.
        let multifd = |qmp: &mut Qmp| -> Result<(), BenchError> {
            qmp.execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": [{ "capability": "multifd", "state": compress }] })),
            )?;
            if compress {
                qmp.execute(
                    "migrate-set-parameters",
                    Some(json!({
                        "multifd-channels": COMPRESSED_CONNECTIONS,
                        "multifd-compression": "zstd",
                        "multifd-zstd-level": ZSTD_LEVEL,
                    })),
                )?;
            }
            Ok(())
        };
        multifd(&mut self.qmp)?;
        if compress {
            multifd(&mut dest_qmp)?;
            dest_qmp.execute(
                "migrate-incoming",
                Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })),
            )?;
        }
        self.qmp.execute(
            "migrate-set-parameters",
            Some(json!({
                "downtime-limit": downtime_ms,
                "max-bandwidth": self.bandwidth.unwrap_or(QEMU_MAX_BANDWIDTH),
            })),
        )?;
        let started = Instant::now();
        self.qmp.execute(
            "migrate",
            Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })),
        )?;
        let qmp = &mut self.qmp;
        let info = poll("QEMU's migration", MIGRATION_TIMEOUT, || {
            let info = qmp.query_migrate()?;
            match info.status.as_deref() {
                // QEMU 7.2 shows `completed` a moment before it stores the total time and the
                // downtime (both still 0): wait for them.
                Some("completed") if info.total_time.unwrap_or(0) > 0 => Ok(Some(info)),
                Some("completed") => Ok(None),
                Some(s @ ("failed" | "cancelled")) => Err(BenchError::Vmm(format!(
                    "QEMU's migration {s}: {}",
                    info.error_desc.unwrap_or_default()
                ))),
                _ => Ok(None),
            }
        })?;
        let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
        self.differences = None;
        if self.digests {
            // Held by -S: the destination has the guest's RAM and does not run it yet.
            poll(
                "the destination QEMU to have the guest",
                START_TIMEOUT,
                || Ok((dest_qmp.run_state()? != "inmigrate").then_some(())),
            )?;
            let bytes = u64::from(self.config.mem_mib) << 20;
            let (sent, received) = (
                self.dir.join(format!("q{}.sent.mem", self.hops - 1)),
                self.dir.join(format!("q{}.received.mem", self.hops)),
            );
            pmemsave(&mut self.qmp, bytes, &sent)?;
            pmemsave(&mut dest_qmp, bytes, &received)?;
            self.differences =
                digest_differences(&digest_of_image(&sent)?, &digest_of_image(&received)?);
            dest_qmp.execute("cont", None)?;
        }
        poll("the destination QEMU to run", START_TIMEOUT, || {
            Ok((dest_qmp.run_state()? == "running").then_some(()))
        })?;
        let kernel_errors = self.guest.agent().kernel_errors();
        // The destination's console was connected before the migration (QEMU waits for
        // its client before it starts, `server=on,wait=on`).
        self.last_hop = (!self.digests).then(|| LastHop {
            started,
            source_beats: self.guest.agent().heartbeats(),
        });
        // The source sits in `postmigrate`; ask it to quit (dropping the guest kills it anyway).
        let _ = self.qmp.execute("quit", None);
        let ram = info.ram.unwrap_or_default();
        self.guest = dest;
        self.qmp = dest_qmp;
        Ok(Sample {
            total_ms: info.total_time.unwrap_or_default() as f64,
            downtime_ms: info.downtime.unwrap_or_default() as f64,
            bytes: ram.transferred,
            pages_sent: ram.normal,
            pages_zero: ram.duplicate,
            pages_skipped: 0,
            rounds: ram.dirty_sync_count,
            wall_ms,
            verified: false,
            verify_answer: String::new(),
            kernel_errors,
            ..Sample::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_that_differ_name_the_pages_and_what_each_side_has() {
        let zero = crc32fast::hash(&[0u8; 4096]).to_le_bytes();
        let data = 7u32.to_le_bytes();
        let other = 9u32.to_le_bytes();
        let sent: Vec<u8> = [zero, data, data, zero].concat();
        assert_eq!(digest_differences(&sent, &sent), None);
        let received: Vec<u8> = [zero, zero, other, data].concat();
        let d = digest_differences(&sent, &received).unwrap();
        assert!(d.starts_with("3 page(s)"), "{d}");
        assert!(
            d.contains("page 1 (0x1000 in RAM order): zero at the destination"),
            "{d}"
        );
        assert!(
            d.contains("page 2 (0x2000 in RAM order): different data"),
            "{d}"
        );
        assert!(
            d.contains("page 3 (0x3000 in RAM order): zero at the source"),
            "{d}"
        );
        assert!(digest_differences(&sent, &sent[..8])
            .unwrap()
            .contains("different sizes"));
    }
}
