//! `ferry bench-vm --render`: the table, the goals and the charts of a saved run (the lab run
//! itself is not part of the default tests).

use std::process::Command;

use ferry_bench::results::{Sample, Setup};
use ferry_bench::{Results, Variant, Workload};

fn sample(total_ms: f64, mib: u64) -> Sample {
    Sample {
        total_ms,
        downtime_ms: 100.0,
        bytes: mib << 20,
        pages_sent: mib * 256,
        pages_zero: 0,
        pages_skipped: 0,
        rounds: 2,
        wall_ms: total_ms,
        verified: true,
        verify_answer: "verify pages=8192".into(),
        kernel_errors: Vec::new(),
        ..Sample::default()
    }
}

#[test]
fn renders_a_saved_run_as_a_table_with_verdicts_and_two_pngs() {
    let dir = std::env::temp_dir().join(format!("ferry-bench-vm-cli-{}", std::process::id()));
    let mut results = Results {
        date: "2026-11-27 00:40".into(),
        command: "ferry bench-vm".into(),
        setup: Setup {
            memory_mib: 1024,
            vcpus: 1,
            dataset_mib: 32,
            freed_mib: 768,
            dirty_mib: 64,
            dirty_rate_mib_s: 16,
            repeat: 1,
            downtime_limit_ms: 300,
            qemu_reporting: true,
            qemu_version: "QEMU emulator version 7.2".into(),
            host: "lab".into(),
            link_mbit: None,
            link_by: None,
        },
        cases: Vec::new(),
        failures: Vec::new(),
    };
    for (w, v, ms, mib) in [
        (Workload::Freed, Variant::FerryOff, 20000.0, 120),
        (Workload::Freed, Variant::FerryOn, 6000.0, 110),
        (Workload::Freed, Variant::QemuOff, 38000.0, 900),
        (Workload::Freed, Variant::QemuHint, 10000.0, 300),
    ] {
        let mut s = sample(ms, mib);
        if matches!(v, Variant::FerryOff | Variant::FerryOn) {
            s.switchover = Some(ferry_migration::SwitchoverStats {
                pause_ms: 2.0,
                save_state_ms: 5.5,
                ack_wait_ms: 60.0,
                destination_ms: 40.0,
                state_bytes: 64 << 10,
                ..Default::default()
            });
            s.final_round_pages = Some([300, 20, 250]);
        }
        results.push(w, v, s);
    }
    let json = dir.join("in.json");
    results.save(&json).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("bench-vm")
        .arg("--render")
        .arg(&json)
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 110 / 300 MiB misses the 0.25x goal; 6 / 10 s misses 0.5x; idle was not measured.
    assert!(stdout.contains("| freed bytes, ferry on / QEMU hint | 0.37x | <= 0.25x | MISS |"));
    assert!(stdout.contains("| freed total time, ferry on / QEMU hint | 0.60x | <= 0.50x | MISS |"));
    assert!(stdout.contains("| idle total time, ferry on / fastest QEMU | - | <= 1.00x | n/a |"));
    // ferry's downtime, phase by phase (QEMU reports no breakdown: no row).
    assert!(stdout.contains("Where ferry's downtime goes"), "{stdout}");
    assert!(
        stdout.contains("| freed | ferry on | 100.0 | 2.0 | 0.0 | 0.0 | 0.0 | 0.0 | 5.5 | 0.0 | 60.0 | 40.0 | 0.0 | 0.0 | 64 | 300 / 20 / 250 |"),
        "{stdout}"
    );
    assert!(!stdout.contains("| freed | QEMU"), "{stdout}");
    for png in ["bytes.png", "time.png"] {
        let bytes = std::fs::read(dir.join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{png}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
