//! Kernel image checks (`hype_vmm::boot::image`): the bzImage setup header against the file
//! size, and an ELF's header, program header table, segments and entry point, all from the
//! input. They run before linux-loader sees a file, so they must never panic, whatever the
//! headers claim (offsets and sizes near u64::MAX included).
#![no_main]

use std::io::Cursor;
use std::path::Path;

use hype_vmm::boot::image::{check_bzimage, check_elf};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mem, image)) = data.split_first() else {
        return;
    };
    // Low RAM from 16 MiB to 4 GiB, as the VMM would have it.
    let ram_end = (u64::from(mem) + 1) << 24;
    let path = Path::new("fuzz");
    let size = image.len() as u64;
    if image.len() >= 0x206 {
        let _ = check_bzimage(path, &image[..0x206], size);
    }
    if check_elf(path, &mut Cursor::new(image), size, ram_end).is_ok() {
        // Accepted: a whole ELF64 header is in the input.
        assert!(image.len() >= 64);
    }
});
