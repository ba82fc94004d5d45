//! What the live-migration tests share: VMM processes running the lab's guest image, with
//! its console attached, destinations spawned from the test binary itself, and one hop of a
//! guest from a source to a new destination with the checks every hop must pass.
#![allow(dead_code)] // each test binary uses a part of it

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ferry_lab::{AgentClient, FerryLaunch, FerryVmm, GuestConfig, GuestImage, Vmm};
use ferry_migration::{Endpoint, MigrationStats, ReceiveStats, Tls, TlsFiles};
use ferry_vmm::migration::{request_migration, MigrateOptions};
use ferry_vmm::receive::ReceiveObserver;
use ferry_vmm::{ApiClient, ReceiveSettings, SerialTarget, VmConfig};

pub const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(120);
pub const MEMORY_MIB: u64 = 512;
pub const DATASET_MIB: u64 = 32;
/// Set in a destination process: the JSON of [`DestinationSpec`].
pub const DEST_ENV: &str = "FERRY_TEST_MIGRATION_DESTINATION";

/// The engine options every migration here starts from: the defaults, except that
/// `FERRY_LAZY_DIRTY_LOG=0` turns lazy dirty-log arming off (to compare the two modes), and
/// that the dirty-log audit is on (`FERRY_AUDIT_DIRTY_LOG=0` turns it off): the lab's KVM
/// does not report some guest writes (docs/lab.md), and the audit sends them, so that what
/// these tests check is ferry, not the lab's dirty log.
pub fn base_options() -> MigrateOptions {
    let on = |var: &str| std::env::var(var).map_or(true, |v| v != "0");
    MigrateOptions {
        lazy_dirty_log: on("FERRY_LAZY_DIRTY_LOG"),
        audit_dirty_log: on("FERRY_AUDIT_DIRTY_LOG"),
        ..MigrateOptions::default()
    }
}

/// The lab guest with `vcpus` vCPUs, its console and API on sockets in `dir`.
pub fn image_config(dir: &Path, name: &str, vcpus: u8) -> Result<VmConfig> {
    let image = GuestImage::locate().context("the guest image (run lab/build)")?;
    let mut config = VmConfig::new(&image.kernel);
    config.initrd = Some(image.initrd);
    config.cmdline = GuestConfig::DEFAULT_CMDLINE.to_owned();
    config.memory_bytes = MEMORY_MIB << 20;
    config.vcpus = vcpus;
    config.balloon = "hint,report,stats".parse()?;
    config.serial = SerialTarget::Socket(dir.join(format!("{name}.serial")));
    config.api_socket = Some(dir.join(format!("{name}.api")));
    // The lab's nested CPUID has inconsistent XSAVE sizes.
    config.xsave = false;
    Ok(config)
}

/// What a destination named `name` decides itself: its console and API sockets in `dir`
/// (the VM comes from the source).
pub fn destination_settings(dir: &Path, name: &str) -> ReceiveSettings {
    ReceiveSettings {
        serial: SerialTarget::Socket(dir.join(format!("{name}.serial"))),
        api_socket: Some(dir.join(format!("{name}.api"))),
        ..ReceiveSettings::default()
    }
}

/// One VMM process with the guest's console attached.
pub struct Node {
    pub name: String,
    pub child: Child,
    pub api: PathBuf,
    pub agent: AgentClient,
    pub log: PathBuf,
    pub vcpus: u8,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn connect_serial(path: &Path, child: &mut Child, log: &Path) -> Result<AgentClient> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(AgentClient::new(s.try_clone()?, s)),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => {}
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "VMM exited ({status}) before its console was up:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Node {
    /// Boots the guest under the `ferry-vmm` binary.
    pub fn boot(dir: &Path, name: &str, vcpus: u8) -> Result<Self> {
        Self::boot_with(dir, name, vcpus, MEMORY_MIB)
    }

    /// [`Node::boot`] with `memory_mib` of RAM.
    pub fn boot_with(dir: &Path, name: &str, vcpus: u8, memory_mib: u64) -> Result<Self> {
        let c = image_config(dir, name, vcpus)?;
        let log = log_dir()?.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let (SerialTarget::Socket(serial), Some(api)) = (&c.serial, &c.api_socket) else {
            unreachable!()
        };
        let mut guest = GuestConfig::new(GuestImage::locate()?);
        guest.mem_mib = u32::try_from(memory_mib)?;
        guest.vcpus = u32::from(vcpus);
        guest.cmdline = c.cmdline.clone();
        let vmm = FerryVmm::new(ferry_lab::workspace_binary("ferry-vmm")?, FerryLaunch::Vmm)
            .with_api_socket(api);
        let mut child = vmm
            .command(&guest, serial)
            .env("FERRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        let agent = connect_serial(serial, &mut child, &log)?;
        Ok(Self {
            name: name.into(),
            child,
            api: api.clone(),
            agent,
            log,
            vcpus,
            memory_mib,
        })
    }

    /// Runs an agent command; when it gets no answer, the error carries the VMM's log and
    /// where its threads wait in the kernel (a frozen guest vs. a stuck VMM).
    /// Sends an agent command and waits for its answer. A guest that does not answer is a
    /// lab fault when the evidence says so (the binary then ends as one); otherwise the error
    /// carries the VMM's log, its threads' kernel stacks and what every vCPU is doing.
    pub fn command(&mut self, command: &str) -> Result<String> {
        let (log, pid) = (self.log.clone(), self.child.id());
        let answer = self
            .agent
            .command(command, COMMAND_TIMEOUT)
            .with_context(|| {
                format!(
                    "`{command}` on {}\nVMM log:\n{}\n{}",
                    self.name,
                    std::fs::read_to_string(&log).unwrap_or_default(),
                    kernel_stacks(pid)
                )
            });
        answer.map_err(|e| {
            let e = or_lab_fault(&[&*self], e);
            e.context(format!("vCPUs of {}:\n{}", self.name, vcpu_states(self)))
        })
    }

    /// Fails with the console around each kernel error line, if there is one.
    pub fn check_kernel(&self) -> Result<()> {
        let errors = self.kernel_errors();
        ensure!(
            errors.is_empty(),
            "kernel errors on {}'s console:\n{}",
            self.name,
            errors.join("\n---\n")
        );
        Ok(())
    }

    /// Kernel error lines, each with the console lines around it.
    pub fn kernel_errors(&self) -> Vec<String> {
        let lines = self.agent.transcript();
        let errors = self.agent.kernel_errors();
        errors
            .iter()
            .map(|e| {
                let at = lines.iter().position(|l| l == e).unwrap_or(0);
                lines[at.saturating_sub(5)..(at + 30).min(lines.len())].join("\n")
            })
            .collect()
    }

    pub fn wait_exit(&mut self) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            ensure!(
                Instant::now() < deadline,
                "{} still running {EXIT_TIMEOUT:?} after the migration",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// What a destination process is told.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct DestinationSpec {
    pub listen: String,
    pub settings: ReceiveSettings,
    /// Accept only a TLS source with a certificate from this end's CA.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
}

/// A destination process, before the migration arrived.
pub struct Pending {
    pub node: Option<Node>,
    pub endpoint: String,
    pub lines: Receiver<String>,
    pub serial: PathBuf,
}

/// A destination for a source with `vcpus` vCPUs.
pub fn spawn_destination(dir: &Path, name: &str, vcpus: u8) -> Result<Pending> {
    spawn_destination_with(name, destination_settings(dir, name), vcpus, None)
}

/// A destination with `settings` (and TLS credentials) for a source with `vcpus` vCPUs.
pub fn spawn_destination_with(
    name: &str,
    settings: ReceiveSettings,
    vcpus: u8,
    tls: Option<TlsFiles>,
) -> Result<Pending> {
    let serial = match &settings.serial {
        SerialTarget::Socket(p) => p.clone(),
        _ => unreachable!(),
    };
    let api = settings.api_socket.clone().unwrap();
    let spec = serde_json::to_string(&DestinationSpec {
        listen: "127.0.0.1:0".into(),
        settings,
        tls,
    })?;
    let log = log_dir()?.join(format!("{name}.log"));
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--exact", "destination_process", "--nocapture"])
        .env(DEST_ENV, spec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        // Keep draining after nobody listens: the process must never see a broken pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let endpoint = loop {
        match lines.recv_timeout(LISTEN_TIMEOUT) {
            Ok(l) => {
                if let Some(e) = l.strip_prefix("LISTENING ") {
                    break e.to_owned();
                }
            }
            Err(_) => bail!(
                "destination {name} did not start listening within {LISTEN_TIMEOUT:?}:\n{}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default(),
                kernel_stacks(child.id())
            ),
        }
    };
    // The node exists from here on so that dropping it kills the process.
    let node = Node {
        name: name.into(),
        child,
        api,
        // Replaced by the console once the guest runs there.
        agent: AgentClient::new(std::io::empty(), std::io::sink()),
        log,
        vcpus,
        // The source's, set by whoever migrates to it (only a lab fault's evidence uses it).
        memory_mib: MEMORY_MIB,
    };
    Ok(Pending {
        node: Some(node),
        endpoint,
        lines,
        serial,
    })
}

impl Pending {
    /// Waits for the destination to report that the guest runs there, then attaches.
    pub fn attach(self) -> Result<Node> {
        self.attach_to(None)
    }

    /// [`Pending::attach`] with the console client connected during the migration.
    pub fn attach_with(self, agent: AgentClient) -> Result<Node> {
        self.attach_to(Some(agent))
    }

    fn attach_to(mut self, agent: Option<AgentClient>) -> Result<Node> {
        let mut node = self.node.take().unwrap();
        loop {
            match self.lines.recv_timeout(COMMAND_TIMEOUT) {
                Ok(l) if l.starts_with("RUNNING ") => break,
                Ok(_) => {}
                Err(_) => bail!("destination {} did not resume:\n{}", node.name, node.log()),
            }
        }
        node.agent = match agent {
            Some(agent) => agent,
            None => connect_serial(&self.serial, &mut node.child, &node.log)?,
        };
        Ok(node)
    }

    /// Connects to the destination's console socket as soon as it exists, polling until
    /// `done` (the migration ended) or the process exited: when, and the client; `None` if
    /// the socket never appeared in that time.
    pub fn connect_console(
        &mut self,
        done: impl Fn() -> bool,
    ) -> Result<Option<(Instant, AgentClient)>> {
        loop {
            // Checked before the attempt: a last try after the migration ended still counts.
            let ended = done();
            if let Ok(s) = UnixStream::connect(&self.serial) {
                return Ok(Some((Instant::now(), AgentClient::new(s.try_clone()?, s))));
            }
            let node = self.node.as_mut().unwrap();
            if ended || node.child.try_wait()?.is_some() {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The body of a destination process: a no-op unless this test binary was spawned as one.
/// Each test binary that spawns destinations has a `destination_process` test calling it.
pub fn destination_process() -> Result<()> {
    let Some(spec) = std::env::var_os(DEST_ENV) else {
        return Ok(());
    };
    struct Print;
    impl ReceiveObserver for Print {
        fn listening(&mut self, endpoint: &Endpoint) {
            let addr = endpoint.to_string();
            println!("LISTENING {}", addr.strip_prefix("tcp:").unwrap_or(&addr));
        }
        fn running(&mut self, stats: &ReceiveStats, state_bytes: usize) {
            println!(
                "RUNNING {} state_bytes={state_bytes}",
                serde_json::to_string(stats).unwrap_or_default()
            );
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(std::io::stderr)
        .try_init();
    let spec: DestinationSpec = serde_json::from_str(spec.to_str().context("spec")?)?;
    let listen: Endpoint = spec.listen.parse().map_err(anyhow::Error::msg)?;
    let tls = spec.tls.as_ref().map(Tls::from_files).transpose()?;
    let reason = ferry_vmm::receive::receive(spec.settings, &listen, tls, &mut Print)?;
    eprintln!("destination: the VM stopped: {reason:?}");
    Ok(())
}

/// Where each thread of a stuck process waits in the kernel (root only; best effort).
pub fn kernel_stacks(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("process {pid} is gone");
    };
    let mut out = String::new();
    for task in tasks.flatten() {
        let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
        let status = read("status");
        let state = status
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or("State: ?");
        out += &format!(
            "thread {} ({}) {state} wchan {}:\n{}\n",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            read("stack")
        );
    }
    out
}

pub use ferry_lab::is_heartbeat;

pub fn skipped(s: &MigrationStats, source: &str) -> u64 {
    s.pages_skipped
        .iter()
        .filter(|(n, _)| n == source)
        .map(|(_, p)| p)
        .sum()
}

pub fn summary(label: &str, s: &MigrationStats) -> String {
    format!(
        "| {label} | {:.1} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {} |",
        s.bytes as f64 / (1 << 20) as f64,
        s.total_ms,
        s.downtime_ms,
        s.pages_sent,
        s.pages_zero,
        skipped(s, "balloon-hint"),
        skipped(s, "balloon-report"),
        skipped(s, "unpopulated"),
        s.rounds.len()
    )
}

/// Migrates the guest from `source` to a new destination and checks it carries on there.
pub fn hop(
    dir: &Path,
    source: &mut Node,
    name: &str,
    options: &MigrateOptions,
) -> Result<(Node, MigrationStats)> {
    // A migration over TLS goes to a destination with the same credentials.
    let mut pending = spawn_destination_with(
        name,
        destination_settings(dir, name),
        source.vcpus,
        options.tls.clone(),
    )?;
    // The destination's console is there while RAM streams in: connect to it during the
    // migration, as an operator's console client would, and check that it was there before
    // the source paused the guest.
    let started = Instant::now();
    let (api, endpoint) = (source.api.clone(), pending.endpoint.clone());
    let (migrated, console) = std::thread::scope(|scope| {
        let migration = scope.spawn(move || {
            request_migration(&api, &endpoint, options).map_err(anyhow::Error::from)
        });
        let console = pending.connect_console(|| migration.is_finished());
        let migrated = migration
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the migration thread panicked")));
        (migrated, console)
    });
    let stats = match migrated {
        Ok(stats) => stats,
        Err(e) => {
            let e = anyhow::anyhow!(
                "{} -> {name}: {e}\nsource process: {:?}\nsource VMM log:\n{}",
                source.name,
                source.child.try_wait(),
                source.log()
            );
            return Err(or_lab_fault(&[source], e));
        }
    };
    let (connected, agent) = console?.with_context(|| {
        format!("the destination's console socket was not there during the migration: {stats:?}")
    })?;
    let paused_after = Duration::from_secs_f64((stats.total_ms - stats.downtime_ms).max(0.0) / 1e3);
    ensure!(
        connected.duration_since(started) <= paused_after,
        "the destination's console took a client only {:?} after the migration began, after \
         the source paused the guest ({paused_after:?})",
        connected.duration_since(started)
    );
    let mut dest = pending.attach_with(agent)?;
    dest.memory_mib = source.memory_mib;
    let status = source.wait_exit()?;
    ensure!(
        status.success(),
        "{} exited with {status} after migrating:\n{}",
        source.name,
        source.log()
    );
    if let Err(e) = dest.agent.wait_for(
        "heartbeat on the destination",
        HEARTBEAT_TIMEOUT,
        is_heartbeat,
    ) {
        let e = anyhow::anyhow!(
            "no heartbeat after the migration: {e}\n{}",
            diagnose(&mut dest)
        );
        return Err(or_lab_fault(&[&dest], e));
    }
    let verify = dest.command("verify")?;
    ensure!(
        verify == format!("verify pages={}", DATASET_MIB * 256),
        "{verify}"
    );
    // Real traffic: at least the data set went over, and the last round was the final one.
    ensure!(stats.pages_sent >= DATASET_MIB * 256, "{stats:?}");
    ensure!(stats.rounds.last().is_some_and(|r| r.is_final), "{stats:?}");
    ensure!(stats.downtime_ms > 0.0 && stats.downtime_ms <= stats.total_ms);
    if !options.hints {
        ensure!(
            stats.pages_skipped_total() == 0,
            "hints off skipped pages: {stats:?}"
        );
    }
    source.check_kernel()?;
    Ok((dest, stats))
}

/// What a silent destination is doing: whether the guest kernel still answers the balloon's
/// statistics requests, and whether console input (an interrupt) wakes its output up.
/// The evidence of a lab fault in a VMM whose guest stopped: a vCPU whose page tables lie
/// outside the guest's RAM (the lab's emulated host wrote its own CR3 into the guest,
/// docs/lab.md), from the lab host's trace of the VMM's nested page faults or from its
/// vCPUs' state; `None` without such evidence.
pub fn lab_fault(node: &Node) -> Option<String> {
    // After a triple fault KVM has reset the vCPU: its walks outside RAM in the lab host's
    // trace are the evidence then.
    let ram = ferry_vmm::layout::ram_regions(node.memory_mib << 20);
    let walks = ferry_lab::page_walks_outside_ram(node.child.id(), &ram);
    if !walks.is_empty() {
        return Some(format!("{}:\n{}", node.name, walks.join("\n")));
    }
    let vcpus = ApiClient::connect(&node.api).ok()?.vcpus().ok()?;
    let bad: Vec<String> = vcpus
        .iter()
        .filter_map(|v| {
            let table = v.page_tables_outside_ram?;
            Some(format!(
                "vCPU {} of {} runs on page tables at {table:#x}, outside the guest's RAM",
                v.id, node.name
            ))
        })
        .collect();
    if bad.is_empty() {
        return None;
    }
    Some(format!("{}\n{}", bad.join("\n"), vcpu_states(node)))
}

/// What every vCPU of `node` is doing, read through its API (one line each).
pub fn vcpu_states(node: &Node) -> String {
    match ApiClient::connect(&node.api).and_then(|mut api| api.vcpus()) {
        Ok(vcpus) => vcpus
            .iter()
            .map(|v| format!("vCPU {}: {}", v.id, v.state))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("cannot read them: {e}"),
    }
}

/// `error`, unless one of `nodes` shows a lab fault: then the test binary ends as one
/// ([`ferry_lab::exit_lab_fault`], with the evidence and `error`).
pub fn or_lab_fault(nodes: &[&Node], error: anyhow::Error) -> anyhow::Error {
    for node in nodes {
        if let Some(evidence) = lab_fault(node) {
            ferry_lab::exit_lab_fault(&format!("{evidence}\ntest error: {error:#}"));
        }
    }
    error
}

pub fn diagnose(node: &mut Node) -> String {
    let mut out = String::new();
    if let Ok(mut api) = ApiClient::connect(&node.api) {
        out += &format!("status: {:?}\n", api.status());
        out += &format!("{}\n", vcpu_states(node));
        out += &format!("balloon stats: {:?}\n", api.balloon_stats());
        std::thread::sleep(Duration::from_secs(3));
        out += &format!("balloon stats 3 s later: {:?}\n", api.balloon_stats());
    }
    let woke = node.command("features");
    out += &format!("after console input: {woke:?}\n");
    out += &format!("VMM log:\n{}", node.log());
    out
}

pub fn boot_source(dir: &Path, name: &str, vcpus: u8) -> Result<Node> {
    boot_source_with(dir, name, vcpus, MEMORY_MIB)
}

/// [`boot_source`] with `memory_mib` of RAM.
pub fn boot_source_with(dir: &Path, name: &str, vcpus: u8, memory_mib: u64) -> Result<Node> {
    let mut node = Node::boot_with(dir, name, vcpus, memory_mib)?;
    node.agent
        .wait_ready(BOOT_TIMEOUT)
        .with_context(|| format!("guest boot under ferry-vmm:\n{}", node.log()))?;
    let features = node.command("features")?;
    eprintln!("balloon features negotiated by Linux: {features}");
    ensure!(features.contains("FREE_PAGE_HINT"), "{features}");
    node.command(&format!("dataset {DATASET_MIB}"))?;
    node.command("verify")?;
    node.command("heartbeat 500")?;
    node.agent
        .wait_for("heartbeat", COMMAND_TIMEOUT, is_heartbeat)?;
    Ok(node)
}

pub fn test_dir(name: &str) -> Result<PathBuf> {
    // Sockets cannot live on the lab's 9p share: keep them in /tmp.
    let dir = std::env::temp_dir().join(format!("fm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// VMM logs, under the work tree so that they outlive a lab run.
pub fn log_dir() -> Result<PathBuf> {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../build/mig-test"))
        .join(std::process::id().to_string());
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
