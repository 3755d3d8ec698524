//! The device worker: the thread that owns a device's link to its backend.
//!
//! It carries out what the guest asks through the register file (start the rings, reset,
//! config writes), watches the link for hang-ups, and when the backend is lost reconnects and
//! replays the whole setup. Its state is one explicit enum (`LinkState`):
//!
//! ```text
//!            lost (hang-up, failed request)           not back within the limit
//! Connected ─────────────────────────────▶ Lost ─────────────────────────▶ GaveUp
//!   ▲   (running: rings started or not)     │  (retried every RECONNECT_INTERVAL)  │
//!   └──────── reconnected, setup replayed ──┘                                       │
//!                               ▲        guest sets the device up again             │
//!                               └───────────────────────────────────────────────────┘
//! ```
//!
//! What the guest set up (`Setup`: acked features, rings, inflight area) is kept apart from
//! the link: it outlives reconnects and is cleared by a reset. Outsiders read the state as a
//! [`BackendStatus`] through [`super::VhostUserDevice::backend_status`].
//!
//! The link and the way to get a new one are traits ([`BackendLink`], [`Connector`]), so the
//! state machine is unit-tested below against a mock, without KVM or backend processes.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::{DeviceEvents, DeviceStats, WaitLimit, RECONNECT_INTERVAL};
use super::frontend::{self, BackendInfo, BackendLink, FrontendError, InflightArea, Ring};
pub use super::frontend::{Connector, SocketConnector};
use super::mmio::{self, Activation, MmioTransport};
use super::DeviceType;
use crate::memory::GuestMemoryMmap;
use hype_base::error_chain;
use hype_base::log_limit::LogCounter;

/// Lines of one call site that a guest or a backend can trigger again and again, before only
/// every power of two is logged ([`hype_base::log_limit`]).
const LOG_BURST: u64 = 20;

/// Logs at `level` when `counter` says so, with the event's running number.
macro_rules! limited {
    ($level:ident, $counter:expr, $($arg:tt)*) => {
        if let Some(n) = $counter.hit() {
            log::$level!("{} (#{n})", format_args!($($arg)*));
        }
    };
}

/// Where a device's link to its backend stands, as the worker last published it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// A backend is connected; `running` when the rings are started on it.
    Connected {
        /// Whether the rings run on this connection.
        running: bool,
    },
    /// The backend was lost at `since`; hype tries to reconnect every
    /// [`RECONNECT_INTERVAL`] (`attempts` so far).
    Reconnecting {
        /// When the backend was lost.
        since: SystemTime,
        /// Connection attempts since then.
        attempts: u64,
    },
    /// The backend was not back within the reconnect limit: the device shows
    /// DEVICE_NEEDS_RESET, and hype tries again when the guest sets it up again.
    GaveUp {
        /// When the backend was lost.
        since: SystemTime,
        /// How long hype tried.
        after: Duration,
    },
}

/// A device's link state and counters, for the log or a control API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendStatus {
    /// Where the link stands.
    pub state: BackendState,
    /// Reconnections that replayed the device.
    pub reconnects: u64,
    /// Times the rings were started on a backend (activation or replay).
    pub ring_starts: u64,
}

/// What the vCPU side asks the worker to do.
#[derive(Debug)]
pub(crate) enum Command {
    /// DRIVER_OK: start the rings.
    Activate(Activation),
    /// Status 0: stop the rings, forget the setup.
    Reset,
    /// The guest wrote the config space.
    ConfigWrite {
        /// Offset in the config space.
        offset: u32,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The control API: fetch the config from the backend again (GET_CONFIG) and show the
    /// guest what changed (a disk that grew).
    RefreshConfig(mpsc::Sender<Result<ConfigRefresh, DeviceCommandError>>),
    /// The control API: move the device to the backend at another socket.
    SwitchBackend {
        /// The new backend's socket.
        socket: PathBuf,
        /// Where the answer goes.
        reply: mpsc::Sender<Result<(), DeviceCommandError>>,
    },
    /// The device goes away.
    Shutdown,
    /// A snapshot: stop the rings (GET_VRING_BASE), keep the setup, answer with each ring's
    /// position.
    SnapshotStop(mpsc::Sender<Result<SnapshotStopped, String>>),
    /// A restored device, before its rings start: load the backend's saved state
    /// (DEVICE_STATE LOAD) and answer whether the backend took it.
    LoadState(Vec<u8>, mpsc::Sender<Result<(), String>>),
    /// Start the rings stopped for a snapshot again (the VM resumes).
    ResumeRings,
    /// A restored device: take the guest's setup from the snapshot and start the rings where
    /// the used rings in guest memory say.
    Restore(Activation),
}

/// The most backend state a snapshot takes from one device (the VMM holds it in memory
/// while writing it out).
pub const MAX_DEVICE_STATE: u64 = 16 << 30;

/// What a device's worker answers when a snapshot stops it.
#[derive(Debug)]
pub struct SnapshotStopped {
    /// Where each ring stood.
    pub rings: Vec<RingPosition>,
    /// The backend's own state (DEVICE_STATE SAVE), if it offers the feature.
    pub state: Option<Vec<u8>>,
}

/// Where one ring stood when a snapshot stopped it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RingPosition {
    /// Queue index.
    pub queue: u16,
    /// The backend's next avail index (GET_VRING_BASE).
    pub next_avail: u32,
    /// The used index in guest memory: a restored backend starts here, so requests the old
    /// backend had taken but not completed are done (once) by the new one.
    pub used: u16,
}

/// What the vCPU side and the worker share.
pub(crate) struct Shared {
    /// The device's name in logs.
    pub(crate) name: String,
    transport: Mutex<MmioTransport>,
    config_irq: EventFd,
    /// Counters.
    pub(crate) stats: DeviceStats,
    /// A copy of the current connection's socket, to cut it when the device goes away while
    /// the device thread waits for a hung backend.
    link: Mutex<Option<UnixStream>>,
    /// Set when the device goes away: a hang-up from then on is the VMM's own doing.
    pub(crate) stopping: AtomicBool,
    state: Mutex<BackendState>,
}

impl Shared {
    /// Shared state of a device whose backend is connected (`cutter` cuts that connection).
    pub(crate) fn new(
        name: &str,
        transport: MmioTransport,
        config_irq: EventFd,
        cutter: Option<UnixStream>,
    ) -> Self {
        let shared = Shared {
            name: name.to_owned(),
            transport: Mutex::new(transport),
            config_irq,
            stats: DeviceStats::default(),
            link: Mutex::new(cutter),
            stopping: AtomicBool::new(false),
            state: Mutex::new(BackendState::Connected { running: false }),
        };
        shared.stats.connected.store(true, Ordering::Release);
        shared
    }

    /// The register file.
    pub(crate) fn transport(&self) -> MutexGuard<'_, MmioTransport> {
        self.transport.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Shuts the current connection's socket down (a request in progress fails at once).
    pub(crate) fn cut_link(&self) {
        let mut l = self.link.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = l.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn set_cutter(&self, cutter: Option<UnixStream>) {
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = cutter;
    }

    /// The link state and counters.
    pub(crate) fn backend_status(&self) -> BackendStatus {
        BackendStatus {
            state: self.state.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            reconnects: self.stats.reconnects.load(Ordering::Relaxed),
            ring_starts: self.stats.ring_starts.load(Ordering::Relaxed),
        }
    }

    fn publish(&self, state: BackendState) {
        let connected = matches!(state, BackendState::Connected { .. });
        let old = std::mem::replace(
            &mut *self.state.lock().unwrap_or_else(|p| p.into_inner()),
            state.clone(),
        );
        if !self.stopping.load(Ordering::Acquire) {
            if let Some(kind) = link_event(&old, &state) {
                crate::control::record(kind, Some(&self.name), None);
            }
        }
        self.stats.connected.store(connected, Ordering::Release);
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

/// The event a change of the published link state is, if any.
fn link_event(old: &BackendState, new: &BackendState) -> Option<hype_api::events::EventKind> {
    use hype_api::events::EventKind as K;
    use BackendState as S;
    match (old, new) {
        (S::Connected { .. }, S::Reconnecting { .. }) => Some(K::DeviceLost),
        (S::Reconnecting { .. } | S::GaveUp { .. }, S::Connected { .. }) => {
            Some(K::DeviceReconnected)
        }
        (S::Connected { .. } | S::Reconnecting { .. }, S::GaveUp { .. }) => Some(K::DeviceGaveUp),
        _ => None,
    }
}

/// One ring as the guest set it up: guest physical addresses and where they are mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingSetup {
    index: u16,
    size: u16,
    /// Used ring, guest physical (its `idx` is where a replay resumes).
    used: u64,
    desc_hva: u64,
    avail_hva: u64,
    used_hva: u64,
}

/// What the guest set up, kept across backend reconnects, cleared by a reset.
#[derive(Debug)]
struct Setup {
    acked_features: u64,
    rings: Vec<RingSetup>,
    inflight: Option<InflightArea>,
}

/// The worker's link to its backend.
enum LinkState<L> {
    /// A backend is connected; `running` when the rings are started on it (only ever true
    /// with a [`Setup`]).
    Connected { link: L, running: bool },
    /// The backend was lost; it is retried every [`RECONNECT_INTERVAL`].
    Lost {
        since: Instant,
        at: SystemTime,
        attempts: u64,
        /// The last reason a backend that came back was refused (logged once).
        last_refusal: Option<String>,
    },
    /// Not back within the reconnect limit; retried when the guest sets the device up again.
    GaveUp { at: SystemTime, after: Duration },
}

impl<L> LinkState<L> {
    fn lost_now() -> Self {
        LinkState::Lost {
            since: Instant::now(),
            at: SystemTime::now(),
            attempts: 0,
            last_refusal: None,
        }
    }

    fn public(&self) -> BackendState {
        match self {
            LinkState::Connected { running, .. } => BackendState::Connected { running: *running },
            LinkState::Lost { at, attempts, .. } => BackendState::Reconnecting {
                since: *at,
                attempts: *attempts,
            },
            LinkState::GaveUp { at, after } => BackendState::GaveUp {
                since: *at,
                after: *after,
            },
        }
    }
}

/// The fixed parts of a worker.
pub(crate) struct WorkerSetup {
    /// The backend socket (for logs).
    pub(crate) socket: PathBuf,
    /// The device type.
    pub(crate) kind: DeviceType,
    /// How long to keep trying to reconnect a lost backend.
    pub(crate) reconnect: WaitLimit,
    /// Guest memory.
    pub(crate) mem: GuestMemoryMmap,
    /// The device's eventfds.
    pub(crate) events: DeviceEvents,
    /// Commands from the vCPU side.
    pub(crate) commands: mpsc::Receiver<Command>,
    /// Written after each command.
    pub(crate) wake: EventFd,
}

/// The device thread's state.
pub(crate) struct Worker<C: Connector> {
    shared: Arc<Shared>,
    connector: C,
    fixed: WorkerSetup,
    link: LinkState<C::Link>,
    /// What the backend said in the last handshake.
    info: BackendInfo,
    setup: Option<Setup>,
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

impl<C: Connector> Worker<C> {
    /// A worker whose backend is connected through `link`.
    pub(crate) fn new(
        shared: Arc<Shared>,
        connector: C,
        fixed: WorkerSetup,
        link: C::Link,
    ) -> Self {
        let info = link.info().clone();
        let w = Worker {
            shared,
            connector,
            fixed,
            link: LinkState::Connected {
                link,
                running: false,
            },
            info,
            setup: None,
            guest_config: Vec::new(),
        };
        w.publish();
        w
    }

    fn name(&self) -> &str {
        &self.shared.name
    }

    fn publish(&self) {
        self.shared.publish(self.link.public());
    }

    fn reconnecting(&self) -> bool {
        matches!(self.link, LinkState::Lost { .. })
    }

    /// The thread's loop, until [`Command::Shutdown`] or the device is dropped.
    pub(crate) fn run(mut self) {
        loop {
            let timeout = if self.reconnecting() {
                RECONNECT_INTERVAL
            } else {
                Duration::from_secs(1)
            };
            match self.wait(timeout) {
                Readiness::Hangup => self.lost("the backend closed the connection"),
                Readiness::BackendRequest => self.backend_request(),
                Readiness::Quiet | Readiness::Commands => {}
            }
            let _ = self.fixed.wake.read();
            loop {
                match self.fixed.commands.try_recv() {
                    Ok(Command::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => return,
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            if self.reconnecting() {
                self.try_reconnect();
            }
        }
    }

    /// Sleeps until a command arrives, the backend socket hangs up, or `timeout`.
    fn wait(&self, timeout: Duration) -> Readiness {
        let mut fds = vec![libc::pollfd {
            fd: self.fixed.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let (mut sock, mut req) = (None, None);
        if let LinkState::Connected { link, .. } = &self.link {
            if let Some(fd) = link.watch_fd() {
                sock = Some(fds.len());
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                });
            }
            if let Some(fd) = link.backend_request_fd() {
                req = Some(fds.len());
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n <= 0 {
            return Readiness::Quiet;
        }
        let fired = |i: Option<usize>| i.and_then(|i| fds.get(i)).is_some_and(|s| s.revents != 0);
        // Nothing is ever expected unsolicited on the request socket: readable means EOF, a
        // hang-up, or a backend breaking the protocol. Either way the link is gone.
        if fired(sock) {
            return Readiness::Hangup;
        }
        if fired(req) {
            return Readiness::BackendRequest;
        }
        if fired(Some(0)) {
            Readiness::Commands
        } else {
            Readiness::Quiet
        }
    }

    /// The backend went away (or broke the link): drop the connection and start
    /// reconnecting. Nothing happens unless connected, or while the device goes away.
    fn lost(&mut self, why: &str) {
        if self.shared.stopping.load(Ordering::Acquire) {
            // The VM is ending and cut the connection itself: nothing is lost.
            return;
        }
        if !matches!(self.link, LinkState::Connected { .. }) {
            return;
        }
        // Dropping the link closes it; make sure the backend sees the hang-up too (the copy
        // kept to cut it would keep the socket open).
        self.link = LinkState::lost_now();
        self.shared.cut_link();
        self.publish();
        let limit = match self.fixed.reconnect {
            WaitLimit::Forever => "no time limit".to_string(),
            WaitLimit::For(d) => format!("giving up after {d:?}"),
        };
        // A backend that keeps dying right after each reconnect must not flood the log.
        static LOST: LogCounter = LogCounter::new(LOG_BURST);
        limited!(
            warn,
            LOST,
            "{}: backend {} lost ({why}); reconnecting ({limit}); guest I/O waits",
            self.name(),
            self.fixed.socket.display()
        );
    }

    /// Carries out one command from the vCPU side.
    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Activate(a) => self.activate(a),
            Command::Reset => {
                self.guest_config.clear();
                self.reset()
            }
            Command::ConfigWrite { offset, data } => self.config_write(offset, data),
            Command::RefreshConfig(reply) => {
                let _ = reply.send(self.refresh_config());
            }
            Command::SwitchBackend { socket, reply } => {
                let _ = reply.send(self.switch_backend(socket));
            }
            Command::Shutdown => {}
            Command::SnapshotStop(reply) => {
                let r = self.snapshot_stop().and_then(|rings| {
                    let state = self.save_state()?;
                    Ok(SnapshotStopped { rings, state })
                });
                let _ = reply.send(r);
            }
            Command::LoadState(state, reply) => {
                let _ = reply.send(self.load_state(&state));
            }
            Command::ResumeRings => self.start_rings(true),
            Command::Restore(a) => self.activate_at(a, true),
        }
    }

    /// The backend's state for a snapshot (its rings stopped), if it offers DEVICE_STATE.
    /// A device the guest never set up whose backend is gone has nothing to save (as
    /// [`Worker::snapshot_stop`] allows).
    fn save_state(&mut self) -> Result<Option<Vec<u8>>, String> {
        let LinkState::Connected { link, .. } = &mut self.link else {
            return Ok(None);
        };
        match link.save_state(MAX_DEVICE_STATE) {
            Ok(state) => Ok(state),
            Err(e) => {
                let msg = error_chain(&e);
                if e.is_disconnect() {
                    self.lost("saving the backend's state failed");
                }
                Err(msg)
            }
        }
    }

    /// Loads a restored backend's state (its rings not started yet).
    fn load_state(&mut self, state: &[u8]) -> Result<(), String> {
        let LinkState::Connected { link, .. } = &mut self.link else {
            return Err("the backend is not connected".into());
        };
        match link.load_state(state) {
            Ok(()) => Ok(()),
            Err(e) => {
                let msg = error_chain(&e);
                if e.is_disconnect() {
                    self.lost("loading the backend's state failed");
                }
                Err(msg)
            }
        }
    }

    /// Stops the rings for a snapshot, keeping the guest's setup.
    fn snapshot_stop(&mut self) -> Result<Vec<RingPosition>, String> {
        let Some(setup) = &self.setup else {
            return Ok(Vec::new());
        };
        let LinkState::Connected { link, running } = &mut self.link else {
            return Err("the backend is not connected".into());
        };
        let queues: Vec<u16> = setup.rings.iter().map(|r| r.index).collect();
        let used: Vec<u16> = setup
            .rings
            .iter()
            .map(|r| {
                self.fixed
                    .mem
                    .read_obj::<u16>(GuestAddress(r.used.wrapping_add(2)))
                    .unwrap_or_default()
            })
            .collect();
        if !*running {
            return Ok(queues
                .iter()
                .zip(&used)
                .map(|(q, u)| RingPosition {
                    queue: *q,
                    next_avail: u32::from(*u),
                    used: *u,
                })
                .collect());
        }
        let bases = match link.stop(&queues) {
            Ok(b) => b,
            Err(e) => {
                let msg = error_chain(&e);
                if e.is_disconnect() {
                    self.lost("stopping the rings for a snapshot failed");
                }
                return Err(msg);
            }
        };
        *running = false;
        self.publish();
        // Re-read: the backend may have completed requests until it stopped.
        let used: Vec<u16> = setup
            .rings
            .iter()
            .map(|r| {
                self.fixed
                    .mem
                    .read_obj::<u16>(GuestAddress(r.used.wrapping_add(2)))
                    .unwrap_or_default()
            })
            .collect();
        Ok(queues
            .iter()
            .zip(bases.iter().chain(std::iter::repeat(&0)))
            .zip(&used)
            .map(|((q, b), u)| RingPosition {
                queue: *q,
                next_avail: *b,
                used: *u,
            })
            .collect())
    }

    fn config_write(&mut self, offset: u32, data: Vec<u8>) {
        // Keep the latest write per state field (the transport only lets a few fields be
        // written, so this stays tiny); event fields are never replayed.
        if self.fixed.kind.is_sticky_write(offset, data.len()) {
            self.guest_config
                .retain(|(o, d)| *o != offset || d.len() != data.len());
            self.guest_config.push((offset, data.clone()));
        }
        let stats = &self.shared.stats;
        let LinkState::Connected { link, .. } = &mut self.link else {
            stats.config_writes_failed.fetch_add(1, Ordering::Relaxed);
            static DROPPED: LogCounter = LogCounter::new(LOG_BURST);
            limited!(
                warn,
                DROPPED,
                "{}: config write at {offset} dropped: backend not connected",
                self.shared.name
            );
            return;
        };
        match link.set_config(offset, &data) {
            Ok(()) => {
                stats.config_writes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                stats.config_writes_failed.fetch_add(1, Ordering::Relaxed);
                static FAILED: LogCounter = LogCounter::new(LOG_BURST);
                limited!(warn, FAILED, "{}: {}", self.shared.name, error_chain(&e));
                if e.is_disconnect() {
                    self.lost("SET_CONFIG failed");
                }
            }
        }
    }

    fn ring_setup(&self, a: &Activation) -> Result<Vec<RingSetup>, FrontendError> {
        let mem = &self.fixed.mem;
        let mut rings = Vec::with_capacity(a.queues.len());
        for q in &a.queues {
            let c = q.config;
            let (dl, al, ul) = mmio::split_ring_sizes(c.size);
            rings.push(RingSetup {
                index: q.index,
                size: c.size,
                used: c.device,
                desc_hva: frontend::host_range(mem, q.index, "descriptor table", c.desc, dl)?,
                avail_hva: frontend::host_range(mem, q.index, "avail ring", c.driver, al)?,
                used_hva: frontend::host_range(mem, q.index, "used ring", c.device, ul)?,
            });
        }
        Ok(rings)
    }

    /// DRIVER_OK: keep the guest's setup and start the rings if a backend is there.
    fn activate(&mut self, a: Activation) {
        self.activate_at(a, false);
    }

    /// [`Worker::activate`]; with `resume` the rings start at the used indexes in guest memory
    /// (a restored snapshot) instead of 0.
    fn activate_at(&mut self, a: Activation, resume: bool) {
        if self.setup.is_some() {
            // The transport only activates after a reset, which clears this first.
            self.reset();
        }
        let rings = match self.ring_setup(&a) {
            Ok(r) => r,
            Err(e) => {
                self.shared.needs_reset(&error_chain(&e));
                return;
            }
        };
        self.setup = Some(Setup {
            acked_features: a.acked_features,
            rings,
            inflight: None,
        });
        if matches!(self.link, LinkState::GaveUp { .. }) {
            // The guest tries again: so does hype.
            self.link = LinkState::lost_now();
            self.publish();
        }
        self.start_rings(resume);
    }

    /// Starts the rings on the current connection. On a replay after a reconnect every ring
    /// resumes at the used index found in guest memory: the requests after it are the ones
    /// the old backend had not completed (see docs/devices.md for what that guarantees).
    fn start_rings(&mut self, replay: bool) {
        let (LinkState::Connected { link, running }, Some(setup)) =
            (&mut self.link, &mut self.setup)
        else {
            return;
        };
        let name = &self.shared.name;
        if setup.inflight.is_none() {
            let max = setup.rings.iter().map(|r| r.size).max().unwrap_or(0);
            let num = self.shared.transport().model().num_queues;
            match link.get_inflight(num, max) {
                Ok(area) => setup.inflight = area,
                Err(e) if e.is_disconnect() => {
                    let msg = error_chain(&e);
                    self.lost(&msg);
                    return;
                }
                Err(e) => log::warn!("{name}: {}; going on without", error_chain(&e)),
            }
        }
        let mem = &self.fixed.mem;
        let events = &self.fixed.events;
        let mut rings = Vec::with_capacity(setup.rings.len());
        for r in &setup.rings {
            let base = if replay {
                // used.idx is at offset 2 of the used ring.
                mem.read_obj::<u16>(GuestAddress(r.used.wrapping_add(2)))
                    .unwrap_or_default()
            } else {
                0
            };
            let q = usize::from(r.index);
            let (Some(kick), Some(call)) = (events.kicks.get(q), events.calls.get(q)) else {
                continue;
            };
            rings.push(Ring {
                index: r.index,
                size: r.size,
                desc: r.desc_hva,
                avail: r.avail_hva,
                used: r.used_hva,
                base,
                kick,
                call,
            });
        }
        let res = frontend::memory_regions(mem).and_then(|regions| {
            link.start(
                &regions,
                setup.acked_features,
                setup.inflight.as_ref(),
                &rings,
            )
        });
        match res {
            Ok(()) => {
                *running = true;
                self.shared
                    .stats
                    .ring_starts
                    .fetch_add(1, Ordering::Relaxed);
                if replay {
                    // Make the backend look at its rings even if it waits for a kick.
                    for r in &rings {
                        let _ = r.kick.write(1);
                    }
                    let list: Vec<String> = rings
                        .iter()
                        .map(|r| format!("{}@{}", r.index, r.base))
                        .collect();
                    log::info!(
                        "{name}: replayed {} ring(s) (queue@base: {})",
                        rings.len(),
                        list.join(", ")
                    );
                } else {
                    log::debug!("{name}: {} ring(s) started", rings.len());
                }
                self.publish();
            }
            Err(e) if e.is_disconnect() => {
                let msg = error_chain(&e);
                self.lost(&msg);
            }
            Err(e) => {
                self.shared.needs_reset(&error_chain(&e));
                self.setup = None;
            }
        }
    }

    /// Status 0: forget the guest's setup, stopping the rings if they run.
    fn reset(&mut self) {
        let Some(setup) = self.setup.take() else {
            return;
        };
        let LinkState::Connected { link, running } = &mut self.link else {
            return;
        };
        if !*running {
            return;
        }
        *running = false;
        let queues: Vec<u16> = setup.rings.iter().map(|r| r.index).collect();
        let res = link.stop(&queues);
        self.publish();
        match res {
            Ok(bases) => log::debug!("{}: rings stopped at {bases:?}", self.shared.name),
            Err(e) => {
                log::warn!(
                    "{}: stopping the rings: {}",
                    self.shared.name,
                    error_chain(&e)
                );
                if e.is_disconnect() {
                    self.lost("stopping the rings failed");
                }
            }
        }
        // The inflight area (if any) is dropped with `setup`: a new setup starts clean.
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
        self.fixed.kind.keep_queue_count(t.config(), &mut config);
        if t.update_config(&config) {
            t.set_config_interrupt();
            drop(t);
            self.shared.config_interrupt();
        }
    }

    /// A request on the BACKEND_REQ channel: a config change makes hype fetch the config and
    /// tell the guest.
    fn backend_request(&mut self) {
        let LinkState::Connected { link, .. } = &mut self.link else {
            return;
        };
        if !link.handle_backend_request() {
            return;
        }
        let kind = self.fixed.kind;
        match link.read_config(0, kind.config_size()) {
            Ok(config) => {
                // The backend decides how often it says so.
                static CHANGES: LogCounter = LogCounter::new(LOG_BURST);
                limited!(
                    info,
                    CHANGES,
                    "{}: backend reports a config change: {}",
                    self.shared.name,
                    kind.describe_config(&config)
                );
                self.info.config = config.clone();
                self.apply_backend_config(&config);
            }
            Err(e) => {
                static FAILED: LogCounter = LogCounter::new(LOG_BURST);
                limited!(warn, FAILED, "{}: {}", self.shared.name, error_chain(&e));
                if e.is_disconnect() {
                    self.lost("GET_CONFIG failed");
                }
            }
        }
    }

    /// Logs why a backend cannot be used, once per distinct reason while lost.
    fn refuse(&mut self, msg: String) {
        if let LinkState::Lost { last_refusal, .. } = &mut self.link {
            if last_refusal.as_deref() != Some(msg.as_str()) {
                log::error!("{}: {msg}", self.shared.name);
                *last_refusal = Some(msg);
            }
        }
    }

    /// One reconnect attempt (or giving up when the limit has passed).
    fn try_reconnect(&mut self) {
        let LinkState::Lost {
            since,
            at,
            attempts,
            ..
        } = &mut self.link
        else {
            return;
        };
        let (since, at) = (*since, *at);
        if let WaitLimit::For(limit) = self.fixed.reconnect {
            if since.elapsed() >= limit {
                self.link = LinkState::GaveUp { at, after: limit };
                self.publish();
                self.shared.needs_reset(&format!(
                    "backend {} not back after {limit:?}; giving up",
                    self.fixed.socket.display()
                ));
                return;
            }
        }
        *attempts += 1;
        self.publish();
        let link = match self.connector.connect(self.fixed.kind) {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(
                e @ (FrontendError::Connect { .. }
                | FrontendError::PeerNotAllowed { .. }
                | FrontendError::PeerCredentials { .. }),
            ) => {
                self.refuse(error_chain(&e));
                return;
            }
            Err(e) => {
                // Every RECONNECT_INTERVAL, for as long as the backend is gone.
                static ATTEMPTS: LogCounter = LogCounter::new(LOG_BURST);
                limited!(
                    debug,
                    ATTEMPTS,
                    "{}: reconnect attempt: {}",
                    self.shared.name,
                    error_chain(&e)
                );
                return;
            }
        };
        // The handshake uses this device's type (so a third-party backend attached with an
        // explicit type comes back too); whether the backend is still the same kind of device
        // is judged by detection: what its features say now against what they said first.
        let new = link.info().clone();
        let was = super::detect::type_from_features(self.info.features).ok();
        let now = super::detect::type_from_features(new.features).ok();
        let kind = self.fixed.kind;
        let socket = self.fixed.socket.display().to_string();
        if now != was {
            let what = now.map_or("an unrecognisable".to_string(), |k| format!("a {k}"));
            self.refuse(format!(
                "backend {socket} came back as {what} device, but this is a {kind} device; not using it"
            ));
            return;
        }
        if let Some(s) = &self.setup {
            let missing = s.acked_features & !new.features;
            if missing != 0 {
                self.refuse(format!(
                    "backend {socket} came back without features {missing:#x} the guest uses; not using it"
                ));
                return;
            }
        }
        let waited = since.elapsed();
        if new.config != self.info.config {
            static CHANGED: LogCounter = LogCounter::new(LOG_BURST);
            limited!(
                warn,
                CHANGED,
                "{}: backend {socket} came back with a different {kind} config: {} (was {}); telling the guest",
                self.shared.name,
                kind.describe_config(&new.config),
                kind.describe_config(&self.info.config)
            );
            self.apply_backend_config(&new.config);
        }
        self.info = new;
        self.shared.set_cutter(link.cutter());
        let mut link = link;
        for (offset, data) in &self.guest_config {
            let stats = &self.shared.stats;
            match link.set_config(*offset, data) {
                Ok(()) => stats.config_writes.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    log::warn!(
                        "{}: replaying a config write: {}",
                        self.shared.name,
                        error_chain(&e)
                    );
                    stats.config_writes_failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        self.link = LinkState::Connected {
            link,
            running: false,
        };
        self.shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        self.publish();
        static BACK: LogCounter = LogCounter::new(LOG_BURST);
        limited!(
            info,
            BACK,
            "{}: backend {socket} is back after {waited:?}",
            self.shared.name
        );
        if self.setup.is_some() {
            self.start_rings(true);
        }
    }
}

mod commands;
pub use commands::{ConfigRefresh, DeviceCommandError};

#[cfg(test)]
mod tests;
