//! The copy-on-write overlay: guest writes to an HTTP image kept in a local sparse file, with
//! a persistent bitmap of which granules are local.
//!
//! # File format (version 1, all integers little-endian)
//!
//! ```text
//! offset  size  field
//!      0     8  magic "HYPEOVL1"
//!      8     4  version (1)
//!     12     4  granule size in bytes (power of two, 4096 unless built otherwise)
//!     16     8  disk size in bytes
//!     24     8  bitmap offset (4096)
//!     32     8  bitmap length in bytes (ceil(granules / 8))
//!     40     8  data offset (bitmap end rounded up to 1 MiB)
//!     48     2  identity length n (at most 1024)
//!     50     n  identity of the image version: "etag:<ETag>", "last-modified:<date>" or "none"
//!  4096      .  bitmap: bit (i % 8) of byte (i / 8), least significant first, is set when
//!               granule i (bytes i*granule .. (i+1)*granule of the disk) is in the overlay
//! data       .  granule i at data offset + i * granule; never-written granules are holes
//! ```
//!
//! A granule's data is written before its bit, so if the process dies a write is either
//! complete or absent. FLUSH is `fdatasync` of the file (data and bitmap together); after a
//! host crash only flushed writes are guaranteed (an unflushed granule may read as zeroes). The overlay
//! belongs to one image version: opening it against another size or identity fails, since
//! its granules would be mixed with blocks of a different image.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

/// Default granule: the unit copied from the image on a partial write.
pub const DEFAULT_GRANULE: u32 = 4096;

const MAGIC: &[u8; 8] = b"HYPEOVL1";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 4096;
const DATA_ALIGN: u64 = 1 << 20;
const MAX_IDENTITY: usize = 1024;

/// Largest bitmap an overlay keeps in memory: 64 MiB, one bit per granule, so 2 TiB of disk
/// at the default 4 KiB granule. A larger image (its size is what the server claims) is
/// refused with `--overlay` rather than allocated for.
pub const MAX_BITMAP_BYTES: u64 = 64 << 20;

/// Why an overlay could not be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// Opening, reading or creating the file failed.
    #[error("overlay {path}: {what}")]
    Io {
        /// The overlay path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process has the overlay open.
    #[error("overlay {0} is in use by another process (locked)")]
    Locked(PathBuf),
    /// The file is not an overlay of this format.
    #[error("overlay {path}: not a hype overlay ({reason})")]
    Format {
        /// The overlay path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The overlay was made for another image version.
    #[error("overlay {path} was made for {found:?} ({found_size} bytes) but the image is {expected:?} ({size} bytes)")]
    ImageMismatch {
        /// The overlay path.
        path: PathBuf,
        /// Identity stored in the overlay.
        found: String,
        /// Disk size stored in the overlay.
        found_size: u64,
        /// Identity of the image now.
        expected: String,
        /// Disk size now.
        size: u64,
    },
    /// The image identity is too long to store.
    #[error("image identity is longer than {MAX_IDENTITY} bytes")]
    IdentityTooLong,
    /// The disk needs a bitmap larger than [`MAX_BITMAP_BYTES`].
    #[error(
        "a {disk_size}-byte disk needs a {bitmap_len}-byte overlay bitmap, more than the \
         {MAX_BITMAP_BYTES} bytes an overlay keeps in memory"
    )]
    TooLarge {
        /// The disk's size in bytes.
        disk_size: u64,
        /// The bitmap it would need, in bytes.
        bitmap_len: u64,
    },
}

impl hype_block::CommandError for OverlayError {
    /// Every overlay error concerns the file named by `--overlay` (unusable, in use, of another
    /// format or made for another image) and happens before serving starts.
    fn is_usage(&self) -> bool {
        match self {
            OverlayError::Io { .. }
            | OverlayError::Locked(_)
            | OverlayError::Format { .. }
            | OverlayError::ImageMismatch { .. }
            | OverlayError::IdentityTooLong
            | OverlayError::TooLarge { .. } => true,
        }
    }
}

/// An open overlay file.
pub struct Overlay {
    file: File,
    path: PathBuf,
    granule: u64,
    disk_size: u64,
    bitmap_offset: u64,
    data_offset: u64,
    bitmap: Vec<AtomicU8>,
    /// Serialises writing bitmap bytes to the file so an older byte never overwrites a newer.
    persist: Mutex<()>,
}

struct Header {
    granule: u32,
    disk_size: u64,
    bitmap_offset: u64,
    bitmap_len: u64,
    data_offset: u64,
    identity: String,
}

impl Header {
    fn new(granule: u32, disk_size: u64, identity: &str) -> Self {
        let granules = disk_size.div_ceil(u64::from(granule));
        let bitmap_len = granules.div_ceil(8);
        let data_offset = (HEADER_LEN + bitmap_len).div_ceil(DATA_ALIGN) * DATA_ALIGN;
        Header {
            granule,
            disk_size,
            bitmap_offset: HEADER_LEN,
            bitmap_len,
            data_offset,
            identity: identity.to_string(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.granule.to_le_bytes());
        h[16..24].copy_from_slice(&self.disk_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.bitmap_offset.to_le_bytes());
        h[32..40].copy_from_slice(&self.bitmap_len.to_le_bytes());
        h[40..48].copy_from_slice(&self.data_offset.to_le_bytes());
        let id = self.identity.as_bytes();
        h[48..50].copy_from_slice(&(id.len() as u16).to_le_bytes());
        h[50..50 + id.len()].copy_from_slice(id);
        h
    }

    fn decode(h: &[u8]) -> Result<Self, String> {
        if h.len() < HEADER_LEN as usize || &h[0..8] != MAGIC {
            return Err("bad magic".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!("unsupported version {version}"));
        }
        let granule = u32_at(12);
        if !granule.is_power_of_two() || !(512..=(1 << 20)).contains(&granule) {
            return Err(format!("bad granule size {granule}"));
        }
        let id_len = usize::from(u16::from_le_bytes([h[48], h[49]]));
        if id_len > MAX_IDENTITY {
            return Err(format!("identity length {id_len} too large"));
        }
        let identity = String::from_utf8(h[50..50 + id_len].to_vec())
            .map_err(|_| "identity is not UTF-8".to_string())?;
        let stored = Header {
            granule,
            disk_size: u64_at(16),
            bitmap_offset: u64_at(24),
            bitmap_len: u64_at(32),
            data_offset: u64_at(40),
            identity,
        };
        // The layout is fully determined by granule and size: anything else is corruption.
        let want = Header::new(granule, stored.disk_size, &stored.identity);
        if (stored.bitmap_offset, stored.bitmap_len, stored.data_offset)
            != (want.bitmap_offset, want.bitmap_len, want.data_offset)
        {
            return Err("inconsistent layout".into());
        }
        Ok(stored)
    }
}

impl Overlay {
    /// Opens the overlay at `path` for a disk of `disk_size` bytes of the image version
    /// `identity`, creating it (sparse) if it does not exist. The file is locked exclusively.
    pub fn open(
        path: &Path,
        disk_size: u64,
        identity: &str,
        granule: u32,
    ) -> Result<Self, OverlayError> {
        if identity.len() > MAX_IDENTITY {
            return Err(OverlayError::IdentityTooLong);
        }
        let bitmap_len = disk_size.div_ceil(u64::from(granule.max(1))).div_ceil(8);
        if bitmap_len > MAX_BITMAP_BYTES {
            return Err(OverlayError::TooLarge {
                disk_size,
                bitmap_len,
            });
        }
        let io_err = |what| {
            let path = path.to_path_buf();
            move |source| OverlayError::Io { path, what, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err("cannot open"))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Err(OverlayError::Locked(path.to_path_buf()));
            }
            return Err(io_err("cannot lock")(e));
        }
        let len = file.metadata().map_err(io_err("cannot stat"))?.len();
        let header = if len == 0 {
            let h = Header::new(granule, disk_size, identity);
            file.write_all_at(&h.encode(), 0)
                .map_err(io_err("cannot write header"))?;
            file.set_len(h.data_offset + disk_size)
                .map_err(io_err("cannot size"))?;
            file.sync_all().map_err(io_err("cannot sync"))?;
            h
        } else {
            let mut raw = vec![0u8; HEADER_LEN as usize];
            file.read_exact_at(&mut raw, 0)
                .map_err(|e| OverlayError::Format {
                    path: path.to_path_buf(),
                    reason: format!("short header ({e})"),
                })?;
            let h = Header::decode(&raw).map_err(|reason| OverlayError::Format {
                path: path.to_path_buf(),
                reason,
            })?;
            if h.disk_size != disk_size || h.identity != identity {
                return Err(OverlayError::ImageMismatch {
                    path: path.to_path_buf(),
                    found: h.identity,
                    found_size: h.disk_size,
                    expected: identity.to_string(),
                    size: disk_size,
                });
            }
            if len < h.data_offset + disk_size {
                file.set_len(h.data_offset + disk_size)
                    .map_err(io_err("cannot size"))?;
            }
            h
        };
        let mut bits = vec![0u8; header.bitmap_len as usize];
        file.read_exact_at(&mut bits, header.bitmap_offset)
            .map_err(io_err("cannot read bitmap"))?;
        Ok(Overlay {
            file,
            path: path.to_path_buf(),
            granule: u64::from(header.granule),
            disk_size,
            bitmap_offset: header.bitmap_offset,
            data_offset: header.data_offset,
            bitmap: bits.into_iter().map(AtomicU8::new).collect(),
            persist: Mutex::new(()),
        })
    }

    /// Bytes per granule.
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// The overlay path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether granule `g` is local.
    pub fn is_local(&self, g: u64) -> bool {
        let Some(byte) = self.bitmap.get((g / 8) as usize) else {
            return false;
        };
        byte.load(Ordering::Acquire) & (1 << (g % 8)) != 0
    }

    /// Number of local granules.
    pub fn local_granules(&self) -> u64 {
        self.bitmap
            .iter()
            .map(|b| u64::from(b.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Reads local data at disk `offset` (the caller knows the granules are local).
    pub fn read_local(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, self.data_offset + offset)
    }

    /// Writes whole granules at disk `offset` (granule-aligned, whole granules, or ending at
    /// the end of the disk) and marks them local: data first, then the bitmap.
    pub fn write_granules(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        let end = offset + len;
        if offset % self.granule != 0 || (end % self.granule != 0 && end != self.disk_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("overlay write {offset}+{len} is not granule-aligned"),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        self.file.write_all_at(buf, self.data_offset + offset)?;
        self.mark_local(offset / self.granule, (end - 1) / self.granule)
    }

    /// Sets the bits of granules `first..=last` and writes the bitmap bytes holding them.
    fn mark_local(&self, first: u64, last: u64) -> io::Result<()> {
        let _guard = match self.persist.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for g in first..=last {
            if let Some(b) = self.bitmap.get((g / 8) as usize) {
                b.fetch_or(1 << (g % 8), Ordering::AcqRel);
            }
        }
        let (b0, b1) = ((first / 8) as usize, (last / 8) as usize);
        let bytes: Vec<u8> = self.bitmap[b0..=b1]
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .collect();
        self.file
            .write_all_at(&bytes, self.bitmap_offset + b0 as u64)
    }

    /// Makes whole granules at disk `offset` read as zeroes by punching a hole in their data
    /// and marking them local (same alignment rules as [`write_granules`](Self::write_granules)).
    /// Falls back to writing zeroes where the file system cannot punch holes.
    pub fn zero_granules(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        let end = offset + len;
        if offset % self.granule != 0 || (end % self.granule != 0 && end != self.disk_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("overlay zeroing {offset}+{len} is not granule-aligned"),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let (Ok(at), Ok(n)) = (
            libc::off_t::try_from(self.data_offset + offset),
            libc::off_t::try_from(len),
        ) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate on a descriptor we own, with a range inside the file; no memory
        // is involved.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at,
                n,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if !matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
            ) {
                return Err(e);
            }
            // No hole punching here: write zeroes, 1 MiB at a time.
            let zeroes = vec![0u8; len.min(1 << 20) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeroes.len() as u64) as usize;
                self.file
                    .write_all_at(&zeroes[..n], self.data_offset + offset + done)?;
                done += n as u64;
            }
        }
        self.mark_local(offset / self.granule, (end - 1) / self.granule)
    }

    /// Makes every completed write durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.disk_size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "overlay range {offset}+{len} outside the {}-byte disk",
                    self.disk_size
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("hype-ovl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn a_disk_too_large_for_the_bitmap_cap_is_refused_before_anything_is_made() {
        let p = tmp("huge");
        // What a hostile server can claim: a 2^56-byte image would need a 2 TiB bitmap.
        match Overlay::open(&p, 1 << 56, "etag:\"x\"", 4096) {
            Err(OverlayError::TooLarge {
                disk_size,
                bitmap_len,
            }) => assert_eq!((disk_size, bitmap_len), (1 << 56, 1 << 41)),
            other => panic!("not refused: {:?}", other.map(|o| o.local_granules())),
        }
        assert!(!p.exists(), "no overlay file made");
        // The largest disk within the cap opens (sparse, nothing written).
        let max = MAX_BITMAP_BYTES * 8 * 4096;
        let o = Overlay::open(&p, max, "etag:\"x\"", 4096).unwrap();
        assert_eq!(o.local_granules(), 0);
        drop(o);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn writes_persist_across_reopen() {
        let p = tmp("persist");
        let size = 10 * 4096 + 512; // a partial last granule
        {
            let o = Overlay::open(&p, size, "etag:\"a\"", 4096).unwrap();
            assert_eq!(o.local_granules(), 0);
            o.write_granules(4096, &[7u8; 8192]).unwrap();
            o.write_granules(10 * 4096, &[9u8; 512]).unwrap();
            o.sync().unwrap();
        }
        let o = Overlay::open(&p, size, "etag:\"a\"", 4096).unwrap();
        let local: Vec<u64> = (0..11).filter(|&g| o.is_local(g)).collect();
        assert_eq!(local, [1, 2, 10]);
        let mut b = vec![0u8; 8192];
        o.read_local(4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        let mut b = vec![0u8; 512];
        o.read_local(10 * 4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 9));
        // Sparse: far less allocated than the apparent size.
        drop(o);
        let meta = std::fs::metadata(&p).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < meta.len());
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn refuses_other_image_bad_files_and_second_opener() {
        let p = tmp("mismatch");
        let o = Overlay::open(&p, 1 << 20, "etag:\"a\"", 4096).unwrap();
        assert!(matches!(
            Overlay::open(&p, 1 << 20, "etag:\"a\"", 4096),
            Err(OverlayError::Locked(_))
        ));
        drop(o);
        assert!(matches!(
            Overlay::open(&p, 1 << 20, "etag:\"b\"", 4096),
            Err(OverlayError::ImageMismatch { .. })
        ));
        assert!(matches!(
            Overlay::open(&p, 2 << 20, "etag:\"a\"", 4096),
            Err(OverlayError::ImageMismatch { .. })
        ));
        std::fs::write(&p, b"not an overlay at all").unwrap();
        assert!(matches!(
            Overlay::open(&p, 1 << 20, "etag:\"a\"", 4096),
            Err(OverlayError::Format { .. })
        ));
        // A header with a corrupted layout field.
        let _ = std::fs::remove_file(&p);
        drop(Overlay::open(&p, 1 << 20, "x", 4096).unwrap());
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&12345u64.to_le_bytes(), 40).unwrap();
        assert!(matches!(
            Overlay::open(&p, 1 << 20, "x", 4096),
            Err(OverlayError::Format { .. })
        ));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn zeroing_punches_holes_and_marks_local() {
        let p = tmp("zero");
        let o = Overlay::open(&p, 1 << 20, "x", 4096).unwrap();
        o.write_granules(0, &[5u8; 65536]).unwrap();
        o.zero_granules(8192, 16384).unwrap();
        o.zero_granules(65536, 8192).unwrap();
        let mut b = vec![1u8; 65536 + 8192];
        o.read_local(0, &mut b).unwrap();
        for (i, chunk) in b.chunks(4096).enumerate() {
            let zero = (2..6).contains(&i) || i >= 16;
            assert!(
                chunk.iter().all(|&x| x == if zero { 0 } else { 5 }),
                "granule {i}"
            );
        }
        assert_eq!(o.local_granules(), 18);
        assert!(o.zero_granules(100, 4096).is_err());
        drop(o);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn rejects_unaligned_and_out_of_range() {
        let p = tmp("align");
        let o = Overlay::open(&p, 1 << 20, "x", 4096).unwrap();
        assert!(o.write_granules(512, &[0; 4096]).is_err());
        assert!(o.write_granules(0, &[0; 1000]).is_err());
        assert!(o.write_granules(1 << 20, &[0; 4096]).is_err());
        assert!(o.read_local(u64::MAX - 10, &mut [0; 512]).is_err());
        assert_eq!(o.local_granules(), 0);
        drop(o);
        std::fs::remove_file(&p).unwrap();
    }
}
