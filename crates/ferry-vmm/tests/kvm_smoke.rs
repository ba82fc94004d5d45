//! KVM plumbing without Linux: a few real-mode instructions that count on an I/O port, run on
//! ferry's vCPU threads. Checks that pause really stops guest execution, that a paused vCPU's
//! state can be saved, that resume continues, and that the dirty log sees guest writes.
//! Runs wherever /dev/kvm opens, PVM included (the guest is tiny); skipped where it does not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_migration::{DirtyLog, PageBitmap};
use ferry_vmm::bus::{Bus, BusDevice};
use ferry_vmm::kvm::state::{saveable_msrs, VmState};
use ferry_vmm::kvm::vcpu::{self, VcpuContext, VcpuControl, Vcpus};
use ferry_vmm::kvm::vm::KvmVm;
use ferry_vmm::memory::{register_slots, GuestRam, KvmDirtyLog};
use vm_memory::{Bytes, GuestAddress};

const CODE: u64 = 0x1000;
const COUNTER_PORT: u16 = 0x80;
const WAIT: Duration = Duration::from_secs(120);

/// Counts writes to its port.
struct Counter(Arc<AtomicU64>);

impl BusDevice for Counter {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pause_stops_the_guest_and_state_saves() {
    let kvm_path = std::path::Path::new("/dev/kvm");
    let vm = match KvmVm::new(kvm_path) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("skipped: no usable KVM here ({e})");
            return;
        }
    };
    let ram = GuestRam::new(&[(0, 2 << 20)]).unwrap();
    register_slots(vm.fd(), &ram.slots(), false).unwrap();
    // 16-bit: inc word [0x3000]; out 0x80, al; jmp back.
    let code: [u8; 8] = [0xff, 0x06, 0x00, 0x30, 0xe6, COUNTER_PORT as u8, 0xeb, 0xf8];
    ram.memory().write_slice(&code, GuestAddress(CODE)).unwrap();

    let fd = vm
        .create_vcpu(0, 1, ferry_vmm::kvm::cpuid::CpuOptions::default())
        .unwrap();
    let mut sregs = fd.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    fd.set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: CODE,
        rflags: 2,
        ..Default::default()
    };
    fd.set_regs(&regs).unwrap();

    let count = Arc::new(AtomicU64::new(0));
    let mut pio = Bus::new();
    pio.insert(
        u64::from(COUNTER_PORT),
        1,
        Arc::new(Mutex::new(Counter(count.clone()))),
    )
    .unwrap();
    let control = Arc::new(VcpuControl::default());
    let ctx = VcpuContext {
        pio: Arc::new(pio),
        mmio: Arc::new(Bus::new()),
        control: control.clone(),
        msr_indices: Arc::new(saveable_msrs(vm.kvm(), &fd).unwrap()),
    };
    vcpu::install_kick_handler().unwrap();
    let mut dirty = KvmDirtyLog::new(vm.fd().clone(), ram.clone());
    dirty.start().unwrap();
    if dirty.arms_lazily() {
        // Manual protection, every page initially dirty: arm them all (KVM_CLEAR_DIRTY_LOG),
        // as the bulk round does before reading, so only writes from now on are reported.
        let layout = ram.layout();
        let words = vec![u64::MAX; layout.pages().div_ceil(64) as usize];
        dirty.arm(&layout, 0, &words).unwrap();
    }
    let mut vcpus = Vcpus::new(vec![vcpu::spawn(0, fd, ctx).unwrap()], control.clone());

    wait_until("the guest to run", || count.load(Ordering::SeqCst) >= 3);
    vcpus.pause().unwrap();
    let frozen = count.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        count.load(Ordering::SeqCst),
        frozen,
        "guest ran while paused"
    );

    let states = vcpus.save_state().unwrap();
    let rip = states[0].regs.rip;
    assert!(
        (CODE..CODE + code.len() as u64).contains(&rip),
        "rip {rip:#x}"
    );
    let vm_state = VmState::save(vm.fd()).unwrap();
    let json = serde_json::to_string(&vm_state).unwrap();
    assert!(json.len() > 100);
    // The guest's increments of [0x3000] are in KVM's dirty log (page 3), the code page is not.
    let layout = ram.layout();
    let mut bits = PageBitmap::new(layout.pages());
    dirty.fetch_and_clear(&layout, &mut bits).unwrap();
    assert!(bits.get(3), "guest write not in the dirty log");
    assert!(!bits.get(1), "code page reported dirty");
    let in_memory: u16 = ram.memory().read_obj(GuestAddress(0x3000)).unwrap();
    assert!(u64::from(in_memory) >= frozen.min(u64::from(u16::MAX)) - 1);

    vcpus.resume();
    wait_until("the guest to run again", || {
        count.load(Ordering::SeqCst) > frozen + 2
    });
    dirty.stop();
    vcpus.stop();
}
