//! Guest RAM: one memfd, mapped shared, split around the 32-bit MMIO hole.
//!
//! The memfd is what vhost-user backends map, so every region is file-backed and `MAP_SHARED`.

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// The guest memory type used throughout the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Smallest guest we boot.
pub const MIN_MEMORY: u64 = 64 << 20;

/// Errors building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The guest RAM file (a sealed memfd) could not be made.
    #[error("cannot create the guest memory file")]
    File(#[source] hype_base::memfd::CreateError),
    /// mmap failed.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// One guest RAM range and where it lives in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical start.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset in the memfd.
    pub file_offset: u64,
}

impl RamRange {
    /// First address past the range.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Splits `size` bytes of RAM around the MMIO hole: everything up to the hole, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    if size <= MMIO_HOLE_START {
        vec![RamRange {
            start: 0,
            size,
            file_offset: 0,
        }]
    } else {
        vec![
            RamRange {
                start: 0,
                size: MMIO_HOLE_START,
                file_offset: 0,
            },
            RamRange {
                start: MMIO_HOLE_END,
                size: size - MMIO_HOLE_START,
                file_offset: MMIO_HOLE_START,
            },
        ]
    }
}

/// End of RAM below the hole.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// Creates the memfd-backed guest memory of `size` bytes.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    // Sealed against shrinking and growing: a backend that maps it can never be made to SIGBUS
    // by a truncation, and no backend can add seals of its own (hype_base::memfd).
    let file =
        hype_base::memfd::create_sealed(c"hype-guest-ram", size).map_err(MemoryError::File)?;
    let file = std::sync::Arc::new(file);
    let ranges: Vec<_> = ram_ranges(size)
        .into_iter()
        .map(|r| {
            let f = FileOffset::from_arc(file.clone(), r.file_offset);
            (GuestAddress(r.start), r.size as usize, Some(f))
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Map)
}

/// Total RAM of a guest memory object, in bytes.
pub fn total_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_range() {
        let r = ram_ranges(512 << 20);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].end(), 512 << 20);
    }

    #[test]
    fn large_guest_skips_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].end(), MMIO_HOLE_START);
        assert_eq!(r[1].start, MMIO_HOLE_END);
        assert_eq!(r[0].size + r[1].size, 4 << 30);
        assert_eq!(r[1].file_offset, MMIO_HOLE_START);
    }

    #[test]
    fn memory_is_shared_and_file_backed() {
        let mem = create_guest_memory(MIN_MEMORY).unwrap();
        assert_eq!(total_size(&mem), MIN_MEMORY);
        for region in mem.iter() {
            assert!(region.file_offset().is_some());
        }
    }
}
