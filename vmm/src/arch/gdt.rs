//! The boot GDT.
//!
//! Linux's 64-bit boot protocol wants `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18 (flat 4 GiB
//! segments); PVH wants a flat 32-bit code segment. One table serves both.

use kvm_bindings::kvm_segment;

/// Selector of the 32-bit flat code segment (PVH entry).
pub const CODE32_SELECTOR: u16 = 0x08;
/// Selector of the 64-bit code segment (`__BOOT_CS`).
pub const CODE64_SELECTOR: u16 = 0x10;
/// Selector of the flat data segment (`__BOOT_DS`).
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x20;

/// Builds a segment descriptor from access/flags bits (`flags` holds the 0xF0FF pattern used in
/// the manuals: high nibble = G, D/B, L, AVL; low byte = access), base and limit.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The table loaded at boot, indexed by selector / 8.
pub fn boot_gdt() -> [u64; 5] {
    [
        0,                              // null
        descriptor(0xc09b, 0, 0xfffff), // 32-bit code, 4 GiB, accessed
        descriptor(0xa09b, 0, 0xfffff), // 64-bit code (L=1)
        descriptor(0xc093, 0, 0xfffff), // data, 4 GiB, accessed
        descriptor(0x808b, 0, 0xfffff), // 32/64-bit busy TSS
    ]
}

/// Decodes a descriptor into the form KVM's segment registers take.
pub fn segment_from_descriptor(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Segment for a selector of [`boot_gdt`].
pub fn boot_segment(selector: u16) -> kvm_segment {
    let gdt = boot_gdt();
    segment_from_descriptor(gdt[usize::from(selector >> 3)], selector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_is_long_mode_ring0() {
        let s = boot_segment(CODE64_SELECTOR);
        assert_eq!(
            (s.l, s.db, s.dpl, s.present, s.s, s.type_),
            (1, 0, 0, 1, 1, 0xb)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.base, 0);
    }

    #[test]
    fn code32_is_flat_32bit() {
        let s = boot_segment(CODE32_SELECTOR);
        assert_eq!((s.l, s.db, s.g), (0, 1, 1));
        assert_eq!(s.limit, 0xffff_ffff);
    }

    #[test]
    fn data_is_writable_flat() {
        let s = boot_segment(DATA_SELECTOR);
        assert_eq!(s.type_, 0x3);
        assert_eq!((s.db, s.g, s.limit), (1, 1, 0xffff_ffff));
    }

    #[test]
    fn tss_is_busy_system_segment() {
        let s = boot_segment(TSS_SELECTOR);
        assert_eq!((s.s, s.type_, s.present), (0, 0xb, 1));
    }

    #[test]
    fn descriptor_packs_base_and_limit() {
        let d = descriptor(0xc093, 0x1234_5678, 0xabcde);
        let s = segment_from_descriptor(d, 0x18);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, (0xabcde << 12) | 0xfff);
    }
}
