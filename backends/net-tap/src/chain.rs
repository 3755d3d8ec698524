//! Turning a guest descriptor chain into checked host buffers of one direction.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

/// Most buffers we accept in one chain (the kernel's `UIO_MAXIOV`, the limit of one writev).
pub(crate) const MAX_SEGMENTS: usize = 1024;

/// A guest buffer as mapped in this process: `len` bytes at host address `addr`.
///
/// Kept as an integer so per-queue scratch vectors stay `Send`; only valid while the guest
/// memory guard it was computed from is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HostSeg {
    pub addr: usize,
    pub len: usize,
}

/// Why a chain cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChainError {
    /// A buffer has the wrong direction for this queue.
    #[error("descriptor {index} is device-{}", if *.writable { "writable" } else { "readable" })]
    WrongDirection {
        /// Position in the chain.
        index: usize,
        /// Its direction.
        writable: bool,
    },
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer of {len} bytes at {addr:#x} is outside guest memory")]
    OutOfMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The chain has more buffers than we accept.
    #[error("more than {MAX_SEGMENTS} buffers")]
    TooManySegments,
    /// The chain is longer in bytes than we accept.
    #[error("more than {0} bytes")]
    TooLong(usize),
}

/// Appends the host mappings of every buffer of `chain` to `out` (cleared first) and returns
/// their total length. All buffers must be device-`writable` (RX) or device-readable (TX), lie
/// in guest memory and add up to at most `max_total` bytes.
pub(crate) fn collect<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    writable: bool,
    max_total: usize,
    out: &mut Vec<HostSeg>,
) -> Result<usize, ChainError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    out.clear();
    let mut total = 0usize;
    for (index, desc) in chain.enumerate() {
        if desc.is_write_only() != writable {
            return Err(ChainError::WrongDirection {
                index,
                writable: desc.is_write_only(),
            });
        }
        let len = desc.len() as usize;
        total = total
            .checked_add(len)
            .filter(|&t| t <= max_total)
            .ok_or(ChainError::TooLong(max_total))?;
        let oom = || ChainError::OutOfMemory {
            addr: desc.addr().0,
            len: desc.len(),
        };
        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), len) {
            let slice = slice.map_err(|_| oom())?;
            if out.len() >= MAX_SEGMENTS {
                return Err(ChainError::TooManySegments);
            }
            out.push(HostSeg {
                addr: slice.ptr_guard().as_ptr() as usize,
                len: slice.len(),
            });
        }
    }
    Ok(total)
}

/// Copies `src` into the buffers `segs` in order; returns the bytes copied (at most their
/// total length).
///
/// The buffers must come from [`collect`] with the guest memory guard still held.
pub(crate) fn copy_to_segments(segs: &[HostSeg], src: &[u8]) -> usize {
    let mut done = 0;
    for s in segs {
        if done == src.len() {
            break;
        }
        let n = s.len.min(src.len() - done);
        // SAFETY: `s` maps `s.len` bytes of guest memory that stays mapped while the caller
        // holds the memory guard `collect` used; `n <= s.len` and `n <= src.len() - done`, and
        // guest memory never overlaps our own buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr().add(done), s.addr as *mut u8, n);
        }
        done += n;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_spreads_over_segments() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 4];
        let segs = [
            HostSeg {
                addr: a.as_mut_ptr() as usize,
                len: a.len(),
            },
            HostSeg {
                addr: b.as_mut_ptr() as usize,
                len: b.len(),
            },
        ];
        assert_eq!(copy_to_segments(&segs, &[1, 2, 3, 4, 5]), 5);
        assert_eq!(a, [1, 2, 3]);
        assert_eq!(b, [4, 5, 0, 0]);
        assert_eq!(copy_to_segments(&segs, &[9; 10]), 7);
        assert_eq!(b, [9; 4]);
    }
}
