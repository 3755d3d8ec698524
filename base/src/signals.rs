//! Stopping on a signal: the one async-signal-safe stop handler of every hype program that
//! runs until SIGINT/SIGTERM (the VMM, every backend; `hype console` adds SIGHUP).
//!
//! The handler records that a stop was asked ([`stop_requested`], for loops that poll a
//! flag) and, when a wake-up eventfd is registered ([`set_wake_fd`]), writes to it so a
//! `poll` loop wakes at once. (`hype run`'s supervisor instead blocks its signals and takes
//! them synchronously with `sigtimedwait`, together with SIGCHLD: no handler runs there.)

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static STOP_COUNT: AtomicUsize = AtomicUsize::new(0);
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    STOP_COUNT.fetch_add(1, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a valid 8-byte u64 on our stack.
        unsafe { libc::write(fd, (&one as *const u64).cast(), std::mem::size_of::<u64>()) };
    }
}

/// Whether blocking calls interrupted by a stop signal are restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// `SA_RESTART`: other threads' blocking calls carry on; the flag or fd says "stop".
    Restart,
    /// Blocking calls return `EINTR`, so a loop blocked in one re-checks at once.
    Interrupt,
}

/// Installs the stop handler for each of `signals`.
pub fn install_stop_handler(signals: &[libc::c_int], mode: Interrupt) -> io::Result<()> {
    for &sig in signals {
        // SAFETY: a zeroed sigaction is a valid starting point; we set the handler, an empty
        // mask and the flags; `on_stop` only stores to atomics and calls write(2).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = match mode {
                Interrupt::Restart => libc::SA_RESTART,
                Interrupt::Interrupt => 0,
            };
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether a stop signal has arrived since the process started.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// How many stop signals have arrived (a first one can ask politely, a second one insists).
pub fn stop_count() -> usize {
    STOP_COUNT.load(Ordering::SeqCst)
}

/// Makes the handler also write 1 to eventfd `fd` on every stop signal.
pub fn set_wake_fd(fd: RawFd) {
    WAKE_FD.store(fd, Ordering::Release);
}

/// Stops writing to `fd` (if it is still the registered one), before it is closed.
pub fn clear_wake_fd(fd: RawFd) {
    let _ = WAKE_FD.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Acquire);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_signal_sets_the_flag_and_wakes_the_fd() {
        // SAFETY: eventfd(2) with valid flags; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        set_wake_fd(fd);
        // SIGUSR2 stands in for SIGTERM so the test process is never at risk.
        install_stop_handler(&[libc::SIGUSR2], Interrupt::Restart).unwrap();
        // SAFETY: raise(3) sends a signal to this thread; a handler is installed.
        assert_eq!(unsafe { libc::raise(libc::SIGUSR2) }, 0);
        assert!(stop_requested());
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a valid u64 from our eventfd.
        let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
        assert_eq!((n, v), (8, 1));
        clear_wake_fd(fd);
        // SAFETY: closing the eventfd we opened.
        unsafe { libc::close(fd) };
    }
}
