//! Guest memory: one memfd mapped `MAP_SHARED`, and an allocator of guest-physical buffers in it.
//!
//! The first page (GPA 0..4096) is never handed out, so a zero address in a descriptor is always
//! a bug the backend should reject, never a valid buffer.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    AtomicAccess, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
};

use crate::error::{Error, Result};

/// Page size used for layout and alignment.
pub const PAGE_SIZE: u64 = 4096;

/// A range of guest-physical memory handed out by [`GuestRam::alloc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestBuffer {
    /// Guest physical address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

impl GuestBuffer {
    /// The buffer's address as a `GuestAddress`.
    pub fn guest_addr(&self) -> GuestAddress {
        GuestAddress(self.addr)
    }
}

/// First-fit free-list allocator over `[start, end)` with coalescing on free.
#[derive(Debug)]
pub struct BufferAllocator {
    /// Free ranges: start -> length. Never adjacent (they are merged).
    free: BTreeMap<u64, u64>,
    /// Allocated ranges: start -> length.
    used: BTreeMap<u64, u64>,
    start: u64,
    end: u64,
}

impl BufferAllocator {
    /// An allocator that owns `[start, end)`.
    pub fn new(start: u64, end: u64) -> Self {
        let mut free = BTreeMap::new();
        if end > start {
            free.insert(start, end - start);
        }
        Self {
            free,
            used: BTreeMap::new(),
            start,
            end,
        }
    }

    /// Allocates `len` bytes (at least 1) aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<GuestBuffer> {
        if align == 0 || !align.is_power_of_two() {
            return Err(Error::BadAlignment(align));
        }
        // Zero-length buffers still get a distinct address so they can be freed.
        let want = len.max(1);
        let mut found = None;
        for (&start, &flen) in &self.free {
            let aligned = match start.checked_add(align - 1) {
                Some(v) => v & !(align - 1),
                None => continue,
            };
            let pad = aligned - start;
            if flen >= pad && flen - pad >= want {
                found = Some((start, flen, aligned));
                break;
            }
        }
        let (start, flen, aligned) = found.ok_or(Error::OutOfBufferMemory { len, align })?;
        self.free.remove(&start);
        if aligned > start {
            self.free.insert(start, aligned - start);
        }
        let tail = start + flen - (aligned + want);
        if tail > 0 {
            self.free.insert(aligned + want, tail);
        }
        self.used.insert(aligned, want);
        Ok(GuestBuffer { addr: aligned, len })
    }

    /// Returns a buffer to the free list, merging it with free neighbours.
    pub fn free(&mut self, buf: GuestBuffer) -> Result<()> {
        let len = match self.used.remove(&buf.addr) {
            Some(l) => l,
            None => {
                return Err(Error::NotAllocated {
                    addr: buf.addr,
                    len: buf.len,
                })
            }
        };
        let mut start = buf.addr;
        let mut size = len;
        if let Some((&pstart, &plen)) = self.free.range(..start).next_back() {
            if pstart + plen == start {
                self.free.remove(&pstart);
                start = pstart;
                size += plen;
            }
        }
        if let Some(&nlen) = self.free.get(&(start + size)) {
            self.free.remove(&(start + size));
            size += nlen;
        }
        self.free.insert(start, size);
        Ok(())
    }

    /// Bytes currently free.
    pub fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }

    /// Number of live allocations.
    pub fn live_allocations(&self) -> usize {
        self.used.len()
    }

    /// The managed range `[start, end)`.
    pub fn range(&self) -> (u64, u64) {
        (self.start, self.end)
    }
}

/// Guest RAM: a memfd of a given size mapped `MAP_SHARED` at GPA 0, plus a buffer allocator.
///
/// Shared (behind an `Arc`) by the driver and all its queues.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    size: u64,
    alloc: Mutex<BufferAllocator>,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM (a non-zero multiple of 4096) backed by a fresh memfd.
    pub fn new(size: u64) -> Result<Self> {
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(Error::BadMemorySize(size));
        }
        let map_len = usize::try_from(size).map_err(|_| Error::BadMemorySize(size))?;
        // Sealed like the VMM's guest RAM, so backends see what production gives them.
        let file =
            hype_base::memfd::create_sealed(c"hype-testkit-ram", size).map_err(Error::Memfd)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            map_len,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(Error::MemoryMap)?;
        Ok(Self {
            mem,
            size,
            alloc: Mutex::new(BufferAllocator::new(PAGE_SIZE, size)),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The mapped memory (for `Bytes` access and host address lookups).
    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// Region descriptions for `SET_MEM_TABLE`.
    pub fn regions(&self) -> Result<Vec<VhostUserMemoryRegionInfo>> {
        self.mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).map_err(Error::MemoryRegion))
            .collect()
    }

    /// The frontend (this process's) virtual address of a guest physical address.
    pub fn host_address(&self, gpa: u64) -> Result<u64> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|source| Error::MemoryAccess {
                addr: gpa,
                len: 0,
                source,
            })
    }

    fn allocator(&self) -> MutexGuard<'_, BufferAllocator> {
        // A poisoned lock only means another test thread panicked; the free list is still sound.
        self.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates a guest buffer of `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&self, len: u64, align: u64) -> Result<GuestBuffer> {
        self.allocator().alloc(len, align)
    }

    /// Frees a buffer returned by [`GuestRam::alloc`].
    pub fn free(&self, buf: GuestBuffer) -> Result<()> {
        self.allocator().free(buf)
    }

    /// Bytes still free in the allocator.
    pub fn free_bytes(&self) -> u64 {
        self.allocator().free_bytes()
    }

    /// Number of live allocations (useful to check for leaks).
    pub fn live_allocations(&self) -> usize {
        self.allocator().live_allocations()
    }

    /// Writes `data` at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|source| Error::MemoryAccess {
                addr: gpa,
                len: data.len(),
                source,
            })
    }

    /// Reads `buf.len()` bytes at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|source| Error::MemoryAccess {
                addr: gpa,
                len: buf.len(),
                source,
            })
    }

    /// Reads `len` bytes at `gpa` into a new vector.
    pub fn read_vec(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(gpa, &mut v)?;
        Ok(v)
    }

    /// Fills `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) -> Result<()> {
        self.write(gpa, &vec![byte; len])
    }

    /// Atomic store of a little-endian ring field (u16/u32/u64) at `gpa`.
    pub fn store<T: AtomicAccess>(&self, gpa: u64, val: T, order: Ordering) -> Result<()> {
        self.mem
            .store(val, GuestAddress(gpa), order)
            .map_err(|source| Error::MemoryAccess {
                addr: gpa,
                len: std::mem::size_of::<T>(),
                source,
            })
    }

    /// Atomic load of a ring field (u16/u32/u64) at `gpa`.
    pub fn load<T: AtomicAccess>(&self, gpa: u64, order: Ordering) -> Result<T> {
        self.mem
            .load(GuestAddress(gpa), order)
            .map_err(|source| Error::MemoryAccess {
                addr: gpa,
                len: std::mem::size_of::<T>(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_respects_alignment_and_bounds() {
        let mut a = BufferAllocator::new(4096, 65536);
        let b1 = a.alloc(10, 8).unwrap();
        assert_eq!(b1.addr, 4096);
        let b2 = a.alloc(100, 4096).unwrap();
        assert_eq!(b2.addr, 8192);
        let b3 = a.alloc(3, 16).unwrap();
        assert_eq!(b3.addr % 16, 0);
        assert!(b3.addr >= 4106 && b3.addr < 8192, "fills the alignment gap");
        assert!(matches!(
            a.alloc(1 << 20, 8),
            Err(Error::OutOfBufferMemory { .. })
        ));
        assert!(matches!(a.alloc(8, 3), Err(Error::BadAlignment(3))));
    }

    #[test]
    fn free_coalesces_and_detects_double_free() {
        let mut a = BufferAllocator::new(0, 4096);
        let bufs: Vec<_> = (0..4).map(|_| a.alloc(1024, 1).unwrap()).collect();
        assert!(a.alloc(1, 1).is_err());
        // Free out of order; everything must merge back into one range.
        for i in [1, 3, 0, 2] {
            a.free(bufs[i]).unwrap();
        }
        assert_eq!(a.free_bytes(), 4096);
        assert_eq!(a.free.len(), 1);
        assert_eq!(a.live_allocations(), 0);
        assert!(matches!(a.free(bufs[0]), Err(Error::NotAllocated { .. })));
        let whole = a.alloc(4096, 1).unwrap();
        assert_eq!(whole.addr, 0);
    }

    #[test]
    fn guest_ram_is_fd_backed_and_readable() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let regions = ram.regions().unwrap();
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].memory_size, 1 << 20);
        assert_eq!(regions[0].guest_phys_addr, 0);
        assert!(regions[0].mmap_handle >= 0);
        let b = ram.alloc(16, 8).unwrap();
        assert!(b.addr >= PAGE_SIZE, "first page is never handed out");
        ram.write(b.addr, b"hello").unwrap();
        assert_eq!(ram.read_vec(b.addr, 5).unwrap(), b"hello");
        assert_eq!(
            ram.host_address(b.addr).unwrap(),
            regions[0].userspace_addr + b.addr
        );
        assert!(ram.read_vec((1 << 20) - 2, 4).is_err());
        assert!(matches!(
            GuestRam::new(1000),
            Err(Error::BadMemorySize(1000))
        ));
    }
}
