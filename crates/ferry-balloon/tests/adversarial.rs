//! Drivers that break the rules: every malformed input is dropped (or the device asks for a
//! reset), nothing outside guest RAM is touched or hinted, nothing panics.

mod driver;

use driver::*;
use ferry_balloon::{BalloonConfig, MmioDevice, CMD_ID_STOP};
use ferry_migration::hint::HintTargets;
use ferry_migration::{
    Epoch, HintInbox, HintKind, HintSource, MemoryLayout, PageBitmap, PAGE_SIZE,
};

const ALL: u64 =
    F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM | F_FREE_PAGE_HINT | F_PAGE_POISON | F_REPORTING;

fn ready() -> Driver {
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(ALL, None);
    d
}

/// Counts pages hinted through an inbox for epoch 0.
struct Hints {
    inbox: HintInbox,
    layout: MemoryLayout,
    to_send: PageBitmap,
}

impl Hints {
    fn new(d: &mut Driver) -> Self {
        let layout = MemoryLayout::from_guest_memory(&d.mem).unwrap();
        let mut inbox = HintInbox::new();
        let mut hint = d.dev.hint_source();
        let mut report = d.dev.report_source();
        hint.start(inbox.register("balloon-hint", HintKind::Free));
        report.start(inbox.register("balloon-report", HintKind::Zero));
        inbox.open(Epoch(0));
        hint.epoch_begin(Epoch(0));
        report.epoch_begin(Epoch(0));
        let pages = layout.pages();
        Self {
            inbox,
            layout,
            to_send: PageBitmap::full(pages),
        }
    }

    fn drain(&mut self) -> (u64, u64) {
        let pages = self.layout.pages();
        let (dest, mut kz) = (PageBitmap::new(pages), PageBitmap::new(pages));
        let mut t = HintTargets {
            to_send: &mut self.to_send,
            dest_nonzero: &dest,
            known_zero: &mut kz,
            audit: None,
        };
        let skipped = self
            .inbox
            .drain(&self.layout, &mut t, u64::MAX)
            .pages_skipped;
        let invalid = self.inbox.stats().iter().map(|s| s.ranges_invalid).sum();
        (skipped, invalid)
    }
}

#[test]
fn pfn_arrays_outside_ram_are_dropped() {
    let mut d = ready();
    d.fill(20 * MIB, PAGE_SIZE, 0x33);
    // The buffer itself lies in the hole between the regions.
    let head = d.add(0, &[(10 * MIB, 8, false)]).unwrap();
    d.kick(0);
    assert_eq!(d.used(0), vec![(head, 0)], "returned, unused");
    // One pfn in the hole, one valid: nothing is discarded.
    let pfns = [(20 * MIB / PAGE_SIZE) as u32, (10 * MIB / PAGE_SIZE) as u32];
    d.send_pfns(0, &pfns);
    d.send_pfns(0, &[u32::MAX]);
    assert_eq!(d.used(0).len(), 2);
    assert!(d.all(20 * MIB, PAGE_SIZE, 0x33));
    let c = d.dev.counters();
    assert_eq!(
        (c.chains_dropped, c.inflated_pages, c.discarded_bytes),
        (3, 0, 0)
    );
}

#[test]
fn wrong_buffer_sizes_and_directions_are_dropped() {
    let mut d = ready();
    // pfn array not a multiple of 4 bytes.
    let a = d.buf(&[1, 0, 0, 0, 2, 0]);
    d.add(0, &[(a, 6, false)]).unwrap();
    // pfn array as a device-writable buffer.
    d.add(0, &[(a, 4, true)]).unwrap();
    // An enormous pfn array.
    d.add(0, &[(0, 4 * MIB as u32, false)]).unwrap();
    d.kick(0);
    assert_eq!(d.used(0).len(), 3);
    // Free page queue: a 3-byte and an 8-byte command, a two-buffer command.
    let q = d.queue_index(F_FREE_PAGE_HINT);
    let c = d.buf(&[0; 8]);
    d.add(q, &[(c, 3, false)]).unwrap();
    d.add(q, &[(c, 8, false)]).unwrap();
    d.add(q, &[(c, 4, false), (c, 4, false)]).unwrap();
    // Reporting with a device-readable buffer.
    let r = d.queue_index(F_REPORTING);
    d.add(r, &[(16 * MIB, 4096, false)]).unwrap();
    // Stats buffer larger than any real one.
    let s = d.queue_index(F_STATS_VQ);
    d.add(s, &[(0, 64 * 1024, false)]).unwrap();
    for q in [q, r, s] {
        d.kick(q);
    }
    assert_eq!(d.used(q).len() + d.used(r).len(), 4);
    assert_eq!(d.dev.counters().chains_dropped, 8);
    assert_eq!(d.dev.counters().inflated_pages, 0);
}

#[test]
fn loops_bad_links_and_long_chains_are_dropped() {
    let mut d = ready();
    let a = d.buf(&5u32.to_le_bytes());
    // A two-descriptor loop: 10 -> 11 -> 10.
    d.write_desc(0, 10, a, 4, DESC_F_NEXT, 11);
    d.write_desc(0, 11, a, 4, DESC_F_NEXT, 10);
    d.publish(0, 10);
    // A link past the end of the table.
    d.write_desc(0, 20, a, 4, DESC_F_NEXT, 300);
    d.publish(0, 20);
    // A head index past the end of the table.
    d.publish(0, 999);
    // A chain of 100 descriptors.
    for i in 0..100u16 {
        let last = i == 99;
        d.write_desc(
            0,
            100 + i,
            a,
            4,
            if last { 0 } else { DESC_F_NEXT },
            101 + i,
        );
    }
    d.publish(0, 100);
    d.kick(0);
    let used: Vec<u16> = d.used(0).iter().map(|u| u.0).collect();
    assert_eq!(used, vec![10, 20, 100], "the bad head cannot be returned");
    assert_eq!(d.dev.counters().chains_dropped, 4);
    assert_eq!(d.dev.counters().inflated_pages, 0);
    // The device is still fine.
    let head = d.send_pfns(0, &[5]);
    assert_eq!(d.used(0), vec![(head, 0)]);
}

#[test]
fn indirect_tables_count_towards_the_chain_limit() {
    let mut d = ready();
    let a = d.buf(&5u32.to_le_bytes());
    // An indirect table of 128 descriptors chained together (INDIRECT_DESC not offered).
    let table = d.buf(&[0u8; 128 * 16]);
    for i in 0..128u64 {
        let mut e = [0u8; 16];
        e[..8].copy_from_slice(&a.to_le_bytes());
        e[8..12].copy_from_slice(&4u32.to_le_bytes());
        let (flags, next) = if i < 127 {
            (DESC_F_NEXT, i as u16 + 1)
        } else {
            (0, 0)
        };
        e[12..14].copy_from_slice(&flags.to_le_bytes());
        e[14..].copy_from_slice(&next.to_le_bytes());
        d.mem
            .write_slice(&e, vm_memory::GuestAddress(table + i * 16))
            .unwrap();
    }
    d.write_desc(0, 0, table, 128 * 16, 4, 0);
    d.publish(0, 0);
    d.kick(0);
    assert_eq!(d.used(0).len(), 1);
    assert_eq!(d.dev.counters().chains_dropped, 1);
}

use vm_memory::Bytes;

#[test]
fn hints_outside_ram_or_misaligned_are_never_delivered() {
    let mut d = ready();
    let mut h = Hints::new(&mut d);
    let id = d.read_cmd_id();
    d.send_cmd(id);
    for (gpa, len) in [
        (10 * MIB, 4096),          // in the hole
        (6 * MIB, 4 * MIB as u32), // runs into the hole
        (32 * MIB, 4096),          // beyond RAM
        (u64::MAX - 4095, 4096),   // wraps
        (4 * MIB + 1, 4096),       // misaligned start
        (4 * MIB, 4095),           // partial page
        (4 * MIB, 0),              // empty
    ] {
        d.send_hint(gpa, len);
    }
    d.send_hint(4 * MIB, 4096);
    d.send_cmd(CMD_ID_STOP);
    assert_eq!(
        h.drain(),
        (1, 0),
        "only the valid page; nothing invalid reached the engine"
    );
    assert_eq!(d.dev.counters().chains_dropped, 7);
}

#[test]
fn reports_outside_ram_or_misaligned_are_not_discarded() {
    let mut d = ready();
    let mut h = Hints::new(&mut d);
    d.fill(24 * MIB, 2 * MIB, 0x44);
    for ranges in [
        vec![(24 * MIB, 2 * MIB as u32), (10 * MIB, 4096)],
        vec![(24 * MIB + 512, 4096)],
        vec![(32 * MIB - 4096, 8192)],
    ] {
        d.report(&ranges);
    }
    assert_eq!(
        d.used(d.queue_index(F_REPORTING)).len(),
        3,
        "all acknowledged"
    );
    assert!(
        d.all(24 * MIB, 2 * MIB, 0x44),
        "a chain with one bad range discards nothing"
    );
    assert_eq!(h.drain(), (0, 0));
    assert_eq!(d.dev.counters().discarded_bytes, 0);
}

#[test]
fn a_runaway_avail_index_needs_a_reset() {
    let mut d = ready();
    let irqs = d.irq.count();
    d.set_avail_idx(0, 1000);
    d.kick(0);
    assert_ne!(d.read(REG_STATUS) & S_NEEDS_RESET, 0);
    assert_eq!(d.irq.count(), irqs + 1);
    assert_eq!(d.ack_interrupt() & 2, 2, "config change notification");
    // Everything else stops until the driver resets the device.
    d.send_pfns(1, &[5]);
    assert_eq!(d.used_idx(1), 0);
    d.probe(ALL, None);
    assert_eq!(d.read(REG_STATUS) & S_NEEDS_RESET, 0);
    let head = d.send_pfns(0, &[5]);
    assert_eq!(d.used(0), vec![(head, 0)]);
}

#[test]
fn rings_outside_ram_need_a_reset() {
    let mut d = Driver::new(BalloonConfig::default());
    d.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    d.write(REG_DRIVER_FEATURES_SEL, 1);
    d.write(REG_DRIVER_FEATURES, 1);
    d.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    d.write(REG_QUEUE_SEL, 0);
    d.write(REG_QUEUE_NUM, 256);
    d.write(REG_QUEUE_DESC_LOW, (10 * MIB) as u32); // the hole
    d.write(REG_QUEUE_AVAIL_LOW, 0x2000);
    d.write(REG_QUEUE_USED_LOW, 0x3000);
    d.write(REG_QUEUE_READY, 1);
    assert_eq!(d.read(REG_QUEUE_READY), 0);
    assert_ne!(d.read(REG_STATUS) & S_NEEDS_RESET, 0);
    // A queue size that is not a power of two.
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(F_VERSION_1, None);
    d.write(REG_STATUS, 0);
    d.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    d.write(REG_DRIVER_FEATURES_SEL, 1);
    d.write(REG_DRIVER_FEATURES, 1);
    d.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    d.write(REG_QUEUE_NUM, 100);
    d.write(REG_QUEUE_DESC_LOW, 0x1_0000);
    d.write(REG_QUEUE_AVAIL_LOW, 0x2_0000);
    d.write(REG_QUEUE_USED_LOW, 0x3_0000);
    d.write(REG_QUEUE_READY, 1);
    assert_ne!(d.read(REG_STATUS) & S_NEEDS_RESET, 0);
}

#[test]
fn feature_negotiation_rejects_bad_driver_features() {
    let mut d = Driver::new(BalloonConfig {
        page_reporting: false,
        ..BalloonConfig::default()
    });
    d.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    // An unoffered feature (reporting) and MUST_TELL_HOST.
    d.write(REG_DRIVER_FEATURES, (F_REPORTING | 1) as u32);
    d.write(REG_DRIVER_FEATURES_SEL, 1);
    d.write(REG_DRIVER_FEATURES, 1);
    d.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    assert_eq!(d.read(REG_STATUS) & S_FEATURES_OK, 0, "refused");
    // A legacy driver (no VERSION_1) is refused too.
    d.write(REG_DRIVER_FEATURES, 0);
    d.write(REG_DRIVER_FEATURES_SEL, 0);
    d.write(REG_DRIVER_FEATURES, F_STATS_VQ as u32);
    d.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    assert_eq!(d.read(REG_STATUS) & S_FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK is ignored; no queue exists yet.
    d.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK);
    assert_eq!(d.read(REG_STATUS) & S_DRIVER_OK, 0);
    d.write(REG_QUEUE_SEL, 0);
    assert_eq!(d.read(REG_QUEUE_NUM_MAX), 0);
    // Features cannot change after FEATURES_OK.
    let mut d = ready();
    d.write(REG_DRIVER_FEATURES_SEL, 0);
    d.write(REG_DRIVER_FEATURES, 0);
    assert_eq!(d.dev.acked_features(), ALL);
}

#[test]
fn read_only_registers_and_fields_ignore_writes() {
    let mut d = ready();
    d.dev.set_target(9);
    for reg in [
        REG_MAGIC,
        REG_VERSION,
        REG_DEVICE_ID,
        REG_DEVICE_FEATURES,
        REG_QUEUE_NUM_MAX,
        REG_INTERRUPT_STATUS,
        REG_CONFIG_GENERATION,
        0x200 - 0x100,
    ] {
        d.write(reg, 0xdead_beef);
    }
    assert_eq!(d.read(REG_MAGIC), 0x7472_6976);
    assert_eq!(d.read(REG_DEVICE_ID), 5);
    // num_pages and cmd_id are read-only to the driver; poison_val is fixed after DRIVER_OK.
    d.write(REG_CONFIG, 1);
    d.write(REG_CONFIG + 8, 0x8000_0005);
    d.write(REG_CONFIG + 12, 0x55);
    assert_eq!(
        (d.read_config(0), d.read_config(8), d.read_config(12)),
        (9, 0, 0)
    );
    // A write straddling actual and cmd_id is refused whole.
    d.dev.mmio_write(REG_CONFIG + 6, &[1, 1, 1, 1]);
    assert_eq!(d.dev.actual(), 0);
    // Byte-wise writes of actual are fine (legacy drivers did that).
    for (i, b) in 0x0102_0304u32.to_le_bytes().iter().enumerate() {
        d.dev.mmio_write(REG_CONFIG + 4 + i as u64, &[*b]);
    }
    assert_eq!(d.dev.actual(), 0x0102_0304);
    // Queue registers of a live queue do not change.
    d.write(REG_QUEUE_SEL, 0);
    d.write(REG_QUEUE_DESC_LOW, 0x5000);
    let head = d.send_pfns(0, &[5]);
    assert_eq!(d.used(0), vec![(head, 0)]);
    // Odd access sizes and offsets.
    let mut b = [0xffu8; 2];
    d.dev.mmio_read(REG_MAGIC, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 8];
    d.dev.mmio_read(REG_CONFIG + 12, &mut b);
    assert_eq!(b, [0; 8], "config read past the end");
    d.dev.mmio_write(REG_STATUS + 1, &[0; 4]);
    d.dev.mmio_write(REG_STATUS, &[0; 3]);
    d.dev.mmio_read(u64::MAX, &mut [0; 4]);
    d.dev.mmio_write(u64::MAX - 1, &[0; 4]);
    assert_ne!(
        d.read(REG_STATUS) & S_DRIVER_OK,
        0,
        "none of that reset the device"
    );
    // Notifies for queues that do not exist.
    d.write(REG_QUEUE_NOTIFY, 7);
    d.write(REG_QUEUE_NOTIFY, u32::MAX);
}

#[test]
fn status_bits_out_of_order_are_ignored_and_the_state_still_restores() {
    let mut d = Driver::new(BalloonConfig::default());
    // DRIVER without ACKNOWLEDGE: the fuzzer's finding, a state the restore refused.
    d.write(REG_STATUS, S_DRIVER);
    assert_eq!(d.read(REG_STATUS), 0);
    d.write(REG_STATUS, S_ACKNOWLEDGE | S_FEATURES_OK);
    assert_eq!(d.read(REG_STATUS), 0, "FEATURES_OK without DRIVER");
    d.write(REG_STATUS, S_ACKNOWLEDGE);
    assert_eq!(d.read(REG_STATUS), S_ACKNOWLEDGE, "in order, accepted");
    d.dev.pause();
    let state = d.dev.save();
    assert!(ferry_balloon::Balloon::restore(
        BalloonConfig::default(),
        d.mem.clone(),
        d.irq.clone(),
        &state
    )
    .is_ok());
}

#[test]
fn a_driver_cannot_clear_status_bits_except_by_reset() {
    let mut d = ready();
    d.write(REG_STATUS, S_ACKNOWLEDGE);
    assert_ne!(d.read(REG_STATUS) & S_DRIVER_OK, 0);
    d.write(REG_STATUS, 0);
    assert_eq!(d.read(REG_STATUS), 0);
    assert_eq!(d.dev.acked_features(), 0);
}

#[test]
fn a_flood_is_bounded_per_notification() {
    let mut d = ready();
    let mut h = Hints::new(&mut d);
    let id = d.read_cmd_id();
    d.send_cmd(id);
    let q = d.queue_index(F_FREE_PAGE_HINT);
    // Fill the whole ring with hints without kicking, then claim more than the ring holds.
    d.used(q);
    let mut n = 0;
    while d.add(q, &[(4 * MIB, 4096, true)]).is_some() {
        n += 1;
    }
    d.kick(q);
    assert_eq!(
        d.used(q).len(),
        n,
        "one pass handles at most a ring's worth"
    );
    // Thousands of rounds of hints: the device keeps up and the inbox bounds memory.
    for _ in 0..5000 {
        d.send_hint(16 * MIB, 4096);
    }
    let (skipped, _) = h.drain();
    assert_eq!(skipped, 2);
    assert_eq!(d.dev.counters().hinted_ranges, n as u64 + 5000);
}

#[test]
fn a_second_stats_buffer_returns_the_first() {
    let mut d = ready();
    let q = d.queue_index(F_STATS_VQ);
    d.send_stats(q, &[(4, 1)]);
    assert_eq!(d.used(q).len(), 1, "the older buffer came back");
    assert!(d.dev.request_stats());
    assert_eq!(d.used(q).len(), 1);
}

#[test]
fn no_buffer_is_consumed_before_driver_ok() {
    let mut d = Driver::new(BalloonConfig::default());
    d.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    d.write(REG_DRIVER_FEATURES_SEL, 1);
    d.write(REG_DRIVER_FEATURES, 1);
    d.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    d.features = F_VERSION_1;
    d.setup_queue(0, 256);
    d.setup_queue(1, 256);
    d.send_pfns(0, &[5]);
    assert_eq!(d.used_idx(0), 0, "not before DRIVER_OK");
    assert_eq!(d.dev.counters().inflated_pages, 0);
    d.write(
        REG_STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    assert_eq!(d.used(0).len(), 1, "taken once the driver is ready");
    assert_eq!(d.dev.counters().inflated_pages, 1);
}

/// A guest that queues inflate chains of scattered pfns (256 chains of 4096 would be a
/// million discards on the vCPU thread) cannot hold up a pause: while the VMM's pause request is
/// set, queue processing stops between two chains and leaves the rest on the ring; resume
/// takes them up, each exactly once.
#[test]
fn a_pause_request_leaves_queued_inflate_work_for_resume() {
    let mut d = ready();
    let request = d.dev.pause_request();
    let base = (16 * MIB / PAGE_SIZE) as u32;
    let chain = |d: &mut Driver, n: u32| {
        // Every other page of the 16 MiB region: nothing coalesces, one discard per pfn.
        let pfns: Vec<u32> = (0..512).map(|i| base + 2 * (512 * n + i)).collect();
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        let addr = d.buf(&bytes);
        d.add(0, &[(addr, bytes.len() as u32, false)]).unwrap()
    };
    // Two chains handled normally.
    chain(&mut d, 0);
    chain(&mut d, 1);
    d.kick(0);
    assert_eq!(d.used(0).len(), 2);
    // Two more, notified while a pause is requested: none is taken.
    let heads = [chain(&mut d, 2), chain(&mut d, 3)];
    request.store(true, std::sync::atomic::Ordering::Release);
    d.kick(0);
    assert!(
        d.used(0).is_empty(),
        "a chain was handled during the pause request"
    );
    assert_eq!(d.dev.counters().inflated_pages, 2 * 512);
    d.dev.pause();
    request.store(false, std::sync::atomic::Ordering::Release);
    d.dev.resume();
    let used: Vec<u16> = d.used(0).iter().map(|u| u.0).collect();
    assert_eq!(
        used, heads,
        "resume handles the chains left on the ring, in order"
    );
    assert_eq!(d.dev.counters().inflated_pages, 4 * 512);
    assert_eq!(d.dev.counters().chains_dropped, 0);
}
