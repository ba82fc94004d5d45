//! The device against a scripted driver that behaves like Linux 6.1's virtio_balloon, and
//! the migration engine's hint inbox on the other side.

mod driver;

use driver::*;
use ferry_balloon::{
    BalloonConfig, BalloonState, CMD_ID_DONE, CMD_ID_MIN, CMD_ID_STOP, HINT_MIN_YIELD_PAGES,
    HINT_WINDOW_MIN_SHARE, HINT_WINDOW_PAGES,
};
use ferry_migration::hint::HintTargets;
use ferry_migration::{
    Epoch, HintInbox, HintKind, HintSource, MemoryLayout, Outcome, PageBitmap, PAGE_SIZE,
};
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// The engine's side: an inbox and the bitmaps hints are applied to.
struct Engine {
    inbox: HintInbox,
    layout: MemoryLayout,
    to_send: PageBitmap,
    dest_nonzero: PageBitmap,
    known_zero: PageBitmap,
}

impl Engine {
    fn new(d: &Driver) -> Self {
        let layout = MemoryLayout::from_guest_memory(&d.mem).unwrap();
        let pages = layout.pages();
        Self {
            inbox: HintInbox::new(),
            layout,
            to_send: PageBitmap::full(pages),
            dest_nonzero: PageBitmap::new(pages),
            known_zero: PageBitmap::new(pages),
        }
    }

    fn drain(&mut self) -> u64 {
        let mut t = HintTargets {
            to_send: &mut self.to_send,
            dest_nonzero: &self.dest_nonzero,
            known_zero: &mut self.known_zero,
            audit: None,
        };
        self.inbox
            .drain(&self.layout, &mut t, u64::MAX)
            .pages_skipped
    }

    fn page(&self, gpa: u64) -> u64 {
        self.layout.index_of(gpa).unwrap()
    }

    /// Whether every page of `[gpa, gpa + len)` was removed from the to-send set.
    fn skipped(&self, gpa: u64, len: u64) -> bool {
        (0..len / PAGE_SIZE).all(|i| !self.to_send.get(self.page(gpa + i * PAGE_SIZE)))
    }
}

const ALL: u64 =
    F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM | F_FREE_PAGE_HINT | F_PAGE_POISON | F_REPORTING;

/// A driver that negotiated every feature, the engine, and the device's hint source
/// registered with it.
fn hinting() -> (Driver, Engine, ferry_balloon::BalloonHintSource) {
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(ALL, None);
    let mut e = Engine::new(&d);
    let mut src = d.dev.hint_source();
    src.start(e.inbox.register("balloon-hint", HintKind::Free));
    (d, e, src)
}

#[test]
fn negotiation_follows_the_linux_sequence() {
    let mut d = Driver::new(BalloonConfig::default());
    d.write(REG_DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        d.read(REG_DEVICE_FEATURES),
        0b11_1110,
        "no MUST_TELL_HOST, no bit 6"
    );
    d.write(REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(d.read(REG_DEVICE_FEATURES), 1, "VERSION_1");
    let f = d.probe(ALL, None);
    assert_eq!(f, ALL);
    assert_eq!(d.dev.acked_features(), ALL);
    assert_eq!(d.vqs.len(), 5);
    d.write(REG_QUEUE_SEL, 5);
    assert_eq!(d.read(REG_QUEUE_NUM_MAX), 0, "no sixth queue");
    assert_eq!(
        d.read(REG_STATUS),
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
    );
}

#[test]
fn queue_indices_follow_the_negotiated_features() {
    // Without stats, free_page_vq is queue 2 and reporting_vq queue 3.
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(F_VERSION_1 | F_FREE_PAGE_HINT | F_REPORTING, None);
    assert_eq!(d.vqs.len(), 4);
    assert_eq!(d.queue_index(F_FREE_PAGE_HINT), 2);
    d.write(REG_QUEUE_SEL, 4);
    assert_eq!(d.read(REG_QUEUE_NUM_MAX), 0);
    // A report on queue 3 is handled as a report.
    d.report(&[(16 * MIB, (2 * MIB) as u32)]);
    assert_eq!(d.dev.counters().reported_ranges, 1);
    // And a feature the VMM switched off is not offered.
    let mut d = Driver::new(BalloonConfig {
        free_page_hint: false,
        ..BalloonConfig::default()
    });
    assert_eq!(d.probe(ALL, None) & F_FREE_PAGE_HINT, 0);
    assert_eq!(d.vqs.len(), 4);
}

#[test]
fn a_hint_round_delivers_blocks_tagged_with_the_epoch() {
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(ALL, None);
    let mut e = Engine::new(&d);
    let mut src = d.dev.hint_source();
    assert_eq!((src.name(), src.kind()), ("balloon-hint", HintKind::Free));
    src.start(e.inbox.register(src.name(), src.kind()));

    let irqs = d.irq.count();
    let generation = d.read(REG_CONFIG_GENERATION);
    e.inbox.open(Epoch(0));
    src.epoch_begin(Epoch(0));
    assert_eq!(d.irq.count(), irqs + 1, "config interrupt");
    assert_eq!(d.ack_interrupt() & 2, 2, "config-change bit");
    assert_ne!(d.read(REG_CONFIG_GENERATION), generation);
    assert_eq!(d.read_config(8), CMD_ID_MIN);

    let blocks = [4 * MIB, 16 * MIB, 24 * MIB];
    assert_eq!(d.hint_round(&blocks), 3);
    assert_eq!(e.drain(), 3 * HINT_BLOCK / PAGE_SIZE);
    for b in blocks {
        assert!(e.skipped(b, HINT_BLOCK));
    }
    assert!(!e.skipped(0, PAGE_SIZE), "unhinted pages stay");
    assert!(e.inbox.all_complete(), "driver's STOP completes the epoch");
    // The hinted buffers were all returned; the device never wrote into them.
    let q = d.queue_index(F_FREE_PAGE_HINT);
    d.used(q);
    assert_eq!(d.vqs[q].num_free(), 256);
    assert_eq!(d.dev.counters().hinted_ranges, 3);

    e.inbox.close();
    src.epoch_end(Epoch(0));
    assert_eq!(d.read_config(8), CMD_ID_STOP);
    // Next round: the next id.
    e.inbox.open(Epoch(1));
    src.epoch_begin(Epoch(1));
    assert_eq!(d.read_config(8), CMD_ID_MIN + 1);
    src.epoch_end(Epoch(1));
    e.inbox.close();
    src.finish(Outcome::Switchover);
    assert_eq!(d.read_config(8), CMD_ID_DONE, "guest gets its pages back");
}

#[test]
fn hints_with_a_stale_id_are_ignored() {
    let (mut d, mut e, mut src) = hinting();

    e.inbox.open(Epoch(0));
    src.epoch_begin(Epoch(0));
    let old = d.read_cmd_id();
    src.epoch_end(Epoch(0));
    e.inbox.close();
    e.inbox.open(Epoch(1));
    src.epoch_begin(Epoch(1));
    // A slow driver starts the round for the id it read earlier.
    d.send_cmd(old);
    d.send_hint(4 * MIB, HINT_BLOCK as u32);
    d.send_cmd(CMD_ID_STOP);
    assert_eq!(e.drain(), 0);
    assert_eq!(d.dev.counters().hints_ignored, 1);
    assert!(!e.inbox.all_complete(), "a stale round completes nothing");
    // Then it sees the new id and hints for real.
    d.cmd_id_active = old;
    assert_eq!(d.hint_round(&[16 * MIB]), 1);
    assert_eq!(e.drain(), HINT_BLOCK / PAGE_SIZE);
    assert!(e.skipped(16 * MIB, HINT_BLOCK) && !e.skipped(4 * MIB, PAGE_SIZE));
}

#[test]
fn hints_after_the_epoch_ended_are_not_delivered() {
    let (mut d, mut e, mut src) = hinting();
    e.inbox.open(Epoch(0));
    src.epoch_begin(Epoch(0));
    assert!(!src.busy(), "asked, but the driver has not started");
    let id = d.read_cmd_id();
    d.send_cmd(id);
    assert!(src.busy(), "the driver is in its hint loop");
    d.send_hint(4 * MIB, HINT_BLOCK as u32);
    e.inbox.close();
    src.epoch_end(Epoch(0));
    // The driver has not noticed STOP yet and sends another block: still busy.
    d.send_hint(16 * MIB, HINT_BLOCK as u32);
    assert!(src.busy());
    e.inbox.open(Epoch(1));
    assert_eq!(
        e.drain(),
        0,
        "the epoch-0 hint is stale, the late one never sent"
    );
    assert_eq!(d.dev.counters().hints_ignored, 1);
    // Its STOP says it left the loop.
    d.send_cmd(CMD_ID_STOP);
    assert!(!src.busy());
}

#[test]
fn the_guest_is_asked_again_only_while_hints_pay() {
    let (mut d, mut e, mut src) = hinting();
    // The bulk round's epoch always asks; its hints spared enough, so the next one asks too.
    e.inbox.open(Epoch(0));
    src.epoch_begin(Epoch(0));
    assert_eq!(d.read_cmd_id(), CMD_ID_MIN);
    assert_eq!(d.hint_round(&[4 * MIB]), 1);
    src.epoch_yield(Epoch(0), HINT_MIN_YIELD_PAGES);
    src.epoch_end(Epoch(0));
    e.inbox.close();
    e.inbox.open(Epoch(1));
    src.epoch_begin(Epoch(1));
    assert_eq!(d.read_cmd_id(), CMD_ID_MIN + 1);
    assert_eq!(d.hint_round(&[8 * MIB]), 1);
    // Epoch 1's hints spared less than a block: epoch 2 does not ask the guest (no new id,
    // no interrupt) and is complete at once.
    src.epoch_yield(Epoch(1), HINT_MIN_YIELD_PAGES - 1);
    src.epoch_end(Epoch(1));
    e.inbox.close();
    let irqs = d.irq.count();
    e.inbox.open(Epoch(2));
    src.epoch_begin(Epoch(2));
    assert_eq!(d.read_config(8), CMD_ID_STOP);
    assert_eq!(d.irq.count(), irqs, "no config interrupt");
    e.drain();
    assert!(e.inbox.all_complete());
    assert!(!src.busy());
    src.epoch_end(Epoch(2));
    e.inbox.close();
    src.finish(Outcome::Switchover);
    assert_eq!(
        d.read_config(8),
        CMD_ID_DONE,
        "the held blocks still go back"
    );
}

#[test]
fn a_request_whose_hints_stop_sparing_pages_ends_early() {
    let (mut d, mut e, mut src) = hinting();
    let w = HINT_WINDOW_PAGES;
    e.inbox.open(Epoch(0));
    src.epoch_begin(Epoch(0));
    let id = d.read_cmd_id();
    d.send_cmd(id);
    // Less than a window says nothing yet; a window that spared an eighth goes on.
    src.epoch_progress(Epoch(0), w - 1, 0);
    src.epoch_progress(Epoch(0), w, w / HINT_WINDOW_MIN_SHARE);
    assert_eq!(d.read_config(8), id);
    // The next window spared less than an eighth (the first one's share does not carry
    // over): STOP, with a config interrupt, and the epoch is complete for the engine.
    let irqs = d.irq.count();
    src.epoch_progress(Epoch(0), 2 * w, w / HINT_WINDOW_MIN_SHARE + w / 16);
    assert_eq!(d.read_config(8), CMD_ID_STOP);
    assert_eq!(d.irq.count(), irqs + 1);
    e.drain();
    assert!(e.inbox.all_complete());
    // The driver finishes the block in hand, which is not delivered, then stops.
    assert!(src.busy());
    d.send_hint(4 * MIB, HINT_BLOCK as u32);
    assert_eq!(e.drain(), 0);
    d.send_cmd(CMD_ID_STOP);
    assert!(!src.busy());
    // The epoch's end changes nothing more.
    let generation = d.read(REG_CONFIG_GENERATION);
    src.epoch_end(Epoch(0));
    e.inbox.close();
    assert_eq!(d.read(REG_CONFIG_GENERATION), generation);
    // The bulk round's hints spared enough overall: the next epoch asks again, afresh.
    src.epoch_yield(Epoch(0), w);
    e.inbox.open(Epoch(1));
    src.epoch_begin(Epoch(1));
    assert_eq!(d.read_cmd_id(), CMD_ID_MIN + 1);
    src.epoch_progress(Epoch(1), w, w / HINT_WINDOW_MIN_SHARE);
    assert_eq!(d.read_cmd_id(), CMD_ID_MIN + 1);
}

#[test]
fn epoch_completes_at_once_without_a_driver() {
    let mut d = Driver::new(BalloonConfig::default());
    let mut e = Engine::new(&d);
    let mut src = d.dev.hint_source();
    src.start(e.inbox.register("balloon-hint", HintKind::Free));
    e.inbox.open(Epoch(0));
    src.epoch_begin(Epoch(0));
    e.drain();
    assert!(e.inbox.all_complete());
    assert_eq!(d.read_config(8), CMD_ID_STOP, "no id issued to nobody");
    assert_eq!(d.irq.count(), 0, "no interrupt before DRIVER_OK");
}

#[test]
fn reported_ranges_are_discarded_and_hinted_as_zero() {
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(ALL, None);
    let mut e = Engine::new(&d);
    let mut src = d.dev.report_source();
    assert_eq!((src.name(), src.kind()), ("balloon-report", HintKind::Zero));
    src.start(e.inbox.register(src.name(), src.kind()));
    let (a, b) = (16 * MIB, 20 * MIB);
    d.fill(a, 2 * MIB, 0x5a);
    d.fill(b, 2 * MIB, 0x5a);

    // Reported while no epoch is open: discarded, never hinted.
    let head = d.report(&[(a, (2 * MIB) as u32)]);
    let q = d.queue_index(F_REPORTING);
    assert_eq!(d.used(q), vec![(head, 0)], "acknowledged");
    assert!(d.is_hole(a, 2 * MIB) && d.all(a, 2 * MIB, 0));

    e.inbox.open(Epoch(4));
    src.epoch_begin(Epoch(4));
    // The destination holds data for the first page of `b`: it must become zero there.
    let first = e.page(b);
    e.dest_nonzero.set(first);
    d.report(&[(b, (2 * MIB) as u32)]);
    assert!(d.is_hole(b, 2 * MIB));
    assert_eq!(e.drain(), 2 * MIB / PAGE_SIZE - 1);
    assert!(e.skipped(b + PAGE_SIZE, 2 * MIB - PAGE_SIZE) && !e.skipped(a, PAGE_SIZE));
    assert!(
        e.to_send.get(first) && e.known_zero.get(first),
        "sent as a zero record"
    );
    assert_eq!(d.dev.counters().discarded_bytes, 4 * MIB);
    src.epoch_end(Epoch(4));
    e.inbox.close();
}

#[test]
fn a_nonzero_poison_value_inhibits_discard() {
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(ALL, Some(0xaaaa_aaaa));
    assert_eq!(d.read_config(12), 0xaaaa_aaaa);
    let mut e = Engine::new(&d);
    let mut src = d.dev.report_source();
    src.start(e.inbox.register("balloon-report", HintKind::Zero));
    e.inbox.open(Epoch(0));
    src.epoch_begin(Epoch(0));
    d.fill(16 * MIB, 2 * MIB, 0xaa);
    d.report(&[(16 * MIB, (2 * MIB) as u32)]);
    assert_eq!(
        d.used(d.queue_index(F_REPORTING)).len(),
        1,
        "still acknowledged"
    );
    assert!(d.all(16 * MIB, 2 * MIB, 0xaa), "poison kept");
    assert!(!d.is_hole(16 * MIB, 2 * MIB));
    assert_eq!(e.drain(), 0, "nothing discarded, nothing hinted");
}

#[test]
fn a_zero_poison_value_allows_discard() {
    // Linux with init_on_free negotiates PAGE_POISON with poison_val 0.
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(ALL, Some(0));
    d.fill(16 * MIB, 2 * MIB, 0x11);
    d.report(&[(16 * MIB, (2 * MIB) as u32)]);
    assert!(d.is_hole(16 * MIB, 2 * MIB));
}

#[test]
fn the_vmm_can_inhibit_discard() {
    let mut d = Driver::new(BalloonConfig {
        discard_inhibited: true,
        ..BalloonConfig::default()
    });
    d.probe(ALL, None);
    d.fill(16 * MIB, 2 * MIB, 0x11);
    d.report(&[(16 * MIB, (2 * MIB) as u32)]);
    d.send_pfns(0, &[(16 * MIB / PAGE_SIZE) as u32]);
    assert!(d.all(16 * MIB, 2 * MIB, 0x11));
    d.dev.set_discard_inhibited(false);
    d.send_pfns(0, &[(16 * MIB / PAGE_SIZE) as u32]);
    assert!(d.all(16 * MIB, PAGE_SIZE, 0) && d.all(16 * MIB + PAGE_SIZE, PAGE_SIZE, 0x11));
}

#[test]
fn inflate_and_deflate_follow_the_target() {
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(ALL, None);
    let irqs = d.irq.count();
    d.dev.set_target(3);
    assert_eq!(d.irq.count(), irqs + 1);
    assert_eq!(d.ack_interrupt(), 2);
    assert_eq!(d.read_config(0), 3, "num_pages");
    let pfns: Vec<u32> = (0..3).map(|i| (20 * MIB / PAGE_SIZE) as u32 + i).collect();
    d.fill(20 * MIB, 3 * PAGE_SIZE, 0x77);
    let head = d.send_pfns(0, &pfns);
    assert_eq!(d.used(0), vec![(head, 0)]);
    assert_eq!(d.ack_interrupt(), 1, "used-buffer interrupt");
    assert!(
        d.is_hole(20 * MIB, 3 * PAGE_SIZE),
        "inflated pages are discarded"
    );
    d.write(REG_CONFIG + 4, 3);
    assert_eq!(d.dev.actual(), 3);
    d.dev.set_target(0);
    let head = d.send_pfns(1, &pfns);
    assert_eq!(d.used(1), vec![(head, 0)]);
    assert_eq!(d.dev.counters().inflated_pages, 3);
    assert_eq!(d.dev.counters().deflated_pages, 3);
    d.write(REG_CONFIG + 4, 0);
    assert_eq!(d.dev.actual(), 0);
}

#[test]
fn statistics_are_requested_by_returning_the_buffer() {
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(ALL, None);
    let q = d.queue_index(F_STATS_VQ);
    assert_eq!(d.dev.stats().unwrap().free_memory, Some(123 << 20));
    assert!(d.used(q).is_empty(), "the device holds the buffer");
    assert!(d.dev.request_stats());
    assert_eq!(d.used(q).len(), 1);
    assert!(
        !d.dev.request_stats(),
        "nothing held until the driver refills"
    );
    d.send_stats(q, &[(4, 99), (6, 100), (42, 1)]);
    let s = d.dev.stats().unwrap();
    assert_eq!(
        (s.free_memory, s.available_memory, s.unknown_entries),
        (Some(99), Some(100), 1)
    );
}

#[test]
fn device_writes_to_guest_memory_are_in_the_dirty_bitmap() {
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(ALL, None);
    for r in d.mem.iter() {
        r.bitmap().reset();
    }
    let used = d.vqs[0].used;
    d.send_pfns(0, &[5]);
    let region = d.mem.find_region(GuestAddress(used)).unwrap();
    assert!(
        region.bitmap().is_addr_set(used as usize),
        "used ring page dirty"
    );
}

#[test]
fn no_interrupt_when_the_driver_suppresses_it() {
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(ALL, None);
    // Linux's free_page_vq has no callback: VRING_AVAIL_F_NO_INTERRUPT.
    let q = d.queue_index(F_FREE_PAGE_HINT);
    d.set_avail_flags(q, 1);
    let irqs = d.irq.count();
    d.send_cmd(CMD_ID_STOP);
    assert_eq!(d.used(q).len(), 1);
    assert_eq!(d.irq.count(), irqs);
}

#[test]
fn a_paused_device_processes_nothing_until_resumed() {
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(ALL, None);
    d.dev.pause();
    d.send_pfns(0, &[5]);
    assert!(d.dev.request_stats());
    assert_eq!(
        (d.used_idx(0), d.used_idx(2)),
        (0, 0),
        "no guest memory writes while paused"
    );
    d.dev.resume();
    assert_eq!(d.used(0).len(), 1);
    assert_eq!(d.used(2).len(), 1, "the stats request made while paused");
}

#[test]
fn device_state_round_trips_and_the_driver_carries_on() {
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(ALL, Some(0));
    d.dev.set_target(7);
    let mut src = d.dev.hint_source();
    let mut inbox = HintInbox::new();
    src.start(inbox.register("balloon-hint", HintKind::Free));
    inbox.open(Epoch(0));
    src.epoch_begin(Epoch(0));
    d.send_pfns(0, &[5, 6]);
    d.dev.pause();
    src.finish(Outcome::Switchover);
    let state = d.dev.save();
    let json = serde_json::to_string(&state).unwrap();
    let state: BalloonState = serde_json::from_str(&json).unwrap();
    assert_eq!(state.hint.cmd_id, CMD_ID_DONE);

    let irq = std::sync::Arc::new(TestIrq::default());
    let dev = ferry_balloon::Balloon::restore(
        BalloonConfig::default(),
        d.mem.clone(),
        irq.clone(),
        &state,
    )
    .unwrap();
    assert_eq!(
        irq.count(),
        0,
        "not while the VMM may still be restoring its interrupt controller"
    );
    assert_eq!(dev.save(), state, "restore then save is the identity");
    let vqs = d.vqs.clone();
    let features = d.features;
    let mem = d.mem.clone();
    let file = d.file.try_clone().unwrap();
    let mut d2 = Driver::with_device(dev, mem, file, irq);
    d2.vqs = vqs;
    d2.features = features;
    d2.dev.resume();
    assert_eq!(
        d2.irq.count(),
        1,
        "pending config interrupt raised again on resume"
    );
    d2.dev.pause();
    d2.dev.resume();
    assert_eq!(d2.irq.count(), 1, "only once");
    assert_eq!(d2.read_config(0), 7);
    assert_eq!(d2.read_config(8), CMD_ID_DONE);
    // The used entry the source wrote is still there; the queue continues.
    assert_eq!(d2.used(0).len(), 1);
    let head = d2.send_pfns(0, &[9]);
    assert_eq!(d2.used(0), vec![(head, 0)]);
    assert!(d2.dev.request_stats(), "the held stats buffer came along");
}

#[test]
fn the_device_and_its_sources_can_move_between_threads() {
    fn send<T: Send>() {}
    fn shared<T: Send + Sync>() {}
    send::<ferry_balloon::Balloon>();
    send::<ferry_balloon::BalloonHintSource>();
    send::<ferry_balloon::ReportedRangesSource>();
    shared::<ferry_balloon::BalloonState>();
}
