//! End-to-end live migration between ferry VMM processes over loopback TCP, with the real
//! guest (Debian's kernel, its virtio_balloon driver, ferry's guest agent).
//!
//! The source is the `ferry-vmm` binary, asked to migrate through its control API. Each
//! destination is a separate process running `ferry_vmm::receive::receive` (this test
//! binary, re-executed as `destination_process`). The guest hops from VMM to VMM: after every
//! migration the agent's data set must verify on the destination, heartbeats must continue,
//! the source process must exit, and no console may show a kernel error.
//!
//! Needs hardware KVM; on PVM machines run it in the lab:
//! ```text
//! lab/test -p ferry-e2e -- migrat
//! ```

mod chain;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use chain::*;
use ferry_vmm::migration::{query_progress, request_migration, MigrateOptions, MigrationPhase};
use ferry_vmm::{ApiClient, ReceiveSettings};

/// The body of a destination process (runs only when spawned by this test binary).
#[test]
fn destination_process() -> Result<()> {
    chain::destination_process()
}

#[test]
#[ignore = "needs hardware KVM: run through lab/run"]
fn migrates_every_workload_with_hints_off_and_on() -> Result<()> {
    ensure!(ferry_lab::hw_kvm_usable(), "run this test through lab/run");
    let dir = test_dir("matrix")?;
    let pki = ferry_lab::pki::TestCa::new("ferry e2e CA").write_end(&dir, "tls", &["127.0.0.1"])?;
    let tls_files = ferry_migration::TlsFiles {
        cert: pki.cert,
        key: pki.key,
        ca: pki.ca,
    };
    let mut node = boot_source(&dir, "vm0", 2)?;
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
        // The idle hops run over TLS, each end with a certificate from a test CA for
        // 127.0.0.1. Not the dirty ones: the lab's emulated host carries TLS at ~10 MB/s
        // (5% of its plain engine; natively 73-93%), below the dirty workload's 16 MiB/s,
        // so they could only end in a forced switchover (docs/lab.md).
        let tls = workload == "idle";
        let options = MigrateOptions {
            hints,
            tls: tls.then(|| tls_files.clone()),
            ..base_options()
        };
        let label = format!(
            "{workload}, {}{}",
            if hints { "on" } else { "off" },
            if tls { ", TLS" } else { "" }
        );
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

/// A guest of `memory_mib` with 2 vCPUs (RAM above the 32-bit MMIO window too) boots, sees
/// all its RAM, migrates once per `hops` entry while it writes, keeps its data (the hop checks
/// it) and runs on.
fn migrate_a_big_guest(name: &str, memory_mib: u64, hops: &[MigrateOptions]) -> Result<()> {
    ensure!(ferry_lab::hw_kvm_usable(), "run this test through lab/run");
    let dir = test_dir(name)?;
    let mut node = boot_source_with(&dir, &format!("{name}-0"), 2, memory_mib)?;
    let meminfo = node.command("meminfo")?;
    let total_kib: u64 = meminfo
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total_kib="))
        .context("total_kib in meminfo")?
        .parse()?;
    // All of it but what the kernel reserves for itself (under 512 MiB): more than the
    // 3 GiB below the hole.
    ensure!(total_kib > (memory_mib - 512) << 10, "{meminfo}");
    for (i, options) in hops.iter().enumerate() {
        node.command("workload dirty 64 16")?;
        let label = format!("{memory_mib} MiB, hints {}", options.hints);
        let (mut dest, stats) = hop(&dir, &mut node, &format!("{name}-{}", i + 1), options)
            .with_context(|| label.clone())?;
        eprintln!("{}", summary(&label, &stats));
        ensure!(stats.guest_bytes == memory_mib << 20, "{stats:?}");
        let stop = dest.command("workload stop")?;
        ensure!(
            stop.contains("kind=dirty"),
            "the dirty workload did not survive: {stop}"
        );
        node = dest;
    }
    node.command("shutdown")?;
    ensure!(node.wait_exit()?.success(), "{}", node.log());
    node.check_kernel()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A 4 GiB guest migrates with hints on and then off while it writes.
#[test]
#[ignore = "needs hardware KVM: run through lab/run"]
fn migrates_a_4_gib_guest_with_two_vcpus() -> Result<()> {
    let hops = [true, false].map(|hints| MigrateOptions {
        hints,
        // The dirty-log audit (on here: the lab's KVM misses writes) reads every page sent
        // while the guest is paused: with hints off that is all 4 GiB, ~12 s in the lab,
        // past the default limit's watchdog (300 ms + 5 s).
        downtime_ms: if hints { 300 } else { 30_000 },
        ..base_options()
    });
    migrate_a_big_guest("4g", 4096, &hops)
}

/// An 8 GiB guest migrates while it writes, with the sources that cost the guest nothing:
/// never-populated memory and free page reporting. (Free page hinting makes Linux's driver
/// allocate and zero all free memory, which would fill the 8 GiB lab host; `ferry bench-vm
/// --memory-mib 8192 --vcpus 2` measures it with a lab host of 20 GiB. Hints off would read,
/// and so populate, all 8 GiB on the source.)
#[test]
#[ignore = "needs hardware KVM: run through lab/run"]
fn migrates_an_8_gib_guest_with_two_vcpus() -> Result<()> {
    let hop = MigrateOptions {
        free_page_hint: false,
        ..base_options()
    };
    migrate_a_big_guest("8g", 8192, &[hop])
}

#[test]
#[ignore = "needs hardware KVM: run through lab/run"]
fn a_connection_cut_mid_round_leaves_the_source_running_and_a_retry_succeeds() -> Result<()> {
    ensure!(ferry_lab::hw_kvm_usable(), "run this test through lab/run");
    let dir = test_dir("cut")?;
    let mut node = boot_source(&dir, "vm0", 2)?;
    node.command("workload dirty 32 8")?;
    // Slow enough that the bulk round is still running when the destination dies.
    let slow = MigrateOptions {
        hints: false,
        bandwidth: Some(8 << 20),
        ..base_options()
    };
    let mut pending = spawn_destination(&dir, "cut", 2)?;
    let (api, to) = (node.api.clone(), pending.endpoint.clone());
    let migration = std::thread::spawn(move || request_migration(&api, &to, &slow));
    wait_for_precopy(&node.api, "cutting the connection")?;
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
    // A destination whose limits the VM exceeds (one vCPU at most, the VM has two) refuses
    // it at the handshake, before any memory: it exits with the reason, the source is told
    // the same, and keeps running.
    let misfit = ReceiveSettings {
        max_vcpus: Some(1),
        ..destination_settings(&dir, "misfit")
    };
    let mut pending = spawn_destination_with("misfit", misfit, 2, None)?;
    let err = request_migration(&node.api, &pending.endpoint, &base_options())
        .err()
        .context("a destination limited to one vCPU accepted a VM with two")?;
    eprintln!("source after the refusal: {err}");
    ensure!(
        err.to_string().contains("refuses the VM") && err.to_string().contains("--max-vcpus"),
        "{err}"
    );
    let mut refused = pending.node.take().unwrap();
    let status = refused.wait_exit()?;
    ensure!(
        !status.success(),
        "the refusing destination exited with {status}"
    );
    ensure!(
        refused.log().contains("nothing was received") && refused.log().contains("2 vCPUs"),
        "{}",
        refused.log()
    );
    node.agent
        .wait_for("heartbeat after the refusal", COMMAND_TIMEOUT, is_heartbeat)?;
    ensure!(node.command("verify")?.starts_with("verify pages="));
    // A retry, with hints, succeeds.
    let (mut dest, stats) = hop(&dir, &mut node, "retry", &base_options())?;
    eprintln!("retry: {}", summary("retry", &stats));
    dest.check_kernel()?;
    // The other side dies: the source VMM killed in the middle of the bulk round. Its
    // destination must never run the guest (nothing was handed over): it fails and exits.
    let mut orphan = spawn_destination(&dir, "orphan", 2)?;
    let (api, to) = (dest.api.clone(), orphan.endpoint.clone());
    let slow = MigrateOptions {
        hints: false,
        bandwidth: Some(8 << 20),
        ..base_options()
    };
    let migration = std::thread::spawn(move || request_migration(&api, &to, &slow));
    wait_for_precopy(&dest.api, "killing the source")?;
    dest.child.kill()?;
    dest.child.wait()?;
    let err = migration
        .join()
        .unwrap()
        .err()
        .context("the killed source reported success")?;
    eprintln!("client after the source was killed: {err}");
    let mut orphan_node = orphan.node.take().unwrap();
    let status = orphan_node.wait_exit()?;
    ensure!(
        !status.success(),
        "the destination of a killed source exited with {status}:\n{}",
        orphan_node.log()
    );
    let running: Vec<String> = orphan
        .lines
        .try_iter()
        .filter(|l| l.starts_with("RUNNING "))
        .collect();
    ensure!(
        running.is_empty(),
        "the destination ran the guest of a source that died mid-migration: {running:?}"
    );
    let log = orphan_node.log();
    let reason = log.lines().find(|l| l.starts_with("Error:")).unwrap_or("");
    eprintln!("destination of the killed source: {status}; {reason}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Waits (bounded) until the migration out of the VMM at `api` is past a fifth of its bulk
/// round, and fails if it failed meanwhile.
fn wait_for_precopy(api: &std::path::Path, what: &str) -> Result<()> {
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        ensure!(Instant::now() < deadline, "the migration made no progress");
        match query_progress(api)? {
            Some(p) if p.phase == MigrationPhase::Precopy && p.pages_done > p.pages_queued / 5 => {
                eprintln!("{what} at {p:?}");
                return Ok(());
            }
            Some(p) => ensure!(p.phase != MigrationPhase::Failed, "{p:?}"),
            None => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs hardware KVM: run through lab/run"]
fn a_guest_that_never_converges_is_throttled_and_the_policy_ends_the_migration() -> Result<()> {
    ensure!(ferry_lab::hw_kvm_usable(), "run this test through lab/run");
    let dir = test_dir("throttle")?;
    let mut node = boot_source(&dir, "vm0", 1)?;
    // A 1 ms downtime limit over a 16 MiB/s link allows 4 dirty pages at the switchover; a
    // guest rewriting 64 MiB (at up to 64 MiB/s, whatever the lab manages) dirties more than
    // half of what each round sends again. However fast the lab runs it, the engine must
    // throttle the vCPUs after two such rounds, and after `rounds_max` rounds the default
    // policy switches over anyway.
    node.command("workload dirty 64 64")?;
    let options = MigrateOptions {
        bandwidth: Some(16 << 20),
        downtime_ms: 1,
        // The audit's read of every sent page would come on top of a final round that the
        // round limit makes long on purpose; this test is about the policy.
        audit_dirty_log: false,
        ..base_options()
    };
    let rounds_max = options.rounds_max as usize;
    let pending = spawn_destination(&dir, "throttled", 1)?;
    let (api, to) = (node.api.clone(), pending.endpoint.clone());
    let migration = std::thread::spawn(move || request_migration(&api, &to, &options));
    // The source VMM itself must report the throttle while it is in force.
    let mut reported = 0u8;
    while !migration.is_finished() {
        if let Ok(s) = ApiClient::connect(&node.api).and_then(|mut a| a.status()) {
            reported = reported.max(s.throttle_percent);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let stats = migration
        .join()
        .expect("the migration thread panicked")
        .map_err(|e| {
            // A guest that stopped during the throttled migration: the VMM's log has its last
            // vCPU state (a triple fault's events), kept with the error.
            let e = anyhow::Error::from(e).context(format!("source VMM log:\n{}", node.log()));
            or_lab_fault(&[&node], e)
        })?;
    for r in &stats.rounds {
        eprintln!(
            "round {}: {} pages sent, {} dirtied ({:.0} pages/s), throttle {}%, {:.0} ms",
            r.round,
            r.pages_sent,
            r.pages_dirtied,
            r.dirty_rate_pages_per_s,
            r.throttle_percent,
            r.duration_ms
        );
    }
    ensure!(
        stats.rounds.iter().any(|r| r.throttle_percent > 0),
        "the engine never throttled: {stats:?}"
    );
    ensure!(reported > 0, "the source VMM never reported a throttle");
    ensure!(
        stats.rounds.len() <= rounds_max + 2 && stats.rounds.last().is_some_and(|r| r.is_final),
        "the switch-over policy did not end the migration after {rounds_max} rounds"
    );
    let mut dest = pending.attach()?;
    ensure!(node.wait_exit()?.success(), "{}", node.log());
    dest.agent.wait_for(
        "heartbeat on the destination",
        HEARTBEAT_TIMEOUT,
        is_heartbeat,
    )?;
    let verify = dest.command("verify")?;
    ensure!(
        verify == format!("verify pages={}", DATASET_MIB * 256),
        "{verify}"
    );
    // The destination runs unthrottled, and the workload carried on there.
    ensure!(ApiClient::connect(&dest.api)?.status()?.throttle_percent == 0);
    ensure!(dest.command("workload stop")?.contains("kind=dirty"));
    dest.command("shutdown")?;
    ensure!(dest.wait_exit()?.success(), "{}", dest.log());
    node.check_kernel()?;
    dest.check_kernel()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
