//! Closed-loop load generation on one queue (for benchmarks): keep `depth` virtio-blk requests
//! in flight, refill as completions arrive, and record per-request latency.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::blk::{add_request, BlkRequest, BlkResponse, BlkStatus};
use crate::error::{Error, Result};
use crate::virtqueue::Virtqueue;

/// When a closed loop stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAfter {
    /// After this many completed requests.
    Requests(u64),
    /// After this much time (requests in flight at the end are drained and counted).
    Time(Duration),
}

/// What a closed loop did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoopReport {
    /// Requests completed.
    pub requests: u64,
    /// Requests completed with a non-OK status.
    pub errors: u64,
    /// Data bytes moved (device-readable payload plus device-writable data, headers excluded).
    pub bytes: u64,
    /// Wall time from first submission to last completion.
    pub elapsed: Duration,
    /// Per-request latency in nanoseconds (submission to collection), sorted ascending.
    pub latencies_ns: Vec<u64>,
}

impl LoopReport {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.requests as f64 / s
        } else {
            0.0
        }
    }

    /// Data bytes per second.
    pub fn bytes_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s
        } else {
            0.0
        }
    }

    /// Latency percentile `p` in 0..=100 (nearest rank), or `None` without samples.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.latencies_ns.is_empty() {
            return None;
        }
        let p = p.clamp(0.0, 100.0);
        let rank = ((p / 100.0) * self.latencies_ns.len() as f64).ceil() as usize;
        let i = rank.saturating_sub(1).min(self.latencies_ns.len() - 1);
        Some(Duration::from_nanos(self.latencies_ns[i]))
    }
}

/// Runs a closed loop on `q`: request number `n` is `next(n)`; at most `depth` in flight
/// (fewer if descriptors run out); each wait is bounded by `timeout`.
pub fn closed_loop(
    q: &mut Virtqueue,
    depth: usize,
    stop: StopAfter,
    timeout: Duration,
    mut next: impl FnMut(u64) -> BlkRequest,
) -> Result<LoopReport> {
    let depth = depth.max(1);
    let mut report = LoopReport::default();
    let mut in_flight: HashMap<u16, (Instant, u64)> = HashMap::with_capacity(depth);
    let mut issued: u64 = 0;
    // A request built but not yet accepted by the queue (descriptors or memory ran out).
    let mut carry: Option<BlkRequest> = None;
    let start = Instant::now();
    let may_issue = |issued: u64, now: Instant| match stop {
        StopAfter::Requests(n) => issued < n,
        StopAfter::Time(d) => now.duration_since(start) < d,
    };
    loop {
        let now = Instant::now();
        let mut added = false;
        while in_flight.len() < depth && may_issue(issued, now) {
            let req = match carry.take() {
                Some(r) => r,
                None => next(issued),
            };
            if q.free_descriptors() < req.segments().len() && !in_flight.is_empty() {
                carry = Some(req);
                break;
            }
            let bytes = u64::from(req.in_len()) + req.payload_len() as u64;
            let head = match add_request(q, &req) {
                Ok(h) => h,
                Err(Error::OutOfBufferMemory { .. }) if !in_flight.is_empty() => {
                    carry = Some(req);
                    break;
                }
                Err(e) => return Err(e),
            };
            in_flight.insert(head, (Instant::now(), bytes));
            issued += 1;
            added = true;
        }
        if added {
            q.notify()?;
        }
        if in_flight.is_empty() {
            break;
        }
        for c in q.wait(1, timeout)? {
            let done = Instant::now();
            let Some((t0, bytes)) = in_flight.remove(&c.head) else {
                continue;
            };
            let resp = BlkResponse::from_completion(c);
            report.requests += 1;
            report.bytes += bytes;
            if resp.status != BlkStatus::Ok {
                report.errors += 1;
            }
            report
                .latencies_ns
                .push(done.duration_since(t0).as_nanos() as u64);
        }
    }
    report.elapsed = start.elapsed();
    report.latencies_ns.sort_unstable();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let r = LoopReport {
            requests: 4,
            errors: 0,
            bytes: 4096,
            elapsed: Duration::from_secs(2),
            latencies_ns: vec![10, 20, 30, 40],
        };
        assert_eq!(r.percentile(50.0), Some(Duration::from_nanos(20)));
        assert_eq!(r.percentile(99.0), Some(Duration::from_nanos(40)));
        assert_eq!(r.percentile(0.0), Some(Duration::from_nanos(10)));
        assert_eq!(r.iops(), 2.0);
        assert_eq!(r.bytes_per_sec(), 2048.0);
        assert_eq!(LoopReport::default().percentile(50.0), None);
    }
}
