//! Loading Linux: the bzImage, the initrd, the command line and the zero page (boot_params)
//! with its e820 map, per the x86 boot protocol (Documentation/arch/x86/boot.rst).
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{self, E820Entry};

/// The boot protocol's "undefined boot loader" id.
const TYPE_OF_LOADER_UNDEFINED: u8 = 0xff;
/// The 64-bit entry is this far past the load address.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// Magic in `boot_flag`.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;

/// Errors while loading the kernel and building its boot parameters.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open the kernel {path}: {source}")]
    OpenKernel {
        /// Path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// linux-loader rejected the image.
    #[error("cannot load the kernel: {0}")]
    LoadKernel(#[source] linux_loader::loader::Error),
    /// The initrd could not be read.
    #[error("cannot read the initrd {path}: {source}")]
    ReadInitrd {
        /// Path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the top of usable RAM.
    #[error("the initrd ({size} bytes) does not fit in guest RAM above the kernel; give the VM more memory")]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
    },
    /// The command line does not fit the kernel's limit or ferry's area.
    #[error("the command line ({len} bytes) exceeds the kernel's limit of {max} bytes")]
    CmdlineTooLong {
        /// Length without NUL.
        len: usize,
        /// Kernel's limit without NUL.
        max: u64,
    },
    /// Writing into guest memory failed (the address lies outside RAM).
    #[error("cannot write the {what} into guest memory: {source}")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Where things were placed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BootInfo {
    /// Guest address of the 64-bit entry point.
    pub entry: u64,
    /// Setup header read from the image (with `code32_start` updated).
    pub header: setup_header,
    /// End of the loaded kernel payload.
    pub kernel_end: u64,
}

/// Loads the bzImage payload at its preferred 1 MiB address.
pub fn load_kernel<M: GuestMemoryBackend>(mem: &M, path: &Path) -> Result<BootInfo, BootError> {
    let mut f = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.display().to_string(),
        source,
    })?;
    let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(layout::HIMEM_START)))
        .map_err(BootError::LoadKernel)?;
    let header = r.setup_header.unwrap_or_default();
    Ok(BootInfo {
        entry: r.kernel_load.0 + ENTRY_64_OFFSET,
        header,
        kernel_end: r.kernel_end,
    })
}

/// Where the initrd goes: page aligned, as high as allowed below `ram_end` (the end of RAM
/// below 4 GiB), above the kernel.
pub fn initrd_address(
    size: u64,
    ram_end: u64,
    initrd_addr_max: u32,
    kernel_end: u64,
) -> Result<u64, BootError> {
    let too_big = BootError::InitrdTooBig { size };
    // initrd_addr_max is the highest address the initrd may *occupy*.
    let limit = ram_end.min(u64::from(initrd_addr_max) + 1);
    let addr = limit.checked_sub(size).ok_or(too_big)? & !0xfff;
    if addr < kernel_end {
        return Err(BootError::InitrdTooBig { size });
    }
    Ok(addr)
}

/// Loads the initrd below `ram_end` (the end of low RAM); returns `(address, size)`.
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    ram_end: u64,
    boot: &BootInfo,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.display().to_string(),
        source,
    };
    let data = std::fs::read(path).map_err(read_err)?;
    let size = data.len() as u64;
    let addr = initrd_address(size, ram_end, boot.header.initrd_addr_max, boot.kernel_end)?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite {
            what: "initrd",
            source,
        })?;
    Ok((addr, size))
}

/// Writes the NUL-terminated command line at [`layout::CMDLINE_START`]; returns its length
/// including the NUL.
pub fn write_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &str,
    header: &setup_header,
) -> Result<u32, BootError> {
    // Protocol >= 2.06 gives the limit; it excludes the NUL.
    let kernel_max = match header.cmdline_size {
        0 => 255,
        n => u64::from(n),
    };
    let max = kernel_max.min(layout::CMDLINE_MAX_BYTES - 1);
    if cmdline.len() as u64 > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|source| BootError::GuestWrite {
            what: "command line",
            source,
        })?;
    Ok(bytes.len() as u32)
}

/// The inputs of the zero page.
#[derive(Debug, Clone)]
pub struct ZeroPage<'a> {
    /// Header read from the kernel image.
    pub header: setup_header,
    /// Command line address.
    pub cmdline_addr: u64,
    /// Command line length including NUL.
    pub cmdline_len: u32,
    /// `(address, size)` of the initrd.
    pub initrd: Option<(u64, u64)>,
    /// Address of the ACPI RSDP.
    pub rsdp_addr: u64,
    /// Memory map.
    pub e820: &'a [E820Entry],
}

impl ZeroPage<'_> {
    /// Builds `boot_params` from the kernel's own setup header, as the boot protocol asks.
    pub fn build(&self) -> boot_params {
        let mut p = boot_params {
            hdr: self.header,
            ..Default::default()
        };
        p.hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED;
        p.hdr.boot_flag = BOOT_FLAG_MAGIC;
        p.hdr.cmd_line_ptr = self.cmdline_addr as u32;
        p.ext_cmd_line_ptr = (self.cmdline_addr >> 32) as u32;
        p.hdr.cmdline_size = self.cmdline_len;
        if let Some((addr, size)) = self.initrd {
            p.hdr.ramdisk_image = addr as u32;
            p.hdr.ramdisk_size = size as u32;
            p.ext_ramdisk_image = (addr >> 32) as u32;
            p.ext_ramdisk_size = (size >> 32) as u32;
        }
        p.acpi_rsdp_addr = self.rsdp_addr;
        let n = self.e820.len().min(p.e820_table.len());
        for (slot, e) in p.e820_table.iter_mut().zip(&self.e820[..n]) {
            *slot = boot_e820_entry {
                addr: e.addr,
                size: e.size,
                r#type: e.kind,
            };
        }
        p.e820_entries = n as u8;
        p
    }

    /// Builds and writes the zero page at [`layout::ZERO_PAGE_START`].
    pub fn write<M: GuestMemoryBackend>(&self, mem: &M) -> Result<(), BootError> {
        mem.write_obj(self.build(), GuestAddress(layout::ZERO_PAGE_START))
            .map_err(|source| BootError::GuestWrite {
                what: "zero page",
                source,
            })
    }
}

/// Offset of the setup header's "HdrS" magic in a bzImage.
const HDRS_OFFSET: u64 = 0x202;
/// `xloadflags` bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;

/// Why a file is not a kernel ferry can boot ([`check_bzimage`]).
#[derive(Debug)]
pub enum BzImageError {
    /// It cannot be read.
    Unreadable(std::io::Error),
    /// It is not a 64-bit bzImage: why.
    Bad(String),
}

/// Checks that `path` is a bzImage with the 64-bit boot protocol (>= 2.12, XLF_KERNEL_64).
pub fn check_bzimage(path: &Path) -> Result<(), BzImageError> {
    let unreadable = BzImageError::Unreadable;
    let bad = |reason: &str| BzImageError::Bad(reason.to_owned());
    let mut f = File::open(path).map_err(unreadable)?;
    // Read from the magic through xloadflags (0x236..0x238).
    let mut hdr = [0u8; 0x238 - HDRS_OFFSET as usize];
    f.seek(SeekFrom::Start(HDRS_OFFSET)).map_err(unreadable)?;
    match f.read_exact(&mut hdr) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
            return Err(bad("file too short for a setup header"))
        }
        Err(e) => return Err(unreadable(e)),
    }
    if &hdr[0..4] != b"HdrS" {
        return Err(bad("no \"HdrS\" magic at offset 0x202"));
    }
    let version = u16::from_le_bytes([hdr[4], hdr[5]]);
    if version < 0x020c {
        return Err(bad(&format!(
            "boot protocol {}.{} is older than 2.12",
            version >> 8,
            version & 0xff
        )));
    }
    let at = |off: u64| (off - HDRS_OFFSET) as usize;
    let xloadflags = u16::from_le_bytes([hdr[at(0x236)], hdr[at(0x237)]]);
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad("no 64-bit entry point (XLF_KERNEL_64 unset)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn header() -> setup_header {
        setup_header {
            header: 0x5372_6448,
            version: 0x020f,
            initrd_addr_max: 0x7fff_ffff,
            cmdline_size: 2047,
            loadflags: 1,
            ..Default::default()
        }
    }

    #[test]
    fn zero_page_fields() {
        let e820 = layout::e820_map(256 << 20);
        let zp = ZeroPage {
            header: header(),
            cmdline_addr: layout::CMDLINE_START,
            cmdline_len: 12,
            initrd: Some((0x0f00_0000, 0x12345)),
            rsdp_addr: layout::ACPI_START,
            e820: &e820,
        };
        let p = zp.build();
        let hdr = p.hdr;
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x12345);
        assert_eq!({ p.acpi_rsdp_addr }, layout::ACPI_START);
        assert_eq!({ p.e820_entries }, 3);
        let last = p.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (layout::HIMEM_START, (256 << 20) - layout::HIMEM_START, 1)
        );

        // The zero page lands where RSI will point, with the header at 0x1f1.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        zp.write(&mem).unwrap();
        let magic: u32 = mem
            .read_obj(GuestAddress(layout::ZERO_PAGE_START + 0x202))
            .unwrap();
        assert_eq!(magic, 0x5372_6448);
        let rsdp: u64 = mem
            .read_obj(GuestAddress(layout::ZERO_PAGE_START + 0x70))
            .unwrap();
        assert_eq!(rsdp, layout::ACPI_START);
        let entries: u8 = mem
            .read_obj(GuestAddress(layout::ZERO_PAGE_START + 0x1e8))
            .unwrap();
        assert_eq!(entries, 3);
    }

    #[test]
    fn initrd_goes_high_page_aligned_and_above_the_kernel() {
        let a = initrd_address(0x1234, 256 << 20, 0x7fff_ffff, 0x0200_0000).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a + 0x1234 <= 256 << 20);
        assert!((256 << 20) - a < 0x3000);
        // initrd_addr_max below the top of RAM wins.
        let a = initrd_address(0x1000, 1 << 30, 0x0fff_ffff, 0).unwrap();
        assert_eq!(a, 0x0fff_f000);
        assert!(matches!(
            initrd_address(200 << 20, 256 << 20, 0x7fff_ffff, 100 << 20),
            Err(BootError::InitrdTooBig { .. })
        ));
    }

    #[test]
    fn cmdline_respects_the_kernel_limit() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let n = write_cmdline(&mem, "console=ttyS0", &header()).unwrap();
        assert_eq!(n, 14);
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        let small = setup_header {
            cmdline_size: 4,
            ..header()
        };
        assert!(matches!(
            write_cmdline(&mem, "console=ttyS0", &small),
            Err(BootError::CmdlineTooLong { .. })
        ));
    }
}
