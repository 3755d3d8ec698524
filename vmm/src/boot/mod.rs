//! Loading a Linux kernel (bzImage or ELF vmlinux), its initrd and command line, and deciding how
//! the boot vCPU enters it.
//!
//! Three entry protocols:
//! - bzImage: the x86 64-bit boot protocol (zero page in RSI, long mode, entry at load + 0x200);
//! - ELF with a PVH note: PVH (`hvm_start_info` in EBX, 32-bit protected mode, paging off);
//! - ELF without a PVH note: its 64-bit entry point with a minimal zero page in RSI.

pub mod image;
pub mod initrd;
pub mod pvh;
pub mod zero_page;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::e820;
use crate::arch::paging;
use crate::arch::regs::{self, EntryMode};
use crate::layout::{
    BOOT_STACK_POINTER, CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START, PVH_INFO_ADDR, ZERO_PAGE_ADDR,
};
use crate::memory::{low_ram_end, GuestMemoryMmap};

/// Offset of the 64-bit entry point from the protected-mode kernel's load address.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Command line limit for kernels that do not state one (x86 COMMAND_LINE_SIZE).
pub const DEFAULT_CMDLINE_LIMIT: usize = 2047;
/// `xloadflags` bit: the kernel has the 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;

/// Kernel image formats hype can boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage with the x86 boot protocol header.
    BzImage,
    /// An ELF executable (vmlinux).
    Elf,
}

/// The entry protocol chosen for the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// x86 64-bit boot protocol from a bzImage.
    BzImage64,
    /// PVH from an ELF vmlinux with a PVH note.
    Pvh,
    /// ELF 64-bit entry point with a zero page.
    Elf64,
}

/// Errors loading the kernel, initrd or command line. All of these are the user's input.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}")]
    KernelRead {
        /// Kernel path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Not a bzImage or ELF.
    #[error("{0} is neither a bzImage nor an ELF kernel")]
    UnknownFormat(PathBuf),
    /// linux-loader rejected the image.
    #[error("cannot load kernel {path}: {reason}")]
    KernelLoad {
        /// Kernel path.
        path: PathBuf,
        /// What linux-loader said.
        reason: String,
    },
    /// The kernel does not fit.
    #[error("kernel {path} ({size} bytes) does not fit in {mem} MiB of guest memory")]
    KernelTooBig {
        /// Kernel path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Guest memory in MiB.
        mem: u64,
    },
    /// bzImage too old for the 64-bit protocol.
    #[error(
        "kernel {0} has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 needed)"
    )]
    No64BitEntry(PathBuf),
    /// Command line too long.
    #[error("command line is {len} bytes, the kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Actual length.
        len: usize,
        /// Kernel limit.
        max: usize,
    },
    /// Command line contains a NUL byte.
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    /// The image's headers do not match the file (or it is not a regular file).
    #[error(transparent)]
    Image(#[from] image::ImageError),
    /// Initrd problems.
    #[error(transparent)]
    Initrd(#[from] initrd::InitrdError),
    /// Writing boot structures failed (a bug or an absurdly small guest).
    #[error("cannot write boot data into guest memory")]
    GuestWrite(#[source] vm_memory::GuestMemoryError),
    /// Descriptor tables.
    #[error(transparent)]
    Tables(#[from] regs::RegsError),
}

/// What the boot vCPU needs to start the loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct BootSetup {
    /// The chosen protocol.
    pub protocol: Protocol,
    /// CPU mode at entry.
    pub mode: EntryMode,
    /// Entry point.
    pub entry: u64,
    /// Address of boot_params (RSI) or hvm_start_info (EBX).
    pub boot_info: u64,
    /// Initial stack pointer.
    pub stack: u64,
    /// Where the initrd went, if any: (address, size).
    pub initrd: Option<(u64, u64)>,
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct BootSource<'a> {
    /// Kernel image path.
    pub kernel: &'a Path,
    /// Optional initrd path.
    pub initrd: Option<&'a Path>,
    /// Full command line.
    pub cmdline: &'a str,
    /// Guest physical address of the ACPI RSDP, handed to the kernel (platform acpi).
    pub rsdp: Option<u64>,
}

/// Sniffs the image format from its first bytes.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let read_err = |source| BootError::KernelRead {
        path: path.to_owned(),
        source,
    };
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]).map_err(read_err)? {
            0 => break,
            k => n += k,
        }
    }
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownFormat(path.to_owned()))
}

/// The kernel's command line limit.
pub fn cmdline_limit(hdr: Option<&setup_header>) -> usize {
    match hdr {
        Some(h) if h.version >= 0x0206 && h.cmdline_size > 0 => {
            (h.cmdline_size as usize).min(CMDLINE_MAX_SIZE - 1)
        }
        Some(_) => 255,
        None => DEFAULT_CMDLINE_LIMIT,
    }
}

fn check_cmdline(cmdline: &str, limit: usize) -> Result<(), BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    if cmdline.len() > limit {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: limit,
        });
    }
    Ok(())
}

/// Loads everything and writes the boot structures; returns how to enter the kernel.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    src: &BootSource<'_>,
) -> Result<BootSetup, BootError> {
    let path = src.kernel;
    let read_err = |source| BootError::KernelRead {
        path: path.to_owned(),
        source,
    };
    let (mut file, file_size) = match image::open_regular(path, "kernel") {
        Ok(f) => f,
        Err(image::OpenError::Io(e)) => return Err(read_err(e)),
        Err(image::OpenError::Image(e)) => return Err(e.into()),
    };
    let format = detect_format(&mut file, path)?;
    let too_big = || BootError::KernelTooBig {
        path: path.to_owned(),
        size: file_size,
        mem: mem_size >> 20,
    };
    let low_end = low_ram_end(mem_size);
    if file_size >= low_end.saturating_sub(HIMEM_START) {
        return Err(too_big());
    }
    match format {
        KernelFormat::BzImage => {
            let mut head = [0u8; 0x206];
            file.seek(SeekFrom::Start(0)).map_err(read_err)?;
            file.read_exact(&mut head).map_err(read_err)?;
            image::check_bzimage(path, &head, file_size)?;
        }
        KernelFormat::Elf => image::check_elf(path, &mut file, file_size, low_end)?,
    }
    let load_err = |e: linux_loader::loader::Error| match e {
        linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadKernelImage)
        | linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
        )
        | linux_loader::loader::Error::MemoryOverflow => too_big(),
        other => BootError::KernelLoad {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    };

    let (protocol, entry, kernel_end, header) = match format {
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let hdr = r
                .setup_header
                .ok_or_else(|| BootError::UnknownFormat(path.to_owned()))?;
            if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry(path.to_owned()));
            }
            let entry = r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET;
            (Protocol::BzImage64, entry, r.kernel_end, Some(hdr))
        }
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            if r.kernel_end > low_end {
                return Err(too_big());
            }
            match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => (Protocol::Pvh, a.0, r.kernel_end, None),
                _ => (Protocol::Elf64, r.kernel_load.0, r.kernel_end, None),
            }
        }
    };

    check_cmdline(src.cmdline, cmdline_limit(header.as_ref()))?;
    let mut cmdline = src.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_ADDR))
        .map_err(BootError::GuestWrite)?;

    let initrd = match src.initrd {
        Some(p) => {
            let max_addr = header
                .as_ref()
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|m| *m != 0)
                .unwrap_or(initrd::DEFAULT_INITRD_ADDR_MAX);
            Some(initrd::load(mem, p, kernel_end, max_addr, low_end)?)
        }
        None => None,
    };

    let map = e820::memory_map(mem_size);
    regs::write_descriptor_tables(mem)?;
    let (mode, boot_info) = match protocol {
        Protocol::Pvh => {
            pvh::write(mem, &map, initrd, src.rsdp).map_err(BootError::GuestWrite)?;
            (EntryMode::Protected32, PVH_INFO_ADDR)
        }
        Protocol::BzImage64 | Protocol::Elf64 => {
            let cr3 = paging::write_identity_map(mem).map_err(BootError::GuestWrite)?;
            let mut zp = zero_page::build(header, src.cmdline.len(), initrd, &map);
            zp.acpi_rsdp_addr = src.rsdp.unwrap_or(0);
            mem.write_obj(zp, GuestAddress(ZERO_PAGE_ADDR))
                .map_err(BootError::GuestWrite)?;
            (EntryMode::Long64 { cr3 }, ZERO_PAGE_ADDR)
        }
    };
    Ok(BootSetup {
        protocol,
        mode,
        entry,
        boot_info,
        stack: BOOT_STACK_POINTER,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_limits() {
        let mut h = setup_header {
            version: 0x020f,
            cmdline_size: 2047,
            ..Default::default()
        };
        assert_eq!(cmdline_limit(Some(&h)), 2047);
        h.version = 0x0205;
        assert_eq!(cmdline_limit(Some(&h)), 255);
        assert_eq!(cmdline_limit(None), DEFAULT_CMDLINE_LIMIT);
        assert!(check_cmdline(&"x".repeat(2047), 2047).is_ok());
        assert!(matches!(
            check_cmdline(&"x".repeat(2048), 2047),
            Err(BootError::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        assert!(matches!(
            check_cmdline("a\0b", 2047),
            Err(BootError::CmdlineNul)
        ));
    }

    #[test]
    fn format_detection() {
        let dir = std::env::temp_dir().join(format!("hype-fmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let elf = dir.join("elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01rest").unwrap();
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzp = dir.join("bz");
        std::fs::write(&bzp, &bz).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, b"#!/bin/sh\necho not a kernel\n").unwrap();
        let f = |p: &Path| detect_format(&mut File::open(p).unwrap(), p);
        assert_eq!(f(&elf).unwrap(), KernelFormat::Elf);
        assert_eq!(f(&bzp).unwrap(), KernelFormat::BzImage);
        assert!(matches!(f(&junk), Err(BootError::UnknownFormat(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
