//! Bounded retries with exponential back-off for transient HTTP failures.

use std::time::Duration;

/// How often and how patiently a failed request is retried.
///
/// Attempt `n` (counting retries from 0) waits `first_delay * 2^n`, capped at `max_delay`,
/// before it is sent. After `retries` retries the request fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 = fail on the first transient error).
    pub retries: u32,
    /// Wait before the first retry.
    pub first_delay: Duration,
    /// Longest wait between two attempts.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0-based).
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.first_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }
}

impl Default for RetryPolicy {
    /// 5 retries, 100 ms doubling up to 5 s (about 3 s of waiting in all).
    fn default() -> Self {
        RetryPolicy {
            retries: 5,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_and_are_capped() {
        let p = RetryPolicy {
            retries: 40,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let d: Vec<u128> = (0..6).map(|i| p.delay(i).as_millis()).collect();
        assert_eq!(d, [100, 200, 400, 800, 1000, 1000]);
        // Huge retry numbers neither overflow nor exceed the cap.
        assert_eq!(p.delay(31), Duration::from_secs(1));
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn zero_first_delay_stays_zero() {
        let p = RetryPolicy {
            retries: 3,
            first_delay: Duration::ZERO,
            max_delay: Duration::from_secs(1),
        };
        assert_eq!(p.delay(5), Duration::ZERO);
    }
}
