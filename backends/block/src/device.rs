//! [`BlockDevice`]: the builder a backend's `main` uses to serve a [`Storage`].

use std::sync::Arc;
use std::time::Duration;

use hype_daemon::sandbox::Sandbox;
use hype_daemon::{ListenArgs, Shutdown, SocketListener};
use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

use crate::backend::{BlockBackend, Execution, GuestMemory};
use crate::chain::MAX_CHAIN_DESCRIPTORS;
use crate::config::DeviceSpec;
use crate::storage::{Storage, SECTOR_SIZE};
use crate::{DeviceArgs, Error};

/// A virtio-blk device over a [`Storage`], served over vhost-user.
///
/// ```no_run
/// # use hype_block::{BlockDevice, Storage, StorageInfo};
/// # struct Store;
/// # impl Storage for Store {
/// #   fn info(&self) -> StorageInfo { StorageInfo::new(1 << 20) }
/// #   fn read_at(&self, _: u64, b: &mut [u8]) -> std::io::Result<()> { b.fill(0); Ok(()) }
/// #   fn write_at(&self, _: u64, _: &[u8]) -> std::io::Result<()> { Ok(()) }
/// #   fn flush(&self) -> std::io::Result<()> { Ok(()) }
/// # }
/// hype_daemon::init_logging();
/// BlockDevice::new(Store)
///     .num_queues(4)
///     .serial("disk0")
///     .serve(&hype_daemon::ListenArgs::path("/run/hype/disk0.sock"))?;
/// # Ok::<(), hype_block::Error>(())
/// ```
pub struct BlockDevice<S: Storage> {
    storage: Arc<S>,
    num_queues: u16,
    queue_size: u16,
    io_threads: usize,
    serial: Option<String>,
    read_only: bool,
    name: String,
    sandbox: Option<Sandbox>,
    poll: Duration,
    /// `None`: the default for the CPUs the process may use
    /// (`backend::default_large_io_threads`).
    large_io_threads: Option<usize>,
    out_of_order: bool,
    queue_threads: usize,
    /// CPUs the process may use, read in [`serve`](Self::serve) before confinement.
    cpus: Option<usize>,
}

impl<S: Storage> BlockDevice<S> {
    /// A device with one queue of up to 256 entries, requests run on the queue thread.
    pub fn new(storage: S) -> Self {
        Self::from_arc(Arc::new(storage))
    }

    /// Like [`new`](Self::new), for a storage you keep a handle to.
    pub fn from_arc(storage: Arc<S>) -> Self {
        BlockDevice {
            storage,
            num_queues: 1,
            queue_size: 256,
            io_threads: 0,
            serial: None,
            read_only: false,
            name: "hype-block".into(),
            sandbox: None,
            poll: Duration::from_micros(u64::from(crate::args::DEFAULT_POLL_US)),
            large_io_threads: None,
            out_of_order: false,
            queue_threads: 0,
            cpus: None,
        }
    }

    /// Number of virtqueues (1..=64); how many worker threads serve them is
    /// [`queue_threads`](Self::queue_threads)'s choice.
    pub fn num_queues(mut self, n: u16) -> Self {
        self.num_queues = n;
        self
    }

    /// Largest queue size the frontend may choose (power of two, 2..=32768).
    pub fn queue_size(mut self, n: u16) -> Self {
        self.queue_size = n;
        self
    }

    /// Size of the I/O thread pool shared by all queues. 0 (the default) runs each request on
    /// its queue's worker thread, which is fastest for stores that answer in microseconds
    /// (memory, local files). A store with millisecond latencies (network) wants a pool: up to
    /// `n` requests are then in flight at once and no queue waits for another; their
    /// completions are put in the used ring in the order the guest made the requests
    /// available (a request that finished early waits for older ones), unless
    /// [`out_of_order`](Self::out_of_order) says otherwise. `--io-threads` ([`DeviceArgs::io_threads`]) overrides it in
    /// [`with_args`](Self::with_args) and [`run`](Self::run) when given, so a backend sets its
    /// default here before applying the command line.
    pub fn io_threads(mut self, n: usize) -> Self {
        self.io_threads = n;
        self
    }

    /// Longest adaptive polling window of each queue after a busy round
    /// ([`hype_daemon::vring::AdaptivePoll`]); `Duration::ZERO` turns polling off. Polling
    /// applies only when requests run on the queue's thread (no I/O pool): with a pool, the
    /// pool's threads complete requests and must not wait for a polling queue thread.
    pub fn poll(mut self, max: Duration) -> Self {
        self.poll = max;
        self
    }

    /// Threads for reads and writes of 128 KiB and more when there is no I/O pool (see
    /// [`io_threads`](Self::io_threads)): several large transfers then copy at once while
    /// small requests stay on their queue's thread. 0 runs everything on the queue's thread.
    /// Without this, 2, but only on the CPUs beyond two that the process may use (none on one
    /// or two CPUs): there, large requests run on the queue's thread and each is returned to
    /// the guest as soon as it is done, which measured as fast or faster, at less CPU, than
    /// handing them to other threads (docs/benchmarks.md).
    pub fn large_io_threads(mut self, n: usize) -> Self {
        self.large_io_threads = Some(n);
        self
    }

    /// Worker threads that serve the virtqueues: thread `t` of `n` serves queues `t`, `t + n`,
    /// `t + 2n`, ... 0 (the default) gives each queue its own thread. A thread with several
    /// queues serves them in turn: it polls one until another has requests, then moves on
    /// with the first one's kicks still off, so a busy queue cannot starve the others and no
    /// kick is needed between them. With requests run inline on slow storage, a request that
    /// blocks holds up the other queues of its thread (an I/O pool,
    /// [`io_threads`](Self::io_threads), avoids that). Measured on two CPUs
    /// (docs/benchmarks.md): as fast as a thread per queue on separate cores, a lower median
    /// but a longer tail when the driver shares the backend's core.
    pub fn queue_threads(mut self, n: usize) -> Self {
        self.queue_threads = n;
        self
    }

    /// With an I/O pool, returns each request to the guest as soon as it finished instead of
    /// in ring order: a fast request no longer waits behind a slow one, but if the process
    /// dies, the next one (which resumes at the used index, as the vhost-user backend crate
    /// keeps no inflight area) may execute and complete again a request that had completed
    /// after an older, unfinished one. Off by default; `--out-of-order`.
    pub fn out_of_order(mut self, on: bool) -> Self {
        self.out_of_order = on;
        self
    }

    /// Serial number for GET_ID, overriding [`StorageInfo::serial`](crate::StorageInfo).
    pub fn serial(mut self, serial: impl Into<String>) -> Self {
        self.serial = Some(serial.into());
        self
    }

    /// Presents the disk read-only even if the storage is writable.
    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    /// Confines the process with `sandbox` in [`serve`](Self::serve), once the socket is bound
    /// (the storage's files are open by then): see [`hype_daemon::sandbox`]. Without it, or
    /// with [`serve_on`](Self::serve_on), the process is not confined.
    pub fn sandbox(mut self, sandbox: Sandbox) -> Self {
        self.sandbox = Some(sandbox);
        self
    }

    /// Name used for threads and logs.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Applies the shared command-line options (queues, queue size, I/O threads, serial).
    /// Without `--io-threads` the device keeps its own I/O thread count: call
    /// [`io_threads`](Self::io_threads) before this to give a backend its own default.
    pub fn with_args(mut self, args: &DeviceArgs) -> Self {
        self.num_queues = args.num_queues;
        self.queue_size = args.queue_size;
        if let Some(n) = args.io_threads {
            self.io_threads = n;
        }
        if let Some(s) = &args.serial {
            self.serial = Some(s.clone());
        }
        self.poll = Duration::from_micros(u64::from(args.poll_us));
        if let Some(n) = args.large_io_threads {
            self.large_io_threads = Some(n);
        }
        self.out_of_order = args.out_of_order;
        self.queue_threads = args.queue_threads;
        self
    }

    /// Applies `args` and serves on `args.listen` until SIGINT/SIGTERM.
    pub fn run(self, args: &DeviceArgs) -> Result<(), Error> {
        self.with_args(args).serve(&args.listen)
    }

    /// Listens as `listen` says (or on the socket systemd passed), installs SIGINT/SIGTERM
    /// handlers, confines the process if given a [`sandbox`](Self::sandbox), and serves
    /// frontends, one at a time, until a signal arrives. The socket file, if this process
    /// created it, is removed on return.
    pub fn serve(mut self, listen: &ListenArgs) -> Result<(), Error> {
        // Validate before touching the file system.
        let spec = Arc::new(self.spec()?);
        // Handlers before the socket: once the socket exists a supervisor may stop us, and a
        // SIGTERM then must end the process cleanly (exit 0, socket removed), not kill it.
        let shutdown = Shutdown::new()?;
        shutdown.install_signal_handlers()?;
        let mut listener = SocketListener::open(listen)?;
        // Read while /proc and /sys are still reachable.
        self.cpus = Some(crate::backend::usable_cpus());
        if let Some(mut sandbox) = self.sandbox.take() {
            hype_daemon::sandbox::confine(&mut sandbox, &listener)?;
        }
        self.serve_spec(spec, &mut listener, &shutdown)
    }

    /// Serves on an already open listener until `shutdown` triggers. For embedding and tests.
    pub fn serve_on(self, listener: &mut SocketListener, shutdown: &Shutdown) -> Result<(), Error> {
        let spec = Arc::new(self.spec()?);
        self.serve_spec(spec, listener, shutdown)
    }

    fn serve_spec(
        self,
        spec: Arc<DeviceSpec>,
        listener: &mut SocketListener,
        shutdown: &Shutdown,
    ) -> Result<(), Error> {
        log::info!(
            "{}: {} bytes, {}-byte blocks, {}{} queue(s), {} io thread(s)",
            self.name,
            spec.capacity_sectors * SECTOR_SIZE,
            spec.block_size,
            if spec.read_only { "read-only, " } else { "" },
            spec.num_queues,
            self.io_threads
        );
        let exec = self.execution();
        let storage = self.storage.clone();
        hype_daemon::serve(listener, &self.name, shutdown, |mem: &GuestMemory| {
            BlockBackend::new(spec.clone(), storage.clone(), mem.clone(), exec).map(Arc::new)
        })?;
        Ok(())
    }

    /// Builds the backend for one connection, for users who run their own daemon loop.
    pub fn backend(&self, mem: &GuestMemory) -> Result<Arc<BlockBackend<S>>, Error> {
        let spec = Arc::new(self.spec()?);
        BlockBackend::new(spec, self.storage.clone(), mem.clone(), self.execution())
            .map(Arc::new)
            .map_err(Error::Backend)
    }

    fn execution(&self) -> Execution {
        Execution {
            io_threads: self.io_threads,
            large_io_threads: self.large_io_threads,
            out_of_order: self.out_of_order,
            poll: self.poll,
            queue_threads: self.queue_threads,
            cpus: self.cpus.unwrap_or_else(crate::backend::usable_cpus),
        }
    }

    /// Validates the options and the storage info into the device's fixed description.
    pub(crate) fn spec(&self) -> Result<DeviceSpec, Error> {
        let info = self.storage.info();
        let logical = info.block_size;
        let physical = info.physical_block_size.max(logical);
        let valid_logical = logical.is_power_of_two() && (512..=65536).contains(&logical);
        if !valid_logical || !physical.is_power_of_two() {
            return Err(Error::InvalidBlockSize { logical, physical });
        }
        let block = u64::from(logical);
        let capacity_bytes = info.size / block * block;
        if capacity_bytes == 0 {
            return Err(Error::TooSmall {
                size: info.size,
                block_size: logical,
            });
        }
        if !(1..=64).contains(&self.num_queues) {
            return Err(Error::InvalidQueueCount(self.num_queues));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < 2 {
            return Err(Error::InvalidQueueSize(self.queue_size));
        }
        if self.io_threads > 1024 {
            return Err(Error::InvalidIoThreads(self.io_threads));
        }
        if let Some(n) = self.large_io_threads.filter(|&n| n > 1024) {
            return Err(Error::InvalidIoThreads(n));
        }
        let serial_str = self.serial.clone().or(info.serial).unwrap_or_default();
        if serial_str.len() > VIRTIO_BLK_ID_BYTES as usize
            || !serial_str
                .bytes()
                .all(|b| b.is_ascii_graphic() || b == b' ')
        {
            return Err(Error::InvalidSerial(serial_str));
        }
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        serial[..serial_str.len()].copy_from_slice(serial_str.as_bytes());
        let seg_max = (u32::from(self.queue_size) - 2).clamp(1, MAX_CHAIN_DESCRIPTORS as u32 - 2);
        Ok(DeviceSpec {
            capacity_sectors: capacity_bytes / SECTOR_SIZE,
            block_size: logical,
            physical_block_size: physical,
            optimal_io_size: info.optimal_io_size,
            read_only: info.read_only || self.read_only,
            discard: info.discard,
            write_zeroes: info.write_zeroes,
            serial,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
            seg_max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StorageInfo;
    use hype_daemon::sandbox::SandboxArgs;

    struct Zeroes;

    impl Storage for Zeroes {
        fn info(&self) -> StorageInfo {
            StorageInfo::new(1 << 20)
        }
        fn read_at(&self, _: u64, buf: &mut [u8]) -> std::io::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&self, _: u64, _: &[u8]) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A store whose size the test changes.
    struct Growing(Arc<std::sync::atomic::AtomicU64>);

    impl Storage for Growing {
        fn info(&self) -> StorageInfo {
            StorageInfo::new(self.0.load(std::sync::atomic::Ordering::SeqCst))
        }
        fn current_size(&self) -> Option<u64> {
            Some(self.0.load(std::sync::atomic::Ordering::SeqCst))
        }
        fn read_at(&self, _: u64, buf: &mut [u8]) -> std::io::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&self, _: u64, _: &[u8]) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn get_config_reports_the_size_the_storage_has_now() {
        use vhost_user_backend::VhostUserBackend;
        let size = Arc::new(std::sync::atomic::AtomicU64::new(1 << 20));
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])
                .unwrap();
        let backend = BlockDevice::new(Growing(size.clone()))
            .backend(&vm_memory::GuestMemoryAtomic::new(mem))
            .unwrap();
        let capacity =
            |b: &BlockBackend<Growing>| u64::from_le_bytes(b.get_config(0, 8).try_into().unwrap());
        assert_eq!(capacity(&backend), (1 << 20) / 512);
        size.store(3 << 20, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(capacity(&backend), (3 << 20) / 512);
        // A partial last sector is not shown; a size of zero leaves the capacity alone.
        size.store((4 << 20) + 100, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(capacity(&backend), (4 << 20) / 512);
        size.store(0, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(capacity(&backend), (4 << 20) / 512);
    }

    fn args(io_threads: Option<usize>) -> DeviceArgs {
        DeviceArgs {
            listen: ListenArgs::path("/unused.sock"),
            num_queues: 2,
            queue_size: 128,
            io_threads,
            serial: None,
            poll_us: 0,
            large_io_threads: Some(0),
            out_of_order: false,
            queue_threads: 0,
            sandbox: SandboxArgs::off(),
        }
    }

    #[test]
    fn io_threads_default_is_the_devices_unless_given() {
        assert_eq!(
            BlockDevice::new(Zeroes).with_args(&args(None)).io_threads,
            0
        );
        let dev = BlockDevice::new(Zeroes).io_threads(16);
        assert_eq!(dev.with_args(&args(None)).io_threads, 16);
        let dev = BlockDevice::new(Zeroes).io_threads(16);
        assert_eq!(dev.with_args(&args(Some(0))).io_threads, 0);
        let dev = BlockDevice::new(Zeroes).with_args(&args(Some(3)));
        assert_eq!(
            (dev.io_threads, dev.num_queues, dev.queue_size),
            (3, 2, 128)
        );
    }
}
