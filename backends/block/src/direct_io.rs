//! The zero-copy path: `preadv`/`pwritev` between a storage's file descriptor and guest
//! memory, for stores that offer one through [`Storage::direct_io`](crate::Storage::direct_io).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

use crate::chain::Segment;

/// Most iovecs per system call (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// A file descriptor the device may use for I/O straight into and out of guest memory.
#[derive(Clone, Copy, Debug)]
pub struct DirectIo<'a> {
    /// Read and written with `preadv`/`pwritev` at the same byte offsets as
    /// [`Storage::read_at`](crate::Storage::read_at) and
    /// [`Storage::write_at`](crate::Storage::write_at).
    pub fd: BorrowedFd<'a>,
    /// Alignment every guest buffer address and length must have for the fd (1 for buffered
    /// files, the `O_DIRECT` alignment otherwise). Requests with other buffers go through the
    /// bounce buffer and `read_at`/`write_at`.
    pub align: usize,
}

/// Host iovecs for `segs`, or `None` when a buffer is not mapped or not aligned to `align`.
fn guest_iovecs(mem: &GuestMemoryMmap, segs: &[Segment], align: usize) -> Option<Vec<libc::iovec>> {
    let align = align.max(1);
    let mut iovs = Vec::with_capacity(segs.len());
    for seg in segs {
        for slice in mem.get_slices(seg.addr, seg.len as usize) {
            let slice = slice.ok()?;
            let ptr = slice.ptr_guard_mut().as_ptr();
            if (ptr as usize) % align != 0 || slice.len() % align != 0 {
                return None;
            }
            iovs.push(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(iovs)
}

/// Moves `n` bytes past the front of `iovs`.
fn advance(iovs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop = 0;
    for iov in iovs.iter_mut() {
        if n >= iov.iov_len {
            n -= iov.iov_len;
            drop += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the same buffer.
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
            iov.iov_len -= n;
            break;
        }
    }
    iovs.drain(..drop);
}

/// Reads (`write == false`) or writes `segs` at `offset` through `d`. Returns `None` when the
/// buffers do not suit the fd (the caller then uses the bounce buffer).
pub(crate) fn transfer(
    d: DirectIo<'_>,
    write: bool,
    offset: u64,
    segs: &[Segment],
    mem: &GuestMemoryMmap,
) -> Option<io::Result<()>> {
    let mut iovs = guest_iovecs(mem, segs, d.align)?;
    let mut pos = offset;
    Some((|| {
        while !iovs.is_empty() {
            let cnt = iovs.len().min(IOV_MAX);
            let off = libc::off_t::try_from(pos)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: every iovec points into guest memory that `mem` keeps mapped for this
            // whole call (checked by get_slices above); the kernel only reads from (pwritev) or
            // writes to (preadv) those ranges.
            let n = unsafe {
                if write {
                    libc::pwritev(d.fd.as_raw_fd(), iovs.as_ptr(), cnt as libc::c_int, off)
                } else {
                    libc::preadv(d.fd.as_raw_fd(), iovs.as_ptr(), cnt as libc::c_int, off)
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::from(if write {
                    io::ErrorKind::WriteZero
                } else {
                    io::ErrorKind::UnexpectedEof
                }));
            }
            advance(&mut iovs, n as usize);
            pos += n as u64;
        }
        Ok(())
    })())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn reads_and_writes_across_segments_and_regions() {
        // Two regions, so one segment crosses a region boundary.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap();
        let path = std::env::temp_dir().join(format!("hype-direct-io-{}", std::process::id()));
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let data: Vec<u8> = (0..12288u32).map(|i| (i % 241) as u8).collect();
        f.write_all_at(&data, 4096).unwrap();
        let segs = [
            Segment {
                addr: GuestAddress(0xf000),
                len: 8192,
            }, // crosses 0x10000
            Segment {
                addr: GuestAddress(0x2000),
                len: 4096,
            },
        ];
        let d = DirectIo {
            fd: f.as_fd(),
            align: 1,
        };
        transfer(d, false, 4096, &segs, &mem).unwrap().unwrap();
        let mut got = vec![0u8; 12288];
        mem.read_slice(&mut got[..8192], GuestAddress(0xf000))
            .unwrap();
        mem.read_slice(&mut got[8192..], GuestAddress(0x2000))
            .unwrap();
        assert_eq!(got, data);
        // And back out, elsewhere in the file.
        transfer(d, true, 65536, &segs, &mem).unwrap().unwrap();
        let mut back = vec![0u8; 12288];
        f.read_exact_at(&mut back, 65536).unwrap();
        assert_eq!(back, data);
        // Misaligned buffers are refused for an aligned fd; reads past EOF fail.
        let d4k = DirectIo {
            fd: f.as_fd(),
            align: 4096,
        };
        assert!(transfer(
            d4k,
            false,
            0,
            &[Segment {
                addr: GuestAddress(0x100),
                len: 4096
            }],
            &mem
        )
        .is_none());
        assert!(transfer(d, false, 1 << 30, &segs, &mem).unwrap().is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn advance_skips_whole_and_partial_iovecs() {
        let mut a = [0u8; 10];
        let mut b = [0u8; 10];
        let mut iovs = vec![
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 10,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 10,
            },
        ];
        advance(&mut iovs, 13);
        assert_eq!(iovs.len(), 1);
        assert_eq!(iovs[0].iov_len, 7);
        assert_eq!(iovs[0].iov_base as usize, b.as_ptr() as usize + 3);
    }
}
