//! The listening socket: bound to a path with a chosen mode, or inherited from systemd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vhost::vhost_user::Listener;

use crate::relay::InnerListener;
use crate::Error;

/// Mode of a socket we create when none is given: owner read/write only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// First file descriptor passed by systemd socket activation (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Command-line options for where a backend listens. Flatten it into a backend's `Args`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct ListenArgs {
    /// Path of the vhost-user socket to create and listen on. Not needed when systemd passes
    /// a listening socket (LISTEN_FDS), which takes precedence.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Permission bits of the socket file, in octal.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
}

impl ListenArgs {
    /// Listen on `path` with the default mode 0600.
    pub fn path(path: impl Into<PathBuf>) -> Self {
        ListenArgs {
            socket: Some(path.into()),
            socket_mode: DEFAULT_SOCKET_MODE,
        }
    }
}

/// Parses an octal permission string such as `0600` or `660`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("invalid octal mode {s:?} (expected e.g. 0600)")),
    }
}

/// Identity of a socket file we created, so we only ever remove our own.
#[derive(Debug)]
struct CreatedPath {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// A listening vhost-user socket that stays bound for the life of the daemon, so reconnecting
/// frontends never race an unlink/re-create.
pub struct SocketListener {
    listener: Listener,
    created: Option<CreatedPath>,
    /// The daemon's side of the message relay (see `relay`), bound with the socket so that
    /// no socket is bound once the process is confined. `None` once the sandbox refused it.
    inner: Option<InnerListener>,
}

impl std::fmt::Debug for SocketListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketListener")
            .field("fd", &self.listener.as_raw_fd())
            .field("created", &self.created)
            .finish()
    }
}

impl SocketListener {
    /// Uses the socket from systemd socket activation if this process got one, otherwise binds
    /// `args.socket` with `args.socket_mode`.
    pub fn open(args: &ListenArgs) -> Result<Self, Error> {
        if let Some(l) = Self::from_systemd()? {
            if let Some(path) = &args.socket {
                log::info!(
                    "using the socket passed by systemd; ignoring --socket {}",
                    path.display()
                );
            }
            return Ok(l);
        }
        match &args.socket {
            Some(path) => Self::bind(path, args.socket_mode),
            None => Err(Error::NoSocket),
        }
    }

    /// Creates a Unix socket at `path` with permission bits `mode` and listens on it.
    ///
    /// A stale socket file (nobody listening) is replaced; a live one or a non-socket file is
    /// an error. The file is removed again when the listener is dropped, if it is still ours.
    pub fn bind(path: &Path, mode: u32) -> Result<Self, Error> {
        let inner = InnerListener::bind().map_err(Error::Relay)?;
        remove_stale_socket(path)?;
        // Create the socket with no group/other bits so it is never briefly more open than
        // asked; then set the exact mode.
        // SAFETY: umask(2) cannot fail; it only swaps the process file-creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restores the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(|source| Error::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        let meta = std::fs::symlink_metadata(path).map_err(|source| Error::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        let created = CreatedPath {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        // From here on, Drop removes the file if anything fails.
        let me = SocketListener {
            listener: Listener::from(listener),
            created: Some(created),
            inner: Some(inner),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| Error::Chmod {
                path: path.to_path_buf(),
                mode,
                source,
            },
        )?;
        log::info!("listening on {} (mode {:o})", path.display(), mode);
        Ok(me)
    }

    /// Takes the listening socket passed by systemd socket activation, if `LISTEN_PID` names
    /// this process. Clears `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` so children do not
    /// inherit them.
    pub fn from_systemd() -> Result<Option<Self>, Error> {
        let pid_matches = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|p| p == std::process::id());
        if !pid_matches {
            return Ok(None);
        }
        let fds = std::env::var("LISTEN_FDS").unwrap_or_default();
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
        let n: u32 = fds
            .trim()
            .parse()
            .map_err(|_| Error::InvalidListenFds(fds.clone()))?;
        match n {
            0 => return Ok(None),
            1 => {}
            n => return Err(Error::TooManyListenFds(n)),
        }
        let fd = LISTEN_FDS_START;
        check_unix_listener(fd).map_err(Error::NotAUnixListener)?;
        // SAFETY: fd 3 was handed to us by the service manager, is a listening unix socket
        // (checked above) and nothing else in this process owns it.
        let listener = unsafe { UnixListener::from_raw_fd(fd) };
        // SAFETY: F_SETFD on a valid fd we own; marks it close-on-exec.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        log::info!("listening on the socket passed by systemd (fd {fd})");
        Ok(Some(SocketListener {
            listener: Listener::from(listener),
            created: None,
            inner: Some(InnerListener::bind().map_err(Error::Relay)?),
        }))
    }

    /// The socket path, if this process created it.
    pub fn path(&self) -> Option<&Path> {
        self.created.as_ref().map(|c| c.path.as_path())
    }

    /// The listener in the form `VhostUserDaemon::start` takes.
    pub(crate) fn vhost_listener(&mut self) -> &mut Listener {
        &mut self.listener
    }

    /// The daemon's side of the message relay, unless it was given up.
    pub(crate) fn inner(&mut self) -> Option<&mut InnerListener> {
        self.inner.as_mut()
    }

    /// Gives the relay up: frontends are served directly from now on.
    pub(crate) fn drop_relay(&mut self) {
        self.inner = None;
    }
}

impl AsRawFd for SocketListener {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for SocketListener {
    fn drop(&mut self) {
        let Some(c) = &self.created else { return };
        // Remove the file only if it is still the socket we bound (not a newer daemon's).
        if let Ok(meta) = std::fs::symlink_metadata(&c.path) {
            if meta.dev() == c.dev && meta.ino() == c.ino {
                let _ = std::fs::remove_file(&c.path);
                log::debug!("removed {}", c.path.display());
            }
        }
    }
}

/// Removes `path` if it is a socket nobody listens on; errors if it is live or not a socket.
fn remove_stale_socket(path: &Path) -> Result<(), Error> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::StaleSocket {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(Error::PathNotSocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::SocketInUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing stale socket {}", path.display());
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(Error::StaleSocket {
                    path: path.to_path_buf(),
                    source,
                }),
            }
        }
        Err(source) => Err(Error::StaleSocket {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn sockopt_int(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val`/`len` are valid for writes of an int-sized option value.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(val)
}

fn check_unix_listener(fd: RawFd) -> io::Result<()> {
    let domain = sockopt_int(fd, libc::SO_DOMAIN)?;
    let ty = sockopt_int(fd, libc::SO_TYPE)?;
    let listening = sockopt_int(fd, libc::SO_ACCEPTCONN)?;
    if domain != libc::AF_UNIX || ty != libc::SOCK_STREAM || listening == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("domain {domain}, type {ty}, listening {listening}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hype-daemon-{}-{}", name, std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn mode_parsing() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert_eq!(parse_mode("0o640"), Ok(0o640));
        assert!(parse_mode("0800").is_err());
        assert!(parse_mode("1777").is_err());
        assert!(parse_mode("").is_err());
    }

    #[test]
    fn bind_sets_mode_and_drop_removes() {
        let d = tmpdir("mode");
        let p = d.join("s.sock");
        let l = SocketListener::bind(&p, 0o600).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(l.path(), Some(p.as_path()));
        drop(l);
        assert!(!p.exists());

        let l = SocketListener::bind(&p, 0o660).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o660
        );
        drop(l);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn live_socket_is_refused_and_stale_one_replaced() {
        let d = tmpdir("stale");
        let p = d.join("s.sock");
        let l = SocketListener::bind(&p, 0o600).unwrap();
        assert!(matches!(
            SocketListener::bind(&p, 0o600),
            Err(Error::SocketInUse(_))
        ));
        // A socket file left by a dead process: bind a std listener and forget to unlink it.
        drop(l);
        let stale = UnixListener::bind(&p).unwrap();
        drop(stale);
        assert!(p.exists());
        let l = SocketListener::bind(&p, 0o600).unwrap();
        drop(l);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn regular_file_is_never_removed() {
        let d = tmpdir("file");
        let p = d.join("not-a-socket");
        std::fs::write(&p, b"data").unwrap();
        assert!(matches!(
            SocketListener::bind(&p, 0o600),
            Err(Error::PathNotSocket(_))
        ));
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn drop_leaves_a_replaced_socket_alone() {
        let d = tmpdir("replaced");
        let p = d.join("s.sock");
        let l = SocketListener::bind(&p, 0o600).unwrap();
        // Someone else replaces the path (e.g. a new daemon after ours was told to quit).
        std::fs::remove_file(&p).unwrap();
        let other = UnixListener::bind(&p).unwrap();
        drop(l);
        assert!(p.exists(), "our drop removed someone else's socket");
        drop(other);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn open_without_socket_is_an_error() {
        let args = ListenArgs {
            socket: None,
            socket_mode: DEFAULT_SOCKET_MODE,
        };
        assert!(matches!(SocketListener::open(&args), Err(Error::NoSocket)));
    }
}
