//! The `balloon_queue` fuzz harness, shared by the cargo-fuzz target (`fuzz/`) and by
//! `tests/replay.rs`, which runs it on stable in every `cargo test`.
//!
//! The input is a guest memory image (rings and buffers) plus a stream of driver and VMM
//! operations on a negotiated device. Properties checked beyond "no panic": no hint outside
//! guest RAM reaches the engine, and a saved state always restores.
#![allow(dead_code)]

use std::sync::Arc;

use ferry_balloon::{Balloon, BalloonConfig, GuestMemory, IrqTrigger, MmioDevice};
use ferry_migration::hint::HintTargets;
use ferry_migration::{Epoch, HintInbox, HintSource, MemoryLayout, Outcome, PageBitmap};
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM: [0, 256 KiB) and [512 KiB, 768 KiB), on one memfd.
const RAM: [(u64, u64); 2] = [(0, 0x4_0000), (0x8_0000, 0x4_0000)];
/// Most bytes of the input copied to guest address 0 (rings, then buffers).
const IMAGE_LEN: usize = 0x1_0000;
/// Queue `q`'s rings: descriptors at `RING_STRIDE * q`, avail at +0x100, used at +0x200.
const RING_STRIDE: u64 = 0x400;
const QUEUE_SIZE: u32 = 16;

struct NoIrq;

impl IrqTrigger for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn memory() -> GuestMemory {
    ferry_balloon::memfd_guest_memory("fuzz", &RAM).unwrap().0
}

fn write(dev: &mut Balloon, off: u64, v: u32) {
    dev.mmio_write(off, &v.to_le_bytes());
}

/// Linux-like negotiation of `features`; all rings are in the first 5 KiB.
fn negotiate(dev: &mut Balloon, features: u64) {
    write(dev, 0x70, 0);
    write(dev, 0x70, 1);
    write(dev, 0x70, 3);
    write(dev, 0x24, 0);
    write(dev, 0x20, features as u32);
    write(dev, 0x24, 1);
    write(dev, 0x20, (features >> 32) as u32);
    write(dev, 0x70, 11);
    for q in 0..5u32 {
        let base = RING_STRIDE * u64::from(q);
        write(dev, 0x30, q);
        write(dev, 0x38, QUEUE_SIZE);
        write(dev, 0x80, base as u32);
        write(dev, 0x90, (base + 0x100) as u32);
        write(dev, 0xa0, (base + 0x200) as u32);
        write(dev, 0x44, 1);
    }
    write(dev, 0x70, 15);
}

/// What one run did, for tests that check the seeds reach deep.
#[derive(Debug, Default)]
pub struct Summary {
    /// Pages the engine removed from its to-send set.
    pub pages_skipped: u64,
    /// The device's counters at the end (summed over save/restore).
    pub counters: ferry_balloon::BalloonCounters,
}

/// Runs one input: `[config, features, op count, ops (4 bytes each)..., memory image...]`.
pub fn run(data: &[u8]) -> Summary {
    let mut summary = Summary::default();
    // [config, features, op count, ops (4 bytes each)..., guest memory image...]
    if data.len() < 3 {
        return summary;
    }
    let (head, rest) = data.split_at(3);
    let (ops, image) = rest.split_at(rest.len().min(4 * usize::from(head[2])));
    let image = &image[..image.len().min(IMAGE_LEN)];
    let mem = memory();
    mem.write_slice(image, GuestAddress(0)).unwrap();
    let config = BalloonConfig {
        discard_inhibited: head[0] & 1 != 0,
        ..BalloonConfig::default()
    };
    let irq: Arc<dyn IrqTrigger> = Arc::new(NoIrq);
    let mut dev = Balloon::new(config, mem.clone(), irq.clone());
    negotiate(&mut dev, (1 << 32) | u64::from(head[1] & 0x3e));

    let layout = MemoryLayout::from_guest_memory(&mem).unwrap();
    let mut inbox = HintInbox::new();
    let mut hint = dev.hint_source();
    let mut report = dev.report_source();
    hint.start(inbox.register("balloon-hint", hint.kind()));
    report.start(inbox.register("balloon-report", report.kind()));
    let pages = layout.pages();
    let (mut to_send, dest, mut kz) = (
        PageBitmap::full(pages),
        PageBitmap::new(pages),
        PageBitmap::new(pages),
    );
    let mut epoch: Option<u64> = None;
    let mut next_epoch = 0;

    for op in ops.chunks_exact(4) {
        let arg = u16::from_le_bytes([op[2], op[3]]);
        match op[0] % 10 {
            0..=2 => dev.process_queue(u16::from(op[1] % 6)),
            3 => write(
                &mut dev,
                u64::from(op[1]) * 4 % 0x120,
                u32::from(arg) << (op[1] & 16),
            ),
            4 => {
                let mut b = [0u8; 4];
                dev.mmio_read(
                    u64::from(op[1]) % 0x120,
                    &mut b[..usize::from(op[2] % 4) + 1],
                );
            }
            5 => match epoch.take() {
                Some(e) => {
                    inbox.close();
                    hint.epoch_end(Epoch(e));
                    report.epoch_end(Epoch(e));
                }
                None => {
                    inbox.open(Epoch(next_epoch));
                    hint.epoch_begin(Epoch(next_epoch));
                    report.epoch_begin(Epoch(next_epoch));
                    epoch = Some(next_epoch);
                    next_epoch += 1;
                }
            },
            6 => {
                dev.request_stats();
                dev.set_target(u32::from(arg));
            }
            7 => {
                if dev.is_paused() {
                    dev.resume();
                } else {
                    dev.pause();
                }
            }
            8 => {
                add(&mut summary.counters, dev.counters());
                let state = dev.save();
                let paused = dev.is_paused();
                dev = Balloon::restore(config, mem.clone(), irq.clone(), &state)
                    .expect("a saved state restores");
                if !paused {
                    dev.resume();
                }
                hint = dev.hint_source();
                report = dev.report_source();
                hint.start(inbox.register("balloon-hint", hint.kind()));
                report.start(inbox.register("balloon-report", report.kind()));
                if let Some(e) = epoch {
                    hint.epoch_begin(Epoch(e));
                    report.epoch_begin(Epoch(e));
                }
            }
            _ => {
                // The guest changes its memory under the device's feet (e.g. avail idx).
                let at = u64::from(arg) % (5 * RING_STRIDE);
                let _ = mem.write_slice(&op[1..2], GuestAddress(at));
            }
        }
        let mut t = HintTargets {
            to_send: &mut to_send,
            dest_nonzero: &dest,
            known_zero: &mut kz,
            audit: None,
        };
        summary.pages_skipped += inbox.drain(&layout, &mut t, u64::MAX).pages_skipped;
    }
    hint.finish(Outcome::Cancelled);
    report.finish(Outcome::Cancelled);
    for s in inbox.stats() {
        assert_eq!(s.ranges_invalid, 0, "{} hinted outside guest RAM", s.name);
    }
    add(&mut summary.counters, dev.counters());
    summary
}

fn add(acc: &mut ferry_balloon::BalloonCounters, c: &ferry_balloon::BalloonCounters) {
    acc.inflated_pages += c.inflated_pages;
    acc.deflated_pages += c.deflated_pages;
    acc.hinted_ranges += c.hinted_ranges;
    acc.hints_ignored += c.hints_ignored;
    acc.reported_ranges += c.reported_ranges;
    acc.discarded_bytes += c.discarded_bytes;
    acc.chains_dropped += c.chains_dropped;
    acc.needs_reset += c.needs_reset;
}
