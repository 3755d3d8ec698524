//! Cuts a connection whose backend does not answer in time.
//!
//! The `vhost` crate retries reads that time out, so a socket timeout cannot bound a request.
//! Instead, while a request sequence is in progress a deadline is armed; if it passes, the
//! watchdog thread shuts the socket down, the pending read sees end-of-file and the request
//! fails with a disconnect error (the caller then reconnects).

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The shared state of one watchdog thread.
#[derive(Debug)]
pub struct Watchdog {
    state: Mutex<WatchState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct WatchState {
    deadline: Option<Instant>,
    closed: bool,
}

/// Owns a watchdog thread: dropping it ends the thread (and its copy of the socket).
#[derive(Debug)]
pub struct WatchdogHandle(Arc<Watchdog>);

impl std::ops::Deref for WatchdogHandle {
    type Target = Watchdog;
    fn deref(&self) -> &Watchdog {
        &self.0
    }
}

impl Drop for WatchdogHandle {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Disarms the watchdog when dropped.
#[derive(Debug)]
pub struct Armed<'a>(&'a Watchdog);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.0.lock().deadline = None;
    }
}

impl Watchdog {
    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the watchdog thread for `sock`; it ends when the handle is dropped.
    pub fn spawn(sock: &UnixStream) -> io::Result<WatchdogHandle> {
        let sock = sock.try_clone()?;
        let dog = Arc::new(Watchdog {
            state: Mutex::new(WatchState::default()),
            cv: Condvar::new(),
        });
        let d = dog.clone();
        std::thread::Builder::new()
            .name("vu-watchdog".into())
            .spawn(move || {
                hype_sandbox::thread::enter(hype_sandbox::thread::VHOST_WATCHDOG);
                d.watch(sock)
            })?;
        Ok(WatchdogHandle(dog))
    }

    fn watch(&self, sock: UnixStream) {
        let mut st = self.lock();
        loop {
            if st.closed {
                return;
            }
            match st.deadline {
                None => st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) if Instant::now() >= d => {
                    log::warn!(
                        "vhost-user backend did not answer in time; dropping the connection"
                    );
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                    st.deadline = None;
                }
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    st = self
                        .cv
                        .wait_timeout(st, left)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
        }
    }

    /// Arms a deadline `timeout` from now until the returned guard is dropped.
    pub fn arm(&self, timeout: Duration) -> Armed<'_> {
        self.lock().deadline = Some(Instant::now() + timeout);
        self.cv.notify_all();
        Armed(self)
    }

    /// Ends the thread.
    pub fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_passed_deadline_cuts_the_socket_and_a_disarmed_one_does_not() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let dog = Watchdog::spawn(&a).unwrap();
        drop(dog.arm(Duration::from_millis(20)));
        std::thread::sleep(Duration::from_millis(60));
        b.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1];
        // Still open: nothing to read yet.
        assert!(b.read(&mut buf).is_err());
        let _armed = dog.arm(Duration::from_millis(20));
        b.set_nonblocking(false).unwrap();
        // The watchdog shuts the socket down: end of file.
        assert_eq!(b.read(&mut buf).unwrap(), 0);
    }
}
