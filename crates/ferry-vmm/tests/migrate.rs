//! End-to-end live migration between ferry VMM processes over loopback TCP, with the real
//! guest (Debian's kernel, its virtio_balloon driver, ferry's guest agent).
//!
//! The source is the `ferry-vmm` binary, asked to migrate through its control API. Each
//! destination is a separate process running `ferry_vmm::migration::receive` (this test
//! binary, re-executed as `destination_process`). The guest hops from VMM to VMM: after every
//! migration the agent's data set must verify on the destination, heartbeats must continue,
//! the source process must exit, and no console may show a kernel error.
//!
//! Needs hardware KVM; on PVM machines run it in the lab:
//! ```text
//! lab/test -p ferry-vmm -- migrat
//! ```

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ferry_lab::{AgentClient, GuestConfig, GuestImage};
use ferry_migration::{Endpoint, MigrationStats, ReceiveStats};
use ferry_vmm::migration::{
    query_progress, request_migration, MigrateOptions, MigrationPhase, ReceiveObserver,
};
use ferry_vmm::{ApiClient, SerialTarget, VmConfig};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);
const LISTEN_TIMEOUT: Duration = Duration::from_secs(120);
const MEMORY_MIB: u64 = 512;
const DATASET_MIB: u64 = 32;
/// Set in a destination process: the JSON of [`DestinationSpec`].
const DEST_ENV: &str = "FERRY_TEST_MIGRATION_DESTINATION";

/// The engine options every migration here starts from: the defaults, except that
/// `FERRY_LAZY_DIRTY_LOG=0` turns lazy dirty-log arming off (to compare the two modes).
fn base_options() -> MigrateOptions {
    MigrateOptions {
        lazy_dirty_log: std::env::var("FERRY_LAZY_DIRTY_LOG").map_or(true, |v| v != "0"),
        ..MigrateOptions::default()
    }
}

fn image_config(dir: &Path, name: &str) -> Result<VmConfig> {
    let image = GuestImage::locate().context("the guest image (run lab/build)")?;
    let mut config = VmConfig::new(&image.kernel);
    config.initrd = Some(image.initrd);
    config.cmdline = GuestConfig::DEFAULT_CMDLINE.to_owned();
    config.memory_bytes = MEMORY_MIB << 20;
    config.vcpus = 2;
    config.balloon = "hint,report,stats".parse()?;
    config.serial = SerialTarget::Socket(dir.join(format!("{name}.serial")));
    config.api_socket = Some(dir.join(format!("{name}.api")));
    // The lab's nested CPUID has inconsistent XSAVE sizes.
    config.xsave = false;
    Ok(config)
}

/// One VMM process with the guest's console attached.
struct Node {
    name: String,
    child: Child,
    api: PathBuf,
    agent: AgentClient,
    log: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect_serial(path: &Path, child: &mut Child, log: &Path) -> Result<AgentClient> {
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
    fn boot(dir: &Path, name: &str) -> Result<Self> {
        let c = image_config(dir, name)?;
        let log = log_dir()?.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let (SerialTarget::Socket(serial), Some(api)) = (&c.serial, &c.api_socket) else {
            unreachable!()
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-vmm"))
            .arg("--kernel")
            .arg(&c.kernel)
            .arg("--initrd")
            .arg(c.initrd.as_ref().unwrap())
            .args([
                "--cmdline",
                &c.cmdline,
                "--memory",
                &format!("{MEMORY_MIB}M"),
            ])
            .args([
                "--vcpus",
                "2",
                "--balloon",
                "hint,report,stats",
                "--no-xsave",
            ])
            .arg("--serial")
            .arg(format!("socket:{}", serial.display()))
            .arg("--api-socket")
            .arg(api)
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
        })
    }

    /// Runs an agent command; when it gets no answer, the error carries the VMM's log and
    /// where its threads wait in the kernel (a frozen guest vs. a stuck VMM).
    fn command(&mut self, command: &str) -> Result<String> {
        let (log, pid) = (self.log.clone(), self.child.id());
        self.agent
            .command(command, COMMAND_TIMEOUT)
            .with_context(|| {
                format!(
                    "`{command}` on {}\nVMM log:\n{}\n{}",
                    self.name,
                    std::fs::read_to_string(&log).unwrap_or_default(),
                    kernel_stacks(pid)
                )
            })
    }

    /// Fails with the console around each kernel error line, if there is one.
    fn check_kernel(&self) -> Result<()> {
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
    fn kernel_errors(&self) -> Vec<String> {
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

    fn wait_exit(&mut self) -> Result<std::process::ExitStatus> {
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

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// What a destination process is told.
#[derive(serde::Serialize, serde::Deserialize)]
struct DestinationSpec {
    listen: String,
    config: VmConfig,
}

/// A destination process, before the migration arrived.
struct Pending {
    node: Option<Node>,
    endpoint: String,
    lines: Receiver<String>,
    serial: PathBuf,
}

fn spawn_destination(dir: &Path, name: &str) -> Result<Pending> {
    spawn_destination_with(name, image_config(dir, name)?)
}

fn spawn_destination_with(name: &str, config: VmConfig) -> Result<Pending> {
    let serial = match &config.serial {
        SerialTarget::Socket(p) => p.clone(),
        _ => unreachable!(),
    };
    let api = config.api_socket.clone().unwrap();
    let spec = serde_json::to_string(&DestinationSpec {
        listen: "127.0.0.1:0".into(),
        config,
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
    fn attach(mut self) -> Result<Node> {
        let mut node = self.node.take().unwrap();
        loop {
            match self.lines.recv_timeout(COMMAND_TIMEOUT) {
                Ok(l) if l.starts_with("RUNNING ") => break,
                Ok(_) => {}
                Err(_) => bail!("destination {} did not resume:\n{}", node.name, node.log()),
            }
        }
        node.agent = connect_serial(&self.serial, &mut node.child, &node.log)?;
        Ok(node)
    }
}

/// The body of a destination process (runs only when spawned by this test).
#[test]
fn destination_process() -> Result<()> {
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
    let reason = ferry_vmm::migration::receive(spec.config, &listen, &mut Print)?;
    eprintln!("destination: the VM stopped: {reason:?}");
    Ok(())
}

/// Where each thread of a stuck process waits in the kernel (root only; best effort).
fn kernel_stacks(pid: u32) -> String {
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

fn is_heartbeat(line: &str) -> bool {
    line.starts_with("HB ")
}

fn skipped(s: &MigrationStats, source: &str) -> u64 {
    s.pages_skipped
        .iter()
        .filter(|(n, _)| n == source)
        .map(|(_, p)| p)
        .sum()
}

fn summary(label: &str, s: &MigrationStats) -> String {
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
fn hop(
    dir: &Path,
    source: &mut Node,
    name: &str,
    options: &MigrateOptions,
) -> Result<(Node, MigrationStats)> {
    let pending = spawn_destination(dir, name)?;
    let stats = match request_migration(&source.api, &pending.endpoint, options) {
        Ok(stats) => stats,
        Err(e) => bail!(
            "{} -> {name}: {e}\nsource process: {:?}\nsource VMM log:\n{}",
            source.name,
            source.child.try_wait(),
            source.log()
        ),
    };
    let mut dest = pending.attach()?;
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
        bail!(
            "no heartbeat after the migration: {e}\n{}",
            diagnose(&mut dest)
        );
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
fn diagnose(node: &mut Node) -> String {
    let mut out = String::new();
    if let Ok(mut api) = ApiClient::connect(&node.api) {
        out += &format!("status: {:?}\n", api.status());
        out += &format!("balloon stats: {:?}\n", api.balloon_stats());
        std::thread::sleep(Duration::from_secs(3));
        out += &format!("balloon stats 3 s later: {:?}\n", api.balloon_stats());
    }
    let woke = node.command("features");
    out += &format!("after console input: {woke:?}\n");
    out += &format!("VMM log:\n{}", node.log());
    out
}

fn boot_source(dir: &Path) -> Result<Node> {
    let mut node = Node::boot(dir, "vm0")?;
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

fn test_dir(name: &str) -> Result<PathBuf> {
    // Sockets cannot live on the lab's 9p share: keep them in /tmp.
    let dir = std::env::temp_dir().join(format!("fm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// VMM logs, under the work tree so that they outlive a lab run.
fn log_dir() -> Result<PathBuf> {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../build/mig-test"))
        .join(std::process::id().to_string());
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[test]
#[ignore = "needs hardware KVM: run through lab/run"]
fn migrates_every_workload_with_hints_off_and_on() -> Result<()> {
    ensure!(ferry_lab::hw_kvm_usable(), "run this test through lab/run");
    let dir = test_dir("matrix")?;
    let mut node = boot_source(&dir)?;
    let mut table = vec![
        "| workload, hints | MiB sent | total ms | downtime ms | pages sent | zero | skipped hint | skipped report | skipped unpopulated | rounds |".to_owned(),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|".to_owned(),
    ];
    let mut freed = Vec::new();
    let cases = [
        ("idle", false),
        ("idle", true),
        ("freed", false),
        ("freed", true),
        ("dirty", false),
        ("dirty", true),
    ];
    for (i, (workload, hints)) in cases.into_iter().enumerate() {
        match workload {
            "idle" => drop(node.command("workload idle")?),
            "freed" => drop(node.command("workload freed 256")?),
            _ => drop(node.command("workload dirty 64 16")?),
        }
        let options = MigrateOptions {
            hints,
            ..base_options()
        };
        let label = format!("{workload}, {}", if hints { "on" } else { "off" });
        let (mut dest, stats) =
            hop(&dir, &mut node, &format!("vm{}", i + 1), &options).context(label.clone())?;
        eprintln!("{label}: {}", serde_json::to_string(&stats)?);
        table.push(summary(&label, &stats));
        if workload == "dirty" {
            let stop = dest.command("workload stop")?;
            ensure!(
                stop.contains("kind=dirty"),
                "the dirty workload did not survive: {stop}"
            );
        }
        if workload == "freed" {
            freed.push(stats);
        }
        node = dest;
    }
    eprintln!("\n{}\n", table.join("\n"));
    // The balloon's sources took part with hints on (hints off skipped nothing: checked per
    // hop). How much they save is the benchmark's business (`ferry bench-vm`): in the lab it
    // varies from run to run, and free page hinting right after a free can even cost bytes
    // (it takes freed memory away from page reporting; see docs/migration.md).
    let on = &freed[1];
    ensure!(
        skipped(on, "balloon-hint") + skipped(on, "balloon-report") > 0,
        "no balloon hint was used for the freed workload: {on:?}"
    );
    let mut api = ApiClient::connect(&node.api)?;
    ensure!(api.balloon_get()?.free_page_hint);
    node.command("shutdown")?;
    ensure!(node.wait_exit()?.success(), "{}", node.log());
    node.check_kernel()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
#[ignore = "needs hardware KVM: run through lab/run"]
fn a_connection_cut_mid_round_leaves_the_source_running_and_a_retry_succeeds() -> Result<()> {
    ensure!(ferry_lab::hw_kvm_usable(), "run this test through lab/run");
    let dir = test_dir("cut")?;
    let mut node = boot_source(&dir)?;
    node.command("workload dirty 32 8")?;
    // Slow enough that the bulk round is still running when the destination dies.
    let slow = MigrateOptions {
        hints: false,
        bandwidth: Some(8 << 20),
        ..base_options()
    };
    let mut pending = spawn_destination(&dir, "cut")?;
    let (api, to) = (node.api.clone(), pending.endpoint.clone());
    let migration = std::thread::spawn(move || request_migration(&api, &to, &slow));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        ensure!(Instant::now() < deadline, "the migration made no progress");
        match query_progress(&node.api)? {
            Some(p) if p.phase == MigrationPhase::Precopy && p.pages_done > p.pages_queued / 5 => {
                eprintln!("cutting the connection at {p:?}");
                break;
            }
            Some(p) => ensure!(p.phase != MigrationPhase::Failed, "{p:?}"),
            None => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut dead = pending.node.take().unwrap();
    dead.child.kill()?;
    dead.child.wait()?;
    let err = migration.join().unwrap().unwrap_err();
    eprintln!("source after the cut: {err}");
    ensure!(err.to_string().contains("VM keeps running"), "{err}");
    let progress = query_progress(&node.api)?.context("no progress after the cut")?;
    ensure!(progress.phase == MigrationPhase::Failed, "{progress:?}");
    // The source guest carries on: running, heartbeats, data intact, workload alive.
    let mut api = ApiClient::connect(&node.api)?;
    ensure!(api.status()?.state == ferry_vmm::vmm::RunState::Running);
    node.agent
        .wait_for("heartbeat after the cut", COMMAND_TIMEOUT, is_heartbeat)?;
    let verify = node.command("verify")?;
    ensure!(
        verify == format!("verify pages={}", DATASET_MIB * 256),
        "{verify}"
    );
    ensure!(node.command("workload stop")?.contains("kind=dirty"));
    ensure!(node.child.try_wait()?.is_none(), "the source exited");
    // A destination that cannot restore the state (one vCPU instead of two) refuses it after
    // receiving all of RAM: it exits with the reason, and the source keeps running.
    let mut misfit = image_config(&dir, "misfit")?;
    misfit.vcpus = 1;
    let mut pending = spawn_destination_with("misfit", misfit)?;
    let err = request_migration(&node.api, &pending.endpoint, &base_options())
        .err()
        .context("a destination with the wrong vCPU count accepted the VM")?;
    eprintln!("source after the refusal: {err}");
    ensure!(err.to_string().contains("cannot restore"), "{err}");
    let mut refused = pending.node.take().unwrap();
    let status = refused.wait_exit()?;
    ensure!(
        !status.success(),
        "the refusing destination exited with {status}"
    );
    ensure!(
        refused.log().contains("nothing was restored") || refused.log().contains("cannot restore"),
        "{}",
        refused.log()
    );
    node.agent
        .wait_for("heartbeat after the refusal", COMMAND_TIMEOUT, is_heartbeat)?;
    ensure!(node.command("verify")?.starts_with("verify pages="));
    // A retry, with hints, succeeds.
    let (mut dest, stats) = hop(&dir, &mut node, "retry", &base_options())?;
    eprintln!("retry: {}", summary("retry", &stats));
    dest.command("shutdown")?;
    ensure!(dest.wait_exit()?.success(), "{}", dest.log());
    dest.check_kernel()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
