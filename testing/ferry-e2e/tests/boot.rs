//! End-to-end: boot the guest image under ferry-vmm, talk to the guest agent over the serial
//! socket and drive the VM through the control API.
//!
//! Needs hardware KVM. On machines with PVM only, run it in the lab:
//! ```text
//! cargo test -p ferry-vmm --test boot --no-run   # prints the test binary
//! lab/run -- target/debug/deps/boot-<hash> --ignored --nocapture
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ferry_lab::{heartbeat_number, FerryLaunch, FerryVmm, Guest, GuestConfig, GuestImage};
use ferry_vmm::ApiClient;

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn api(path: &Path) -> Result<ApiClient> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ApiClient::connect(path) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn wait_balloon(api: &mut ApiClient, actual_bytes: u64) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let info = api.balloon_get()?;
        if info.actual_bytes == actual_bytes {
            return Ok(start.elapsed());
        }
        if start.elapsed() > COMMAND_TIMEOUT {
            bail!("balloon stuck at {info:?}, wanted actual {actual_bytes}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// These tests live apart from the VMM's package, so cargo gives them no `CARGO_BIN_EXE_*`: the
/// binary must be found next to the test binary (`cargo test --workspace` and `lab/test` build
/// it), or every lab test below would fail on its first line.
#[test]
fn the_vmm_binary_is_found_next_to_the_tests() {
    let bin = ferry_lab::workspace_binary("ferry-vmm").unwrap();
    assert!(
        bin.ends_with("ferry-vmm") && bin.is_file(),
        "{}",
        bin.display()
    );
    let e = ferry_lab::workspace_binary("no-such-binary").unwrap_err();
    assert!(e.to_string().contains("cargo build --bins"), "{e}");
}

#[test]
#[ignore = "needs hardware KVM: run through lab/run"]
fn boots_debian_and_serves_agent_balloon_pause_and_shutdown() -> Result<()> {
    ensure!(
        ferry_lab::hw_kvm_usable(),
        "no hardware KVM here: run this test through lab/run"
    );
    let image = GuestImage::locate().context("the guest image (run lab/build)")?;
    let dir = std::env::temp_dir().join(format!("ferry-vmm-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let api_socket = dir.join("api.sock");
    let vmm = FerryVmm::new(ferry_lab::workspace_binary("ferry-vmm")?, FerryLaunch::Vmm)
        .with_api_socket(&api_socket);
    let config = GuestConfig::new(image);
    let started = Instant::now();
    let mut guest = Guest::spawn(&vmm, &config)?;
    let ready = guest.agent().wait_ready(BOOT_TIMEOUT);
    if let Err(e) = ready {
        let e = anyhow::anyhow!("{e}\nVMM log:\n{}", guest.vmm_log());
        return Err(guest.or_lab_fault(e));
    }
    eprintln!("boot to FERRY-AGENT READY: {:.1?}", started.elapsed());
    // Whatever fails from here, the VMM's own log says what it saw.
    let result = (|| -> Result<()> {
        let agent = guest.agent();

        let features = agent.command("features", COMMAND_TIMEOUT)?;
        eprintln!("features: {features}");
        ensure!(features.contains("FREE_PAGE_HINT"), "{features}");
        ensure!(features.contains("PAGE_REPORTING"), "{features}");

        let mut api = api(&api_socket)?;
        let status = api.status()?;
        ensure!(
            status.state == ferry_vmm::vmm::RunState::Running,
            "{status:?}"
        );
        let info = api.balloon_get()?;
        ensure!(info.free_page_hint && info.page_reporting, "{info:?}");

        // Inflate, then deflate, through the API.
        let before = agent.command("meminfo", COMMAND_TIMEOUT)?;
        api.balloon_set(128 * MIB)?;
        let took = wait_balloon(&mut api, 128 * MIB)?;
        let inflated = agent.command("meminfo", COMMAND_TIMEOUT)?;
        eprintln!("inflated 128 MiB in {took:.1?}: {before} -> {inflated}");
        api.balloon_set(0)?;
        let took = wait_balloon(&mut api, 0)?;
        eprintln!("deflated in {took:.1?}");
        eprintln!("balloon stats: {}", api.balloon_stats()?);

        // Pause: heartbeats stop; resume: they continue where they left off.
        agent.command("heartbeat 200", COMMAND_TIMEOUT)?;
        let hb = |l: &str| l.starts_with("HB ");
        agent.wait_for("first heartbeat", COMMAND_TIMEOUT, hb)?;
        api.pause()?;
        ensure!(api.status()?.state == ferry_vmm::vmm::RunState::Paused);
        // A heartbeat already in the UART FIFO or socket may still arrive; then nothing.
        let mut last = 0;
        while let Ok(line) = agent.wait_for("in-flight heartbeat", Duration::from_secs(1), hb) {
            last = heartbeat_number(&line).unwrap_or(last);
        }
        let silent = agent.wait_for("heartbeat while paused", Duration::from_secs(3), hb);
        ensure!(silent.is_err(), "heartbeat while paused: {silent:?}");
        api.resume()?;
        let line = agent.wait_for("heartbeat after resume", COMMAND_TIMEOUT, hb)?;
        let n = heartbeat_number(&line).context("heartbeat number")?;
        ensure!(
            n > last,
            "heartbeat {n} after resume, {last} before the pause"
        );
        agent.command("heartbeat 0", COMMAND_TIMEOUT)?;

        // The agent exits, the guest powers off through ACPI, the VMM exits cleanly.
        agent.command("shutdown", COMMAND_TIMEOUT)?;
        let status = guest.wait_exit(COMMAND_TIMEOUT)?;
        ensure!(
            status.success(),
            "VMM exit status {status}\n{}",
            guest.vmm_log()
        );
        let errors = guest.agent().kernel_errors();
        ensure!(errors.is_empty(), "guest kernel errors: {errors:#?}");
        let transcript = guest.agent().transcript();
        eprintln!("console (last 15 lines):");
        for line in &transcript[transcript.len().saturating_sub(15)..] {
            eprintln!("  {line}");
        }
        Ok(())
    })();
    if let Err(e) = result {
        let transcript = guest.agent().transcript();
        let tail = &transcript[transcript.len().saturating_sub(40)..];
        let e = anyhow::anyhow!(
            "{e:#}\nVMM log:\n{}\nconsole (last 40 lines):\n{}",
            guest.vmm_log(),
            tail.join("\n")
        );
        return Err(guest.or_lab_fault(e));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
