//! The deterministic simulation's matrix: many seeds, every workload, every hint behaviour.
//! After every migration, every page the guest considers in use must be byte-identical at
//! the destination. In a test binary of its own: it runs several simulated migrations at
//! once, and the timing-sensitive tests in `simulation.rs` must not share the CPU with it
//! (cargo runs test binaries one after another).

mod common;

use common::{scenario, seeds, WORKLOADS};
use ferry_sim::harness::{run, Scenario};
use ferry_sim::HintBehavior;

const BEHAVIORS: [Option<HintBehavior>; 9] = [
    None,
    Some(HintBehavior::Honest { delay_ticks: 0 }),
    Some(HintBehavior::Honest { delay_ticks: 5 }),
    Some(HintBehavior::Shrinker { delay_ticks: 2 }),
    Some(HintBehavior::NoHold { delay_ticks: 3 }),
    Some(HintBehavior::Late),
    Some(HintBehavior::Early),
    Some(HintBehavior::Garbage),
    Some(HintBehavior::Flood),
];

#[test]
fn every_used_page_arrives_intact_across_seeds_workloads_and_hint_behaviours() {
    let cases: Vec<Scenario> = (0..seeds())
        .flat_map(|seed| {
            WORKLOADS.into_iter().flat_map(move |workload| {
                BEHAVIORS
                    .into_iter()
                    .map(move |hints| scenario(seed, workload, hints))
            })
        })
        .collect();
    // A simulated migration mostly waits (its guest ticks and the engine's waits run on the
    // real clock: a quarter of its time is CPU), so several run at once. Each case is
    // still the same seeded scenario; only the threads' interleaving differs, as it does
    // between any two runs.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..SIM_JOBS {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(s) = cases.get(i) else { break };
                let verdict =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_intact(s)));
                if let Err(e) = verdict {
                    let why = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|m| m.to_string()))
                        .unwrap_or_default();
                    failures.lock().unwrap().push(format!("{s:?}: {why}"));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} simulated migrations failed; the first: {}",
        failures.len(),
        cases.len(),
        failures[0]
    );
    eprintln!("{} simulated migrations verified", cases.len());
}

/// Simulated migrations run at once by the matrix test.
const SIM_JOBS: usize = 4;

/// Runs scenario `s` and checks that every used page arrived, the source stays paused and
/// its hint sources were finished.
fn check_intact(s: &Scenario) {
    let hints = s.sim.hints;
    let out = run(s).unwrap_or_else(|e| panic!("{s:?} failed: {e:?}"));
    assert!(
        out.mismatches.is_empty(),
        "{s:?}: {:?}",
        &out.mismatches[..5.min(out.mismatches.len())]
    );
    assert!(
        out.dest_mismatches.is_empty(),
        "{s:?}: destination's own check failed"
    );
    assert!(
        out.vm.lock().paused,
        "the source VM stays paused after a successful switchover"
    );
    if hints.is_some() {
        assert!(
            out.vm.lock().hinting_done,
            "{s:?}: sources were not finished"
        );
    }
}
