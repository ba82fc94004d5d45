//! The engine's migration thread and the guest's driver (on a vCPU thread) race; hints must
//! still only ever land in the epoch whose command id they answer.

mod driver;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use driver::*;
use ferry_balloon::{BalloonConfig, CMD_ID_MIN};
use ferry_migration::hint::HintTargets;
use ferry_migration::{Epoch, HintInbox, HintKind, HintSource, MemoryLayout, Outcome, PageBitmap};
use ferry_migration::{GuestRange, PAGE_SIZE};

/// The block the driver hints for command id `id`: one of the four 4 MiB blocks of the
/// second RAM region, a different one for consecutive ids.
fn block_for(id: u32) -> u64 {
    16 * MIB + u64::from((id - CMD_ID_MIN) % 4) * HINT_BLOCK
}

#[test]
fn racing_rounds_only_hint_the_current_epochs_block() {
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(F_VERSION_1 | F_FREE_PAGE_HINT, None);
    let layout = MemoryLayout::from_guest_memory(&d.mem).unwrap();
    let mut inbox = HintInbox::new();
    let mut src = d.dev.hint_source();
    src.start(inbox.register("balloon-hint", HintKind::Free));

    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = d.read_cmd_id();
                if id >= CMD_ID_MIN && id != d.cmd_id_active {
                    // Hint the id's block page by page, so rounds are long enough to race.
                    d.cmd_id_active = id;
                    d.send_cmd(id);
                    let base = block_for(id);
                    for p in 0..64 {
                        // Linux re-reads the id only after a config interrupt reached its
                        // workqueue, so it may send several blocks with a stale id.
                        if p % 8 == 0 && d.read_cmd_id() != id {
                            break;
                        }
                        d.send_hint(base + p * 64 * 1024, 64 * 1024);
                        std::thread::yield_now();
                    }
                    d.send_cmd(0);
                    rounds += 1;
                }
                std::thread::yield_now();
            }
            rounds
        })
    };

    let pages = layout.pages();
    let mut hinted_epochs = 0;
    for k in 0..300u64 {
        let mut to_send = PageBitmap::full(pages);
        let (dest, mut kz) = (PageBitmap::new(pages), PageBitmap::new(pages));
        inbox.open(Epoch(k));
        src.epoch_begin(Epoch(k));
        let mut skipped = 0;
        for _ in 0..(k % 7) * 20 {
            let mut t = HintTargets {
                to_send: &mut to_send,
                dest_nonzero: &dest,
                known_zero: &mut kz,
                audit: None,
            };
            skipped += inbox.drain(&layout, &mut t, u64::MAX).pages_skipped;
            std::thread::yield_now();
        }
        src.epoch_end(Epoch(k));
        let mut t = HintTargets {
            to_send: &mut to_send,
            dest_nonzero: &dest,
            known_zero: &mut kz,
            audit: None,
        };
        skipped += inbox.drain(&layout, &mut t, u64::MAX).pages_skipped;
        inbox.close();
        // Epoch k issued id CMD_ID_MIN + k: only its block may have been skipped.
        let own = block_for(CMD_ID_MIN + k as u32);
        let allowed: Vec<u64> = layout
            .whole_pages_in(GuestRange::new(own, HINT_BLOCK))
            .flat_map(|(a, b)| a..b)
            .collect();
        assert_eq!(
            pages - to_send.count(),
            skipped,
            "skipped pages are exactly the cleared ones"
        );
        for i in 0..pages {
            assert!(
                to_send.get(i) || allowed.contains(&i),
                "epoch {k} skipped page {i} outside its own block"
            );
        }
        hinted_epochs += u64::from(skipped > 0);
        assert!(skipped <= HINT_BLOCK / PAGE_SIZE);
    }
    src.finish(Outcome::Cancelled);
    stop.store(true, Ordering::Relaxed);
    let rounds = guest.join().unwrap();
    eprintln!("{rounds} driver rounds, {hinted_epochs} epochs with hints");
    assert!(
        rounds > 0 && hinted_epochs > 0,
        "the race exercised something"
    );
}
