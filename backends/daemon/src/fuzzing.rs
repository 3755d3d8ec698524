//! Entry points for the fuzz targets in `fuzz/` (hidden from the docs; no stability promise).
//!
//! [`drain`] runs the shared vring drain loop ([`crate::vring::Drain`]) over a split
//! virtqueue whose descriptor table, avail ring (indices included) and used ring all come
//! from the fuzzer, and checks what a guest relies on. A panic here is a bug found.
//!
//! [`FuzzRing`], [`walk`] and [`FuzzRing::used_since`] are shared with the backends' own
//! targets (net-tap, console): a ring in fuzzer-filled guest memory, an independent walk of a
//! chain on a copy of that memory, and the used entries the device wrote.

use std::ops::Deref;

use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::vring::{Drain, Drained, Handled};

/// Guest memory of the fuzzed ring: the table, rings and buffers all fit in it (and in the
/// fuzzer's 8 KiB inputs).
pub const MEM_SIZE: usize = 0x2000;
/// Largest ring: its table (1 KiB) ends where the avail ring starts.
pub const MAX_SIZE: u16 = 64;
/// Where the avail ring starts (the table is at 0).
pub const AVAIL: u64 = 0x400;
/// Where the used ring starts.
pub const USED: u64 = 0x500;

/// Guest memory as a vhost-user backend gets it.
pub type FuzzMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// A split virtqueue in [`MEM_SIZE`] bytes of guest memory filled from the fuzzer's input:
/// descriptor table at 0, avail ring at [`AVAIL`], used ring at [`USED`] (its index zeroed,
/// like the device's own count), ready and enabled.
pub struct FuzzRing {
    /// The guest memory.
    pub mem: FuzzMemory,
    /// The ring over it, as the daemon hands it to a backend.
    pub vring: VringRwLock<FuzzMemory>,
    /// Ring size (a power of two, 1 to [`MAX_SIZE`]).
    pub size: u16,
}

impl FuzzRing {
    /// A ring of `size` entries (clamped to 1..=[`MAX_SIZE`], rounded up to a power of two)
    /// in memory that starts with `image`; `None` if memory cannot be mapped.
    pub fn new(image: &[u8], size: u16, event_idx: bool) -> Option<FuzzRing> {
        let size = size.clamp(1, MAX_SIZE).next_power_of_two();
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
        let n = image.len().min(MEM_SIZE);
        mmap.write_slice(&image[..n], GuestAddress(0)).ok()?;
        // The used index is the device's: it starts at 0 like the queue's own count.
        mmap.write_obj(0u16, GuestAddress(USED + 2)).ok()?;
        let mem = GuestMemoryAtomic::new(mmap);
        let vring = VringRwLock::new(mem.clone(), size).ok()?;
        vring.set_queue_size(size);
        vring.set_queue_info(0, AVAIL, USED).ok()?;
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Some(FuzzRing { mem, vring, size })
    }

    /// A copy of the whole guest memory now.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; MEM_SIZE];
        // The memory is exactly MEM_SIZE bytes at 0: this cannot fail.
        let _ = self.mem.memory().read_slice(&mut v, GuestAddress(0));
        v
    }

    /// The used index the device has written.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .memory()
            .read_obj(GuestAddress(USED + 2))
            .unwrap_or_default()
    }

    /// The used entries (`id`, `len`) the device wrote after its used index was `from`.
    pub fn used_since(&self, from: u16) -> Vec<(u32, u32)> {
        let mem = self.mem.memory();
        let to = self.used_idx();
        let mut out = Vec::new();
        let mut i = from;
        while i != to {
            let at = USED + 4 + 8 * u64::from(i % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap_or_default();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap_or_default();
            out.push((id, len));
            i = i.wrapping_add(1);
        }
        out
    }

    /// Bytes of the used ring (flags, index, entries, avail event).
    pub fn used_ring_len(&self) -> u64 {
        6 + 8 * u64::from(self.size)
    }

    /// Whether the guest set the device up to overwrite its own ring: a device-writable
    /// buffer of an available chain (walked on `snapshot`, memory before the device ran)
    /// overlaps the used ring, the avail ring or a descriptor. The device then scribbles over
    /// what a target reads back (used entries, later chains), so the target can only check
    /// that nothing panics.
    pub fn self_modifying(&self, snapshot: &[u8]) -> bool {
        let rd = |at: u64| {
            let i = at as usize;
            snapshot
                .get(i..i + 2)
                .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
        };
        let avail_idx = rd(AVAIL + 2);
        if avail_idx > self.size {
            return false; // the queue refuses the ring: nothing is popped
        }
        let chains: Vec<Walked> = (0..avail_idx)
            .map(|i| walk(snapshot, self.size, rd(AVAIL + 4 + 2 * u64::from(i))))
            .collect();
        let mut guarded = vec![
            (USED, self.used_ring_len()),
            (AVAIL, 6 + 2 * u64::from(self.size)),
        ];
        guarded.extend(chains.iter().flat_map(|w| w.descs.iter().map(|&d| (d, 16))));
        // Sorted, merged (start, end) intervals: one lookup per buffer.
        guarded.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (a, l) in guarded {
            let end = a.saturating_add(l);
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((a, end)),
            }
        }
        chains.iter().flat_map(|w| &w.segs).any(|s| {
            let (a, end) = (s.addr, s.addr.saturating_add(u64::from(s.len)));
            // The last interval starting before the buffer ends is the only one that can
            // overlap it.
            let i = merged.partition_point(|&(start, _)| start < end);
            s.writable && s.len > 0 && i > 0 && merged[i - 1].1 > a
        })
    }
}

/// One buffer of a chain as [`walk`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A chain as [`walk`] found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Walked {
    /// Its buffers, in order.
    pub segs: Vec<Seg>,
    /// The guest address of every descriptor read (16 bytes each), to tell whether the
    /// device overwrote one later.
    pub descs: Vec<u64>,
}

impl Walked {
    /// Total length of the device-writable (`true`) or readable buffers.
    pub fn bytes(&self, writable: bool) -> u64 {
        self.segs
            .iter()
            .filter(|s| s.writable == writable)
            .map(|s| u64::from(s.len))
            .sum()
    }

    /// Whether the descriptors it read still hold in `mem` what they held in `before`.
    pub fn unchanged(&self, before: &[u8], mem: &[u8]) -> bool {
        self.descs.iter().all(|&a| {
            let r = a as usize..a as usize + 16;
            before.get(r.clone()) == mem.get(r)
        })
    }
}

/// The chain at `head` of the descriptor table at 0 of a ring of `size` entries, walked on
/// `mem` (a [`FuzzRing::snapshot`]) by the rules of virtio-queue 0.18's iterator, written
/// again here so a target can check a backend against it: at most `size` descriptors (an
/// indirect table: its own length), one level of indirection, a table length that is a
/// multiple of 16, at most 4 GiB in all.
pub fn walk(mem: &[u8], size: u16, head: u16) -> Walked {
    let read_desc = |addr: u64| -> Option<(u64, u32, u16, u16)> {
        let start = usize::try_from(addr).ok()?;
        let d: &[u8; 16] = mem.get(start..start.checked_add(16)?)?.try_into().ok()?;
        let (a, rest) = d.split_first_chunk::<8>()?;
        let (l, rest) = rest.split_first_chunk::<4>()?;
        let (f, n) = rest.split_first_chunk::<2>()?;
        let n: [u8; 2] = n.try_into().ok()?;
        Some((
            u64::from_le_bytes(*a),
            u32::from_le_bytes(*l),
            u16::from_le_bytes(*f),
            u16::from_le_bytes(n),
        ))
    };
    let mut w = Walked::default();
    let mut table = 0u64;
    let mut table_size = size;
    let mut next = head;
    let mut ttl = size;
    let mut indirect = false;
    let mut bytes = 0u32;
    while ttl > 0 && next < table_size {
        let Some(at) = table.checked_add(u64::from(next) * 16) else {
            break;
        };
        let Some((addr, len, flags, nxt)) = read_desc(at) else {
            break;
        };
        w.descs.push(at);
        if flags & 4 != 0 {
            if indirect || len % 16 != 0 || len / 16 > u32::from(u16::MAX) {
                break;
            }
            table = addr;
            table_size = (len / 16) as u16;
            next = 0;
            ttl = table_size;
            indirect = true;
            continue;
        }
        let Some(b) = bytes.checked_add(len) else {
            break;
        };
        bytes = b;
        w.segs.push(Seg {
            addr,
            len,
            writable: flags & 2 != 0,
        });
        if flags & 1 != 0 {
            next = nxt;
            ttl -= 1;
        } else {
            ttl = 0;
        }
    }
    w
}

/// Builds well-formed guest memory images for [`FuzzRing::new`]: seed inputs for the targets
/// and their unit tests (descriptor table at 0, avail ring at [`AVAIL`]).
#[derive(Clone)]
pub struct RingImage {
    mem: Vec<u8>,
    size: u16,
    next_desc: u16,
    avail: u16,
}

impl RingImage {
    /// An empty ring of `size` entries (a power of two, at most [`MAX_SIZE`]).
    pub fn new(size: u16) -> RingImage {
        RingImage {
            mem: vec![0; MEM_SIZE],
            size: size.clamp(1, MAX_SIZE),
            next_desc: 0,
            avail: 0,
        }
    }

    /// Writes `bytes` at guest address `addr` (cut at the end of memory).
    pub fn fill(&mut self, addr: u64, bytes: &[u8]) -> &mut Self {
        let start = (addr as usize).min(MEM_SIZE);
        let n = bytes.len().min(MEM_SIZE - start);
        self.mem[start..start + n].copy_from_slice(&bytes[..n]);
        self
    }

    /// Makes a chain of the buffers `(addr, len, device-writable)` from the next free
    /// descriptors and makes it available.
    pub fn chain(&mut self, bufs: &[(u64, u32, bool)]) -> &mut Self {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc += 1;
            let last = i + 1 == bufs.len();
            let flags = u16::from(!last) | if writable { 2 } else { 0 };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&(idx + 1).to_le_bytes());
            self.fill(u64::from(idx) * 16, &d);
        }
        let slot = AVAIL + 4 + 2 * u64::from(self.avail % self.size);
        self.fill(slot, &head.to_le_bytes());
        self.avail += 1;
        let idx = self.avail;
        self.fill(AVAIL + 2, &idx.to_le_bytes())
    }

    /// The memory image, without its trailing zeroes (the rest of memory is zero anyway).
    pub fn bytes(&self) -> Vec<u8> {
        let end = self.mem.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        self.mem[..end].to_vec()
    }
}

/// Whether guest range `(a, alen)` overlaps `(b, blen)`.
pub fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// Drains a ring of `size` entries (rounded to a power of two, 1..=64) filled from `data`:
/// the first half of memory from the input, then as many rounds as `rounds` says, each
/// answering chains by the next input byte (used with a length, elsewhere, or kept). Checks:
/// the loop always ends, the used index moves by at most the chains it reported used, and
/// it pops a bounded number of chains per round.
pub fn drain(data: &[u8], size: u16, event_idx: bool, rounds: u8) {
    let Some(FuzzRing { mem, vring, size }) = FuzzRing::new(data, size, event_idx) else {
        return;
    };
    let mut answers = data.iter().rev().copied().cycle();
    for _ in 0..rounds.max(1) {
        let guard = mem.memory();
        let before: u16 = guard.read_obj(GuestAddress(USED + 2)).unwrap_or_default();
        let mut used = 0u32;
        let mut popped = 0u32;
        let end = {
            let mut st = vring.get_mut();
            Drain::new("fuzz", event_idx)
                .signal_every(4)
                .run(&mut st, &guard, |chain| {
                    popped += 1;
                    // A well-formed chain must be walkable; a broken one just ends early.
                    let _ = chain.clone().count();
                    match answers.next().unwrap_or(0) % 4 {
                        0 | 1 => {
                            used += 1;
                            Handled::Used(u32::from(answers.next().unwrap_or(0)))
                        }
                        2 => Handled::Elsewhere,
                        _ => Handled::Keep,
                    }
                })
        };
        let after: u16 = guard
            .deref()
            .read_obj(GuestAddress(USED + 2))
            .unwrap_or_default();
        let moved = u32::from(after.wrapping_sub(before));
        assert!(
            moved <= used,
            "used index moved by {moved}, {used} chains used"
        );
        if end == Drained::NotRunning {
            assert_eq!(popped, 0);
        }
        // A drain pops each available chain at most once per pass; a guest cannot make it
        // pop more than the ring holds before it notices a broken index.
        assert!(
            popped <= 3 * u32::from(size) + 3,
            "{popped} chains popped from a ring of {size}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueOwnedT;

    /// Every chain virtio-queue pops from `image`, next to what [`walk`] finds at its head.
    fn compare_with_virtio_queue(image: &[u8], size: u16) -> usize {
        let ring = FuzzRing::new(image, size, false).expect("ring");
        let snap = ring.snapshot();
        let mem = ring.mem.memory();
        let mut st = ring.vring.get_mut();
        let mut chains = 0;
        for chain in st.get_queue_mut().iter(mem.clone()).expect("iter").take(64) {
            let head = chain.head_index();
            let theirs: Vec<Seg> = chain
                .map(|d| Seg {
                    addr: d.addr().0,
                    len: d.len(),
                    writable: d.is_write_only(),
                })
                .collect();
            assert_eq!(walk(&snap, ring.size, head).segs, theirs, "chain {head}");
            chains += 1;
        }
        chains
    }

    #[test]
    fn self_modifying_rings_are_told_apart() {
        let ring = |img: &RingImage| {
            let r = FuzzRing::new(&img.bytes(), 8, false).expect("ring");
            let snap = r.snapshot();
            r.self_modifying(&snap)
        };
        let mut clean = RingImage::new(8);
        clean
            .chain(&[(0x800, 16, false), (0x900, 64, true)])
            .chain(&[(0x1800, 0x100, true)]);
        assert!(!ring(&clean));
        for (addr, len) in [
            (USED + 6, 1),
            (AVAIL + 2, 2),
            (0x10, 4),
            (USED - 0x10, 0x11),
        ] {
            let mut bad = clean.clone();
            bad.chain(&[(0x1000, 8, false), (addr, len, true)]);
            assert!(ring(&bad), "{addr:#x}+{len}");
            // The same buffer device-readable is no harm.
            let mut ro = clean.clone();
            ro.chain(&[(0x1000, 8, false), (addr, len, false)]);
            assert!(!ring(&ro), "{addr:#x}+{len} readable");
        }
    }

    #[test]
    fn walk_agrees_with_virtio_queue() {
        let mut img = RingImage::new(8);
        img.chain(&[(0x800, 12, false), (0x900, 60, true)])
            .chain(&[(0xa00, 1, true)]);
        let mut image = img.bytes();
        assert_eq!(compare_with_virtio_queue(&image, 8), 2);
        // An indirect table of three descriptors at 0x1000 behind descriptor 3.
        image.resize(MEM_SIZE, 0);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&0x1000u64.to_le_bytes());
        d[8..12].copy_from_slice(&48u32.to_le_bytes());
        d[12..14].copy_from_slice(&4u16.to_le_bytes());
        image[48..64].copy_from_slice(&d);
        for i in 0..3u16 {
            let at = 0x1000 + usize::from(i) * 16;
            image[at..at + 8].copy_from_slice(&(0x1800 + u64::from(i) * 0x10).to_le_bytes());
            image[at + 8..at + 12].copy_from_slice(&8u32.to_le_bytes());
            let flags: u16 = if i < 2 { 1 } else { 2 };
            image[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
            image[at + 14..at + 16].copy_from_slice(&(i + 1).to_le_bytes());
        }
        image[0x400 + 2..0x400 + 4].copy_from_slice(&3u16.to_le_bytes());
        image[0x400 + 8..0x400 + 10].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(compare_with_virtio_queue(&image, 8), 3);
        assert_eq!(walk(&image, 8, 3).bytes(true), 8);
        assert_eq!(walk(&image, 8, 3).bytes(false), 16);
        // Garbage: loops, heads and next indices out of range, nested indirect tables.
        for seed in 1..40usize {
            let pattern: Vec<u8> = (0..MEM_SIZE)
                .map(|i| {
                    ((i * seed * 7 + i / 16 * 3) % 251) as u8
                        & if i % 16 >= 8 { 0x07 } else { 0x1f }
                })
                .collect();
            let mut pattern = pattern;
            pattern[0x402..0x404].copy_from_slice(&16u16.to_le_bytes());
            for i in 0..16 {
                let head = ((i * seed) % 16) as u16;
                pattern[0x404 + 2 * i..0x406 + 2 * i].copy_from_slice(&head.to_le_bytes());
            }
            for d in 0..16 {
                // next: mostly in range, sometimes not.
                pattern[d * 16 + 15] = u8::from(d % 5 == 0);
            }
            compare_with_virtio_queue(&pattern, 16);
        }
    }

    #[test]
    fn garbage_rings_are_drained_without_panicking() {
        // An empty input, an all-ones memory (avail index 0xffff, every head out of range),
        // and a pattern: none may panic, hang, or break the invariants.
        drain(&[], 16, false, 3);
        drain(&vec![0xff; MEM_SIZE], 64, true, 4);
        let pattern: Vec<u8> = (0..MEM_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        drain(&pattern, 8, false, 5);
        drain(&pattern, 1, true, 2);
    }
}
