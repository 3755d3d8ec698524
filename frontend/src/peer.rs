//! Who is listening on a backend socket: the peer's credentials (SO_PEERCRED) checked before
//! the frontend says anything to it, so guest RAM (SET_MEM_TABLE) is only ever shared with a
//! process of this frontend's own user, root, or a user the caller allowed for that device.
//!
//! A socket path another local user could create first (a predictable directory, a stale
//! path) is otherwise a way to receive the guest's memory: connecting to the wrong listener
//! would hand it the memfd.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::error::FrontendError;

/// The credentials of the process that listens on the other end of `stream` (taken by the
/// kernel when that process called listen()).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Process id.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// Reads SO_PEERCRED of a connected Unix stream socket.
pub fn peer_credentials(stream: &UnixStream) -> io::Result<PeerCredentials> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` holds `cred`'s size, as
    // getsockopt(SO_PEERCRED) requires; the fd is owned by `stream` for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_PEERCRED answered a short struct",
        ));
    }
    Ok(PeerCredentials {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The effective uid of this process.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid() has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether a peer of user `uid` may be given guest memory: this process's own user, root, or
/// one of `allowed`.
pub fn uid_allowed(uid: u32, allowed: &[u32]) -> bool {
    uid == own_uid() || uid == 0 || allowed.contains(&uid)
}

/// Checks the peer of `stream` (the backend listening on `path`) against [`uid_allowed`].
pub fn check_peer(path: &Path, stream: &UnixStream, allowed: &[u32]) -> Result<(), FrontendError> {
    let cred = peer_credentials(stream).map_err(|source| FrontendError::PeerCredentials {
        path: path.to_owned(),
        source,
    })?;
    if uid_allowed(cred.uid, allowed) {
        return Ok(());
    }
    Err(FrontendError::PeerNotAllowed {
        path: path.to_owned(),
        uid: cred.uid,
        pid: cred.pid,
        own_uid: own_uid(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    /// The uid/gid of `nobody` on Linux.
    pub(crate) const NOBODY: u32 = 65534;

    /// A listener bound by a child process that switched to `nobody` first; killed on drop.
    pub(crate) struct ForeignListener {
        pid: libc::pid_t,
        pub(crate) path: PathBuf,
        dir: PathBuf,
    }

    impl ForeignListener {
        /// Forks a child that becomes `nobody`, binds and listens on a socket in a fresh
        /// world-writable directory, and waits to be killed. `None` when not root (the test
        /// cannot change uid then).
        pub(crate) fn spawn(name: &str) -> Option<ForeignListener> {
            if own_uid() != 0 {
                eprintln!("not root: cannot run a listener as another user; skipped");
                return None;
            }
            let dir = std::env::temp_dir().join(format!(
                "hype-peer-{name}-{}-{:x}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::create_dir(&dir).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
            let path = dir.join("b.sock");
            // Everything the child needs is prepared here: after fork() it only makes
            // async-signal-safe system calls.
            // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
            let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let bytes = path.as_os_str().as_bytes();
            assert!(bytes.len() < addr.sun_path.len());
            for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
                *d = *s as libc::c_char;
            }
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two fds pipe() writes.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            let (rfd, wfd) = (fds[0], fds[1]);
            // SAFETY: the child only calls async-signal-safe functions and _exit()s.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                // SAFETY: plain system calls on values prepared before fork().
                unsafe {
                    libc::close(rfd);
                    let ok = libc::setgroups(0, std::ptr::null()) == 0
                        && libc::setgid(NOBODY) == 0
                        && libc::setuid(NOBODY) == 0;
                    let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                    let ok = ok
                        && fd >= 0
                        && libc::bind(
                            fd,
                            (&addr as *const libc::sockaddr_un).cast(),
                            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                        ) == 0
                        && libc::listen(fd, 8) == 0;
                    let byte = [u8::from(ok)];
                    libc::write(wfd, byte.as_ptr().cast(), 1);
                    loop {
                        libc::pause();
                    }
                }
            }
            // SAFETY: closing our copy of the write end.
            unsafe { libc::close(wfd) };
            let mut byte = [0u8];
            // SAFETY: reading one byte into `byte`.
            let n = unsafe { libc::read(rfd, byte.as_mut_ptr().cast(), 1) };
            // SAFETY: closing the read end.
            unsafe { libc::close(rfd) };
            let l = ForeignListener { pid, path, dir };
            assert!(n == 1 && byte[0] == 1, "the nobody listener did not start");
            Some(l)
        }
    }

    impl Drop for ForeignListener {
        fn drop(&mut self) {
            // SAFETY: our own child; reaped right after.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn own_listener_is_allowed() {
        let dir = std::env::temp_dir().join(format!("hype-peer-own-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let sock = dir.join("s.sock");
        let _l = UnixListener::bind(&sock).unwrap();
        let s = UnixStream::connect(&sock).unwrap();
        let cred = peer_credentials(&s).unwrap();
        assert_eq!(cred.uid, own_uid());
        assert_eq!(cred.pid, std::process::id() as i32);
        check_peer(&sock, &s, &[]).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn foreign_listener_is_refused_unless_allowed() {
        let Some(l) = ForeignListener::spawn("refused") else {
            return;
        };
        let s = UnixStream::connect(&l.path).unwrap();
        assert_eq!(peer_credentials(&s).unwrap().uid, NOBODY);
        let e = check_peer(&l.path, &s, &[]).unwrap_err();
        match &e {
            FrontendError::PeerNotAllowed {
                uid, own_uid: me, ..
            } => {
                assert_eq!(*uid, NOBODY);
                assert_eq!(*me, 0);
            }
            other => panic!("wrong error: {other}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("uid 65534") && msg.contains("allow-uid"),
            "{msg}"
        );
        check_peer(&l.path, &s, &[1000, NOBODY]).unwrap();
        assert!(check_peer(&l.path, &s, &[1000]).is_err());
    }

    #[test]
    fn handshake_checks_the_peer_before_sending_anything() {
        use crate::connection::{Connection, HandshakeOptions};
        let Some(l) = ForeignListener::spawn("handshake") else {
            return;
        };
        let mut opts = HandshakeOptions {
            timeout: std::time::Duration::from_millis(300),
            ..HandshakeOptions::default()
        };
        let s = UnixStream::connect(&l.path).unwrap();
        let e = Connection::handshake(&l.path, s, &opts).unwrap_err();
        assert!(
            matches!(e, FrontendError::PeerNotAllowed { uid: NOBODY, .. }),
            "{e}"
        );
        // Allowed: the handshake goes on (and fails later, as the listener never answers).
        opts.allowed_peer_uids = vec![NOBODY];
        let s = UnixStream::connect(&l.path).unwrap();
        let e = Connection::handshake(&l.path, s, &opts).unwrap_err();
        assert!(
            matches!(
                e,
                FrontendError::NotVhostUser {
                    op: "GET_FEATURES",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn uid_rules() {
        assert!(uid_allowed(own_uid(), &[]));
        assert!(uid_allowed(0, &[]));
        if own_uid() != 4242 {
            assert!(!uid_allowed(4242, &[]));
        }
        assert!(uid_allowed(4242, &[4242]));
    }
}
