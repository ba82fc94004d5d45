//! Golden-file tests of the machine state format (`src/state_format.rs`): a fixed machine
//! state must encode to exactly the bytes in `tests/golden/machine-state-v2.bin`, and those
//! bytes, and version 1's JSON ones (`machine-state-v1.bin`, written by ferry before version
//! 2), must decode to it. A failure means the format changed: bump `FORMAT_VERSION` (or
//! `MACHINE_STATE_VERSION`) if old states can no longer be read, then regenerate the current
//! version's files with `FERRY_UPDATE_GOLDEN=1 cargo test -p ferry-vmm --test state_format`
//! (version 1's are never rewritten).

use std::path::PathBuf;

use ferry_balloon::hinting::HintRoundState;
use ferry_balloon::{BalloonState, QueueSnapshot};
use ferry_migration::RegionDesc;
use ferry_vmm::kvm::state::{VcpuState, VmState};
use ferry_vmm::serial::SerialSnapshot;
use ferry_vmm::state_format::{
    self, StateFormatError, FORMAT_VERSION, FORMAT_VERSION_JSON, HEADER_BYTES, MAGIC,
};
use ferry_vmm::MachineState;
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn vcpu(id: u8) -> VcpuState {
    let mut xsave = kvm_xsave::default();
    xsave.region[0] = 0x037f; // FCW after FNINIT
    xsave.region[6] = 0x1f80; // MXCSR
    let mut lapic = kvm_lapic_state::default();
    lapic.regs[0x20] = id as std::os::raw::c_char; // APIC ID register (bits 24..31)
    VcpuState {
        id,
        cpuid: vec![kvm_cpuid_entry2 {
            function: 1,
            eax: 0x00a0_0f11,
            ebx: u32::from(id) << 24,
            ecx: 0x8000_0000 | (1 << 24),
            edx: 0x078b_fbff,
            ..Default::default()
        }],
        mp_state: kvm_mp_state { mp_state: 0 },
        regs: kvm_regs {
            rip: 0xffff_ffff_8100_0000 + u64::from(id),
            rsp: 0xffff_c900_0000_3f00,
            rflags: 0x246,
            ..Default::default()
        },
        sregs: kvm_sregs {
            cr0: 0x8005_0033,
            cr3: 0x0100_0000,
            cr4: 0x0000_06f0,
            efer: 0xd01,
            apic_base: 0xfee0_0900,
            ..Default::default()
        },
        xsave,
        xcrs: kvm_xcrs::default(),
        debugregs: kvm_debugregs {
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            ..Default::default()
        },
        lapic,
        msrs: vec![
            kvm_msr_entry {
                index: 0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
                data: 0x0200_1001,
                ..Default::default()
            },
            kvm_msr_entry {
                index: 0x10, // TSC
                data: 123_456_789,
                ..Default::default()
            },
        ],
        vcpu_events: kvm_vcpu_events::default(),
        tsc_khz: None,
    }
}

/// A fixed machine state touching every part of the format.
fn sample() -> MachineState {
    let chip = |chip_id| kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    MachineState {
        version: ferry_vmm::vmm::MACHINE_STATE_VERSION,
        memory: vec![RegionDesc {
            gpa: 0,
            size: 512 << 20,
        }],
        vcpus: vec![vcpu(0), vcpu(1)],
        vm: VmState {
            pit2: kvm_pit_state2::default(),
            clock: kvm_clock_data {
                clock: 987_654_321,
                ..Default::default()
            },
            pic_master: chip(0),
            pic_slave: chip(1),
            ioapic: chip(2),
        },
        serial: SerialSnapshot {
            registers: [1, 0, 0x05, 0xc1, 0x03, 0x60, 0x0b, 0xb0, 0],
            in_buffer: b"verify\n".to_vec(),
        },
        balloon: Some(BalloonState {
            version: 1,
            device_features: (1 << 32) | (1 << 1) | (1 << 3) | (1 << 5),
            driver_features: (1 << 32) | (1 << 1) | (1 << 3) | (1 << 5),
            device_features_sel: 1,
            driver_features_sel: 1,
            queue_sel: 4,
            status: 0x0f,
            interrupt_status: 0,
            config_generation: 3,
            num_pages: 0,
            actual: 0,
            poison_val: 0,
            hint: HintRoundState {
                cmd_id: 1,
                next_id: 0x8000_0003,
                driver_round: None,
            },
            queues: (0..5)
                .map(|i| QueueSnapshot {
                    max_size: 256,
                    next_avail: i,
                    next_used: i,
                    event_idx_enabled: false,
                    size: 256,
                    ready: true,
                    desc_table: 0x1000_0000 + u64::from(i) * 0x4000,
                    avail_ring: 0x1000_1000 + u64::from(i) * 0x4000,
                    used_ring: 0x1000_2000 + u64::from(i) * 0x4000,
                })
                .collect(),
            stats_head: Some(0),
            stats: None,
        }),
    }
}

fn golden_bytes(name: &str, fresh: &[u8]) -> Vec<u8> {
    let path = golden(name);
    if std::env::var_os("FERRY_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, fresh).unwrap();
    }
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn machine_state_encodes_to_the_golden_bytes() {
    let fresh = state_format::encode(&sample()).unwrap();
    let golden = golden_bytes("machine-state-v2.bin", &fresh);
    assert_eq!(&golden[..8], &MAGIC);
    assert_eq!(golden[8..12], FORMAT_VERSION.to_le_bytes());
    assert!(
        fresh == golden,
        "the encoding changed ({} bytes now, {} golden): see this file's header",
        fresh.len(),
        golden.len()
    );
}

/// Compares through JSON: MachineState holds KVM structs without PartialEq.
fn same(a: &MachineState, b: &MachineState) -> bool {
    let json = |s: &MachineState| serde_json::to_value(s).unwrap();
    json(a) == json(b)
}

#[test]
fn golden_bytes_of_both_versions_decode_to_the_machine_state() {
    for (name, version) in [
        ("machine-state-v2.bin", FORMAT_VERSION),
        ("machine-state-v1.bin", FORMAT_VERSION_JSON),
    ] {
        let golden = std::fs::read(golden(name)).unwrap();
        assert_eq!(golden[8..12], version.to_le_bytes(), "{name}");
        let state = state_format::decode(&golden).unwrap();
        assert!(same(&state, &sample()), "{name} decodes to another state");
        assert_eq!(state.vcpus[1].regs.rip, 0xffff_ffff_8100_0001);
        assert_eq!(state.vcpus[0].xsave.region[6], 0x1f80);
        assert_eq!(state.vcpus[1].lapic.regs[0x20], 1);
        assert_eq!(state.vm.clock.clock, 987_654_321);
        assert_eq!(state.serial.in_buffer, b"verify\n");
        assert_eq!(state.balloon.unwrap().hint.next_id, 0x8000_0003);
    }
}

/// What the binary format is for: the state of two vCPUs is a fraction of its JSON.
#[test]
fn the_binary_state_is_much_smaller_than_its_json() {
    let v2 = std::fs::read(golden("machine-state-v2.bin")).unwrap();
    let v1 = std::fs::read(golden("machine-state-v1.bin")).unwrap();
    assert!(
        v2.len() * 2 < v1.len(),
        "{} bytes binary, {} JSON",
        v2.len(),
        v1.len()
    );
}

/// The TSC frequency came after version 1's golden state: a state without it still reads
/// (as "unknown"), and one with it keeps it.
#[test]
fn the_tsc_frequency_is_optional_and_kept() {
    let golden = std::fs::read(golden("machine-state-v1.bin")).unwrap();
    assert_eq!(
        state_format::decode(&golden).unwrap().vcpus[0].tsc_khz,
        None
    );
    let mut state = sample();
    state.vcpus[1].tsc_khz = Some(2_994_374);
    let decoded = state_format::decode(&state_format::encode(&state).unwrap()).unwrap();
    assert_eq!(
        (decoded.vcpus[0].tsc_khz, decoded.vcpus[1].tsc_khz),
        (None, Some(2_994_374))
    );
}

#[test]
fn golden_envelope_of_a_fixed_payload() {
    let fresh = state_format::seal_version(FORMAT_VERSION_JSON, br#"{"ferry":true}"#).unwrap();
    let golden = golden_bytes("envelope-v1.bin", &fresh);
    assert_eq!(fresh, golden);
    // The header, spelled out: magic, version 1, flags 0, length 14, CRC-32.
    assert_eq!(&golden[..8], b"FERRYVMS");
    assert_eq!(golden[8..16], [1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(golden[16..24], 14u64.to_le_bytes());
    assert_eq!(golden.len(), HEADER_BYTES + 14);
    let opened = state_format::open(&golden).unwrap();
    assert_eq!(opened.version, FORMAT_VERSION_JSON);
    assert_eq!(opened.payload, br#"{"ferry":true}"#.as_slice());
    // The current version differs in its version field (and so its checksum) only.
    let current = state_format::seal(br#"{"ferry":true}"#).unwrap();
    assert_eq!(current[8..12], FORMAT_VERSION.to_le_bytes());
    assert_eq!(
        (&current[..8], &current[12..24]),
        (&golden[..8], &golden[12..24])
    );
    assert_eq!(current[HEADER_BYTES..], golden[HEADER_BYTES..]);
}

#[test]
fn damaged_golden_states_are_refused_with_the_reason() {
    for name in ["machine-state-v2.bin", "machine-state-v1.bin"] {
        let golden = std::fs::read(golden(name)).unwrap();
        let mut flipped = golden.clone();
        let mid = HEADER_BYTES + (golden.len() - HEADER_BYTES) / 2;
        flipped[mid] ^= 0x01;
        assert!(matches!(
            state_format::decode(&flipped),
            Err(StateFormatError::Checksum { .. })
        ));
        assert!(matches!(
            state_format::decode(&golden[..golden.len() - 1]),
            Err(StateFormatError::Length { .. })
        ));
        let mut future = golden.clone();
        future[8] = 3;
        let e = state_format::decode(&future).unwrap_err();
        assert!(e.to_string().contains("version 3"), "{e}");
    }
    // A checksummed payload with another machine-state layout version is refused too, in
    // either encoding.
    let mut state = sample();
    state.version = 99;
    let binary = state_format::encode(&state).unwrap();
    assert!(matches!(
        state_format::decode(&binary),
        Err(StateFormatError::Layout { found: 99 })
    ));
    let json =
        state_format::seal_version(FORMAT_VERSION_JSON, &serde_json::to_vec(&state).unwrap())
            .unwrap();
    assert!(matches!(
        state_format::decode(&json),
        Err(StateFormatError::Layout { found: 99 })
    ));
}

/// The payload must be exactly one state: a truncated one, and one with bytes after it,
/// are refused even when their envelope is intact.
#[test]
fn a_binary_payload_must_be_one_whole_state() {
    let golden = std::fs::read(golden("machine-state-v2.bin")).unwrap();
    let payload = state_format::open(&golden).unwrap().payload;
    let short = state_format::seal(&payload[..payload.len() - 9]).unwrap();
    assert!(matches!(
        state_format::decode(&short),
        Err(StateFormatError::Payload(_))
    ));
    let mut long = payload.to_vec();
    long.extend_from_slice(&[0, 0, 0]);
    let long = state_format::seal(&long).unwrap();
    assert!(matches!(
        state_format::decode(&long),
        Err(StateFormatError::Trailing(3))
    ));
}

/// The state comes from the peer: a payload damaged anywhere (and sealed again, so that
/// the checksum does not catch it first) is refused or read, never a panic. Every byte
/// of the golden payload, replaced by three values, and every truncation.
#[test]
fn every_damaged_binary_payload_is_refused_or_read_never_a_panic() {
    let golden = std::fs::read(golden("machine-state-v2.bin")).unwrap();
    let payload = state_format::open(&golden).unwrap().payload.to_vec();
    let mut read = 0usize;
    for i in 0..payload.len() {
        for value in [0x00, 0xff, payload[i] ^ 0x80] {
            let mut bad = payload.clone();
            bad[i] = value;
            read += usize::from(state_format::decode(&state_format::seal(&bad).unwrap()).is_ok());
        }
    }
    for len in 0..payload.len() {
        let short = state_format::seal(&payload[..len]).unwrap();
        assert!(state_format::decode(&short).is_err(), "{len} bytes read");
    }
    // Most bytes are register contents, which any value fits: those read.
    assert!(read > payload.len(), "{read} damaged payloads read");
}
