//! The vhost-user frontend: connection, handshake, activation, stop and reconnect.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};

use crate::error::{Error, Result};
use crate::memory::GuestRam;
use crate::virtqueue::Virtqueue;

/// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30): a vhost-user bit, never a guest feature.
pub const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// `VIRTIO_F_ANY_LAYOUT`.
pub const VIRTIO_F_ANY_LAYOUT: u64 = 1 << 27;
/// `VIRTIO_F_IN_ORDER` (the driver copes with any completion order, so it may be acked).
pub const VIRTIO_F_IN_ORDER: u64 = 1 << 35;

/// Features this driver can ack: all device-specific bits (0..24) and the transport features
/// it implements. Packed rings, notification data, platform access etc. are never acked.
pub const DRIVER_SUPPORTED_FEATURES: u64 = ((1 << 24) - 1)
    | VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_F_ANY_LAYOUT
    | VIRTIO_F_IN_ORDER;

/// How the driver is set up. `Default` gives 1 queue of 128 entries in 64 MiB.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// Queues to set up (must not exceed what the backend reports with MQ).
    pub num_queues: usize,
    /// Entries per queue (power of two).
    pub queue_size: u16,
    /// Guest memory size in bytes (multiple of 4096); holds rings and all buffers.
    pub mem_size: u64,
    /// Mask applied to the backend's features before acking (e.g. `!VIRTIO_RING_F_EVENT_IDX`).
    /// The result is also limited to [`DRIVER_SUPPORTED_FEATURES`]; bit 30 is ORed back in
    /// when offered.
    pub feature_mask: u64,
    /// Protocol features to ack among those offered (MQ, REPLY_ACK, CONFIG by default).
    pub protocol_mask: VhostUserProtocolFeatures,
    /// Bytes of device config to fetch with GET_CONFIG at offset 0 (0 = skip).
    pub config_size: u32,
    /// Kick on every publish, ignoring EVENT_IDX / NO_NOTIFY suppression.
    pub always_kick: bool,
    /// How long to wait for the socket to appear and the handshake to succeed.
    pub connect_timeout: Duration,
    /// Default timeout for waiting on completions (used by the `blk` helpers).
    pub io_timeout: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: 128,
            mem_size: 64 << 20,
            feature_mask: u64::MAX,
            protocol_mask: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG,
            config_size: 0,
            always_kick: false,
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(10),
        }
    }
}

/// What the backend told us during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// GET_FEATURES result (virtio features offered, bit 30 included).
    pub features: u64,
    /// Protocol features offered (empty if bit 30 is not offered).
    pub protocol_features: VhostUserProtocolFeatures,
    /// Protocol features acked.
    pub acked_protocol_features: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM result, if MQ was acked.
    pub queue_num: Option<u64>,
    /// Device config from GET_CONFIG at offset 0 (empty if not fetched).
    pub config: Vec<u8>,
}

/// Where the rings resume after [`Driver::reconnect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayBase {
    /// The driver keeps what the device completed, treats every other in-flight chain as lost,
    /// sets used.idx = avail.idx, sends that as SET_VRING_BASE and makes the lost chains
    /// available again (same heads, same buffers). Works whatever the completion order.
    Resubmit,
    /// SET_VRING_BASE = used.idx found in memory: the device re-reads the avail ring from
    /// there (correct only for in-order devices; the cloud-hypervisor approach).
    UsedIdx,
    /// Explicit bases per queue (e.g. from [`Driver::stop_queues`]); rings are left as they are.
    Explicit(Vec<u16>),
}

/// A vhost-user frontend that plays the guest: guest RAM, queues and the control connection.
///
/// ```no_run
/// use hype_testkit::driver::{Driver, DriverOptions};
/// use hype_testkit::virtqueue::Segment;
/// # fn main() -> hype_testkit::error::Result<()> {
/// let mut drv = Driver::connect("/tmp/backend.sock", DriverOptions::default())?;
/// let q = drv.queue(0)?;
/// let head = q.submit(&[Segment::Readable(b"request"), Segment::Writable(512)])?;
/// let done = q.wait_for(head, std::time::Duration::from_secs(5))?;
/// println!("device wrote {} bytes: {:?}", done.len, &done.data[0][..done.len as usize]);
/// # Ok(()) }
/// ```
pub struct Driver {
    path: PathBuf,
    opts: DriverOptions,
    ram: Arc<GuestRam>,
    frontend: Option<Frontend>,
    info: DeviceInfo,
    acked_features: u64,
    queues: Vec<Virtqueue>,
    active: bool,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("path", &self.path)
            .field("connected", &self.frontend.is_some())
            .field("active", &self.active)
            .field("info", &self.info)
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("queues", &self.queues.len())
            .finish()
    }
}

fn vu(op: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::VhostUser { op, source }
}

fn vq(op: &'static str, queue: usize) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::VhostUserQueue { op, queue, source }
}

impl Driver {
    /// Connects (waiting for the socket), negotiates, and activates all queues.
    pub fn connect(path: impl AsRef<Path>, opts: DriverOptions) -> Result<Self> {
        let mut d = Self::connect_inactive(path, opts)?;
        d.activate()?;
        Ok(d)
    }

    /// Connects and negotiates (SET_OWNER .. GET_CONFIG) but does not activate the rings, so a
    /// test can inspect [`Driver::info`] or send its own messages first.
    pub fn connect_inactive(path: impl AsRef<Path>, opts: DriverOptions) -> Result<Self> {
        let ram = Arc::new(GuestRam::new(opts.mem_size)?);
        let mut queues = Vec::with_capacity(opts.num_queues);
        for i in 0..opts.num_queues {
            let index = u16::try_from(i).map_err(|_| Error::NoSuchQueue {
                index: i,
                count: usize::from(u16::MAX),
            })?;
            let mut q = Virtqueue::new(ram.clone(), index, opts.queue_size)?;
            q.set_always_kick(opts.always_kick);
            queues.push(q);
        }
        let path = path.as_ref().to_path_buf();
        let (frontend, info) = handshake(&path, &opts)?;
        Ok(Self {
            path,
            opts,
            ram,
            frontend: Some(frontend),
            info,
            acked_features: 0,
            queues,
            active: false,
        })
    }

    /// Sends SET_FEATURES, SET_MEM_TABLE and the per-queue ring setup (NUM, ADDR, BASE = the
    /// driver's avail idx, CALL, KICK, ENABLE).
    pub fn activate(&mut self) -> Result<()> {
        let bases: Vec<u16> = self.queues.iter().map(Virtqueue::avail_idx).collect();
        self.activate_with_bases(&bases)
    }

    fn activate_with_bases(&mut self, bases: &[u16]) -> Result<()> {
        let offered = self.info.features;
        let mut acked = offered & self.opts.feature_mask & DRIVER_SUPPORTED_FEATURES;
        let with_pf = offered & PROTOCOL_FEATURES_BIT != 0;
        let fe = self.frontend.as_mut().ok_or(Error::NotConnected)?;
        fe.set_features(if with_pf {
            acked | PROTOCOL_FEATURES_BIT
        } else {
            acked
        })
        .map_err(vu("SET_FEATURES"))?;
        acked &= !PROTOCOL_FEATURES_BIT;
        fe.set_mem_table(&self.ram.regions()?)
            .map_err(vu("SET_MEM_TABLE"))?;
        let event_idx = acked & VIRTIO_RING_F_EVENT_IDX != 0;
        let indirect = acked & VIRTIO_RING_F_INDIRECT_DESC != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.set_ring_features(event_idx, indirect);
            let size = q.size();
            fe.set_vring_num(i, size).map_err(vq("SET_VRING_NUM", i))?;
            let r = q.rings();
            let cfg = VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: self.ram.host_address(r.desc)?,
                used_ring_addr: self.ram.host_address(r.used)?,
                avail_ring_addr: self.ram.host_address(r.avail)?,
                log_addr: None,
            };
            fe.set_vring_addr(i, &cfg)
                .map_err(vq("SET_VRING_ADDR", i))?;
            let base = bases.get(i).copied().unwrap_or(0);
            fe.set_vring_base(i, base)
                .map_err(vq("SET_VRING_BASE", i))?;
            fe.set_vring_call(i, q.call_fd())
                .map_err(vq("SET_VRING_CALL", i))?;
            fe.set_vring_kick(i, q.kick_fd())
                .map_err(vq("SET_VRING_KICK", i))?;
            if with_pf {
                fe.set_vring_enable(i, true)
                    .map_err(vq("SET_VRING_ENABLE", i))?;
            }
        }
        self.acked_features = acked;
        self.active = true;
        Ok(())
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options this driver was created with.
    pub fn options(&self) -> &DriverOptions {
        &self.opts
    }

    /// What the backend reported during the handshake.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Virtio features acked at activation (without bit 30); 0 before activation.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the rings were activated.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Device config fetched at connect time (see [`DriverOptions::config_size`]).
    pub fn config(&self) -> &[u8] {
        &self.info.config
    }

    /// GET_CONFIG of `size` bytes at `offset` (needs the CONFIG protocol feature).
    pub fn read_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let fe = self.frontend.as_mut().ok_or(Error::NotConnected)?;
        let (_, payload) = fe
            .get_config(
                offset,
                size,
                VhostUserConfigFlags::WRITABLE,
                &vec![0u8; size as usize],
            )
            .map_err(vu("GET_CONFIG"))?;
        Ok(payload)
    }

    /// SET_CONFIG of `data` at `offset` (needs the CONFIG protocol feature).
    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        let fe = self.frontend.as_mut().ok_or(Error::NotConnected)?;
        fe.set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(vu("SET_CONFIG"))
    }

    /// The shared guest RAM (buffers for raw descriptors come from here).
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Number of queues set up.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Queue `index`.
    pub fn queue(&mut self, index: usize) -> Result<&mut Virtqueue> {
        let count = self.queues.len();
        self.queues
            .get_mut(index)
            .ok_or(Error::NoSuchQueue { index, count })
    }

    /// All queues, e.g. to drive each from its own scoped thread.
    pub fn queues_mut(&mut self) -> &mut [Virtqueue] {
        &mut self.queues
    }

    /// The raw `vhost` frontend, for tests that send their own messages.
    pub fn frontend(&mut self) -> Result<&mut Frontend> {
        self.frontend.as_mut().ok_or(Error::NotConnected)
    }

    /// Whether a connection is open.
    pub fn is_connected(&self) -> bool {
        self.frontend.is_some()
    }

    /// Stops every ring: SET_VRING_ENABLE 0 (when protocol features are in use) then
    /// GET_VRING_BASE. Returns the bases (the backend's next avail index per queue).
    pub fn stop_queues(&mut self) -> Result<Vec<u32>> {
        let with_pf = self.info.features & PROTOCOL_FEATURES_BIT != 0;
        let fe = self.frontend.as_mut().ok_or(Error::NotConnected)?;
        let mut bases = Vec::with_capacity(self.queues.len());
        for i in 0..self.queues.len() {
            if with_pf {
                fe.set_vring_enable(i, false)
                    .map_err(vq("SET_VRING_ENABLE", i))?;
            }
            bases.push(fe.get_vring_base(i).map_err(vq("GET_VRING_BASE", i))?);
        }
        self.active = false;
        Ok(bases)
    }

    /// Closes the connection (a VMM going away). Ring state in guest memory is kept.
    pub fn disconnect(&mut self) {
        self.frontend = None;
        self.active = false;
    }

    /// Drops any connection, connects again (waiting for a restarted backend), replays the
    /// handshake and the ring setup from the state the driver knows, then kicks every queue.
    ///
    /// Completions collected while preparing the replay are returned by the next
    /// `wait`/`poll` on their queue.
    pub fn reconnect(&mut self, base: ReplayBase) -> Result<()> {
        self.disconnect();
        let mut bases = Vec::with_capacity(self.queues.len());
        let mut replays = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter_mut().enumerate() {
            match &base {
                ReplayBase::Resubmit => {
                    let (b, lost) = q.prepare_resubmit()?;
                    bases.push(b);
                    replays.push(lost);
                }
                ReplayBase::UsedIdx => {
                    bases.push(q.prepare_from_used()?);
                    replays.push(Vec::new());
                }
                ReplayBase::Explicit(v) => {
                    bases.push(v.get(i).copied().unwrap_or(0));
                    replays.push(Vec::new());
                }
            }
        }
        let (frontend, info) = handshake(&self.path, &self.opts)?;
        self.frontend = Some(frontend);
        self.info = info;
        self.activate_with_bases(&bases)?;
        for (q, heads) in self.queues.iter_mut().zip(replays) {
            q.republish(&heads)?;
            q.kick()?;
        }
        Ok(())
    }
}

/// Connects, retrying while the socket is missing or refusing, and negotiates. A backend that
/// accepts and then dies (EPIPE on SET_OWNER) is retried too, until the timeout.
fn handshake(path: &Path, opts: &DriverOptions) -> Result<(Frontend, DeviceInfo)> {
    let deadline = Instant::now() + opts.connect_timeout;
    loop {
        let last = match UnixStream::connect(path) {
            Ok(sock) => {
                let mut fe = Frontend::from_stream(sock, opts.num_queues as u64);
                match owner_and_features(&fe) {
                    Ok(features) => return negotiate(&mut fe, features, opts).map(|i| (fe, i)),
                    Err(e) => e.to_string(),
                }
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(Error::ConnectTimeout {
                path: path.to_path_buf(),
                timeout: opts.connect_timeout,
                last,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn owner_and_features(fe: &Frontend) -> Result<u64> {
    fe.set_owner().map_err(vu("SET_OWNER"))?;
    fe.get_features().map_err(vu("GET_FEATURES"))
}

fn negotiate(fe: &mut Frontend, features: u64, opts: &DriverOptions) -> Result<DeviceInfo> {
    let mut info = DeviceInfo {
        features,
        protocol_features: VhostUserProtocolFeatures::empty(),
        acked_protocol_features: VhostUserProtocolFeatures::empty(),
        queue_num: None,
        config: Vec::new(),
    };
    if features & PROTOCOL_FEATURES_BIT != 0 {
        let offered = fe
            .get_protocol_features()
            .map_err(vu("GET_PROTOCOL_FEATURES"))?;
        let acked = offered & opts.protocol_mask;
        fe.set_protocol_features(acked)
            .map_err(vu("SET_PROTOCOL_FEATURES"))?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        info.protocol_features = offered;
        info.acked_protocol_features = acked;
    }
    if info
        .acked_protocol_features
        .contains(VhostUserProtocolFeatures::MQ)
    {
        let n = fe.get_queue_num().map_err(vu("GET_QUEUE_NUM"))?;
        if (n as usize) < opts.num_queues {
            return Err(Error::NotEnoughQueues {
                offered: n,
                wanted: opts.num_queues,
            });
        }
        info.queue_num = Some(n);
    }
    if opts.config_size > 0
        && info
            .acked_protocol_features
            .contains(VhostUserProtocolFeatures::CONFIG)
    {
        let size = opts.config_size;
        let (_, payload) = fe
            .get_config(
                0,
                size,
                VhostUserConfigFlags::WRITABLE,
                &vec![0u8; size as usize],
            )
            .map_err(vu("GET_CONFIG"))?;
        info.config = payload;
    }
    Ok(info)
}
