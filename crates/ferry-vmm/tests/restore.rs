//! Save a running guest's state, copy its RAM into a second VM in the same process, restore
//! the state there and check that the guest carries on: heartbeats continue, the agent's data
//! set verifies, and it powers off cleanly. This is the VMM half of a migration (issue 6)
//! without the engine and the network.
//!
//! Needs hardware KVM; on PVM machines run it in the lab:
//! ```text
//! cargo test -p ferry-vmm --test restore --no-run
//! lab/run -- target/debug/deps/restore-<hash> --ignored --nocapture
//! ```

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ferry_lab::{AgentClient, GuestConfig, GuestImage};
use ferry_vmm::{ExitReason, IncomingVm, MachineState, SerialTarget, VmConfig, Vmm};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const COPY_CHUNK_BYTES: usize = 4 << 20;

fn agent(socket: &Path) -> Result<AgentClient> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    Ok(AgentClient::new(stream.try_clone()?, stream))
}

fn copy_ram(
    src: &ferry_vmm::memory::GuestMemory,
    dst: &ferry_vmm::memory::GuestMemory,
) -> Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    for region in src.iter() {
        let (start, len) = (region.start_addr(), region.len());
        let mut off = 0u64;
        while off < len {
            let n = buf.len().min((len - off) as usize);
            let addr = vm_memory::GuestAddress(start.0 + off);
            src.read_slice(&mut buf[..n], addr)?;
            dst.write_slice(&buf[..n], addr)?;
            off += n as u64;
        }
    }
    Ok(())
}

fn is_heartbeat(line: &str) -> bool {
    line.starts_with("HB ")
}

#[test]
#[ignore = "needs hardware KVM: run through lab/run"]
fn restored_state_continues_the_guest_in_a_new_vm() -> Result<()> {
    ensure!(ferry_lab::hw_kvm_usable(), "run this test through lab/run");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let image = GuestImage::locate().context("the guest image (run lab/build)")?;
    let dir = std::env::temp_dir().join(format!("ferry-vmm-restore-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut config = VmConfig::new(&image.kernel);
    config.initrd = Some(image.initrd.clone());
    config.cmdline = GuestConfig::DEFAULT_CMDLINE.to_owned();
    config.memory_bytes = 512 << 20;
    config.vcpus = 2;
    config.balloon = "hint,report,stats".parse()?;
    config.serial = SerialTarget::Socket(dir.join("a.sock"));
    config.xsave = false;

    let source = Vmm::boot(config.clone())?;
    let mut a = agent(&dir.join("a.sock"))?;
    a.wait_ready(BOOT_TIMEOUT)?;
    a.command("dataset 32", COMMAND_TIMEOUT)?;
    a.command("heartbeat 200", COMMAND_TIMEOUT)?;
    a.wait_for("heartbeat on the source", COMMAND_TIMEOUT, is_heartbeat)?;

    source.pause()?;
    let saved = source.save_state()?;
    let bytes = serde_json::to_vec(&saved)?;
    eprintln!(
        "machine state: {} bytes of JSON, {} vCPUs",
        bytes.len(),
        saved.vcpus.len()
    );
    let state: MachineState = serde_json::from_slice(&bytes)?;

    let mut dest_config = config.clone();
    dest_config.serial = SerialTarget::Socket(dir.join("b.sock"));
    let incoming = IncomingVm::new(dest_config)?;
    ensure!(incoming.layout().regions() == state.memory.as_slice());
    let copy_start = Instant::now();
    copy_ram(source.memory(), incoming.memory())?;
    eprintln!("copied 512 MiB in {:.1?}", copy_start.elapsed());
    let dest = incoming.restore(&state)?;
    // The destination owns the guest now; the source never runs again.
    source.request_exit(ExitReason::Shutdown);
    source.stop();

    let mut b = agent(&dir.join("b.sock"))?;
    dest.resume();
    b.wait_for(
        "heartbeat on the destination",
        COMMAND_TIMEOUT,
        is_heartbeat,
    )?;
    let verify = b.command("verify", COMMAND_TIMEOUT)?;
    eprintln!("destination: {verify}");
    let features = b.command("features", COMMAND_TIMEOUT)?;
    ensure!(features.contains("FREE_PAGE_HINT"), "{features}");
    // The balloon works after the restore.
    dest.balloon_set_target(16 << 20)?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while dest.balloon_info()?.actual_bytes != 16 << 20 {
        ensure!(
            Instant::now() < deadline,
            "balloon did not inflate after restore"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    b.command("shutdown", COMMAND_TIMEOUT)?;
    let reason = dest.wait_exit();
    dest.stop();
    ensure!(reason == ExitReason::GuestPowerOff, "{reason:?}");
    let errors = b.kernel_errors();
    if !errors.is_empty() || !b.known_issues().is_empty() {
        eprintln!("destination console:\n{}", b.transcript().join("\n"));
    }
    ensure!(errors.is_empty(), "guest kernel errors: {errors:#?}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
