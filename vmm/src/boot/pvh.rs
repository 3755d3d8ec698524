//! PVH boot: `hvm_start_info` (version 1), its memory map and module list (the initrd).

use vm_memory::{Bytes, GuestAddress};

use crate::arch::e820::E820Entry;
use crate::layout::{
    CMDLINE_ADDR, PVH_INFO_ADDR, PVH_MEMMAP_ADDR, PVH_MEMMAP_MAX_ENTRIES, PVH_MODLIST_ADDR,
};
use crate::memory::GuestMemoryMmap;

// The PVH structures must not overlap each other or the zero page.
const _: () = assert!(PVH_INFO_ADDR + 56 <= PVH_MODLIST_ADDR);
const _: () = assert!(PVH_MODLIST_ADDR + 32 <= PVH_MEMMAP_ADDR);
const _: () =
    assert!(PVH_MEMMAP_ADDR + 24 * PVH_MEMMAP_MAX_ENTRIES as u64 <= crate::layout::ZERO_PAGE_ADDR);

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Serialises `hvm_start_info` (56 bytes); `rsdp` 0 means none.
pub fn start_info(nr_modules: u32, memmap_entries: u32, rsdp: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(56);
    b.extend_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // version
    b.extend_from_slice(&0u32.to_le_bytes()); // flags
    b.extend_from_slice(&nr_modules.to_le_bytes());
    b.extend_from_slice(&(if nr_modules > 0 { PVH_MODLIST_ADDR } else { 0 }).to_le_bytes());
    b.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    b.extend_from_slice(&rsdp.to_le_bytes()); // rsdp_paddr
    b.extend_from_slice(&PVH_MEMMAP_ADDR.to_le_bytes());
    b.extend_from_slice(&memmap_entries.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b
}

/// Serialises the memory map (24 bytes an entry).
pub fn memmap(map: &[E820Entry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(map.len() * 24);
    for e in map.iter().take(PVH_MEMMAP_MAX_ENTRIES) {
        b.extend_from_slice(&e.addr.to_le_bytes());
        b.extend_from_slice(&e.size.to_le_bytes());
        b.extend_from_slice(&e.kind.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
    }
    b
}

/// Serialises one module entry (32 bytes).
pub fn module(addr: u64, size: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(&addr.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // cmdline_paddr
    b.extend_from_slice(&0u64.to_le_bytes());
    b
}

/// Writes all PVH structures.
pub fn write(
    mem: &GuestMemoryMmap,
    map: &[E820Entry],
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<(), vm_memory::GuestMemoryError> {
    let entries = map.len().min(PVH_MEMMAP_MAX_ENTRIES) as u32;
    let modules = u32::from(initrd.is_some());
    mem.write_slice(
        &start_info(modules, entries, rsdp.unwrap_or(0)),
        GuestAddress(PVH_INFO_ADDR),
    )?;
    mem.write_slice(&memmap(map), GuestAddress(PVH_MEMMAP_ADDR))?;
    if let Some((addr, size)) = initrd {
        mem.write_slice(&module(addr, size), GuestAddress(PVH_MODLIST_ADDR))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::e820::memory_map;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn start_info_layout() {
        let s = start_info(1, 4, 0xe0000);
        assert_eq!(s.len(), 56);
        assert_eq!(u32_at(&s, 0), XEN_HVM_START_MAGIC);
        assert_eq!(u32_at(&s, 4), 1);
        assert_eq!(u32_at(&s, 12), 1);
        assert_eq!(u64_at(&s, 16), PVH_MODLIST_ADDR);
        assert_eq!(u64_at(&s, 24), CMDLINE_ADDR);
        assert_eq!(u64_at(&s, 32), 0xe0000);
        assert_eq!(u64_at(&s, 40), PVH_MEMMAP_ADDR);
        assert_eq!(u32_at(&s, 48), 4);
        assert_eq!(u64_at(&start_info(0, 4, 0), 16), 0);
        assert_eq!(u64_at(&start_info(0, 4, 0), 32), 0);
    }

    #[test]
    fn memmap_layout() {
        let map = memory_map(128 << 20);
        let m = memmap(&map);
        assert_eq!(m.len(), map.len() * 24);
        let last = (map.len() - 1) * 24;
        assert_eq!(u64_at(&m, last), map[map.len() - 1].addr);
        assert_eq!(u64_at(&m, last + 8), map[map.len() - 1].size);
        assert_eq!(u32_at(&m, last + 16), 1);
    }
}
