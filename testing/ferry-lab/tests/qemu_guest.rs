//! End to end: the guest image boots under Debian's QEMU (`-M microvm,acpi=on`, the stand-in for
//! ferry's VMM), the stock virtio_balloon driver negotiates free page hinting over ACPI-described
//! virtio-mmio, and the agent's integrity data set survives a rewrite.
//!
//! Needs hardware KVM: on machines without it, run through `lab/test` (which uses `lab/run`).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ferry_lab::{
    hw_kvm_usable, AgentClient, AgentError, Guest, GuestConfig, GuestImage, QemuMicrovm,
};

/// Inside the lab, QEMU start to agent ready takes ~20 s; leave room for a loaded machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
const DATASET_MIB: u64 = 64;

#[test]
#[ignore = "needs hardware KVM: run through lab/run"]
fn debian_guest_boots_under_qemu_microvm_and_keeps_its_data() -> Result<()> {
    ensure!(
        hw_kvm_usable(),
        "no hardware KVM here: run this test through lab/test"
    );
    let config = GuestConfig::new(GuestImage::locate()?);
    let started = Instant::now();
    let mut guest = Guest::spawn(&QemuMicrovm::default(), &config)?;
    let result = boot_check_and_shut_down(&mut guest, started);
    if result.is_err() {
        eprintln!(
            "guest console:\n{}\nqemu output:\n{}",
            guest.agent().transcript().join("\n"),
            guest.vmm_log()
        );
    }
    // The lab's fault strikes QEMU's guests too (the same evidence counts).
    result.map_err(|e| guest.or_lab_fault(e))
}

fn boot_check_and_shut_down(guest: &mut Guest, started: Instant) -> Result<()> {
    let agent = guest.agent();
    agent
        .wait_ready(BOOT_TIMEOUT)
        .context("waiting for the agent")?;
    eprintln!(
        "timing: qemu-microvm start to agent ready {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let features = agent.command("features", COMMAND_TIMEOUT)?;
    let names: Vec<&str> = features.split_whitespace().skip(2).collect();
    for wanted in ["FREE_PAGE_HINT", "PAGE_REPORTING", "VERSION_1"] {
        ensure!(
            names.contains(&wanted),
            "{wanted} not negotiated: {features}"
        );
    }

    let pages = DATASET_MIB * 256;
    let t = Instant::now();
    let dataset = agent.command(&format!("dataset {DATASET_MIB}"), COMMAND_TIMEOUT)?;
    ensure!(
        dataset == format!("dataset pages={pages} generation=0"),
        "{dataset}"
    );
    let verify = agent.command("verify", COMMAND_TIMEOUT)?;
    ensure!(verify == format!("verify pages={pages}"), "{verify}");
    let bump = agent.command("bump", COMMAND_TIMEOUT)?;
    ensure!(bump == format!("bump pages={pages} generation=1"), "{bump}");
    let verify = agent.command("verify", COMMAND_TIMEOUT)?;
    ensure!(verify == format!("verify pages={pages}"), "{verify}");
    eprintln!(
        "timing: dataset {DATASET_MIB} MiB + verify + bump + verify {:.1}s",
        t.elapsed().as_secs_f64()
    );

    exercise_workloads(agent)?;

    agent.command("shutdown", COMMAND_TIMEOUT)?;
    let errors = guest.agent().kernel_errors();
    let status = guest.wait_exit(COMMAND_TIMEOUT)?;
    ensure!(
        status.success(),
        "qemu exited with {status}:\n{}",
        guest.vmm_log()
    );
    ensure!(
        errors.is_empty(),
        "the guest kernel reported errors:\n{}",
        errors.join("\n")
    );
    Ok(())
}

/// The workloads the migration tests drive, the heartbeat, and refusal of a bad command.
fn exercise_workloads(agent: &mut AgentClient) -> Result<()> {
    let meminfo = agent.command("meminfo", COMMAND_TIMEOUT)?;
    ensure!(meminfo.starts_with("meminfo total_kib="), "{meminfo}");
    let freed = agent.command("workload freed 32", COMMAND_TIMEOUT)?;
    ensure!(freed == "workload freed mib=32", "{freed}");

    // The dirty workload runs while five heartbeats pass: half a second of guest time, however
    // slowly the (emulated) machine runs.
    agent.command("workload dirty 16 8", COMMAND_TIMEOUT)?;
    agent.command("heartbeat 100", COMMAND_TIMEOUT)?;
    for _ in 0..5 {
        agent.wait_for("a heartbeat", COMMAND_TIMEOUT, |l| l.starts_with("HB "))?;
    }
    agent.command("heartbeat 0", COMMAND_TIMEOUT)?;
    // The workload first faults in its whole working set, which under nested emulation can
    // take longer than those heartbeats (a CI run saw 0 pages written after them): wait for
    // its first writes, bounded, rather than for a fixed slice of guest time.
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        let status = agent.command("workload status", COMMAND_TIMEOUT)?;
        let written = status
            .strip_prefix("workload status kind=dirty pages=")
            .and_then(|n| n.parse::<u64>().ok())
            .with_context(|| format!("unexpected answer {status:?}"))?;
        if written > 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the dirty workload wrote nothing within {COMMAND_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let dirty = agent.command("workload stop", COMMAND_TIMEOUT)?;
    let pages: u64 = dirty
        .strip_prefix("workload stop kind=dirty pages=")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected answer {dirty:?}"))?;
    ensure!(pages > 0, "the dirty workload wrote nothing");

    agent.command("workload churn 8", COMMAND_TIMEOUT)?;
    let churn = agent.command("workload stop", COMMAND_TIMEOUT)?;
    ensure!(
        churn.starts_with("workload stop kind=churn cycles="),
        "{churn}"
    );

    match agent.command("dataset lots", COMMAND_TIMEOUT) {
        Err(AgentError::Refused { answer, .. }) if answer.starts_with("ERR dataset: ") => Ok(()),
        other => bail!("a bad command must be refused, got {other:?}"),
    }
}
