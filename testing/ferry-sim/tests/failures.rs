//! Failures before switchover leave the VM running on the source, with hinting ended and no
//! success reported at the destination; a retry then succeeds.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ferry_migration::{MigrationConfig, MigrationError, ReceiveError};
use ferry_sim::harness::{attempt, run_faulty, Fault, Scenario};
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
        dirty_log_drops_every: 0,
        dest_prefilled: false,
        write_through_file: true,
        accept_compression: true,
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
        let started = !matches!(fault, Fault::OtherLayout | Fault::RefuseAtHello);
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
            MigrationError::Lane(_) | MigrationError::Wire(_) | MigrationError::Protocol(_)
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

/// A destination that received everything and then closed without a word may be running
/// the guest (its acknowledgement may have been lost on the way): the source must stay
/// paused, never resume a second copy.
#[test]
fn no_acknowledgement_leaves_the_source_paused_with_the_outcome_unknown() {
    let s = scenario();
    let mem = create_memory(MEMORY).unwrap();
    let vm = SimVm::new(Guest::new(mem.clone(), s.seed), s.sim);
    let Err((err, _)) = run_faulty(&s, &vm, &mem, Fault::NoAck) else {
        panic!("a migration without acknowledgement must not succeed");
    };
    assert!(matches!(err, MigrationError::OutcomeUnknown(_)), "{err}");
    assert!(err.to_string().contains("stays paused"), "{err}");
    let st = vm.lock();
    assert!(
        st.paused,
        "the source resumed without the destination's refusal"
    );
    assert!(st.hinting_done);
}

/// A destination that refuses the VM after receiving everything (its state did not
/// restore) says so: the source resumes.
#[test]
fn an_explicit_refusal_after_complete_resumes_the_source() {
    let (src, dst) = fail_then_retry(Fault::Refuse);
    assert!(matches!(src, MigrationError::Destination(_)), "{src}");
    assert!(dst.is_some());
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

/// A destination that refuses the VM as soon as it read the Hellos (ferry's VMM does, for a VM
/// over its limits): the source is told the reason before it sends any memory.
#[test]
fn a_refusal_at_the_hello_reaches_the_source_before_any_memory() {
    let s = scenario();
    let mem = create_memory(MEMORY).unwrap();
    let vm = SimVm::new(Guest::new(mem.clone(), s.seed), s.sim);
    let a = attempt(&s, &vm, &mem, Fault::RefuseAtHello);
    let src = a.source.expect_err("a refused migration succeeded");
    assert!(
        matches!(&src, MigrationError::Destination(m) if m.contains("refused at the hello")),
        "{src}"
    );
    // Preamble and Hello only: not one page left the source.
    assert!(
        a.bytes[0] < 4096,
        "{} bytes sent before the refusal",
        a.bytes[0]
    );
    let (src, _) = fail_then_retry(Fault::RefuseAtHello);
    assert!(src.to_string().contains("refused at the hello"), "{src}");
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

/// A destination that answers the handshake and then never reads again: the source's
/// writers block on a full socket. Returns the peer (keep it alive: a closed peer would fail
/// the writes at once) and the source's result with how long it took.
fn against_a_peer_that_stops_reading(
    config: MigrationConfig,
    vm: &SimVm,
    mem: &ferry_sim::SimMemory,
) -> (
    ferry_migration::Connection,
    Result<ferry_migration::MigrationStats, MigrationError>,
    std::time::Duration,
) {
    use ferry_migration::wire::{self, Decoder, Encoder, HelloReply, MAGIC_DEST, MAGIC_SOURCE};
    use std::io::Write;
    let (conn, mut peer) = ferry_migration::Connection::pair().unwrap();
    let hello = std::thread::spawn(move || {
        wire::read_preamble(&mut peer.reader, MAGIC_SOURCE).unwrap();
        Decoder::new(&mut peer.reader).next_record().unwrap();
        wire::write_preamble(&mut peer.writer, MAGIC_DEST).unwrap();
        let mut enc = Encoder::new();
        enc.hello_reply(HelloReply {
            zeroed: true,
            compression: ferry_migration::compress::Codec::None,
        });
        peer.writer.write_all(enc.bytes()).unwrap();
        peer
    });
    let mut dirty = ferry_migration::BitmapDirtyLog::new(mem.clone());
    let (mut control, mut driver) = (vm.clone(), ferry_sim::SimDriver(vm.clone()));
    let m = ferry_migration::Migration::new(mem, &mut dirty, &mut control, &mut driver, config)
        .unwrap();
    let started = std::time::Instant::now();
    let result = m.run(vec![conn]);
    (hello.join().unwrap(), result, started.elapsed())
}

#[test]
fn a_destination_that_stops_reading_cannot_stall_the_source() {
    let mem = create_memory(MEMORY).unwrap();
    let vm = SimVm::new(Guest::new(mem.clone(), 1), scenario().sim);
    let config = MigrationConfig {
        stall_timeout: std::time::Duration::from_millis(300),
        ..MigrationConfig::default()
    };
    let (_peer, result, took) = against_a_peer_that_stops_reading(config, &vm, &mem);
    let err = result.expect_err("nothing was read: no migration");
    assert!(matches!(err, MigrationError::Lane(_)), "{err}");
    // The stall bound plus the time to fill the socket buffer, not the 30-minute timeout.
    assert!(took < std::time::Duration::from_secs(20), "{took:?}");
    assert!(!vm.lock().paused, "the source VM keeps running");
}

#[test]
fn cancel_ends_a_migration_blocked_on_a_destination_that_stopped_reading() {
    let mem = create_memory(MEMORY).unwrap();
    let vm = SimVm::new(Guest::new(mem.clone(), 1), scenario().sim);
    let cancel = Arc::new(AtomicBool::new(false));
    let config = MigrationConfig {
        cancel: cancel.clone(),
        ..MigrationConfig::default()
    };
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let (_peer, result, took) = against_a_peer_that_stops_reading(config, &vm, &mem);
    canceller.join().unwrap();
    let err = result.expect_err("cancelled");
    assert!(matches!(err, MigrationError::Cancelled), "{err}");
    assert!(took < std::time::Duration::from_secs(20), "{took:?}");
    assert!(!vm.lock().paused, "the source VM keeps running");
}

/// A guest that keeps dirtying pages never gets the expected downtime under a zero limit: after
/// `rounds_max` rounds the policy decides. `Cancel` fails the migration with the guest running
/// here; `SwitchOver` (the default) completes it, pausing longer than the limit, intact.
#[test]
fn after_the_round_limit_the_policy_cancels_or_switches_over() {
    use ferry_migration::OnNoConvergence;
    let mut s = scenario();
    s.sim.workload = Workload::Dirty { pages_per_tick: 64 };
    s.migration.policy.downtime_max = std::time::Duration::ZERO;
    s.migration.policy.rounds_max = 2;
    s.migration.policy.on_no_convergence = OnNoConvergence::Cancel;
    let mem = create_memory(MEMORY).unwrap();
    let vm = SimVm::new(Guest::new(mem.clone(), s.seed), s.sim);
    let Err((err, _)) = run_faulty(&s, &vm, &mem, Fault::None) else {
        panic!("a migration that cannot converge must be cancelled by the policy");
    };
    assert!(
        matches!(err, MigrationError::NotConverged { rounds: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("policy is to cancel"), "{err}");
    assert!(!vm.lock().paused, "the guest keeps running here");
    s.migration.policy.on_no_convergence = OnNoConvergence::SwitchOver;
    let out = run_faulty(&s, &vm, &mem, Fault::None)
        .unwrap_or_else(|e| panic!("switch-over policy: {}", e.0));
    // Bulk, two iterative rounds, then the final round.
    assert_eq!(out.stats.rounds.len(), 4, "{:?}", out.stats.rounds);
    assert!(out.stats.rounds.last().is_some_and(|r| r.is_final));
    assert!(out.mismatches.is_empty() && out.dest_mismatches.is_empty());
    // The pause it decided on is longer than the limit: the watchdog's bound grows with it
    // (a bound of the limit plus the margin cut such a switchover in the lab).
    let margin_ms = s.migration.pause_margin.as_secs_f64() * 1000.0;
    let bound = out.stats.switchover.pause_bound_ms;
    assert!(
        bound > margin_ms,
        "a forced switchover's pause bound {bound} ms is no more than the margin"
    );
    // A migration that converges keeps the limit plus the margin.
    s.sim.workload = Workload::Idle;
    s.migration.policy.downtime_max = std::time::Duration::from_millis(300);
    let vm = SimVm::new(Guest::new(mem.clone(), s.seed), s.sim);
    let out = run_faulty(&s, &vm, &mem, Fault::None).unwrap_or_else(|e| panic!("idle: {}", e.0));
    assert_eq!(out.stats.switchover.pause_bound_ms, 300.0 + margin_ms);
}

/// Checks one attempt against the handover's promise: never two running copies, the copy that
/// runs has every write, and a source that is neither running nor handed over waits for the
/// operator (outcome unknown) with its memory untouched.
fn exactly_one_copy(what: &str, vm: &SimVm, a: &ferry_sim::harness::Attempt) {
    let source_runs = !vm.lock().paused;
    let destination_runs = a.destination.is_ok();
    assert!(
        !(source_runs && destination_runs),
        "{what}: two running copies (source {:?}, destination {:?})",
        a.source.as_ref().err().map(ToString::to_string),
        a.destination.as_ref().err().map(ToString::to_string)
    );
    if destination_runs {
        let dest_check = a.destination.as_ref().unwrap();
        assert!(
            a.mismatches.is_empty() && dest_check.is_empty(),
            "{what}: the running destination lost writes: {} pages differ from the source, \
             {} from the state it received",
            a.mismatches.len(),
            dest_check.len()
        );
    }
    if !source_runs && !destination_runs {
        assert!(
            matches!(a.source, Err(MigrationError::OutcomeUnknown(_))),
            "{what}: no copy runs and the source does not say it waits for the operator: {:?}",
            a.source.as_ref().err().map(ToString::to_string)
        );
    }
    if source_runs {
        assert!(
            a.source.is_err(),
            "{what}: the source reports success but runs on"
        );
    }
}

/// The link breaks at every phase of a migration, in either direction: during the handshake,
/// the bulk round, later rounds, the final round, the device state, Complete and the
/// acknowledgement. Whatever the moment, exactly one copy of the guest runs (or, once the
/// acknowledgement may have been lost, the source waits paused for the operator), and the one
/// that runs has every page the guest wrote. The cut points are spread over the bytes a clean
/// migration sends each way, with the last bytes of each direction taken one by one (where
/// Complete and the acknowledgement travel).
#[test]
fn a_link_cut_at_any_moment_leaves_one_running_copy_with_every_write() {
    use ferry_sim::harness::attempt;
    let mut s = scenario();
    s.connections = 1;
    let mem = create_memory(MEMORY).unwrap();
    let vm = SimVm::new(Guest::new(mem.clone(), s.seed), s.sim);
    let clean = attempt(&s, &vm, &mem, Fault::None);
    exactly_one_copy("no fault", &vm, &clean);
    assert!(clean.source.is_ok() && clean.destination.is_ok());
    let [forward, backward] = clean.bytes;
    assert!(forward > 1 << 20 && backward > 0, "{forward} {backward}");

    let points = |total: u64| -> Vec<u64> {
        let spread = (0..16).map(move |i| total * i / 16);
        let last = (1..=12).map(move |k| total.saturating_sub(k));
        let mut all: Vec<u64> = spread.chain(last).collect();
        all.sort_unstable();
        all.dedup();
        all
    };
    let mut outcomes = std::collections::BTreeMap::new();
    for (direction, total) in [("forward", forward), ("backward", backward)] {
        for at in points(total) {
            let fault = if direction == "forward" {
                Fault::CutAfter(at)
            } else {
                Fault::CutBackAfter(at)
            };
            let mem = create_memory(MEMORY).unwrap();
            let vm = SimVm::new(Guest::new(mem.clone(), s.seed), s.sim);
            // The guest runs a while first, so that rounds have dirty pages to send.
            for _ in 0..20 {
                vm.tick();
            }
            let a = attempt(&s, &vm, &mem, fault);
            let what = format!("cut {direction} after {at} of {total} bytes");
            exactly_one_copy(&what, &vm, &a);
            let kind = match (&a.source, &a.destination) {
                (Ok(_), Ok(_)) => "completed",
                (Err(MigrationError::OutcomeUnknown(_)), Ok(_)) => "unknown, destination runs",
                (Err(MigrationError::OutcomeUnknown(_)), Err(_)) => "unknown, nothing runs",
                (Err(_), _) => "failed, source runs",
                (Ok(_), Err(_)) => "completed without a destination",
            };
            *outcomes.entry(kind).or_insert(0) += 1;
        }
    }
    // The sweep reached every kind of ending, or it did not test the handover.
    for kind in [
        "failed, source runs",
        "unknown, destination runs",
        "unknown, nothing runs",
    ] {
        assert!(
            outcomes.contains_key(kind),
            "no cut ended as {kind:?}: {outcomes:?}"
        );
    }
    eprintln!("outcomes: {outcomes:?}");
}
