//! The frontend's error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::types::DetectError;

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
    /// The caller asked to stop while waiting for the socket.
    #[error("stopped while waiting for backend socket {path}")]
    Stopped {
        /// Socket path.
        path: PathBuf,
    },
    /// connect() failed for another reason than "not there yet".
    #[error("cannot connect to backend socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The credentials of the process listening on the socket could not be read.
    #[error("backend socket {path}: cannot learn who listens on it (SO_PEERCRED)")]
    PeerCredentials {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The socket is served by another user than this process's, root or an allowed one:
    /// guest memory is not shared with it.
    #[error(
        "backend socket {path} is served by uid {uid} (pid {pid}), not by uid {own_uid} or root: \
         refusing to share guest memory (allow it with the device option allow-uid={uid})"
    )]
    PeerNotAllowed {
        /// Socket path.
        path: PathBuf,
        /// The listener's uid.
        uid: u32,
        /// The listener's pid.
        pid: i32,
        /// This process's effective uid.
        own_uid: u32,
    },
    /// The watchdog thread of a connection could not be started.
    #[error("backend {path}: cannot start the connection's watchdog thread")]
    Watchdog {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A vhost-user request failed.
    #[error("backend {path}: {op} failed")]
    Request {
        /// Socket path.
        path: PathBuf,
        /// The request.
        op: &'static str,
        /// Underlying error.
        #[source]
        source: vhost::Error,
    },
    /// The backend does not speak vhost-user (no answer, or a broken one, during the handshake).
    #[error("{path} is not a vhost-user backend ({op} failed)")]
    NotVhostUser {
        /// Socket path.
        path: PathBuf,
        /// The first request that failed.
        op: &'static str,
        /// Underlying error.
        #[source]
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
    /// The device type could not be learned. (`reason` is this error's own detail, not an
    /// underlying failure, so it is in the message and not a source.)
    #[error("backend {path}: {reason}")]
    Detect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        reason: DetectError,
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
    #[error("guest memory cannot be shared with a backend")]
    Memory(#[source] vhost::Error),
    /// Moving the backend's state through the DEVICE_STATE pipe failed (the pipe could not
    /// be made, read or written, or the backend stopped sending or reading for too long).
    #[error("backend {path}: device state transfer: {what}")]
    StateTransfer {
        /// Socket path.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The backend sent more state than the caller accepts.
    #[error("backend {path}: device state larger than {limit} bytes")]
    StateTooLarge {
        /// Socket path.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_leave_the_source_to_the_chain() {
        let e = FrontendError::Connect {
            path: "/run/x.sock".into(),
            source: io::Error::new(io::ErrorKind::PermissionDenied, "denied"),
        };
        assert_eq!(
            e.to_string(),
            "cannot connect to backend socket /run/x.sock"
        );
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("denied"));
    }

    #[test]
    fn refusals_are_not_disconnects() {
        let refused = FrontendError::Request {
            path: "p".into(),
            op: "SET_CONFIG",
            source: vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::InvalidParam),
        };
        assert!(!refused.is_disconnect());
        let gone = FrontendError::Request {
            path: "p".into(),
            op: "SET_CONFIG",
            source: vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::Disconnected),
        };
        assert!(gone.is_disconnect());
    }
}
