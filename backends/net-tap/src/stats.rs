//! Device counters, shared by every connection of one daemon.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Packet and error counters. All are monotonic; read them with [`Stats::snapshot`].
#[derive(Debug, Default)]
pub struct Stats {
    /// Frames the guest sent that reached the tap.
    pub tx_packets: AtomicU64,
    /// Bytes of those frames (without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// TX chains dropped as malformed (short header, device-writable or out-of-memory buffers).
    pub tx_malformed: AtomicU64,
    /// TX frames the tap refused (bad offload header, interface down, ...).
    pub tx_errors: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Bytes of those frames (without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// RX chains returned unused as malformed (too short, device-readable or out-of-memory).
    pub rx_malformed: AtomicU64,
    /// Frames read from the tap and dropped (did not fit the guest's buffers).
    pub rx_dropped: AtomicU64,
    /// Control queue commands refused or malformed.
    pub ctrl_errors: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`Stats::tx_packets`].
    pub tx_packets: u64,
    /// See [`Stats::tx_bytes`].
    pub tx_bytes: u64,
    /// See [`Stats::tx_malformed`].
    pub tx_malformed: u64,
    /// See [`Stats::tx_errors`].
    pub tx_errors: u64,
    /// See [`Stats::rx_packets`].
    pub rx_packets: u64,
    /// See [`Stats::rx_bytes`].
    pub rx_bytes: u64,
    /// See [`Stats::rx_malformed`].
    pub rx_malformed: u64,
    /// See [`Stats::rx_dropped`].
    pub rx_dropped: u64,
    /// See [`Stats::ctrl_errors`].
    pub ctrl_errors: u64,
}

impl Stats {
    /// Adds `n` to a counter.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            tx_packets: r(&self.tx_packets),
            tx_bytes: r(&self.tx_bytes),
            tx_malformed: r(&self.tx_malformed),
            tx_errors: r(&self.tx_errors),
            rx_packets: r(&self.rx_packets),
            rx_bytes: r(&self.rx_bytes),
            rx_malformed: r(&self.rx_malformed),
            rx_dropped: r(&self.rx_dropped),
            ctrl_errors: r(&self.ctrl_errors),
        }
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tx_packets={} tx_bytes={} tx_malformed={} tx_errors={} rx_packets={} rx_bytes={} \
             rx_malformed={} rx_dropped={} ctrl_errors={}",
            self.tx_packets,
            self.tx_bytes,
            self.tx_malformed,
            self.tx_errors,
            self.rx_packets,
            self.rx_bytes,
            self.rx_malformed,
            self.rx_dropped,
            self.ctrl_errors
        )
    }
}
