//! Raw mode for the VMM's terminal while a guest owns the serial console, restored on every exit
//! path: normal return (guard drop), errors, signals (the main loop ends and drops the guard), and
//! panics (a hook restores the saved state).

use std::sync::OnceLock;

static SAVED: OnceLock<libc::termios> = OnceLock::new();

/// Restores the terminal when dropped.
pub struct RawModeGuard {
    fd: i32,
    saved: libc::termios,
}

fn restore(fd: i32, t: &libc::termios) {
    // SAFETY: `t` is a valid termios obtained from tcgetattr on this fd; failure is harmless.
    unsafe {
        libc::tcsetattr(fd, libc::TCSANOW, t);
    }
}

impl RawModeGuard {
    /// Puts stdin in raw mode if it is a terminal; `None` if it is not.
    pub fn stdin() -> Option<RawModeGuard> {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it and its result is checked.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so log lines printed meanwhile still start at column 0.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        let _ = SAVED.set(saved);
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(t) = SAVED.get() {
                restore(libc::STDIN_FILENO, t);
            }
            prev(info);
        }));
        // SAFETY: valid fd and termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawModeGuard { fd, saved })
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        restore(self.fd, &self.saved);
    }
}
