//! Guest memory in a snapshot: `memory.bin` mirrors the guest's memfd byte for byte (offset in
//! the file = offset in the memfd), written sparse. Only the memfd's data extents are read
//! (`SEEK_DATA`/`SEEK_HOLE`, so RAM the guest never touched is never read or allocated), and of
//! those only pages that are not all zero are written; the rest of the file is a hole.
//!
//! The checksum is the CRC-32 over every page written, in ascending offset order, each page
//! preceded by its offset as a little-endian `u64`; restoring recomputes it over the same pages.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::crc::Crc32;

/// Page granularity of the sparse copy.
pub const PAGE: usize = 4096;
/// Bytes copied per read.
const CHUNK: usize = 1 << 20;

/// What was written (or read back).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagesSummary {
    /// Non-zero pages.
    pub pages: u64,
    /// Their checksum (see the module doc).
    pub crc32: u32,
}

/// `lseek(fd, offset, whence)` for `SEEK_DATA`/`SEEK_HOLE`; `None` past the last data.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a descriptor we own; it changes only the file position, which nothing
    // else uses (guest memory is reached through mappings and positioned I/O).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// The data extents of the first `size` bytes of `file`: `(start, end)` pairs.
fn extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let Some(start) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= size {
            break;
        }
        let end = seek(file, start, libc::SEEK_HOLE)?
            .unwrap_or(size)
            .min(size);
        // Page-align outwards: a page is copied whole.
        let s = start - start % PAGE as u64;
        let e = end.div_ceil(PAGE as u64) * PAGE as u64;
        out.push((s, e.min(size)));
        pos = end.max(start + 1);
    }
    Ok(out)
}

/// Copies the non-zero pages of the first `size` bytes of `src` to the same offsets of `dst`,
/// checksumming them. `dst` must be all zero (a fresh sparse file, or a fresh memfd).
pub fn copy_sparse(src: &File, dst: &File, size: u64) -> io::Result<PagesSummary> {
    let mut crc = Crc32::new();
    let mut pages = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for (start, end) in extents(src, size)? {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(CHUNK);
            let chunk = &mut buf[..n];
            src.read_exact_at(chunk, off)?;
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                if page.iter().all(|b| *b == 0) {
                    continue;
                }
                let at = off + (i * PAGE) as u64;
                crc.update(&at.to_le_bytes());
                crc.update(page);
                dst.write_all_at(page, at)?;
                pages += 1;
            }
            off += n as u64;
        }
    }
    Ok(PagesSummary {
        pages,
        crc32: crc.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_skips_zeros() {
        let dir = std::env::temp_dir().join(format!("hype-snapmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("src"))
            .unwrap();
        let size = 64 * PAGE as u64;
        src.set_len(size).unwrap();
        src.write_all_at(&[7u8; 10], 3 * PAGE as u64 + 5).unwrap();
        src.write_all_at(&[0u8; PAGE], 9 * PAGE as u64).unwrap();
        src.write_all_at(&[1u8; PAGE * 2], 40 * PAGE as u64)
            .unwrap();
        let dst = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("dst"))
            .unwrap();
        dst.set_len(size).unwrap();
        let s = copy_sparse(&src, &dst, size).unwrap();
        assert_eq!(s.pages, 3);
        let mut back = vec![0u8; size as usize];
        dst.read_exact_at(&mut back, 0).unwrap();
        let mut orig = vec![0u8; size as usize];
        src.read_exact_at(&mut orig, 0).unwrap();
        assert_eq!(back, orig);
        // The same pages give the same checksum the other way round.
        let again = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("again"))
            .unwrap();
        again.set_len(size).unwrap();
        assert_eq!(copy_sparse(&dst, &again, size).unwrap(), s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
