//! A virtio-mmio device whose implementation is a vhost-user backend process.
//!
//! The vCPU side ([`VhostUserDevice::mmio_read`] / [`VhostUserDevice::mmio_write`]) only
//! touches the register file and posts commands; it never waits for the backend. The device's
//! own thread (the [`super::worker`]) owns the vhost-user connection: it starts and stops the
//! rings, forwards config writes, watches the socket for hang-ups and reconnects, replaying
//! the whole setup when the backend is back.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::frontend::{self, BackendInfo, Connection, FrontendError, HandshakeOptions};
use super::mmio::{self, DeviceModel, MmioTransport, TransportEvent};
use super::worker::{
    BackendStatus, Command, ConfigRefresh, DeviceCommandError, Shared, SocketConnector, Worker,
    WorkerSetup,
};
use super::DeviceType;
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
    /// The virtio-fs tag shown to the guest when an `fs` backend does not give its config.
    pub tag: Option<String>,
    /// A uid besides the VMM's own and root that may serve the socket (SO_PEERCRED is
    /// checked before guest memory is shared).
    pub allow_uid: Option<u32>,
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
            tag: None,
            allow_uid: None,
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
    #[error("{what}")]
    Os {
        /// What failed.
        what: &'static str,
        /// Underlying error.
        #[source]
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

    pub(crate) fn try_clone(&self) -> io::Result<Self> {
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

/// One vhost-user device behind a virtio-mmio window.
pub struct VhostUserDevice {
    shared: Arc<Shared>,
    events: DeviceEvents,
    commands: mpsc::Sender<Command>,
    wake: EventFd,
    worker: Option<JoinHandle<()>>,
    kind: DeviceType,
    backend: BackendInfo,
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
        // A stop signal (SIGTERM) while waiting ends the wait; the caller stops the VM.
        let stream = frontend::connect_waiting_until(
            &opts.socket,
            opts.wait.as_option(),
            name,
            &hype_base::signals::stop_requested,
        )?;
        let handshake = HandshakeOptions {
            fs_tag: opts.tag.clone(),
            allowed_peer_uids: opts.allow_uid.into_iter().collect(),
            ..HandshakeOptions::default()
        };
        let (conn, detected) =
            Connection::handshake_device(&opts.socket, stream, &handshake, opts.kind)?;
        let info = conn.info().clone();
        let kind = detected.kind;
        if let Some(d) = &detected.doubt {
            log::warn!(
                "{name}: backend {}: {d}; using it as {kind}",
                opts.socket.display(),
            );
        }
        let opt_err = |what: String| DeviceError::Options {
            path: opts.socket.clone(),
            what,
        };
        // Without MQ the backend does not say: the type's default (the spec's minimum).
        let backend_queues = info.queue_num.unwrap_or(u64::from(kind.default_queues()));
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
        // The queue count in the config (where the type has one) is what this device exposes,
        // not what the backend could.
        let mut config = info.config.clone();
        kind.set_queue_count(info.features, &mut config, num_queues);
        let model = DeviceModel {
            device_id: kind.virtio_id(),
            features: info.features & mmio::TRANSPORT_FEATURES,
            num_queues,
            queue_max,
            config,
            writable_config: kind.writable_config(),
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
        let config_irq = events
            .config
            .try_clone()
            .map_err(os("cannot clone eventfd"))?;
        let shared = Arc::new(Shared::new(
            name,
            MmioTransport::new(model),
            config_irq,
            conn.cutter().ok(),
        ));
        log::info!(
            "{name}: {kind} backend at {}: features {:#x}, {num_queues} queue(s) of up to {queue_max}, {}{}",
            opts.socket.display(),
            info.features,
            kind.describe_config(&info.config),
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
        let worker = Worker::new(
            shared.clone(),
            SocketConnector {
                path: opts.socket.clone(),
                fs_tag: opts.tag.clone(),
                allow_uid: opts.allow_uid,
            },
            WorkerSetup {
                socket: opts.socket.clone(),
                kind,
                reconnect: opts.reconnect,
                mem,
                events: worker_events,
                commands: rx,
                wake: wake.try_clone().map_err(os("cannot clone eventfd"))?,
            },
            conn,
        );
        let backend = info;
        let handle = std::thread::Builder::new()
            .name(format!(
                "vu-{}",
                name.split_whitespace().next().unwrap_or(name)
            ))
            .spawn(move || {
                crate::sandbox::enter(crate::sandbox::Thread::Device);
                worker.run()
            })
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
    pub fn backend(&self) -> &BackendInfo {
        &self.backend
    }

    /// Where the link to the backend stands (connected, reconnecting since when, gave up)
    /// and how often it was re-established.
    pub fn backend_status(&self) -> BackendStatus {
        self.shared.backend_status()
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

    /// Asks the device thread to fetch the config from the backend again and show the guest
    /// what changed (a disk that grew); waits up to `timeout` for the answer.
    pub fn refresh_config(&self, timeout: Duration) -> Result<ConfigRefresh, DeviceCommandError> {
        let (tx, rx) = mpsc::channel();
        self.ask(Command::RefreshConfig(tx), &rx, timeout)
    }

    /// Asks the device thread to move the device to the backend at `socket` (see
    /// [`super::worker`]'s `commands`); waits up to `timeout` for the answer.
    pub fn switch_backend(
        &self,
        socket: &Path,
        timeout: Duration,
    ) -> Result<(), DeviceCommandError> {
        let (reply, rx) = mpsc::channel();
        let cmd = Command::SwitchBackend {
            socket: socket.to_owned(),
            reply,
        };
        self.ask(cmd, &rx, timeout)
    }

    fn ask<T>(
        &self,
        cmd: Command,
        rx: &mpsc::Receiver<Result<T, DeviceCommandError>>,
        timeout: Duration,
    ) -> Result<T, DeviceCommandError> {
        self.commands
            .send(cmd)
            .map_err(|_| DeviceCommandError::Gone)?;
        let _ = self.wake.write(1);
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(DeviceCommandError::NoAnswer(timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(DeviceCommandError::Gone),
        }
    }

    /// Whether the guest's driver let the device go (see
    /// [`MmioTransport::driver_released`](super::mmio::MmioTransport::driver_released)).
    pub fn driver_released(&self) -> bool {
        self.shared.transport().driver_released()
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

/// How long a snapshot waits for a device thread to stop its rings and move the backend's
/// state (a RAM disk of some GiB takes seconds through a pipe).
pub const SNAPSHOT_STOP_TIMEOUT: Duration = Duration::from_secs(120);

impl VhostUserDevice {
    fn post(&self, cmd: Command) -> bool {
        let sent = self.commands.send(cmd).is_ok();
        if sent {
            let _ = self.wake.write(1);
        }
        sent
    }

    /// For a snapshot of the paused VM: stops the rings on the backend (GET_VRING_BASE, so it
    /// no longer touches guest memory) and returns the register file and each ring's position.
    /// The backend's own state comes with them where it offers DEVICE_STATE.
    pub fn snapshot_stop(
        &self,
    ) -> Result<(mmio::TransportState, super::worker::SnapshotStopped), String> {
        let (tx, rx) = mpsc::channel();
        if !self.post(Command::SnapshotStop(tx)) {
            return Err("the device thread has ended".into());
        }
        let stopped = rx.recv_timeout(SNAPSHOT_STOP_TIMEOUT).map_err(|_| {
            format!("the device thread did not answer within {SNAPSHOT_STOP_TIMEOUT:?}")
        })??;
        Ok((self.shared.transport().save_state(), stopped))
    }

    /// A device attached for a restored VM, before its rings start: loads the backend's
    /// saved state (DEVICE_STATE LOAD); an error when the backend refuses it or does not
    /// offer the feature.
    pub fn load_state(&self, state: Vec<u8>) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        if !self.post(Command::LoadState(state, tx)) {
            return Err("the device thread has ended".into());
        }
        rx.recv_timeout(SNAPSHOT_STOP_TIMEOUT).map_err(|_| {
            format!("the device thread did not answer within {SNAPSHOT_STOP_TIMEOUT:?}")
        })?
    }

    /// Starts the rings a snapshot stopped (the VM resumes).
    pub fn resume_rings(&self) {
        self.post(Command::ResumeRings);
    }

    /// A device attached for a restored VM: puts the snapshot's register file in place
    /// (refusing one that does not fit this backend). The rings start with
    /// [`VhostUserDevice::start_restored`].
    pub fn restore(&self, state: &mmio::TransportState) -> Result<(), String> {
        self.shared.transport().restore_state(state).map(|_| ())
    }

    /// Starts the rings of a restored, active device where the guest's used rings stand.
    /// Called once the interrupt controllers are restored, so that no completion interrupt is
    /// raised into a controller that is then overwritten.
    pub fn start_restored(&self) {
        let activation = self.shared.transport().restored_activation();
        if let Some(a) = activation {
            self.post(Command::Restore(a));
        }
    }
}

impl VhostUserDevice {
    /// Ends the device thread and closes the backend connection now, even while others still
    /// hold the device (e.g. a control API connection outliving the VM): the VM has ended, and
    /// its device must not reconnect to a backend that another VM uses next.
    pub fn shut_down(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.commands.send(Command::Shutdown);
        let _ = self.wake.write(1);
        // A device thread stuck in a request to a hung backend must not hold the VM's end.
        self.shared.cut_link();
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        self.shut_down();
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}
