//! The Linux zero page (`struct boot_params`) for the 64-bit boot protocol.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use crate::arch::e820::E820Entry;
use crate::layout::CMDLINE_ADDR;

/// "Undefined" boot loader ID, as used by boot loaders without an assigned one.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags`: the heap_end_ptr field is valid.
pub const CAN_USE_HEAP: u8 = 0x80;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// Builds the zero page: the image's setup header (or a minimal one for an ELF entry), the
/// command line, the initrd, and the e820 map (entries past 128 are dropped).
pub fn build(
    image_header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    map: &[E820Entry],
) -> boot_params {
    let mut params = boot_params {
        hdr: image_header.unwrap_or(setup_header {
            boot_flag: BOOT_FLAG_MAGIC,
            header: HDRS_MAGIC,
            kernel_alignment: DEFAULT_KERNEL_ALIGNMENT,
            ..Default::default()
        }),
        ..Default::default()
    };
    let hdr = &mut params.hdr;
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.loadflags |= CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    hdr.vid_mode = 0xffff;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = (cmdline_len + 1) as u32;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    let n = map.len().min(params.e820_table.len());
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = n as u8;
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::e820::memory_map;

    #[test]
    fn fields_from_header_and_loader() {
        let img = setup_header {
            version: 0x020f,
            header: HDRS_MAGIC,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            xloadflags: 1,
            loadflags: 1,
            ..Default::default()
        };
        let map = memory_map(256 << 20);
        let p = build(Some(img), 42, Some((0xf00_0000, 0x1234)), &map);
        let hdr = p.hdr;
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.code32_start }, 0x10_0000);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.loadflags }, 1 | CAN_USE_HEAP);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0xf00_0000, 0x1234)
        );
        assert_eq!(p.e820_entries as usize, map.len());
        let last = p.e820_table[map.len() - 1];
        let (a, s, t) = (last.addr, last.size, last.r#type);
        assert_eq!((a, a + s, t), (0x10_0000, 256 << 20, 1));
    }

    #[test]
    fn minimal_header_for_elf_entry() {
        let p = build(None, 0, None, &memory_map(64 << 20));
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.ramdisk_image }, 0);
    }
}
