//! The guest-physical memory map of ferry's x86-64 machine.
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_7000  zero page (boot_params)
//! 0x0000_9000  PML4           0x0000_a000  PDPT       0x0000_b000.. 4 page directories
//! 0x0002_0000  command line   0x0009_fc00 .. 0x0010_0000  reserved (EBDA, ACPI at 0xe0000)
//! 0x0010_0000  kernel (bzImage payload), then RAM; initrd at the top of RAM
//! 0xc000_0000  32-bit MMIO window: virtio-mmio devices from 0xd000_0000, 4 KiB each
//! 0xfec0_0000  IOAPIC         0xfee0_0000  LAPIC
//! 0x1_0000_0000  the rest of RAM, if more than 3 GiB
//! ```
//! RAM is `[0, min(memory, 3 GiB))` plus `[4 GiB, 4 GiB + memory - 3 GiB)`, one KVM slot each.
#![forbid(unsafe_code)]

/// GDT location.
pub const GDT_START: u64 = 0x500;
/// IDT location (empty; Linux installs its own).
pub const IDT_START: u64 = 0x520;
/// The zero page handed to the kernel in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Top of the boot stack (RSP/RBP at entry).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPT, then [`PD_COUNT`] page directories.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT_START: u64 = 0xa000;
/// First page directory.
pub const PD_START: u64 = 0xb000;
/// Page directories: each maps 1 GiB with 2 MiB pages, 4 cover the 32-bit space.
pub const PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Bytes reserved for the command line.
pub const CMDLINE_MAX_BYTES: u64 = 0x1000;
/// End of conventional low memory; the EBDA begins here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI RSDP (searched by Linux in 0xe0000..0x100000 too) followed by the other tables.
pub const ACPI_START: u64 = 0xe0000;
/// End of the reserved area holding the ACPI tables.
pub const ACPI_END: u64 = 0x10_0000;
/// Start of high memory, where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO window; RAM must end at or below it.
pub const MMIO_32_START: u64 = 0xc000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC MMIO base (handled by KVM's in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC MMIO base (handled by KVM).
pub const LAPIC_START: u64 = 0xfee0_0000;
/// TSS area KVM needs on Intel (three pages below 4 GiB, outside RAM).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// GSI of COM1.
pub const SERIAL_GSI: u32 = 4;
/// First GSI given to virtio-mmio devices (edge, exclusive).
pub const VIRTIO_GSI_START: u32 = 5;
/// Last usable IOAPIC pin (KVM's IOAPIC has 24).
pub const GSI_MAX: u32 = 23;
/// COM1 I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
/// i8042 command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// ACPI sleep control register (hardware-reduced power off), one byte.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register.
pub const ACPI_RESET_PORT: u16 = 0x602;

/// E820 entry types used in the boot map.
pub const E820_RAM: u32 = 1;
/// Reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One entry of the e820 map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Where RAM continues above the 32-bit MMIO window.
pub const HIGH_RAM_START: u64 = 1 << 32;

/// End of RAM below the 32-bit MMIO window for `memory_bytes` of RAM.
pub fn low_ram_end(memory_bytes: u64) -> u64 {
    memory_bytes.min(MMIO_32_START)
}

/// The e820 map for `memory_bytes` of RAM: low RAM below the MMIO window, the rest from
/// [`HIGH_RAM_START`].
pub fn e820_map(memory_bytes: u64) -> Vec<E820Entry> {
    let low_end = low_ram_end(memory_bytes);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIMEM_START,
            size: low_end.saturating_sub(HIMEM_START),
            kind: E820_RAM,
        },
    ];
    if memory_bytes > low_end {
        map.push(E820Entry {
            addr: HIGH_RAM_START,
            size: memory_bytes - low_end,
            kind: E820_RAM,
        });
    }
    map
}

// The memory map's invariants, checked at compile time.
const _: () = {
    assert!(PD_START + PD_COUNT * 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_BYTES <= EBDA_START);
    assert!(ZERO_PAGE_START + 0x1000 <= (BOOT_STACK_POINTER & !0xfff));
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(VIRTIO_MMIO_START >= MMIO_32_START);
    assert!(HIGH_RAM_START > LAPIC_START && HIGH_RAM_START > KVM_TSS_ADDRESS as u64);
    assert!(VIRTIO_MMIO_START + 16 * VIRTIO_MMIO_SIZE < IOAPIC_START);
    assert!(KVM_TSS_ADDRESS as u64 > LAPIC_START);
};

/// Guest RAM regions `(gpa, size)` for `memory_bytes` of RAM: one KVM slot below the 32-bit
/// MMIO window and, for more than [`MMIO_32_START`] bytes, one from [`HIGH_RAM_START`].
pub fn ram_regions(memory_bytes: u64) -> Vec<(u64, u64)> {
    let low_end = low_ram_end(memory_bytes);
    let mut regions = vec![(0, low_end)];
    if memory_bytes > low_end {
        regions.push((HIGH_RAM_START, memory_bytes - low_end));
    }
    regions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_above_the_mmio_window_continues_at_4g() {
        assert_eq!(ram_regions(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(ram_regions(MMIO_32_START), vec![(0, MMIO_32_START)]);
        let big = 6u64 << 30;
        assert_eq!(
            ram_regions(big),
            vec![(0, MMIO_32_START), (HIGH_RAM_START, big - MMIO_32_START)]
        );
        let map = e820_map(big);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_32_START);
        assert_eq!(
            (map[3].addr, map[3].size),
            (HIGH_RAM_START, big - MMIO_32_START)
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, big - (HIMEM_START - EBDA_START));
        assert_eq!(low_ram_end(big), MMIO_32_START);
    }

    #[test]
    fn e820_covers_ram_and_reserves_the_bios_area() {
        let map = e820_map(512 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[0].addr + map[0].size, map[1].addr);
        assert_eq!(map[1].addr + map[1].size, map[2].addr);
        assert_eq!(map[2].addr + map[2].size, 512 << 20);
        assert_eq!(map[1].kind, E820_RESERVED);
        // ACPI tables and nothing else of ours lives in the reserved range.
        assert!(ACPI_START >= map[1].addr && ACPI_END <= map[2].addr);
        // Boot structures live in the first RAM entry, below the EBDA.
        let boot_structures = [GDT_START, ZERO_PAGE_START, PML4_START, CMDLINE_START];
        assert!(boot_structures.iter().all(|&a| a < map[0].size));
    }
}
