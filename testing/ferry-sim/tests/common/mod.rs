//! What the simulation's test files share: the scenario each seed describes.

use ferry_migration::{Compression, MigrationConfig};
use ferry_sim::harness::Scenario;
use ferry_sim::{HintBehavior, SimConfig, Workload};

pub const MEMORY: u64 = 32 << 20;

pub fn seeds() -> u64 {
    std::env::var("FERRY_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4)
}

pub const WORKLOADS: [Workload; 4] = [
    Workload::Idle,
    Workload::Freed { percent: 60 },
    Workload::Dirty { pages_per_tick: 48 },
    Workload::Churn { pages_per_tick: 24 },
];

pub fn scenario(seed: u64, workload: Workload, hints: Option<HintBehavior>) -> Scenario {
    Scenario {
        memory: MEMORY,
        seed,
        sim: SimConfig {
            used_percent: 20,
            workload,
            hints,
            // Half the seeds clear pages before hinting them (init_on_alloc=1).
            zero_on_alloc: seed % 8 < 4,
        },
        unpopulated: seed % 2 == 0,
        connections: 1 + (seed % 3) as u16,
        // Every combination with `unpopulated` over four seeds.
        lazy_dirty_log: seed % 4 < 2,
        dirty_log_drops_every: 0,
        dest_prefilled: false,
        // Both ways of writing the destination's memory.
        write_through_file: seed % 2 == 1,
        accept_compression: true,
        // A third of the seeds compress page data (with 1 to 3 connections).
        migration: MigrationConfig {
            compression: if seed % 3 == 1 {
                Compression::Zstd { level: 1 }
            } else {
                Compression::None
            },
            ..MigrationConfig::default()
        },
    }
}
