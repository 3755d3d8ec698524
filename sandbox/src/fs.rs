//! Landlock: the files and directories a process may still reach by path, and TCP ports it may
//! still connect to, once restricted.

use std::fmt;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, ABI,
};

use crate::Error;

/// The Landlock ABI whose file-system rights hype asks for (Linux 6.10: ioctl on devices).
const FS_ABI: ABI = ABI::V5;
/// The Landlock ABI of TCP bind/connect restrictions (Linux 6.7).
const NET_ABI: ABI = ABI::V4;

/// What a process may do beneath one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsAccess {
    /// Read the file, or every file beneath the directory, and list directories.
    Read,
    /// Read, execute and map executable the files beneath (shared libraries loaded late).
    ReadExec,
    /// Read, write and truncate the (existing) file.
    ReadWrite,
    /// Remove entries of the directory (a socket file removed on exit).
    RemoveEntries,
    /// Create and remove Unix sockets in the directory (bind after the restriction).
    Sockets,
    /// Read, write and ioctl on a device node (the VMM's `/dev/kvm`).
    Device,
    /// Everything on files and directories beneath: read, write, create, rename, remove
    /// (directories a process writes whole files into, e.g. the VMM's snapshots).
    Tree,
}

impl FsAccess {
    fn rights(self, is_dir: bool) -> BitFlags<AccessFs> {
        let file_read = AccessFs::ReadFile;
        let rights = match self {
            FsAccess::Read if is_dir => file_read | AccessFs::ReadDir,
            FsAccess::Read => file_read.into(),
            FsAccess::ReadExec if is_dir => file_read | AccessFs::ReadDir | AccessFs::Execute,
            FsAccess::ReadExec => file_read | AccessFs::Execute,
            FsAccess::ReadWrite => file_read | AccessFs::WriteFile | AccessFs::Truncate,
            FsAccess::RemoveEntries => AccessFs::RemoveFile.into(),
            FsAccess::Sockets => AccessFs::MakeSock | AccessFs::RemoveFile,
            FsAccess::Device => file_read | AccessFs::WriteFile | AccessFs::IoctlDev,
            FsAccess::Tree => {
                AccessFs::from_all(FS_ABI)
                    & !(AccessFs::Execute
                        | AccessFs::MakeChar
                        | AccessFs::MakeBlock
                        | AccessFs::MakeFifo
                        | AccessFs::MakeSym
                        | AccessFs::IoctlDev)
            }
        };
        rights & AccessFs::from_all(FS_ABI)
    }
}

impl fmt::Display for FsAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsAccess::Read => "read",
            FsAccess::ReadExec => "read+exec",
            FsAccess::ReadWrite => "read+write",
            FsAccess::RemoveEntries => "remove entries",
            FsAccess::Sockets => "create/remove sockets",
            FsAccess::Device => "read+write+ioctl",
            FsAccess::Tree => "read, write, create, rename, remove",
        })
    }
}

/// The Landlock rules of one process: paths and TCP ports it keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsRules {
    paths: Vec<(PathBuf, FsAccess)>,
    tcp_connect: Vec<u16>,
}

/// What [`FsRules::apply`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockStatus {
    /// Every right asked for is enforced.
    Full,
    /// The kernel's Landlock is older than hype's rules: some rights are not restricted.
    Partial,
    /// The kernel has no Landlock (or it is disabled): nothing is restricted by it.
    Unavailable,
}

impl fmt::Display for LandlockStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LandlockStatus::Full => "enforced",
            LandlockStatus::Partial => "partly enforced (older kernel)",
            LandlockStatus::Unavailable => "not available on this kernel",
        })
    }
}

impl FsRules {
    /// No path and no TCP port: the process can open nothing by path.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps `access` beneath `path`.
    pub fn allow(&mut self, path: impl Into<PathBuf>, access: FsAccess) {
        self.paths.push((path.into(), access));
    }

    /// Keeps `access` beneath `path` if it exists (system files that differ between hosts).
    pub fn allow_if_exists(&mut self, path: impl Into<PathBuf>, access: FsAccess) {
        let p = path.into();
        if p.exists() {
            self.paths.push((p, access));
        }
    }

    /// Whether a rule names `path`.
    pub fn mentions(&self, path: &Path) -> bool {
        self.paths.iter().any(|(p, _)| p == path)
    }

    /// Keeps TCP connections to `port` (any address).
    pub fn allow_tcp_connect(&mut self, port: u16) {
        if !self.tcp_connect.contains(&port) {
            self.tcp_connect.push(port);
        }
    }

    /// The rules as text, one per line.
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::from(
            "landlock: only these paths can be opened, created or removed \
             (descriptors opened before stay usable):\n",
        );
        if self.paths.is_empty() {
            s.push_str("  (none)\n");
        }
        for (p, a) in &self.paths {
            let _ = writeln!(s, "  {} ({a})", p.display());
        }
        match self.tcp_connect.as_slice() {
            [] => s.push_str("landlock: no TCP bind or connect\n"),
            ports => {
                let _ = writeln!(s, "landlock: TCP connect to ports {ports:?} only, no bind");
            }
        }
        s
    }

    /// Restricts the calling thread and the threads it creates from now on (not threads that
    /// already run). Sets no_new_privs. Degrades to [`LandlockStatus::Unavailable`] on kernels
    /// without Landlock.
    pub fn apply(&self) -> Result<LandlockStatus, Error> {
        let ruleset = Ruleset::default()
            .handle_access(AccessFs::from_all(FS_ABI))
            .and_then(|r| r.handle_access(AccessNet::from_all(NET_ABI)))
            .map_err(Error::Landlock)?;
        let mut created = ruleset.create().map_err(Error::Landlock)?;
        for (path, access) in &self.paths {
            let fd = PathFd::new(path).map_err(|source| Error::LandlockPath {
                path: path.clone(),
                source,
            })?;
            let rights = access.rights(is_dir(path));
            created = created
                .add_rule(PathBeneath::new(fd, rights))
                .map_err(Error::Landlock)?;
        }
        for &port in &self.tcp_connect {
            created = created
                .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
                .map_err(Error::Landlock)?;
        }
        let status = created
            .no_new_privs(true)
            .restrict_self()
            .map_err(Error::Landlock)?;
        Ok(match status.ruleset {
            RulesetStatus::FullyEnforced => LandlockStatus::Full,
            RulesetStatus::PartiallyEnforced => LandlockStatus::Partial,
            RulesetStatus::NotEnforced => LandlockStatus::Unavailable,
        })
    }
}

fn is_dir(p: &Path) -> bool {
    std::fs::metadata(p).map(|m| m.is_dir()).unwrap_or(false)
}
