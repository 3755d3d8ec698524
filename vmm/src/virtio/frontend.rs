//! The VMM's side of the shared vhost-user frontend (`hype-frontend`, also used by the test
//! kit): its types re-exported under their old paths, guest RAM described to a backend, and
//! the [`Connector`] seam through which a device's worker (re)connects to its backend.
//!
//! Everything here blocks on the backend, so it runs on the device's own thread, never on a
//! vCPU thread.

use std::path::{Path, PathBuf};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub use hype_frontend::connection::{
    BackendInfo, Detected, HandshakeOptions, InflightArea, Ring, HANDSHAKE_TIMEOUT, MAX_QUEUES,
    REPLY_TIMEOUT,
};
pub use hype_frontend::features::{
    wanted_protocol_features, PROTOCOL_FEATURES as PROTOCOL_FEATURES_BIT,
};
pub use hype_frontend::{
    connect_waiting, connect_waiting_until, try_connect, BackendLink, Connection, FrontendError,
};

use super::DeviceType;
use crate::memory::GuestMemoryMmap;

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

/// Guest RAM as SET_MEM_TABLE describes it (every region is memfd-backed).
pub fn memory_regions(
    mem: &GuestMemoryMmap,
) -> Result<Vec<VhostUserMemoryRegionInfo>, FrontendError> {
    mem.iter()
        .map(VhostUserMemoryRegionInfo::from_guest_region)
        .collect::<Result<_, _>>()
        .map_err(FrontendError::Memory)
}

/// How a device's worker gets a new link to its backend after losing one.
pub trait Connector: Send + 'static {
    /// The links it makes.
    type Link: BackendLink + 'static;
    /// One attempt at connecting and running the handshake of a `kind` device: `Ok(None)`
    /// when no backend listens (yet). [`FrontendError::Connect`] means the socket path
    /// itself is unusable; other errors are a backend that is there but failed the
    /// handshake.
    fn connect(&mut self, kind: DeviceType) -> Result<Option<Self::Link>, FrontendError>;

    /// Makes later [`connect`](Self::connect)s go to the backend at `path` (a backend
    /// switch); returns the path used until now, or `None` when this connector cannot move.
    fn retarget(&mut self, path: &Path) -> Option<PathBuf> {
        let _ = path;
        None
    }
}

/// The real [`Connector`]: the backend's Unix socket.
#[derive(Debug, Clone)]
pub struct SocketConnector {
    /// The socket path.
    pub path: PathBuf,
    /// The virtio-fs tag for a backend that does not give its config.
    pub fs_tag: Option<String>,
    /// A uid besides the VMM's own and root that may serve the socket.
    pub allow_uid: Option<u32>,
}

impl Connector for SocketConnector {
    type Link = Connection;

    fn retarget(&mut self, path: &Path) -> Option<PathBuf> {
        Some(std::mem::replace(&mut self.path, path.to_owned()))
    }

    fn connect(&mut self, kind: DeviceType) -> Result<Option<Connection>, FrontendError> {
        let Some(stream) = try_connect(&self.path)? else {
            return Ok(None);
        };
        let opts = HandshakeOptions {
            fs_tag: self.fs_tag.clone(),
            allowed_peer_uids: self.allow_uid.into_iter().collect(),
            ..HandshakeOptions::default()
        };
        Connection::handshake_device(&self.path, stream, &opts, Some(kind)).map(|(c, _)| Some(c))
    }
}
