//! The RAM disk storage: sparse, chunked, locks per shard of chunks.
//!
//! Bookkeeping is proportional to what was written, not to the disk's size: chunks live in
//! hash maps keyed by chunk index, so a 10 TiB disk that the guest never writes costs a few
//! hundred bytes. The maps are split into [`SHARDS`] shards, each with its own lock, so requests
//! on different chunks mostly run in parallel.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use hype_block::{Storage, StorageInfo};

/// Allocation unit.
const CHUNK: u64 = 1 << 20;

/// Number of independently locked shards (chunk `i` lives in shard `i % SHARDS`).
const SHARDS: usize = 64;

/// The largest disk a [`MemStorage`] serves: 1 EiB. Any size up to it costs the same until the
/// guest writes; only written chunks take memory.
pub const MAX_SIZE: u64 = 1 << 60;

type Shard = RwLock<HashMap<u64, Box<[u8]>>>;

/// A RAM disk. Chunks are allocated on first write; discarding or zeroing a whole chunk frees
/// it.
pub struct MemStorage {
    size: u64,
    read_only: bool,
    shards: Vec<Shard>,
}

impl MemStorage {
    /// An all-zero disk of `size` bytes (at most [`MAX_SIZE`]; larger sizes are clamped, the
    /// command line refuses them before this is called).
    pub fn new(size: u64, read_only: bool) -> Self {
        MemStorage {
            size: size.min(MAX_SIZE),
            read_only,
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, idx: u64) -> &Shard {
        // `idx % SHARDS` is below SHARDS, the length of `shards`.
        &self.shards[(idx % SHARDS as u64) as usize]
    }

    /// Copies `src` to the start of the disk (up to its size). All-zero chunks stay
    /// unallocated.
    pub fn load(&self, mut src: impl Read) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK as usize];
        let chunks = self.size.div_ceil(CHUNK);
        for idx in 0..chunks {
            let len = self.chunk_len(idx);
            let mut filled = 0;
            while filled < len {
                match src.read(&mut buf[filled..len]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            if buf[..filled].iter().any(|&b| b != 0) {
                let mut data = vec![0u8; len].into_boxed_slice();
                data[..filled].copy_from_slice(&buf[..filled]);
                write(self.shard(idx)).insert(idx, data);
            }
            if filled < len {
                break; // end of image
            }
        }
        Ok(())
    }

    /// Bytes of memory currently allocated for data.
    pub fn allocated_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| read(s).values().map(|d| d.len() as u64).sum::<u64>())
            .sum()
    }

    /// Length of chunk `idx` (the last one may be short).
    fn chunk_len(&self, idx: u64) -> usize {
        (self.size.saturating_sub(idx * CHUNK)).min(CHUNK) as usize
    }

    /// Splits `offset..offset+len` into per-chunk pieces: (chunk index, offset in chunk,
    /// length, offset in the caller's buffer).
    fn pieces(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, usize, usize, usize)>> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("range {offset}+{len} beyond disk size {}", self.size),
                )
            })?;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let idx = pos / CHUNK;
            let in_chunk = (pos % CHUNK) as usize;
            let n = (CHUNK - pos % CHUNK).min(end - pos) as usize;
            out.push((idx, in_chunk, n, (pos - offset) as usize));
            pos += n as u64;
        }
        Ok(out)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only());
        }
        for (idx, at, n, _) in self.pieces(offset, len)? {
            let mut shard = write(self.shard(idx));
            if n == self.chunk_len(idx) {
                shard.remove(&idx); // the whole chunk: give the memory back
            } else if let Some(data) = shard.get_mut(&idx) {
                data[at..at + n].fill(0);
            }
        }
        Ok(())
    }
}

fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "disk is read-only")
}

fn read(s: &Shard) -> RwLockReadGuard<'_, HashMap<u64, Box<[u8]>>> {
    s.read().unwrap_or_else(|p| p.into_inner())
}

fn write(s: &Shard) -> RwLockWriteGuard<'_, HashMap<u64, Box<[u8]>>> {
    s.write().unwrap_or_else(|p| p.into_inner())
}

impl Storage for MemStorage {
    fn info(&self) -> StorageInfo {
        StorageInfo::new(self.size)
            .read_only(self.read_only)
            .discard(true)
            .write_zeroes(true)
            .serial("hype-block-mem")
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (idx, at, n, pos) in self.pieces(offset, buf.len() as u64)? {
            match read(self.shard(idx)).get(&idx) {
                Some(data) => buf[pos..pos + n].copy_from_slice(&data[at..at + n]),
                None => buf[pos..pos + n].fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(read_only());
        }
        for (idx, at, n, pos) in self.pieces(offset, buf.len() as u64)? {
            let len = self.chunk_len(idx);
            let mut shard = write(self.shard(idx));
            let data = shard
                .entry(idx)
                .or_insert_with(|| vec![0u8; len].into_boxed_slice());
            data[at..at + n].copy_from_slice(&buf[pos..pos + n]);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        self.zero_range(offset, len)
    }

    /// The RAM disk lives only in this process: a snapshot carries it (DEVICE_STATE).
    fn has_state(&self) -> bool {
        true
    }

    /// Writes the state format described at [`STATE_MAGIC`]: only the allocated chunks that
    /// are not all zero.
    fn save_state(&self, out: &mut dyn Write) -> io::Result<()> {
        out.write_all(STATE_MAGIC)?;
        out.write_all(&self.size.to_le_bytes())?;
        let mut indexes: Vec<u64> = self
            .shards
            .iter()
            .flat_map(|s| read(s).keys().copied().collect::<Vec<_>>())
            .collect();
        indexes.sort_unstable();
        for idx in indexes {
            let shard = read(self.shard(idx));
            let Some(data) = shard.get(&idx) else {
                continue;
            };
            if data.iter().all(|&b| b == 0) {
                continue;
            }
            out.write_all(&idx.to_le_bytes())?;
            out.write_all(data)?;
        }
        out.write_all(&STATE_END.to_le_bytes())
    }

    /// Reads a state [`save_state`](Storage::save_state) wrote, refusing one of another
    /// disk size, a chunk out of order or past the end, or a stream cut short. The disk is
    /// replaced only once the whole state has been read and checked.
    fn load_state(&self, input: &mut dyn Read) -> io::Result<()> {
        let mut magic = [0u8; STATE_MAGIC.len()];
        input.read_exact(&mut magic).map_err(cut_short)?;
        if &magic != STATE_MAGIC {
            return Err(bad_state("not a block-mem state".into()));
        }
        let size = read_u64(input)?;
        if size != self.size {
            return Err(bad_state(format!(
                "state of a {size}-byte disk, this disk has {} bytes",
                self.size
            )));
        }
        let chunks = self.size.div_ceil(CHUNK);
        let mut loaded: Vec<(u64, Box<[u8]>)> = Vec::new();
        loop {
            let idx = read_u64(input)?;
            if idx == STATE_END {
                break;
            }
            if idx >= chunks || loaded.last().is_some_and(|(last, _)| *last >= idx) {
                return Err(bad_state(format!(
                    "chunk {idx} out of order or past the end"
                )));
            }
            let mut data = vec![0u8; self.chunk_len(idx)].into_boxed_slice();
            input.read_exact(&mut data).map_err(cut_short)?;
            loaded.push((idx, data));
        }
        let mut extra = [0u8; 1];
        if input.read(&mut extra)? != 0 {
            return Err(bad_state("bytes after the end of the state".into()));
        }
        for shard in &self.shards {
            write(shard).clear();
        }
        for (idx, data) in loaded {
            write(self.shard(idx)).insert(idx, data);
        }
        Ok(())
    }
}

/// The state of a RAM disk (vhost-user DEVICE_STATE): these 16 bytes, the disk size (u64),
/// then for each chunk of 1 MiB that holds data, in ascending order, its index (u64) and its
/// bytes (1 MiB, the last chunk of the disk as long as it is), ended by [`STATE_END`]. All
/// integers little endian.
pub const STATE_MAGIC: &[u8; 16] = b"hype-blkmem-st1\n";

/// The index that ends a state.
const STATE_END: u64 = u64::MAX;

fn read_u64(input: &mut dyn Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    input.read_exact(&mut b).map_err(cut_short)?;
    Ok(u64::from_le_bytes(b))
}

fn cut_short(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        bad_state("cut short".into())
    } else {
        e
    }
}

fn bad_state(why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("block-mem state: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_across_chunks_and_sparse() {
        let s = MemStorage::new(3 * CHUNK + 4096, false);
        assert_eq!(s.allocated_bytes(), 0);
        let mut buf = vec![0xffu8; 8192];
        s.read_at(CHUNK - 4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        s.write_at(CHUNK - 4096, &data).unwrap();
        assert_eq!(s.allocated_bytes(), 2 * CHUNK);
        s.read_at(CHUNK - 4096, &mut buf).unwrap();
        assert_eq!(buf, data);
        // Last, short chunk.
        s.write_at(3 * CHUNK, &data[..4096]).unwrap();
        assert_eq!(s.allocated_bytes(), 2 * CHUNK + 4096);
        assert!(s.write_at(3 * CHUNK + 512, &data[..4096]).is_err());
        assert!(s.read_at(u64::MAX - 10, &mut buf).is_err());
    }

    #[test]
    fn discard_frees_whole_chunks_and_zeroes_parts() {
        let s = MemStorage::new(2 * CHUNK, false);
        s.write_at(0, &vec![7u8; 2 * CHUNK as usize]).unwrap();
        s.discard(512, CHUNK + 512).unwrap(); // bytes 512..CHUNK+1024: parts of both chunks
        let mut b = vec![0u8; 2 * CHUNK as usize];
        s.read_at(0, &mut b).unwrap();
        assert!(b[..512].iter().all(|&x| x == 7));
        assert!(b[512..CHUNK as usize + 1024].iter().all(|&x| x == 0));
        assert!(b[CHUNK as usize + 1024..].iter().all(|&x| x == 7));
        s.write_zeroes(CHUNK, CHUNK, true).unwrap();
        assert_eq!(s.allocated_bytes(), CHUNK);
    }

    #[test]
    fn read_only_refuses_writes() {
        let s = MemStorage::new(CHUNK, true);
        assert!(s.info().read_only);
        assert!(s.write_at(0, &[1; 512]).is_err());
        assert!(s.discard(0, 512).is_err());
    }

    #[test]
    fn huge_disks_cost_nothing_until_written() {
        // 10 TiB and the 1 EiB maximum: bookkeeping does not grow with the size.
        for size in [10u64 << 40, MAX_SIZE] {
            let s = MemStorage::new(size, false);
            assert_eq!(s.info().size, size);
            s.write_at(size - 4096, &[5u8; 4096]).unwrap();
            let mut b = [0u8; 8192];
            s.read_at(size - 8192, &mut b).unwrap();
            assert!(b[..4096].iter().all(|&x| x == 0));
            assert!(b[4096..].iter().all(|&x| x == 5));
            assert_eq!(s.allocated_bytes(), CHUNK);
            s.discard(size - CHUNK, CHUNK).unwrap();
            assert_eq!(s.allocated_bytes(), 0);
            assert!(s.read_at(size - 512, &mut b).is_err());
        }
    }

    #[test]
    fn state_round_trip_is_sparse_and_checked() {
        let s = MemStorage::new(5 * CHUNK + 4096, false);
        s.write_at(CHUNK + 512, &[3u8; 4096]).unwrap();
        s.write_at(5 * CHUNK, &[9u8; 4096]).unwrap();
        s.write_at(3 * CHUNK, &[0u8; 512]).unwrap(); // allocated but all zero: not saved
        let mut state = Vec::new();
        s.save_state(&mut state).unwrap();
        assert_eq!(state.len(), 16 + 8 + (8 + CHUNK as usize) + (8 + 4096) + 8);

        let t = MemStorage::new(5 * CHUNK + 4096, false);
        t.write_at(0, &[1u8; 512]).unwrap(); // replaced by the load
        t.load_state(&mut &state[..]).unwrap();
        assert_eq!(t.allocated_bytes(), CHUNK + 4096);
        let (mut a, mut b) = (vec![0u8; 6 * CHUNK as usize], vec![0u8; 6 * CHUNK as usize]);
        s.read_at(0, &mut a[..5 * CHUNK as usize + 4096]).unwrap();
        t.read_at(0, &mut b[..5 * CHUNK as usize + 4096]).unwrap();
        assert!(a == b);

        // Refusals leave the disk as it was.
        let other = MemStorage::new(4 * CHUNK, false);
        assert!(other.load_state(&mut &state[..]).is_err());
        assert!(t.load_state(&mut &state[..state.len() - 3]).is_err());
        assert!(t.load_state(&mut &state[..100]).is_err());
        let mut bad = state.clone();
        bad[0] ^= 1;
        assert!(t.load_state(&mut &bad[..]).is_err());
        let mut long = state.clone();
        long.push(0);
        assert!(t.load_state(&mut &long[..]).is_err());
        let mut past = state.clone();
        past[24..32].copy_from_slice(&9u64.to_le_bytes()); // chunk 9 of a 6-chunk disk
        assert!(t.load_state(&mut &past[..]).is_err());
        assert_eq!(t.allocated_bytes(), CHUNK + 4096);
        let mut c = [0u8; 512];
        t.read_at(0, &mut c).unwrap();
        assert_eq!(c, [0u8; 512]);
    }

    #[test]
    fn load_keeps_zero_chunks_sparse() {
        let s = MemStorage::new(3 * CHUNK, false);
        let mut img = vec![0u8; 2 * CHUNK as usize + 100];
        img[CHUNK as usize + 5] = 9;
        img[2 * CHUNK as usize + 99] = 3;
        s.load(&img[..]).unwrap();
        assert_eq!(s.allocated_bytes(), 2 * CHUNK);
        let mut b = vec![0u8; 3 * CHUNK as usize];
        s.read_at(0, &mut b).unwrap();
        assert_eq!(&b[..img.len()], &img[..]);
        assert!(b[img.len()..].iter().all(|&x| x == 0));
    }
}
