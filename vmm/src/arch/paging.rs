//! Identity-mapped page tables for the 64-bit entry: the first 4 GiB with 2 MiB pages.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{PDPT_ADDR, PD_ADDR, PML4_ADDR};
use crate::memory::GuestMemoryMmap;

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;
/// Number of page directories (each maps 1 GiB).
pub const PD_COUNT: u64 = 4;

/// The page-table contents as (guest address, 64-bit entry) pairs.
pub fn identity_map_entries() -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(1 + PD_COUNT as usize * 513);
    out.push((PML4_ADDR, PDPT_ADDR | PRESENT_RW));
    for pd in 0..PD_COUNT {
        let pd_addr = PD_ADDR + pd * 0x1000;
        out.push((PDPT_ADDR + pd * 8, pd_addr | PRESENT_RW));
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            out.push((pd_addr + i * 8, phys | PRESENT_RW | PAGE_SIZE_2M));
        }
    }
    out
}

/// Writes the tables; returns the CR3 value.
pub fn write_identity_map(mem: &GuestMemoryMmap) -> Result<u64, vm_memory::GuestMemoryError> {
    for (addr, entry) in identity_map_entries() {
        mem.write_obj(entry, GuestAddress(addr))?;
    }
    Ok(PML4_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables like the MMU would for a 2 MiB page.
    fn translate(entries: &[(u64, u64)], va: u64) -> Option<u64> {
        let get = |a: u64| entries.iter().find(|(addr, _)| *addr == a).map(|(_, e)| *e);
        let pml4e = get(PML4_ADDR + ((va >> 39) & 0x1ff) * 8)?;
        let pdpte = get((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8)?;
        let pde = get((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8)?;
        assert_ne!(pde & PAGE_SIZE_2M, 0);
        Some((pde & !0x1f_ffff & 0x000f_ffff_ffff_f000) | (va & 0x1f_ffff))
    }

    #[test]
    fn first_four_gib_are_identity_mapped() {
        let e = identity_map_entries();
        for va in [
            0u64,
            0x7000,
            0x100_0000,
            0x3fff_ffff,
            0x4000_0000,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&e, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&e, 0x1_0000_0000), None);
    }

    #[test]
    fn tables_do_not_overlap() {
        let mut addrs: Vec<u64> = identity_map_entries().iter().map(|(a, _)| *a).collect();
        let n = addrs.len();
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), n);
        assert!(*addrs.last().unwrap() < PD_ADDR + PD_COUNT * 0x1000);
    }
}
