//! Entry points for the fuzz targets in `fuzz/` (hidden from the docs; no stability promise).
//!
//! [`drain`] runs the shared vring drain loop ([`crate::vring::Drain`]) over a split
//! virtqueue whose descriptor table, avail ring (indices included) and used ring all come
//! from the fuzzer, and checks what a guest relies on. A panic here is a bug found.

use std::ops::Deref;

use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::vring::{Drain, Drained, Handled};

/// Guest memory of the fuzzed ring: the table, rings and buffers all fit in it (and in the
/// fuzzer's 8 KiB inputs).
const MEM_SIZE: usize = 0x2000;
/// Largest ring: its table (1 KiB) ends where the avail ring starts.
const MAX_SIZE: u16 = 64;
/// Where the avail ring starts (the table is at 0).
const AVAIL: u64 = 0x400;
/// Where the used ring starts.
const USED: u64 = 0x500;

/// Drains a ring of `size` entries (rounded to a power of two, 1..=64) filled from `data`:
/// the first half of memory from the input, then as many rounds as `rounds` says, each
/// answering chains by the next input byte (used with a length, elsewhere, or kept). Checks:
/// the loop always ends, the used index moves by at most the chains it reported used, and
/// it pops a bounded number of chains per round.
pub fn drain(data: &[u8], size: u16, event_idx: bool, rounds: u8) {
    let size = size.clamp(1, MAX_SIZE).next_power_of_two();
    let Ok(mmap) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let n = data.len().min(MEM_SIZE);
    // The used index is the device's: it starts at 0 like the queue's own count.
    if mmap.write_slice(&data[..n], GuestAddress(0)).is_err()
        || mmap.write_obj(0u16, GuestAddress(USED + 2)).is_err()
    {
        return;
    }
    let mem = GuestMemoryAtomic::new(mmap);
    let Ok(vring) = VringRwLock::new(mem.clone(), size) else {
        return;
    };
    vring.set_queue_size(size);
    if vring.set_queue_info(0, AVAIL, USED).is_err() {
        return;
    }
    vring.set_queue_event_idx(event_idx);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
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
