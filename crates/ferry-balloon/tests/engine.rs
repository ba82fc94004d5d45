//! The balloon as the migration engine's hint source, end to end: ferry-migration's real
//! source and destination migrate the scripted driver's guest memory over a socket pair while
//! a guest thread keeps writing, answers every hinting round like Linux and, as Linux's
//! shrinker may, takes one hinted block back and writes it after hinting it. Every page the
//! guest still uses must arrive intact, the blocks that stayed free must not be sent, and the
//! device state must restore on the destination.

mod driver;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use driver::*;
use ferry_balloon::{Balloon, BalloonConfig, BalloonState, CMD_ID_DONE};
use ferry_migration::{
    BitmapDirtyLog, Connection, Destination, Migration, MigrationConfig, NoObserver, ReceiveConfig,
    VmControl, VmControlError, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress};

/// The four free 4 MiB blocks of the second RAM region.
const BLOCKS: [u64; 4] = [16 * MIB, 20 * MIB, 24 * MIB, 28 * MIB];
/// The block the guest takes back after hinting it.
const REUSED: u64 = BLOCKS[2];
/// Pages the guest keeps writing while the migration runs.
const BUSY: (u64, u64) = (4 * MIB, 4 * MIB);

/// The VM as the engine controls it: pausing stops the guest thread, which pauses the device
/// and saves its state before it acknowledges.
#[derive(Default)]
struct Control {
    pause: AtomicBool,
    paused: AtomicBool,
    stop: AtomicBool,
    state: Mutex<Option<BalloonState>>,
    pauses: AtomicU64,
}

struct Vm(Arc<Control>);

impl VmControl for Vm {
    fn pause(&mut self) -> Result<(), VmControlError> {
        self.0.pause.store(true, Ordering::SeqCst);
        while !self.0.paused.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
        }
        self.0.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmControlError> {
        self.0.pause.store(false, Ordering::SeqCst);
        while self.0.paused.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmControlError> {
        let state = self.0.state.lock().unwrap().clone();
        serde_json::to_vec(&state).map_err(|e| VmControlError::new("saving the balloon", e))
    }
}

/// What the guest thread did.
struct GuestReport {
    rounds: u32,
    writes: u64,
    final_cmd_id: u32,
}

/// The guest: Linux's hinting work item plus a writer, until told to stop.
fn run_guest(mut d: Driver, ctl: Arc<Control>) -> GuestReport {
    let mut free: Vec<u64> = BLOCKS.to_vec();
    let (mut rounds, mut writes) = (0, 0u64);
    while !ctl.stop.load(Ordering::SeqCst) {
        if ctl.pause.load(Ordering::SeqCst) {
            d.dev.pause();
            *ctl.state.lock().unwrap() = Some(d.dev.save());
            ctl.paused.store(true, Ordering::SeqCst);
            while ctl.pause.load(Ordering::SeqCst) && !ctl.stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(1));
            }
            d.dev.resume();
            ctl.paused.store(false, Ordering::SeqCst);
            continue;
        }
        if d.hint_round(&free) > 0 {
            rounds += 1;
            if free.contains(&REUSED) {
                // The shrinker hands a hinted block back to the allocator and it is used at
                // once, while the engine may still be in the round that skips it.
                free.retain(|&b| b != REUSED);
                d.fill(REUSED, HINT_BLOCK, 0xb2);
            }
        }
        let page = BUSY.0 + (writes % (BUSY.1 / PAGE_SIZE)) * PAGE_SIZE;
        d.mem
            .write_obj(writes, GuestAddress(page))
            .expect("busy page is RAM");
        writes += 1;
        thread::sleep(Duration::from_micros(50));
    }
    GuestReport {
        rounds,
        writes,
        final_cmd_id: d.read_cmd_id(),
    }
}

fn read(mem: &ferry_balloon::GuestMemory, gpa: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    mem.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
    buf
}

#[test]
fn the_engine_migrates_with_the_balloon_as_its_hint_source() {
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(
        F_VERSION_1 | F_STATS_VQ | F_FREE_PAGE_HINT | F_REPORTING,
        None,
    );
    for &b in &BLOCKS {
        d.fill(b, HINT_BLOCK, 0xee); // stale data in memory the guest has freed
    }
    d.fill(BUSY.0, BUSY.1, 0x5a);
    let src_mem = d.mem.clone();
    let mut hints = d.dev.hint_source();
    let mut reports = d.dev.report_source();

    let ctl = Arc::new(Control::default());
    let guest = {
        let ctl = ctl.clone();
        thread::spawn(move || run_guest(d, ctl))
    };

    let (dest_mem, _dest_file) = memfd_memory();
    let (src_conn, dest_conn) = Connection::pair().unwrap();
    let receiver = {
        let dest_mem = dest_mem.clone();
        thread::spawn(move || {
            let dest = Destination::new(&dest_mem, ReceiveConfig::default()).unwrap();
            let received = dest.receive(vec![dest_conn]).unwrap();
            let state: Option<BalloonState> =
                serde_json::from_slice(&received.device_state).unwrap();
            received.acknowledge().unwrap();
            state
        })
    };

    let mut dirty = BitmapDirtyLog::new(src_mem.clone());
    let mut vm = Vm(ctl.clone());
    let mut observer = NoObserver;
    let config = MigrationConfig {
        // Long enough for the driver to answer the first round before the scan starts; the
        // engine starts at once when the balloon reports the round done (STOP).
        hint_head_start: Duration::from_secs(10),
        ..MigrationConfig::default()
    };
    let mut migration = Migration::new(&src_mem, &mut dirty, &mut vm, &mut observer, config)
        .expect("layout of the test RAM");
    migration.add_source(&mut hints);
    migration.add_source(&mut reports);
    let stats = migration.run(vec![src_conn]).expect("migration");
    let state = receiver.join().unwrap().expect("the VMM saved a balloon");

    // The source VM is now stopped for good: the migration left it paused.
    ctl.stop.store(true, Ordering::SeqCst);
    let report = guest.join().unwrap();
    assert!(report.rounds >= 1 && report.writes > 0);
    assert_eq!(ctl.pauses.load(Ordering::SeqCst), 1);

    // Every page the guest uses arrived as the source has it: RAM below the hole (rings,
    // driver buffers, the pages written during the migration) and the block taken back.
    for (gpa, len) in [(0, 8 * MIB), (REUSED, HINT_BLOCK)] {
        assert!(
            read(&src_mem, gpa, len) == read(&dest_mem, gpa, len),
            "{len:#x} bytes at {gpa:#x} differ on the destination"
        );
    }
    assert!(read(&dest_mem, REUSED, HINT_BLOCK)
        .iter()
        .all(|&b| b == 0xb2));
    // The blocks that stayed free were never sent: the fresh destination still reads zero.
    for &b in BLOCKS.iter().filter(|&&b| b != REUSED) {
        assert!(
            read(&dest_mem, b, HINT_BLOCK).iter().all(|&x| x == 0),
            "free block {b:#x} was sent"
        );
    }
    let skipped: u64 = stats
        .pages_skipped
        .iter()
        .filter(|(name, _)| name == "balloon-hint")
        .map(|(_, pages)| pages)
        .sum();
    assert!(
        skipped >= 4 * HINT_BLOCK / PAGE_SIZE,
        "the first round hints all four blocks; skipped {skipped} pages"
    );

    // The engine finished the hinting round (DONE), and the device state restores on the
    // destination.
    assert_eq!(report.final_cmd_id, CMD_ID_DONE);
    let restored = Balloon::restore(
        BalloonConfig::default(),
        dest_mem,
        Arc::new(TestIrq::default()),
        &state,
    )
    .expect("the saved device restores");
    assert_eq!(restored.save(), state);
}
