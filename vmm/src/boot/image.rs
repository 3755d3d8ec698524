//! Checks of a kernel or initrd file before anything is loaded from it: that it is a regular
//! file (opened without blocking, so a FIFO cannot stall the VMM), and that the headers of a
//! bzImage or an ELF vmlinux describe what the file really holds. Each problem has its own
//! one-line error ([`ImageError`]); linux-loader's own checks stay behind these as a second
//! line.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// ELF `e_machine` of x86-64.
const EM_X86_64: u16 = 62;
/// ELF program header type of a loadable segment.
const PT_LOAD: u32 = 1;
/// Size of an ELF64 file header.
const EHDR_SIZE: usize = 64;
/// Size of an ELF64 program header.
const PHDR_SIZE: u16 = 56;
/// Most program headers hype reads (a vmlinux has about five).
const MAX_PHDRS: u16 = 64;

/// What is wrong with a kernel image.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// Not a regular file (a directory, FIFO, device or socket).
    #[error("{what} {path} is not a regular file")]
    NotRegular {
        /// "kernel" or "initrd".
        what: &'static str,
        /// Path.
        path: PathBuf,
    },
    /// bzImage whose `syssize` claims more than the file holds.
    #[error(
        "bzImage {path} is truncated: its header says {needs} bytes (setup and syssize), the file has {size}"
    )]
    BzImageTruncated {
        /// Path.
        path: PathBuf,
        /// Bytes the header promises.
        needs: u64,
        /// Bytes the file has.
        size: u64,
    },
    /// Shorter than an ELF64 file header.
    #[error("ELF kernel {path} is {size} bytes, shorter than an ELF64 header (64)")]
    ElfHeader {
        /// Path.
        path: PathBuf,
        /// File size.
        size: u64,
    },
    /// Not a 64-bit little-endian ELF.
    #[error("ELF kernel {path} is not 64-bit little-endian (class {class}, data {data})")]
    ElfClass {
        /// Path.
        path: PathBuf,
        /// EI_CLASS.
        class: u8,
        /// EI_DATA.
        data: u8,
    },
    /// Not for x86-64.
    #[error("ELF kernel {path} is for machine {machine}, not x86-64 (62)")]
    ElfMachine {
        /// Path.
        path: PathBuf,
        /// e_machine.
        machine: u16,
    },
    /// The program header table is missing, oddly sized, too long or outside the file.
    #[error("ELF kernel {path} has a bad program header table: {reason}")]
    ElfProgramHeaders {
        /// Path.
        path: PathBuf,
        /// What is wrong (this error's own detail).
        reason: String,
    },
    /// A loadable segment lies outside the file or outside guest RAM.
    #[error("ELF kernel {path}: segment {index} {reason}")]
    ElfSegment {
        /// Path.
        path: PathBuf,
        /// Program header index.
        index: u16,
        /// What is wrong (this error's own detail).
        reason: String,
    },
    /// The entry point is in no loadable segment.
    #[error("ELF kernel {path}: entry point {entry:#x} is in no loadable segment")]
    ElfEntry {
        /// Path.
        path: PathBuf,
        /// e_entry.
        entry: u64,
    },
}

/// Opens `path` for reading without blocking on a FIFO, and checks that it is a regular file.
/// Returns the file and its size. `what` names it in errors ("kernel", "initrd").
pub fn open_regular(path: &Path, what: &'static str) -> Result<(File, u64), OpenError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(OpenError::Io)?;
    let meta = file.metadata().map_err(OpenError::Io)?;
    if !meta.is_file() {
        return Err(OpenError::Image(ImageError::NotRegular {
            what,
            path: path.to_owned(),
        }));
    }
    Ok((file, meta.len()))
}

/// Why [`open_regular`] failed.
#[derive(Debug)]
pub enum OpenError {
    /// open() or fstat() failed.
    Io(io::Error),
    /// It is not a regular file.
    Image(ImageError),
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    b.get(o..o + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

/// Checks a bzImage's setup header (`head`: at least the first 0x206 bytes) against the file
/// size: the setup sectors plus `syssize` 16-byte paragraphs must be in the file. (The build
/// tool rounds `syssize` up to whole paragraphs, so up to 15 bytes past the end are allowed.)
pub fn check_bzimage(path: &Path, head: &[u8], size: u64) -> Result<(), ImageError> {
    let setup_sects = match head.get(0x1f1).copied().unwrap_or(0) {
        0 => 4,
        n => u64::from(n),
    };
    let syssize = u64::from(u32_at(head, 0x1f4));
    let needs = (setup_sects + 1) * 512 + syssize * 16;
    if needs > size.saturating_add(15) {
        return Err(ImageError::BzImageTruncated {
            path: path.to_owned(),
            needs,
            size,
        });
    }
    Ok(())
}

/// Checks an ELF kernel read from `file` (`size` bytes): 64-bit little-endian, x86-64, a
/// program header table inside the file, every PT_LOAD segment's bytes inside the file and
/// its memory inside `[0, ram_end)`, and the entry point inside a PT_LOAD segment.
pub fn check_elf<R: Read + Seek>(
    path: &Path,
    file: &mut R,
    size: u64,
    ram_end: u64,
) -> Result<(), ImageError> {
    let mut ehdr = [0u8; EHDR_SIZE];
    let bad_ph = |reason: String| ImageError::ElfProgramHeaders {
        path: path.to_owned(),
        reason,
    };
    if read_at(file, 0, &mut ehdr).is_err() {
        return Err(ImageError::ElfHeader {
            path: path.to_owned(),
            size,
        });
    }
    let (class, data) = (ehdr[4], ehdr[5]);
    if class != 2 || data != 1 {
        return Err(ImageError::ElfClass {
            path: path.to_owned(),
            class,
            data,
        });
    }
    let machine = u16_at(&ehdr, 18);
    if machine != EM_X86_64 {
        return Err(ImageError::ElfMachine {
            path: path.to_owned(),
            machine,
        });
    }
    let entry = u64_at(&ehdr, 24);
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u16_at(&ehdr, 54);
    let phnum = u16_at(&ehdr, 56);
    if phnum == 0 {
        return Err(bad_ph("there are none".into()));
    }
    if phentsize != PHDR_SIZE {
        return Err(bad_ph(format!(
            "entries are {phentsize} bytes, not {PHDR_SIZE}"
        )));
    }
    if phnum > MAX_PHDRS {
        return Err(bad_ph(format!("{phnum} entries, at most {MAX_PHDRS}")));
    }
    let table_len = u64::from(phnum) * u64::from(PHDR_SIZE);
    if phoff.checked_add(table_len).is_none_or(|end| end > size) {
        return Err(bad_ph(format!(
            "{table_len} bytes at {phoff:#x} run past the end of the file ({size} bytes)"
        )));
    }
    let mut table = vec![0u8; table_len as usize];
    read_at(file, phoff, &mut table).map_err(|e| bad_ph(format!("cannot be read ({e})")))?;
    let mut entry_found = false;
    let mut loads = 0;
    for index in 0..phnum {
        let ph = &table[usize::from(index) * usize::from(PHDR_SIZE)..];
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        loads += 1;
        let offset = u64_at(ph, 8);
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        let seg = |reason: String| ImageError::ElfSegment {
            path: path.to_owned(),
            index,
            reason,
        };
        if offset.checked_add(filesz).is_none_or(|end| end > size) {
            return Err(seg(format!(
                "has {filesz} bytes at file offset {offset:#x}, past the end of the file ({size} bytes)"
            )));
        }
        if filesz > memsz {
            return Err(seg(format!(
                "has more bytes in the file ({filesz}) than in memory ({memsz})"
            )));
        }
        match paddr.checked_add(memsz) {
            Some(end) if end <= ram_end => {}
            _ => {
                return Err(seg(format!(
                    "at {paddr:#x} ({memsz} bytes) does not fit below the end of low guest RAM {ram_end:#x}"
                )))
            }
        }
        if entry >= paddr && entry - paddr < memsz.max(1) {
            entry_found = true;
        }
    }
    if loads == 0 {
        return Err(bad_ph("no loadable (PT_LOAD) segment".into()));
    }
    if !entry_found {
        return Err(ImageError::ElfEntry {
            path: path.to_owned(),
            entry,
        });
    }
    Ok(())
}

fn read_at<R: Read + Seek>(file: &mut R, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF64 x86-64 header with `phnum` program headers at offset 64, entry `entry`.
    fn elf(entry: u64, segments: &[(u32, u64, u64, u64, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&PHDR_SIZE.to_le_bytes());
        b[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for &(kind, offset, paddr, filesz, memsz) in segments {
            let mut ph = vec![0u8; 56];
            ph[0..4].copy_from_slice(&kind.to_le_bytes());
            ph[8..16].copy_from_slice(&offset.to_le_bytes());
            ph[16..24].copy_from_slice(&paddr.to_le_bytes());
            ph[24..32].copy_from_slice(&paddr.to_le_bytes());
            ph[32..40].copy_from_slice(&filesz.to_le_bytes());
            ph[40..48].copy_from_slice(&memsz.to_le_bytes());
            b.extend(ph);
        }
        b.resize(0x1000, 0xcc);
        b
    }

    fn check(bytes: &[u8]) -> Result<(), ImageError> {
        let dir = std::env::temp_dir().join(format!("hype-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let p = dir.join(format!(
            "k{}",
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::write(&p, bytes).unwrap();
        let (mut f, size) = open_regular(&p, "kernel").map_err(|_| ()).unwrap();
        let r = check_elf(Path::new("k"), &mut f, size, 64 << 20);
        let _ = std::fs::remove_file(&p);
        r
    }

    const GOOD: (u32, u64, u64, u64, u64) = (PT_LOAD, 0x200, 0x20_0000, 0x100, 0x2000);

    #[test]
    fn a_sane_elf_passes() {
        check(&elf(0x20_0000, &[GOOD])).unwrap();
        check(&elf(0x20_1000, &[(4, 0, 0, 0, 0), GOOD])).unwrap();
    }

    #[test]
    fn each_elf_problem_has_its_own_error() {
        let mut b = elf(0x20_0000, &[GOOD]);
        b[4] = 1;
        assert!(matches!(
            check(&b),
            Err(ImageError::ElfClass { class: 1, .. })
        ));
        let mut b = elf(0x20_0000, &[GOOD]);
        b[5] = 2;
        assert!(matches!(
            check(&b),
            Err(ImageError::ElfClass { data: 2, .. })
        ));
        let mut b = elf(0x20_0000, &[GOOD]);
        b[18] = 40; // ARM
        assert!(matches!(
            check(&b),
            Err(ImageError::ElfMachine { machine: 40, .. })
        ));
        let e = check(&elf(0x20_0000, &[])).unwrap_err();
        assert!(
            e.to_string()
                .contains("program header table: there are none"),
            "{e}"
        );
        let mut b = elf(0x20_0000, &[GOOD]);
        b[32..40].copy_from_slice(&0xffff_ffff_ffff_fff0u64.to_le_bytes());
        let e = check(&b).unwrap_err();
        assert!(
            e.to_string().contains("run past the end of the file"),
            "{e}"
        );
        let mut b = elf(0x20_0000, &[GOOD]);
        b[54] = 32;
        assert!(matches!(
            check(&b),
            Err(ImageError::ElfProgramHeaders { .. })
        ));
        let e = check(&elf(
            0x20_0000,
            &[(PT_LOAD, 0x800, 0x20_0000, 0x1000, 0x2000)],
        ))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("segment 0 has 4096 bytes at file offset 0x800, past the end"),
            "{e}"
        );
        let e = check(&elf(
            0x20_0000,
            &[(PT_LOAD, 0x200, 0x20_0000, 0x300, 0x100)],
        ))
        .unwrap_err();
        assert!(e.to_string().contains("more bytes in the file"), "{e}");
        let e = check(&elf(
            0x20_0000,
            &[(PT_LOAD, 0x200, 0x3fff_0000, 0x100, 0x2000)],
        ))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("does not fit below the end of low guest RAM"),
            "{e}"
        );
        let e = check(&elf(
            0x20_0000,
            &[(PT_LOAD, 0x200, u64::MAX - 4, 0x100, 0x2000)],
        ))
        .unwrap_err();
        assert!(matches!(e, ImageError::ElfSegment { index: 0, .. }), "{e}");
        let e = check(&elf(0x90_0000, &[GOOD])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ELF kernel k: entry point 0x900000 is in no loadable segment"
        );
        let e = check(&b"\x7fELF\x02\x01"[..]).unwrap_err();
        assert!(
            e.to_string().contains("shorter than an ELF64 header"),
            "{e}"
        );
    }

    #[test]
    fn bzimage_syssize_is_checked_against_the_file() {
        let mut head = vec![0u8; 0x206];
        head[0x1f1] = 1; // 2 sectors of setup with the boot sector
        head[0x1f4..0x1f8].copy_from_slice(&100u32.to_le_bytes());
        check_bzimage(Path::new("b"), &head, 1024 + 1600).unwrap();
        // Rounded up by the build tool: a few bytes short are fine, more are not.
        check_bzimage(Path::new("b"), &head, 1024 + 1590).unwrap();
        let e = check_bzimage(Path::new("b"), &head, 1024 + 1000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bzImage b is truncated: its header says 2624 bytes (setup and syssize), the file has 2024"
        );
        head[0x1f1] = 0; // means 4
        head[0x1f4..0x1f8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(check_bzimage(Path::new("b"), &head, 1 << 20).is_err());
    }

    #[test]
    fn only_regular_files_open() {
        let dir = std::env::temp_dir().join(format!("hype-image-reg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(
            open_regular(&dir, "kernel"),
            Err(OpenError::Image(ImageError::NotRegular {
                what: "kernel",
                ..
            }))
        ));
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Would block forever in a plain open() without a writer.
        assert!(matches!(
            open_regular(&fifo, "initrd"),
            Err(OpenError::Image(ImageError::NotRegular {
                what: "initrd",
                ..
            }))
        ));
        assert!(matches!(
            open_regular(Path::new("/dev/null"), "kernel"),
            Err(OpenError::Image(ImageError::NotRegular { .. }))
        ));
        assert!(matches!(
            open_regular(&dir.join("missing"), "kernel"),
            Err(OpenError::Io(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
