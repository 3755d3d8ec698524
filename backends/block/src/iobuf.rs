//! A reusable bounce buffer whose data starts on a 4096-byte boundary.

/// Alignment of the data handed to [`Storage`](crate::Storage) methods.
pub(crate) const IO_ALIGN: usize = 4096;

/// Largest buffer handed to one storage call; larger requests are split.
pub(crate) const IO_CHUNK: usize = 1 << 20;

/// A growable byte buffer whose usable part is 4096-byte aligned. Built without `unsafe`: it
/// over-allocates by one alignment unit and hands out the aligned window.
#[derive(Default)]
pub(crate) struct IoBuf {
    raw: Vec<u8>,
}

impl IoBuf {
    /// An empty buffer; memory is allocated on first use.
    pub(crate) fn new() -> Self {
        IoBuf { raw: Vec::new() }
    }

    /// An aligned, zero-initialised-at-allocation window of `len` bytes (`len <= IO_CHUNK`).
    pub(crate) fn get(&mut self, len: usize) -> &mut [u8] {
        let need = len + IO_ALIGN;
        if self.raw.len() < need {
            self.raw = vec![0u8; need];
        }
        let off = self.raw.as_ptr().align_offset(IO_ALIGN);
        &mut self.raw[off..off + len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned_and_sized() {
        let mut b = IoBuf::new();
        for len in [0usize, 1, 512, 4096, 12345, IO_CHUNK] {
            let w = b.get(len);
            assert_eq!(w.len(), len);
            assert_eq!(w.as_ptr() as usize % IO_ALIGN, 0);
        }
    }
}
