//! Rate-limited logging of problems a guest causes (bad descriptors, unreadable rings, ...).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// How many guest errors are logged before only every [`GUEST_ERROR_EVERY`]th one is.
const GUEST_ERROR_BURST: u64 = 20;
/// After the first [`GUEST_ERROR_BURST`] lines, one guest error in this many is logged.
const GUEST_ERROR_EVERY: u64 = 1000;

/// Logs a problem caused by the guest, rate-limited so a hostile guest cannot flood the log:
/// the first 20 are logged, then one in 1000, each with its running number.
///
/// Call it as `guest_error(format_args!("chain {head}: {e}"))`.
pub fn guest_error(args: fmt::Arguments<'_>) {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    if should_log(n) {
        log::warn!("guest error (#{}): {args}", n + 1);
    }
}

/// Whether the guest error numbered `n` (from 0) gets a log line.
fn should_log(n: u64) -> bool {
    n < GUEST_ERROR_BURST || n % GUEST_ERROR_EVERY == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_a_burst_then_one_in_a_thousand() {
        let logged: Vec<u64> = (0..3001).filter(|&n| should_log(n)).collect();
        let mut want: Vec<u64> = (0..20).collect();
        want.extend([1000, 2000, 3000]);
        assert_eq!(logged, want);
    }
}
