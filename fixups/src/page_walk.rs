//! Walks of long-mode guest page tables: permission-blind ([`translate`]) and checked for data
//! accesses ([`translate_data`]).
//!
//! `KVM_TRANSLATE` checks access rights as a supervisor data read in the vCPU's current state,
//! so with CR4.SMAP set and RFLAGS.AC clear (every Linux entry path) it reports user pages as
//! unmapped, and it is one more ioctl (several microseconds on PVM). The SYSCALL check must
//! read the user's code from kernel mode, so [`super::KvmVcpuAccess`] walks the tables itself
//! in long mode and uses `KVM_TRANSLATE` only for other paging modes.
//!
//! Data accesses of the fix-ups that complete an instruction (`cmpxchg16b`'s write, the memory
//! operands of `ldmxcsr`, `stmxcsr`, `fxsave`, `fxrstor`) go through [`translate_data`] instead,
//! which checks the permissions hardware checks for a data read or write and reports the page
//! fault it would raise.

/// CR4.LA57: five-level paging.
const CR4_LA57: u64 = 1 << 12;
const PRESENT: u64 = 1 << 0;
/// Writable.
const RW: u64 = 1 << 1;
/// User-accessible.
const US: u64 = 1 << 2;
/// Accessed.
pub const ACCESSED: u64 = 1 << 5;
/// Dirty (leaf entries only).
pub const DIRTY: u64 = 1 << 6;
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

/// The privilege a data access is checked with, from the vCPU state at the instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataAccess {
    /// A user-mode (CPL 3) access.
    pub user: bool,
    /// CR0.WP: supervisor writes honour read-only pages.
    pub write_protect: bool,
    /// CR4.SMAP set and RFLAGS.AC clear: supervisor accesses to user pages fault.
    pub smap: bool,
}

/// Page-fault error code bits.
pub mod pf {
    /// The page was present (a protection violation).
    pub const PRESENT: u32 = 1 << 0;
    /// A write access.
    pub const WRITE: u32 = 1 << 1;
    /// A user-mode access.
    pub const USER: u32 = 1 << 2;
}

/// Whether a data access reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessKind {
    /// A data read.
    Read,
    /// A data write.
    Write,
}

/// Where a permitted access goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataTarget {
    /// Guest physical address of the byte at the virtual address.
    pub gpa: u64,
    /// Guest physical addresses of the paging entries walked, the leaf last; only the first
    /// `levels` are valid. The caller sets their accessed (and the leaf's dirty) bits.
    pub entries: [u64; 5],
    /// How many entries were walked.
    pub levels: usize,
}

/// Why an access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessFault {
    /// The page fault hardware raises, with its error code.
    PageFault {
        /// Error code (bits of [`pf`]).
        error_code: u32,
    },
    /// A paging-structure entry lies outside guest memory.
    TableUnreadable {
        /// Its guest physical address.
        gpa: u64,
    },
}

/// Translates `gva` for a data write with `access` ([`translate_data`] for a write).
pub fn translate_write(
    read_entry: impl Fn(u64) -> Option<u64>,
    cr3: u64,
    cr4: u64,
    gva: u64,
    access: DataAccess,
) -> Result<DataTarget, AccessFault> {
    translate_data(read_entry, cr3, cr4, gva, access, AccessKind::Write)
}

/// Translates `gva` for a data access of `kind` with `access`, through the 4- or 5-level page
/// tables at `cr3`, checking present, writable (writes only), user and SMAP as hardware does
/// (reserved bits and protection keys are not checked). The fault's error code has the write
/// and user bits of the access.
pub fn translate_data(
    read_entry: impl Fn(u64) -> Option<u64>,
    cr3: u64,
    cr4: u64,
    gva: u64,
    access: DataAccess,
    kind: AccessKind,
) -> Result<DataTarget, AccessFault> {
    let write = kind == AccessKind::Write;
    let base_code = if write { pf::WRITE } else { 0 } | if access.user { pf::USER } else { 0 };
    let levels: u32 = if cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let mut table = cr3 & ADDR_MASK;
    let mut target = DataTarget {
        gpa: 0,
        entries: [0; 5],
        levels: 0,
    };
    let mut writable = true;
    let mut user = true;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (gva >> shift) & 0x1ff;
        let entry_gpa = table + index * 8;
        let entry = read_entry(entry_gpa).ok_or(AccessFault::TableUnreadable { gpa: entry_gpa })?;
        if entry & PRESENT == 0 {
            return Err(AccessFault::PageFault {
                error_code: base_code,
            });
        }
        target.entries[target.levels] = entry_gpa;
        target.levels += 1;
        writable &= entry & RW != 0;
        user &= entry & US != 0;
        let offset_mask = (1u64 << shift) - 1;
        let leaf = level == 1 || ((level == 2 || level == 3) && entry & PAGE_SIZE_BIT != 0);
        if leaf {
            let read_only = write && !writable;
            let protection = if access.user {
                !user || read_only
            } else {
                (user && access.smap) || (read_only && access.write_protect)
            };
            if protection {
                return Err(AccessFault::PageFault {
                    error_code: base_code | pf::PRESENT,
                });
            }
            target.gpa = (entry & ADDR_MASK & !offset_mask) | (gva & offset_mask);
            return Ok(target);
        }
        table = entry & ADDR_MASK;
    }
    // Unreachable for levels >= 1: level 1 is always a leaf.
    Err(AccessFault::PageFault {
        error_code: base_code,
    })
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

    const KERNEL: DataAccess = DataAccess {
        user: false,
        write_protect: true,
        smap: true,
    };

    /// One 4 KiB page at `gva` mapped to `page` with leaf flags `leaf` and upper flags `upper`.
    fn one_page(gva: u64, page: u64, upper: u64, leaf: u64) -> Tables {
        let mut t = HashMap::new();
        t.insert(0x1000 + idx(gva, 4) * 8, 0x2000 | upper);
        t.insert(0x2000 + idx(gva, 3) * 8, 0x3000 | upper);
        t.insert(0x3000 + idx(gva, 2) * 8, 0x4000 | upper);
        t.insert(0x4000 + idx(gva, 1) * 8, page | leaf);
        Tables(t)
    }

    #[test]
    fn write_to_writable_pages() {
        let gva = 0xffff_8880_0123_4560_u64;
        let t = one_page(gva, 0x77_7000, 3, 3);
        let w = translate_write(t.read(), 0x1000, 0, gva, KERNEL).unwrap();
        assert_eq!(w.gpa, 0x77_7560);
        assert_eq!(w.levels, 4);
        assert_eq!(w.entries[3], 0x4000 + idx(gva, 1) * 8);
        assert_eq!(w.entries[0], 0x1000 + idx(gva, 4) * 8);
        // A user page written from user mode.
        let t = one_page(gva, 0x77_7000, 7, 7);
        let user = DataAccess {
            user: true,
            ..KERNEL
        };
        assert_eq!(
            translate_write(t.read(), 0x1000, 0, gva, user).unwrap().gpa,
            0x77_7560
        );
    }

    #[test]
    fn write_faults_like_hardware() {
        let gva = 0x7f00_0000_1010_u64;
        let user = DataAccess {
            user: true,
            ..KERNEL
        };
        let fault = |t: &Tables, access| translate_write(t.read(), 0x1000, 0, gva, access);
        let pf_code = |error_code| Err(AccessFault::PageFault { error_code });
        // Not present: P=0.
        let t = one_page(gva, 0x5000, 7, 6);
        assert_eq!(fault(&t, user), pf_code(pf::WRITE | pf::USER));
        assert_eq!(fault(&t, KERNEL), pf_code(pf::WRITE));
        // Read-only leaf (copy-on-write): user faults; supervisor faults only with CR0.WP.
        let t = one_page(gva, 0x5000, 7, 5);
        assert_eq!(fault(&t, user), pf_code(pf::PRESENT | pf::WRITE | pf::USER));
        let no_smap = DataAccess {
            smap: false,
            ..KERNEL
        };
        assert_eq!(fault(&t, no_smap), pf_code(pf::PRESENT | pf::WRITE));
        let no_wp = DataAccess {
            write_protect: false,
            ..no_smap
        };
        assert_eq!(fault(&t, no_wp).unwrap().gpa, 0x5010);
        // Read-only upper level counts too.
        let t = one_page(gva, 0x5000, 5, 7);
        assert_eq!(fault(&t, user), pf_code(pf::PRESENT | pf::WRITE | pf::USER));
        // Supervisor page from user mode.
        let t = one_page(gva, 0x5000, 3, 3);
        assert_eq!(fault(&t, user), pf_code(pf::PRESENT | pf::WRITE | pf::USER));
        // User page from the kernel: SMAP faults unless AC (smap: false).
        let t = one_page(gva, 0x5000, 7, 7);
        assert_eq!(fault(&t, KERNEL), pf_code(pf::PRESENT | pf::WRITE));
        assert_eq!(fault(&t, no_smap).unwrap().gpa, 0x5010);
        // A missing table is not a page fault but a VMM-side failure.
        let t = Tables(HashMap::new());
        assert_eq!(
            fault(&t, KERNEL),
            Err(AccessFault::TableUnreadable {
                gpa: 0x1000 + idx(gva, 4) * 8
            })
        );
    }

    #[test]
    fn write_through_a_2m_page() {
        let gva = 0xffff_ffff_8123_4570_u64;
        let mut t = HashMap::new();
        t.insert(0x1000 + idx(gva, 4) * 8, 0x5000 | 3);
        t.insert(0x5000 + idx(gva, 3) * 8, 0x6000 | 3);
        t.insert(0x6000 + idx(gva, 2) * 8, 0x4000_0000 | 0x83);
        let t = Tables(t);
        let w = translate_write(t.read(), 0x1000, 0, gva, KERNEL).unwrap();
        assert_eq!(w.gpa, 0x4000_0000 | (gva & 0x1f_ffff));
        assert_eq!(w.levels, 3);
        assert_eq!(w.entries[2], 0x6000 + idx(gva, 2) * 8);
    }

    #[test]
    fn reads_fault_like_hardware() {
        let gva = 0x7f00_0000_2020_u64;
        let user = DataAccess {
            user: true,
            ..KERNEL
        };
        let read =
            |t: &Tables, access| translate_data(t.read(), 0x1000, 0, gva, access, AccessKind::Read);
        let pf_code = |error_code| Err(AccessFault::PageFault { error_code });
        // Read-only pages are readable by everyone.
        let t = one_page(gva, 0x5000, 7, 5);
        assert_eq!(read(&t, user).unwrap().gpa, 0x5020);
        let t = one_page(gva, 0x5000, 5, 5);
        let no_smap = DataAccess {
            smap: false,
            ..KERNEL
        };
        assert_eq!(read(&t, no_smap).unwrap().gpa, 0x5020);
        // Not present: no W bit in the code.
        let t = one_page(gva, 0x5000, 7, 6);
        assert_eq!(read(&t, user), pf_code(pf::USER));
        assert_eq!(read(&t, KERNEL), pf_code(0));
        // Supervisor page read from user mode; user page read by the kernel under SMAP.
        let t = one_page(gva, 0x5000, 3, 3);
        assert_eq!(read(&t, user), pf_code(pf::PRESENT | pf::USER));
        assert_eq!(read(&t, KERNEL).unwrap().gpa, 0x5020);
        let t = one_page(gva, 0x5000, 7, 7);
        assert_eq!(read(&t, KERNEL), pf_code(pf::PRESENT));
        assert_eq!(read(&t, no_smap).unwrap().gpa, 0x5020);
        // The walk is reported for the accessed bits.
        let w = read(&t, user).unwrap();
        assert_eq!(w.levels, 4);
        assert_eq!(w.entries[3], 0x4000 + idx(gva, 1) * 8);
    }
}
