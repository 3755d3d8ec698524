//! Clean shutdown on SIGINT/SIGTERM (or on request from code).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use hype_base::signals;

use crate::Error;

/// A latch that stops [`serve`](crate::serve): set by SIGINT/SIGTERM once
/// [`Shutdown::install_signal_handlers`] was called, or by [`Shutdown::trigger`].
///
/// It is an eventfd that is never read, so once triggered it stays readable and every poller
/// sees it. Clones share the same latch.
#[derive(Clone, Debug)]
pub struct Shutdown {
    evt: Arc<EventFd>,
}

impl Shutdown {
    /// Creates an untriggered latch.
    pub fn new() -> Result<Self, Error> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(Error::ShutdownEvent)?;
        Ok(Shutdown { evt: Arc::new(evt) })
    }

    /// Routes SIGINT and SIGTERM of this process to this latch.
    pub fn install_signal_handlers(&self) -> Result<(), Error> {
        // hype's one stop handler (hype-base), writing to this latch. No SA_RESTART: blocking
        // calls return EINTR so the loop re-checks the latch.
        signals::set_wake_fd(self.evt.as_raw_fd());
        signals::install_stop_handler(
            &[libc::SIGINT, libc::SIGTERM],
            signals::Interrupt::Interrupt,
        )
        .map_err(Error::SignalHandler)
    }

    /// Triggers the latch (what the signal handler does).
    pub fn trigger(&self) {
        let _ = self.evt.write(1);
    }

    /// Whether the latch was triggered.
    pub fn is_triggered(&self) -> bool {
        poll_readable(&[self.as_raw_fd()], 0)
            .map(|r| r[0])
            .unwrap_or(false)
    }
}

impl AsRawFd for Shutdown {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl Drop for Shutdown {
    fn drop(&mut self) {
        // Only the last clone unbinds the signal handler, so it never writes to a closed fd.
        if Arc::strong_count(&self.evt) == 1 {
            signals::clear_wake_fd(self.evt.as_raw_fd());
        }
    }
}

/// Polls `fds` for readability; returns which are readable. `timeout_ms < 0` waits forever.
/// EINTR is reported as "nothing readable" so callers re-check their latches.
pub(crate) fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid, exclusively borrowed array of `pfds.len()` pollfd structs.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(err);
    }
    Ok(pfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_latches_for_all_clones() {
        let s = Shutdown::new().unwrap();
        let c = s.clone();
        assert!(!s.is_triggered());
        c.trigger();
        assert!(s.is_triggered());
        // Stays triggered: it is never consumed.
        assert!(s.is_triggered());
    }
}
