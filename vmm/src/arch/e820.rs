//! The guest's physical memory map (e820), shared by the bzImage and PVH paths.

use crate::layout::{BASE_MEM_END, BIOS_AREA_START, EBDA_START, HIMEM_START};
use crate::memory::ram_ranges;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Entry type.
    pub kind: u32,
}

/// The map for a guest with `mem_size` bytes of RAM.
pub fn memory_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: BASE_MEM_END - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: BIOS_AREA_START,
            size: HIMEM_START - BIOS_AREA_START,
            kind: E820_RESERVED,
        },
    ];
    for r in ram_ranges(mem_size) {
        let start = r.start.max(HIMEM_START);
        if r.end() > start {
            map.push(E820Entry {
                addr: start,
                size: r.end() - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

    fn ram_total(m: &[E820Entry]) -> u64 {
        m.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_guest_without_hole() {
        let m = memory_map(512 << 20);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[3],
            E820Entry {
                addr: HIMEM_START,
                size: (512 << 20) - HIMEM_START,
                kind: E820_RAM
            }
        );
        // all RAM but the legacy area below 1 MiB that is not reported as RAM
        assert_eq!(ram_total(&m), (512 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn large_guest_with_hole() {
        let size = 6u64 << 30;
        let m = memory_map(size);
        assert_eq!(m.len(), 5);
        assert_eq!(m[3].addr + m[3].size, MMIO_HOLE_START);
        assert_eq!(m[4].addr, MMIO_HOLE_END);
        assert_eq!(m[4].size, size - MMIO_HOLE_START);
        for e in &m {
            let end = e.addr + e.size;
            assert!(
                end <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END,
                "{e:?} overlaps the hole"
            );
        }
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        let m = memory_map(5 << 30);
        for w in m.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }
}
