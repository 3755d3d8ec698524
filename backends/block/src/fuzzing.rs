//! Entry points for the fuzz targets in `fuzz/` (hidden from the docs; no stability promise).
//!
//! They run the same code a backend runs on a guest's request, on memory and a disk that the
//! fuzzer fills, and check the invariants a guest relies on. A panic here is a bug found.

use std::io;
use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::chain::DescTable;
use crate::config::DeviceSpec;
use crate::iobuf::IoBuf;
use crate::request::{execute, parse};
use crate::storage::{Storage, StorageInfo};

/// Guest memory size of the fuzzed request.
const MEM_SIZE: usize = 1 << 20;
/// Disk size of the fuzzed request.
const DISK_SIZE: u64 = 1 << 20;

/// A small in-memory disk.
struct Disk {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl Storage for Disk {
    fn info(&self) -> StorageInfo {
        StorageInfo::new(DISK_SIZE)
            .read_only(self.read_only)
            .discard(true)
            .write_zeroes(true)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let src = d
            .get(start..start.saturating_add(buf.len()))
            .ok_or(io::ErrorKind::InvalidInput)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        assert!(!self.read_only, "a write reached a read-only disk");
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let dst = d
            .get_mut(start..start.saturating_add(buf.len()))
            .ok_or(io::ErrorKind::InvalidInput)?;
        dst.copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Parses and executes the chain at `head` of a descriptor table at guest address 0 with
/// `table_size` entries, in 1 MiB of guest memory that starts with `image`, against a 1 MiB
/// disk (read-only when `read_only`). Checks that a request never reports more bytes written
/// than the chain's writable buffers hold, and that the status byte lies in guest memory.
pub fn request(image: &[u8], head: u16, table_size: u16, read_only: bool) {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let n = image.len().min(MEM_SIZE);
    if mem.write_slice(&image[..n], GuestAddress(0)).is_err() {
        return;
    }
    let disk = Disk {
        data: Mutex::new(vec![0u8; DISK_SIZE as usize]),
        read_only,
    };
    let mut serial = [0u8; 20];
    serial[..4].copy_from_slice(b"fuzz");
    let spec = DeviceSpec {
        capacity_sectors: DISK_SIZE / 512,
        block_size: 512,
        physical_block_size: 4096,
        optimal_io_size: 0,
        read_only,
        discard: true,
        write_zeroes: true,
        serial,
        num_queues: 1,
        queue_size: table_size.max(1),
        seg_max: 254,
    };
    let table = DescTable {
        addr: GuestAddress(0),
        size: table_size.max(1),
    };
    let Ok(req) = parse(head % table.size, table, &mem, &spec) else {
        return; // dropped chains are answered with a used length of 0
    };
    assert!(
        (req.status_addr.0 as usize) < MEM_SIZE,
        "status byte outside guest memory"
    );
    let done = execute(&req.op, &disk, &mem, &spec, &mut IoBuf::new());
    assert!(
        u64::from(done.used_len()) <= MEM_SIZE as u64 + 1,
        "used length beyond guest memory"
    );
}
