//! Free page reports and statistics from a driver as strict as Linux 6.1's split ring
//! (`virtqueue_get_buf_ctx_split` breaks the queue on a used id that is not an outstanding
//! head), with the VMM pausing, or saving and restoring the device into a copy of guest RAM,
//! between any two steps of the driver. The driver only sees interrupts raised once the VM
//! runs again: a VMM creates the restored device before it restores the irqchip, so a line
//! raised during `Balloon::restore` reaches an interrupt controller whose state is then
//! overwritten.

mod driver;

use std::sync::Arc;

use driver::*;
use ferry_balloon::{Balloon, BalloonConfig, GuestMemory};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const FEATURES: u64 = F_VERSION_1 | F_STATS_VQ | F_FREE_PAGE_HINT | F_REPORTING;
const ROUNDS: u64 = 16;
/// Driver steps per round (add, kick, host stats request, two interrupt windows).
const STEPS: usize = 5;

/// The driver's view of one queue: heads it made available and the next used entry.
#[derive(Default)]
struct Ring {
    outstanding: Vec<u16>,
    last_used: u16,
}

/// Linux's `virtqueue_get_buf` for queue `q`, panicking where Linux would call BAD_RING.
fn get_buf(d: &mut Driver, q: usize, ring: &mut Ring) -> Option<u16> {
    let vq = d.vqs[q].clone();
    let idx = d.used_idx(q);
    if idx == ring.last_used {
        return None;
    }
    assert!(
        idx.wrapping_sub(ring.last_used) <= vq.size,
        "queue {q}: used idx {idx} ran ahead of {}",
        ring.last_used
    );
    let at = vq.used + 4 + 8 * u64::from(ring.last_used % vq.size);
    let id: u32 = u32::from_le(d.mem.read_obj(GuestAddress(at)).unwrap());
    let pos = ring
        .outstanding
        .iter()
        .position(|&h| u32::from(h) == id)
        .unwrap_or_else(|| panic!("queue {q}: id {id} is not a head ({:?})", ring.outstanding));
    ring.outstanding.remove(pos);
    ring.last_used = ring.last_used.wrapping_add(1);
    // The harness frees the chain's descriptors; it must see the same single entry.
    assert_eq!(d.used(q), vec![(id as u16, 0)]);
    Some(id as u16)
}

fn copy_ram(src: &GuestMemory, dst: &GuestMemory) {
    for r in src.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        src.read_slice(&mut buf, r.start_addr()).unwrap();
        dst.write_slice(&buf, r.start_addr()).unwrap();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Pause, ask for statistics while paused, resume.
    PauseResume,
    /// Pause, save, restore into a copy of RAM, resume (the old device is dropped).
    SaveRestore,
}

/// Runs `ROUNDS` free page reports (and statistics refreshes) with `stop` before driver
/// step `at`; returns the number of reports the device acknowledged.
fn run(at: usize, stop: Stop) -> u64 {
    let mut d = Driver::new(BalloonConfig::default());
    d.probe(FEATURES, None);
    let (rq, sq) = (d.queue_index(F_REPORTING), d.queue_index(F_STATS_VQ));
    let mut reports = Ring::default();
    // init_vqs made the first stats buffer available; the device holds it.
    let mut stats = Ring {
        outstanding: vec![0],
        last_used: 0,
    };
    let mut irqs_seen = d.irq.count();
    let mut refill_stats = false;
    let mut acknowledged = 0;
    for round in 0..ROUNDS {
        // page_reporting_cycle: up to PAGE_REPORTING_CAPACITY (32) 2 MiB blocks.
        let report: Vec<Buf> = (0..1 + (round * 7) % 32)
            .map(|i| {
                (
                    16 * MIB + (i * 2 * MIB) % (16 * MIB),
                    (2 * MIB) as u32,
                    true,
                )
            })
            .collect();
        for step in 0..STEPS {
            if round as usize * STEPS + step == at {
                d.dev.pause();
                match stop {
                    Stop::PauseResume => {
                        d.dev.request_stats();
                    }
                    Stop::SaveRestore => {
                        let state = d.dev.save();
                        let (mem, file) = memfd_memory();
                        copy_ram(&d.mem, &mem);
                        let irq = Arc::new(TestIrq::default());
                        let dev = Balloon::restore(
                            BalloonConfig::default(),
                            mem.clone(),
                            irq.clone(),
                            &state,
                        )
                        .unwrap();
                        let (vqs, features) = (d.vqs.clone(), d.features);
                        d = Driver::with_device(dev, mem, file, irq);
                        d.vqs = vqs;
                        d.features = features;
                    }
                }
                // Whatever was raised until now went into an irqchip that the VMM has not
                // restored yet (or that the paused guest sees anyway on the source).
                if stop == Stop::SaveRestore {
                    irqs_seen = d.irq.count();
                }
                d.dev.resume();
            }
            match step {
                // virtballoon_free_page_report: add the chain, kick, wait for an interrupt.
                0 if reports.outstanding.is_empty() => {
                    let head = d.add(rq, &report).expect("an empty queue has room");
                    reports.outstanding.push(head);
                }
                1 => d.kick(rq),
                2 if round % 3 == 0 => {
                    d.dev.request_stats();
                }
                3 | 4 => {
                    // vm_interrupt: read and ack the status, then every queue's callback.
                    if d.irq.count() != irqs_seen {
                        irqs_seen = d.irq.count();
                        d.ack_interrupt();
                        refill_stats |= get_buf(&mut d, sq, &mut stats).is_some();
                        if get_buf(&mut d, rq, &mut reports).is_some() {
                            acknowledged += 1;
                        }
                    }
                    if step == 4 && std::mem::take(&mut refill_stats) {
                        // stats_handle_request: a fresh buffer and a kick.
                        let head = d.send_stats(sq, &[(4, round)]);
                        stats.outstanding.push(head);
                    }
                }
                _ => {}
            }
        }
    }
    acknowledged
}

#[test]
fn reports_go_on_across_a_pause_at_any_step() {
    for at in 0..ROUNDS as usize * STEPS {
        let n = run(at, Stop::PauseResume);
        assert!(
            n + 1 >= ROUNDS,
            "pause before step {at}: {n} reports acknowledged"
        );
    }
}

#[test]
fn reports_go_on_across_a_save_and_restore_at_any_step() {
    for at in 0..ROUNDS as usize * STEPS {
        let n = run(at, Stop::SaveRestore);
        assert!(
            n + 1 >= ROUNDS,
            "restore before step {at}: {n} reports acknowledged (the driver waits for an \
             interrupt the device raised before the VM's irqchip was restored)"
        );
    }
}
