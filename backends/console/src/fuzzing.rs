//! Entry point for the `console_chains` fuzz target in `fuzz/` (hidden from the docs; no
//! stability promise).
//!
//! [`chains`] runs the console backend's real transmit (guest output) or receive (input for
//! the guest) path on a ring in guest memory that the fuzzer fills
//! ([`hype_daemon::fuzzing::FuzzRing`]), with bounded buffers whose sizes come from the input,
//! and checks the bytes that moved against an independent walk of each chain. A panic is a
//! bug found.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hype_daemon::fuzzing::{overlaps, walk, FuzzRing, RingImage, Walked, USED};
use vhost_user_backend::VhostUserBackend;

use crate::backend::ConsoleBackend;
use crate::shared::Shared;

/// What one run moved, for the unit tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Moved {
    /// Bytes of guest output taken from the transmit chains.
    pub out: u64,
    /// Guest output left in the output buffer.
    pub buffered: Vec<u8>,
    /// Bytes of input placed in receive chains.
    pub delivered: u64,
    /// Used entries written.
    pub used: usize,
}

/// Whether segment lists never overlap each other nor the used ring or a descriptor read.
fn disjoint(ring: &FuzzRing, chains: &[&Walked], writable: bool) -> bool {
    let used = (USED, ring.used_ring_len());
    let mut ranges: Vec<(u64, u64)> = vec![used];
    let mut descs = Vec::new();
    for w in chains {
        descs.extend(w.descs.iter().map(|&d| (d, 16u64)));
        ranges.extend(
            w.segs
                .iter()
                .filter(|s| s.writable == writable && s.len > 0)
                .map(|s| (s.addr, u64::from(s.len))),
        );
    }
    if ranges.len() > 256 {
        return false; // not worth the quadratic check
    }
    for (i, a) in ranges.iter().enumerate() {
        if ranges[i + 1..]
            .iter()
            .chain(&descs)
            .any(|b| overlaps(a.0, a.1, b.0, b.1))
        {
            return false;
        }
    }
    true
}

/// The bytes of the buffers of one direction of `w` in `mem`, if they all lie in it (what
/// virtio-queue's `Reader`/`Writer` make of the chain; otherwise they refuse it).
fn bytes_of(w: &Walked, mem: &[u8], writable: bool) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for s in w
        .segs
        .iter()
        .filter(|s| s.writable == writable && s.len > 0)
    {
        let start = usize::try_from(s.addr).ok()?;
        out.extend_from_slice(mem.get(start..start.checked_add(s.len as usize)?)?);
    }
    Some(out)
}

/// Runs the transmit or the receive queue of a console over a fuzzed ring. Input: a flags
/// byte (bit 0: receive queue; bit 1: EVENT_IDX), the ring size, the buffer bound (output
/// buffer for transmit, input buffer for receive: `(byte + 1) * 64` bytes), the length of the
/// pending input (u16, receive only; bytes from the input), then guest memory.
///
/// Checks, besides "no panic":
/// * transmit: the bytes taken equal the readable bytes of the well-formed chains (exactly,
///   in order, when no buffer overlaps the used ring); the output buffer holds their last
///   bytes up to its bound; every chain is returned with a used length 0.
/// * receive: no used length exceeds the chain's writable bytes; the used lengths add up to
///   the bytes taken from the input buffer; the guest's buffers hold the input, in order
///   (when they do not overlap).
pub fn chains(data: &[u8]) -> Option<Moved> {
    let [flags, size, cap, rest @ ..] = data else {
        return None;
    };
    let rx = flags & 1 != 0;
    let event_idx = flags & 2 != 0;
    let cap = (usize::from(*cap) + 1) * 64;
    let (input, image) = if rx {
        let (len, rest) = rest.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_le_bytes(*len)).min(rest.len());
        rest.split_at(len)
    } else {
        (&[][..], rest)
    };
    let ring = FuzzRing::new(image, u16::from(*size), event_idx)?;
    let (out_cap, in_cap) = if rx { (64, cap) } else { (cap, 64) };
    let shared =
        Arc::new(Shared::new(out_cap, in_cap, Vec::new(), true, None, Duration::ZERO).ok()?);
    let taken = shared.lock().input.push(input);
    let backend = ConsoleBackend::new(shared.clone(), ring.mem.clone());
    backend.set_event_idx(event_idx);
    let before = ring.snapshot();
    // Receive buffers over the ring itself: the device's writes and the guest's data mix, so
    // only "no panic" is checked.
    let unchecked = rx && ring.self_modifying(&before);
    if rx {
        backend.process_rx(&ring.vring);
    } else {
        backend.process_tx(&ring.vring);
    }
    let used = ring.used_since(0);
    let walked: Vec<Walked> = used
        .iter()
        .map(|&(id, _)| walk(&before, ring.size, id as u16))
        .collect();
    let mut moved = Moved {
        out: shared.stats.tx_bytes.load(Ordering::Relaxed),
        delivered: shared.stats.rx_bytes.load(Ordering::Relaxed),
        used: used.len(),
        ..Moved::default()
    };
    if unchecked {
        return Some(moved);
    }
    for &(id, _) in &used {
        assert!(id < u32::from(ring.size), "used id {id} outside the ring");
    }
    if rx {
        check_rx(&ring, &before, &used, &walked, &input[..taken], &moved);
        assert_eq!(
            shared.lock().input.len() as u64,
            taken as u64 - moved.delivered,
            "input delivered vs left"
        );
    } else {
        moved.buffered = shared.lock().out.contents();
        check_tx(&ring, &before, &used, &walked, &moved, out_cap);
    }
    Some(moved)
}

fn check_tx(
    ring: &FuzzRing,
    before: &[u8],
    used: &[(u32, u32)],
    walked: &[Walked],
    moved: &Moved,
    cap: usize,
) {
    let mut expected = Vec::new();
    for (&(id, len), w) in used.iter().zip(walked) {
        assert_eq!(len, 0, "TX chain {id} returned with a used length");
        if let Some(b) = bytes_of(w, before, false) {
            expected.extend_from_slice(&b);
        }
    }
    assert!(moved.buffered.len() <= cap, "output buffer over its bound");
    let refs: Vec<&Walked> = walked.iter().collect();
    // The device writes the used ring (and only it) while it reads.
    if disjoint(ring, &refs, false) {
        assert_eq!(
            moved.out,
            expected.len() as u64,
            "bytes out vs readable bytes"
        );
        let tail = &expected[expected.len().saturating_sub(cap)..];
        assert!(
            moved.buffered == tail,
            "buffered output is not the chains' last bytes"
        );
    }
}

fn check_rx(
    ring: &FuzzRing,
    before: &[u8],
    used: &[(u32, u32)],
    walked: &[Walked],
    input: &[u8],
    moved: &Moved,
) {
    let after = ring.snapshot();
    let mut total = 0u64;
    let mut got = Vec::new();
    for (&(id, len), w) in used.iter().zip(walked) {
        total += u64::from(len);
        if w.unchanged(before, &after) {
            assert!(
                u64::from(len) <= w.bytes(true),
                "RX chain {id}: used length {len}, {} writable bytes",
                w.bytes(true)
            );
        }
        if let Some(b) = bytes_of(w, &after, true) {
            got.extend_from_slice(&b[..(len as usize).min(b.len())]);
        }
    }
    assert_eq!(total, moved.delivered, "used lengths vs bytes delivered");
    assert!(
        moved.delivered <= input.len() as u64,
        "more delivered than waiting"
    );
    let refs: Vec<&Walked> = walked.iter().collect();
    if disjoint(ring, &refs, true) && walked.iter().all(|w| w.unchanged(before, &after)) {
        assert!(
            got == input[..moved.delivered as usize],
            "the guest's buffers do not hold the input in order"
        );
    }
}

/// Seed inputs for the target (written to `fuzz/corpus/console_chains` by the ignored test
/// `write_seeds`): well-formed transmit and receive chains and a few broken ones.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with = |head: &[u8], img: &RingImage| {
        let mut v = head.to_vec();
        v.extend_from_slice(&img.bytes());
        v
    };
    let mut tx = RingImage::new(8);
    tx.chain(&[(0x800, 6, false), (0x900, 7, false)])
        .chain(&[(0xa00, 100, false), (0xb00, 16, true)])
        .chain(&[(0x1ff0, 0x100, false)])
        .fill(0x800, b"hello ")
        .fill(0x900, b"world\r\n")
        .fill(0xa00, &[b'x'; 100]);
    let mut rx = RingImage::new(4);
    rx.chain(&[(0x800, 3, true)])
        .chain(&[(0x900, 4, false), (0xa00, 0x100, true)])
        .chain(&[(0xb00, 0x100, true)]);
    let input = b"ls -l\r".repeat(20);
    let mut rx_head = vec![1, 4, 3];
    rx_head.extend_from_slice(&(input.len() as u16).to_le_bytes());
    rx_head.extend_from_slice(&input);
    let mut rx_event = rx_head.clone();
    rx_event[0] = 1 | 2;
    vec![
        ("tx", with(&[0, 8, 15], &tx)),
        // An output buffer of 64 bytes: the oldest output is dropped.
        ("tx-small-buffer", with(&[2, 8, 0], &tx)),
        ("rx", with(&rx_head, &rx)),
        ("rx-event-idx", with(&rx_event, &rx)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        seeds()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap_or_default()
    }

    #[test]
    fn seeds_take_the_paths_they_are_for() {
        // 6 + 7 + 100 bytes; the chain that runs past the end of memory gives nothing.
        let tx = chains(&seed("tx")).unwrap_or_default();
        assert_eq!((tx.out, tx.used), (113, 3));
        assert!(tx.buffered.starts_with(b"hello world\r\nxx"));
        let tx = chains(&seed("tx-small-buffer")).unwrap_or_default();
        assert_eq!(tx.buffered, vec![b'x'; 64]);
        // 3 + 256 of the 120 input bytes fit: 3 in the first chain, 117 in the second.
        let rx = chains(&seed("rx")).unwrap_or_default();
        assert_eq!((rx.delivered, rx.used), (120, 2));
        let rx = chains(&seed("rx-event-idx")).unwrap_or_default();
        assert_eq!(rx.delivered, 120);
    }

    #[test]
    fn receive_buffers_over_the_used_ring_are_not_checked() {
        // Found by the first 120 s run: the input landed on the used ring, and the target
        // took the guest's own bytes for a used entry ("used id 1936461164 outside the
        // ring"). Not a device bug: the guest overwrote its ring.
        let mut img = RingImage::new(4);
        // The second chain's input lands on the first chain's used entry.
        img.chain(&[(0x800, 3, true)]).chain(&[(USED, 0x40, true)]);
        let mut input = vec![1, 4, 3];
        let text = b"ls -l\r".repeat(10);
        input.extend_from_slice(&(text.len() as u16).to_le_bytes());
        input.extend_from_slice(&text);
        input.extend_from_slice(&img.bytes());
        let moved = chains(&input).unwrap_or_default();
        assert_eq!((moved.delivered, moved.used), (60, 2));
    }

    #[test]
    fn garbage_rings_are_handled_without_panicking() {
        let pattern: Vec<u8> = (0..9000).map(|i| (i * 7 % 251) as u8).collect();
        for flags in 0..4u8 {
            let mut input = vec![flags, 16, 3, 0x10, 0];
            input.extend_from_slice(&pattern);
            chains(&input);
            chains(&[flags, 64, 0]);
            let mut ones = vec![flags, 64, 255, 0xff, 0xff];
            ones.extend(std::iter::repeat_n(0xff, 9000));
            chains(&ones);
        }
    }

    #[test]
    #[ignore = "writes fuzz/corpus/console_chains"]
    fn write_seeds() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/corpus/console_chains"
        );
        std::fs::create_dir_all(dir).expect("corpus directory");
        for (name, bytes) in seeds() {
            std::fs::write(format!("{dir}/{name}"), bytes).expect("seed written");
        }
    }
}
