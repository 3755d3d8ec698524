//! The VMM's vhost-user frontend for one backend: connecting (waiting for the socket),
//! the handshake, starting the rings, stopping them, config writes.
//!
//! Everything here blocks on the backend, so it runs on the device's own thread, never on a
//! vCPU thread.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::detect::{self, DetectError, DeviceType};
use crate::memory::GuestMemoryMmap;

/// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30): never a guest feature.
pub const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// How long one reply may take before the backend counts as hung (the connection is then
/// dropped and re-established).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the handshake's replies may take (a socket that is not vhost-user says nothing).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most queues hype asks a backend for.
pub const MAX_QUEUES: u16 = 16;

/// Protocol features hype uses when offered.
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::BACKEND_REQ
}

/// Takes the backend's requests on the BACKEND_REQ channel: only config-change notifications
/// are acted on (they set a flag the device thread looks at).
#[derive(Debug, Default)]
pub struct BackendRequests {
    config_changed: std::sync::atomic::AtomicBool,
}

impl BackendRequests {
    /// Whether a config change was reported since the last call.
    pub fn take_config_change(&self) -> bool {
        self.config_changed
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}

impl vhost::vhost_user::VhostUserFrontendReqHandler for BackendRequests {
    fn handle_config_change(&self) -> vhost::vhost_user::HandlerResult<u64> {
        self.config_changed
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(0)
    }
}

/// Errors talking to a backend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The socket did not appear (or refused connections) until the deadline.
    #[error("backend socket {path} was not there after waiting {waited:?}")]
    WaitTimeout {
        /// Socket path.
        path: PathBuf,
        /// How long hype waited.
        waited: Duration,
    },
    /// connect() failed for another reason than "not there yet".
    #[error("cannot connect to backend socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// A vhost-user request failed.
    #[error("backend {path}: {op} failed: {source}")]
    Request {
        /// Socket path.
        path: PathBuf,
        /// The request.
        op: &'static str,
        /// Underlying error.
        source: vhost::Error,
    },
    /// The backend does not speak vhost-user (no answer, or a broken one, during the handshake).
    #[error("{path} is not a vhost-user backend ({op}: {source})")]
    NotVhostUser {
        /// Socket path.
        path: PathBuf,
        /// The first request that failed.
        op: &'static str,
        /// Underlying error.
        source: vhost::Error,
    },
    /// The backend lacks something hype needs.
    #[error("backend {path}: {what}")]
    Unsupported {
        /// Socket path.
        path: PathBuf,
        /// What is missing.
        what: String,
    },
    /// The device type could not be learned.
    #[error("backend {path}: {source}")]
    Detect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: DetectError,
    },
    /// A ring the guest gave is not in guest RAM.
    #[error("queue {queue}: {what} at {gpa:#x} ({len} bytes) is not in guest RAM")]
    BadRing {
        /// Queue index.
        queue: u16,
        /// Which part.
        what: &'static str,
        /// Guest physical address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Guest memory cannot be shared.
    #[error("guest memory cannot be shared with a backend: {0}")]
    Memory(#[source] vhost::Error),
}

impl FrontendError {
    /// Whether the connection is unusable after this error (the backend went away, hung or
    /// broke the protocol), as opposed to the backend refusing one request.
    pub fn is_disconnect(&self) -> bool {
        use vhost::vhost_user::Error as E;
        match self {
            FrontendError::Request { source, .. } | FrontendError::NotVhostUser { source, .. } => {
                match source {
                    vhost::Error::VhostUserProtocol(e) => !matches!(
                        e,
                        E::BackendInternalError
                            | E::InvalidParam
                            | E::InactiveFeature(_)
                            | E::InactiveOperation(_)
                            | E::InvalidOperation(_)
                            | E::FeatureMismatch
                    ),
                    _ => false,
                }
            }
            _ => false,
        }
    }
}

/// What the backend told hype during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// Device type (learned or given).
    pub kind: DeviceType,
    /// GET_FEATURES (bit 30 included).
    pub features: u64,
    /// Protocol features acked.
    pub protocol_features: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM, if MQ was acked.
    pub queue_num: Option<u64>,
    /// Device config from GET_CONFIG at offset 0.
    pub config: Vec<u8>,
    /// Doubts about an explicitly given type (its features or config look like another
    /// type's), for the caller to log.
    pub doubt: Option<String>,
}

/// One ring as the backend gets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSetup {
    /// Queue index.
    pub index: u16,
    /// Entries.
    pub size: u16,
    /// Descriptor table, guest physical.
    pub desc: u64,
    /// Avail ring, guest physical.
    pub avail: u64,
    /// Used ring, guest physical.
    pub used: u64,
    /// Descriptor table, VMM virtual address.
    pub desc_hva: u64,
    /// Avail ring, VMM virtual address.
    pub avail_hva: u64,
    /// Used ring, VMM virtual address.
    pub used_hva: u64,
}

/// The inflight-tracking area a backend handed out (INFLIGHT_SHMFD): kept by the VMM so a
/// restarted backend can find the requests it had not completed.
pub struct InflightArea {
    /// What GET_INFLIGHT_FD answered.
    pub info: VhostUserInflight,
    /// The shared memory file.
    pub file: File,
}

impl std::fmt::Debug for InflightArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightArea")
            .field("mmap_size", &self.info.mmap_size)
            .field("num_queues", &self.info.num_queues)
            .field("queue_size", &self.info.queue_size)
            .finish()
    }
}

/// Checks that `len` bytes at `gpa` lie in one RAM region and returns their host address.
pub fn host_range(
    mem: &GuestMemoryMmap,
    queue: u16,
    what: &'static str,
    gpa: u64,
    len: u64,
) -> Result<u64, FrontendError> {
    let bad = || FrontendError::BadRing {
        queue,
        what,
        gpa,
        len,
    };
    let region = mem.find_region(GuestAddress(gpa)).ok_or_else(bad)?;
    let end = gpa.checked_add(len).ok_or_else(bad)?;
    let region_end = region.start_addr().raw_value() + region.len();
    if end > region_end {
        return Err(bad());
    }
    mem.get_host_address(GuestAddress(gpa))
        .map(|p| p as u64)
        .map_err(|_| bad())
}

/// One connection to a backend.
pub struct Connection {
    path: PathBuf,
    backend_requests: Option<(
        vhost::vhost_user::FrontendReqHandler<BackendRequests>,
        Arc<BackendRequests>,
    )>,
    watchdog: WatchdogHandle,
    frontend: Frontend,
    info: BackendInfo,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("path", &self.path)
            .field("info", &self.info)
            .finish()
    }
}

/// Whether a connect() error means "the backend is not there (yet)".
fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

/// Connects once; `Ok(None)` when the backend is not there (yet).
pub fn try_connect(path: &Path) -> Result<Option<UnixStream>, FrontendError> {
    use std::os::unix::fs::FileTypeExt;
    // connect() to something that is not a socket says "refused", like a socket whose
    // backend is not listening yet: tell them apart, or hype would wait for a file forever.
    if let Ok(m) = std::fs::metadata(path) {
        if !m.file_type().is_socket() {
            return Err(FrontendError::Connect {
                path: path.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a Unix socket"),
            });
        }
    }
    match UnixStream::connect(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if is_absent(&e) => Ok(None),
        Err(source) => Err(FrontendError::Connect {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Connects to `path`, waiting for the socket to appear for at most `wait` (forever if
/// `None`), with a log line saying what it waits for.
pub fn connect_waiting(
    path: &Path,
    wait: Option<Duration>,
    what: &str,
) -> Result<UnixStream, FrontendError> {
    let start = Instant::now();
    let mut logged = false;
    loop {
        if let Some(s) = try_connect(path)? {
            if logged {
                log::info!(
                    "{what}: backend socket {} is there after {:?}",
                    path.display(),
                    start.elapsed()
                );
            }
            return Ok(s);
        }
        if wait.is_some_and(|w| start.elapsed() >= w) {
            return Err(FrontendError::WaitTimeout {
                path: path.to_owned(),
                waited: start.elapsed(),
            });
        }
        if !logged {
            let limit = match wait {
                Some(w) => format!("up to {w:?}"),
                None => "with no time limit (--device-wait sets one)".into(),
            };
            log::info!(
                "{what}: waiting for backend socket {} {limit}",
                path.display()
            );
            logged = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Connection {
    /// Runs the handshake on a connected socket: SET_OWNER, features, protocol features,
    /// queue count, device type and GET_CONFIG.
    pub fn handshake(
        path: &Path,
        stream: UnixStream,
        kind: Option<DeviceType>,
    ) -> Result<Connection, FrontendError> {
        let path = path.to_owned();
        let watchdog = Watchdog::spawn(&stream).map_err(|source| FrontendError::Connect {
            path: path.clone(),
            source,
        })?;
        let _armed = watchdog.arm(HANDSHAKE_TIMEOUT);
        let mut fe = Frontend::from_stream(stream, u64::from(MAX_QUEUES));
        let not_vu = |op: &'static str| {
            let path = path.clone();
            move |source| FrontendError::NotVhostUser { path, op, source }
        };
        fe.set_owner().map_err(not_vu("SET_OWNER"))?;
        let features = fe.get_features().map_err(not_vu("GET_FEATURES"))?;
        let unsupported = |what: String| FrontendError::Unsupported {
            path: path.clone(),
            what,
        };
        if features & PROTOCOL_FEATURES_BIT == 0 {
            return Err(unsupported(format!(
                "features {features:#x} lack VHOST_USER_F_PROTOCOL_FEATURES (hype needs the CONFIG protocol feature)"
            )));
        }
        if features & super::mmio::F_VERSION_1 == 0 {
            return Err(unsupported(format!(
                "features {features:#x} lack VIRTIO_F_VERSION_1 (virtio-mmio version 2 is modern only)"
            )));
        }
        let offered = fe
            .get_protocol_features()
            .map_err(not_vu("GET_PROTOCOL_FEATURES"))?;
        let acked = offered & wanted_protocol_features();
        if !acked.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(unsupported(format!(
                "protocol features {:#x} lack CONFIG",
                offered.bits()
            )));
        }
        fe.set_protocol_features(acked)
            .map_err(not_vu("SET_PROTOCOL_FEATURES"))?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let backend_requests = if acked.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let state = Arc::new(BackendRequests::default());
            let mut h = vhost::vhost_user::FrontendReqHandler::new(state.clone())
                .map_err(|e| not_vu("SET_BACKEND_REQ_FD")(vhost::Error::VhostUserProtocol(e)))?;
            h.set_reply_ack_flag(acked.contains(VhostUserProtocolFeatures::REPLY_ACK));
            fe.set_backend_request_fd(&h.get_tx_raw_fd())
                .map_err(not_vu("SET_BACKEND_REQ_FD"))?;
            Some((h, state))
        } else {
            None
        };
        let queue_num = if acked.contains(VhostUserProtocolFeatures::MQ) {
            Some(fe.get_queue_num().map_err(not_vu("GET_QUEUE_NUM"))?)
        } else {
            None
        };
        let explicit = kind.is_some();
        let detected = detect::type_from_features(features);
        let mut doubt = None;
        let kind = match (kind, detected) {
            (Some(k), Ok(d)) if k != d => {
                doubt = Some(format!("given as {k} but its features look like {d}"));
                k
            }
            (Some(k), _) => k,
            (None, Ok(d)) => d,
            (None, Err(source)) => return Err(FrontendError::Detect { path, source }),
        };
        let size = kind.config_size();
        let (_, config) = fe
            .get_config(
                0,
                size,
                VhostUserConfigFlags::empty(),
                &vec![0u8; size as usize],
            )
            .map_err(not_vu("GET_CONFIG"))?;
        if let Err(reason) = kind.check_config(features, &config, queue_num) {
            if !explicit {
                return Err(FrontendError::Detect {
                    path,
                    source: DetectError::ConfigMismatch { kind, reason },
                });
            }
            doubt.get_or_insert(format!("its {kind} config looks odd: {reason}"));
        }
        drop(_armed);
        Ok(Connection {
            path,
            backend_requests,
            watchdog,
            frontend: fe,
            info: BackendInfo {
                kind,
                features,
                protocol_features: acked,
                queue_num,
                config,
                doubt,
            },
        })
    }

    /// What the backend said in the handshake.
    pub fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// A handle that can cut the connection from another thread (shutting it down makes any
    /// request in progress fail at once).
    pub fn cutter(&self) -> io::Result<UnixStream> {
        // SAFETY: the descriptor is the frontend's open socket for the duration of the call;
        // dup gives this process a new descriptor owned by the returned stream.
        let fd = unsafe { libc::dup(self.frontend.as_raw_fd()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }

    /// The BACKEND_REQ channel's descriptor, readable when the backend sent a request.
    pub fn backend_request_fd(&self) -> Option<RawFd> {
        self.backend_requests.as_ref().map(|(h, _)| h.as_raw_fd())
    }

    /// Serves one backend request; returns whether it reported a config change. A broken
    /// channel is closed (the main socket tells whether the backend is gone).
    pub fn handle_backend_request(&mut self) -> bool {
        let Some((h, state)) = &mut self.backend_requests else {
            return false;
        };
        if let Err(e) = h.handle_request() {
            log::warn!(
                "backend {}: request channel: {e}; closing it",
                self.path.display()
            );
            self.backend_requests = None;
            return false;
        }
        state.take_config_change()
    }

    /// GET_CONFIG of the device config again (after a config change).
    pub fn read_config(&mut self) -> Result<Vec<u8>, FrontendError> {
        let _armed = self.watchdog.arm(REPLY_TIMEOUT);
        let size = self.info.kind.config_size();
        let r = self.frontend.get_config(
            0,
            size,
            VhostUserConfigFlags::empty(),
            &vec![0u8; size as usize],
        );
        let (_, config) = r.map_err(self.req("GET_CONFIG"))?;
        self.info.config = config.clone();
        Ok(config)
    }

    /// The socket's descriptor (to watch it for hang-ups).
    pub fn raw_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    fn req(&self, op: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError + '_ {
        move |source| FrontendError::Request {
            path: self.path.clone(),
            op,
            source,
        }
    }

    /// GET_INFLIGHT_FD for `num_queues` queues of `queue_size`, if the backend offers it.
    pub fn get_inflight(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Option<InflightArea>, FrontendError> {
        if !self
            .info
            .protocol_features
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            return Ok(None);
        }
        let _armed = self.watchdog.arm(REPLY_TIMEOUT);
        let ask = VhostUserInflight::new(0, 0, num_queues, queue_size);
        let r = self.frontend.get_inflight_fd(&ask);
        let (info, file) = r.map_err(self.req("GET_INFLIGHT_FD"))?;
        Ok(Some(InflightArea { info, file }))
    }

    /// Starts the rings: SET_FEATURES, SET_MEM_TABLE, SET_INFLIGHT_FD, then per ring
    /// NUM/ADDR/BASE/CALL/KICK and ENABLE.
    pub fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        acked_features: u64,
        rings: &[(RingSetup, u16)],
        kicks: &[EventFd],
        calls: &[EventFd],
        inflight: Option<&InflightArea>,
    ) -> Result<(), FrontendError> {
        let _armed = self.watchdog.arm(REPLY_TIMEOUT);
        let features = acked_features | (self.info.features & PROTOCOL_FEATURES_BIT);
        let r = self.frontend.set_features(features);
        r.map_err(self.req("SET_FEATURES"))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<_, _>>()
            .map_err(FrontendError::Memory)?;
        let r = self.frontend.set_mem_table(&regions);
        r.map_err(self.req("SET_MEM_TABLE"))?;
        if let Some(area) = inflight {
            let r = self
                .frontend
                .set_inflight_fd(&area.info, area.file.as_raw_fd());
            r.map_err(self.req("SET_INFLIGHT_FD"))?;
        }
        for (ring, _) in rings {
            let q = usize::from(ring.index);
            let r = self.frontend.set_vring_num(q, ring.size);
            r.map_err(self.req("SET_VRING_NUM"))?;
        }
        for (ring, base) in rings {
            let q = usize::from(ring.index);
            let cfg = VringConfigData {
                queue_max_size: ring.size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: ring.desc_hva,
                used_ring_addr: ring.used_hva,
                avail_ring_addr: ring.avail_hva,
                log_addr: None,
            };
            let r = self.frontend.set_vring_addr(q, &cfg);
            r.map_err(self.req("SET_VRING_ADDR"))?;
            let r = self.frontend.set_vring_base(q, *base);
            r.map_err(self.req("SET_VRING_BASE"))?;
            let (Some(call), Some(kick)) = (calls.get(q), kicks.get(q)) else {
                return Err(FrontendError::Unsupported {
                    path: self.path.clone(),
                    what: format!("queue {q} has no eventfds"),
                });
            };
            let r = self.frontend.set_vring_call(q, call);
            r.map_err(self.req("SET_VRING_CALL"))?;
            let r = self.frontend.set_vring_kick(q, kick);
            r.map_err(self.req("SET_VRING_KICK"))?;
        }
        for (ring, _) in rings {
            let r = self
                .frontend
                .set_vring_enable(usize::from(ring.index), true);
            r.map_err(self.req("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Stops the rings (SET_VRING_ENABLE 0, GET_VRING_BASE); returns each ring's next avail
    /// index.
    pub fn stop(&mut self, rings: &[RingSetup]) -> Result<Vec<u32>, FrontendError> {
        let _armed = self.watchdog.arm(REPLY_TIMEOUT);
        let mut bases = Vec::with_capacity(rings.len());
        for ring in rings {
            let q = usize::from(ring.index);
            let r = self.frontend.set_vring_enable(q, false);
            r.map_err(self.req("SET_VRING_ENABLE"))?;
            let r = self.frontend.get_vring_base(q);
            bases.push(r.map_err(self.req("GET_VRING_BASE"))?);
        }
        Ok(bases)
    }

    /// SET_CONFIG of `data` at `offset` in the device config.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        let _armed = self.watchdog.arm(REPLY_TIMEOUT);
        // Flags 0: a write from the frontend (QEMU's VHOST_SET_CONFIG_TYPE_FRONTEND); 1 would
        // mean migration, which libvhost-user backends refuse.
        let r = self
            .frontend
            .set_config(offset, VhostUserConfigFlags::empty(), data);
        r.map_err(self.req("SET_CONFIG"))
    }
}

/// Cuts a connection whose backend does not answer in time.
///
/// The `vhost` crate retries reads that time out, so a socket timeout cannot bound a request.
/// Instead, while a request sequence is in progress a deadline is armed; if it passes, this
/// thread shuts the socket down, the pending read sees end-of-file and the request fails with
/// a disconnect error (the device thread then reconnects).
#[derive(Debug)]
pub struct Watchdog {
    state: Mutex<WatchState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct WatchState {
    deadline: Option<Instant>,
    closed: bool,
}

/// Owns a watchdog thread: dropping it ends the thread (and its copy of the socket).
#[derive(Debug)]
pub struct WatchdogHandle(Arc<Watchdog>);

impl std::ops::Deref for WatchdogHandle {
    type Target = Watchdog;
    fn deref(&self) -> &Watchdog {
        &self.0
    }
}

impl Drop for WatchdogHandle {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Disarms the watchdog when dropped.
pub struct Armed<'a>(&'a Watchdog);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.0.lock().deadline = None;
    }
}

impl Watchdog {
    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the watchdog thread for `sock`; it ends when the handle is dropped.
    pub fn spawn(sock: &UnixStream) -> io::Result<WatchdogHandle> {
        let sock = sock.try_clone()?;
        let dog = Arc::new(Watchdog {
            state: Mutex::new(WatchState::default()),
            cv: Condvar::new(),
        });
        let d = dog.clone();
        std::thread::Builder::new()
            .name("vu-watchdog".into())
            .spawn(move || d.watch(sock))?;
        Ok(WatchdogHandle(dog))
    }

    fn watch(&self, sock: UnixStream) {
        let mut st = self.lock();
        loop {
            if st.closed {
                return;
            }
            match st.deadline {
                None => st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) if Instant::now() >= d => {
                    log::warn!(
                        "vhost-user backend did not answer in time; dropping the connection"
                    );
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                    st.deadline = None;
                }
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    st = self
                        .cv
                        .wait_timeout(st, left)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
        }
    }

    /// Arms a deadline `timeout` from now until the returned guard is dropped.
    pub fn arm(&self, timeout: Duration) -> Armed<'_> {
        self.lock().deadline = Some(Instant::now() + timeout);
        self.cv.notify_all();
        Armed(self)
    }

    /// Ends the thread.
    pub fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }
}
