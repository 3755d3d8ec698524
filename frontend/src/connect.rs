//! Connecting to a backend's socket: once, or waiting for it to appear.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::FrontendError;

/// How often [`connect_waiting`] looks for the socket.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Whether a connect() error means "the backend is not there (yet)".
fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

/// Connects once; `Ok(None)` when the backend is not there (yet).
pub fn try_connect(path: &Path) -> Result<Option<UnixStream>, FrontendError> {
    use std::os::unix::fs::FileTypeExt;
    // connect() to something that is not a socket says "refused", like a socket whose
    // backend is not listening yet: tell them apart, or hype would wait for a file forever.
    if let Ok(m) = std::fs::metadata(path) {
        if !m.file_type().is_socket() {
            return Err(FrontendError::Connect {
                path: path.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a Unix socket"),
            });
        }
    }
    match UnixStream::connect(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if is_absent(&e) => Ok(None),
        Err(source) => Err(FrontendError::Connect {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Connects to `path`, waiting for the socket to appear for at most `wait` (forever if
/// `None`), with a log line saying what it waits for.
pub fn connect_waiting(
    path: &Path,
    wait: Option<Duration>,
    what: &str,
) -> Result<UnixStream, FrontendError> {
    connect_waiting_until(path, wait, what, &|| false)
}

/// [`connect_waiting`] that also gives up with [`FrontendError::Stopped`] as soon as
/// `stop()` says so (checked every [`POLL_INTERVAL`]): a VMM asked to stop (SIGTERM) while
/// waiting for a backend ends like any other stop.
pub fn connect_waiting_until(
    path: &Path,
    wait: Option<Duration>,
    what: &str,
    stop: &dyn Fn() -> bool,
) -> Result<UnixStream, FrontendError> {
    let start = Instant::now();
    let mut logged = false;
    loop {
        if let Some(s) = try_connect(path)? {
            if logged {
                log::info!(
                    "{what}: backend socket {} is there after {:?}",
                    path.display(),
                    start.elapsed()
                );
            }
            return Ok(s);
        }
        if stop() {
            return Err(FrontendError::Stopped {
                path: path.to_owned(),
            });
        }
        if wait.is_some_and(|w| start.elapsed() >= w) {
            return Err(FrontendError::WaitTimeout {
                path: path.to_owned(),
                waited: start.elapsed(),
            });
        }
        if !logged {
            let limit = match wait {
                Some(w) => format!("up to {w:?}"),
                None => "with no time limit (--device-wait sets one)".into(),
            };
            log::info!(
                "{what}: waiting for backend socket {} {limit}",
                path.display()
            );
            logged = true;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_file_and_listening_socket() {
        let dir =
            std::env::temp_dir().join(format!("hype-frontend-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let _ = std::fs::remove_file(&sock);
        assert!(try_connect(&sock).unwrap().is_none());
        let e = connect_waiting(&sock, Some(Duration::from_millis(60)), "t").unwrap_err();
        assert!(matches!(e, FrontendError::WaitTimeout { .. }), "{e}");
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            try_connect(&file),
            Err(FrontendError::Connect { .. })
        ));
        let t = Instant::now();
        let e =
            connect_waiting_until(&sock, None, "t", &|| t.elapsed() > POLL_INTERVAL).unwrap_err();
        assert!(matches!(e, FrontendError::Stopped { .. }), "{e}");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(try_connect(&sock).unwrap().is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
