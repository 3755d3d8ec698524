//! Atomic operations on the host mapping of guest memory, for instructions the fix-ups
//! complete while other vCPUs run: the guest must see them as single locked operations.

use std::sync::atomic::{AtomicU64, Ordering};

/// Performs `lock cmpxchg16b` on the 16 bytes at `ptr`: if they equal `expected`, `new` is
/// stored. Returns the value found (equal to `expected` exactly when `new` was stored).
///
/// # Safety
/// `ptr` must be valid for reads and writes of 16 bytes, 16-byte aligned, and stay mapped for
/// the duration of the call. Concurrent access by other threads (or vCPUs) is allowed: the
/// operation is atomic.
pub unsafe fn cmpxchg16b(ptr: *mut u8, expected: u128, new: u128) -> u128 {
    let mut lo = expected as u64;
    let mut hi = (expected >> 64) as u64;
    // SAFETY: every x86_64 host this VMM runs KVM on has CX16 (absent only on the first 64-bit
    // CPUs of 2004). The caller guarantees `ptr` is mapped, writable and 16-byte aligned, so the
    // instruction cannot fault. rbx cannot be named as an operand (LLVM reserves it), so the new
    // low half is swapped into rbx around the instruction and rbx is restored after it. No stack
    // is used; flags are clobbered (the default for asm!).
    unsafe {
        core::arch::asm!(
            "xchg {new_lo}, rbx",
            "lock cmpxchg16b xmmword ptr [{ptr}]",
            "mov rbx, {new_lo}",
            ptr = in(reg) ptr,
            new_lo = inout(reg) new as u64 => _,
            in("rcx") (new >> 64) as u64,
            inout("rax") lo,
            inout("rdx") hi,
            options(nostack),
        );
    }
    (u128::from(hi) << 64) | u128::from(lo)
}

/// Atomically ORs `bits` into the u64 at `ptr` (as the CPU sets accessed/dirty bits in paging
/// entries), unless they are all set already.
///
/// # Safety
/// `ptr` must be valid for reads and writes of 8 bytes, 8-byte aligned, and stay mapped for the
/// duration of the call; other threads may access it concurrently, but only atomically.
pub unsafe fn set_bits_u64(ptr: *mut u8, bits: u64) {
    // SAFETY: the caller guarantees `ptr` is valid, aligned for u64 and only accessed
    // atomically while this reference lives.
    let word = unsafe { AtomicU64::from_ptr(ptr.cast::<u64>()) };
    if word.load(Ordering::Relaxed) & bits != bits {
        word.fetch_or(bits, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(align(16))]
    struct Aligned([u8; 32]);

    #[test]
    fn exchanges_only_on_match() {
        let mut buf = Aligned([0; 32]);
        let old = 0x1111_2222_3333_4444_5555_6666_7777_8888_u128;
        buf.0[16..].copy_from_slice(&old.to_le_bytes());
        let p = buf.0[16..].as_mut_ptr();
        let new = 0xaaaa_bbbb_cccc_dddd_eeee_ffff_0000_1111_u128;
        // SAFETY: p points at 16 aligned bytes of `buf`, which outlives the calls.
        let found = unsafe { cmpxchg16b(p, old ^ 1, new) };
        assert_eq!(found, old);
        assert_eq!(u128::from_le_bytes(buf.0[16..].try_into().unwrap()), old);
        let p = buf.0[16..].as_mut_ptr();
        // SAFETY: as above.
        let found = unsafe { cmpxchg16b(p, old, new) };
        assert_eq!(found, old);
        assert_eq!(u128::from_le_bytes(buf.0[16..].try_into().unwrap()), new);
        // The first 16 bytes were not touched.
        assert_eq!(buf.0[..16], [0; 16]);
    }

    #[test]
    fn concurrent_increments_are_not_lost() {
        let mut cell = Aligned([0; 32]);
        let addr = cell.0.as_mut_ptr() as usize;
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(move || {
                    for _ in 0..10_000 {
                        let p = addr as *mut u8;
                        let mut cur = 0u128;
                        loop {
                            // Both halves move, so a torn update would show.
                            let next = cur.wrapping_add(1 | (1 << 64));
                            // SAFETY: `cell` outlives the scope; only atomic ops touch it.
                            let found = unsafe { cmpxchg16b(p, cur, next) };
                            if found == cur {
                                break;
                            }
                            cur = found;
                        }
                    }
                });
            }
        });
        let v = u128::from_le_bytes(cell.0[..16].try_into().unwrap());
        assert_eq!(v, 40_000 | (40_000 << 64));
    }

    #[test]
    fn sets_bits() {
        let mut word = 0x1000_0003_u64;
        let p = (&mut word as *mut u64).cast::<u8>();
        // SAFETY: p points at `word`, aligned and live.
        unsafe { set_bits_u64(p, 0x60) };
        assert_eq!(word, 0x1000_0063);
    }
}
