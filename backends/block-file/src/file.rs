//! [`FileStorage`]: a raw image file or block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hype_block::{write_zero_buffers, DirectIo, Storage, StorageInfo};

use crate::Error;

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;

/// How to open the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Open read-only and present a read-only disk.
    pub read_only: bool,
    /// Open with `O_DIRECT`.
    pub direct: bool,
    /// Logical block size; default 512 (4096 for `O_DIRECT` files, the device's for
    /// `O_DIRECT` block devices).
    pub block_size: Option<u64>,
}

/// A raw image file or block device as [`Storage`].
pub struct FileStorage {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
    read_only: bool,
    block_size: u32,
    physical_block_size: u32,
    /// Buffer alignment the fd needs: 1, or the O_DIRECT alignment.
    memory_align: usize,
    serial: String,
}

impl FileStorage {
    /// Opens and locks `path`.
    pub fn open(path: &Path, opts: FileOptions) -> Result<Self, Error> {
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?;
        lock(&file, path, opts.read_only)?;
        let meta = file.metadata().map_err(|source| Error::Size {
            path: path.to_path_buf(),
            source,
        })?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.file_type().is_file() {
            return Err(Error::UnsupportedFileType(path.to_path_buf()));
        }
        let size_err = |source| Error::Size {
            path: path.to_path_buf(),
            source,
        };
        let (size, device_logical, device_physical) = if block_device {
            (
                ioctl_u64(&file, BLKGETSIZE64).map_err(size_err)?,
                ioctl_int(&file, libc::BLKSSZGET).map_err(size_err)? as u64,
                ioctl_int(&file, libc::BLKPBSZGET).map_err(size_err)? as u64,
            )
        } else {
            let blksize = meta.blksize().clamp(512, 65536);
            (meta.len(), if opts.direct { 4096 } else { 512 }, blksize)
        };
        let min_block = if opts.direct { device_logical } else { 512 };
        let block_size = opts.block_size.unwrap_or(min_block);
        if !block_size.is_power_of_two()
            || !(512..=65536).contains(&block_size)
            || block_size < min_block
        {
            return Err(Error::InvalidBlockSize(block_size));
        }
        let physical = device_physical
            .max(block_size)
            .next_power_of_two()
            .min(65536);
        if size % block_size != 0 {
            log::warn!(
                "{}: size {size} is not a multiple of {block_size}; the last partial block is not visible",
                path.display()
            );
        }
        // A stable serial derived from the file's identity, unless the user sets one.
        let serial = format!("{:x}{:x}", meta.dev(), meta.ino());
        let serial = serial[serial.len().saturating_sub(20)..].to_string();
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            size,
            block_device,
            read_only: opts.read_only,
            block_size: block_size as u32,
            physical_block_size: physical as u32,
            memory_align: if opts.direct { min_block as usize } else { 1 },
            serial,
        })
    }

    /// The path this storage was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate(2) on a valid fd we own; no memory is passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            let range: [u64; 2] = [offset, len];
            // SAFETY: BLKDISCARD reads a [u64; 2] (start, length) from the pointer, which is a
            // valid local array.
            let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        } else {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    )
}

fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), Error> {
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    } | libc::LOCK_NB;
    // SAFETY: flock(2) on a valid fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::Locked(path.to_path_buf()));
        }
        return Err(Error::Lock {
            path: path.to_path_buf(),
            source: e,
        });
    }
    Ok(())
}

fn ioctl_u64(file: &File, req: libc::c_ulong) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: the request writes one u64 to the pointer, which points at a local u64.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), req as _, &mut v as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn ioctl_int(file: &File, req: libc::Ioctl) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int to the pointer, which points at a local int.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), req, &mut v as *mut libc::c_int) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

impl Storage for FileStorage {
    fn current_size(&self) -> Option<u64> {
        let now = if self.block_device {
            ioctl_u64(&self.file, BLKGETSIZE64)
        } else {
            self.file.metadata().map(|m| m.len())
        };
        match now {
            Ok(size) => Some(size),
            Err(e) => {
                log::warn!("{}: cannot read the size: {e}", self.path.display());
                None
            }
        }
    }

    fn info(&self) -> StorageInfo {
        StorageInfo::new(self.size)
            .block_size(self.block_size)
            .physical_block_size(self.physical_block_size)
            .read_only(self.read_only)
            .discard(true)
            .write_zeroes(true)
            .serial(self.serial.clone())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn direct_io(&self) -> Option<DirectIo<'_>> {
        Some(DirectIo {
            fd: self.file.as_fd(),
            align: self.memory_align,
        })
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch_hole(offset, len).map_err(|e| {
            if unsupported(&e) {
                io::Error::new(io::ErrorKind::Unsupported, e)
            } else {
                e
            }
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        // Unmapping keeps sparse files sparse; punched holes read back as zeroes (files) and
        // block devices are only unmapped when the guest allows it. Otherwise allocate zeroes.
        if may_unmap && !self.block_device {
            match self.punch_hole(offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => write_zero_buffers(self, offset, len),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpfile(name: &str, size: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("hype-block-file-{}-{name}", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    fn allocated(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().blocks() * 512
    }

    #[test]
    fn second_writer_is_refused_readers_share() {
        let p = tmpfile("lock", 1 << 20);
        let w = FileStorage::open(&p, FileOptions::default()).unwrap();
        assert!(matches!(
            FileStorage::open(&p, FileOptions::default()),
            Err(Error::Locked(_))
        ));
        let ro = FileOptions {
            read_only: true,
            ..FileOptions::default()
        };
        assert!(matches!(FileStorage::open(&p, ro), Err(Error::Locked(_))));
        drop(w);
        let r1 = FileStorage::open(&p, ro).unwrap();
        let _r2 = FileStorage::open(&p, ro).unwrap();
        assert!(r1.info().read_only);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn sparse_stays_sparse_and_holes_are_punched() {
        let p = tmpfile("sparse", 64 << 20);
        let s = FileStorage::open(&p, FileOptions::default()).unwrap();
        assert_eq!(allocated(&p), 0);
        s.write_at(1 << 20, &vec![0xaa; 1 << 20]).unwrap();
        let used = allocated(&p);
        assert!((1 << 20..4 << 20).contains(&used), "{used}");
        s.discard(1 << 20, 1 << 20).unwrap();
        assert_eq!(allocated(&p), 0);
        let mut b = vec![1u8; 4096];
        s.read_at(1 << 20, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        // write-zeroes with unmap keeps the file sparse.
        s.write_at(8 << 20, &vec![0xbb; 1 << 20]).unwrap();
        s.write_zeroes(8 << 20, 1 << 20, true).unwrap();
        assert_eq!(allocated(&p), 0);
        // Without unmap the range reads back as zeroes too.
        s.write_at(9 << 20, &vec![0xcc; 8192]).unwrap();
        s.write_zeroes(9 << 20, 8192, false).unwrap();
        s.read_at(9 << 20, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        s.flush().unwrap();
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn block_size_rules() {
        let p = tmpfile("bs", 1 << 20);
        let s = FileStorage::open(&p, FileOptions::default()).unwrap();
        assert_eq!(s.info().block_size, 512);
        drop(s);
        let s = FileStorage::open(
            &p,
            FileOptions {
                block_size: Some(4096),
                ..FileOptions::default()
            },
        )
        .unwrap();
        assert_eq!(s.info().block_size, 4096);
        drop(s);
        assert!(matches!(
            FileStorage::open(
                &p,
                FileOptions {
                    block_size: Some(1000),
                    ..FileOptions::default()
                }
            ),
            Err(Error::InvalidBlockSize(1000))
        ));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn directories_are_refused() {
        let d = std::env::temp_dir();
        assert!(FileStorage::open(
            &d,
            FileOptions {
                read_only: true,
                ..FileOptions::default()
            }
        )
        .is_err());
    }
}
