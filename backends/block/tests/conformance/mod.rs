//! The virtio-blk conformance suite: checks any vhost-user-blk backend through hype-testkit's
//! frontend driver. Shared by the backends' integration tests (included with `#[path]`) and
//! the qemu-storage-daemon cross-check.
//!
//! Checks marked "hype policy" test choices the spec leaves open (e.g. strict framing); the
//! cross-check against another implementation skips them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use hype_testkit::blk::{
    BlkDriver, BlkHeader, BlkRange, BlkRequest, BlkRequestType, BlkResponse, BlkStatus,
    SECTOR_SIZE, STATUS_UNWRITTEN, WRITE_ZEROES_FLAG_UNMAP,
};
use hype_testkit::driver::{DriverOptions, ReplayBase};
use hype_testkit::process::BackendProcess;
use hype_testkit::virtqueue::{
    RawDescriptor, Segment, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;

const WAIT: Duration = Duration::from_secs(10);

/// A fresh, empty directory under the system temp dir.
pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hype-blk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A backend running as a separate process ([`BackendProcess`], the test kit's one helper).
pub struct Process {
    inner: BackendProcess,
    pub socket: PathBuf,
}

impl Process {
    /// Spawns `bin args... --socket <socket>` and waits for the socket to appear.
    pub fn spawn(bin: &str, args: &[&str], socket: &Path) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .arg("--socket")
            .arg(socket)
            .env("HYPE_LOG", "error")
            .stdin(Stdio::null());
        let inner = BackendProcess::spawn(&mut cmd, socket).unwrap();
        Process {
            inner,
            socket: socket.to_path_buf(),
        }
    }

    /// Wraps an already spawned process listening on `socket`.
    pub fn from_child(child: Child, socket: &Path) -> Self {
        let mut inner = BackendProcess::from_child(child, socket);
        inner.wait_for_socket(WAIT).unwrap();
        Process {
            inner,
            socket: socket.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.inner.pid().unwrap()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.inner.alive()
    }

    /// Sends `signal` and waits (bounded) for the exit status.
    pub fn signal_and_wait(&mut self, signal: i32) -> ExitStatus {
        self.inner
            .signal_and_wait(signal, WAIT)
            .unwrap_or_else(|e| panic!("backend did not exit after signal {signal}: {e}"))
    }
}

/// Driver options: `queues` queues of 128 entries in 64 MiB of guest memory.
pub fn opts(queues: usize) -> DriverOptions {
    DriverOptions {
        num_queues: queues,
        queue_size: 128,
        mem_size: 64 << 20,
        io_timeout: WAIT,
        ..DriverOptions::default()
    }
}

pub fn connect(socket: &Path, queues: usize) -> BlkDriver {
    BlkDriver::connect(socket, opts(queues)).unwrap()
}

/// Deterministic content of the disk at byte `offset` for pattern `seed`.
pub fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|o| {
            let sector = o / SECTOR_SIZE;
            ((o % 251) as u8) ^ (sector as u8).wrapping_mul(31) ^ seed
        })
        .collect()
}

fn status_of(disk: &mut BlkDriver, req: &BlkRequest) -> BlkStatus {
    disk.execute(0, req).unwrap().status
}

/// Config space and features make sense for a disk of `capacity_sectors`.
pub fn check_config(disk: &mut BlkDriver, capacity_sectors: u64, num_queues: u16) {
    let c = *disk.config();
    assert_eq!(c.capacity, capacity_sectors, "capacity in 512-byte sectors");
    assert!(c.blk_size >= 512 && c.blk_size.is_power_of_two(), "{c:?}");
    assert!(c.seg_max >= 1, "{c:?}");
    assert_eq!(c.num_queues, num_queues, "{c:?}");
    assert!(disk.has_feature(VIRTIO_BLK_F_FLUSH));
    // GET_CONFIG at a non-zero offset returns exactly the bytes asked for.
    let blk_size = disk.driver().read_config(20, 4).unwrap();
    assert_eq!(blk_size, c.blk_size.to_le_bytes());
}

/// A segment size of at least `want` that keeps a `len`-byte request within 100 segments
/// (under the 128-entry rings the driver uses).
fn split_for(len: u64, want: u32) -> u32 {
    want.max((len as u32).div_ceil(100))
}

/// Writes the whole disk with mixed request sizes and multi-descriptor chains over all
/// queues, then reads it back with a different split and checks every byte.
pub fn check_read_after_write_whole_disk(disk: &mut BlkDriver, seed: u8) {
    let cap = disk.config().capacity * SECTOR_SIZE;
    let block = u64::from(disk.config().blk_size.max(512));
    let write_sizes = [block, 8 * block, 3 * block, 128 << 10, 17 * block, 64 << 10];
    let splits = [0u32, 4096, 512, 1000, 65536];
    let mut reqs = Vec::new();
    let mut off = 0u64;
    let mut i = 0;
    while off < cap {
        let len = write_sizes[i % write_sizes.len()].min(cap - off);
        let mut r = BlkRequest::write(off / SECTOR_SIZE, pattern(off, len as usize, seed));
        if splits[i % splits.len()] > 0 {
            r = r.split_segments(split_for(len, splits[i % splits.len()]));
        }
        reqs.push(r);
        off += len;
        i += 1;
    }
    for (r, resp) in reqs.iter().zip(disk.run_batch(&reqs).unwrap()) {
        resp.check(r).unwrap();
        assert_eq!(resp.used_len, 1, "a write only writes its status byte");
    }
    let read_sizes = [64 << 10, block, 5 * block, 256 << 10, 2 * block];
    let mut reqs = Vec::new();
    let mut off = 0u64;
    let mut i = 0;
    while off < cap {
        let len = read_sizes[i % read_sizes.len()].min(cap - off);
        let mut r = BlkRequest::read(off / SECTOR_SIZE, len as u32);
        if splits[(i + 2) % splits.len()] > 0 {
            r = r.split_segments(split_for(len, splits[(i + 2) % splits.len()]));
        }
        reqs.push(r);
        off += len;
        i += 1;
    }
    for (r, resp) in reqs.iter().zip(disk.run_batch(&reqs).unwrap()) {
        resp.check(r).unwrap();
        assert_eq!(resp.used_len, r.in_len() + 1, "used len = data + status");
        let off = r.sector() * SECTOR_SIZE;
        assert!(
            resp.data == pattern(off, r.in_len() as usize, seed),
            "data mismatch at offset {off}"
        );
    }
}

/// FLUSH succeeds and carries no data.
pub fn check_flush(disk: &mut BlkDriver) {
    let r = disk.execute(0, &BlkRequest::flush()).unwrap();
    assert_eq!(r.status, BlkStatus::Ok);
    assert_eq!(r.used_len, 1);
}

/// GET_ID returns the serial, NUL-padded to 20 bytes; a shorter buffer gets a prefix.
pub fn check_get_id(disk: &mut BlkDriver, serial: &str) {
    let mut want = serial.as_bytes().to_vec();
    want.resize(20, 0);
    let r = disk.execute(0, &BlkRequest::get_id()).unwrap();
    assert_eq!(r.status, BlkStatus::Ok);
    assert_eq!(r.data, want);
    let short = BlkRequest::custom(BlkRequestType::GetId, 0, Vec::new(), 8);
    let r = disk.execute(0, &short).unwrap();
    assert_eq!(r.status, BlkStatus::Ok);
    assert_eq!(r.data, want[..8]);
}

fn range(sector: u64, num_sectors: u32, flags: u32) -> BlkRange {
    BlkRange {
        sector,
        num_sectors,
        flags,
    }
}

/// WRITE_ZEROES (with and without unmap) zeroes exactly its ranges; DISCARD is accepted;
/// bad payloads fail.
pub fn check_discard_and_write_zeroes(disk: &mut BlkDriver) {
    assert!(disk.has_feature(VIRTIO_BLK_F_DISCARD));
    assert!(disk.has_feature(VIRTIO_BLK_F_WRITE_ZEROES));
    let bs = u64::from(disk.config().blk_size) / SECTOR_SIZE;
    let base = 64 * bs; // sectors
    let len = 64 * bs * SECTOR_SIZE;
    disk.write(base, &pattern(base * SECTOR_SIZE, len as usize, 7))
        .unwrap();
    let n = (8 * bs) as u32;
    disk.write_zeroes(&[range(base + 8 * bs, n, 0)]).unwrap();
    disk.write_zeroes(&[range(base + 16 * bs, n, WRITE_ZEROES_FLAG_UNMAP)])
        .unwrap();
    // Two ranges in one request, if the device takes that many.
    let two = [range(base + 40 * bs, n, 0), range(base + 56 * bs, n, 0)];
    if disk.config().max_write_zeroes_seg >= 2 {
        disk.write_zeroes(&two).unwrap();
    } else {
        disk.write_zeroes(&two[..1]).unwrap();
        disk.write_zeroes(&two[1..]).unwrap();
    }
    disk.discard(&[range(base + 32 * bs, n, 0)]).unwrap();
    let got = disk.read(base, len as u32).unwrap();
    let want = pattern(base * SECTOR_SIZE, len as usize, 7);
    let blk = (bs * SECTOR_SIZE) as usize;
    for (i, chunk) in got.chunks(blk).enumerate() {
        let zeroed = (8..24).contains(&i) || (40..48).contains(&i) || (56..64).contains(&i);
        let discarded = (32..40).contains(&i);
        if zeroed {
            assert!(chunk.iter().all(|&b| b == 0), "block {i} not zeroed");
        } else if !discarded {
            assert_eq!(chunk, &want[i * blk..(i + 1) * blk], "block {i} changed");
        }
    }
    let cap = disk.config().capacity;
    // Beyond the end.
    let r = BlkRequest::write_zeroes(&[range(cap - bs, (2 * bs) as u32, 0)]);
    assert_eq!(status_of(disk, &r), BlkStatus::IoErr);
    let r = BlkRequest::discard(&[range(cap, bs as u32, 0)]);
    assert_eq!(status_of(disk, &r), BlkStatus::IoErr);
    // The unmap flag is not allowed on DISCARD.
    let r = BlkRequest::discard(&[range(0, bs as u32, WRITE_ZEROES_FLAG_UNMAP)]);
    assert_eq!(status_of(disk, &r), BlkStatus::Unsupp);
}

/// hype policy: malformed DISCARD/WRITE_ZEROES payloads answer IOERR.
pub fn check_discard_payload_policy(disk: &mut BlkDriver) {
    let r = BlkRequest::custom(BlkRequestType::Discard, 0, vec![0; 10], 0);
    assert_eq!(status_of(disk, &r), BlkStatus::IoErr);
    let r = BlkRequest::custom(BlkRequestType::WriteZeroes, 0, Vec::new(), 0);
    assert_eq!(status_of(disk, &r), BlkStatus::IoErr);
    let too_many: Vec<BlkRange> = (0..1000).map(|i| range(i, 1, 0)).collect();
    let r = BlkRequest::discard(&too_many);
    assert_eq!(status_of(disk, &r), BlkStatus::IoErr);
}

/// A read-only disk: RO offered, reads and flush work, writes fail.
pub fn check_read_only(disk: &mut BlkDriver, seed: Option<u8>) {
    assert!(disk.has_feature(VIRTIO_BLK_F_RO));
    let data = disk.read(0, 4096).unwrap();
    if let Some(seed) = seed {
        assert_eq!(data, pattern(0, 4096, seed));
    }
    let r = BlkRequest::write(0, vec![1; 4096]);
    assert_eq!(status_of(disk, &r), BlkStatus::IoErr);
    let r = BlkRequest::write_zeroes(&[range(0, 8, 0)]);
    assert_ne!(status_of(disk, &r), BlkStatus::Ok);
    let r = BlkRequest::discard(&[range(0, 8, 0)]);
    assert_ne!(status_of(disk, &r), BlkStatus::Ok);
    assert_eq!(
        disk.read(0, 4096).unwrap(),
        data,
        "a refused write changed data"
    );
    check_flush(disk);
}

/// Out-of-range and malformed requests get IOERR; unknown types UNSUPP; the disk keeps
/// working.
pub fn check_out_of_range_and_unknown(disk: &mut BlkDriver) {
    let cap = disk.config().capacity;
    let bs = disk.config().blk_size.max(512);
    let cases = [
        BlkRequest::read(cap, bs),
        BlkRequest::read(cap - u64::from(bs) / SECTOR_SIZE, 2 * bs),
        BlkRequest::write(cap, vec![0; bs as usize]),
        BlkRequest::read(u64::MAX, bs),
        BlkRequest::read(u64::MAX / SECTOR_SIZE + 1, bs),
        BlkRequest::read(0, 100), // not a whole number of blocks
    ];
    for r in &cases {
        assert_eq!(status_of(disk, r), BlkStatus::IoErr, "{r:?}");
    }
    for t in [2u32, 3, 0x55, 0xdead_beef] {
        let r = BlkRequest::custom(BlkRequestType::Other(t), 0, Vec::new(), 512);
        assert_eq!(status_of(disk, &r), BlkStatus::Unsupp, "type {t}");
    }
    // The disk still works.
    disk.read(0, bs).unwrap();
}

/// hype policy: framing is strict. Data in the wrong direction, or a short header, is IOERR.
pub fn check_framing_policy(disk: &mut BlkDriver) {
    let r = BlkRequest::custom(BlkRequestType::In, 0, vec![0; 512], 512);
    assert_eq!(
        status_of(disk, &r),
        BlkStatus::IoErr,
        "readable data on a read"
    );
    let r = BlkRequest::custom(BlkRequestType::Out, 0, vec![0; 512], 512);
    assert_eq!(
        status_of(disk, &r),
        BlkStatus::IoErr,
        "writable data on a write"
    );
    let r = BlkRequest::custom(BlkRequestType::Flush, 0, vec![0; 512], 0);
    assert_eq!(status_of(disk, &r), BlkStatus::IoErr, "payload on a flush");
    // A sector with bits set in the reserved field is still a valid header.
    let h = BlkHeader {
        request_type: 0,
        reserved: 0xffff_ffff,
        sector: 0,
    };
    let r = BlkRequest::read(0, 512).with_header(h);
    assert_eq!(status_of(disk, &r), BlkStatus::Ok);
}

/// A hand-built chain for hostile tests: buffers in guest memory plus raw descriptors.
struct RawChain {
    ids: Vec<u16>,
    bufs: Vec<hype_testkit::memory::GuestBuffer>,
}

fn alloc(disk: &mut BlkDriver, bytes: &[u8]) -> hype_testkit::memory::GuestBuffer {
    let ram = disk.driver().ram().clone();
    let b = ram.alloc(bytes.len().max(1) as u64, 16).unwrap();
    ram.write(b.addr, bytes).unwrap();
    b
}

fn read_byte(disk: &mut BlkDriver, addr: u64) -> u8 {
    disk.driver().ram().read_vec(addr, 1).unwrap()[0]
}

/// Where a raw descriptor's `next` points.
#[derive(Clone, Copy)]
enum Next {
    /// The descriptor at this position of the chain.
    Pos(usize),
    /// This table index, verbatim.
    Abs(u16),
    /// No NEXT flag.
    End,
}

/// Publishes a chain of `descs` (addr, len, flags; NEXT/next filled in unless `raw_links`),
/// waits for its completion and returns the used length (None if the device did not answer).
fn run_raw(
    disk: &mut BlkDriver,
    descs: &[(u64, u32, u16)],
    raw_links: Option<&[Next]>,
) -> Option<u32> {
    let q = disk.driver().queue(0).unwrap();
    let ids = q.reserve_descriptors(descs.len()).unwrap();
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let (flags, next) = match raw_links.map(|l| l[i]) {
            Some(Next::Pos(p)) => (flags | VRING_DESC_F_NEXT, ids[p]),
            Some(Next::Abs(a)) => (flags | VRING_DESC_F_NEXT, a),
            Some(Next::End) => (flags, 0),
            None if i + 1 < descs.len() => (flags | VRING_DESC_F_NEXT, ids[i + 1]),
            None => (flags, 0),
        };
        q.write_descriptor(
            ids[i],
            RawDescriptor {
                addr,
                len,
                flags,
                next,
            },
        )
        .unwrap();
    }
    q.submit_raw(ids[0]).unwrap();
    let got = q.wait_for(ids[0], Duration::from_secs(5));
    let used = match got {
        Ok(c) => Some(c.len),
        Err(_) => {
            q.forget_raw(ids[0]);
            None
        }
    };
    q.release_descriptors(&ids).unwrap();
    used
}

fn header(t: u32, sector: u64) -> [u8; 16] {
    BlkHeader {
        request_type: t,
        reserved: 0,
        sector,
    }
    .to_bytes()
}

/// Hostile descriptor chains: the backend answers with an error status, or returns the chain
/// with used length 0 when no status byte is writable, never crashes or hangs, and keeps
/// serving. (hype policy: other devices may stop the whole queue instead.)
pub fn check_hostile_chains(disk: &mut BlkDriver, mem_size: u64) {
    let w = VRING_DESC_F_WRITE;
    let hdr = alloc(disk, &header(0, 0));
    let data = alloc(disk, &[0u8; 4096]);
    let status = alloc(disk, &[STATUS_UNWRITTEN]);
    let reset_status = |disk: &mut BlkDriver| {
        disk.driver()
            .ram()
            .write(status.addr, &[STATUS_UNWRITTEN])
            .unwrap()
    };

    // 1. Data buffer outside guest memory: IOERR.
    reset_status(disk);
    let used = run_raw(
        disk,
        &[
            (hdr.addr, 16, 0),
            (mem_size + 4096, 4096, w),
            (status.addr, 1, w),
        ],
        None,
    );
    assert_eq!(used, Some(1));
    assert_eq!(
        read_byte(disk, status.addr),
        1,
        "IOERR for a buffer outside memory"
    );

    // 2. Absurd length (4 GiB - 1) at a valid address: IOERR.
    reset_status(disk);
    let used = run_raw(
        disk,
        &[
            (hdr.addr, 16, 0),
            (data.addr, u32::MAX, w),
            (status.addr, 1, w),
        ],
        None,
    );
    assert_eq!(used, Some(1));
    assert_eq!(read_byte(disk, status.addr), 1);

    // 3. Address that wraps around the 64-bit space: IOERR, no overflow.
    reset_status(disk);
    let used = run_raw(
        disk,
        &[
            (hdr.addr, 16, 0),
            (u64::MAX - 100, 4096, w),
            (status.addr, 1, w),
        ],
        None,
    );
    assert_eq!(used, Some(1));
    assert_eq!(read_byte(disk, status.addr), 1);

    // 4. Header in a device-writable buffer (wrong direction): IOERR.
    reset_status(disk);
    let used = run_raw(
        disk,
        &[(hdr.addr, 16, w), (data.addr, 512, w), (status.addr, 1, w)],
        None,
    );
    assert_eq!(used, Some(1));
    assert_eq!(read_byte(disk, status.addr), 1);

    // 5. Readable descriptor after a writable one: IOERR.
    reset_status(disk);
    let used = run_raw(
        disk,
        &[
            (hdr.addr, 16, 0),
            (data.addr, 512, w),
            (data.addr, 512, 0),
            (status.addr, 1, w),
        ],
        None,
    );
    assert_eq!(used, Some(1));
    assert_eq!(read_byte(disk, status.addr), 1);

    // 6. Header shorter than 16 bytes: IOERR.
    reset_status(disk);
    let used = run_raw(disk, &[(hdr.addr, 8, 0), (status.addr, 1, w)], None);
    assert_eq!(used, Some(1));
    assert_eq!(read_byte(disk, status.addr), 1);

    // 7. No writable byte at all: returned without a status (used len 0).
    let used = run_raw(disk, &[(hdr.addr, 16, 0), (data.addr, 512, 0)], None);
    assert_eq!(used, Some(0));

    // 8. Status byte outside guest memory: nothing written, nothing crashes.
    let used = run_raw(
        disk,
        &[
            (hdr.addr, 16, 0),
            (data.addr, 512, w),
            (mem_size + 10, 1, w),
        ],
        None,
    );
    assert_eq!(used, Some(0));

    // 9. A loop: desc 0 -> 1 -> 0 -> ...
    let used = run_raw(
        disk,
        &[(hdr.addr, 16, 0), (status.addr, 1, w)],
        Some(&[Next::Pos(1), Next::Pos(0)]),
    );
    assert_eq!(used, Some(0));

    // 10. A next index beyond the table.
    let used = run_raw(
        disk,
        &[(hdr.addr, 16, 0), (status.addr, 1, w)],
        Some(&[Next::Abs(4000), Next::End]),
    );
    assert_eq!(used, Some(0));

    // 11. An indirect table whose length is not a multiple of 16, and one outside memory.
    if disk.has_feature(VIRTIO_RING_F_INDIRECT_DESC) {
        let table = alloc(disk, &[0u8; 64]);
        let used = run_raw(disk, &[(table.addr, 17, VRING_DESC_F_INDIRECT)], None);
        assert_eq!(used, Some(0));
        let used = run_raw(disk, &[(mem_size + 4096, 64, VRING_DESC_F_INDIRECT)], None);
        assert_eq!(used, Some(0));
        // A valid indirect chain works.
        let q = disk.driver().queue(0).unwrap();
        let segs = [
            Segment::Readable(&header(0, 0)),
            Segment::Writable(512),
            Segment::WritableFilled(1, STATUS_UNWRITTEN),
        ];
        let head = q.submit_indirect(&segs).unwrap();
        let c = q.wait_for(head, WAIT).unwrap();
        assert_eq!(BlkResponse::from_completion(c).status, BlkStatus::Ok);
    }

    // 12. A head index outside the ring: nothing to return; the queue keeps working.
    {
        let q = disk.driver().queue(0).unwrap();
        q.submit_raw(q.size() + 7).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let _ = q.collect_raw();
    }
    disk.read(0, 512).unwrap();

    // 13. avail.idx far ahead of the ring: the device must not spin or crash; once the
    // driver repairs the index, the queue works again.
    {
        let q = disk.driver().queue(0).unwrap();
        let good = q.avail_idx();
        q.set_avail_idx(good.wrapping_add(1000)).unwrap();
        q.kick().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        q.set_avail_idx(good).unwrap();
    }
    disk.read(0, 512).unwrap();

    let ram = disk.driver().ram().clone();
    for b in [hdr, data, status] {
        ram.free(b).unwrap();
    }
}

/// Many requests in flight on every queue: writes of distinct regions, then reads, all
/// verified.
pub fn check_many_in_flight(disk: &mut BlkDriver, seed: u8) {
    let cap = disk.config().capacity * SECTOR_SIZE;
    let bs = u64::from(disk.config().blk_size.max(512));
    let n = (cap / (4 * bs)).min(4000);
    let writes: Vec<BlkRequest> = (0..n)
        .map(|i| {
            let off = i * 4 * bs;
            BlkRequest::write(off / SECTOR_SIZE, pattern(off, (4 * bs) as usize, seed))
        })
        .collect();
    for (r, resp) in writes.iter().zip(disk.run_batch(&writes).unwrap()) {
        resp.check(r).unwrap();
    }
    let reads: Vec<BlkRequest> = (0..n)
        .rev()
        .map(|i| BlkRequest::read(i * 4 * bs / SECTOR_SIZE, (4 * bs) as u32))
        .collect();
    for (r, resp) in reads.iter().zip(disk.run_batch(&reads).unwrap()) {
        resp.check(r).unwrap();
        assert!(resp.data == pattern(r.sector() * SECTOR_SIZE, r.in_len() as usize, seed));
    }
}

/// The frontend goes away and comes back (twice: a new driver, then a ring-replaying
/// reconnect with requests in flight); data written before is intact.
pub fn check_reconnect(socket: &Path, queues: usize) {
    let mut disk = connect(socket, queues);
    disk.write(0, &pattern(0, 65536, 42)).unwrap();
    disk.flush().unwrap();
    drop(disk);

    let mut disk = connect(socket, queues);
    assert_eq!(disk.read(0, 65536).unwrap(), pattern(0, 65536, 42));

    // Requests in flight while the connection drops: the driver resubmits what the device
    // had not completed.
    let reqs: Vec<BlkRequest> = (0..32u64)
        .map(|i| BlkRequest::write(128 + i * 8, pattern((128 + i * 8) * SECTOR_SIZE, 4096, 43)))
        .collect();
    let q = disk.driver().queue(0).unwrap();
    let mut heads = Vec::new();
    for r in &reqs {
        heads.push(hype_testkit::blk::add_request(q, r).unwrap());
    }
    q.notify().unwrap();
    disk.driver().reconnect(ReplayBase::Resubmit).unwrap();
    let q = disk.driver().queue(0).unwrap();
    for h in heads {
        let c = q.wait_for(h, WAIT).unwrap();
        assert_eq!(BlkResponse::from_completion(c).status, BlkStatus::Ok);
    }
    let got = disk.read(128, 32 * 4096).unwrap();
    assert_eq!(got, pattern(128 * SECTOR_SIZE, 32 * 4096, 43));
    assert_eq!(disk.read(0, 65536).unwrap(), pattern(0, 65536, 42));
}

/// Stopping rings with GET_VRING_BASE returns where the device stopped, and the rings can be
/// resumed from there on a new connection.
pub fn check_stop_and_resume(socket: &Path) {
    let mut disk = connect(socket, 1);
    disk.write(0, &[5u8; 4096]).unwrap();
    let bases = disk.driver().stop_queues().unwrap();
    assert_eq!(bases.len(), 1);
    assert_eq!(bases[0] as u16, disk.driver().queue(0).unwrap().avail_idx());
    let b: Vec<u16> = bases.iter().map(|&b| b as u16).collect();
    disk.driver().reconnect(ReplayBase::Explicit(b)).unwrap();
    assert_eq!(disk.read(0, 4096).unwrap(), vec![5u8; 4096]);
}

/// The sandbox of a block backend: while a frontend is connected and I/O runs on `queues`
/// queues, every thread of the process is under a seccomp filter, and the I/O still works.
pub fn check_every_thread_filtered(p: &Process, queues: usize) {
    let mut disk = connect(&p.socket, queues);
    let data = pattern(0, 64 << 10, 7);
    for q in 0..queues {
        disk.execute(q, &BlkRequest::write(0, data.clone()))
            .unwrap();
    }
    assert_eq!(disk.read(0, data.len() as u32).unwrap(), data);
    let threads = hype_testkit::sandbox::thread_modes(p.pid()).unwrap();
    // The main thread, the shutdown watcher and one worker per queue (or per CPU, when the
    // process may use fewer CPUs than it has queues) at least.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(threads.len() >= 2 + queues.min(cpus), "{threads:?}");
    for t in &threads {
        assert_eq!(
            t.seccomp,
            hype_testkit::sandbox::SECCOMP_MODE_FILTER,
            "thread not filtered: {t:?} (all: {threads:?})"
        );
    }
    assert_eq!(disk.read(0, data.len() as u32).unwrap(), data);
}

/// A backend started with the sandbox test hook `hook` dies of SIGSYS, naming `syscall`.
pub fn check_hook_kills(bin: &str, args: &[&str], dir: &Path, hook: &str, syscall: &str) {
    let mut cmd = Command::new(bin);
    let name: String = hook
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    cmd.args(args)
        .arg("--socket")
        .arg(dir.join(format!("{name}.sock")));
    let (status, stderr) = hype_testkit::sandbox::run_hook(cmd, hook, WAIT).unwrap();
    hype_testkit::sandbox::assert_killed_by_sigsys(status, &stderr, syscall);
}

/// A backend asked (test hook) to open `path`, a file outside its sandbox, once confined: the
/// open fails with EACCES and the backend goes on serving.
pub fn check_open_refused(bin: &str, args: &[&str], dir: &Path, path: &str) {
    let socket = dir.join("open.sock");
    let log = dir.join("open.log");
    let child = Command::new(bin)
        .args(args)
        .arg("--socket")
        .arg(&socket)
        .env("HYPE_LOG", "warn")
        .env(hype_testkit::sandbox::HOOK_VAR, format!("open:{path}"))
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut p = Process::from_child(child, &socket);
    let mut disk = connect(&p.socket, 1);
    let data = pattern(0, 4096, 3);
    disk.execute(0, &BlkRequest::write(0, data.clone()))
        .unwrap();
    assert_eq!(disk.read(0, 4096).unwrap(), data);
    drop(disk);
    assert!(p.signal_and_wait(libc::SIGTERM).success());
    let text = std::fs::read_to_string(&log).unwrap();
    let want = format!("sandbox test hook: open {path}: Permission denied");
    assert!(text.contains(&want), "no {want:?} in: {text}");
}
