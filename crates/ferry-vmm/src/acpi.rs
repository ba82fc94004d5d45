//! ACPI tables: how a stock Linux kernel learns about ferry's CPUs, IOAPIC, COM1 and the
//! virtio-mmio devices (Debian's kernels cannot find virtio-mmio any other way).
//!
//! RSDP -> XSDT -> {FADT -> DSDT, MADT}, all placed in the e820-reserved range starting at
//! [`layout::ACPI_START`]. The FADT declares a hardware-reduced platform (no PM timer, SCI or
//! GPE blocks), without VGA or CMOS RTC.
#![forbid(unsafe_code)]

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout;

const OEM_ID: [u8; 6] = *b"FERRY ";
const OEM_TABLE_ID: [u8; 8] = *b"FERRYVMM";
const OEM_REVISION: u32 = 1;
/// IA-PC boot architecture flags: VGA not present (bit 2), CMOS RTC not present (bit 5).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);
/// Table alignment inside the ACPI area.
const TABLE_ALIGN: u64 = 64;
/// SLP_TYP for S5 (soft off) as declared in `\_S5`.
pub const SLP_TYP_S5: u8 = 5;
/// Sleep control register bit: SLP_EN.
pub const SLP_EN: u8 = 1 << 5;
/// The value the guest writes to the sleep control register to power off.
pub const POWER_OFF_VALUE: u8 = (SLP_TYP_S5 << 2) | SLP_EN;
/// The value the guest writes to the reset register to reboot.
pub const RESET_VALUE: u8 = 1;

/// Errors building or writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit the reserved area.
    #[error("the ACPI tables need {needed} bytes but only {available} are reserved")]
    TooLarge {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Writing the tables into guest memory failed.
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    GuestWrite(#[source] vm_memory::GuestMemoryError),
    /// Too many CPUs or devices for the table formats.
    #[error("cannot describe {0} in ACPI")]
    Unrepresentable(String),
}

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// MMIO window base (below 4 GiB).
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// GSI (IOAPIC pin), edge triggered, active high.
    pub gsi: u32,
}

/// The finished tables and where each goes.
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// `(guest address, bytes)` for every table, RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
    /// Address of the RSDP, for `boot_params.acpi_rsdp_addr`.
    pub rsdp_addr: u64,
}

impl AcpiTables {
    /// Writes every table into guest memory.
    pub fn write<M: GuestMemoryBackend>(&self, mem: &M) -> Result<(), AcpiError> {
        for (addr, bytes) in &self.blobs {
            mem.write_slice(bytes, GuestAddress(*addr))
                .map_err(AcpiError::GuestWrite)?;
        }
        Ok(())
    }
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Builds the DSDT: COM1 and one `LNRO0005` device per virtio-mmio window.
pub fn dsdt(devices: &[MmioDeviceInfo]) -> Result<Vec<u8>, AcpiError> {
    let mut body = com1_aml();
    // \_S5 gives the SLP_TYP value Linux writes to the sleep control register to power off.
    let s5_typ = aml::Package::new(vec![&SLP_TYP_S5]);
    let s5 = aml::Name::new("_S5_".into(), &s5_typ);
    body.extend_from_slice(&to_bytes(&s5));
    for (i, dev) in devices.iter().enumerate() {
        body.extend_from_slice(&virtio_aml(i, dev)?);
    }
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    Ok(sdt.as_slice().to_vec())
}

fn com1_aml() -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0501");
    let io = aml::IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, layout::SERIAL_GSI);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::Name::new("_HID".into(), &hid);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let dev = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    to_bytes(&dev)
}

fn virtio_aml(index: usize, dev: &MmioDeviceInfo) -> Result<Vec<u8>, AcpiError> {
    let base = u32::try_from(dev.base)
        .map_err(|_| AcpiError::Unrepresentable(format!("MMIO base {:#x}", dev.base)))?;
    let size = u32::try_from(dev.size)
        .map_err(|_| AcpiError::Unrepresentable(format!("MMIO size {:#x}", dev.size)))?;
    if index > 0xfff {
        return Err(AcpiError::Unrepresentable(format!("{index} devices")));
    }
    let name = format!("_SB_.V{index:03X}");
    let hid: &'static str = "LNRO0005";
    let uid = index as u32;
    let mem = aml::Memory32Fixed::new(true, base, size);
    // Edge triggered, active high, exclusive: virtio-mmio interrupts are not shared.
    let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
    let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
    let hid = aml::Name::new("_HID".into(), &hid);
    let uid = aml::Name::new("_UID".into(), &uid);
    let cca = aml::Name::new("_CCA".into(), &aml::ONE);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let dev = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &cca, &crs]);
    Ok(to_bytes(&dev))
}

/// Builds the FADT pointing at the DSDT.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    let port = |p: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(p),
        )
    };
    b.sleep_control_reg = port(layout::ACPI_SLEEP_CONTROL_PORT);
    b.sleep_status_reg = port(layout::ACPI_SLEEP_STATUS_PORT);
    b.reset_reg = port(layout::ACPI_RESET_PORT);
    b.reset_value = RESET_VALUE;
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"FERRYVMM").into();
    to_bytes(&b.finalize())
}

/// Builds the MADT: one enabled local APIC per vCPU (APIC id = vCPU index) and the IOAPIC.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_START as u32),
    );
    for id in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, layout::IOAPIC_START as u32, 0));
    to_bytes(&m)
}

fn align(x: u64) -> u64 {
    x.div_ceil(TABLE_ALIGN) * TABLE_ALIGN
}

/// Builds every table and places them from [`layout::ACPI_START`].
pub fn build(vcpus: u8, devices: &[MmioDeviceInfo]) -> Result<AcpiTables, AcpiError> {
    let rsdp_addr = layout::ACPI_START;
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(devices)?;
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let mut x = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    x.add_entry(fadt_addr);
    x.add_entry(madt_addr);
    let xsdt = to_bytes(&x);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > layout::ACPI_END {
        return Err(AcpiError::TooLarge {
            needed: end - layout::ACPI_START,
            available: layout::ACPI_END - layout::ACPI_START,
        });
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(AcpiTables {
        blobs: vec![
            (rsdp_addr, rsdp),
            (dsdt_addr, dsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (xsdt_addr, xsdt),
        ],
        rsdp_addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    fn tables() -> AcpiTables {
        build(
            2,
            &[MmioDeviceInfo {
                base: layout::VIRTIO_MMIO_START,
                size: layout::VIRTIO_MMIO_SIZE,
                gsi: 5,
            }],
        )
        .unwrap()
    }

    #[test]
    fn every_table_checksums_and_declares_its_length() {
        let t = tables();
        let (_, rsdp) = &t.blobs[0];
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        for (_, table) in &t.blobs[1..] {
            assert_eq!(u32_at(table, 4) as usize, table.len());
            assert_eq!(sum(table), 0, "{:?}", std::str::from_utf8(&table[0..4]));
        }
    }

    #[test]
    fn pointers_link_the_tables() {
        let t = tables();
        let by_addr = |a: u64| &t.blobs.iter().find(|(x, _)| *x == a).unwrap().1;
        let xsdt_addr = u64_at(&t.blobs[0].1, 24);
        let xsdt = by_addr(xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        let fadt = by_addr(u64_at(xsdt, 36));
        let madt = by_addr(u64_at(xsdt, 44));
        assert_eq!(&fadt[0..4], b"FACP");
        assert_eq!(&madt[0..4], b"APIC");
        // FADT: revision >= 5, HW-reduced, X_DSDT set, no VGA, no CMOS.
        assert!(fadt[8] >= 5);
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0);
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), IAPC_BOOT_ARCH);
        // Sleep control register (offset 244): I/O space, byte access, our port.
        assert_eq!(fadt[244], 1);
        assert_eq!(
            u64_at(fadt, 248),
            u64::from(layout::ACPI_SLEEP_CONTROL_PORT)
        );
        assert_eq!(u64_at(fadt, 120), u64::from(layout::ACPI_RESET_PORT));
        assert_eq!(fadt[128], RESET_VALUE);
        let dsdt = by_addr(u64_at(fadt, 140));
        assert_eq!(&dsdt[0..4], b"DSDT");
        // All in the reserved area.
        for (a, b) in &t.blobs {
            assert!(*a >= layout::ACPI_START && a + b.len() as u64 <= layout::ACPI_END);
            assert_eq!(a % 16, 0);
        }
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        let m = madt(3);
        assert_eq!(u32_at(&m, 36), layout::LAPIC_START as u32);
        let mut off = 44;
        let mut apic_ids = Vec::new();
        let mut ioapics = Vec::new();
        while off < m.len() {
            let (kind, len) = (m[off], m[off + 1] as usize);
            match kind {
                0 => {
                    assert_eq!(u32_at(&m, off + 4), 1, "enabled");
                    apic_ids.push(m[off + 3]);
                }
                1 => ioapics.push((m[off + 2], u32_at(&m, off + 4), u32_at(&m, off + 8))),
                _ => panic!("unexpected MADT entry {kind}"),
            }
            off += len;
        }
        assert_eq!(apic_ids, vec![0, 1, 2]);
        assert_eq!(ioapics, vec![(0, layout::IOAPIC_START as u32, 0)]);
    }

    #[test]
    fn dsdt_describes_com1_and_the_virtio_device() {
        let t = tables();
        let dsdt = &t.blobs[1].1;
        assert!(contains(dsdt, b"LNRO0005\0"));
        assert!(contains(dsdt, b"V000"));
        assert!(contains(dsdt, b"COM1"));
        assert!(contains(dsdt, b"_S5_"));
        // EISA id of PNP0501.
        assert!(contains(dsdt, &[0x41, 0xd0, 0x05, 0x01]));
        // Memory32Fixed: tag 0x86, length 9, read-write, base, size.
        let mut m32 = vec![0x86, 9, 0, 1];
        m32.extend_from_slice(&(layout::VIRTIO_MMIO_START as u32).to_le_bytes());
        m32.extend_from_slice(&(layout::VIRTIO_MMIO_SIZE as u32).to_le_bytes());
        assert!(contains(dsdt, &m32));
        // Extended interrupt: consumer | edge, one interrupt, GSI 5.
        assert!(contains(dsdt, &[0x89, 6, 0, 0b11, 1, 5, 0, 0, 0]));
        // COM1 I/O ports 0x3f8..+8 and IRQ 4.
        assert!(contains(dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]));
        assert!(contains(dsdt, &[0x89, 6, 0, 0b11, 1, 4, 0, 0, 0]));
    }

    #[test]
    fn rejects_a_window_above_4g() {
        let e = dsdt(&[MmioDeviceInfo {
            base: 1 << 32,
            size: 0x1000,
            gsi: 5,
        }]);
        assert!(matches!(e, Err(AcpiError::Unrepresentable(_))));
    }
}
