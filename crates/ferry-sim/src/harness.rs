//! Runs one simulated migration end to end, in process, and checks the result.

use std::thread;

use ferry_migration::{
    BitmapDirtyLog, Connection, Destination, Migration, MigrationConfig, MigrationError,
    MigrationStats, ReceiveConfig, ReceiveError, UnpopulatedSource,
};

use crate::guest::{create_memory, verify, Guest, Mismatch};
use crate::sim::{SimConfig, SimDriver, SimVm};

/// One simulated migration's parameters.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Seed of the guest's behaviour.
    pub seed: u64,
    /// Guest setup, workload and hint behaviour.
    pub sim: SimConfig,
    /// Also use the never-populated-memory source.
    pub unpopulated: bool,
    /// Connections.
    pub connections: u16,
    /// Engine settings.
    pub migration: MigrationConfig,
}

/// What a simulated migration produced.
#[derive(Debug)]
pub struct Outcome {
    /// The source's statistics.
    pub stats: MigrationStats,
    /// Used pages (per the source guest) that differ at the destination.
    pub mismatches: Vec<Mismatch>,
    /// Used pages (per the transferred state) that differ, checked by the destination.
    pub dest_mismatches: Vec<Mismatch>,
    /// The simulated VM, for further checks.
    pub vm: SimVm,
}

/// Runs `s` and returns the result, or the source's and destination's errors.
pub fn run(s: &Scenario) -> Result<Outcome, (MigrationError, Option<ReceiveError>)> {
    let src_mem = create_memory(s.memory).expect("source memory");
    let dst_mem = create_memory(s.memory).expect("destination memory");
    let vm = SimVm::new(Guest::new(src_mem.clone(), s.seed), s.sim);
    let (src_conns, dst_conns): (Vec<_>, Vec<_>) = (0..s.connections)
        .map(|_| Connection::pair().expect("socket pair"))
        .unzip();

    let dst = dst_mem.clone();
    let receiver = thread::spawn(move || {
        let d = Destination::new(&dst, ReceiveConfig::default())?;
        let received = d.receive(dst_conns)?;
        let states = crate::state::decode(&received.device_state);
        let layout = ferry_migration::MemoryLayout::from_guest_memory(&dst).expect("layout");
        let mismatches = states.map(|st| verify(&st, &dst, &layout));
        match mismatches {
            Some(m) => {
                received
                    .acknowledge()
                    .map_err(|e| ReceiveError::Source(e.to_string()))?;
                Ok(m)
            }
            None => {
                received.reject("device state does not decode");
                Err(ReceiveError::Source("device state does not decode".into()))
            }
        }
    });

    let mut dirty = BitmapDirtyLog::new(src_mem.clone());
    let mut control = vm.clone();
    let mut driver = SimDriver(vm.clone());
    let mut hints = vm.hint_source();
    let mut unpopulated = s.unpopulated.then(|| UnpopulatedSource::new(&src_mem));
    let result = (|| {
        let mut m = Migration::new(
            &src_mem,
            &mut dirty,
            &mut control,
            &mut driver,
            s.migration.clone(),
        )?;
        if let Some(h) = hints.as_mut() {
            m.add_source(h);
        }
        if let Some(u) = unpopulated.as_mut() {
            m.add_source(u);
        }
        m.run(src_conns)
    })();
    let received = receiver.join().expect("receiver thread");
    match (result, received) {
        (Ok(stats), Ok(dest_mismatches)) => {
            let layout =
                ferry_migration::MemoryLayout::from_guest_memory(&dst_mem).expect("layout");
            let mismatches = verify(vm.lock().guest.page_states(), &dst_mem, &layout);
            Ok(Outcome {
                stats,
                mismatches,
                dest_mismatches,
                vm,
            })
        }
        (Ok(_), Err(e)) => Err((MigrationError::Destination(e.to_string()), Some(e))),
        (Err(e), r) => Err((e, r.err())),
    }
}
