//! The `VhostUserBackend` implementation: worker threads for the virtqueues (one per queue,
//! or fewer, each serving several), requests executed inline on the queue's thread, on the
//! large-request threads, or handed to the I/O pool.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hype_daemon::backend_defaults;
use hype_daemon::guest_error;
use hype_daemon::vring::{signal_used, AdaptivePoll, Drain, Drained, Handled};
use log::warn;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::chain::DescTable;
use crate::config::DeviceSpec;
use crate::io_pool::{InFlight, IoPool};
use crate::iobuf::IoBuf;
use crate::ordered::Ordered;
use crate::request::{self, Completion, Request};
use crate::storage::Storage;

/// Guest memory as the vhost-user daemon shares it with the backend.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

type Vring = VringRwLock<GuestMemory>;

/// Reads and writes of at least this many bytes go to the large-request threads (when there
/// is no I/O pool): below it, a request costs less than handing it to another thread.
const LARGE_REQUEST: u64 = 128 << 10;

/// How long stopping a ring waits for its in-flight requests before giving up.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Per-queue state.
struct QueueCtx {
    /// Bounce buffer for inline execution (only that queue's worker locks it).
    buf: Mutex<IoBuf>,
    /// Requests handed to the pool and not yet completed.
    inflight: Arc<InFlight>,
    /// Chains taken while requests run on other threads, published in ring order (I/O pool
    /// and large-request modes, unless the pool was told to complete out of order).
    order: Arc<Mutex<Ordered>>,
    /// Polling of the ring after busy rounds (off with a pool, see [`BlockDevice::poll`]).
    ///
    /// [`BlockDevice::poll`]: crate::BlockDevice::poll
    poll: AdaptivePoll,
}

/// A vhost-user-blk backend for one frontend connection, over a shared [`Storage`].
///
/// Built by [`BlockDevice`](crate::BlockDevice) for every connection; use it directly only to
/// embed the device in your own daemon loop.
pub struct BlockBackend<S: Storage> {
    /// The device as it is now (its capacity follows a storage that grows, see
    /// [`Storage::current_size`]); requests take the current one.
    spec: Mutex<Arc<DeviceSpec>>,
    storage: Arc<S>,
    mem: GuestMemory,
    event_idx: Arc<AtomicBool>,
    acked_features: AtomicU64,
    queues: Vec<QueueCtx>,
    pool: Option<IoPool>,
    /// Without `pool`: the threads that run large reads and writes, so that several of them
    /// copy data at once while small requests stay on the queue thread.
    large: Option<IoPool>,
    /// Completions are put in the used ring in the order the chains were taken, so a new
    /// process after a crash re-executes exactly the requests after the used index (see
    /// [`Ordered`]). False only with a pool told to complete out of order.
    ordered: bool,
    /// Worker threads serving the virtqueues: thread `t` serves queues `t`, `t + n`,
    /// `t + 2n`, ... (`n` this count).
    queue_threads: usize,
    /// The DEVICE_STATE transfer under way (SET_DEVICE_STATE_FD started it on its own thread,
    /// CHECK_DEVICE_STATE waits for it and reports its outcome).
    transfer: Mutex<Option<JoinHandle<io::Result<()>>>>,
}

/// How a backend runs its requests: the threads and the polling budget (from [`DeviceArgs`]).
///
/// [`DeviceArgs`]: crate::DeviceArgs
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Execution {
    /// Threads of the shared I/O pool; 0: requests run on the queue threads.
    pub io_threads: usize,
    /// Threads for large reads and writes (without a pool); `None`: the default for `cpus`
    /// ([`default_large_io_threads`]).
    pub large_io_threads: Option<usize>,
    /// With a pool: complete requests as they finish instead of in ring order.
    pub out_of_order: bool,
    /// Longest polling window after a busy round.
    pub poll: Duration,
    /// Threads serving the virtqueues; 0: one per queue.
    pub queue_threads: usize,
    /// The CPUs the process may run on (read before it is confined).
    pub cpus: usize,
}

/// CPUs this process may run on (its affinity mask and CPU quota), at least 1. Reads
/// /proc and /sys: call it before the process is confined.
pub(crate) fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How many threads serve `queues` virtqueues when `asked` for (0: one per queue): never more
/// than the queues, never none.
pub(crate) fn queue_thread_count(asked: usize, queues: usize) -> usize {
    let n = if asked == 0 { queues } else { asked };
    n.clamp(1, queues.max(1))
}

/// Large-request threads when none were asked for, for a process that may use `cpus` CPUs:
/// [`DEFAULT_LARGE_IO_THREADS`](crate::args::DEFAULT_LARGE_IO_THREADS), but only on the CPUs
/// beyond two (the queue's thread and the driver's side use those): on one or two CPUs,
/// large requests run on the queue's thread, returned to the guest as each finishes, which
/// measured as fast or faster at less CPU than handing them over (docs/benchmarks.md).
pub(crate) fn default_large_io_threads(cpus: usize) -> usize {
    cpus.saturating_sub(2)
        .min(crate::args::DEFAULT_LARGE_IO_THREADS)
}

impl<S: Storage> BlockBackend<S> {
    pub(crate) fn new(
        spec: Arc<DeviceSpec>,
        storage: Arc<S>,
        mem: GuestMemory,
        exec: Execution,
    ) -> io::Result<Self> {
        let pool = match exec.io_threads {
            0 => None,
            n => Some(IoPool::new(n, "blk")?),
        };
        let large_threads = exec
            .large_io_threads
            .unwrap_or_else(|| default_large_io_threads(exec.cpus));
        let large = match (exec.io_threads, large_threads) {
            (0, n) if n > 0 => Some(IoPool::new(n, "blk-large")?),
            _ => None,
        };
        let ordered = large.is_some() || (pool.is_some() && !exec.out_of_order);
        let poll = if pool.is_some() {
            Duration::ZERO
        } else {
            exec.poll
        };
        let queue_threads = queue_thread_count(exec.queue_threads, usize::from(spec.num_queues));
        let queues = (0..spec.num_queues)
            .map(|_| QueueCtx {
                buf: Mutex::new(IoBuf::new()),
                inflight: Arc::new(InFlight::default()),
                order: Arc::new(Mutex::new(Ordered::default())),
                poll: AdaptivePoll::new(poll),
            })
            .collect();
        Ok(BlockBackend {
            spec: Mutex::new(spec),
            storage,
            mem,
            event_idx: Arc::new(AtomicBool::new(false)),
            acked_features: AtomicU64::new(0),
            queues,
            pool,
            large,
            ordered,
            queue_threads,
            transfer: Mutex::new(None),
        })
    }

    /// Drains one virtqueue: pops every available chain, answers it (inline, or through the
    /// pool), and signals the guest as EVENT_IDX allows.
    /// The device as it is now.
    fn spec(&self) -> Arc<DeviceSpec> {
        self.spec.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The device with the capacity the storage has now (unchanged when the storage's size is
    /// fixed or unreadable, or would leave no block).
    fn refresh_capacity(&self) -> Arc<DeviceSpec> {
        let mut spec = self.spec.lock().unwrap_or_else(|p| p.into_inner());
        let Some(size) = self.storage.current_size() else {
            return spec.clone();
        };
        let block = u64::from(spec.block_size);
        let sectors = size / block * block / crate::storage::SECTOR_SIZE;
        if sectors != 0 && sectors != spec.capacity_sectors {
            log::info!(
                "capacity now {} bytes (was {})",
                sectors * crate::storage::SECTOR_SIZE,
                spec.capacity_sectors * crate::storage::SECTOR_SIZE
            );
            let mut new = (**spec).clone();
            new.capacity_sectors = sectors;
            *spec = Arc::new(new);
        }
        spec.clone()
    }

    /// Drains `vring` (queue context `ctx`). With `yield_to` (this thread serves other rings
    /// too), polling ends with [`Drained::Yielded`] as soon as it says another ring needs the
    /// thread.
    fn process_queue(
        &self,
        vring: &Vring,
        ctx: &QueueCtx,
        yield_to: Option<&dyn Fn() -> bool>,
    ) -> Drained {
        let spec = self.spec();
        let mem = self.mem.memory();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let mut st = vring.get_mut();
        // Only this queue's worker takes this lock, so it is never contended.
        let mut buf = ctx.buf.lock().unwrap_or_else(|p| p.into_inner());
        let table = DescTable {
            addr: GuestAddress(st.get_queue().desc_table()),
            size: st.get_queue().size(),
        };
        // Polling holds the ring's lock, which the large-request threads need to complete.
        let large_in_flight = || ctx.inflight.count() > 0;
        let mut drain = Drain::new("blk", event_idx).poll_until(&ctx.poll, &large_in_flight);
        if let Some(other) = yield_to {
            drain = drain.yield_to(other);
        }
        drain.run(&mut st, &mem, |chain| {
            let head = chain.head_index();
            let req = match request::parse(head, table, &mem, &spec) {
                Ok(req) => req,
                Err(reason) => {
                    guest_error(format_args!("dropping chain {head}: {reason}"));
                    if head >= table.size {
                        return Handled::Elsewhere; // not a descriptor: nothing to return
                    }
                    return self.finished_inline(ctx, head, 0);
                }
            };
            if let request::Op::Fail(e) = &req.op {
                guest_error(format_args!("request {head}: {e}"));
            }
            if let Some(pool) = &self.pool {
                // Counted under the ring lock, so a concurrent GET_VRING_BASE that stops the
                // ring also sees this request and waits for it.
                let seq = self.ordered.then(|| lock(&ctx.order).push_pending(head));
                ctx.inflight.start();
                let job = self.job(req, vring.clone(), mem.clone().into_inner(), ctx, seq);
                pool.submit(job);
                return Handled::Elsewhere;
            }
            if let Some(large) = self
                .large
                .as_ref()
                .filter(|_| req.op.data_len() >= LARGE_REQUEST)
            {
                let seq = lock(&ctx.order).push_pending(head);
                ctx.inflight.start();
                let job = self.job(req, vring.clone(), mem.clone().into_inner(), ctx, Some(seq));
                large.submit(job);
                return Handled::Elsewhere;
            }
            let c = request::execute(&req.op, &*self.storage, &mem, &spec, &mut buf);
            write_status(&mem, &req, c);
            match self.finished_inline(ctx, head, c.used_len()) {
                // A large transfer took long: the guest gets it back at once, not after the
                // rest of the round.
                Handled::Used(len) if req.op.data_len() >= LARGE_REQUEST => Handled::UsedNow(len),
                h => h,
            }
        })
    }

    /// Serves the rings of a worker thread with several queues, starting with `first` (the
    /// one kicked), until none needs it: round robin over the rings with requests and those
    /// owed a drain (one that yielded to another ring has kicks off and gets no kick), so a
    /// busy queue cannot starve the others and the thread sleeps only with every ring
    /// re-armed. A ring the guest broke (or that is not running) is left to its next kick.
    fn serve_thread(&self, thread_id: usize, vrings: &[Vring], first: usize) {
        let n = vrings.len().min(64);
        let mem = self.mem.memory();
        let mut owed: u64 = 1 << first;
        let mut skip: u64 = 0; // stuck or stopped in this call
        let wants = |i: usize, owed: u64, skip: u64| {
            owed & (1 << i) != 0
                || (skip & (1 << i) == 0
                    && hype_daemon::vring::has_requests(&vrings[i].get_ref(), &*mem))
        };
        let mut at = first;
        loop {
            let Some(i) = (0..n).map(|k| (at + k) % n).find(|&i| wants(i, owed, skip)) else {
                return;
            };
            owed &= !(1 << i);
            let Some(ctx) = self.queues.get(thread_id + i * self.queue_threads) else {
                skip |= 1 << i;
                continue;
            };
            let (owed_now, skip_now) = (owed, skip);
            let other = || (0..n).any(|k| k != i && wants(k, owed_now, skip_now));
            match self.process_queue(&vrings[i], ctx, Some(&other)) {
                Drained::Yielded => owed |= 1 << i,
                Drained::Empty => {}
                Drained::Kept | Drained::NotRunning | Drained::Stuck => skip |= 1 << i,
            }
            at = i + 1;
        }
    }

    /// A chain finished on the queue thread: used now, or after the requests taken before it
    /// that run on other threads.
    fn finished_inline(&self, ctx: &QueueCtx, head: u16, len: u32) -> Handled {
        if !self.ordered {
            return Handled::Used(len);
        }
        let mut order = lock(&ctx.order);
        if order.is_empty() {
            return Handled::Used(len);
        }
        order.push_finished(head, len);
        Handled::Elsewhere
    }

    /// Wraps a request for a pool thread: execute, write status, return the chain (at once,
    /// or with `seq` in ring order, with the chains finished after it), signal.
    fn job(
        &self,
        req: Request,
        vring: Vring,
        mem: Arc<GuestMemoryMmap>,
        ctx: &QueueCtx,
        seq: Option<u64>,
    ) -> crate::io_pool::Job {
        let storage = self.storage.clone();
        let spec = self.spec();
        let event_idx = self.event_idx.clone();
        let inflight = ctx.inflight.clone();
        let order = ctx.order.clone();
        Box::new(move |buf: &mut IoBuf| {
            let c = request::execute(&req.op, &*storage, &mem, &spec, buf);
            write_status(&mem, &req, c);
            {
                let mut st = vring.get_mut();
                let ready = match seq {
                    None => vec![(req.head, c.used_len())],
                    Some(seq) => {
                        let mut order = lock(&order);
                        if !order.finish(seq, c.used_len()) {
                            warn!("chain {} finished after its ring was reset", req.head);
                        }
                        order.take_ready()
                    }
                };
                for (head, len) in &ready {
                    if let Err(e) = st.add_used(*head, *len) {
                        guest_error(format_args!("cannot return chain {head}: {e}"));
                    }
                }
                if !ready.is_empty() {
                    signal_used(&mut st, event_idx.load(Ordering::Acquire));
                }
            }
            inflight.finish();
        })
    }
}

/// The queues each of `threads` worker threads serves, as bit masks: thread `t` takes queues
/// `t`, `t + threads`, `t + 2 * threads`, ... (`threads` is at least 1 and at most `queues`).
pub(crate) fn queue_masks(queues: usize, threads: usize) -> Vec<u64> {
    let threads = threads.clamp(1, queues.max(1));
    (0..threads)
        .map(|t| {
            (t..queues.min(64))
                .step_by(threads)
                .fold(0u64, |m, q| m | 1u64 << q)
        })
        .collect()
}

/// Locks `m`, also after a panic elsewhere (the data stays consistent: every update is one
/// push or pop).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_status(mem: &GuestMemoryMmap, req: &Request, c: Completion) {
    if let Err(e) = mem.write_obj(c.status, req.status_addr) {
        guest_error(format_args!(
            "cannot write status of chain {}: {e}",
            req.head
        ));
    }
}

impl<S: Storage> VhostUserBackend for BlockBackend<S> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.spec().num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.spec().queue_size)
    }

    fn features(&self) -> u64 {
        self.spec().features()
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        if self.storage.has_state() {
            backend_defaults::PROTOCOL_FEATURES | VhostUserProtocolFeatures::DEVICE_STATE
        } else {
            backend_defaults::PROTOCOL_FEATURES
        }
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        if !self.storage.has_state() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this disk keeps no state outside its file",
            ));
        }
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "state is transferred only with the rings stopped",
            ));
        }
        let mut slot = lock(&self.transfer);
        if slot.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "a state transfer is already under way",
            ));
        }
        let storage = Arc::clone(&self.storage);
        let save = direction == VhostTransferStateDirection::SAVE;
        // The transfer must not block the vhost-user handler (the frontend reads or writes
        // the pipe only after this answer), so it runs on a thread of its own.
        let handle = std::thread::Builder::new()
            .name("blk-state".into())
            .spawn(move || {
                let mut file = file;
                if save {
                    let mut out = io::BufWriter::with_capacity(1 << 20, &mut file);
                    storage.save_state(&mut out)?;
                    io::Write::flush(&mut out)
                } else {
                    let mut input = io::BufReader::with_capacity(1 << 20, &mut file);
                    storage.load_state(&mut input)
                }
            })?;
        *slot = Some(handle);
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        let Some(handle) = lock(&self.transfer).take() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no state transfer to check",
            ));
        };
        match handle.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                warn!("device state transfer failed: {e}");
                Err(e)
            }
            Err(_) => Err(io::Error::other("the state transfer thread panicked")),
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.refresh_capacity().read_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        Err(backend_defaults::config_write_refused(offset, buf.len()))
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        // The daemon has installed it in the GuestMemoryAtomic we were built with: check it
        // before any ring touches it.
        hype_daemon::accept_guest_memory(&mem)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        queue_masks(usize::from(self.spec().num_queues), self.queue_threads)
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        backend_defaults::exit_event()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(ctx) = self.queues.get(queue_index as usize) {
            let left = ctx.inflight.wait_idle(STOP_TIMEOUT);
            if left > 0 {
                warn!("queue {queue_index} stopped with {left} requests still in flight");
            }
            // Normally empty once idle; what is left belongs to the ring being stopped.
            let stale = lock(&ctx.order).clear();
            if stale > 0 {
                warn!("queue {queue_index} stopped with {stale} chains never returned");
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Thread t serves queues t, t + n, t + 2n, ...; the event is the index among them.
        let local = usize::from(device_event);
        let queue = thread_id + local * self.queue_threads;
        let (Some(vring), Some(ctx)) = (vrings.get(local), self.queues.get(queue)) else {
            warn!("unexpected event {device_event} on thread {thread_id}");
            return Ok(());
        };
        if vrings.len() == 1 {
            self.process_queue(vring, ctx, None);
        } else {
            self.serve_thread(thread_id, vrings, local);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_dealt_round_robin_to_the_threads() {
        assert_eq!(queue_masks(4, 4), [0b0001, 0b0010, 0b0100, 0b1000]);
        assert_eq!(queue_masks(4, 2), [0b0101, 0b1010]);
        assert_eq!(queue_masks(4, 1), [0b1111]);
        assert_eq!(queue_masks(5, 2), [0b10101, 0b01010]);
        // Never more threads than queues, never none.
        assert_eq!(queue_masks(2, 8), [0b01, 0b10]);
        assert_eq!(queue_masks(3, 0), [0b111]);
        let all = queue_masks(64, 3);
        assert_eq!(all.iter().fold(0, |m, t| m | t), u64::MAX);
        assert_eq!(all.iter().map(|t| t.count_ones()).sum::<u32>(), 64);
    }

    #[test]
    fn queue_threads_are_one_per_queue_unless_asked() {
        assert_eq!(queue_thread_count(0, 4), 4);
        assert_eq!(queue_thread_count(1, 4), 1);
        assert_eq!(queue_thread_count(3, 4), 3);
        // Within 1..=queues.
        assert_eq!(queue_thread_count(9, 4), 4);
        assert_eq!(queue_thread_count(0, 0), 1);
    }

    #[test]
    fn large_request_threads_only_on_cpus_beyond_two() {
        assert_eq!(default_large_io_threads(0), 0);
        assert_eq!(default_large_io_threads(1), 0);
        assert_eq!(default_large_io_threads(2), 0);
        assert_eq!(default_large_io_threads(3), 1);
        assert_eq!(default_large_io_threads(4), 2);
        assert_eq!(default_large_io_threads(64), 2);
    }
}
