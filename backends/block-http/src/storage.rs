//! [`HttpStorage`]: the [`Storage`] the device serves: the remote image through the cache,
//! with the optional copy-on-write overlay on top.

use std::io;
use std::sync::{Mutex, MutexGuard};

use hype_block::{Storage, StorageInfo};

use crate::overlay::Overlay;
use crate::reader::RemoteReader;

/// Stripes of locks serialising read-modify-write of partially written granules.
const WRITE_STRIPES: usize = 64;

/// An HTTP image as a block store.
pub struct HttpStorage {
    reader: RemoteReader,
    overlay: Option<Overlay>,
    size: u64,
    block_size: u32,
    read_only: bool,
    optimal_io: u32,
    stripes: Vec<Mutex<()>>,
}

impl HttpStorage {
    /// A store of `size` bytes (the image size rounded up to a sector; the tail reads as
    /// zeroes) presenting `block_size`-byte blocks. Without an overlay it is read-only.
    pub fn new(
        reader: RemoteReader,
        overlay: Option<Overlay>,
        size: u64,
        block_size: u32,
        read_only: bool,
        optimal_io: u32,
    ) -> Self {
        let read_only = read_only || overlay.is_none();
        HttpStorage {
            reader,
            overlay,
            size,
            block_size,
            read_only,
            optimal_io,
            stripes: (0..WRITE_STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// The remote reader (for statistics).
    pub fn reader(&self) -> &RemoteReader {
        &self.reader
    }

    fn stripe(&self, granule: u64) -> MutexGuard<'_, ()> {
        let m = &self.stripes[(granule % WRITE_STRIPES as u64) as usize];
        match m.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Copy-on-write of one granule that `buf` (at disk `offset`) covers only in part.
    fn write_partial(&self, ov: &Overlay, offset: u64, buf: &[u8]) -> io::Result<()> {
        let g = ov.granule();
        let idx = offset / g;
        let start = idx * g;
        let glen = g.min(self.size - start) as usize;
        let _lock = self.stripe(idx);
        let mut whole = vec![0u8; glen];
        if ov.is_local(idx) {
            ov.read_local(start, &mut whole)?;
        } else {
            self.reader.read(start, &mut whole)?;
        }
        let at = (offset - start) as usize;
        whole[at..at + buf.len()].copy_from_slice(buf);
        ov.write_granules(start, &whole)
    }
}

impl Storage for HttpStorage {
    fn info(&self) -> StorageInfo {
        StorageInfo::new(self.size)
            .block_size(self.block_size)
            .physical_block_size(self.block_size.max(4096))
            .optimal_io_size(self.optimal_io)
            .read_only(self.read_only)
            .write_zeroes(!self.read_only)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let Some(ov) = &self.overlay else {
            return self.reader.read(offset, buf);
        };
        // Split into runs of local and remote granules.
        let g = ov.granule();
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let local = ov.is_local(pos / g);
            let mut run_end = ((pos / g) + 1) * g;
            while run_end < end && ov.is_local(run_end / g) == local {
                run_end += g;
            }
            let run_end = run_end.min(end);
            let dst = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if local {
                ov.read_local(pos, dst)?;
            } else {
                self.reader.read(pos, dst)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let Some(ov) = self.overlay.as_ref().filter(|_| !self.read_only) else {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only disk",
            ));
        };
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write beyond the disk"))?;
        let g = ov.granule();
        // Head: a partial granule.
        let mut pos = offset;
        if pos % g != 0 {
            let stop = end.min((pos / g + 1) * g);
            self.write_partial(ov, pos, &buf[..(stop - offset) as usize])?;
            pos = stop;
        }
        // Middle: whole granules (or up to the end of the disk), written as they are.
        let whole_end = if end == self.size { end } else { end / g * g };
        if whole_end > pos {
            ov.write_granules(
                pos,
                &buf[(pos - offset) as usize..(whole_end - offset) as usize],
            )?;
            pos = whole_end;
        }
        // Tail: a partial granule.
        if pos < end {
            self.write_partial(ov, pos, &buf[(pos - offset) as usize..])?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        let Some(ov) = self.overlay.as_ref().filter(|_| !self.read_only) else {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only disk",
            ));
        };
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "zeroing beyond the disk")
            })?;
        let g = ov.granule();
        // Partial granules at either end are written; whole ones become holes.
        let whole_start = offset.div_ceil(g) * g;
        let whole_end = if end == self.size { end } else { end / g * g };
        if whole_start >= whole_end {
            return hype_block::write_zero_buffers(self, offset, len);
        }
        if offset < whole_start {
            hype_block::write_zero_buffers(self, offset, whole_start - offset)?;
        }
        ov.zero_granules(whole_start, whole_end - whole_start)?;
        if whole_end < end {
            hype_block::write_zero_buffers(self, whole_end, end - whole_end)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        match &self.overlay {
            Some(ov) if !self.read_only => ov.sync(),
            _ => Ok(()),
        }
    }
}
