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
use std::path::{Path, PathBuf};
use std::sync::{MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ferry_balloon::Balloon;
use ferry_lab::{AgentClient, GuestConfig, GuestImage};
use ferry_vmm::{ExitReason, IncomingVm, MachineState, SerialTarget, VmConfig, Vmm};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const COPY_CHUNK_BYTES: usize = 4 << 20;
/// Linux reports free pages 2 s after they are freed (`PAGE_REPORTING_DELAY`).
const REPORT_WAIT: Duration = Duration::from_secs(6);

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

/// The lab guest both tests boot (2 vCPUs, a balloon with hints, reports and statistics) and
/// a fresh directory for its sockets; fails outside the lab.
fn lab_vm(name: &str, memory_bytes: u64) -> Result<(PathBuf, VmConfig)> {
    ensure!(ferry_lab::hw_kvm_usable(), "run this test through lab/run");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let image = GuestImage::locate().context("the guest image (run lab/build)")?;
    let dir = std::env::temp_dir().join(format!("ferry-vmm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut config = VmConfig::new(&image.kernel);
    config.initrd = Some(image.initrd.clone());
    config.cmdline = GuestConfig::DEFAULT_CMDLINE.to_owned();
    config.memory_bytes = memory_bytes;
    config.vcpus = 2;
    config.balloon = "hint,report,stats".parse()?;
    config.xsave = false;
    Ok((dir, config))
}

fn is_heartbeat(line: &str) -> bool {
    line.starts_with("HB ")
}

#[test]
#[ignore = "needs hardware KVM: run through lab/run"]
fn restored_state_continues_the_guest_in_a_new_vm() -> Result<()> {
    let (dir, mut config) = lab_vm("restore", 512 << 20)?;
    config.serial = SerialTarget::Socket(dir.join("a.sock"));

    let source = Vmm::boot(config.clone())?;
    let mut a = agent(&dir.join("a.sock"))?;
    a.wait_ready(BOOT_TIMEOUT)?;
    a.command("dataset 32", COMMAND_TIMEOUT)?;
    a.command("heartbeat 200", COMMAND_TIMEOUT)?;
    a.wait_for("heartbeat on the source", COMMAND_TIMEOUT, is_heartbeat)?;

    source.pause()?;
    let saved = source.save_state()?;
    exit_if_lab_fault(&saved, "the save");
    let bytes = serde_json::to_vec(&saved)?;
    eprintln!(
        "machine state: {} bytes of JSON, {} vCPUs",
        bytes.len(),
        saved.vcpus.len()
    );
    let mut state: MachineState = serde_json::from_slice(&bytes)?;
    // As if the guest had not yet taken a THR-empty interrupt when it was paused (the UART
    // raised it, the guest's handler had not read IIR). The destination must raise it again
    // once its interrupt controller is restored: vm-superio raises a new one only when the
    // bit goes from clear to set, so without it the guest's console would never transmit
    // again and the heartbeats below would not come.
    state.serial.registers[3] |= 0x02;

    let mut dest_config = config.clone();
    dest_config.serial = SerialTarget::Socket(dir.join("b.sock"));
    let incoming = IncomingVm::new(dest_config)?;
    ensure!(incoming.layout().regions() == state.memory.as_slice());
    let copy_start = Instant::now();
    copy_ram(source.memory(), incoming.memory())?;
    eprintln!("copied 512 MiB in {:.1?}", copy_start.elapsed());
    let dest = incoming.restore(state)?;
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
    check_rings(&dest, "destination")?;
    b.command("shutdown", COMMAND_TIMEOUT)?;
    let reason = dest.wait_exit();
    dest.stop();
    ensure!(reason == ExitReason::GuestPowerOff, "{reason:?}");
    check_guest(&b, &dest, "destination")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// How long after the awaited point of a report a hop pauses: 0-9.9 ms, different for every
/// hop (no `rand` needed), so the pauses fall at different points of the driver's report
/// handling (chain published, being processed, interrupt pending, buffer being reclaimed).
fn hop_delay(hop: u32) -> Duration {
    Duration::from_micros(u64::from(hop.wrapping_mul(7919) % 10_000))
}

/// The VM's balloon device, locked (a poisoned lock still gives the device: these are
/// read-only checks).
fn balloon(vmm: &Vmm) -> Option<MutexGuard<'_, Balloon>> {
    let b = vmm.balloon_device()?;
    Some(b.lock().unwrap_or_else(PoisonError::into_inner))
}

/// A ring index (little-endian u16) from guest memory.
fn ring_index(vmm: &Vmm, gpa: u64) -> Result<u16> {
    let raw: u16 = vmm.memory().read_obj(vm_memory::GuestAddress(gpa))?;
    Ok(u16::from_le(raw))
}

/// Ranges the VM's balloon received on its reporting queue.
fn reported_ranges(vmm: &Vmm) -> u64 {
    balloon(vmm).map_or(0, |b| b.counters().reported_ranges)
}

/// The reporting queue's available index as the guest last published it.
fn reports_published(vmm: &Vmm) -> Option<u16> {
    let avail = balloon(vmm)?.save().queues.last()?.avail_ring;
    ring_index(vmm, avail + 2).ok()
}

/// Where in the driver's handling of a free page report a hop pauses.
#[derive(Debug, Clone, Copy)]
enum PausePoint {
    /// Right after the driver published a report chain (before or while the device takes it).
    Published,
    /// Right after the device answered a report chain (while the driver reclaims it).
    Answered,
}

/// Waits (up to `timeout`) until the next report reaches `point`; false on timeout.
fn wait_for_report(vmm: &Vmm, point: PausePoint, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let (published, answered) = (reports_published(vmm), reported_ranges(vmm));
    loop {
        let reached = match point {
            PausePoint::Published => reports_published(vmm) != published,
            PausePoint::Answered => reported_ranges(vmm) != answered,
        };
        if reached {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// The reporting queue as the device and the guest's rings see it, for a failure message.
fn describe_reporting_queue(vmm: &Vmm) -> String {
    let Some((state, counters)) = balloon(vmm).map(|b| (b.save(), b.counters().clone())) else {
        return "no balloon".into();
    };
    // Queue order follows the features: inflate, deflate, stats, free page, reporting.
    let Some(q) = state.queues.last() else {
        return format!("no queues (device status {:#x})", state.status);
    };
    // An interrupt status the driver never acknowledged, with every answer used, is an
    // interrupt the guest never took; a clear one with a driver that publishes nothing more
    // is a driver that has nothing to report (or waits elsewhere: see the agent's `blocked`).
    format!(
        "device next_avail={} next_used={} interrupt_status={:#x}, guest avail.flags={:?} \
         avail.idx={:?} used.idx={:?}, {counters:?}",
        q.next_avail,
        q.next_used,
        state.interrupt_status,
        ring_index(vmm, q.avail_ring).ok(),
        ring_index(vmm, q.avail_ring + 2).ok(),
        ring_index(vmm, q.used_ring + 2).ok()
    )
}

/// Checks every balloon queue's rings against the device: the device never answered more
/// chains than the driver published, nor took more than it published, and the used index in
/// guest memory is the one the device wrote. A chain lost or processed twice across a pause
/// breaks one of these. Holds the device lock, so only the driver can move meanwhile (it
/// only publishes: the used index is read first).
fn check_rings(vmm: &Vmm, when: &str) -> Result<()> {
    let Some(b) = balloon(vmm) else {
        return Ok(());
    };
    for (index, q) in b.save().queues.iter().enumerate().filter(|(_, q)| q.ready) {
        let used = ring_index(vmm, q.used_ring + 2)?;
        let avail = ring_index(vmm, q.avail_ring + 2)?;
        ensure!(
            used == q.next_used
                && avail.wrapping_sub(used) <= q.size
                && avail.wrapping_sub(q.next_avail) <= q.size,
            "{when}: queue {index} out of step: guest avail.idx={avail} used.idx={used}, \
             device next_avail={} next_used={}",
            q.next_avail,
            q.next_used
        );
    }
    Ok(())
}

/// The churn workload's completed cycles (`workload status`).
fn churn_cycles(agent: &mut AgentClient) -> Result<u64> {
    let status = agent.command("workload status", COMMAND_TIMEOUT)?;
    status
        .split_whitespace()
        .skip_while(|f| *f != "kind=churn")
        .find_map(|f| f.strip_prefix("cycles="))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no churn cycles in {status:?}"))
}

/// Waits (bounded) until the churn loop completes another cycle.
fn churn_progresses(agent: &mut AgentClient) -> Result<()> {
    let before = churn_cycles(agent)?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        let now = churn_cycles(agent)?;
        if now > before {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the guest's churn loop made no progress in {COMMAND_TIMEOUT:?} (stuck at {now} cycles)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The agent's answer to a diagnostic command, or why there is none.
fn ask(agent: &mut AgentClient, command: &str) -> String {
    agent
        .command(command, COMMAND_TIMEOUT)
        .unwrap_or_else(|e| format!("{command}: no answer: {e}"))
}

/// `error` with what every vCPU of `vmm` is doing, for a guest that stopped answering: the
/// vCPU state twice, a second apart (is it moving?), and its RIP (and a pending #PF's
/// address) translated through the guest's page tables as the host sees guest RAM, which is
/// also how KVM reads them when it emulates an instruction.
fn with_vcpus(error: anyhow::Error, vmm: &Vmm) -> anyhow::Error {
    let mut report = Vec::new();
    let mut lab_fault = None;
    for round in 0..2 {
        if round > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        match vmm.save_vcpus_for_diagnosis() {
            Ok(vcpus) => {
                for v in &vcpus {
                    report.push(v.describe());
                    if round == 0 {
                        report.push(format!("  rip: {}", walk(vmm, v.sregs.cr3, v.regs.rip)));
                        if let Some(table) = v.page_tables_outside(&ram_regions(vmm)) {
                            report.extend(diagnose_cr3(vmm, v.sregs.cr3, v.regs.rip));
                            lab_fault = Some(format!(
                                "vCPU {} runs on page tables at {table:#x}, outside the guest's \
                                 RAM",
                                v.id
                            ));
                        }
                        let e = &v.vcpu_events;
                        if e.exception_has_payload != 0 && e.exception.nr == 14 {
                            let cr2 = e.exception_payload;
                            report.push(format!("  #PF payload: {}", walk(vmm, v.sregs.cr3, cr2)));
                        }
                    }
                }
            }
            Err(e) => report.push(format!("cannot read the vCPUs: {e}")),
        }
    }
    let error = error.context(format!("vCPUs:\n{}", report.join("\n")));
    // A vCPU KVM reset after a triple fault shows no CR3; the lab host's trace of this
    // process's nested page faults still does (and with a CR3 to see, both should agree).
    let ram: Vec<(u64, u64)> = ram_regions(vmm).iter().map(|r| (r.gpa, r.size)).collect();
    let walks = ferry_lab::page_walks_outside_ram(std::process::id(), &ram).join("\n");
    if !walks.is_empty() {
        lab_fault = Some(format!("{}\n{walks}", lab_fault.unwrap_or_default()));
    }
    // ferry never wrote that CR3 (a restore refuses one outside RAM, a pause writes none)
    // and the guest cannot have loaded it: the lab's emulated host did (docs/lab.md).
    if let Some(fault) = lab_fault {
        ferry_lab::exit_lab_fault(&format!("{fault}\n{error:?}"));
    }
    error
}

/// Ends the test binary as a lab fault when a saved vCPU runs on page tables outside RAM:
/// the lab host wrote its CR3 into the guest before the save (a restore would refuse it).
fn exit_if_lab_fault(state: &MachineState, when: &str) {
    for v in &state.vcpus {
        if let Some(table) = v.page_tables_outside(&state.memory) {
            ferry_lab::exit_lab_fault(&format!(
                "saved at {when}: vCPU {} on page tables at {table:#x}, outside the guest's \
                 RAM: {}",
                v.id,
                v.describe()
            ));
        }
    }
}

/// The VM's RAM regions, as a saved state records them.
fn ram_regions(vmm: &Vmm) -> Vec<ferry_migration::RegionDesc> {
    vmm.memory()
        .iter()
        .map(|r| ferry_migration::RegionDesc {
            gpa: r.start_addr().0,
            size: r.len(),
        })
        .collect()
}

/// For a CR3 beyond guest RAM (seen: 0x1_00ab_6000, 0x1_02e2_4000, the lab host's own CR3):
/// the walk with the low 32 bits, the top-level slots in use there, and every kernel pointer in
/// guest RAM to that table, to tell a pointer corrupted in guest memory (the kernel loaded
/// what `mm->pgd` says) from a register corrupted below the guest.
fn diagnose_cr3(vmm: &Vmm, cr3: u64, rip: u64) -> Vec<String> {
    let low = cr3 & 0xffff_ffff;
    let mut out = vec![format!("  rip with CR3 {low:#x}: {}", walk(vmm, low, rip))];
    let mut slots = Vec::new();
    for i in 0..512u64 {
        let e: u64 = vmm
            .memory()
            .read_obj(vm_memory::GuestAddress((low & !0xfff) + i * 8))
            .unwrap_or(0);
        if e & 1 != 0 {
            slots.push(format!("{i}:{e:#x}"));
        }
    }
    out.push(format!("  L4 slots at {low:#x}: {}", slots.join(" ")));
    let (mut hits, mut count) = (Vec::new(), 0);
    let target = low & !0xfff;
    for region in vmm.memory().iter() {
        let (start, len) = (region.start_addr().0, region.len());
        let mut buf = vec![0u8; COPY_CHUNK_BYTES];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            if vmm
                .memory()
                .read_slice(&mut buf[..n], vm_memory::GuestAddress(start + off))
                .is_err()
            {
                break;
            }
            for (i, q) in buf[..n].chunks_exact(8).enumerate() {
                let v = u64::from_le_bytes(q.try_into().unwrap_or_default());
                if v >> 48 == 0xffff && v & 0xffff_ffff == target {
                    count += 1;
                    if hits.len() < 24 {
                        hits.push(format!("{:#x}={v:#x}", start + off + i as u64 * 8));
                    }
                }
            }
            off += n as u64;
        }
    }
    out.push(format!(
        "  kernel pointers to ..{target:08x} in RAM ({count}): {}",
        hits.join(" ")
    ));
    out
}

/// Translates `gva` through the 4-level page tables at `cr3`, reading guest RAM as the host
/// sees it: every entry on the way, and the first bytes at the end.
fn walk(vmm: &Vmm, cr3: u64, gva: u64) -> String {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3 & ADDR;
    let mut out = format!("{gva:#x}:");
    for (level, shift) in [(4, 39), (3, 30), (2, 21), (1, 12)] {
        let index = (gva >> shift) & 511;
        let entry: u64 = match vmm
            .memory()
            .read_obj(vm_memory::GuestAddress(table + index * 8))
        {
            Ok(e) => e,
            Err(e) => return format!("{out} L{level} table {table:#x} unreadable: {e}"),
        };
        out.push_str(&format!(" L{level}[{index}]@{table:#x}={entry:#x}"));
        if entry & 1 == 0 {
            return format!("{out} NOT PRESENT");
        }
        let large = level > 1 && level < 4 && entry & 0x80 != 0;
        if large || level == 1 {
            let page_mask = (1u64 << shift) - 1;
            let gpa = (entry & ADDR & !page_mask) | (gva & page_mask);
            let mut bytes = [0u8; 16];
            let _ = vmm
                .memory()
                .read_slice(&mut bytes, vm_memory::GuestAddress(gpa));
            return format!("{out} -> gpa {gpa:#x}: {bytes:02x?}");
        }
        table = entry & ADDR;
    }
    out
}

/// Fails with the console and the reporting queue's state if the guest logged a kernel error
/// (a warning Linux prints while powering off is not one, see `ferry_lab::POWER_OFF_WARNINGS`).
fn check_guest(agent: &AgentClient, vmm: &Vmm, when: &str) -> Result<()> {
    let errors = agent.kernel_errors();
    if errors.is_empty() {
        return Ok(());
    }
    eprintln!("{when}: console:\n{}", agent.transcript().join("\n"));
    anyhow::bail!(
        "{when}: guest kernel errors {errors:#?}; reporting queue: {}",
        describe_reporting_queue(vmm)
    )
}

/// Pauses the guest again and again right around its free page reports (just after the
/// driver published one, or just after the device answered one, while it churns memory),
/// alternately resuming the same VM, as after a refused switchover, and saving/restoring it
/// into a new VM, as a completed migration does. No report may be lost or answered twice
/// across a pause: reports keep flowing (a lost one would stall the driver's reporting for
/// good), the guest logs no kernel error (a leaked or broken reporting queue makes
/// virtio_balloon warn), and the data set verifies.
#[test]
#[ignore = "needs hardware KVM: run through lab/run"]
fn free_page_reports_survive_repeated_pauses_and_restores() -> Result<()> {
    let hops: u32 = std::env::var("FERRY_PAUSE_HOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    // Control experiment: the same guest, workload and timing, but no pause at all, to tell
    // a guest lost to pausing from one the lab loses anyway.
    let no_pause = std::env::var_os("FERRY_PAUSE_NONE").is_some();
    // Stress experiment: every pause/resume hop pauses and resumes this many times, a few ms
    // apart, to tell a fault that comes with pauses from one that comes with time.
    let burst: u32 = std::env::var("FERRY_PAUSE_BURST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let (dir, mut config) = lab_vm("hops", 256 << 20)?;
    config.serial = SerialTarget::Socket(dir.join("vm0.sock"));

    let mut vmm = Vmm::boot(config.clone())?;
    let mut agent = agent(&dir.join("vm0.sock"))?;
    agent.wait_ready(BOOT_TIMEOUT)?;
    agent.command("dataset 16", COMMAND_TIMEOUT)?;
    agent.command("workload churn 64", COMMAND_TIMEOUT)?;
    let mut reported = 0u64;
    let mut timed_pauses = 0;
    // What the last save recorded per vCPU, shown if the guest stops later: tells a state
    // that was already wrong when saved from one that went wrong after the restore.
    let mut last_saved = String::from("no save yet");
    for hop in 0..hops {
        let point = if hop / 2 % 2 == 0 {
            PausePoint::Published
        } else {
            PausePoint::Answered
        };
        if wait_for_report(&vmm, point, REPORT_WAIT) {
            timed_pauses += 1;
        }
        std::thread::sleep(hop_delay(hop));
        if no_pause {
            // Nothing: the guest runs on.
        } else if hop % 2 == 0 {
            for i in 0..burst {
                if i > 0 {
                    std::thread::sleep(hop_delay(hop * burst + i));
                }
                vmm.pause().map_err(|e| with_vcpus(e.into(), &vmm))?;
                if burst > 1 {
                    // Catch a CR3 outside RAM at the pause it first shows at.
                    let ram = ram_regions(&vmm);
                    let bad = vmm
                        .save_vcpus_for_diagnosis()
                        .map_err(|e| with_vcpus(e.into(), &vmm))?
                        .iter()
                        .any(|v| v.page_tables_outside(&ram).is_some());
                    if bad {
                        let e = anyhow::anyhow!("CR3 outside RAM at pause {i} of hop {hop}");
                        return Err(with_vcpus(e, &vmm));
                    }
                }
                vmm.resume();
            }
        } else {
            vmm.pause().map_err(|e| with_vcpus(e.into(), &vmm))?;
            let state = vmm.save_state().map_err(|e| with_vcpus(e.into(), &vmm))?;
            exit_if_lab_fault(&state, &format!("hop {hop}"));
            last_saved = state
                .vcpus
                .iter()
                .map(|v| format!("hop {hop}: {}", v.describe()))
                .collect::<Vec<_>>()
                .join("\n");
            let mut next = config.clone();
            let socket = dir.join(format!("vm{hop}.sock"));
            next.serial = SerialTarget::Socket(socket.clone());
            let incoming = IncomingVm::new(next)?;
            copy_ram(vmm.memory(), incoming.memory())?;
            let restored = incoming.restore(state)?;
            reported += reported_ranges(&vmm);
            vmm.request_exit(ExitReason::Shutdown);
            vmm.stop();
            check_guest(&agent, &vmm, &format!("before hop {hop}"))?;
            vmm = restored;
            agent = self::agent(&socket)?;
            vmm.resume();
        }
        let meminfo = agent
            .command("meminfo", COMMAND_TIMEOUT)
            .map_err(|e| with_vcpus(e.into(), &vmm).context(format!("last save:\n{last_saved}")))?;
        let cycles = churn_cycles(&mut agent).map_or_else(|e| format!("{e:#}"), |c| c.to_string());
        eprintln!(
            "hop {hop}: {meminfo}; churn cycles {cycles}; reports published {:?}",
            reports_published(&vmm)
        );
        // The guest makes progress, not just answers: its churn loop completes a cycle.
        if let Err(e) = churn_progresses(&mut agent) {
            // Where the guest's threads wait (a stuck churn thread's kernel stack).
            let e = e.context(format!(
                "{}\n{}",
                ask(&mut agent, "threads"),
                ask(&mut agent, "blocked")
            ));
            return Err(
                with_vcpus(e, &vmm).context(format!("after hop {hop}; last save:\n{last_saved}"))
            );
        }
        check_rings(&vmm, &format!("after hop {hop}"))?;
        check_guest(&agent, &vmm, &format!("after hop {hop}"))?;
    }
    // Reporting still works after the last pause.
    if !wait_for_report(&vmm, PausePoint::Answered, REPORT_WAIT) {
        let e = anyhow::anyhow!(
            "no free page report was answered after the last pause: the driver's reporting \
             stalled; reporting queue: {}; {}; {}",
            describe_reporting_queue(&vmm),
            ask(&mut agent, "blocked"),
            ask(&mut agent, "meminfo")
        );
        return Err(with_vcpus(e, &vmm).context(format!("last save:\n{last_saved}")));
    }
    agent.command("workload stop", COMMAND_TIMEOUT)?;
    let verify = agent.command("verify", COMMAND_TIMEOUT)?;
    reported += reported_ranges(&vmm);
    eprintln!(
        "{hops} hops ({timed_pauses} right after a report): {verify}, {reported} ranges reported"
    );
    ensure!(
        timed_pauses * 2 >= hops,
        "the guest reported free pages before only {timed_pauses} of {hops} pauses: the test \
         did not exercise reporting across pauses"
    );
    agent.command("shutdown", COMMAND_TIMEOUT)?;
    let reason = vmm.wait_exit();
    vmm.stop();
    ensure!(reason == ExitReason::GuestPowerOff, "{reason:?}");
    check_guest(&agent, &vmm, "at the end")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
