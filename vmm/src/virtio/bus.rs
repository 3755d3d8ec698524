//! MMIO dispatch: which virtio-mmio window a guest physical address falls in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use super::device::VhostUserDevice;
use crate::layout::VIRTIO_MMIO_SIZE;

/// Counters of MMIO exits, for tests and logs.
#[derive(Debug, Default)]
pub struct MmioExitStats {
    /// Reads handled in userspace.
    pub reads: AtomicU64,
    /// Writes handled in userspace.
    pub writes: AtomicU64,
    /// Accesses to addresses no device claims (read as zero, writes dropped).
    pub unclaimed: AtomicU64,
}

/// A snapshot of [`MmioExitStats`] plus the devices' QueueNotify exits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioExitCounts {
    /// Reads handled in userspace.
    pub reads: u64,
    /// Writes handled in userspace.
    pub writes: u64,
    /// Accesses nobody claims.
    pub unclaimed: u64,
    /// QueueNotify writes that reached userspace (0 when every ioeventfd works).
    pub notifies: u64,
}

/// The virtio-mmio devices of a VM, by window. Devices can come and go while the vCPUs run
/// (hot-plug): the list is behind a read-write lock that MMIO exits only read.
#[derive(Debug, Default)]
pub struct MmioBus {
    devices: RwLock<Vec<(u64, Arc<VhostUserDevice>)>>,
    stats: MmioExitStats,
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn list(&self) -> RwLockReadGuard<'_, Vec<(u64, Arc<VhostUserDevice>)>> {
        self.devices.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Places `dev` at `base` (a [`VIRTIO_MMIO_SIZE`] window).
    pub fn add(&self, base: u64, dev: Arc<VhostUserDevice>) {
        self.devices
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((base, dev));
    }

    /// Takes the device at `base` off the bus; its window reads as unclaimed from then on.
    pub fn remove(&self, base: u64) -> Option<Arc<VhostUserDevice>> {
        let mut list = self.devices.write().unwrap_or_else(|p| p.into_inner());
        let i = list.iter().position(|(b, _)| *b == base)?;
        Some(list.remove(i).1)
    }

    /// The devices with their window bases, in window order.
    pub fn devices(&self) -> Vec<(u64, Arc<VhostUserDevice>)> {
        let mut v = self.list().clone();
        v.sort_by_key(|(b, _)| *b);
        v
    }

    fn find(&self, addr: u64) -> Option<(Arc<VhostUserDevice>, u64)> {
        self.list().iter().find_map(|(base, d)| {
            let off = addr.checked_sub(*base)?;
            (off < VIRTIO_MMIO_SIZE).then(|| (d.clone(), off))
        })
    }

    /// Guest MMIO read.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        match self.find(addr) {
            Some((d, off)) => d.mmio_read(off, data),
            None => {
                self.stats.unclaimed.fetch_add(1, Ordering::Relaxed);
                data.fill(0);
            }
        }
    }

    /// Guest MMIO write.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        match self.find(addr) {
            Some((d, off)) => d.mmio_write(off, data),
            None => {
                self.stats.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Exit counts so far.
    pub fn counts(&self) -> MmioExitCounts {
        MmioExitCounts {
            reads: self.stats.reads.load(Ordering::Relaxed),
            writes: self.stats.writes.load(Ordering::Relaxed),
            unclaimed: self.stats.unclaimed.load(Ordering::Relaxed),
            notifies: self
                .list()
                .iter()
                .map(|(_, d)| d.stats().notify_exits.load(Ordering::Relaxed))
                .sum(),
        }
    }
}
