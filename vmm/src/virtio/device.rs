//! A virtio-mmio device whose implementation is a vhost-user backend process.
//!
//! The vCPU side ([`VhostUserDevice::mmio_read`] / [`VhostUserDevice::mmio_write`]) only
//! touches the register file and posts commands; it never waits for the backend. The device's
//! own thread (the "worker") owns the vhost-user connection: it starts and stops the rings,
//! forwards config writes, watches the socket for hang-ups and reconnects, replaying the whole
//! setup when the backend is back.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::detect::DeviceType;
use super::frontend::{self, Connection, FrontendError, InflightArea, RingSetup};
use super::mmio::{self, Activation, DeviceModel, MmioTransport, TransportEvent};
use crate::memory::GuestMemoryMmap;

/// Default largest queue size offered to the guest.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Largest queue size hype accepts as an option (split rings).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// How often a lost backend is retried.
pub const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);

/// How long to wait for something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitLimit {
    /// No limit.
    Forever,
    /// At most this long.
    For(Duration),
}

impl WaitLimit {
    /// As an optional duration (`None` = forever).
    pub fn as_option(self) -> Option<Duration> {
        match self {
            WaitLimit::Forever => None,
            WaitLimit::For(d) => Some(d),
        }
    }
}

/// How one device is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Backend socket.
    pub socket: PathBuf,
    /// Device type; learned from the backend when `None`.
    pub kind: Option<DeviceType>,
    /// Queues to expose (default: what the backend has, or 1 without MQ).
    pub num_queues: Option<u16>,
    /// Largest queue size offered to the guest (default [`DEFAULT_QUEUE_SIZE`]).
    pub queue_size: Option<u16>,
    /// How long to wait for the socket at start.
    pub wait: WaitLimit,
    /// How long to keep trying to reconnect a lost backend.
    pub reconnect: WaitLimit,
}

impl DeviceOptions {
    /// Options for `socket` with every default.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        DeviceOptions {
            socket: socket.into(),
            kind: None,
            num_queues: None,
            queue_size: None,
            wait: WaitLimit::Forever,
            reconnect: WaitLimit::Forever,
        }
    }
}

/// Errors attaching a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Talking to the backend failed.
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    /// A queue option the backend cannot honour.
    #[error("backend {path}: {what}")]
    Options {
        /// Socket path.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Creating eventfds or the worker thread failed.
    #[error("{what}: {source}")]
    Os {
        /// What failed.
        what: &'static str,
        /// Underlying error.
        source: io::Error,
    },
}

/// The eventfds of one device: per queue a kick (guest to backend, a KVM ioeventfd on
/// QueueNotify) and a call (backend to guest, a KVM irqfd), plus one for config interrupts.
#[derive(Debug)]
pub struct DeviceEvents {
    /// Kick eventfds, by queue index.
    pub kicks: Vec<EventFd>,
    /// Call eventfds, by queue index.
    pub calls: Vec<EventFd>,
    /// Config-change interrupt eventfd.
    pub config: EventFd,
}

impl DeviceEvents {
    /// Fresh non-blocking eventfds for `num_queues` queues.
    pub fn new(num_queues: u16) -> io::Result<Self> {
        let mk = || EventFd::new(libc::EFD_NONBLOCK);
        Ok(DeviceEvents {
            kicks: (0..num_queues).map(|_| mk()).collect::<io::Result<_>>()?,
            calls: (0..num_queues).map(|_| mk()).collect::<io::Result<_>>()?,
            config: mk()?,
        })
    }

    fn try_clone(&self) -> io::Result<Self> {
        Ok(DeviceEvents {
            kicks: self
                .kicks
                .iter()
                .map(|e| e.try_clone())
                .collect::<io::Result<_>>()?,
            calls: self
                .calls
                .iter()
                .map(|e| e.try_clone())
                .collect::<io::Result<_>>()?,
            config: self.config.try_clone()?,
        })
    }
}

/// Counters a test or the log can read.
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// QueueNotify writes that reached the VMM (0 when the ioeventfds take them all).
    pub notify_exits: AtomicU64,
    /// Times the rings were started on a backend (activation or replay).
    pub ring_starts: AtomicU64,
    /// Reconnections that replayed the device.
    pub reconnects: AtomicU64,
    /// Whether a backend is connected now.
    pub connected: AtomicBool,
    /// Config writes forwarded to the backend (SET_CONFIG) and accepted.
    pub config_writes: AtomicU64,
    /// Config writes the backend refused or that could not be sent.
    pub config_writes_failed: AtomicU64,
}

enum Command {
    Activate(Activation),
    Reset,
    ConfigWrite { offset: u32, data: Vec<u8> },
    Shutdown,
}

struct Shared {
    name: String,
    transport: Mutex<MmioTransport>,
    config_irq: EventFd,
    stats: DeviceStats,
    /// A copy of the current connection's socket, to cut it when the device goes away while
    /// the device thread waits for a hung backend.
    link: Mutex<Option<std::os::unix::net::UnixStream>>,
    /// Set when the device goes away: a hang-up from then on is the VMM's own doing.
    stopping: AtomicBool,
}

impl Shared {
    fn transport(&self) -> MutexGuard<'_, MmioTransport> {
        self.transport.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn config_interrupt(&self) {
        // A failed write means the counter is saturated: an interrupt is pending anyway.
        let _ = self.config_irq.write(1);
    }

    fn needs_reset(&self, why: &str) {
        log::error!(
            "{}: {why}; the guest must reset the device (DEVICE_NEEDS_RESET)",
            self.name
        );
        if self.transport().set_needs_reset() {
            self.config_interrupt();
        }
    }
}

/// One vhost-user device behind a virtio-mmio window.
pub struct VhostUserDevice {
    shared: Arc<Shared>,
    events: DeviceEvents,
    commands: mpsc::Sender<Command>,
    wake: EventFd,
    worker: Option<JoinHandle<()>>,
    kind: DeviceType,
    backend: frontend::BackendInfo,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("name", &self.shared.name)
            .field("kind", &self.kind)
            .finish()
    }
}

fn os(what: &'static str) -> impl FnOnce(io::Error) -> DeviceError {
    move |source| DeviceError::Os { what, source }
}

impl VhostUserDevice {
    /// Connects to the backend (waiting for its socket as `opts.wait` says), learns what it is
    /// and starts the device thread. `events` are the eventfds to give the backend (fresh ones
    /// when `None`); wire them to KVM with [`VhostUserDevice::events`].
    pub fn attach(
        name: &str,
        opts: &DeviceOptions,
        mem: GuestMemoryMmap,
        events: Option<DeviceEvents>,
    ) -> Result<Self, DeviceError> {
        let stream = frontend::connect_waiting(&opts.socket, opts.wait.as_option(), name)?;
        let conn = Connection::handshake(&opts.socket, stream, opts.kind)?;
        let info = conn.info().clone();
        if let Some(d) = &info.doubt {
            log::warn!(
                "{name}: backend {}: {d}; using it as {}",
                opts.socket.display(),
                info.kind
            );
        }
        let opt_err = |what: String| DeviceError::Options {
            path: opts.socket.clone(),
            what,
        };
        let backend_queues = info.queue_num.unwrap_or(1);
        let num_queues = match opts.num_queues {
            Some(0) => return Err(opt_err("queues=0".into())),
            Some(n) if u64::from(n) > backend_queues => {
                return Err(opt_err(format!(
                    "queues={n} but the backend has {backend_queues}"
                )))
            }
            Some(n) => n,
            None => backend_queues.min(u64::from(frontend::MAX_QUEUES)) as u16,
        };
        if num_queues > frontend::MAX_QUEUES {
            return Err(opt_err(format!(
                "queues={num_queues}: hype supports at most {}",
                frontend::MAX_QUEUES
            )));
        }
        let queue_max = opts.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
        if queue_max == 0 || !queue_max.is_power_of_two() || queue_max > MAX_QUEUE_SIZE {
            return Err(opt_err(format!(
                "queue-size={queue_max} (a power of two up to {MAX_QUEUE_SIZE})"
            )));
        }
        let mut config = info.config.clone();
        if info.kind == DeviceType::Block && info.features & (1 << 12) != 0 && config.len() >= 36 {
            // virtio-blk num_queues: what this device exposes, not what the backend could.
            config[34..36].copy_from_slice(&num_queues.to_le_bytes());
        }
        let model = DeviceModel {
            device_id: info.kind.virtio_id(),
            features: info.features & mmio::TRANSPORT_FEATURES,
            num_queues,
            queue_max,
            config,
            writable_config: info.kind.writable_config(),
            vring_interrupt_always: true,
        };
        let events = match events {
            Some(e) => e,
            None => DeviceEvents::new(num_queues).map_err(os("cannot create eventfds"))?,
        };
        if events.kicks.len() < usize::from(num_queues)
            || events.calls.len() < usize::from(num_queues)
        {
            return Err(opt_err(format!(
                "{} eventfds given for {num_queues} queues",
                events.kicks.len().min(events.calls.len())
            )));
        }
        let worker_events = events.try_clone().map_err(os("cannot clone eventfds"))?;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            transport: Mutex::new(MmioTransport::new(model)),
            config_irq: events
                .config
                .try_clone()
                .map_err(os("cannot clone eventfd"))?,
            stats: DeviceStats::default(),
            link: Mutex::new(conn.cutter().ok()),
            stopping: AtomicBool::new(false),
        });
        shared.stats.connected.store(true, Ordering::Release);
        log::info!(
            "{name}: {} backend at {}: features {:#x}, {num_queues} queue(s) of up to {queue_max}, {}{}",
            info.kind,
            opts.socket.display(),
            info.features,
            info.kind.describe_config(&info.config),
            if info
                .protocol_features
                .contains(vhost::vhost_user::message::VhostUserProtocolFeatures::INFLIGHT_SHMFD)
            {
                ", inflight tracking"
            } else {
                ""
            }
        );
        let (tx, rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(os("cannot create eventfd"))?;
        let worker = Worker {
            shared: shared.clone(),
            socket: opts.socket.clone(),
            kind: info.kind,
            reconnect: opts.reconnect,
            mem,
            conn: Some(conn),
            info,
            events: worker_events,
            commands: rx,
            wake: wake.try_clone().map_err(os("cannot clone eventfd"))?,
            active: None,
            lost_since: None,
            gave_up: false,
            last_refusal: None,
            guest_config: Vec::new(),
        };
        let kind = worker.kind;
        let backend = worker.info.clone();
        let handle = std::thread::Builder::new()
            .name(format!(
                "vu-{}",
                name.split_whitespace().next().unwrap_or(name)
            ))
            .spawn(move || worker.run())
            .map_err(os("cannot start device thread"))?;
        Ok(VhostUserDevice {
            shared,
            events,
            commands: tx,
            wake,
            worker: Some(handle),
            kind,
            backend,
        })
    }

    /// The device's name in logs.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The device type.
    pub fn kind(&self) -> DeviceType {
        self.kind
    }

    /// What the backend said in the first handshake.
    pub fn backend(&self) -> &frontend::BackendInfo {
        &self.backend
    }

    /// Number of queues exposed to the guest.
    pub fn num_queues(&self) -> u16 {
        self.shared.transport().model().num_queues
    }

    /// The eventfds to register with KVM (kicks as ioeventfds on QueueNotify with the queue
    /// index as datamatch, calls and config as irqfds on the device's GSI).
    pub fn events(&self) -> &DeviceEvents {
        &self.events
    }

    /// Counters.
    pub fn stats(&self) -> &DeviceStats {
        &self.shared.stats
    }

    /// Guest register accesses that made no sense.
    pub fn guest_errors(&self) -> u64 {
        self.shared.transport().guest_errors()
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.shared.transport().status()
    }

    /// Guest read at `offset` in the device window.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.shared.transport().read(offset, data);
    }

    /// Guest write at `offset` in the device window.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        let event = self.shared.transport().write(offset, data);
        let cmd = match event {
            None => return,
            Some(TransportEvent::Notify(q)) => {
                self.shared
                    .stats
                    .notify_exits
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(k) = self.events.kicks.get(usize::from(q)) {
                    let _ = k.write(1);
                }
                return;
            }
            Some(TransportEvent::Activate(a)) => Command::Activate(a),
            Some(TransportEvent::Reset) => Command::Reset,
            Some(TransportEvent::ConfigWrite { offset, data }) => {
                Command::ConfigWrite { offset, data }
            }
        };
        if self.commands.send(cmd).is_ok() {
            let _ = self.wake.write(1);
        }
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.commands.send(Command::Shutdown);
        let _ = self.wake.write(1);
        // A device thread stuck in a request to a hung backend must not hold the VM's end.
        if let Ok(mut l) = self.shared.link.lock() {
            if let Some(s) = l.take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}

/// What the guest set up, kept across backend reconnects.
struct Active {
    acked_features: u64,
    rings: Vec<RingSetup>,
    inflight: Option<InflightArea>,
    /// Whether the current connection has the rings running.
    started: bool,
}

struct Worker {
    shared: Arc<Shared>,
    socket: PathBuf,
    kind: DeviceType,
    reconnect: WaitLimit,
    mem: GuestMemoryMmap,
    conn: Option<Connection>,
    info: frontend::BackendInfo,
    events: DeviceEvents,
    commands: mpsc::Receiver<Command>,
    wake: EventFd,
    active: Option<Active>,
    lost_since: Option<Instant>,
    gave_up: bool,
    last_refusal: Option<String>,
    /// Config writes the guest made since its last reset (offset, bytes), replayed to a
    /// backend that comes back.
    guest_config: Vec<(u32, Vec<u8>)>,
}

enum Readiness {
    Quiet,
    Commands,
    Hangup,
    BackendRequest,
}

impl Worker {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn run(mut self) {
        loop {
            let timeout = if self.conn.is_none() && !self.gave_up {
                RECONNECT_INTERVAL
            } else {
                Duration::from_secs(1)
            };
            let readiness = self.wait(timeout);
            match readiness {
                Readiness::Hangup => self.lost("the backend closed the connection"),
                Readiness::BackendRequest => self.backend_request(),
                Readiness::Quiet | Readiness::Commands => {}
            }
            let _ = self.wake.read();
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => return,
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            if self.conn.is_none() && !self.gave_up {
                self.try_reconnect();
            }
        }
    }

    /// Sleeps until a command arrives, the backend socket hangs up, or `timeout`.
    fn wait(&self, timeout: Duration) -> Readiness {
        let mut fds = vec![libc::pollfd {
            fd: self.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(c) = &self.conn {
            fds.push(libc::pollfd {
                fd: c.raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            });
        }
        if let Some(fd) = self.conn.as_ref().and_then(|c| c.backend_request_fd()) {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n <= 0 {
            return Readiness::Quiet;
        }
        if let Some(s) = fds.get(1) {
            // Nothing is ever expected unsolicited on the request socket: readable means EOF,
            // a hang-up, or a backend breaking the protocol. Either way the link is gone.
            if s.revents != 0 {
                return Readiness::Hangup;
            }
        }
        if fds.get(2).is_some_and(|s| s.revents != 0) {
            return Readiness::BackendRequest;
        }
        if fds[0].revents != 0 {
            Readiness::Commands
        } else {
            Readiness::Quiet
        }
    }

    fn lost(&mut self, why: &str) {
        if self.shared.stopping.load(Ordering::Acquire) {
            // The VM is ending and cut the connection itself: nothing is lost.
            return;
        }
        if self.conn.take().is_none() {
            return;
        }
        // Make sure the backend sees the hang-up too (the copy would keep the socket open).
        if let Ok(mut l) = self.shared.link.lock() {
            if let Some(s) = l.take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        self.shared.stats.connected.store(false, Ordering::Release);
        if let Some(a) = &mut self.active {
            a.started = false;
        }
        self.lost_since = Some(Instant::now());
        self.last_refusal = None;
        let limit = match self.reconnect {
            WaitLimit::Forever => "no time limit".to_string(),
            WaitLimit::For(d) => format!("giving up after {d:?}"),
        };
        log::warn!(
            "{}: backend {} lost ({why}); reconnecting ({limit}); guest I/O waits",
            self.name(),
            self.socket.display()
        );
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Activate(a) => self.activate(a),
            Command::Reset => {
                self.guest_config.clear();
                self.reset()
            }
            Command::ConfigWrite { offset, data } => {
                // Keep the latest write per state field (the transport only lets a few fields
                // be written, so this stays tiny); event fields are never replayed.
                let end = offset as usize + data.len();
                let sticky =
                    self.kind.writable_config().iter().any(|f| {
                        f.sticky && offset >= f.offset && end <= (f.offset + f.len) as usize
                    });
                if sticky {
                    self.guest_config
                        .retain(|(o, d)| *o != offset || d.len() != data.len());
                    self.guest_config.push((offset, data.clone()));
                }
                let stats = &self.shared.stats;
                let Some(conn) = &mut self.conn else {
                    stats.config_writes_failed.fetch_add(1, Ordering::Relaxed);
                    log::warn!(
                        "{}: config write at {offset} dropped: backend not connected",
                        self.shared.name
                    );
                    return;
                };
                match conn.set_config(offset, &data) {
                    Ok(()) => {
                        stats.config_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        stats.config_writes_failed.fetch_add(1, Ordering::Relaxed);
                        log::warn!("{}: {e}", self.shared.name);
                        if e.is_disconnect() {
                            self.lost("SET_CONFIG failed");
                        }
                    }
                }
            }
            Command::Shutdown => {}
        }
    }

    fn ring_setup(&self, a: &Activation) -> Result<Vec<RingSetup>, FrontendError> {
        let mut rings = Vec::with_capacity(a.queues.len());
        for q in &a.queues {
            let c = q.config;
            let (dl, al, ul) = mmio::split_ring_sizes(c.size);
            rings.push(RingSetup {
                index: q.index,
                size: c.size,
                desc: c.desc,
                avail: c.driver,
                used: c.device,
                desc_hva: frontend::host_range(&self.mem, q.index, "descriptor table", c.desc, dl)?,
                avail_hva: frontend::host_range(&self.mem, q.index, "avail ring", c.driver, al)?,
                used_hva: frontend::host_range(&self.mem, q.index, "used ring", c.device, ul)?,
            });
        }
        Ok(rings)
    }

    fn activate(&mut self, a: Activation) {
        if self.active.is_some() {
            // The transport only activates after a reset, which clears this first.
            self.reset();
        }
        let rings = match self.ring_setup(&a) {
            Ok(r) => r,
            Err(e) => {
                self.shared.needs_reset(&e.to_string());
                return;
            }
        };
        self.active = Some(Active {
            acked_features: a.acked_features,
            rings,
            inflight: None,
            started: false,
        });
        if self.gave_up {
            // The guest tries again: so does hype.
            self.gave_up = false;
            self.lost_since = Some(Instant::now());
        }
        self.start_rings(false);
    }

    /// Starts the rings on the current connection. On a replay after a reconnect every ring
    /// resumes at the used index found in guest memory: the requests after it are the ones
    /// the old backend had not completed (see docs/devices.md for what that guarantees).
    fn start_rings(&mut self, replay: bool) {
        let (Some(conn), Some(active)) = (&mut self.conn, &mut self.active) else {
            return;
        };
        if active.inflight.is_none() {
            let max = active.rings.iter().map(|r| r.size).max().unwrap_or(0);
            let num = self.shared.transport().model().num_queues;
            match conn.get_inflight(num, max) {
                Ok(area) => active.inflight = area,
                Err(e) if e.is_disconnect() => {
                    let msg = e.to_string();
                    self.lost(&msg);
                    return;
                }
                Err(e) => log::warn!("{}: {e}; going on without", self.shared.name),
            }
        }
        let mut bases = Vec::with_capacity(active.rings.len());
        for r in &active.rings {
            let base = if replay {
                // used.idx is at offset 2 of the used ring.
                self.mem
                    .read_obj::<u16>(GuestAddress(r.used + 2))
                    .unwrap_or_default()
            } else {
                0
            };
            bases.push((*r, base));
        }
        let res = conn.start(
            &self.mem,
            active.acked_features,
            &bases,
            &self.events.kicks,
            &self.events.calls,
            active.inflight.as_ref(),
        );
        match res {
            Ok(()) => {
                active.started = true;
                self.shared
                    .stats
                    .ring_starts
                    .fetch_add(1, Ordering::Relaxed);
                if replay {
                    // Make the backend look at its rings even if it waits for a kick.
                    for r in &active.rings {
                        if let Some(k) = self.events.kicks.get(usize::from(r.index)) {
                            let _ = k.write(1);
                        }
                    }
                    let list: Vec<String> = bases
                        .iter()
                        .map(|(r, b)| format!("{}@{b}", r.index))
                        .collect();
                    log::info!(
                        "{}: replayed {} ring(s) (queue@base: {})",
                        self.shared.name,
                        bases.len(),
                        list.join(", ")
                    );
                } else {
                    log::debug!("{}: {} ring(s) started", self.shared.name, bases.len());
                }
            }
            Err(e) if e.is_disconnect() => {
                let msg = e.to_string();
                self.lost(&msg);
            }
            Err(e) => {
                self.shared.needs_reset(&e.to_string());
                self.active = None;
            }
        }
    }

    fn reset(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        if !active.started {
            return;
        }
        let Some(conn) = &mut self.conn else {
            return;
        };
        match conn.stop(&active.rings) {
            Ok(bases) => log::debug!("{}: rings stopped at {bases:?}", self.shared.name),
            Err(e) => {
                log::warn!("{}: stopping the rings: {e}", self.shared.name);
                if e.is_disconnect() {
                    self.lost("stopping the rings failed");
                }
            }
        }
        // The inflight area (if any) is dropped with `active`: a new setup starts clean.
    }

    /// Shows the guest a config the backend now has: what the guest wrote stays as written,
    /// the exposed queue count stays; generation bump and config interrupt if anything changed.
    fn apply_backend_config(&mut self, backend_config: &[u8]) {
        let mut config = backend_config.to_vec();
        for (o, d) in &self.guest_config {
            let o = *o as usize;
            if let Some(dst) = config.get_mut(o..o + d.len()) {
                dst.copy_from_slice(d);
            }
        }
        let mut t = self.shared.transport();
        let old = t.config().to_vec();
        if self.kind == DeviceType::Block && config.len() >= 36 && old.len() >= 36 {
            config[34..36].copy_from_slice(&old[34..36]);
        }
        if t.update_config(&config) {
            t.set_config_interrupt();
            drop(t);
            self.shared.config_interrupt();
        }
    }

    /// A request on the BACKEND_REQ channel: a config change makes hype fetch the config and
    /// tell the guest.
    fn backend_request(&mut self) {
        let Some(conn) = &mut self.conn else {
            return;
        };
        if !conn.handle_backend_request() {
            return;
        }
        match conn.read_config() {
            Ok(config) => {
                log::info!(
                    "{}: backend reports a config change: {}",
                    self.shared.name,
                    self.kind.describe_config(&config)
                );
                self.info.config = config.clone();
                self.apply_backend_config(&config);
            }
            Err(e) => {
                log::warn!("{}: {e}", self.shared.name);
                if e.is_disconnect() {
                    self.lost("GET_CONFIG failed");
                }
            }
        }
    }

    fn refuse(&mut self, msg: String) {
        if self.last_refusal.as_deref() != Some(msg.as_str()) {
            log::error!("{}: {msg}", self.shared.name);
            self.last_refusal = Some(msg);
        }
    }

    fn try_reconnect(&mut self) {
        if let (WaitLimit::For(limit), Some(since)) = (self.reconnect, self.lost_since) {
            if since.elapsed() >= limit {
                self.gave_up = true;
                self.shared.needs_reset(&format!(
                    "backend {} not back after {limit:?}; giving up",
                    self.socket.display()
                ));
                return;
            }
        }
        let stream = match frontend::try_connect(&self.socket) {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                self.refuse(e.to_string());
                return;
            }
        };
        // The handshake uses this device's type (so a third-party backend attached with an
        // explicit type comes back too); whether the backend is still the same kind of device
        // is judged by detection: what its features say now against what they said first.
        let conn = match Connection::handshake(&self.socket, stream, Some(self.kind)) {
            Ok(c) => c,
            Err(e) => {
                log::debug!("{}: reconnect attempt: {e}", self.shared.name);
                return;
            }
        };
        let new = conn.info().clone();
        let was = super::detect::type_from_features(self.info.features).ok();
        let now = super::detect::type_from_features(new.features).ok();
        if now != was {
            let what = now.map_or("an unrecognisable".to_string(), |k| format!("a {k}"));
            self.refuse(format!(
                "backend {} came back as {what} device, but this is a {} device; not using it",
                self.socket.display(),
                self.kind
            ));
            return;
        }
        if let Some(a) = &self.active {
            let missing = a.acked_features & !new.features;
            if missing != 0 {
                self.refuse(format!(
                    "backend {} came back without features {missing:#x} the guest uses; not using it",
                    self.socket.display()
                ));
                return;
            }
        }
        let waited = self.lost_since.map(|t| t.elapsed()).unwrap_or_default();
        if new.config != self.info.config {
            log::warn!(
                "{}: backend {} came back with a different {} config: {} (was {}); telling the guest",
                self.shared.name,
                self.socket.display(),
                self.kind,
                self.kind.describe_config(&new.config),
                self.kind.describe_config(&self.info.config)
            );
            self.apply_backend_config(&new.config);
        }
        self.info = new;
        if let Ok(mut l) = self.shared.link.lock() {
            *l = conn.cutter().ok();
        }
        let mut conn = conn;
        for (offset, data) in &self.guest_config {
            let stats = &self.shared.stats;
            match conn.set_config(*offset, data) {
                Ok(()) => stats.config_writes.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    log::warn!("{}: replaying a config write: {e}", self.shared.name);
                    stats.config_writes_failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        self.conn = Some(conn);
        self.last_refusal = None;
        self.lost_since = None;
        self.shared.stats.connected.store(true, Ordering::Release);
        self.shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "{}: backend {} is back after {waited:?}",
            self.shared.name,
            self.socket.display()
        );
        if self.active.is_some() {
            self.start_rings(true);
        }
    }
}
