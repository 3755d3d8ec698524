//! virtio-blk on top of the driver: request builders, status and config decoding, and
//! convenience calls (`read`, `write`, `flush`, ..., `run_batch`).
//!
//! A request is the chain `[header (R, 16 bytes)] [payload (R)]? [data (W)]? [status (W, 1 byte)]`.
//! The status byte is pre-filled with 0xff so a device that never writes it is detected
//! ([`BlkStatus::NotWritten`]).

use std::collections::HashMap;
use std::mem::offset_of;
use std::path::Path;
use std::time::Duration;

use virtio_bindings::virtio_blk::{self as vb, virtio_blk_config};

use crate::driver::{Driver, DriverOptions};
use crate::error::{Error, Result};
use crate::virtqueue::{Completion, Segment, Virtqueue};

/// Sector size of virtio-blk addressing.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of config fetched by [`BlkDriver::connect`] when `config_size` is 0: every field
/// up to and including `write_zeroes_may_unmap` and its padding (offset 60).
pub const BLK_CONFIG_SIZE: u32 = offset_of!(virtio_blk_config, max_secure_erase_sectors) as u32;
/// Length of the GET_ID answer.
pub const BLK_ID_BYTES: u32 = vb::VIRTIO_BLK_ID_BYTES;
/// `flags` bit of a discard / write-zeroes range asking to unmap.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Value the status byte holds until the device writes it.
pub const STATUS_UNWRITTEN: u8 = 0xff;

/// Request types (`VIRTIO_BLK_T_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlkRequestType {
    /// Read (`VIRTIO_BLK_T_IN`).
    In,
    /// Write (`VIRTIO_BLK_T_OUT`).
    Out,
    /// Flush (`VIRTIO_BLK_T_FLUSH`).
    Flush,
    /// Device id string (`VIRTIO_BLK_T_GET_ID`).
    GetId,
    /// Discard (`VIRTIO_BLK_T_DISCARD`).
    Discard,
    /// Write zeroes (`VIRTIO_BLK_T_WRITE_ZEROES`).
    WriteZeroes,
    /// Any other code (unsupported or hostile).
    Other(u32),
}

impl BlkRequestType {
    /// The wire code.
    pub fn code(self) -> u32 {
        match self {
            Self::In => vb::VIRTIO_BLK_T_IN,
            Self::Out => vb::VIRTIO_BLK_T_OUT,
            Self::Flush => vb::VIRTIO_BLK_T_FLUSH,
            Self::GetId => vb::VIRTIO_BLK_T_GET_ID,
            Self::Discard => vb::VIRTIO_BLK_T_DISCARD,
            Self::WriteZeroes => vb::VIRTIO_BLK_T_WRITE_ZEROES,
            Self::Other(c) => c,
        }
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::In => "read",
            Self::Out => "write",
            Self::Flush => "flush",
            Self::GetId => "get-id",
            Self::Discard => "discard",
            Self::WriteZeroes => "write-zeroes",
            Self::Other(_) => "other",
        }
    }
}

/// The 16-byte request header (`struct virtio_blk_outhdr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkHeader {
    /// `VIRTIO_BLK_T_*`.
    pub request_type: u32,
    /// Reserved (ioprio in legacy devices).
    pub reserved: u32,
    /// Starting sector (512-byte units).
    pub sector: u64,
}

impl BlkHeader {
    /// Little-endian wire bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.request_type.to_le_bytes());
        b[4..8].copy_from_slice(&self.reserved.to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b
    }
}

/// One range of a discard / write-zeroes request (`struct virtio_blk_discard_write_zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags ([`WRITE_ZEROES_FLAG_UNMAP`]).
    pub flags: u32,
}

impl BlkRange {
    /// Little-endian wire bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// Completion status (`VIRTIO_BLK_S_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkStatus {
    /// `VIRTIO_BLK_S_OK`.
    Ok,
    /// `VIRTIO_BLK_S_IOERR`.
    IoErr,
    /// `VIRTIO_BLK_S_UNSUPP`.
    Unsupp,
    /// The device never wrote the status byte (it still holds [`STATUS_UNWRITTEN`]).
    NotWritten,
    /// Any other value.
    Other(u8),
}

impl BlkStatus {
    /// Decodes a status byte.
    pub fn from_byte(b: u8) -> Self {
        match u32::from(b) {
            vb::VIRTIO_BLK_S_OK => Self::Ok,
            vb::VIRTIO_BLK_S_IOERR => Self::IoErr,
            vb::VIRTIO_BLK_S_UNSUPP => Self::Unsupp,
            _ if b == STATUS_UNWRITTEN => Self::NotWritten,
            _ => Self::Other(b),
        }
    }

    /// The byte value.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Ok => vb::VIRTIO_BLK_S_OK as u8,
            Self::IoErr => vb::VIRTIO_BLK_S_IOERR as u8,
            Self::Unsupp => vb::VIRTIO_BLK_S_UNSUPP as u8,
            Self::NotWritten => STATUS_UNWRITTEN,
            Self::Other(b) => b,
        }
    }
}

/// A virtio-blk request ready to be turned into a descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkRequest {
    kind: BlkRequestType,
    header: [u8; 16],
    sector: u64,
    /// Device-readable payload after the header.
    out: Vec<u8>,
    /// Device-writable data bytes before the status byte.
    in_len: u32,
    /// Split payload/data into descriptors of at most this many bytes.
    split: Option<u32>,
}

impl BlkRequest {
    /// A request of any type with a device-readable payload `out` and `in_len` device-writable
    /// data bytes (before the status byte).
    pub fn custom(kind: BlkRequestType, sector: u64, out: Vec<u8>, in_len: u32) -> Self {
        let header = BlkHeader {
            request_type: kind.code(),
            reserved: 0,
            sector,
        };
        Self {
            kind,
            header: header.to_bytes(),
            sector,
            out,
            in_len,
            split: None,
        }
    }

    /// Read `len` bytes at `sector`.
    pub fn read(sector: u64, len: u32) -> Self {
        Self::custom(BlkRequestType::In, sector, Vec::new(), len)
    }

    /// Write `data` at `sector`.
    pub fn write(sector: u64, data: Vec<u8>) -> Self {
        Self::custom(BlkRequestType::Out, sector, data, 0)
    }

    /// Flush.
    pub fn flush() -> Self {
        Self::custom(BlkRequestType::Flush, 0, Vec::new(), 0)
    }

    /// Get the 20-byte device id.
    pub fn get_id() -> Self {
        Self::custom(BlkRequestType::GetId, 0, Vec::new(), BLK_ID_BYTES)
    }

    /// Discard `ranges`.
    pub fn discard(ranges: &[BlkRange]) -> Self {
        Self::custom(BlkRequestType::Discard, 0, ranges_bytes(ranges), 0)
    }

    /// Write zeroes over `ranges`.
    pub fn write_zeroes(ranges: &[BlkRange]) -> Self {
        Self::custom(BlkRequestType::WriteZeroes, 0, ranges_bytes(ranges), 0)
    }

    /// Splits the payload and data into descriptors of at most `max` bytes (multi-segment
    /// requests). `max` of 0 is treated as 1.
    pub fn split_segments(mut self, max: u32) -> Self {
        self.split = Some(max.max(1));
        self
    }

    /// Overrides the raw header (e.g. a reserved field or type no driver would send).
    pub fn with_header(mut self, header: BlkHeader) -> Self {
        self.header = header.to_bytes();
        self.sector = header.sector;
        self
    }

    /// Request type.
    pub fn kind(&self) -> BlkRequestType {
        self.kind
    }

    /// Starting sector.
    pub fn sector(&self) -> u64 {
        self.sector
    }

    /// Device-writable data bytes expected (before the status byte).
    pub fn in_len(&self) -> u32 {
        self.in_len
    }

    /// Device-readable payload bytes after the header (write data, discard ranges).
    pub fn payload_len(&self) -> usize {
        self.out.len()
    }

    /// The descriptor chain segments.
    pub fn segments(&self) -> Vec<Segment<'_>> {
        let mut v = vec![Segment::Readable(&self.header)];
        match self.split {
            None => {
                if !self.out.is_empty() {
                    v.push(Segment::Readable(&self.out));
                }
                if self.in_len > 0 {
                    v.push(Segment::Writable(self.in_len));
                }
            }
            Some(max) => {
                v.extend(self.out.chunks(max as usize).map(Segment::Readable));
                let mut left = self.in_len;
                while left > 0 {
                    let n = left.min(max);
                    v.push(Segment::Writable(n));
                    left -= n;
                }
            }
        }
        v.push(Segment::WritableFilled(1, STATUS_UNWRITTEN));
        v
    }
}

fn ranges_bytes(ranges: &[BlkRange]) -> Vec<u8> {
    ranges.iter().flat_map(|r| r.to_bytes()).collect()
}

/// A decoded virtio-blk completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkResponse {
    /// Head index of the chain.
    pub head: u16,
    /// Status byte.
    pub status: BlkStatus,
    /// Device-writable data (all data segments concatenated, status excluded).
    pub data: Vec<u8>,
    /// `used.len` reported by the device (data written + 1 for the status byte).
    pub used_len: u32,
}

impl BlkResponse {
    /// Decodes a completion of a chain built by [`BlkRequest::segments`] (the last writable
    /// segment is the status byte).
    pub fn from_completion(c: Completion) -> Self {
        let mut segs = c.data;
        let status = segs
            .pop()
            .and_then(|s| s.first().copied())
            .map_or(BlkStatus::NotWritten, BlkStatus::from_byte);
        Self {
            head: c.head,
            status,
            data: segs.concat(),
            used_len: c.len,
        }
    }

    /// `Ok(())` if the status is OK, else [`Error::BlkStatus`].
    pub fn check(&self, req: &BlkRequest) -> Result<()> {
        if self.status == BlkStatus::Ok {
            Ok(())
        } else {
            Err(Error::BlkStatus {
                request: req.kind().name(),
                sector: req.sector(),
                status: self.status.to_byte(),
            })
        }
    }
}

/// Decoded virtio-blk config space. Fields beyond what the device returned read as 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Max segment size (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: u32,
    /// Max segments per request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Geometry: cylinders.
    pub cylinders: u16,
    /// Geometry: heads.
    pub heads: u8,
    /// Geometry: sectors per track.
    pub sectors: u8,
    /// Logical block size (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// Topology: physical block exponent.
    pub physical_block_exp: u8,
    /// Topology: alignment offset.
    pub alignment_offset: u8,
    /// Topology: minimum I/O size in blocks.
    pub min_io_size: u16,
    /// Topology: optimal I/O size in blocks.
    pub opt_io_size: u32,
    /// Writeback cache mode (VIRTIO_BLK_F_CONFIG_WCE).
    pub writeback: u8,
    /// Number of queues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// Max discard sectors (VIRTIO_BLK_F_DISCARD).
    pub max_discard_sectors: u32,
    /// Max discard ranges per request.
    pub max_discard_seg: u32,
    /// Discard sector alignment.
    pub discard_sector_alignment: u32,
    /// Max write-zeroes sectors (VIRTIO_BLK_F_WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Max write-zeroes ranges per request.
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes may unmap.
    pub write_zeroes_may_unmap: u8,
    /// Max secure erase sectors (VIRTIO_BLK_F_SECURE_ERASE).
    pub max_secure_erase_sectors: u32,
    /// Max secure erase ranges.
    pub max_secure_erase_seg: u32,
    /// Secure erase alignment.
    pub secure_erase_sector_alignment: u32,
}

fn field<const N: usize>(bytes: &[u8], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = bytes.get(offset..offset + N) {
        out.copy_from_slice(src);
    }
    out
}

impl BlkConfig {
    /// Decodes config bytes read at offset 0 (at least the 8-byte capacity).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 8 {
            return Err(Error::BlkInvalid("config space shorter than 8 bytes"));
        }
        macro_rules! get {
            (u8, $f:ident) => {
                field::<1>(bytes, offset_of!(virtio_blk_config, $f))[0]
            };
            ($t:ty, $f:ident) => {
                <$t>::from_le_bytes(field(bytes, offset_of!(virtio_blk_config, $f)))
            };
        }
        let geo = offset_of!(virtio_blk_config, geometry);
        Ok(Self {
            capacity: get!(u64, capacity),
            size_max: get!(u32, size_max),
            seg_max: get!(u32, seg_max),
            cylinders: u16::from_le_bytes(field(bytes, geo)),
            heads: field::<1>(bytes, geo + 2)[0],
            sectors: field::<1>(bytes, geo + 3)[0],
            blk_size: get!(u32, blk_size),
            physical_block_exp: get!(u8, physical_block_exp),
            alignment_offset: get!(u8, alignment_offset),
            min_io_size: get!(u16, min_io_size),
            opt_io_size: get!(u32, opt_io_size),
            writeback: get!(u8, wce),
            num_queues: get!(u16, num_queues),
            max_discard_sectors: get!(u32, max_discard_sectors),
            max_discard_seg: get!(u32, max_discard_seg),
            discard_sector_alignment: get!(u32, discard_sector_alignment),
            max_write_zeroes_sectors: get!(u32, max_write_zeroes_sectors),
            max_write_zeroes_seg: get!(u32, max_write_zeroes_seg),
            write_zeroes_may_unmap: get!(u8, write_zeroes_may_unmap),
            max_secure_erase_sectors: get!(u32, max_secure_erase_sectors),
            max_secure_erase_seg: get!(u32, max_secure_erase_seg),
            secure_erase_sector_alignment: get!(u32, secure_erase_sector_alignment),
        })
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.saturating_mul(SECTOR_SIZE)
    }
}

/// Submits `req` on `q` without notifying. Returns the head index.
pub fn add_request(q: &mut Virtqueue, req: &BlkRequest) -> Result<u16> {
    q.add(&req.segments(), false)
}

/// Submits `req` on `q` and notifies. Returns the head index.
pub fn submit_request(q: &mut Virtqueue, req: &BlkRequest) -> Result<u16> {
    q.submit(&req.segments())
}

/// A virtio-blk driver: a [`Driver`] plus the decoded config.
///
/// ```no_run
/// use hype_testkit::blk::BlkDriver;
/// use hype_testkit::driver::DriverOptions;
/// # fn main() -> hype_testkit::error::Result<()> {
/// let mut disk = BlkDriver::connect("/tmp/blk.sock", DriverOptions::default())?;
/// println!("{} sectors", disk.config().capacity);
/// disk.write(8, &[0xab; 4096])?;
/// assert_eq!(disk.read(8, 4096)?, vec![0xab; 4096]);
/// disk.flush()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct BlkDriver {
    drv: Driver,
    config: BlkConfig,
}

impl BlkDriver {
    /// Connects and activates; fetches [`BLK_CONFIG_SIZE`] bytes of config unless
    /// `opts.config_size` says otherwise.
    pub fn connect(path: impl AsRef<Path>, mut opts: DriverOptions) -> Result<Self> {
        if opts.config_size == 0 {
            opts.config_size = BLK_CONFIG_SIZE;
        }
        Self::from_driver(Driver::connect(path, opts)?)
    }

    /// Wraps a connected driver; decodes its config (all zero if none was fetched).
    pub fn from_driver(drv: Driver) -> Result<Self> {
        let config = if drv.config().is_empty() {
            BlkConfig::default()
        } else {
            BlkConfig::parse(drv.config())?
        };
        Ok(Self { drv, config })
    }

    /// The underlying driver (queues, raw mode, reconnect).
    pub fn driver(&mut self) -> &mut Driver {
        &mut self.drv
    }

    /// Unwraps the driver.
    pub fn into_driver(self) -> Driver {
        self.drv
    }

    /// Decoded config from connect time.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Re-reads and decodes the config (e.g. after a resize or reconnect).
    pub fn refresh_config(&mut self) -> Result<BlkConfig> {
        let size = self.drv.options().config_size.max(8);
        let bytes = self.drv.read_config(0, size)?;
        self.config = BlkConfig::parse(&bytes)?;
        Ok(self.config)
    }

    /// Whether feature bit `bit` (e.g. `VIRTIO_BLK_F_FLUSH`) was acked.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.drv.acked_features() & (1u64 << bit) != 0
    }

    /// Submits `req` on queue `queue` and waits for its completion (any status).
    pub fn execute(&mut self, queue: usize, req: &BlkRequest) -> Result<BlkResponse> {
        let timeout = self.drv.options().io_timeout;
        let q = self.drv.queue(queue)?;
        let head = submit_request(q, req)?;
        let c = q.wait_for(head, timeout)?;
        Ok(BlkResponse::from_completion(c))
    }

    fn execute_ok(&mut self, req: &BlkRequest) -> Result<BlkResponse> {
        let resp = self.execute(0, req)?;
        resp.check(req)?;
        Ok(resp)
    }

    /// Reads `len` bytes at `sector` on queue 0; fails unless the status is OK.
    pub fn read(&mut self, sector: u64, len: u32) -> Result<Vec<u8>> {
        Ok(self.execute_ok(&BlkRequest::read(sector, len))?.data)
    }

    /// Writes `data` at `sector` on queue 0; fails unless the status is OK.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<()> {
        self.execute_ok(&BlkRequest::write(sector, data.to_vec()))
            .map(drop)
    }

    /// Flushes; fails unless the status is OK.
    pub fn flush(&mut self) -> Result<()> {
        self.execute_ok(&BlkRequest::flush()).map(drop)
    }

    /// Reads the 20-byte device id.
    pub fn get_id(&mut self) -> Result<Vec<u8>> {
        Ok(self.execute_ok(&BlkRequest::get_id())?.data)
    }

    /// Discards `ranges`; fails unless the status is OK.
    pub fn discard(&mut self, ranges: &[BlkRange]) -> Result<()> {
        self.execute_ok(&BlkRequest::discard(ranges)).map(drop)
    }

    /// Writes zeroes over `ranges`; fails unless the status is OK.
    pub fn write_zeroes(&mut self, ranges: &[BlkRange]) -> Result<()> {
        self.execute_ok(&BlkRequest::write_zeroes(ranges)).map(drop)
    }

    /// Runs all `reqs`, spread round-robin over all queues (request `i` on queue
    /// `i % num_queues`), each queue kept as full as its descriptors allow, one thread per
    /// queue. Returns responses in request order; statuses are not checked.
    pub fn run_batch(&mut self, reqs: &[BlkRequest]) -> Result<Vec<BlkResponse>> {
        let timeout = self.drv.options().io_timeout;
        let queues = self.drv.queues_mut();
        let nq = queues.len();
        if nq == 0 {
            return Err(Error::NotActive);
        }
        let per_queue: Vec<Vec<(usize, &BlkRequest)>> = (0..nq)
            .map(|qi| reqs.iter().enumerate().skip(qi).step_by(nq).collect())
            .collect();
        let results: Vec<Result<Vec<(usize, BlkResponse)>>> = std::thread::scope(|s| {
            let handles: Vec<_> = queues
                .iter_mut()
                .zip(per_queue)
                .filter(|(_, work)| !work.is_empty())
                .map(|(q, work)| s.spawn(move || run_on_queue(q, &work, timeout)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or(Err(Error::BlkInvalid("batch worker panicked")))
                })
                .collect()
        });
        let mut out: Vec<Option<BlkResponse>> = vec![None; reqs.len()];
        for r in results {
            for (i, resp) in r? {
                out[i] = Some(resp);
            }
        }
        out.into_iter()
            .map(|r| r.ok_or(Error::BlkInvalid("batch lost a request")))
            .collect()
    }
}

/// Keeps `q` as full as possible with `work` until every request completed.
pub fn run_on_queue(
    q: &mut Virtqueue,
    work: &[(usize, &BlkRequest)],
    timeout: Duration,
) -> Result<Vec<(usize, BlkResponse)>> {
    let mut next = 0;
    let mut by_head: HashMap<u16, usize> = HashMap::with_capacity(work.len().min(1024));
    let mut done = Vec::with_capacity(work.len());
    while done.len() < work.len() {
        let mut added = false;
        while next < work.len() {
            let segs = work[next].1.segments();
            // An idle queue always tries, so a chain that can never fit reports an error.
            if q.free_descriptors() < segs.len() && q.in_flight() > 0 {
                break;
            }
            let head = match q.add(&segs, false) {
                Ok(h) => h,
                // Guest memory is full of in-flight buffers: wait for some to come back.
                Err(Error::OutOfBufferMemory { .. }) if q.in_flight() > 0 => break,
                Err(e) => return Err(e),
            };
            by_head.insert(head, work[next].0);
            next += 1;
            added = true;
        }
        if added {
            q.notify()?;
        }
        for c in q.wait(1, timeout)? {
            let idx = by_head.remove(&c.head).ok_or(Error::UnknownUsedId {
                queue: q.index(),
                id: u32::from(c.head),
            })?;
            done.push((idx, BlkResponse::from_completion(c)));
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_range_encoding() {
        let h = BlkHeader {
            request_type: vb::VIRTIO_BLK_T_OUT,
            reserved: 0,
            sector: 0x0102030405060708,
        };
        assert_eq!(
            h.to_bytes(),
            [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]
        );
        let r = BlkRange {
            sector: 2,
            num_sectors: 3,
            flags: WRITE_ZEROES_FLAG_UNMAP,
        };
        assert_eq!(
            r.to_bytes(),
            [2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0]
        );
    }

    #[test]
    fn request_segments_have_virtio_blk_layout() {
        let r = BlkRequest::read(7, 4096);
        let s = r.segments();
        assert_eq!(s.len(), 3);
        assert!(matches!(s[0], Segment::Readable(h) if h.len() == 16 && h[8] == 7 && h[0] == 0));
        assert!(matches!(s[1], Segment::Writable(4096)));
        assert!(matches!(s[2], Segment::WritableFilled(1, STATUS_UNWRITTEN)));
        let w = BlkRequest::write(1, vec![9; 1024]).split_segments(512);
        let s = w.segments();
        assert_eq!(s.len(), 4);
        assert!(matches!(s[1], Segment::Readable(d) if d.len() == 512));
        let flush = BlkRequest::flush();
        assert_eq!(flush.segments().len(), 2);
        let id = BlkRequest::get_id();
        assert!(matches!(id.segments()[1], Segment::Writable(20)));
        let d = BlkRequest::discard(
            &[BlkRange {
                sector: 0,
                num_sectors: 8,
                flags: 0,
            }; 2],
        );
        assert!(matches!(d.segments()[1], Segment::Readable(p) if p.len() == 32));
        assert_eq!(d.kind().code(), vb::VIRTIO_BLK_T_DISCARD);
    }

    #[test]
    fn response_decoding() {
        let c = Completion {
            head: 3,
            len: 5,
            data: vec![vec![1, 2], vec![3, 4], vec![0]],
        };
        let r = BlkResponse::from_completion(c);
        assert_eq!(r.status, BlkStatus::Ok);
        assert_eq!(r.data, vec![1, 2, 3, 4]);
        let c = Completion {
            head: 3,
            len: 0,
            data: vec![vec![STATUS_UNWRITTEN]],
        };
        assert_eq!(
            BlkResponse::from_completion(c).status,
            BlkStatus::NotWritten
        );
        assert_eq!(BlkStatus::from_byte(2), BlkStatus::Unsupp);
        assert_eq!(BlkStatus::from_byte(9), BlkStatus::Other(9));
        let err = BlkResponse {
            head: 0,
            status: BlkStatus::IoErr,
            data: vec![],
            used_len: 1,
        }
        .check(&BlkRequest::read(5, 512));
        assert!(matches!(
            err,
            Err(Error::BlkStatus {
                status: 1,
                sector: 5,
                ..
            })
        ));
    }

    #[test]
    fn config_decoding_uses_spec_offsets() {
        let mut c = vec![0u8; BLK_CONFIG_SIZE as usize];
        c[0..8].copy_from_slice(&2048u64.to_le_bytes());
        c[12..16].copy_from_slice(&126u32.to_le_bytes());
        c[20..24].copy_from_slice(&4096u32.to_le_bytes());
        c[34..36].copy_from_slice(&4u16.to_le_bytes());
        c[36..40].copy_from_slice(&1024u32.to_le_bytes());
        c[56] = 1;
        let cfg = BlkConfig::parse(&c).unwrap();
        assert_eq!(cfg.capacity, 2048);
        assert_eq!(cfg.capacity_bytes(), 2048 * 512);
        assert_eq!(cfg.seg_max, 126);
        assert_eq!(cfg.blk_size, 4096);
        assert_eq!(cfg.num_queues, 4);
        assert_eq!(cfg.max_discard_sectors, 1024);
        assert_eq!(cfg.write_zeroes_may_unmap, 1);
        assert_eq!(cfg.max_secure_erase_sectors, 0, "beyond the bytes given");
        assert_eq!(BLK_CONFIG_SIZE, 60);
        assert!(BlkConfig::parse(&[0; 4]).is_err());
        // Short config: only capacity.
        assert_eq!(BlkConfig::parse(&c[..8]).unwrap().seg_max, 0);
    }
}
