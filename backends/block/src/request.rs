//! virtio-blk requests: turning a guest descriptor chain into a validated [`Request`], and
//! executing it against a [`Storage`].
//!
//! Everything in a chain is guest-controlled and treated as hostile. Parsing never panics and
//! never touches storage; it bounds the chain length, checks every buffer lies in guest memory,
//! checks directions, sizes, alignment and ranges, and yields either a request to execute, an
//! error status to write, or (when not even a status byte is writable) a chain to drop.

use std::io;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::chain::{walk, DescTable, DropReason, RawChain, Segment};

use crate::config::{DeviceSpec, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use crate::direct_io;
use crate::iobuf::{IoBuf, IO_CHUNK};
use crate::storage::{Storage, SECTOR_SIZE};

/// Size of `struct virtio_blk_outhdr`: type, reserved, sector.
const HEADER_LEN: u64 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const RANGE_LEN: u64 = 16;

/// Why a request was refused. Each maps to a status the guest sees (see [`RequestError::status`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len} is outside guest memory")]
    BadAddress {
        /// Guest physical address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// Fewer than 16 readable bytes: no request header.
    #[error("request header too short ({0} bytes)")]
    ShortHeader(u64),
    /// Data where the request type allows none (e.g. readable payload on a read).
    #[error("unexpected {0} data for this request type")]
    UnexpectedData(&'static str),
    /// Length or offset not a multiple of the logical block size.
    #[error("sector {sector} length {len} not aligned to the {block_size}-byte block size")]
    Misaligned {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// Beyond the end of the disk.
    #[error("sector {sector} length {len} beyond capacity of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// A write-type request to a read-only disk.
    #[error("disk is read-only")]
    ReadOnly,
    /// The DISCARD/WRITE_ZEROES payload is not a whole, bounded number of ranges.
    #[error("bad discard/write-zeroes payload of {0} bytes")]
    BadRanges(u64),
    /// One DISCARD/WRITE_ZEROES range is too large.
    #[error("range of {0} sectors exceeds the limit")]
    RangeTooLarge(u32),
    /// The request type or a flag is not supported.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// A DISCARD/WRITE_ZEROES range carries unsupported flags.
    #[error("unsupported range flags {0:#x}")]
    UnsupportedFlags(u32),
}

impl RequestError {
    /// The virtio-blk status byte for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// One DISCARD/WRITE_ZEROES range, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ByteRange {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

/// What to do, fully validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// Read `len` bytes at `offset` into `segs`.
    Read {
        offset: u64,
        segs: Vec<Segment>,
    },
    /// Write the bytes of `segs` at `offset`.
    Write {
        offset: u64,
        segs: Vec<Segment>,
    },
    Flush,
    /// Write up to 20 bytes of the serial into `segs`.
    GetId {
        segs: Vec<Segment>,
    },
    Discard(Vec<ByteRange>),
    WriteZeroes(Vec<ByteRange>),
    /// Answer with an error status.
    Fail(RequestError),
}

impl Op {
    /// Bytes a read or write moves (0 for the other operations).
    pub(crate) fn data_len(&self) -> u64 {
        match self {
            Op::Read { segs, .. } | Op::Write { segs, .. } => total_len(segs),
            _ => 0,
        }
    }
}

/// A parsed request: the operation and where its status byte goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub head: u16,
    pub status_addr: GuestAddress,
    pub op: Op,
}

/// The outcome of running a request: status byte and bytes written into guest buffers
/// (not counting the status byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    pub status: u8,
    pub written: u32,
}

impl Completion {
    /// The used-ring length: data written plus the status byte.
    pub fn used_len(&self) -> u32 {
        self.written.saturating_add(1)
    }
}

fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Returns `segs` without its first `n` bytes.
fn skip_bytes(segs: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        let len = u64::from(s.len);
        if n >= len {
            n -= len;
            continue;
        }
        out.push(Segment {
            addr: GuestAddress(s.addr.0.wrapping_add(n)),
            len: (len - n) as u32,
        });
        n = 0;
    }
    out
}

/// Walks a list of segments, copying bytes to or from guest memory in order.
struct SegCursor<'a> {
    segs: &'a [Segment],
    idx: usize,
    off: u32,
}

impl<'a> SegCursor<'a> {
    fn new(segs: &'a [Segment]) -> Self {
        SegCursor {
            segs,
            idx: 0,
            off: 0,
        }
    }

    /// Next piece of at most `max` bytes: (address, length).
    fn next_piece(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        while let Some(s) = self.segs.get(self.idx) {
            if self.off < s.len {
                let n = ((s.len - self.off) as usize).min(max);
                let addr = GuestAddress(s.addr.0.wrapping_add(u64::from(self.off)));
                self.off += n as u32;
                return Some((addr, n));
            }
            self.idx += 1;
            self.off = 0;
        }
        None
    }

    /// Copies `data` into guest memory; returns how many bytes fitted.
    fn write_to_guest(&mut self, mem: &GuestMemoryMmap, data: &[u8]) -> Result<usize, ()> {
        let mut done = 0;
        while done < data.len() {
            let Some((addr, n)) = self.next_piece(data.len() - done) else {
                break;
            };
            mem.write_slice(&data[done..done + n], addr)
                .map_err(|_| ())?;
            done += n;
        }
        Ok(done)
    }

    /// Fills `out` from guest memory; returns how many bytes were available.
    fn read_from_guest(&mut self, mem: &GuestMemoryMmap, out: &mut [u8]) -> Result<usize, ()> {
        let mut done = 0;
        while done < out.len() {
            let Some((addr, n)) = self.next_piece(out.len() - done) else {
                break;
            };
            mem.read_slice(&mut out[done..done + n], addr)
                .map_err(|_| ())?;
            done += n;
        }
        Ok(done)
    }
}

/// Parses the chain at `head` of `table` into a [`Request`]. `Err` means the chain cannot be
/// answered and must be returned to the guest with a used length of 0.
pub(crate) fn parse(
    head: u16,
    table: DescTable,
    mem: &GuestMemoryMmap,
    spec: &DeviceSpec,
) -> Result<Request, DropReason> {
    let mut raw = walk(mem, table, head)?;

    // The status byte: the last byte of the last writable buffer.
    let last = raw.writable.pop().ok_or(DropReason::NoStatus)?;
    let status_addr = last
        .addr
        .checked_add(u64::from(last.len) - 1)
        .ok_or(DropReason::StatusOutOfMemory(last.addr.0))?;
    if !GuestMemoryBackend::check_range(mem, status_addr, 1) {
        return Err(DropReason::StatusOutOfMemory(status_addr.0));
    }
    if last.len > 1 {
        raw.writable.push(Segment {
            addr: last.addr,
            len: last.len - 1,
        });
    }
    let op = match raw.error.take() {
        Some(e) => Op::Fail(e),
        None => interpret(&raw, mem, spec).unwrap_or_else(Op::Fail),
    };
    Ok(Request {
        head,
        status_addr,
        op,
    })
}

fn interpret(raw: &RawChain, mem: &GuestMemoryMmap, spec: &DeviceSpec) -> Result<Op, RequestError> {
    let readable_len = total_len(&raw.readable);
    if readable_len < HEADER_LEN {
        return Err(RequestError::ShortHeader(readable_len));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    SegCursor::new(&raw.readable)
        .read_from_guest(mem, &mut header)
        .map_err(|_| bad_address(&raw.readable))?;
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let payload = skip_bytes(&raw.readable, HEADER_LEN);
    let writable = &raw.writable;
    let no_payload = || {
        if payload.is_empty() {
            Ok(())
        } else {
            Err(RequestError::UnexpectedData("readable"))
        }
    };
    let no_writable = || {
        if writable.is_empty() {
            Ok(())
        } else {
            Err(RequestError::UnexpectedData("writable"))
        }
    };
    match req_type {
        VIRTIO_BLK_T_IN => {
            no_payload()?;
            let offset = check_range(spec, sector, total_len(writable))?;
            Ok(Op::Read {
                offset,
                segs: writable.clone(),
            })
        }
        VIRTIO_BLK_T_OUT => {
            no_writable()?;
            if spec.read_only {
                return Err(RequestError::ReadOnly);
            }
            let offset = check_range(spec, sector, total_len(&payload))?;
            Ok(Op::Write {
                offset,
                segs: payload,
            })
        }
        VIRTIO_BLK_T_FLUSH => {
            no_payload()?;
            no_writable()?;
            Ok(Op::Flush)
        }
        VIRTIO_BLK_T_GET_ID => {
            no_payload()?;
            Ok(Op::GetId {
                segs: writable.clone(),
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            let offered = if discard {
                spec.discard
            } else {
                spec.write_zeroes
            };
            if !offered && !spec.read_only {
                return Err(RequestError::Unsupported(req_type));
            }
            if spec.read_only {
                return Err(RequestError::ReadOnly);
            }
            no_writable()?;
            let ranges = parse_ranges(spec, mem, &payload, discard)?;
            Ok(if discard {
                Op::Discard(ranges)
            } else {
                Op::WriteZeroes(ranges)
            })
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

fn bad_address(segs: &[Segment]) -> RequestError {
    let s = segs.first().copied().unwrap_or(Segment {
        addr: GuestAddress(0),
        len: 0,
    });
    RequestError::BadAddress {
        addr: s.addr.0,
        len: s.len,
    }
}

/// Checks `len` bytes at `sector` are block-aligned and inside the disk; returns the byte offset.
fn check_range(spec: &DeviceSpec, sector: u64, len: u64) -> Result<u64, RequestError> {
    let block = u64::from(spec.block_size);
    let out_of_range = RequestError::OutOfRange {
        sector,
        len,
        capacity: spec.capacity_sectors,
    };
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(out_of_range.clone())?;
    if offset % block != 0 || len % block != 0 {
        return Err(RequestError::Misaligned {
            sector,
            len,
            block_size: spec.block_size,
        });
    }
    let end = offset.checked_add(len).ok_or(out_of_range.clone())?;
    if end > spec.capacity_sectors * SECTOR_SIZE {
        return Err(out_of_range);
    }
    Ok(offset)
}

fn parse_ranges(
    spec: &DeviceSpec,
    mem: &GuestMemoryMmap,
    payload: &[Segment],
    discard: bool,
) -> Result<Vec<ByteRange>, RequestError> {
    let len = total_len(payload);
    if len == 0 || len % RANGE_LEN != 0 || len / RANGE_LEN > u64::from(MAX_DISCARD_SEGMENTS) {
        return Err(RequestError::BadRanges(len));
    }
    let mut bytes = vec![0u8; len as usize];
    SegCursor::new(payload)
        .read_from_guest(mem, &mut bytes)
        .map_err(|_| bad_address(payload))?;
    let mut ranges = Vec::with_capacity(bytes.len() / RANGE_LEN as usize);
    for r in bytes.chunks_exact(RANGE_LEN as usize) {
        let sector = u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]);
        let num_sectors = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
        let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
        let known = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !known != 0 {
            return Err(RequestError::UnsupportedFlags(flags));
        }
        if num_sectors > MAX_DISCARD_SECTORS {
            return Err(RequestError::RangeTooLarge(num_sectors));
        }
        let len = u64::from(num_sectors) * SECTOR_SIZE;
        let offset = check_range(spec, sector, len)?;
        ranges.push(ByteRange {
            offset,
            len,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(ranges)
}

fn sat32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn storage_status(e: &io::Error) -> u8 {
    if e.kind() == io::ErrorKind::Unsupported {
        VIRTIO_BLK_S_UNSUPP as u8
    } else {
        VIRTIO_BLK_S_IOERR as u8
    }
}

/// Runs `op` against `storage`, moving data through `buf`.
pub(crate) fn execute<S: Storage + ?Sized>(
    op: &Op,
    storage: &S,
    mem: &GuestMemoryMmap,
    spec: &DeviceSpec,
    buf: &mut IoBuf,
) -> Completion {
    let ok = |written| Completion {
        status: VIRTIO_BLK_S_OK as u8,
        written,
    };
    let fail = |status, written| Completion { status, written };
    match op {
        Op::Read { offset, segs } => {
            let len = total_len(segs);
            if let Some(d) = storage.direct_io() {
                match direct_io::transfer(d, false, *offset, segs, mem) {
                    Some(Ok(())) => return ok(sat32(len)),
                    Some(Err(e)) => {
                        log::warn!("read of {len} bytes at {offset} failed: {e}");
                        return fail(storage_status(&e), 0);
                    }
                    None => {} // buffers unsuitable for the fd: bounce
                }
            }
            let mut cursor = SegCursor::new(segs);
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(IO_CHUNK as u64) as usize;
                let chunk = buf.get(n);
                if let Err(e) = storage.read_at(offset + done, chunk) {
                    log::warn!("read of {n} bytes at {} failed: {e}", offset + done);
                    return fail(storage_status(&e), sat32(done));
                }
                if cursor.write_to_guest(mem, chunk).is_err() {
                    return fail(VIRTIO_BLK_S_IOERR as u8, sat32(done));
                }
                done += n as u64;
            }
            ok(sat32(len))
        }
        Op::Write { offset, segs } => {
            let len = total_len(segs);
            if let Some(d) = storage.direct_io() {
                match direct_io::transfer(d, true, *offset, segs, mem) {
                    Some(Ok(())) => return ok(0),
                    Some(Err(e)) => {
                        log::warn!("write of {len} bytes at {offset} failed: {e}");
                        return fail(storage_status(&e), 0);
                    }
                    None => {}
                }
            }
            let mut cursor = SegCursor::new(segs);
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(IO_CHUNK as u64) as usize;
                let chunk = buf.get(n);
                if cursor.read_from_guest(mem, chunk).is_err() {
                    return fail(VIRTIO_BLK_S_IOERR as u8, 0);
                }
                if let Err(e) = storage.write_at(offset + done, chunk) {
                    log::warn!("write of {n} bytes at {} failed: {e}", offset + done);
                    return fail(storage_status(&e), 0);
                }
                done += n as u64;
            }
            ok(0)
        }
        Op::Flush => match storage.flush() {
            Ok(()) => ok(0),
            Err(e) => {
                log::warn!("flush failed: {e}");
                fail(storage_status(&e), 0)
            }
        },
        Op::GetId { segs } => {
            let id = &spec.serial[..VIRTIO_BLK_ID_BYTES as usize];
            match SegCursor::new(segs).write_to_guest(mem, id) {
                Ok(n) => ok(n as u32),
                Err(()) => fail(VIRTIO_BLK_S_IOERR as u8, 0),
            }
        }
        Op::Discard(ranges) => {
            for r in ranges.iter().filter(|r| r.len > 0) {
                if let Err(e) = storage.discard(r.offset, r.len) {
                    log::warn!("discard of {} bytes at {} failed: {e}", r.len, r.offset);
                    return fail(storage_status(&e), 0);
                }
            }
            ok(0)
        }
        Op::WriteZeroes(ranges) => {
            for r in ranges.iter().filter(|r| r.len > 0) {
                if let Err(e) = storage.write_zeroes(r.offset, r.len, r.unmap) {
                    log::warn!(
                        "write-zeroes of {} bytes at {} failed: {e}",
                        r.len,
                        r.offset
                    );
                    return fail(storage_status(&e), 0);
                }
            }
            ok(0)
        }
        Op::Fail(e) => fail(e.status(), 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::spec;
    use std::sync::Mutex;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;

    const TABLE: GuestAddress = GuestAddress(0x1000);
    const N: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    /// Records calls; fails on demand.
    struct Recorder {
        data: Mutex<Vec<u8>>,
        calls: Mutex<Vec<(&'static str, u64, u64)>>,
        fail: Option<io::ErrorKind>,
    }

    impl Recorder {
        fn new(size: usize) -> Self {
            Recorder {
                data: Mutex::new((0..size).map(|i| (i % 253) as u8).collect()),
                calls: Mutex::new(Vec::new()),
                fail: None,
            }
        }
        fn result(&self) -> io::Result<()> {
            match self.fail {
                Some(k) => Err(io::Error::from(k)),
                None => Ok(()),
            }
        }
    }

    impl Storage for Recorder {
        fn info(&self) -> crate::StorageInfo {
            crate::StorageInfo::new(self.data.lock().unwrap().len() as u64)
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(("read", offset, buf.len() as u64));
            assert_eq!(buf.as_ptr() as usize % 4096, 0, "unaligned buffer");
            self.result()?;
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(("write", offset, buf.len() as u64));
            self.result()?;
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            self.calls.lock().unwrap().push(("flush", 0, 0));
            self.result()
        }
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            self.calls.lock().unwrap().push(("discard", offset, len));
            self.result()
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
            let tag = if unmap { "zero-unmap" } else { "zero" };
            self.calls.lock().unwrap().push((tag, offset, len));
            self.result()
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    /// Writes a chain of (addr, len, writable) at the table start and parses it.
    fn chain(
        mem: &GuestMemoryMmap,
        spec: &DeviceSpec,
        bufs: &[(u64, u32, bool)],
    ) -> Result<Request, DropReason> {
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let mut flags = if w { W } else { 0 };
            if i + 1 < bufs.len() {
                flags |= N;
            }
            let d = Descriptor::new(addr, len, flags, (i + 1) as u16);
            mem.write_obj(d, TABLE.unchecked_add(i as u64 * 16))
                .unwrap();
        }
        parse(
            0,
            DescTable {
                addr: TABLE,
                size: 256,
            },
            mem,
            spec,
        )
    }

    fn header(mem: &GuestMemoryMmap, t: u32, sector: u64) -> (u64, u32, bool) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x10000)).unwrap();
        (0x10000, 16, false)
    }

    fn run(
        mem: &GuestMemoryMmap,
        spec: &DeviceSpec,
        store: &Recorder,
        req: &Request,
    ) -> Completion {
        execute(&req.op, store, mem, spec, &mut IoBuf::new())
    }

    #[test]
    fn read_scatters_into_segments_and_reports_used_len() {
        let (m, s, st) = (mem(), spec(), Recorder::new(1 << 20));
        let h = header(&m, VIRTIO_BLK_T_IN, 2);
        let req = chain(
            &m,
            &s,
            &[
                h,
                (0x20000, 1000, true),
                (0x30000, 24, true),
                (0x40000, 1, true),
            ],
        )
        .unwrap();
        assert_eq!(req.status_addr, GuestAddress(0x40000));
        let c = run(&m, &s, &st, &req);
        assert_eq!(c.status, VIRTIO_BLK_S_OK as u8);
        assert_eq!(c.used_len(), 1025);
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got[..1000], GuestAddress(0x20000))
            .unwrap();
        m.read_slice(&mut got[1000..], GuestAddress(0x30000))
            .unwrap();
        let want: Vec<u8> = (1024..2048).map(|i| (i % 253) as u8).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn status_byte_shares_the_last_data_buffer() {
        let (m, s, st) = (mem(), spec(), Recorder::new(1 << 20));
        let h = header(&m, VIRTIO_BLK_T_IN, 0);
        // One writable buffer of 513 bytes: 512 data + status.
        let req = chain(&m, &s, &[h, (0x20000, 513, true)]).unwrap();
        assert_eq!(req.status_addr, GuestAddress(0x20000 + 512));
        assert!(matches!(&req.op, Op::Read { segs, .. } if total_len(segs) == 512));
        assert_eq!(run(&m, &s, &st, &req).status, VIRTIO_BLK_S_OK as u8);
    }

    #[test]
    fn large_requests_are_split_into_aligned_chunks() {
        let (m, mut s, st) = (mem(), spec(), Recorder::new(4 << 20));
        s.capacity_sectors = 8192;
        let h = header(&m, VIRTIO_BLK_T_OUT, 0);
        let req = chain(&m, &s, &[h, (0x100000, 3 << 20, false), (0x10, 1, true)]).unwrap();
        assert_eq!(run(&m, &s, &st, &req).status, VIRTIO_BLK_S_OK as u8);
        let calls = st.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            vec![
                ("write", 0, 1 << 20),
                ("write", 1 << 20, 1 << 20),
                ("write", 2 << 20, 1 << 20)
            ]
        );
    }

    #[test]
    fn range_and_alignment_checks() {
        let mut s = spec(); // 2048 sectors
        assert_eq!(check_range(&s, 0, 2048 * 512), Ok(0));
        assert!(matches!(
            check_range(&s, 1, 2048 * 512),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(&s, u64::MAX, 512),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(&s, u64::MAX / 512, 512),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(&s, 0, 100),
            Err(RequestError::Misaligned { .. })
        ));
        s.block_size = 4096;
        assert!(matches!(
            check_range(&s, 1, 4096),
            Err(RequestError::Misaligned { .. })
        ));
        assert!(matches!(
            check_range(&s, 8, 512),
            Err(RequestError::Misaligned { .. })
        ));
        assert_eq!(check_range(&s, 8, 4096), Ok(4096));
    }

    #[test]
    fn discard_and_write_zeroes_ranges() {
        let (m, s, st) = (mem(), spec(), Recorder::new(1 << 20));
        let range = |sector: u64, n: u32, flags: u32| {
            let mut r = [0u8; 16];
            r[..8].copy_from_slice(&sector.to_le_bytes());
            r[8..12].copy_from_slice(&n.to_le_bytes());
            r[12..].copy_from_slice(&flags.to_le_bytes());
            r
        };
        let mut payload = Vec::new();
        payload.extend(range(8, 8, 1));
        payload.extend(range(100, 16, 0));
        m.write_slice(&payload, GuestAddress(0x20000)).unwrap();
        let h = header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let req = chain(&m, &s, &[h, (0x20000, 32, false), (0x30000, 1, true)]).unwrap();
        assert_eq!(run(&m, &s, &st, &req).status, VIRTIO_BLK_S_OK as u8);
        assert_eq!(
            st.calls.lock().unwrap().clone(),
            vec![("zero-unmap", 4096, 4096), ("zero", 51200, 8192)]
        );
        // Unmap is not a DISCARD flag.
        let h = header(&m, VIRTIO_BLK_T_DISCARD, 0);
        let req = chain(&m, &s, &[h, (0x20000, 32, false), (0x30000, 1, true)]).unwrap();
        assert_eq!(req.op, Op::Fail(RequestError::UnsupportedFlags(1)));
        assert_eq!(run(&m, &s, &st, &req).status, VIRTIO_BLK_S_UNSUPP as u8);
        // Too large a range.
        m.write_slice(&range(0, MAX_DISCARD_SECTORS + 1, 0), GuestAddress(0x20000))
            .unwrap();
        let req = chain(&m, &s, &[h, (0x20000, 16, false), (0x30000, 1, true)]).unwrap();
        assert!(matches!(req.op, Op::Fail(RequestError::RangeTooLarge(_))));
        // Not offered.
        let mut s2 = spec();
        s2.discard = false;
        let req = chain(&m, &s2, &[h, (0x20000, 16, false), (0x30000, 1, true)]).unwrap();
        assert_eq!(
            req.op,
            Op::Fail(RequestError::Unsupported(VIRTIO_BLK_T_DISCARD))
        );
    }

    #[test]
    fn read_only_refuses_every_write_type() {
        let (m, mut s) = (mem(), spec());
        s.read_only = true;
        for t in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            let h = header(&m, t, 0);
            let req = chain(&m, &s, &[h, (0x20000, 512, false), (0x30000, 1, true)]).unwrap();
            assert_eq!(req.op, Op::Fail(RequestError::ReadOnly), "type {t}");
        }
        let h = header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let req = chain(&m, &s, &[h, (0x30000, 1, true)]).unwrap();
        assert_eq!(req.op, Op::Flush);
    }

    #[test]
    fn get_id_fills_what_fits() {
        let (m, s, st) = (mem(), spec(), Recorder::new(1 << 20));
        let h = header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let req = chain(&m, &s, &[h, (0x20000, 3, true), (0x30000, 1, true)]).unwrap();
        let c = run(&m, &s, &st, &req);
        assert_eq!((c.status, c.written), (VIRTIO_BLK_S_OK as u8, 3));
        let mut id = [0u8; 3];
        m.read_slice(&mut id, GuestAddress(0x20000)).unwrap();
        assert_eq!(&id, b"tes");
    }

    #[test]
    fn storage_errors_map_to_status() {
        let (m, s) = (mem(), spec());
        let h = header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let req = chain(&m, &s, &[h, (0x30000, 1, true)]).unwrap();
        let mut st = Recorder::new(4096);
        st.fail = Some(io::ErrorKind::Unsupported);
        assert_eq!(run(&m, &s, &st, &req).status, VIRTIO_BLK_S_UNSUPP as u8);
        st.fail = Some(io::ErrorKind::TimedOut);
        assert_eq!(run(&m, &s, &st, &req).status, VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn unanswerable_chains_are_dropped() {
        let (m, s) = (mem(), spec());
        let h = header(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            chain(&m, &s, &[h, (0x20000, 512, false)]).unwrap_err(),
            DropReason::NoStatus
        );
        assert!(matches!(
            chain(&m, &s, &[h, (u64::MAX, 1, true)]).unwrap_err(),
            DropReason::StatusOutOfMemory(_)
        ));
        assert!(matches!(
            chain(&m, &s, &[h, (16 << 20, 1, true)]).unwrap_err(),
            DropReason::StatusOutOfMemory(_)
        ));
    }
}
