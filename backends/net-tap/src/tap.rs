//! The TAP interface: opening (creating or attaching to) its queues with `IFF_VNET_HDR`,
//! offloads, queue attach/detach, MTU and link state.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::VNET_HDR_LEN;

/// Path of the TUN/TAP clone device.
const TUN_PATH: &str = "/dev/net/tun";

/// Offload bits of `TUNSETOFFLOAD` (`TUN_F_*`).
pub mod offload {
    /// The guest accepts packets with partial checksums.
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    /// The guest accepts TSO over IPv4.
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    /// The guest accepts TSO over IPv6.
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    /// The guest accepts TSO with ECN.
    pub const TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
    /// The guest accepts UFO (fragmented UDP).
    pub const UFO: u32 = libc::TUN_F_UFO;
    /// The guest accepts UDP segmentation offload over IPv4.
    pub const USO4: u32 = libc::TUN_F_USO4;
    /// The guest accepts UDP segmentation offload over IPv6.
    pub const USO6: u32 = libc::TUN_F_USO6;
}

/// Errors opening or configuring the TAP interface.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is one the kernel refuses ([`check_tap_name`]).
    #[error("invalid interface name {0:?} (1 to 15 bytes, not . or .., without '/', ':', NUL or whitespace)")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open {TUN_PATH} (is the tun module loaded?)")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF failed.
    #[error("cannot attach queue {queue} of tap {name} (an existing tap must be a tap with the same queue mode; creating one needs CAP_NET_ADMIN)")]
    SetIff {
        /// The interface.
        name: String,
        /// The queue.
        queue: usize,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The kernel gave the interface another name than asked for.
    #[error("asked for tap {asked}, got {got}")]
    NameChanged {
        /// What we asked for.
        asked: String,
        /// What the kernel returned.
        got: String,
    },
    /// TUNSETVNETHDRSZ failed.
    #[error("cannot set the vnet header size on tap {name}")]
    VnetHdrSize {
        /// The interface.
        name: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// TUNSETOFFLOAD with checksum offload alone failed.
    #[error("tap {name} refuses checksum offload")]
    Offload {
        /// The interface.
        name: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An interface ioctl (MTU, flags) failed.
    #[error("cannot {op} of {name}")]
    Interface {
        /// What was attempted.
        op: &'static str,
        /// The interface.
        name: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl hype_daemon::CommandError for TapError {
    /// The tap named on the command line being invalid, of another kind or queue mode, in use
    /// or not ours, or refusing `--mtu`, is the command line's fault. A missing tun driver and
    /// offload or header-size failures are the host's.
    fn is_usage(&self) -> bool {
        let argument_errno = |e: &io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::EBUSY | libc::EPERM | libc::EACCES)
            )
        };
        match self {
            TapError::InvalidName(_) | TapError::NameChanged { .. } => true,
            TapError::SetIff { source, .. } => argument_errno(source),
            TapError::Interface { source, .. } => source.raw_os_error() == Some(libc::EINVAL),
            TapError::OpenTun(_) | TapError::VnetHdrSize { .. } | TapError::Offload { .. } => false,
        }
    }
}

/// An open TAP interface with one file descriptor per queue (`IFF_MULTI_QUEUE` when more than
/// one), each non-blocking, with 12-byte virtio-net headers on every frame.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<File>,
    created: bool,
    supported_offloads: u32,
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (arrays and a union of integers/structs); all zeroes is a
    // valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr
}

fn name_of(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether an interface of that name exists in this network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Checks `name` against the kernel's rules for interface names (`dev_valid_name`): 1 to 15
/// bytes, not `.` or `..`, no `/`, `:`, NUL or whitespace. `hype net-tap --tap` and
/// `hype run --net tap:NAME` both use it.
pub fn check_tap_name(name: &str) -> Result<(), TapError> {
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name == "."
        || name == ".."
        || name.contains(['/', ':', '\0'])
        || name.chars().any(char::is_whitespace)
    {
        return Err(TapError::InvalidName(name.to_string()));
    }
    Ok(())
}

impl Tap {
    /// Opens `queues` queues of tap `name`, creating the interface if it does not exist (it then
    /// disappears when the last queue is closed). Offloads start disabled.
    pub fn open(name: &str, queues: usize) -> Result<Tap, TapError> {
        check_tap_name(name)?;
        let created = !interface_exists(name);
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut files = Vec::with_capacity(queues);
        for queue in 0..queues.max(1) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(TUN_PATH)
                .map_err(TapError::OpenTun)?;
            let mut ifr = ifreq_for(name);
            ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes an ifreq; `ifr` is a valid, exclusively
            // borrowed ifreq that lives for the call.
            check(unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) }).map_err(
                |source| TapError::SetIff {
                    name: name.to_string(),
                    queue,
                    source,
                },
            )?;
            let got = name_of(&ifr);
            if got != name {
                return Err(TapError::NameChanged {
                    asked: name.to_string(),
                    got,
                });
            }
            files.push(file);
        }
        let mut tap = Tap {
            name: name.to_string(),
            queues: files,
            created,
            supported_offloads: 0,
        };
        tap.set_vnet_hdr_len(VNET_HDR_LEN)
            .map_err(|source| TapError::VnetHdrSize {
                name: name.to_string(),
                source,
            })?;
        tap.supported_offloads = tap.probe_offloads()?;
        tap.set_offloads(0).map_err(|source| TapError::Offload {
            name: tap.name.clone(),
            source,
        })?;
        Ok(tap)
    }

    /// Finds which offloads this kernel's tap accepts (checksum is required).
    fn probe_offloads(&self) -> Result<u32, TapError> {
        use offload::*;
        self.set_offloads(CSUM)
            .map_err(|source| TapError::Offload {
                name: self.name.clone(),
                source,
            })?;
        let mut supported = CSUM;
        for extra in [TSO4 | TSO6 | TSO_ECN, UFO, USO4 | USO6] {
            if self.set_offloads(supported | extra).is_ok() {
                supported |= extra;
            }
        }
        Ok(supported)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this process created the interface (it did not exist before).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The file descriptor of queue `index`.
    pub fn queue_fd(&self, index: usize) -> Option<RawFd> {
        self.queues.get(index).map(AsRawFd::as_raw_fd)
    }

    /// `TUN_F_*` offloads the kernel accepts on this tap.
    pub fn supported_offloads(&self) -> u32 {
        self.supported_offloads
    }

    /// Sets the virtio-net header length on every frame: 12 (VERSION_1 or MRG_RXBUF) or 10
    /// (legacy). The length is per interface; it is set through every queue anyway.
    pub fn set_vnet_hdr_len(&self, len: usize) -> io::Result<()> {
        let len = len as libc::c_int;
        for q in &self.queues {
            // SAFETY: TUNSETVNETHDRSZ reads one int from the valid pointer we pass.
            check(unsafe { libc::ioctl(q.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) })?;
        }
        Ok(())
    }

    /// Sets the offloads the reader (the guest) accepts: `TUN_F_*` bits.
    pub fn set_offloads(&self, flags: u32) -> io::Result<()> {
        let fd = self.queues.first().map(AsRawFd::as_raw_fd).unwrap_or(-1);
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        check(unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, flags as libc::c_ulong) })
    }

    /// Attaches (`enabled`) or detaches queue `index` from the interface, so the kernel only
    /// steers packets to queues the guest serves. A no-op on a single-queue tap.
    pub fn set_queue_enabled(&self, index: usize, enabled: bool) -> io::Result<()> {
        if self.queues.len() < 2 {
            return Ok(());
        }
        let Some(fd) = self.queue_fd(index) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let mut ifr = ifreq_for("");
        ifr.ifr_ifru.ifru_flags = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        } as libc::c_short;
        // SAFETY: TUNSETQUEUE reads an ifreq; `ifr` is valid for the call.
        match check(unsafe { libc::ioctl(fd, libc::TUNSETQUEUE, &mut ifr) }) {
            // Attaching an attached queue or detaching a detached one.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            other => other,
        }
    }

    fn interface_ioctl(
        &self,
        op: &'static str,
        req: libc::c_ulong,
        ifr: &mut libc::ifreq,
    ) -> Result<(), TapError> {
        let err = |source| TapError::Interface {
            op,
            name: self.name.clone(),
            source,
        };
        // SAFETY: socket(2) with constant arguments; the result is checked below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh socket we own.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the SIOC* interface ioctls read/write one ifreq; `ifr` is valid for the call.
        check(unsafe { libc::ioctl(sock.as_raw_fd(), req, ifr as *mut libc::ifreq) }).map_err(err)
    }

    /// Sets the interface MTU.
    pub fn set_mtu(&self, mtu: u16) -> Result<(), TapError> {
        let mut ifr = ifreq_for(&self.name);
        ifr.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        self.interface_ioctl("set the mtu", libc::SIOCSIFMTU, &mut ifr)
    }

    /// Brings the interface up.
    pub fn set_up(&self) -> Result<(), TapError> {
        let mut ifr = ifreq_for(&self.name);
        self.interface_ioctl("read the flags", libc::SIOCGIFFLAGS, &mut ifr)?;
        // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        self.interface_ioctl("bring up", libc::SIOCSIFFLAGS, &mut ifr)
    }
}
