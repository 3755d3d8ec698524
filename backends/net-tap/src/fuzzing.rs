//! Entry point for the `net_chains` fuzz target in `fuzz/` (hidden from the docs; no stability
//! promise).
//!
//! [`chains`] runs the real TX, RX and control-queue code on a ring in guest memory that the
//! fuzzer fills ([`hype_daemon::fuzzing::FuzzRing`]), with a Unix `SOCK_SEQPACKET` socket pair
//! standing in for the tap queue (it keeps frame boundaries, like a tap), and checks what the
//! guest and the host rely on against an independent walk of each chain. A panic is a bug.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

#[cfg(test)]
use hype_daemon::fuzzing::MEM_SIZE;
use hype_daemon::fuzzing::{overlaps, walk, FuzzRing, RingImage, Walked};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_net::{VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET};
use vm_memory::GuestAddressSpace;

use crate::rx::{Negotiated, RxState};
use crate::stats::{Stats, StatsSnapshot};
use crate::tx::{TxScratch, MAX_TX_FRAME};
use crate::{ctrl, tx, LEGACY_VNET_HDR_LEN, VNET_HDR_LEN};

/// Most frames the fake tap holds for one RX run.
const MAX_FRAMES: usize = 8;

/// Which queue an input drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Tx,
    Rx,
    Ctrl,
}

/// A connected `SOCK_SEQPACKET` pair, non-blocking, with room for a ring's worth of frames:
/// `(device end, fake tap end)`.
fn fake_tap() -> Option<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: the kernel just gave us these two descriptors; nothing else owns them.
    let pair = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let buf: libc::c_int = 4 << 20;
    for fd in [&pair.0, &pair.1] {
        // SAFETY: a valid socket and a c_int option value of the size given. Failing only
        // means a smaller buffer (frames then fail with EAGAIN, which the checks allow for).
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&buf as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    Some(pair)
}

/// Every frame waiting on `fd`, in order.
fn read_frames(fd: RawFd) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 2 * MAX_TX_FRAME];
    loop {
        // SAFETY: `buf` is a valid, exclusively borrowed buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(n) = usize::try_from(n) else {
            return frames;
        };
        frames.push(buf[..n].to_vec());
    }
}

/// Copies `data` to the fake tap as one frame; whether it went.
fn write_frame(fd: RawFd, data: &[u8]) -> bool {
    // SAFETY: `data` is a valid buffer of `data.len()` bytes.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    usize::try_from(n) == Ok(data.len())
}

/// The bytes of the readable buffers of `w` in guest memory `mem`, if they all lie in it.
fn readable_bytes(w: &Walked, mem: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for s in w.segs.iter().filter(|s| !s.writable) {
        if s.len == 0 {
            continue;
        }
        let start = usize::try_from(s.addr).ok()?;
        out.extend_from_slice(mem.get(start..start.checked_add(s.len as usize)?)?);
    }
    Some(out)
}

/// Runs one queue of the device over a fuzzed ring. Input: a flags byte (queue: TX, RX or
/// control; EVENT_IDX; MRG_RXBUF; legacy 10-byte header), the ring size, for RX the number of
/// frames waiting on the tap and their lengths (u16 each; the bytes are taken from the input),
/// then guest memory ([`MEM_SIZE`] bytes: descriptor table, rings, buffers).
///
/// Checks, besides "no panic":
/// * TX: every frame that reaches the tap is at most [`MAX_TX_FRAME`] bytes and at least a
///   header; frames and bytes match the counters; each is the readable bytes of a chain
///   the walk says is well-formed, in order; every chain is returned with a used length 0.
/// * RX: no used length exceeds the chain's writable bytes; the used lengths add up to the
///   delivered frames' sizes.
/// * control: used lengths are 0 or 1 and within the chain's writable bytes; VQ_PAIRS_SET is
///   applied only for a chain whose readable bytes are that 4-byte command.
pub fn chains(data: &[u8]) -> Option<StatsSnapshot> {
    let [flags, size, rest @ ..] = data else {
        return None;
    };
    let queue = match flags & 3 {
        1 => Queue::Rx,
        2 => Queue::Ctrl,
        _ => Queue::Tx,
    };
    let event_idx = flags & 4 != 0;
    let mrg_rxbuf = flags & 8 != 0;
    let hdr_len = if flags & 16 != 0 {
        LEGACY_VNET_HDR_LEN
    } else {
        VNET_HDR_LEN
    };
    let (frame_lens, image) = if queue == Queue::Rx {
        let (&n, rest) = rest.split_first()?;
        let n = usize::from(n) % (MAX_FRAMES + 1);
        if rest.len() < 2 * n {
            return None;
        }
        let (lens, image) = rest.split_at(2 * n);
        let lens: Vec<usize> = lens
            .chunks_exact(2)
            .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
            .collect();
        (lens, image)
    } else {
        (Vec::new(), rest)
    };
    let ring = FuzzRing::new(image, u16::from(*size), event_idx)?;
    let (dev, tap) = fake_tap()?;
    let before = ring.snapshot();
    // Receive or ack buffers over the ring itself: the device's writes and the guest's data
    // mix, so only "no panic" is checked.
    let unchecked = queue != Queue::Tx && ring.self_modifying(&before);
    let stats = Stats::default();
    match queue {
        Queue::Tx => {
            let mem = ring.mem.memory();
            let mut scratch = TxScratch::default();
            tx::process(
                &mut ring.vring.get_mut(),
                &mem,
                dev.as_raw_fd(),
                event_idx,
                hdr_len,
                &stats,
                &mut scratch,
            );
            check_tx(
                &ring,
                &before,
                &read_frames(tap.as_raw_fd()),
                hdr_len,
                &stats,
            );
        }
        Queue::Rx => {
            let mut sent = Vec::new();
            for (i, &len) in frame_lens.iter().enumerate() {
                let frame: Vec<u8> = (0..len)
                    .map(|j| {
                        image
                            .get((i * 131 + j) % image.len().max(1))
                            .map_or(j as u8, |b| *b)
                    })
                    .collect();
                if write_frame(tap.as_raw_fd(), &frame) {
                    sent.push(len);
                }
            }
            let mut rx = RxState::default();
            let neg = Negotiated {
                mrg_rxbuf,
                event_idx,
                hdr_len,
            };
            // Twice: the second run starts from the frame the first may have left pending.
            for _ in 0..2 {
                let mem = ring.mem.memory();
                rx.process(
                    &mut ring.vring.get_mut(),
                    &mem,
                    dev.as_raw_fd(),
                    neg,
                    &stats,
                );
            }
            if !unchecked {
                check_rx(&ring, &before, hdr_len, &stats, sent.len());
            }
        }
        Queue::Ctrl => {
            let mut applied = Vec::new();
            let mem = ring.mem.memory();
            ctrl::process(&mut ring.vring.get_mut(), &mem, event_idx, &stats, |n| {
                applied.push(n);
                n % 2 == 1
            });
            if !unchecked {
                check_ctrl(&ring, &before, &applied);
            }
        }
    }
    Some(stats.snapshot())
}

/// Seed inputs for the target (written to `fuzz/corpus/net_chains` by the ignored test
/// `write_seeds`): well-formed TX, RX and control chains, and a few broken ones.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with = |head: &[u8], img: &RingImage| {
        let mut v = head.to_vec();
        v.extend_from_slice(&img.bytes());
        v
    };
    let mut tx = RingImage::new(8);
    tx.chain(&[(0x800, 12, false), (0x900, 60, false)])
        .chain(&[(0xa00, 112, false)])
        .chain(&[(0xb00, 5, false)])
        .chain(&[(0xc00, 12, false), (0xd00, 64, true)])
        .fill(0x900, b"a frame from the guest");
    let mut rx = RingImage::new(8);
    for i in 0..4u64 {
        rx.chain(&[(0x800 + i * 0x200, 0x200, true)]);
    }
    let mut rx1 = RingImage::new(4);
    rx1.chain(&[(0x800, 12, true), (0x900, 0x700, true)])
        .chain(&[(0x1800, 8, true)])
        .chain(&[(0x1000, 0x800, true)]);
    let mut ctrl = RingImage::new(4);
    ctrl.chain(&[(0x800, 2, false), (0x810, 2, false), (0x900, 1, true)])
        .chain(&[(0xa00, 4, false), (0xb00, 1, true)])
        .chain(&[(0xc00, 4, false)])
        .fill(
            0x800,
            &[
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
            ],
        )
        .fill(0x810, &3u16.to_le_bytes())
        .fill(
            0xa00,
            &[
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
                2,
                0,
            ],
        );
    vec![
        ("tx", with(&[0, 8], &tx)),
        ("tx-legacy-event-idx", with(&[4 | 16, 8], &tx)),
        // MRG_RXBUF: a 100-byte and a 1500-byte frame over 512-byte buffers.
        ("rx-mrg", with(&[1 | 8, 8, 2, 100, 0, 0xdc, 0x05], &rx)),
        // One chain per frame; the second chain is shorter than a header; the third frame
        // (4 KiB) finds no buffers and waits.
        ("rx", with(&[1, 4, 3, 60, 0, 0xdc, 0x05, 0, 0x10], &rx1)),
        ("ctrl", with(&[2, 4], &ctrl)),
    ]
}

fn check_tx(ring: &FuzzRing, before: &[u8], frames: &[Vec<u8>], hdr_len: usize, stats: &Stats) {
    let s: StatsSnapshot = stats.snapshot();
    let mut bytes = 0u64;
    for f in frames {
        assert!(
            f.len() <= MAX_TX_FRAME,
            "a {}-byte frame reached the tap (max {MAX_TX_FRAME})",
            f.len()
        );
        assert!(
            f.len() >= hdr_len,
            "a {}-byte frame reached the tap",
            f.len()
        );
        bytes += (f.len() - hdr_len) as u64;
    }
    assert_eq!(
        frames.len() as u64,
        s.tx_packets,
        "frames on the tap vs tx_packets"
    );
    assert_eq!(bytes, s.tx_bytes, "bytes on the tap vs tx_bytes");
    let used = ring.used_since(0);
    let (used_at, used_len) = (hype_daemon::fuzzing::USED, ring.used_ring_len());
    let mut expected = Vec::new();
    let mut exact = s.tx_errors == 0;
    for &(id, len) in &used {
        assert_eq!(len, 0, "TX chain {id} returned with a used length");
        let w = walk(before, ring.size, id as u16);
        // The device writes the used ring as it goes: a chain that reads it is not checked.
        if w.segs
            .iter()
            .any(|g| overlaps(g.addr, u64::from(g.len), used_at, used_len))
            || w.descs.iter().any(|&d| overlaps(d, 16, used_at, used_len))
        {
            exact = false;
            continue;
        }
        let well_formed = w.segs.iter().all(|g| !g.writable);
        match readable_bytes(&w, before) {
            Some(b) if well_formed && b.len() >= hdr_len && b.len() <= MAX_TX_FRAME => {
                expected.push(b)
            }
            _ => {}
        }
    }
    if exact {
        assert_eq!(
            frames.len(),
            expected.len(),
            "frames sent vs well-formed chains"
        );
        for (i, (got, want)) in frames.iter().zip(&expected).enumerate() {
            assert!(got == want, "frame {i} is not its chain's readable bytes");
        }
    }
}

fn check_rx(ring: &FuzzRing, before: &[u8], hdr_len: usize, stats: &Stats, sent: usize) {
    let s = stats.snapshot();
    let after = ring.snapshot();
    let used = ring.used_since(0);
    let mut total = 0u64;
    for &(id, len) in &used {
        assert!(id < u32::from(ring.size), "used id {id} outside the ring");
        total += u64::from(len);
        let w = walk(before, ring.size, id as u16);
        if w.unchanged(before, &after) {
            assert!(
                u64::from(len) <= w.bytes(true),
                "RX chain {id}: used length {len}, {} writable bytes",
                w.bytes(true)
            );
        }
    }
    assert_eq!(
        total,
        s.rx_bytes + s.rx_packets * hdr_len as u64,
        "used lengths vs delivered frames"
    );
    assert!(
        s.rx_packets + s.rx_dropped <= sent as u64,
        "more frames delivered or dropped than the tap held"
    );
}

fn check_ctrl(ring: &FuzzRing, before: &[u8], applied: &[u16]) {
    let after = ring.snapshot();
    let used = ring.used_since(0);
    let mut commands = 0usize;
    for &(id, len) in &used {
        assert!(len <= 1, "control chain {id}: used length {len}");
        let w = walk(before, ring.size, id as u16);
        if !w.unchanged(before, &after) {
            commands = usize::MAX;
            continue;
        }
        assert!(
            u64::from(len) <= w.bytes(true),
            "control chain {id}: used length {len}, {} writable bytes",
            w.bytes(true)
        );
        let mq = [
            VIRTIO_NET_CTRL_MQ as u8,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
        ];
        if len == 1 && readable_bytes(&w, before).is_some_and(|b| b.len() == 4 && b[..2] == mq) {
            commands = commands.saturating_add(1);
        }
    }
    assert!(
        applied.len() <= commands,
        "{} VQ_PAIRS_SET applied, {commands} such commands",
        applied.len()
    );
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
        let tx = chains(&seed("tx")).unwrap_or_default();
        assert_eq!(
            (tx.tx_packets, tx.tx_bytes, tx.tx_malformed),
            (2, 60 + 100, 2)
        );
        let tx = chains(&seed("tx-legacy-event-idx")).unwrap_or_default();
        assert_eq!((tx.tx_packets, tx.tx_malformed), (2, 2));
        let rx = chains(&seed("rx-mrg")).unwrap_or_default();
        assert_eq!(rx.rx_packets, 2);
        assert_eq!(rx.rx_bytes, 100 + 1500 - 2 * VNET_HDR_LEN as u64);
        let rx = chains(&seed("rx")).unwrap_or_default();
        // 60 bytes in the first chain, 1500 in the third (the second is returned as
        // malformed); the third frame waits for buffers.
        assert_eq!((rx.rx_packets, rx.rx_malformed), (2, 1));
        let ctrl = chains(&seed("ctrl")).unwrap_or_default();
        // VQ_PAIRS_SET 3 accepted, 2 refused, the chain without an ack buffer dropped.
        assert_eq!(ctrl.ctrl_errors, 2);
    }

    #[test]
    #[ignore = "writes fuzz/corpus/net_chains"]
    fn write_seeds() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/net_chains");
        std::fs::create_dir_all(dir).expect("corpus directory");
        for (name, bytes) in seeds() {
            std::fs::write(format!("{dir}/{name}"), bytes).expect("seed written");
        }
    }

    #[test]
    fn garbage_rings_are_handled_without_panicking() {
        let pattern: Vec<u8> = (0..MEM_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        for flags in 0..32u8 {
            let mut input = vec![flags, 16, 3, 0, 1, 0x40, 0, 0xff, 0xff];
            input.extend_from_slice(&pattern);
            chains(&input);
            chains(&[flags, 64]);
            let mut ones = vec![flags, 64, 8];
            ones.extend(std::iter::repeat_n(0xff, MEM_SIZE + 16));
            chains(&ones);
        }
    }
}
