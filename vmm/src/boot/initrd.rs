//! Initrd placement: as high as possible below the kernel's `initrd_addr_max` and the end of low
//! RAM, page aligned, and above the kernel.

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// `initrd_addr_max` for images that do not state one (PVH, old kernels).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE: u64 = 4096;

/// Initrd errors.
#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    /// Cannot open/read.
    #[error("cannot read initrd {path}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file (a FIFO, device, directory): its size cannot be known up front.
    #[error("initrd {0} is not a regular file")]
    NotRegular(PathBuf),
    /// Does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory between the kernel end {kernel_end:#x} and {limit:#x}")]
    TooBig {
        /// Path.
        path: PathBuf,
        /// Size.
        size: u64,
        /// End of the kernel image.
        kernel_end: u64,
        /// Highest usable address + 1.
        limit: u64,
    },
}

/// Chooses the initrd address, or `None` if it does not fit.
pub fn place(size: u64, kernel_end: u64, initrd_addr_max: u64, low_ram_end: u64) -> Option<u64> {
    let limit = initrd_addr_max.saturating_add(1).min(low_ram_end);
    let start = limit.checked_sub(size)? & !(PAGE - 1);
    let kernel_end = kernel_end.checked_add(PAGE - 1)? & !(PAGE - 1);
    (start >= kernel_end).then_some(start)
}

/// Reads the initrd into guest memory; returns (address, size).
pub fn load(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    initrd_addr_max: u64,
    low_ram_end: u64,
) -> Result<(u64, u64), InitrdError> {
    let read_err = |source| InitrdError::Read {
        path: path.to_owned(),
        source,
    };
    let (mut file, size) = match super::image::open_regular(path, "initrd") {
        Ok(f) => f,
        Err(super::image::OpenError::Io(e)) => return Err(read_err(e)),
        Err(super::image::OpenError::Image(_)) => {
            return Err(InitrdError::NotRegular(path.to_owned()))
        }
    };
    let addr = place(size, kernel_end, initrd_addr_max, low_ram_end).ok_or_else(|| {
        InitrdError::TooBig {
            path: path.to_owned(),
            size,
            kernel_end,
            limit: initrd_addr_max.saturating_add(1).min(low_ram_end),
        }
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placed_at_top_of_low_ram() {
        let a = place(0x1234, 0x200_0000, DEFAULT_INITRD_ADDR_MAX, 0x1000_0000).unwrap();
        assert_eq!(a, (0x1000_0000 - 0x1234) & !0xfff);
        assert_eq!(a % 4096, 0);
        assert!(a + 0x1234 <= 0x1000_0000);
    }

    #[test]
    fn respects_initrd_addr_max() {
        let a = place(0x10_0000, 0x200_0000, 0x37ff_ffff, 0xc000_0000).unwrap();
        assert!(a + 0x10_0000 <= 0x3800_0000);
        assert_eq!(a, 0x3800_0000 - 0x10_0000);
    }

    #[test]
    fn must_not_overlap_kernel() {
        assert_eq!(
            place(0x800_0000, 0x900_0000, DEFAULT_INITRD_ADDR_MAX, 0x1000_0000),
            None
        );
        assert_eq!(place(u64::MAX, 0, u64::MAX, 0x1000_0000), None);
        assert!(place(0x600_0000, 0x900_0000, DEFAULT_INITRD_ADDR_MAX, 0x1000_0000).is_some());
    }
}
