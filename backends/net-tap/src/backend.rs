//! The `VhostUserBackend`: one worker thread per queue pair (its RX and TX queues and its tap
//! queue), one for the control queue.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use hype_daemon::backend_defaults;
use log::{info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::config::{tap_offloads_for, NetSpec};
use crate::rx::{Negotiated, RxOutcome, RxState};
use crate::stats::Stats;
use crate::tap::Tap;
use crate::tx::TxScratch;
use crate::{ctrl, tx, LEGACY_VNET_HDR_LEN, VNET_HDR_LEN};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Guest memory as the vhost-user daemon shares it with the backend.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// A loaded view of guest memory, held while buffers are in use.
pub(crate) type Mem = GuestMemoryLoadGuard<GuestMemoryMmap>;

pub(crate) type Vring = VringRwLock<GuestMemory>;
pub(crate) type VringState = vhost_user_backend::VringState<GuestMemory>;

/// The epoll handler of one worker thread.
pub type EpollHandler = VringEpollHandler<Arc<NetBackend>>;

/// State of one queue pair, only contended when the control queue (de)activates the pair.
#[derive(Default)]
struct PairState {
    rx: RxState,
    tx: TxScratch,
    /// Whether the tap queue is registered with the worker's epoll.
    listening: bool,
}

/// A virtio-net backend for one frontend connection, over a shared [`Tap`].
pub struct NetBackend {
    spec: Arc<NetSpec>,
    tap: Arc<Tap>,
    mem: GuestMemory,
    stats: Arc<Stats>,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    /// virtio-net header length the guest and the tap use.
    hdr_len: AtomicUsize,
    /// Queue pairs the guest uses (VQ_PAIRS_SET); 1 until it says otherwise.
    active_pairs: AtomicU16,
    pairs: Vec<Mutex<PairState>>,
    handlers: OnceLock<Vec<Weak<EpollHandler>>>,
}

impl NetBackend {
    /// A backend for one connection. Only the first tap queue stays attached until the guest
    /// enables more pairs.
    pub fn new(spec: Arc<NetSpec>, tap: Arc<Tap>, mem: GuestMemory, stats: Arc<Stats>) -> Self {
        for i in 0..tap.num_queues() {
            if let Err(e) = tap.set_queue_enabled(i, i == 0) {
                warn!("tap {}: cannot (de)tach queue {i}: {e}", tap.name());
            }
        }
        let pairs = (0..spec.queue_pairs)
            .map(|_| Mutex::new(PairState::default()))
            .collect();
        NetBackend {
            spec,
            tap,
            mem,
            stats,
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            hdr_len: AtomicUsize::new(VNET_HDR_LEN),
            active_pairs: AtomicU16::new(1),
            pairs,
            handlers: OnceLock::new(),
        }
    }

    /// Gives the backend its daemon's epoll handlers (one per worker thread, in order), so it
    /// can watch the tap queues. Must be called before the daemon starts serving.
    pub fn set_epoll_handlers(&self, handlers: &[Arc<EpollHandler>]) {
        let _ = self
            .handlers
            .set(handlers.iter().map(Arc::downgrade).collect());
    }

    fn pair(&self, index: usize) -> Option<MutexGuard<'_, PairState>> {
        self.pairs
            .get(index)
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// epoll data of pair `index`'s tap queue (above the range reserved for queues and exit).
    fn tap_event(&self, index: usize) -> u64 {
        (self.spec.num_queues() + 1 + index) as u64
    }

    /// Starts or stops watching pair `index`'s tap queue (on the pair's own thread's epoll).
    fn set_listening(&self, index: usize, ps: &mut PairState, on: bool) {
        if ps.listening == on {
            return;
        }
        let Some(fd) = self.tap.queue_fd(index) else {
            return;
        };
        let Some(handler) = self
            .handlers
            .get()
            .and_then(|h| h.get(index))
            .and_then(Weak::upgrade)
        else {
            return;
        };
        let data = self.tap_event(index);
        let res = if on {
            handler.register_listener(fd, EventSet::IN, data)
        } else {
            handler.unregister_listener(fd, EventSet::IN, data)
        };
        match res {
            Ok(()) => ps.listening = on,
            Err(e) => warn!("tap queue {index}: cannot change epoll registration: {e}"),
        }
    }

    fn is_active(&self, index: usize) -> bool {
        index < usize::from(self.active_pairs.load(Ordering::Acquire))
    }

    fn mrg_rxbuf(&self) -> bool {
        self.acked_features.load(Ordering::Acquire) & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    /// Runs the RX path of pair `index` and watches the tap only while it makes sense.
    fn run_rx(&self, index: usize, ps: &mut PairState, vring: &Vring) {
        if !self.is_active(index) {
            self.set_listening(index, ps, false);
            return;
        }
        let Some(fd) = self.tap.queue_fd(index) else {
            return;
        };
        let mem = self.mem.memory();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let outcome = {
            let mut st = vring.get_mut();
            let hdr_len = self.hdr_len.load(Ordering::Acquire);
            ps.rx.process(
                &mut st,
                &mem,
                fd,
                Negotiated {
                    mrg_rxbuf: self.mrg_rxbuf(),
                    event_idx,
                    hdr_len,
                },
                &self.stats,
            )
        };
        match outcome {
            RxOutcome::TapEmpty | RxOutcome::Yield => self.set_listening(index, ps, true),
            RxOutcome::NeedBuffers | RxOutcome::NoRing => self.set_listening(index, ps, false),
        }
    }

    fn run_tx(&self, index: usize, ps: &mut PairState, vring: &Vring) {
        let Some(fd) = self.tap.queue_fd(index) else {
            return;
        };
        let mem = self.mem.memory();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let mut st = vring.get_mut();
        let hdr_len = self.hdr_len.load(Ordering::Acquire);
        tx::process(
            &mut st,
            &mem,
            fd,
            event_idx,
            hdr_len,
            &self.stats,
            &mut ps.tx,
        );
    }

    /// VQ_PAIRS_SET: attaches tap queues 0..n, detaches the rest.
    fn set_active_pairs(&self, n: u16) -> bool {
        let mq = self.acked_features.load(Ordering::Acquire) & (1 << VIRTIO_NET_F_MQ) != 0;
        if !mq || n == 0 || n > self.spec.queue_pairs {
            return false;
        }
        self.active_pairs.store(n, Ordering::Release);
        for i in 0..usize::from(self.spec.queue_pairs) {
            let Some(mut ps) = self.pair(i) else { continue };
            let on = i < usize::from(n);
            if !on {
                self.set_listening(i, &mut ps, false);
            }
            if let Err(e) = self.tap.set_queue_enabled(i, on) {
                warn!("tap {}: cannot (de)tach queue {i}: {e}", self.tap.name());
                return false;
            }
            if on {
                // Its RX ring may already hold buffers: let the tap wake the thread.
                self.set_listening(i, &mut ps, true);
            }
        }
        info!("{n} queue pair(s) active");
        true
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.spec.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.spec.queue_size)
    }

    fn features(&self) -> u64 {
        self.spec.features()
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
        let modern = features & ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF)) != 0;
        let hdr_len = if modern {
            VNET_HDR_LEN
        } else {
            LEGACY_VNET_HDR_LEN
        };
        match self.tap.set_vnet_hdr_len(hdr_len) {
            Ok(()) => self.hdr_len.store(hdr_len, Ordering::Release),
            Err(e) => warn!(
                "tap {}: cannot set the header length {hdr_len}: {e}",
                self.tap.name()
            ),
        }
        let flags = tap_offloads_for(features, self.tap.supported_offloads());
        if let Err(e) = self.tap.set_offloads(flags) {
            warn!(
                "tap {}: cannot set offloads {flags:#x}: {e}",
                self.tap.name()
            );
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        backend_defaults::PROTOCOL_FEATURES
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.spec.read_config(offset, size)
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
        let mut v: Vec<u64> = (0..self.spec.queue_pairs)
            .map(|i| 0b11u64 << (2 * i))
            .collect();
        v.push(1u64 << self.spec.ctrl_queue());
        v
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        backend_defaults::exit_event()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let pairs = usize::from(self.spec.queue_pairs);
        if thread_id == pairs {
            if let Some(vring) = vrings.first() {
                let mem = self.mem.memory();
                let event_idx = self.event_idx.load(Ordering::Acquire);
                let mut st = vring.get_mut();
                ctrl::process(&mut st, &mem, event_idx, &self.stats, |n| {
                    self.set_active_pairs(n)
                });
            }
            return Ok(());
        }
        let (Some(rx), Some(txq), Some(mut ps)) =
            (vrings.first(), vrings.get(1), self.pair(thread_id))
        else {
            warn!("unexpected event {device_event} on thread {thread_id}");
            return Ok(());
        };
        match device_event {
            // RX kick (or ring enabled): buffers arrived, the pending frame may fit now.
            0 => self.run_rx(thread_id, &mut ps, rx),
            1 => self.run_tx(thread_id, &mut ps, txq),
            d if u64::from(d) == self.tap_event(thread_id) => {
                if evset.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    warn!("tap queue {thread_id} reports an error; not watching it until the next RX kick");
                    self.set_listening(thread_id, &mut ps, false);
                } else {
                    self.run_rx(thread_id, &mut ps, rx);
                }
            }
            d => warn!("unexpected event {d} on thread {thread_id}"),
        }
        Ok(())
    }
}
