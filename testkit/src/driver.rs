//! The test kit's driver: the shared vhost-user frontend (`hype-frontend`, the one the VMM
//! uses) with test-only abilities on top: guest RAM and rings played by the test, feature
//! masks, stopping the rings and reconnecting with ring replay chosen by the test.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hype_frontend::connection::{HandshakeOptions, HANDSHAKE_TIMEOUT, MAX_QUEUES};
use hype_frontend::features;
use hype_frontend::{Connection, FrontendError, InflightArea, Ring};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Frontend;

use crate::error::{Error, Result};
use crate::memory::GuestRam;
use crate::virtqueue::Virtqueue;

/// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30): a vhost-user bit, never a guest feature.
pub const PROTOCOL_FEATURES_BIT: u64 = features::PROTOCOL_FEATURES;
/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = features::VERSION_1;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = features::RING_INDIRECT_DESC;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = features::RING_EVENT_IDX;
/// `VIRTIO_F_ANY_LAYOUT`.
pub const VIRTIO_F_ANY_LAYOUT: u64 = features::ANY_LAYOUT;
/// `VIRTIO_F_IN_ORDER` (the driver copes with any completion order, so it may be acked).
pub const VIRTIO_F_IN_ORDER: u64 = features::IN_ORDER;

/// Features this driver can ack: all device-specific bits (0..24) and the transport features
/// it implements. Packed rings, notification data, platform access etc. are never acked.
pub const DRIVER_SUPPORTED_FEATURES: u64 = features::DEVICE_BITS
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
    /// Protocol features to ack among those offered: by default those the VMM acks
    /// ([`features::wanted_protocol_features`]: MQ, REPLY_ACK, CONFIG, INFLIGHT_SHMFD,
    /// BACKEND_REQ). CONFIG is required when `config_size` is not 0.
    pub protocol_mask: VhostUserProtocolFeatures,
    /// Bytes of device config to fetch with GET_CONFIG at offset 0 (0 = skip).
    pub config_size: u32,
    /// Kick on every publish, ignoring EVENT_IDX / NO_NOTIFY suppression.
    pub always_kick: bool,
    /// How long to wait for the socket to appear and the handshake to succeed.
    pub connect_timeout: Duration,
    /// Default timeout for waiting on completions (used by the `blk` helpers).
    pub io_timeout: Duration,
    /// Users besides the driver's own and root whose backend may be connected to (the
    /// frontend's peer check; a backend that listened after dropping to `--user`).
    pub allowed_peer_uids: Vec<u32>,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: 128,
            mem_size: 64 << 20,
            feature_mask: u64::MAX,
            protocol_mask: features::wanted_protocol_features(),
            config_size: 0,
            always_kick: false,
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(10),
            allowed_peer_uids: Vec::new(),
        }
    }
}

/// What the backend told us during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// GET_FEATURES result (virtio features offered, bit 30 included).
    pub features: u64,
    /// Protocol features offered.
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

/// A vhost-user frontend that plays the guest: guest RAM, queues and the control connection
/// (a [`Connection`] of the shared frontend: the handshake, config access, inflight area and
/// ring start/stop are the VMM's).
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
    conn: Option<Connection>,
    /// The inflight area of the current connection (when the backend offers one).
    inflight: Option<InflightArea>,
    info: DeviceInfo,
    acked_features: u64,
    queues: Vec<Virtqueue>,
    active: bool,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("path", &self.path)
            .field("connected", &self.conn.is_some())
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
        let (conn, info) = handshake(&path, &opts)?;
        Ok(Self {
            path,
            opts,
            ram,
            conn: Some(conn),
            inflight: None,
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
        let acked =
            offered & self.opts.feature_mask & DRIVER_SUPPORTED_FEATURES & !PROTOCOL_FEATURES_BIT;
        let conn = self.conn.as_mut().ok_or(Error::NotConnected)?;
        // Like the VMM: an inflight area is asked for once per connection, before the rings
        // start the first time.
        if self.inflight.is_none() {
            let max = self.queues.iter().map(Virtqueue::size).max().unwrap_or(0);
            let num = u16::try_from(self.queues.len()).unwrap_or(u16::MAX);
            self.inflight = conn.get_inflight(num, max)?;
        }
        let event_idx = acked & VIRTIO_RING_F_EVENT_IDX != 0;
        let indirect = acked & VIRTIO_RING_F_INDIRECT_DESC != 0;
        let mut rings = Vec::with_capacity(self.queues.len());
        for q in self.queues.iter_mut() {
            q.set_ring_features(event_idx, indirect);
        }
        for (i, q) in self.queues.iter().enumerate() {
            let r = q.rings();
            rings.push(Ring {
                index: q.index(),
                size: q.size(),
                desc: self.ram.host_address(r.desc)?,
                avail: self.ram.host_address(r.avail)?,
                used: self.ram.host_address(r.used)?,
                base: bases.get(i).copied().unwrap_or(0),
                kick: q.kick_fd(),
                call: q.call_fd(),
            });
        }
        conn.start(&self.ram.regions()?, acked, self.inflight.as_ref(), &rings)?;
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

    /// GET_CONFIG of `size` bytes at `offset`.
    pub fn read_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let conn = self.conn.as_mut().ok_or(Error::NotConnected)?;
        Ok(conn.read_config(offset, size)?)
    }

    /// SET_CONFIG of `data` at `offset`.
    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        let conn = self.conn.as_mut().ok_or(Error::NotConnected)?;
        Ok(conn.set_config(offset, data)?)
    }

    /// The shared frontend's connection, for tests that use it directly.
    pub fn connection(&mut self) -> Result<&mut Connection> {
        self.conn.as_mut().ok_or(Error::NotConnected)
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
        Ok(self.connection()?.frontend_mut())
    }

    /// Whether a connection is open.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Stops every ring: SET_VRING_ENABLE 0 then GET_VRING_BASE. Returns the bases (the
    /// backend's next avail index per queue).
    pub fn stop_queues(&mut self) -> Result<Vec<u32>> {
        let conn = self.conn.as_mut().ok_or(Error::NotConnected)?;
        let queues: Vec<u16> = self.queues.iter().map(Virtqueue::index).collect();
        let bases = conn.stop(&queues)?;
        self.active = false;
        Ok(bases)
    }

    /// Closes the connection (a VMM going away). Ring state in guest memory is kept; the
    /// inflight area goes with the connection (the driver replays lost requests itself, see
    /// [`ReplayBase`], so a new backend must not find them in the area too).
    pub fn disconnect(&mut self) {
        self.conn = None;
        self.inflight = None;
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
        let (conn, info) = handshake(&self.path, &self.opts)?;
        self.conn = Some(conn);
        self.info = info;
        self.activate_with_bases(&bases)?;
        for (q, heads) in self.queues.iter_mut().zip(replays) {
            q.republish(&heads)?;
            q.kick()?;
        }
        Ok(())
    }
}

/// Connects, retrying while the socket is missing or refusing, and runs the shared
/// frontend's handshake, then GET_CONFIG of `config_size` bytes. A backend that accepts and
/// then dies (no answer to SET_OWNER or GET_FEATURES) is retried too, until the timeout.
fn handshake(path: &Path, opts: &DriverOptions) -> Result<(Connection, DeviceInfo)> {
    let deadline = Instant::now() + opts.connect_timeout;
    // The VMM's handshake; CONFIG is required only when the test asks for the config (the
    // VMM always does).
    let required = if opts.config_size > 0 {
        VhostUserProtocolFeatures::CONFIG
    } else {
        VhostUserProtocolFeatures::empty()
    };
    let hs = HandshakeOptions {
        max_queues: (opts.num_queues as u64).max(u64::from(MAX_QUEUES)),
        protocol_features: opts.protocol_mask,
        required_protocol_features: required,
        timeout: HANDSHAKE_TIMEOUT,
        fs_tag: None,
        allowed_peer_uids: opts.allowed_peer_uids.clone(),
    };
    loop {
        let last = match hype_frontend::try_connect(path) {
            Ok(Some(sock)) => match Connection::handshake(path, sock, &hs) {
                Ok(conn) => return negotiated(conn, opts),
                Err(e @ FrontendError::NotVhostUser { op, .. })
                    if op == "SET_OWNER" || op == "GET_FEATURES" =>
                {
                    hype_base::error_chain(&e)
                }
                Err(e) => return Err(e.into()),
            },
            Ok(None) => "not listening".to_string(),
            Err(e) => hype_base::error_chain(&e),
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

/// Checks the queue count and fetches the config after a handshake.
fn negotiated(mut conn: Connection, opts: &DriverOptions) -> Result<(Connection, DeviceInfo)> {
    let hs = conn.info().clone();
    if let Some(n) = hs.queue_num {
        if (n as usize) < opts.num_queues {
            return Err(Error::NotEnoughQueues {
                offered: n,
                wanted: opts.num_queues,
            });
        }
    }
    let config = if opts.config_size > 0 {
        conn.fetch_config(opts.config_size)?
    } else {
        Vec::new()
    };
    let info = DeviceInfo {
        features: hs.features,
        protocol_features: hs.offered_protocol_features,
        acked_protocol_features: hs.protocol_features,
        queue_num: hs.queue_num,
        config,
    };
    Ok((conn, info))
}
