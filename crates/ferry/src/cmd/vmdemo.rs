//! `ferry demo`: the demo with a real guest. Boots the guest image (Debian's kernel, its
//! balloon driver, ferry's guest agent) under `ferry run`, fills a data set, frees 768 MiB (of 1 GiB),
//! live-migrates to a `ferry receive` with hints off, frees again and migrates on with hints
//! on, then prints the side-by-side table and the guest's own integrity verdicts.
//!
//! Needs hardware KVM; on a machine without it (PVM) it re-runs itself inside the lab
//! (`lab/run`, see docs/lab.md).

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Args;

use ferry_lab::{AgentClient, FerryLaunch, FerryVmm, GuestConfig, GuestImage, Vmm};
use ferry_migration::MigrationStats;
use ferry_vmm::migration::{request_migration, MigrateOptions};

use crate::report;

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// `ferry demo` arguments.
#[derive(Debug, Clone, Args)]
pub struct VmDemoArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory_mib: u64,
    /// MiB the guest fills and frees before each migration.
    #[arg(long, default_value_t = 768)]
    pub freed_mib: u64,
    /// With hints on, also ask the balloon driver for free page hints (reported ranges and
    /// never-populated memory are used either way).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub free_page_hint: bool,
    /// How long the bulk round waits for the guest's first hints, in milliseconds (the
    /// engine's default when absent).
    #[arg(long)]
    pub hint_head_start_ms: Option<u64>,
    /// Run here even without hardware KVM (set inside the lab).
    #[arg(long, hide = true)]
    pub here: bool,
}

/// The guest agent on the console socket at `path` (the VMM may still be creating it).
fn connect_console(path: &Path) -> Result<AgentClient> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(AgentClient::new(s.try_clone()?, s)),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("console {}", path.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A `ferry run` or `ferry receive` process and its sockets.
struct Vm {
    child: Child,
    api: PathBuf,
    serial: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command that starts VM `name` (its API socket and console socket in `dir`) as `launch`,
/// with the same guest flags as every test VM (`ferry_lab::FerryVmm`).
fn vm_command(
    dir: &Path,
    name: &str,
    memory_mib: u64,
    launch: FerryLaunch,
) -> Result<(Command, PathBuf, PathBuf)> {
    let (api, serial) = (
        dir.join(format!("{name}.api")),
        dir.join(format!("{name}.serial")),
    );
    let mut guest =
        GuestConfig::new(GuestImage::locate().context("the guest image (run lab/build)")?);
    guest.mem_mib = u32::try_from(memory_mib).context("--memory-mib is too large")?;
    guest.vcpus = 2;
    let vmm = FerryVmm::new(std::env::current_exe()?, launch).with_api_socket(&api);
    Ok((vmm.command(&guest, &serial), api, serial))
}

/// Starts `ferry receive` and returns it with the address it listens on.
fn receiver(dir: &Path, name: &str, memory_mib: u64) -> Result<(Vm, String)> {
    let (mut command, api, serial) = vm_command(
        dir,
        name,
        memory_mib,
        FerryLaunch::Receive("127.0.0.1:0".into()),
    )?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ferry receive")?;
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().context("receiver stderr")?;
    // The listening line goes to us; everything else the VMM logs goes on to our stderr.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("ferry: waiting for a migration on ") {
                let _ = tx.send(line);
            } else {
                eprintln!("{line}");
            }
        }
    });
    let vm = Vm { child, api, serial };
    loop {
        let line = rx
            .recv_timeout(COMMAND_TIMEOUT)
            .context("ferry receive did not start listening")?;
        if let Some(addr) = line.strip_prefix("ferry: waiting for a migration on tcp:") {
            return Ok((vm, addr.to_owned()));
        }
    }
}

/// Frees memory in the guest, migrates it with `hints`, checks it on the destination.
fn hop(
    dir: &Path,
    args: &VmDemoArgs,
    src: &mut Vm,
    console: &mut AgentClient,
    name: &str,
    hints: bool,
    errors: &mut Vec<String>,
) -> Result<(Vm, AgentClient, MigrationStats, String)> {
    console.command(
        &format!("workload freed {}", args.freed_mib),
        COMMAND_TIMEOUT,
    )?;
    let (mut dest, to) = receiver(dir, name, args.memory_mib)?;
    let label = if hints { "on" } else { "off" };
    eprintln!("migrating with hints {label} to {to} ...");
    let options = MigrateOptions {
        hints,
        free_page_hint: args.free_page_hint,
        hint_head_start_ms: args.hint_head_start_ms,
        ..MigrateOptions::default()
    };
    let stats = request_migration(&src.api, &to, &options)
        .with_context(|| format!("migrating with hints {label}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while src.child.try_wait()?.is_none() {
        ensure!(Instant::now() < deadline, "the source VMM did not exit");
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(dest.child.try_wait()?.is_none(), "ferry receive exited");
    errors.extend(console.kernel_errors());
    let mut c = connect_console(&dest.serial)?;
    c.wait_for("heartbeat", COMMAND_TIMEOUT, |l| l.starts_with("HB "))?;
    let verdict = c.command("verify", COMMAND_TIMEOUT)?;
    Ok((dest, c, stats, verdict))
}

/// Runs `ferry demo`.
pub fn run(args: &VmDemoArgs) -> Result<()> {
    if !args.here && !ferry_lab::hw_kvm_usable() {
        eprintln!("no hardware KVM here: running the demo inside the lab (lab/run)");
        let status = Command::new(ferry_lab::workspace_root()?.join("lab/run"))
            .args(["--timeout", "1200", "--"])
            .arg(std::env::current_exe()?)
            .args(["demo", "--here"])
            .args(["--memory-mib", &args.memory_mib.to_string()])
            .args(["--freed-mib", &args.freed_mib.to_string()])
            .args(["--free-page-hint", &args.free_page_hint.to_string()])
            .args(
                args.hint_head_start_ms
                    .map(|ms| ["--hint-head-start-ms".to_owned(), ms.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .status()
            .context("running lab/run (see docs/lab.md; scripts/setup.sh builds the lab)")?;
        ensure!(status.success(), "the demo in the lab failed ({status})");
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (mut command, api, serial) = vm_command(&dir, "source", args.memory_mib, FerryLaunch::Run)?;
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting ferry run")?;
    let mut src = Vm { child, api, serial };
    let mut console = connect_console(&src.serial)?;
    eprintln!("booting the guest image under ferry's VMM ...");
    console.wait_ready(BOOT_TIMEOUT)?;
    let features = console.command("features", COMMAND_TIMEOUT)?;
    let dataset = console.command("dataset 64", COMMAND_TIMEOUT)?;
    console.command("heartbeat 500", COMMAND_TIMEOUT)?;
    println!("guest balloon driver: {features}\nguest data set: {dataset}");

    let mut errors = Vec::new();
    let (mut mid, mut mid_console, off, verdict_off) = hop(
        &dir,
        args,
        &mut src,
        &mut console,
        "mid",
        false,
        &mut errors,
    )?;
    drop(src);
    let (dest, mut dest_console, on, verdict_on) = hop(
        &dir,
        args,
        &mut mid,
        &mut mid_console,
        "dest",
        true,
        &mut errors,
    )?;
    drop(mid);

    println!(
        "\n## {} MiB guest, {} MiB freed before each migration: hints off vs on\n",
        args.memory_mib, args.freed_mib
    );
    print!("{}", report::compare_table(&off, &on));
    println!("\nintegrity on the destination after hints off: {verdict_off}");
    println!("integrity on the destination after hints on:  {verdict_on}");
    dest_console.command("shutdown", COMMAND_TIMEOUT)?;
    errors.extend(dest_console.kernel_errors());
    drop(dest);
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(errors.is_empty(), "guest kernel errors: {errors:#?}");
    println!("guest kernel console: no errors");
    Ok(())
}
