//! Errors of the daemon plumbing.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while listening, accepting and serving frontends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither `--socket` nor socket activation gave us a socket.
    #[error("no socket: pass --socket PATH or start the daemon through systemd socket activation")]
    NoSocket,
    /// `LISTEN_FDS` was set for this process but was not a usable number.
    #[error("invalid LISTEN_FDS value {0:?}")]
    InvalidListenFds(String),
    /// Socket activation passed more than one socket; we serve exactly one.
    #[error("socket activation passed {0} sockets, expected 1")]
    TooManyListenFds(u32),
    /// The socket passed by socket activation is not a listening Unix stream socket.
    #[error("socket passed by systemd (fd 3) is not a listening unix stream socket")]
    NotAUnixListener(#[source] io::Error),
    /// The socket path exists and is not a socket: refuse to remove it.
    #[error("{0} exists and is not a socket")]
    PathNotSocket(PathBuf),
    /// Another process is listening on the socket path.
    #[error("{0} is in use by another process")]
    SocketInUse(PathBuf),
    /// Inspecting or removing a stale socket failed.
    #[error("cannot replace stale socket {path}")]
    StaleSocket {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// bind(2) failed.
    #[error("cannot bind {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// chmod(2) of the socket failed.
    #[error("cannot set mode {mode:o} on {path}")]
    Chmod {
        /// The socket path.
        path: PathBuf,
        /// The requested mode.
        mode: u32,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Waiting for a connection or a signal failed.
    #[error("poll failed")]
    Poll(#[source] io::Error),
    /// Creating the shutdown eventfd failed.
    #[error("cannot create shutdown event")]
    ShutdownEvent(#[source] io::Error),
    /// Installing the SIGINT/SIGTERM handlers failed.
    #[error("cannot install signal handler")]
    SignalHandler(#[source] io::Error),
    /// The user's factory could not build a backend for a new connection.
    #[error("cannot create backend")]
    CreateBackend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// `VhostUserDaemon` could not be created.
    #[error("cannot create vhost-user daemon: {0}")]
    CreateDaemon(String),
    /// A backend's per-connection setup hook failed (see `ConnectionHooks::daemon_created`).
    #[error("cannot set up the connection")]
    ConnectionSetup(#[source] io::Error),
    /// Accepting a connection failed.
    #[error("cannot accept a frontend connection: {0}")]
    Accept(String),
    /// A thread could not be spawned.
    #[error("cannot spawn thread")]
    SpawnThread(#[source] io::Error),
    /// The message relay between frontend and daemon could not be set up.
    #[error("cannot set up the vhost-user message relay")]
    Relay(#[source] io::Error),
    /// The process could not confine itself (seccomp, Landlock).
    #[error("cannot set up the sandbox")]
    Sandbox(#[source] hype_sandbox::Error),
}

impl crate::CommandError for Error {
    /// The socket options and what systemd passed are the command line's business; a bind
    /// that fails names a path the user gave. Everything from serving on is a runtime error.
    fn is_usage(&self) -> bool {
        match self {
            Error::NoSocket
            | Error::InvalidListenFds(_)
            | Error::TooManyListenFds(_)
            | Error::NotAUnixListener(_)
            | Error::PathNotSocket(_)
            | Error::SocketInUse(_)
            | Error::StaleSocket { .. }
            | Error::Bind { .. } => true,
            Error::Chmod { .. }
            | Error::Poll(_)
            | Error::ShutdownEvent(_)
            | Error::SignalHandler(_)
            | Error::CreateBackend(_)
            | Error::CreateDaemon(_)
            | Error::ConnectionSetup(_)
            | Error::Accept(_)
            | Error::SpawnThread(_)
            | Error::Relay(_)
            | Error::Sandbox(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hype_base::{error_chain, exit_code_number, CommandError, EXIT_RUNTIME, EXIT_USAGE};
    use std::path::PathBuf;

    #[test]
    fn chain_joins_sources() {
        let e = Error::Bind {
            path: "/x/s.sock".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        let s = error_chain(&e);
        assert!(s.starts_with("cannot bind /x/s.sock: "), "{s}");
        assert!(s.contains("ermission denied"), "{s}");
    }

    #[test]
    fn daemon_errors_are_classified() {
        let p = PathBuf::from("/x/s.sock");
        let usage = [
            Error::NoSocket,
            Error::SocketInUse(p.clone()),
            Error::PathNotSocket(p.clone()),
            Error::InvalidListenFds("x".into()),
            Error::TooManyListenFds(2),
            Error::Bind {
                path: p.clone(),
                source: io::Error::from_raw_os_error(libc::ENOENT),
            },
        ];
        for e in &usage {
            assert!(e.is_usage(), "{e}");
            assert_eq!(exit_code_number(e), EXIT_USAGE);
        }
        let runtime = [
            Error::Poll(io::Error::from_raw_os_error(libc::EBADF)),
            Error::Accept("x".into()),
            Error::CreateDaemon("x".into()),
            Error::CreateBackend("no threads".into()),
            Error::SpawnThread(io::Error::from_raw_os_error(libc::EAGAIN)),
            Error::ConnectionSetup(io::Error::from_raw_os_error(libc::EMFILE)),
            Error::Chmod {
                path: p,
                mode: 0o600,
                source: io::Error::from_raw_os_error(libc::EPERM),
            },
        ];
        for e in &runtime {
            assert!(!e.is_usage(), "{e}");
            assert_eq!(exit_code_number(e), EXIT_RUNTIME);
        }
    }
}
