//! `ferry demo`: the demo with a real guest. Boots the guest image (Debian's kernel, its
//! balloon driver, ferry's guest agent) under `ferry run`, fills a data set, frees 768 MiB (of 1 GiB),
//! live-migrates to a `ferry receive` with hints off, frees again and migrates on with hints
//! on, then prints the side-by-side table and the guest's own integrity verdicts.
//!
//! Needs hardware KVM; on a machine without it (PVM) it re-runs itself inside the lab
//! (`lab/run`, see docs/lab.md).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;

use ferry_migration::MigrationStats;
use ferry_vmm::migration::{request_migration, MigrateOptions};

use crate::report;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
const CMDLINE: &str = "console=ttyS0 loglevel=5 panic=-1 edd=off initcall_blacklist=cmos_init \
    cryptomgr.notests mitigations=off tsc=unstable trace_clock=global";
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

fn hw_kvm_usable() -> bool {
    let m = |p: &str| Path::new("/sys/module").join(p).exists();
    Path::new("/dev/kvm").exists() && !m("kvm_pvm") && (m("kvm_intel") || m("kvm_amd"))
}

/// The guest agent on a serial console socket.
struct Console {
    lines: Receiver<String>,
    writer: UnixStream,
    errors: Vec<String>,
}

impl Console {
    fn connect(path: &Path) -> Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("console {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let (tx, lines) = mpsc::channel();
        let reader = BufReader::new(stream.try_clone()?);
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                let _ = tx.send(line.trim_end_matches('\r').to_owned());
            }
        });
        Ok(Self {
            lines,
            writer: stream,
            errors: Vec::new(),
        })
    }

    fn until(&mut self, what: &str, timeout: Duration, f: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .with_context(|| format!("no {what} from the guest within {timeout:?}"))?;
            if ferry_lab::KERNEL_ERROR_MARKERS
                .iter()
                .any(|m| line.contains(m))
            {
                self.errors.push(line.clone());
            }
            if f(&line) {
                return Ok(line);
            }
        }
    }

    fn command(&mut self, command: &str) -> Result<String> {
        writeln!(self.writer, "{command}")?;
        let answer = self.until(command, COMMAND_TIMEOUT, |l| {
            l.starts_with("OK ") || l.starts_with("ERR ")
        })?;
        match answer.strip_prefix("OK ") {
            Some(ok) => Ok(ok.to_owned()),
            None => bail!("the guest agent refused `{command}`: {answer}"),
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

fn vm_args(dir: &Path, name: &str, memory_mib: u64) -> (Vec<String>, PathBuf, PathBuf) {
    let (api, serial) = (
        dir.join(format!("{name}.api")),
        dir.join(format!("{name}.serial")),
    );
    let args = [
        "--kernel",
        &format!("{REPO}/build/guest/vmlinuz"),
        "--initrd",
        &format!("{REPO}/build/guest/initramfs.cpio.gz"),
        "--memory",
        &format!("{memory_mib}M"),
        "--vcpus",
        "2",
        "--balloon",
        "hint,report,stats",
        "--no-xsave",
        "--cmdline",
        CMDLINE,
        "--serial",
        &format!("socket:{}", serial.display()),
        "--api-socket",
        &api.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    (args, api, serial)
}

/// Starts `ferry receive` and returns it with the address it listens on.
fn receiver(dir: &Path, name: &str, memory_mib: u64) -> Result<(Vm, String)> {
    let (args, api, serial) = vm_args(dir, name, memory_mib);
    let mut child = Command::new(std::env::current_exe()?)
        .args(["receive", "--listen", "127.0.0.1:0"])
        .args(&args)
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
    console: &mut Console,
    name: &str,
    hints: bool,
) -> Result<(Vm, Console, MigrationStats, String)> {
    console.command(&format!("workload freed {}", args.freed_mib))?;
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
    let mut c = Console::connect(&dest.serial)?;
    c.until("heartbeat", COMMAND_TIMEOUT, |l| l.starts_with("HB "))?;
    let verdict = c.command("verify")?;
    c.errors.append(&mut console.errors);
    Ok((dest, c, stats, verdict))
}

/// Runs `ferry demo`.
pub fn run(args: &VmDemoArgs) -> Result<()> {
    if !args.here && !hw_kvm_usable() {
        eprintln!("no hardware KVM here: running the demo inside the lab (lab/run)");
        let status = Command::new(format!("{REPO}/lab/run"))
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
    let (vm_args, api, serial) = vm_args(&dir, "source", args.memory_mib);
    let child = Command::new(std::env::current_exe()?)
        .arg("run")
        .args(&vm_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting ferry run")?;
    let mut src = Vm { child, api, serial };
    let mut console = Console::connect(&src.serial)?;
    eprintln!("booting the guest image under ferry's VMM ...");
    console.until("FERRY-AGENT READY", BOOT_TIMEOUT, |l| {
        l == "FERRY-AGENT READY"
    })?;
    let features = console.command("features")?;
    let dataset = console.command("dataset 64")?;
    console.command("heartbeat 500")?;
    println!("guest balloon driver: {features}\nguest data set: {dataset}");

    let (mut mid, mut mid_console, off, verdict_off) =
        hop(&dir, args, &mut src, &mut console, "mid", false)?;
    drop(src);
    let (dest, mut dest_console, on, verdict_on) =
        hop(&dir, args, &mut mid, &mut mid_console, "dest", true)?;
    drop(mid);

    println!(
        "\n## {} MiB guest, {} MiB freed before each migration: hints off vs on\n",
        args.memory_mib, args.freed_mib
    );
    print!("{}", report::compare_table(&off, &on));
    println!("\nintegrity on the destination after hints off: {verdict_off}");
    println!("integrity on the destination after hints on:  {verdict_on}");
    dest_console.command("shutdown")?;
    let errors = std::mem::take(&mut dest_console.errors);
    drop(dest);
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(errors.is_empty(), "guest kernel errors: {errors:#?}");
    println!("guest kernel console: no errors");
    Ok(())
}
