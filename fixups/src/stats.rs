//! Per-fix-up counters shared by all vCPU threads, and the rate limit for debug logging.

use std::sync::atomic::{AtomicU64, Ordering};

use super::Fixup;

/// Every debug event is logged for the first this-many hits of a fix-up; after that only at
/// powers of two, so a hot fix-up (clac: thousands per boot) costs a few dozen lines in all.
const LOG_FIRST: u64 = 8;

/// Hit counters, one per [`Fixup`], plus failures left unhandled.
#[derive(Debug, Default)]
pub struct Stats {
    hits: [AtomicU64; Fixup::ALL.len()],
    unhandled: AtomicU64,
}

impl Stats {
    /// Counts one hit of `fixup`; returns the new count.
    pub fn hit(&self, fixup: Fixup) -> u64 {
        self.hits[fixup.index()].fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts one failure left unhandled; returns the new count.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Hits of `fixup` so far.
    pub fn hits(&self, fixup: Fixup) -> u64 {
        self.hits[fixup.index()].load(Ordering::Relaxed)
    }

    /// Unhandled failures so far.
    pub fn unhandled_count(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }

    /// One line: every fix-up with its count, then the unhandled count.
    pub fn summary(&self) -> String {
        let mut out = String::from("emulation fix-ups:");
        for fixup in Fixup::ALL {
            out.push_str(&format!(" {}={}", fixup, self.hits(fixup)));
        }
        out.push_str(&format!(" unhandled={}", self.unhandled_count()));
        out
    }
}

/// Whether the `count`-th event of one kind is logged: the shared rule of every guest-triggered
/// log line ([`hype_base::log_limit`]).
pub fn should_log(count: u64) -> bool {
    hype_base::log_limit::should_log(count, LOG_FIRST)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_fixup_across_threads() {
        let stats = Stats::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        stats.hit(Fixup::Clac);
                    }
                    stats.hit(Fixup::Int3);
                    stats.unhandled();
                });
            }
        });
        assert_eq!(stats.hits(Fixup::Clac), 4000);
        assert_eq!(stats.hits(Fixup::Int3), 4);
        assert_eq!(stats.hits(Fixup::Stac), 0);
        assert_eq!(stats.unhandled_count(), 4);
        assert_eq!(
            stats.summary(),
            "emulation fix-ups: clac=4000 stac=0 syscall=0 popcnt=0 fwait=0 int3=4 cmpxchg16b=0 \
             ldmxcsr=0 stmxcsr=0 fxsave=0 fxrstor=0 unhandled=4"
        );
    }

    #[test]
    fn logging_is_rate_limited() {
        let logged: Vec<u64> = (1..=3780).filter(|&n| should_log(n)).collect();
        assert_eq!(
            logged,
            [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
        );
    }
}
