//! A permission-blind walk of long-mode guest page tables.
//!
//! `KVM_TRANSLATE` checks access rights as a supervisor data read in the vCPU's current state,
//! so with CR4.SMAP set and RFLAGS.AC clear (every Linux entry path) it reports user pages as
//! unmapped, and it is one more ioctl (several microseconds on PVM). The SYSCALL check must
//! read the user's code from kernel mode, so [`super::KvmVcpuAccess`] walks the tables itself
//! in long mode and uses `KVM_TRANSLATE` only for other paging modes.

/// CR4.LA57: five-level paging.
const CR4_LA57: u64 = 1 << 12;
const PRESENT: u64 = 1 << 0;
/// Page-size bit in PDPTEs (1 GiB) and PDEs (2 MiB).
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Physical-address bits 51:12 of an entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translates `gva` through the 4- or 5-level page tables at `cr3`, reading 8-byte entries
/// with `read_entry(gpa)`. Returns `None` for a non-present entry or an unreadable table.
pub fn translate(
    read_entry: impl Fn(u64) -> Option<u64>,
    cr3: u64,
    cr4: u64,
    gva: u64,
) -> Option<u64> {
    let levels: u32 = if cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let mut table = cr3 & ADDR_MASK;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (gva >> shift) & 0x1ff;
        let entry = read_entry(table + index * 8)?;
        if entry & PRESENT == 0 {
            return None;
        }
        let offset_mask = (1u64 << shift) - 1;
        if (level == 2 || level == 3) && entry & PAGE_SIZE_BIT != 0 {
            return Some((entry & ADDR_MASK & !offset_mask) | (gva & offset_mask));
        }
        if level == 1 {
            return Some((entry & ADDR_MASK) | (gva & offset_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Tables(HashMap<u64, u64>);

    impl Tables {
        fn read(&self) -> impl Fn(u64) -> Option<u64> + '_ {
            |gpa| self.0.get(&gpa).copied()
        }
    }

    fn idx(gva: u64, level: u32) -> u64 {
        (gva >> (12 + 9 * (level - 1))) & 0x1ff
    }

    #[test]
    fn four_level_4k_2m_and_1g_pages() {
        let gva_4k = 0x0000_7f12_3456_7abc_u64;
        let gva_2m = 0xffff_ffff_8123_4567_u64;
        let gva_1g = 0xffff_8880_4123_4567_u64;
        let mut t = HashMap::new();
        let pml4 = 0x1000;
        // 4 KiB: pml4 -> 0x2000 -> 0x3000 -> 0x4000 -> page 0x12345000 (NX and flags set)
        t.insert(pml4 + idx(gva_4k, 4) * 8, 0x2000 | 0x67);
        t.insert(0x2000 + idx(gva_4k, 3) * 8, 0x3000 | 0x67);
        t.insert(0x3000 + idx(gva_4k, 2) * 8, 0x4000 | 0x67);
        t.insert(0x4000 + idx(gva_4k, 1) * 8, 0x8000_0000_1234_5000 | 0x65);
        // 2 MiB page at 0x4000_0000 (PAT bit 12 set in the entry must not leak)
        t.insert(pml4 + idx(gva_2m, 4) * 8, 0x5000 | 3);
        t.insert(0x5000 + idx(gva_2m, 3) * 8, 0x6000 | 3);
        t.insert(0x6000 + idx(gva_2m, 2) * 8, 0x4000_0000 | 0x1000 | 0x83);
        // 1 GiB page at 0x1_0000_0000
        t.insert(pml4 + idx(gva_1g, 4) * 8, 0x7000 | 3);
        t.insert(0x7000 + idx(gva_1g, 3) * 8, 0x1_0000_0000 | 0x83);
        let t = Tables(t);
        assert_eq!(translate(t.read(), pml4, 0, gva_4k), Some(0x1234_5abc));
        assert_eq!(
            translate(t.read(), pml4, 0, gva_2m),
            Some(0x4000_0000 | (gva_2m & 0x1f_ffff))
        );
        assert_eq!(
            translate(t.read(), pml4, 0, gva_1g),
            Some(0x1_0000_0000 | (gva_1g & 0x3fff_ffff))
        );
        // CR3 flag bits (PCID, PWT/PCD) are ignored.
        assert_eq!(
            translate(t.read(), pml4 | 0x18, 0, gva_4k),
            Some(0x1234_5abc)
        );
    }

    #[test]
    fn not_present_or_missing_tables_fail() {
        let gva = 0x40_1000;
        let mut t = HashMap::new();
        t.insert(0x1000 + idx(gva, 4) * 8, 0x2000 | 3);
        t.insert(0x2000 + idx(gva, 3) * 8, 0x3000 | 3);
        t.insert(0x3000 + idx(gva, 2) * 8, 0x4000 | 3);
        t.insert(0x4000 + idx(gva, 1) * 8, 0x9000); // not present
        let t = Tables(t);
        assert_eq!(translate(t.read(), 0x1000, 0, gva), None);
        assert_eq!(translate(t.read(), 0x1000, 0, gva + 0x1000), None);
        assert_eq!(translate(t.read(), 0x1000, 0, 0x8000_0000_0000), None);
    }

    #[test]
    fn five_level() {
        let gva = 0xff11_2233_4455_6677_u64;
        let mut t = HashMap::new();
        t.insert(0x1000 + idx(gva, 5) * 8, 0x2000 | 3);
        t.insert(0x2000 + idx(gva, 4) * 8, 0x3000 | 3);
        t.insert(0x3000 + idx(gva, 3) * 8, 0x4000 | 3);
        t.insert(0x4000 + idx(gva, 2) * 8, 0x5000 | 3);
        t.insert(0x5000 + idx(gva, 1) * 8, 0xabc_d000 | 3);
        let t = Tables(t);
        assert_eq!(translate(t.read(), 0x1000, CR4_LA57, gva), Some(0xabc_d677));
        // Without LA57 the same tables are walked as 4 levels and miss.
        assert_eq!(translate(t.read(), 0x1000, 0, gva), None);
    }
}
