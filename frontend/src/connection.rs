//! One connection to a vhost-user backend: the handshake, config reads and writes, the
//! inflight area, starting and stopping the rings.
//!
//! Every request blocks until the backend answers (bounded by the connection's
//! [`Watchdog`]), so a VMM runs this on a device thread, never on a vCPU thread.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, FrontendReqHandler, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::error::FrontendError;
use crate::features::{wanted_protocol_features, PROTOCOL_FEATURES, VERSION_1};
use crate::types::{self, DetectError, DeviceType};
use crate::watchdog::{Watchdog, WatchdogHandle};

/// How long one reply may take before the backend counts as hung (the connection is then
/// cut; a VMM re-establishes it).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the handshake's replies may take (a socket that is not vhost-user says nothing).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most queues hype asks a backend for (by default).
pub const MAX_QUEUES: u16 = 16;

/// How a handshake is run.
#[derive(Debug, Clone)]
pub struct HandshakeOptions {
    /// Most queues this frontend sets up (ring indexes are checked against it until
    /// GET_QUEUE_NUM tells the backend's count).
    pub max_queues: u64,
    /// Protocol features to ack among those offered.
    pub protocol_features: VhostUserProtocolFeatures,
    /// Protocol features the backend must offer (acked whatever `protocol_features` says).
    /// The VMM needs CONFIG: it shows the guest the backend's device config.
    pub required_protocol_features: VhostUserProtocolFeatures,
    /// How long each handshake reply may take.
    pub timeout: Duration,
    /// The virtio-fs tag to show the guest when an `fs` backend does not offer its config
    /// (virtiofsd leaves the tag to the frontend).
    pub fs_tag: Option<String>,
    /// Users besides this process's own and root whose backends may be given guest memory
    /// (the peer's SO_PEERCRED uid is checked before anything is sent, see [`crate::peer`]).
    pub allowed_peer_uids: Vec<u32>,
}

impl Default for HandshakeOptions {
    /// What the VMM uses: [`MAX_QUEUES`], [`wanted_protocol_features`], CONFIG required,
    /// [`HANDSHAKE_TIMEOUT`].
    fn default() -> Self {
        HandshakeOptions {
            max_queues: u64::from(MAX_QUEUES),
            protocol_features: wanted_protocol_features(),
            required_protocol_features: VhostUserProtocolFeatures::CONFIG,
            timeout: HANDSHAKE_TIMEOUT,
            fs_tag: None,
            allowed_peer_uids: Vec::new(),
        }
    }
}

/// What the backend told the frontend during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// GET_FEATURES (bit 30 included).
    pub features: u64,
    /// GET_PROTOCOL_FEATURES: what the backend offers.
    pub offered_protocol_features: VhostUserProtocolFeatures,
    /// The protocol features acked.
    pub protocol_features: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM, if MQ was acked.
    pub queue_num: Option<u64>,
    /// Device config from the handshake's GET_CONFIG at offset 0 (empty if none was asked).
    pub config: Vec<u8>,
}

/// The device type a backend was taken for, from [`Connection::handshake_device`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// The type (learned or given).
    pub kind: DeviceType,
    /// Doubts about an explicitly given type (its features or config look like another
    /// type's), for the caller to log.
    pub doubt: Option<String>,
}

/// One ring as the backend gets it: host (frontend) virtual addresses and eventfds.
#[derive(Debug, Clone, Copy)]
pub struct Ring<'a> {
    /// Queue index.
    pub index: u16,
    /// Entries.
    pub size: u16,
    /// Descriptor table, frontend virtual address.
    pub desc: u64,
    /// Avail ring, frontend virtual address.
    pub avail: u64,
    /// Used ring, frontend virtual address.
    pub used: u64,
    /// SET_VRING_BASE: the avail index the backend starts at.
    pub base: u16,
    /// Kick eventfd (driver to device).
    pub kick: &'a EventFd,
    /// Call eventfd (device to driver).
    pub call: &'a EventFd,
}

/// The inflight-tracking area a backend handed out (INFLIGHT_SHMFD): kept by the frontend so
/// a restarted backend can find the requests it had not completed.
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

/// Takes the backend's requests on the BACKEND_REQ channel: only config-change notifications
/// are acted on (they set a flag the owner of the connection looks at).
#[derive(Debug, Default)]
pub struct BackendRequests {
    config_changed: AtomicBool,
}

impl BackendRequests {
    /// Whether a config change was reported since the last call.
    pub fn take_config_change(&self) -> bool {
        self.config_changed.swap(false, Ordering::AcqRel)
    }
}

impl vhost::vhost_user::VhostUserFrontendReqHandler for BackendRequests {
    fn handle_config_change(&self) -> vhost::vhost_user::HandlerResult<u64> {
        self.config_changed.store(true, Ordering::Release);
        Ok(0)
    }
}

/// One connection to a backend.
pub struct Connection {
    path: PathBuf,
    backend_requests: Option<(FrontendReqHandler<BackendRequests>, Arc<BackendRequests>)>,
    watchdog: WatchdogHandle,
    frontend: Frontend,
    info: BackendInfo,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("path", &self.path)
            .field("info", &self.info)
            .finish()
    }
}

impl Connection {
    /// Runs the handshake on a connected socket: first the listener's credentials are
    /// checked ([`crate::peer::check_peer`] with `opts.allowed_peer_uids`), then SET_OWNER, GET_FEATURES (VERSION_1 and
    /// bit 30 required), GET/SET_PROTOCOL_FEATURES (with the required ones), the BACKEND_REQ
    /// channel when acked, GET_QUEUE_NUM when MQ is acked. The device config is not read:
    /// [`Connection::fetch_config`] is the last step, once the caller knows its size.
    pub fn handshake(
        path: &Path,
        stream: UnixStream,
        opts: &HandshakeOptions,
    ) -> Result<Connection, FrontendError> {
        crate::peer::check_peer(path, &stream, &opts.allowed_peer_uids)?;
        let path = path.to_owned();
        let watchdog = Watchdog::spawn(&stream).map_err(|source| FrontendError::Watchdog {
            path: path.clone(),
            source,
        })?;
        let _armed = watchdog.arm(opts.timeout);
        let mut fe = Frontend::from_stream(stream, opts.max_queues);
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
        if features & PROTOCOL_FEATURES == 0 {
            return Err(unsupported(format!(
                "features {features:#x} lack VHOST_USER_F_PROTOCOL_FEATURES (hype needs protocol features)"
            )));
        }
        if features & VERSION_1 == 0 {
            return Err(unsupported(format!(
                "features {features:#x} lack VIRTIO_F_VERSION_1 (virtio-mmio version 2 is modern only)"
            )));
        }
        let offered = fe
            .get_protocol_features()
            .map_err(not_vu("GET_PROTOCOL_FEATURES"))?;
        let required = opts.required_protocol_features;
        let acked = offered & (opts.protocol_features | required);
        if !acked.contains(required) {
            let missing: Vec<&str> = (required - acked).iter_names().map(|(n, _)| n).collect();
            return Err(unsupported(format!(
                "protocol features {:#x} lack {}",
                offered.bits(),
                missing.join(", ")
            )));
        }
        fe.set_protocol_features(acked)
            .map_err(not_vu("SET_PROTOCOL_FEATURES"))?;
        let reply_ack = acked.contains(VhostUserProtocolFeatures::REPLY_ACK);
        if reply_ack {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let backend_requests = if acked.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let state = Arc::new(BackendRequests::default());
            let mut h = FrontendReqHandler::new(state.clone())
                .map_err(|e| not_vu("SET_BACKEND_REQ_FD")(vhost::Error::VhostUserProtocol(e)))?;
            h.set_reply_ack_flag(reply_ack);
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
        drop(_armed);
        Ok(Connection {
            path,
            backend_requests,
            watchdog,
            frontend: fe,
            info: BackendInfo {
                features,
                offered_protocol_features: offered,
                protocol_features: acked,
                queue_num,
                config: Vec::new(),
            },
            handshake_timeout: opts.timeout,
        })
    }

    /// The handshake of a device of type `kind` (learned from the features when `None`, see
    /// [`types`]): [`Connection::handshake`], then GET_CONFIG of the type's config size and
    /// the type's config check. A learned type must pass the check; a given one only earns a
    /// [`Detected::doubt`]. A given type whose config the frontend can build
    /// ([`DeviceType::config_optional`]) does not need the CONFIG protocol feature: without
    /// it (or with no config to read) the config is [`DeviceType::frontend_config`].
    pub fn handshake_device(
        path: &Path,
        stream: UnixStream,
        opts: &HandshakeOptions,
        kind: Option<DeviceType>,
    ) -> Result<(Connection, Detected), FrontendError> {
        let optional = kind.is_some_and(DeviceType::config_optional);
        let mut conn = if optional {
            let mut relaxed = opts.clone();
            relaxed
                .required_protocol_features
                .remove(VhostUserProtocolFeatures::CONFIG);
            Connection::handshake(path, stream, &relaxed)?
        } else {
            Connection::handshake(path, stream, opts)?
        };
        let features = conn.info.features;
        let explicit = kind.is_some();
        let mut doubt = None;
        let kind = match (kind, types::type_from_features(features)) {
            (Some(k), Ok(d)) if k != d => {
                doubt = Some(format!("given as {k} but its features look like {d}"));
                k
            }
            (Some(k), _) => k,
            (None, Ok(d)) => d,
            (None, Err(reason)) => {
                return Err(FrontendError::Detect {
                    path: path.to_owned(),
                    reason,
                })
            }
        };
        let has_config = conn
            .info
            .protocol_features
            .contains(VhostUserProtocolFeatures::CONFIG);
        let config = if optional && (!has_config || kind.config_size() == 0) {
            let built = kind.frontend_config(opts.fs_tag.as_deref());
            let built = built.map_err(|what| FrontendError::Unsupported {
                path: path.to_owned(),
                what,
            })?;
            let config = built.unwrap_or_default();
            conn.info.config = config.clone();
            config
        } else {
            conn.fetch_config(kind.config_size())?
        };
        if let Err(reason) = kind.check_config(features, &config, conn.info.queue_num) {
            if !explicit {
                return Err(FrontendError::Detect {
                    path: path.to_owned(),
                    reason: DetectError::ConfigMismatch { kind, reason },
                });
            }
            doubt.get_or_insert(format!("its {kind} config looks odd: {reason}"));
        }
        Ok((conn, Detected { kind, doubt }))
    }

    /// The handshake's last step: GET_CONFIG of `size` bytes at offset 0, kept in
    /// [`BackendInfo::config`]. Failures count as "not a vhost-user backend".
    pub fn fetch_config(&mut self, size: u32) -> Result<Vec<u8>, FrontendError> {
        let _armed = self.watchdog.arm(self.handshake_timeout);
        let r = self.frontend.get_config(
            0,
            size,
            VhostUserConfigFlags::empty(),
            &vec![0u8; size as usize],
        );
        let (_, config) = r.map_err(|source| FrontendError::NotVhostUser {
            path: self.path.clone(),
            op: "GET_CONFIG",
            source,
        })?;
        self.info.config = config.clone();
        Ok(config)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the backend said in the handshake.
    pub fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// The raw `vhost` frontend, for tests that send their own messages.
    pub fn frontend_mut(&mut self) -> &mut Frontend {
        &mut self.frontend
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

    /// The socket's descriptor (to watch it for hang-ups).
    pub fn raw_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
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

    fn req(&self, op: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError + '_ {
        move |source| FrontendError::Request {
            path: self.path.clone(),
            op,
            source,
        }
    }

    /// GET_CONFIG of `size` bytes at `offset`.
    pub fn read_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, FrontendError> {
        let _armed = self.watchdog.arm(REPLY_TIMEOUT);
        let r = self.frontend.get_config(
            offset,
            size,
            VhostUserConfigFlags::empty(),
            &vec![0u8; size as usize],
        );
        let (_, config) = r.map_err(self.req("GET_CONFIG"))?;
        Ok(config)
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

    /// GET_INFLIGHT_FD for `num_queues` queues of `queue_size`, if INFLIGHT_SHMFD was acked.
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

    /// Starts the rings: SET_FEATURES (`acked_features`, plus bit 30), SET_MEM_TABLE,
    /// SET_INFLIGHT_FD, SET_VRING_NUM for every ring, then per ring ADDR/BASE/CALL/KICK, and
    /// SET_VRING_ENABLE for every ring.
    pub fn start(
        &mut self,
        regions: &[VhostUserMemoryRegionInfo],
        acked_features: u64,
        inflight: Option<&InflightArea>,
        rings: &[Ring<'_>],
    ) -> Result<(), FrontendError> {
        let _armed = self.watchdog.arm(REPLY_TIMEOUT);
        let features = acked_features | (self.info.features & PROTOCOL_FEATURES);
        let r = self.frontend.set_features(features);
        r.map_err(self.req("SET_FEATURES"))?;
        let r = self.frontend.set_mem_table(regions);
        r.map_err(self.req("SET_MEM_TABLE"))?;
        if let Some(area) = inflight {
            let r = self
                .frontend
                .set_inflight_fd(&area.info, area.file.as_raw_fd());
            r.map_err(self.req("SET_INFLIGHT_FD"))?;
        }
        for ring in rings {
            let r = self
                .frontend
                .set_vring_num(usize::from(ring.index), ring.size);
            r.map_err(self.req("SET_VRING_NUM"))?;
        }
        for ring in rings {
            let q = usize::from(ring.index);
            let cfg = VringConfigData {
                queue_max_size: ring.size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: ring.desc,
                used_ring_addr: ring.used,
                avail_ring_addr: ring.avail,
                log_addr: None,
            };
            let r = self.frontend.set_vring_addr(q, &cfg);
            r.map_err(self.req("SET_VRING_ADDR"))?;
            let r = self.frontend.set_vring_base(q, ring.base);
            r.map_err(self.req("SET_VRING_BASE"))?;
            let r = self.frontend.set_vring_call(q, ring.call);
            r.map_err(self.req("SET_VRING_CALL"))?;
            let r = self.frontend.set_vring_kick(q, ring.kick);
            r.map_err(self.req("SET_VRING_KICK"))?;
        }
        for ring in rings {
            let r = self
                .frontend
                .set_vring_enable(usize::from(ring.index), true);
            r.map_err(self.req("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Stops the rings `queues` (SET_VRING_ENABLE 0, GET_VRING_BASE); returns each ring's
    /// next avail index.
    pub fn stop(&mut self, queues: &[u16]) -> Result<Vec<u32>, FrontendError> {
        let _armed = self.watchdog.arm(REPLY_TIMEOUT);
        let mut bases = Vec::with_capacity(queues.len());
        for q in queues {
            let q = usize::from(*q);
            let r = self.frontend.set_vring_enable(q, false);
            r.map_err(self.req("SET_VRING_ENABLE"))?;
            let r = self.frontend.get_vring_base(q);
            bases.push(r.map_err(self.req("GET_VRING_BASE"))?);
        }
        Ok(bases)
    }
    /// Whether the backend's state can be saved and loaded (DEVICE_STATE was acked).
    pub fn has_device_state(&self) -> bool {
        self.info
            .protocol_features
            .contains(VhostUserProtocolFeatures::DEVICE_STATE)
    }

    /// Saves the backend's state (its rings stopped): SET_DEVICE_STATE_FD(SAVE, STOPPED)
    /// with the write end of a pipe, reads the pipe to EOF, then CHECK_DEVICE_STATE.
    /// `None` when the backend does not offer DEVICE_STATE. More than `limit` bytes is
    /// refused.
    pub fn save_state(&mut self, limit: u64) -> Result<Option<Vec<u8>>, FrontendError> {
        if !self.has_device_state() {
            return Ok(None);
        }
        let (rd, wr) = state_pipe().map_err(self.state_err("pipe2"))?;
        set_nonblocking(&rd).map_err(self.state_err("fcntl"))?;
        let reply = {
            let _armed = self.watchdog.arm(REPLY_TIMEOUT);
            let r = self.frontend.set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
                wr,
            );
            r.map_err(self.req("SET_DEVICE_STATE_FD"))?
        };
        // A backend may answer with its own channel instead of using the pipe.
        let source: OwnedFd = match reply {
            Some(file) => file.into(),
            None => rd,
        };
        let mut data = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            wait_fd(&source, libc::POLLIN)
                .map_err(self.state_err("waiting for the backend's state"))?;
            // SAFETY: `buf` is writable for its length; `source` is an open descriptor.
            let n = unsafe { libc::read(source.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::WouldBlock {
                    continue;
                }
                return Err(self.state_err("reading the backend's state")(e));
            }
            let n = n as usize; // n >= 0, at most buf.len()
            if n == 0 {
                break;
            }
            if data.len() as u64 + n as u64 > limit {
                return Err(FrontendError::StateTooLarge {
                    path: self.path.clone(),
                    limit,
                });
            }
            data.extend_from_slice(&buf[..n]);
        }
        drop(source);
        let _armed = self.watchdog.arm(REPLY_TIMEOUT);
        let r = self.frontend.check_device_state();
        r.map_err(self.req("CHECK_DEVICE_STATE"))?;
        Ok(Some(data))
    }

    /// Loads `state` (from [`save_state`](Self::save_state)) into the backend before its
    /// rings start: SET_DEVICE_STATE_FD(LOAD, STOPPED) with the read end of a pipe, writes
    /// `state` and closes the pipe, then CHECK_DEVICE_STATE (the backend's verdict on what it
    /// read).
    pub fn load_state(&mut self, state: &[u8]) -> Result<(), FrontendError> {
        if !self.has_device_state() {
            return Err(FrontendError::Unsupported {
                path: self.path.clone(),
                what: "the snapshot has state for this device and the backend does not offer DEVICE_STATE".into(),
            });
        }
        let (rd, wr) = state_pipe().map_err(self.state_err("pipe2"))?;
        set_nonblocking(&wr).map_err(self.state_err("fcntl"))?;
        let reply = {
            let _armed = self.watchdog.arm(REPLY_TIMEOUT);
            let r = self.frontend.set_device_state_fd(
                VhostTransferStateDirection::LOAD,
                VhostTransferStatePhase::STOPPED,
                rd,
            );
            r.map_err(self.req("SET_DEVICE_STATE_FD"))?
        };
        let sink: OwnedFd = match reply {
            Some(file) => file.into(),
            None => wr,
        };
        let mut rest = state;
        while !rest.is_empty() {
            wait_fd(&sink, libc::POLLOUT)
                .map_err(self.state_err("waiting for the backend to read"))?;
            // SAFETY: `rest` is readable for its length; `sink` is an open descriptor.
            let n = unsafe { libc::write(sink.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::WouldBlock {
                    continue;
                }
                return Err(self.state_err("writing the state to the backend")(e));
            }
            rest = rest.get(n as usize..).unwrap_or_default(); // n >= 0, at most rest.len()
        }
        drop(sink);
        let _armed = self.watchdog.arm(REPLY_TIMEOUT);
        let r = self.frontend.check_device_state();
        r.map_err(self.req("CHECK_DEVICE_STATE"))
    }

    fn state_err(&self, what: &'static str) -> impl FnOnce(io::Error) -> FrontendError + '_ {
        move |source| FrontendError::StateTransfer {
            path: self.path.clone(),
            what,
            source,
        }
    }
}

/// A pipe for DEVICE_STATE (read end, write end), close-on-exec. The end the frontend keeps
/// is made non-blocking ([`set_nonblocking`]) and each transfer step waits with [`wait_fd`],
/// bounded by [`REPLY_TIMEOUT`]; the backend's end stays blocking.
fn state_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both are new descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Waits until `fd` is ready for `events` (or hung up), at most [`REPLY_TIMEOUT`].
fn wait_fd(fd: &OwnedFd, events: libc::c_short) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = REPLY_TIMEOUT.as_millis().min(i32::MAX as u128) as libc::c_int;
    loop {
        // SAFETY: `p` is one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return Ok(());
        }
        if r == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no progress"));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sets O_NONBLOCK on `fd` (its own file description: the other end of a pipe is unaffected).
fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an open descriptor; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
