//! A custom storage backend in ~100 lines: a disk image whose 4 KiB blocks are checksummed.
//!
//! Data lives in `PATH`, one CRC-32 per block in `PATH.sums`. Every read is verified; a block
//! whose bytes were changed behind our back (bit rot, a stray `dd`) is answered with IOERR
//! instead of handing the guest bad data.
//!
//! ```text
//! cargo run -p hype-block --example checksummed -- --path /tmp/disk.img --size 64M --socket /tmp/blk.sock
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use clap::Parser;
use hype_block::{parse_size, BlockDevice, DeviceArgs, Storage, StorageInfo};

const BLOCK: u64 = 4096;
/// Locks guarding "data + checksum" updates, picked by block number.
const SHARDS: usize = 64;

/// A file plus a checksum per 4 KiB block.
struct ChecksummedFile {
    data: File,
    sums: File,
    size: u64,
    shards: Vec<Mutex<()>>,
}

impl ChecksummedFile {
    fn open(path: &Path, size: u64) -> io::Result<Self> {
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
        };
        let data = open(path)?;
        let size = if size > 0 {
            size
        } else {
            data.metadata()?.len()
        };
        if size == 0 || size % BLOCK != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "size must be a non-zero multiple of 4 KiB",
            ));
        }
        data.set_len(size)?;
        let mut sums_path = path.as_os_str().to_owned();
        sums_path.push(".sums");
        let sums = open(Path::new(&sums_path))?;
        let blocks = size / BLOCK;
        if sums.metadata()?.len() != blocks * 4 {
            // New image: every block is zero.
            let zero = crc32(&[0; BLOCK as usize]).to_le_bytes();
            let all: Vec<u8> = (0..blocks).flat_map(|_| zero).collect();
            sums.write_all_at(&all, 0)?;
        }
        Ok(ChecksummedFile {
            data,
            sums,
            size,
            shards: (0..SHARDS).map(|_| Mutex::new(())).collect(),
        })
    }

    fn lock(&self, block: u64) -> std::sync::MutexGuard<'_, ()> {
        self.shards[block as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Storage for ChecksummedFile {
    fn info(&self) -> StorageInfo {
        // 4 KiB logical blocks: the device never asks for part of a checksummed block.
        StorageInfo::new(self.size)
            .block_size(BLOCK as u32)
            .serial("checksummed")
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (i, chunk) in buf.chunks_mut(BLOCK as usize).enumerate() {
            let block = offset / BLOCK + i as u64;
            let _guard = self.lock(block);
            self.data.read_exact_at(chunk, block * BLOCK)?;
            let mut sum = [0u8; 4];
            self.sums.read_exact_at(&mut sum, block * 4)?;
            if crc32(chunk) != u32::from_le_bytes(sum) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("checksum mismatch in block {block}"),
                ));
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        for (i, chunk) in buf.chunks(BLOCK as usize).enumerate() {
            let block = offset / BLOCK + i as u64;
            let _guard = self.lock(block);
            self.data.write_all_at(chunk, block * BLOCK)?;
            self.sums
                .write_all_at(&crc32(chunk).to_le_bytes(), block * 4)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.data.sync_data()?;
        self.sums.sync_data()
    }
}

/// CRC-32 (IEEE), bit by bit: small rather than fast.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// A checksummed disk image served over vhost-user.
#[derive(Parser)]
struct Args {
    /// Disk image (created if missing); checksums go to PATH.sums.
    #[arg(long)]
    path: PathBuf,
    /// Size for a new image, e.g. 64M (default: the existing image's size).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    size: u64,
    #[command(flatten)]
    device: DeviceArgs,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    hype_block::init_logging();
    let args = Args::parse();
    let store = ChecksummedFile::open(&args.path, args.size)?;
    BlockDevice::new(store)
        .name("checksummed")
        .run(&args.device)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hype_block::{Shutdown, SocketListener};
    use hype_testkit::blk::{BlkDriver, BlkRequest, BlkStatus};
    use hype_testkit::driver::DriverOptions;

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn serves_data_and_catches_corruption() {
        let dir = std::env::temp_dir().join(format!("hype-checksummed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        let store = ChecksummedFile::open(&img, 1 << 20).unwrap();
        let sock = dir.join("blk.sock");
        let mut listener = SocketListener::bind(&sock, 0o600).unwrap();
        let shutdown = Shutdown::new().unwrap();
        let sd = shutdown.clone();
        let server = std::thread::spawn(move || {
            BlockDevice::new(store)
                .serve_on(&mut listener, &sd)
                .unwrap()
        });

        let mut disk = BlkDriver::connect(&sock, DriverOptions::default()).unwrap();
        assert_eq!(disk.config().blk_size, 4096);
        assert_eq!(disk.read(0, 8192).unwrap(), vec![0; 8192]);
        disk.write(8, &[0xab; 8192]).unwrap();
        assert_eq!(disk.read(8, 8192).unwrap(), vec![0xab; 8192]);
        // Flip a byte of block 2 behind the backend's back.
        File::options()
            .write(true)
            .open(&img)
            .unwrap()
            .write_all_at(&[0], 2 * BLOCK + 100)
            .unwrap();
        let r = disk.execute(0, &BlkRequest::read(16, 4096)).unwrap();
        assert_eq!(r.status, BlkStatus::IoErr);
        assert_eq!(
            disk.read(8, 4096).unwrap(),
            vec![0xab; 4096],
            "block 1 is fine"
        );

        drop(disk);
        shutdown.trigger();
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
