//! Bounded byte buffers between the guest and the user's end of the console.

use std::collections::VecDeque;

/// Guest output waiting for a reader: bounded, dropping the *oldest* bytes when full and
/// counting what it dropped so the reader can be told.
#[derive(Debug)]
pub struct OutputBuffer {
    data: VecDeque<u8>,
    cap: usize,
    dropped_unreported: u64,
    dropped_total: u64,
}

impl OutputBuffer {
    /// An empty buffer holding at most `cap` bytes (at least 1).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        OutputBuffer {
            data: VecDeque::with_capacity(cap.min(1 << 20)),
            cap,
            dropped_unreported: 0,
            dropped_total: 0,
        }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether nothing is waiting (dropped-bytes notices included).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty() && self.dropped_unreported == 0
    }

    /// The bound.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Free space before the bound.
    pub fn room(&self) -> usize {
        self.cap.saturating_sub(self.data.len())
    }

    /// Appends `bytes`, discarding the oldest bytes if the bound would be exceeded. Returns how
    /// many bytes were discarded.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let mut dropped = 0;
        let bytes = if bytes.len() > self.cap {
            dropped += bytes.len() - self.cap;
            &bytes[bytes.len() - self.cap..]
        } else {
            bytes
        };
        let over = (self.data.len() + bytes.len()).saturating_sub(self.cap);
        if over > 0 {
            self.data.drain(..over);
            dropped += over;
        }
        self.data.extend(bytes);
        self.dropped_unreported += dropped as u64;
        self.dropped_total += dropped as u64;
        dropped
    }

    /// Total bytes ever discarded.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    /// If bytes were discarded since the last call, puts a one-line notice in front of what is
    /// waiting (where the gap is) and returns the count. Call right before handing bytes to a
    /// reader.
    pub fn insert_drop_notice(&mut self) -> Option<u64> {
        if self.dropped_unreported == 0 {
            return None;
        }
        let n = std::mem::take(&mut self.dropped_unreported);
        for &b in drop_notice(n).as_bytes().iter().rev() {
            self.data.push_front(b);
        }
        Some(n)
    }

    /// The oldest waiting bytes as one contiguous slice (possibly not all of them).
    pub fn front(&self) -> &[u8] {
        let (a, b) = self.data.as_slices();
        if a.is_empty() {
            b
        } else {
            a
        }
    }

    /// Removes `n` bytes from the front (what a reader accepted).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.data.len());
        self.data.drain(..n);
    }
}

impl OutputBuffer {
    /// A copy of the bytes waiting (for a snapshot of the device).
    pub fn contents(&self) -> Vec<u8> {
        self.data.iter().copied().collect()
    }
}

/// The notice a reader sees where guest output was dropped.
pub fn drop_notice(n: u64) -> String {
    format!("\r\n[hype-console: {n} bytes of guest output dropped]\r\n")
}

/// Input for the guest: bounded; the producer stops reading its source when it is full, so
/// nothing is dropped.
#[derive(Debug)]
pub struct InputBuffer {
    data: VecDeque<u8>,
    cap: usize,
}

impl InputBuffer {
    /// An empty buffer holding at most `cap` bytes (at least 1).
    pub fn new(cap: usize) -> Self {
        InputBuffer {
            data: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// Free space.
    pub fn room(&self) -> usize {
        self.cap.saturating_sub(self.data.len())
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Appends as much of `bytes` as fits; returns how many were taken.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.room());
        self.data.extend(&bytes[..n]);
        n
    }

    /// The oldest waiting bytes as one contiguous slice.
    pub fn front(&self) -> &[u8] {
        let (a, b) = self.data.as_slices();
        if a.is_empty() {
            b
        } else {
            a
        }
    }

    /// Removes `n` bytes from the front.
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.data.len());
        self.data.drain(..n);
    }

    /// A copy of the bytes waiting (for a snapshot of the device).
    pub fn contents(&self) -> Vec<u8> {
        self.data.iter().copied().collect()
    }

    /// The bound.
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(b: &mut OutputBuffer) -> Vec<u8> {
        let mut out = Vec::new();
        while !b.front().is_empty() {
            let f = b.front().to_vec();
            b.consume(f.len());
            out.extend(f);
        }
        out
    }

    #[test]
    fn output_keeps_order_and_drops_oldest() {
        let mut b = OutputBuffer::new(8);
        assert_eq!(b.push(b"abcd"), 0);
        assert_eq!(b.push(b"efgh"), 0);
        assert_eq!(b.room(), 0);
        assert_eq!(b.push(b"ij"), 2);
        assert_eq!(b.dropped_total(), 2);
        assert_eq!(b.insert_drop_notice(), Some(2));
        assert_eq!(b.insert_drop_notice(), None);
        let got = drain(&mut b);
        let mut want = drop_notice(2).into_bytes();
        want.extend(b"cdefghij");
        assert_eq!(got, want);
        assert!(b.is_empty());
    }

    #[test]
    fn output_larger_than_bound_keeps_the_tail() {
        let mut b = OutputBuffer::new(4);
        b.push(b"xy");
        assert_eq!(b.push(b"0123456789"), 8);
        b.insert_drop_notice();
        let got = drain(&mut b);
        assert!(got.ends_with(b"6789"));
        assert!(String::from_utf8_lossy(&got).contains("8 bytes"));
    }

    #[test]
    fn input_refuses_what_does_not_fit() {
        let mut b = InputBuffer::new(5);
        assert_eq!(b.push(b"abc"), 3);
        assert_eq!(b.push(b"def"), 2);
        assert_eq!(b.room(), 0);
        assert_eq!(b.front(), b"abcde");
        b.consume(2);
        assert_eq!(b.push(b"f"), 1);
        let mut got = Vec::new();
        while !b.is_empty() {
            let f = b.front().to_vec();
            b.consume(f.len());
            got.extend(f);
        }
        assert_eq!(got, b"cdef");
    }
}
