//! A scripted virtio-balloon driver for tests: the register sequence of Linux's
//! virtio_mmio.c and the queue usage of virtio_balloon.c (6.1), over real split virtqueues
//! in memfd-backed guest memory. It also exposes raw ring access for adversarial tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ferry_balloon::{Balloon, BalloonConfig, GuestMemory, IrqTrigger, MmioDevice};
use vm_memory::{Bytes, GuestAddress};

pub const MIB: u64 = 1 << 20;
/// Guest RAM: [0, 8 MiB) and [16 MiB, 32 MiB), with a hole between.
pub const RAM: [(u64, u64); 2] = [(0, 8 * MIB), (16 * MIB, 16 * MIB)];
/// Linux hints MAX_ORDER-1 blocks: 4 MiB on x86-64.
pub const HINT_BLOCK: u64 = 4 * MIB;
/// Where the driver's data buffers go.
const SCRATCH: (u64, u64) = (0x10_0000, 0x40_0000);

pub const REG_MAGIC: u64 = 0x00;
pub const REG_VERSION: u64 = 0x04;
pub const REG_DEVICE_ID: u64 = 0x08;
pub const REG_DEVICE_FEATURES: u64 = 0x10;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
pub const REG_DRIVER_FEATURES: u64 = 0x20;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
pub const REG_QUEUE_SEL: u64 = 0x30;
pub const REG_QUEUE_NUM_MAX: u64 = 0x34;
pub const REG_QUEUE_NUM: u64 = 0x38;
pub const REG_QUEUE_READY: u64 = 0x44;
pub const REG_QUEUE_NOTIFY: u64 = 0x50;
pub const REG_INTERRUPT_STATUS: u64 = 0x60;
pub const REG_INTERRUPT_ACK: u64 = 0x64;
pub const REG_STATUS: u64 = 0x70;
pub const REG_QUEUE_DESC_LOW: u64 = 0x80;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x84;
pub const REG_QUEUE_AVAIL_LOW: u64 = 0x90;
pub const REG_QUEUE_AVAIL_HIGH: u64 = 0x94;
pub const REG_QUEUE_USED_LOW: u64 = 0xa0;
pub const REG_QUEUE_USED_HIGH: u64 = 0xa4;
pub const REG_CONFIG_GENERATION: u64 = 0xfc;
pub const REG_CONFIG: u64 = 0x100;

pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 64;

pub const F_STATS_VQ: u64 = 1 << 1;
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const F_FREE_PAGE_HINT: u64 = 1 << 3;
pub const F_PAGE_POISON: u64 = 1 << 4;
pub const F_REPORTING: u64 = 1 << 5;
pub const F_VERSION_1: u64 = 1 << 32;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// Counts interrupts.
#[derive(Debug, Default)]
pub struct TestIrq(AtomicU64);

impl IrqTrigger for TestIrq {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl TestIrq {
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Guest RAM on one memfd, like the VMM's.
pub fn memfd_memory() -> (GuestMemory, File) {
    ferry_balloon::memfd_guest_memory("balloon-test", &RAM).unwrap()
}

/// The driver's view of one split virtqueue.
#[derive(Debug, Clone)]
pub struct Vq {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

impl Vq {
    fn new(index: usize, size: u16) -> Self {
        let desc = 0x1_0000 * (index as u64 + 1);
        Self {
            size,
            desc,
            avail: desc + 16 * u64::from(size),
            used: desc + 0x8000,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
        }
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }
}

/// One buffer of a chain: address, length, device-writable.
pub type Buf = (u64, u32, bool);

pub struct Driver {
    pub dev: Balloon,
    pub mem: GuestMemory,
    pub file: File,
    pub irq: Arc<TestIrq>,
    pub vqs: Vec<Vq>,
    pub features: u64,
    scratch_next: u64,
    /// The last command id read from the config space, and the round being sent.
    pub cmd_id_received: u32,
    pub cmd_id_active: u32,
}

impl Driver {
    pub fn new(config: BalloonConfig) -> Self {
        let (mem, file) = memfd_memory();
        let irq = Arc::new(TestIrq::default());
        let dev = Balloon::new(config, mem.clone(), irq.clone());
        Self::with_device(dev, mem, file, irq)
    }

    pub fn with_device(dev: Balloon, mem: GuestMemory, file: File, irq: Arc<TestIrq>) -> Self {
        Self {
            dev,
            mem,
            file,
            irq,
            vqs: Vec::new(),
            features: 0,
            scratch_next: SCRATCH.0,
            cmd_id_received: 0,
            cmd_id_active: 0,
        }
    }

    pub fn read(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write(&mut self, off: u64, v: u32) {
        self.dev.mmio_write(off, &v.to_le_bytes());
    }

    pub fn read_config(&mut self, field: u64) -> u32 {
        self.read(REG_CONFIG + field)
    }

    /// Linux's virtio_mmio probe plus virtio_dev_probe and virtballoon_probe, accepting the
    /// offered features in `accept`. Returns the negotiated features.
    pub fn probe(&mut self, accept: u64, poison_val: Option<u32>) -> u64 {
        assert_eq!(self.read(REG_MAGIC), 0x7472_6976);
        assert_eq!(self.read(REG_VERSION), 2);
        assert_eq!(self.read(REG_DEVICE_ID), 5);
        self.write(REG_STATUS, 0);
        self.write(REG_STATUS, S_ACKNOWLEDGE);
        self.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        let mut offered = u64::from(self.read(REG_DEVICE_FEATURES)) << 32;
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        offered |= u64::from(self.read(REG_DEVICE_FEATURES));
        let features = offered & accept;
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (features >> 32) as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, features as u32);
        self.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_ne!(self.read(REG_STATUS) & S_FEATURES_OK, 0, "features refused");
        self.features = features;
        let queues = 2 + [F_STATS_VQ, F_FREE_PAGE_HINT, F_REPORTING]
            .iter()
            .filter(|&&f| features & f != 0)
            .count();
        self.vqs.clear();
        for i in 0..queues {
            self.setup_queue(i, 256);
        }
        // init_vqs: the stats queue gets its first (initialised) buffer and a kick, before
        // DRIVER_OK.
        if features & F_STATS_VQ != 0 {
            let q = self.queue_index(F_STATS_VQ);
            self.send_stats(q, &[(4, 123 << 20), (5, 512 << 20)]);
        }
        if let Some(p) = poison_val.filter(|_| features & F_PAGE_POISON != 0) {
            self.write(REG_CONFIG + 12, p);
        }
        self.write(
            REG_STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        features
    }

    /// vm_setup_vq.
    pub fn setup_queue(&mut self, index: usize, size: u16) {
        self.write(REG_QUEUE_SEL, index as u32);
        assert_eq!(self.read(REG_QUEUE_READY), 0);
        let max = self.read(REG_QUEUE_NUM_MAX);
        assert!(max >= u32::from(size), "queue {index} max {max}");
        let vq = Vq::new(index, size);
        self.write(REG_QUEUE_NUM, u32::from(size));
        self.write(REG_QUEUE_DESC_LOW, vq.desc as u32);
        self.write(REG_QUEUE_DESC_HIGH, (vq.desc >> 32) as u32);
        self.write(REG_QUEUE_AVAIL_LOW, vq.avail as u32);
        self.write(REG_QUEUE_AVAIL_HIGH, (vq.avail >> 32) as u32);
        self.write(REG_QUEUE_USED_LOW, vq.used as u32);
        self.write(REG_QUEUE_USED_HIGH, (vq.used >> 32) as u32);
        self.write(REG_QUEUE_READY, 1);
        if self.vqs.len() <= index {
            self.vqs.resize(index + 1, vq.clone());
        }
        self.vqs[index] = vq;
    }

    /// The queue index for an optional feature's queue.
    pub fn queue_index(&self, feature: u64) -> usize {
        2 + [F_STATS_VQ, F_FREE_PAGE_HINT, F_REPORTING]
            .iter()
            .take_while(|&&f| f != feature)
            .filter(|&&f| self.features & f != 0)
            .count()
    }

    /// Copies `data` into a fresh scratch buffer.
    pub fn buf(&mut self, data: &[u8]) -> u64 {
        let addr = self.scratch_next;
        let len = (data.len() as u64).max(1).next_multiple_of(16);
        if addr + len > SCRATCH.1 {
            self.scratch_next = SCRATCH.0;
            return self.buf(data);
        }
        self.scratch_next += len;
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        addr
    }

    /// Writes a raw descriptor.
    pub fn write_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.vqs[q].desc + 16 * u64::from(i);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, GuestAddress(at)).unwrap();
    }

    /// Puts `head` in the avail ring and publishes it (no notification).
    pub fn publish(&mut self, q: usize, head: u16) {
        let vq = &mut self.vqs[q];
        let slot = vq.avail + 4 + 2 * u64::from(vq.avail_idx % vq.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        vq.avail_idx = vq.avail_idx.wrapping_add(1);
        let idx = vq.avail_idx;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(vq.avail + 2))
            .unwrap();
    }

    /// Sets the avail ring's idx directly (adversarial).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        let vq = &mut self.vqs[q];
        vq.avail_idx = idx;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(vq.avail + 2))
            .unwrap();
    }

    /// Sets the avail ring's flags (e.g. VRING_AVAIL_F_NO_INTERRUPT).
    pub fn set_avail_flags(&mut self, q: usize, flags: u16) {
        let at = self.vqs[q].avail;
        self.mem.write_obj(flags.to_le(), GuestAddress(at)).unwrap();
    }

    /// virtqueue_add: one chain of `bufs`, returns its head, or `None` if the ring is full.
    pub fn add(&mut self, q: usize, bufs: &[Buf]) -> Option<u16> {
        if self.vqs[q].free.len() < bufs.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len())
            .map(|_| self.vqs[q].free.pop().unwrap())
            .collect();
        for (n, (&(addr, len, writable), &id)) in bufs.iter().zip(&ids).enumerate() {
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            let next = ids.get(n + 1).copied().unwrap_or(0);
            if n + 1 < ids.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(q, id, addr, len, flags, next);
        }
        let head = ids[0];
        self.vqs[q].chains.insert(head, ids);
        self.publish(q, head);
        Some(head)
    }

    pub fn kick(&mut self, q: usize) {
        self.write(REG_QUEUE_NOTIFY, q as u32);
    }

    /// virtqueue_get_buf until empty: `(head, len)` of every used buffer.
    pub fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let vq = &mut self.vqs[q];
        let idx: u16 = u16::from_le(self.mem.read_obj(GuestAddress(vq.used + 2)).unwrap());
        let mut out = Vec::new();
        while vq.last_used != idx {
            let at = vq.used + 4 + 8 * u64::from(vq.last_used % vq.size);
            let id: u32 = u32::from_le(self.mem.read_obj(GuestAddress(at)).unwrap());
            let len: u32 = u32::from_le(self.mem.read_obj(GuestAddress(at + 4)).unwrap());
            let head = id as u16;
            if let Some(ids) = vq.chains.remove(&head) {
                vq.free.extend(ids);
            }
            out.push((head, len));
            vq.last_used = vq.last_used.wrapping_add(1);
        }
        out
    }

    /// The used ring's idx as the device wrote it.
    pub fn used_idx(&self, q: usize) -> u16 {
        u16::from_le(
            self.mem
                .read_obj(GuestAddress(self.vqs[q].used + 2))
                .unwrap(),
        )
    }

    /// Reads and acknowledges the interrupt status (vm_interrupt).
    pub fn ack_interrupt(&mut self) -> u32 {
        let s = self.read(REG_INTERRUPT_STATUS);
        self.write(REG_INTERRUPT_ACK, s);
        s
    }

    /// An inflate or deflate request: one outbuf of le32 pfns (fill_balloon/leak_balloon).
    pub fn send_pfns(&mut self, q: usize, pfns: &[u32]) -> u16 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        let addr = self.buf(&bytes);
        let head = self.add(q, &[(addr, bytes.len() as u32, false)]).unwrap();
        self.kick(q);
        head
    }

    /// update_balloon_stats + stats_handle_request: one outbuf of tag/value pairs.
    pub fn send_stats(&mut self, q: usize, stats: &[(u16, u64)]) -> u16 {
        let bytes: Vec<u8> = stats
            .iter()
            .flat_map(|&(t, v)| ferry_balloon::stats::encode_stat(t, v))
            .collect();
        let addr = self.buf(&bytes);
        let head = self.add(q, &[(addr, bytes.len() as u32, false)]).unwrap();
        self.kick(q);
        head
    }

    /// A 4-byte command outbuf on the free page queue (send_cmd_id_start/stop).
    pub fn send_cmd(&mut self, cmd: u32) {
        let q = self.queue_index(F_FREE_PAGE_HINT);
        self.used(q);
        let addr = self.buf(&cmd.to_le_bytes());
        self.add(q, &[(addr, 4, false)]).unwrap();
        self.kick(q);
    }

    /// One hinted block as an inbuf (get_free_page_and_send); respects the reserved slot.
    pub fn send_hint(&mut self, gpa: u64, len: u32) -> bool {
        let q = self.queue_index(F_FREE_PAGE_HINT);
        self.used(q);
        if self.vqs[q].num_free() <= 1 {
            return false;
        }
        self.add(q, &[(gpa, len, true)]).unwrap();
        self.kick(q);
        true
    }

    /// virtio_balloon_cmd_id_received after a config interrupt.
    pub fn read_cmd_id(&mut self) -> u32 {
        self.cmd_id_received = self.read_config(8);
        self.cmd_id_received
    }

    /// report_free_page_func: if a new id is in the config space, run a full round over
    /// `blocks`: start outbuf, one inbuf per block while the id stays current, STOP outbuf.
    /// Returns the number of blocks sent.
    pub fn hint_round(&mut self, blocks: &[u64]) -> usize {
        let id = self.read_cmd_id();
        if id == 0 || id == 1 || id == self.cmd_id_active {
            return 0;
        }
        self.cmd_id_active = id;
        self.send_cmd(id);
        let mut sent = 0;
        for &b in blocks {
            if self.read_cmd_id() != self.cmd_id_active {
                break;
            }
            if self.send_hint(b, HINT_BLOCK as u32) {
                sent += 1;
            }
        }
        self.send_cmd(0);
        sent
    }

    /// A free page report: one chain with an inbuf per range (virtballoon_free_page_report).
    pub fn report(&mut self, ranges: &[(u64, u32)]) -> u16 {
        let q = self.queue_index(F_REPORTING);
        let bufs: Vec<Buf> = ranges.iter().map(|&(a, l)| (a, l, true)).collect();
        let head = self.add(q, &bufs).unwrap();
        self.kick(q);
        head
    }

    /// Fills `[gpa, gpa + len)` with `byte`.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len as usize], GuestAddress(gpa))
            .unwrap();
    }

    /// Whether `[gpa, gpa + len)` reads as all `byte`.
    pub fn all(&self, gpa: u64, len: u64, byte: u8) -> bool {
        let mut v = vec![0u8; len as usize];
        self.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v.iter().all(|&b| b == byte)
    }

    /// File offset of `gpa` in the memfd.
    pub fn file_offset(gpa: u64) -> u64 {
        let mut off = 0;
        for (start, len) in RAM {
            if gpa >= start && gpa < start + len {
                return off + gpa - start;
            }
            off += len;
        }
        panic!("{gpa:#x} is not RAM");
    }

    /// Whether the memfd has a hole covering `[gpa, gpa + len)` (SEEK_DATA skips it).
    pub fn is_hole(&self, gpa: u64, len: u64) -> bool {
        use rustix::fs::{seek, SeekFrom};
        let off = Self::file_offset(gpa);
        match seek(&self.file, SeekFrom::Data(off)) {
            Ok(data) => data >= off + len,
            Err(_) => true, // ENXIO: no data after off
        }
    }
}
