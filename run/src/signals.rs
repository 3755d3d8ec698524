//! Signals for the supervisor: SIGCHLD, SIGINT, SIGTERM and SIGHUP are blocked in the
//! supervising thread and taken synchronously with `sigtimedwait`, so no handler runs and no
//! child exit or stop request is missed between two checks. Children start with an empty mask
//! (the standard library resets it before exec).

use std::io;
use std::time::Duration;

/// What the supervisor was woken by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A child changed state.
    Child,
    /// A stop request (the signal number).
    Stop(libc::c_int),
    /// The timeout passed (or an unrelated interruption).
    Timeout,
}

/// The signals the supervisor takes; blocked while this lives, restored on drop.
pub struct BlockedSignals {
    set: libc::sigset_t,
    old: libc::sigset_t,
}

impl BlockedSignals {
    /// Blocks the supervisor's signals in the calling thread.
    pub fn block() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame.
        unsafe {
            libc::sigemptyset(&mut set);
            for s in [libc::SIGCHLD, libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
        }
        // SAFETY: both pointers are valid sigset_t values for the duration of the call.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(BlockedSignals { set, old })
    }

    /// Waits up to `timeout` for one of the blocked signals.
    pub fn wait(&self, timeout: Duration) -> io::Result<Wake> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `set` is initialised, `ts` is valid for the call; a null siginfo pointer is
        // allowed.
        let r = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(Wake::Timeout),
                _ => Err(e),
            };
        }
        Ok(if r == libc::SIGCHLD {
            Wake::Child
        } else {
            Wake::Stop(r)
        })
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `block`; `old` is a valid sigset_t.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// Sends `sig` to process `pid` (ignoring a process that is already gone).
pub fn send(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a positive pid of our own child; no memory is involved.
    unsafe { libc::kill(pid, sig) };
}
