//! The trait a user implements to get a virtio-blk device: [`Storage`] and its [`StorageInfo`].

use std::io;

use crate::direct_io::DirectIo;
use crate::iobuf::{IoBuf, IO_CHUNK};

/// Bytes per virtio-blk sector: the unit of request offsets and of the capacity field, whatever
/// the device's logical block size.
pub const SECTOR_SIZE: u64 = 512;

/// What a [`Storage`] is: its size and capabilities. Read once when the device is built.
///
/// Create it with [`StorageInfo::new`] and adjust it with the setters:
/// `StorageInfo::new(1 << 30).block_size(4096).read_only(true)`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StorageInfo {
    /// Size in bytes. The guest sees it rounded down to whole logical blocks.
    pub size: u64,
    /// Logical block size in bytes: a power of two from 512 to 65536. Every read and write the
    /// device passes to the storage is aligned to it, in offset and in length.
    pub block_size: u32,
    /// Physical block size in bytes (a power-of-two multiple of `block_size`), reported to the
    /// guest as topology so it aligns its I/O.
    pub physical_block_size: u32,
    /// Optimal I/O size in bytes (0 = no preference), reported as topology.
    pub optimal_io_size: u32,
    /// The storage cannot be written: writes, discards and write-zeroes fail with IOERR and the
    /// guest is told the disk is read-only.
    pub read_only: bool,
    /// [`Storage::discard`] is implemented.
    pub discard: bool,
    /// [`Storage::write_zeroes`] should be offered to the guest (the default implementation,
    /// which writes zero buffers, is always available).
    pub write_zeroes: bool,
    /// Serial number returned by GET_ID (at most 20 bytes of ASCII). The device builder can
    /// override it.
    pub serial: Option<String>,
}

impl StorageInfo {
    /// A writable storage of `size` bytes with 512-byte blocks, no discard, write-zeroes
    /// offered (through the default implementation) and no serial.
    pub fn new(size: u64) -> Self {
        StorageInfo {
            size,
            block_size: SECTOR_SIZE as u32,
            physical_block_size: SECTOR_SIZE as u32,
            optimal_io_size: 0,
            read_only: false,
            discard: false,
            write_zeroes: true,
            serial: None,
        }
    }

    /// Sets the logical block size (and raises the physical block size to at least it).
    pub fn block_size(mut self, bytes: u32) -> Self {
        self.block_size = bytes;
        self.physical_block_size = self.physical_block_size.max(bytes);
        self
    }

    /// Sets the physical block size.
    pub fn physical_block_size(mut self, bytes: u32) -> Self {
        self.physical_block_size = bytes;
        self
    }

    /// Sets the optimal I/O size.
    pub fn optimal_io_size(mut self, bytes: u32) -> Self {
        self.optimal_io_size = bytes;
        self
    }

    /// Marks the storage read-only.
    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    /// Declares whether [`Storage::discard`] is implemented.
    pub fn discard(mut self, yes: bool) -> Self {
        self.discard = yes;
        self
    }

    /// Declares whether write-zeroes is offered.
    pub fn write_zeroes(mut self, yes: bool) -> Self {
        self.write_zeroes = yes;
        self
    }

    /// Sets the serial number.
    pub fn serial(mut self, serial: impl Into<String>) -> Self {
        self.serial = Some(serial.into());
        self
    }
}

/// A block store: implement this to get a complete vhost-user-blk backend.
///
/// # Execution model
///
/// The methods are synchronous and take `&self`: the device calls them from several threads at
/// once (one worker per virtqueue, plus the optional I/O thread pool, see
/// [`BlockDevice::io_threads`](crate::BlockDevice::io_threads)), so an implementation must be
/// safe to call concurrently (`Send + Sync`) and should not serialise requests behind one lock
/// when it can avoid it. A store with long latencies (a network store) simply blocks in its
/// method; give the device an I/O pool so many requests are in flight and other queues keep
/// moving.
///
/// # Contract
///
/// * Offsets and lengths are in bytes, always aligned to [`StorageInfo::block_size`], and always
///   inside `0..info().size` (the device checks ranges before calling).
/// * Buffers are at most 1 MiB; larger guest requests are split into consecutive calls.
/// * Buffers start on a 4096-byte boundary (so `O_DIRECT` stores can use them as they are).
/// * Returning an error answers the guest's request with `VIRTIO_BLK_S_IOERR`, or
///   `VIRTIO_BLK_S_UNSUPP` for errors of kind [`io::ErrorKind::Unsupported`].
pub trait Storage: Send + Sync + 'static {
    /// Size and capabilities. Called once, when the device is built.
    fn info(&self) -> StorageInfo;

    /// The store's size now, for a store whose size can change while it is served (a file
    /// or block device that grew); `None` (the default) for a fixed size. Asked whenever the
    /// frontend reads the device config (GET_CONFIG), so a resize shows up when the VMM is
    /// told to look.
    fn current_size(&self) -> Option<u64> {
        None
    }

    /// Fills `buf` with the bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes `buf` at `offset`. Never called on a read-only storage.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Tells the store that `len` bytes at `offset` are no longer needed. Only called if
    /// [`StorageInfo::discard`] is set. Reads of the range may return anything afterwards.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Optional zero-copy fast path for stores backed by a file descriptor: when this returns
    /// `Some`, reads and writes whose guest buffers suit [`DirectIo::align`] are done with
    /// `preadv`/`pwritev` on that fd, straight between the file and guest memory, instead of
    /// through a bounce buffer and [`read_at`](Self::read_at)/[`write_at`](Self::write_at).
    /// The fd must give the same bytes at the same offsets as those methods.
    fn direct_io(&self) -> Option<DirectIo<'_>> {
        None
    }

    /// Makes `len` bytes at `offset` read back as zeroes. `may_unmap` says the store may
    /// deallocate the range to do so (the guest allowed it). The default writes zero buffers.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let _ = may_unmap;
        write_zero_buffers(self, offset, len)
    }

    /// Whether the store holds data a snapshot must carry that is not in a file of its own
    /// (a RAM disk): then the backend offers vhost-user DEVICE_STATE and a VM snapshot asks it
    /// for [`save_state`](Self::save_state). A store whose data lives in a file says `false`
    /// (the default): the file is the state.
    fn has_state(&self) -> bool {
        false
    }

    /// Writes the store's state to `out` (called on a thread of its own while the rings are
    /// stopped, so no request runs meanwhile). Only called if [`has_state`](Self::has_state).
    fn save_state(&self, out: &mut dyn io::Write) -> io::Result<()> {
        let _ = out;
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Replaces the store's contents with a state written by [`save_state`](Self::save_state),
    /// read from `input` to its end; refuses (an error) a state that is not one or does not
    /// fit this store. Called before any ring starts. Only called if
    /// [`has_state`](Self::has_state).
    fn load_state(&self, input: &mut dyn io::Read) -> io::Result<()> {
        let _ = input;
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// Writes `len` zero bytes at `offset` through [`Storage::write_at`], 1 MiB at a time. The
/// default [`Storage::write_zeroes`]; useful as a fallback in custom implementations.
pub fn write_zero_buffers<S: Storage + ?Sized>(
    storage: &S,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    const CHUNK: u64 = IO_CHUNK as u64;
    let mut buf = IoBuf::new();
    let zeroes = buf.get(CHUNK.min(len) as usize);
    zeroes.fill(0);
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        storage.write_at(offset + done, &zeroes[..n as usize])?;
        done += n;
    }
    Ok(())
}
