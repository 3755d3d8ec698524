//! A backend running as a child process, for tests and benchmarks: start it, wait (bounded)
//! for its socket, signal it, wait (bounded) for its exit, and never leave it running (drop
//! kills and reaps it). The one copy of what every backend's tests used to spell out.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How long [`BackendProcess::spawn`] waits for the socket.
pub const SOCKET_WAIT: Duration = Duration::from_secs(20);

/// Errors of a backend process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The process could not be started.
    #[error("cannot start the backend")]
    Spawn(#[source] io::Error),
    /// The process ended before its socket appeared.
    #[error("backend exited ({status}) before {socket} appeared")]
    ExitedEarly {
        /// How it ended.
        status: ExitStatus,
        /// The socket it should have created.
        socket: PathBuf,
    },
    /// The socket did not appear in time.
    #[error("backend socket {socket} did not appear within {waited:?}")]
    NoSocket {
        /// The socket.
        socket: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// The process did not exit in time.
    #[error("backend did not exit within {0:?}")]
    NoExit(Duration),
    /// The process was already reaped.
    #[error("backend already reaped")]
    Gone,
    /// Waiting for the process failed.
    #[error("cannot wait for the backend")]
    Wait(#[source] io::Error),
}

/// A backend process listening (eventually) on a Unix socket.
#[derive(Debug)]
pub struct BackendProcess {
    child: Option<Child>,
    socket: PathBuf,
}

impl BackendProcess {
    /// Starts `cmd`, whose arguments make it listen on `socket`, without waiting.
    pub fn start(cmd: &mut Command, socket: &Path) -> Result<Self, ProcessError> {
        let child = cmd.spawn().map_err(ProcessError::Spawn)?;
        Ok(Self::from_child(child, socket))
    }

    /// Starts `cmd` and waits up to [`SOCKET_WAIT`] for `socket` to appear.
    pub fn spawn(cmd: &mut Command, socket: &Path) -> Result<Self, ProcessError> {
        let mut p = Self::start(cmd, socket)?;
        p.wait_for_socket(SOCKET_WAIT)?;
        Ok(p)
    }

    /// Wraps an already started process that listens on `socket`.
    pub fn from_child(child: Child, socket: &Path) -> Self {
        BackendProcess {
            child: Some(child),
            socket: socket.to_owned(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The child, while it has not been reaped (e.g. to take its stdout).
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Waits up to `timeout` for the socket to exist; fails early if the process exits.
    pub fn wait_for_socket(&mut self, timeout: Duration) -> Result<(), ProcessError> {
        let start = Instant::now();
        loop {
            let is_socket =
                std::fs::metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket());
            if is_socket {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().map_err(ProcessError::Wait)? {
                    self.child = None;
                    return Err(ProcessError::ExitedEarly {
                        status,
                        socket: self.socket.clone(),
                    });
                }
            }
            if start.elapsed() > timeout {
                return Err(ProcessError::NoSocket {
                    socket: self.socket.clone(),
                    waited: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The process id, while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `sig` (SIGSTOP makes a hung backend); nothing if already reaped.
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(pid) = self.pid().and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// Waits up to `timeout` for the process to exit, and reaps it.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        let c = self.child.as_mut().ok_or(ProcessError::Gone)?;
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait().map_err(ProcessError::Wait)? {
                self.child = None;
                return Ok(status);
            }
            if start.elapsed() > timeout {
                return Err(ProcessError::NoExit(timeout));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `sig` and waits up to `timeout` for the exit.
    pub fn signal_and_wait(
        &mut self,
        sig: libc::c_int,
        timeout: Duration,
    ) -> Result<ExitStatus, ProcessError> {
        self.signal(sig);
        self.wait(timeout)
    }

    /// SIGKILLs (a crash) and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_exits_without_a_socket_is_reported() {
        let sock = std::env::temp_dir().join(format!("testkit-proc-{}.sock", std::process::id()));
        let e = BackendProcess::spawn(&mut Command::new("true"), &sock).unwrap_err();
        assert!(matches!(e, ProcessError::ExitedEarly { .. }), "{e}");
    }

    #[test]
    fn signal_and_wait_reaps() {
        let sock = std::env::temp_dir().join("never.sock");
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut p = BackendProcess::start(&mut cmd, &sock).unwrap();
        assert!(p.alive());
        let st = p.signal_and_wait(libc::SIGTERM, SOCKET_WAIT).unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGTERM)
        );
        assert!(!p.alive());
        assert!(p.pid().is_none());
    }
}
