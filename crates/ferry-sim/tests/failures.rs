//! Failures before switchover leave the VM running on the source, with hinting ended and no
//! success reported at the destination; a retry then succeeds.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ferry_migration::{MigrationConfig, MigrationError, ReceiveError};
use ferry_sim::harness::{run_faulty, Fault, Scenario};
use ferry_sim::{create_memory, verify, Guest, HintBehavior, SimConfig, SimVm, Workload};

const MEMORY: u64 = 32 << 20;

fn scenario() -> Scenario {
    Scenario {
        memory: MEMORY,
        seed: 3,
        sim: SimConfig {
            used_percent: 30,
            workload: Workload::Churn { pages_per_tick: 16 },
            hints: Some(HintBehavior::Honest { delay_ticks: 1 }),
            zero_on_alloc: true,
        },
        unpopulated: true,
        connections: 2,
        lazy_dirty_log: true,
        migration: MigrationConfig::default(),
    }
}

/// Runs a faulty migration, checks the source survived it, then retries and verifies.
fn fail_then_retry(fault: Fault) -> (MigrationError, Option<ReceiveError>) {
    let s = scenario();
    let mem = create_memory(MEMORY).unwrap();
    let vm = SimVm::new(Guest::new(mem.clone(), s.seed), s.sim);
    let err = match run_faulty(&s, &vm, &mem, fault) {
        Ok(_) => panic!("{fault:?} must fail the migration"),
        Err(e) => e,
    };
    {
        let st = vm.lock();
        assert!(
            !st.paused,
            "{fault:?}: the source VM must keep running, got {}",
            err.0
        );
        // Sources are started after the handshake; once started, they are always finished.
        let started = fault != Fault::OtherLayout;
        assert_eq!(
            st.hinting_done, started,
            "{fault:?}: hint sources finished (DONE) iff started"
        );
    }
    // The guest keeps working after the failure...
    for _ in 0..50 {
        vm.tick();
    }
    // ... and a second attempt succeeds with every page intact.
    let out = run_faulty(&s, &vm, &mem, Fault::None)
        .unwrap_or_else(|e| panic!("{fault:?}: retry failed: {}", e.0));
    assert!(out.mismatches.is_empty() && out.dest_mismatches.is_empty());
    err
}

#[test]
fn connection_cut_mid_round() {
    let (src, dst) = fail_then_retry(Fault::CutAfter(5 << 20));
    assert!(
        matches!(
            src,
            MigrationError::Lane(_) | MigrationError::Wire(_) | MigrationError::Destination(_)
        ),
        "{src}"
    );
    assert!(
        dst.is_some(),
        "the destination reports failure, not success"
    );
}

#[test]
fn corrupt_stream_is_refused() {
    let (src, dst) = fail_then_retry(Fault::FlipAt(3 << 20));
    let dst = dst.expect("destination error");
    assert!(dst.to_string().contains("checksum"), "{dst}");
    assert!(
        src.to_string().contains("checksum") || matches!(src, MigrationError::Lane(_)),
        "{src}"
    );
}

#[test]
fn no_acknowledgement_resumes_the_paused_source() {
    let (src, _) = fail_then_retry(Fault::NoAck);
    assert!(matches!(src, MigrationError::Destination(_)), "{src}");
}

#[test]
fn layout_mismatch_is_refused_at_the_handshake() {
    let (src, dst) = fail_then_retry(Fault::OtherLayout);
    assert!(src.to_string().contains("layout differs"), "{src}");
    assert!(dst
        .expect("destination error")
        .to_string()
        .contains("layout differs"));
}

#[test]
fn cancel_leaves_the_guest_running_and_intact() {
    let s = scenario();
    let mem = create_memory(MEMORY).unwrap();
    let vm = SimVm::new(Guest::new(mem.clone(), s.seed), s.sim);
    let mut cancelled = s.clone();
    cancelled.migration.cancel = Arc::new(AtomicBool::new(true));
    let Err((err, dst)) = run_faulty(&cancelled, &vm, &mem, Fault::None) else {
        panic!("a cancelled migration must fail");
    };
    assert!(matches!(err, MigrationError::Cancelled), "{err}");
    assert!(dst
        .expect("destination error")
        .to_string()
        .contains("cancelled"));
    assert!(!vm.lock().paused && vm.lock().hinting_done);
    let Ok(out) = run_faulty(&s, &vm, &mem, Fault::None) else {
        panic!("retry failed");
    };
    let layout = ferry_migration::MemoryLayout::from_guest_memory(&mem).unwrap();
    assert!(out.mismatches.is_empty());
    // The source's own memory still holds what its guest expects.
    assert!(verify(vm.lock().guest.page_states(), &mem, &layout).is_empty());
}

#[test]
fn a_peer_that_never_answers_the_handshake_fails_the_migration() {
    let mem = create_memory(MEMORY).unwrap();
    let vm = SimVm::new(Guest::new(mem.clone(), 1), scenario().sim);
    let (conn, _silent_peer) = ferry_migration::Connection::pair().unwrap();
    let mut dirty = ferry_migration::BitmapDirtyLog::new(mem.clone());
    let (mut control, mut driver) = (vm.clone(), ferry_sim::SimDriver(vm.clone()));
    let config = MigrationConfig {
        handshake_timeout: std::time::Duration::from_millis(200),
        ..MigrationConfig::default()
    };
    let m = ferry_migration::Migration::new(&mem, &mut dirty, &mut control, &mut driver, config)
        .unwrap();
    let err = m.run(vec![conn]).expect_err("no answer, no migration");
    assert!(
        err.to_string().contains("did not answer the handshake"),
        "{err}"
    );
    assert!(!vm.lock().paused);
}
