//! Log lines that someone else can trigger over and over (a guest, a frontend, a backend) are
//! rate-limited by count: the first few are logged, then only the ones whose running number is
//! a power of two. A flood of a million events costs about 30 lines, each saying how many
//! events there were so far, so nothing is hidden and nothing grows without bound.

use std::sync::atomic::{AtomicU64, Ordering};

/// Whether the `count`-th event (counting from 1) of one kind gets a log line when the first
/// `first` are all logged.
pub const fn should_log(count: u64, first: u64) -> bool {
    count <= first || count.is_power_of_two()
}

/// A counter of one kind of event, shared by threads.
#[derive(Debug, Default)]
pub struct LogCounter {
    count: AtomicU64,
    first: u64,
}

impl LogCounter {
    /// A counter that logs the first `first` events, then powers of two.
    pub const fn new(first: u64) -> Self {
        LogCounter {
            count: AtomicU64::new(0),
            first,
        }
    }

    /// Counts one event; returns its running number (from 1) when it should be logged.
    pub fn hit(&self) -> Option<u64> {
        let n = self.count.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        should_log(n, self.first).then_some(n)
    }

    /// Events counted so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_million_events_cost_a_few_dozen_lines() {
        let c = LogCounter::new(10);
        let logged: Vec<u64> = (0..1_000_000).filter_map(|_| c.hit()).collect();
        assert_eq!(c.count(), 1_000_000);
        assert_eq!(&logged[..10], &(1..=10).collect::<Vec<_>>()[..]);
        assert_eq!(
            &logged[10..],
            &[
                16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072,
                262144, 524288
            ]
        );
    }
}
