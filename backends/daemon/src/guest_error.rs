//! Rate-limited logging of problems a guest causes (bad descriptors, unreadable rings, ...).

use std::fmt;

use hype_base::log_limit::LogCounter;

/// How many guest errors are logged before only those numbered by a power of two are.
const GUEST_ERROR_BURST: u64 = 20;

/// Logs a problem caused by the guest, rate-limited so a hostile guest cannot flood the log:
/// the first 20 are logged, then those whose running number is a power of two, each with its
/// running number ([`hype_base::log_limit`]).
///
/// Call it as `guest_error(format_args!("chain {head}: {e}"))`.
pub fn guest_error(args: fmt::Arguments<'_>) {
    static COUNT: LogCounter = LogCounter::new(GUEST_ERROR_BURST);
    if let Some(n) = COUNT.hit() {
        log::warn!("guest error (#{n}): {args}");
    }
}
