//! Terminal handling: raw mode that is always restored (guard drop, and a panic hook for
//! panics on other threads), window size, and the `Ctrl-a` escape sequence. The one copy for
//! the VMM's serial console and `hype console`.

use std::io;
use std::os::fd::RawFd;

/// The escape prefix: `Ctrl-a`.
pub const ESCAPE_PREFIX: u8 = 0x01;

/// Whether `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty(3) only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// The window size of terminal `fd` as (columns, rows), if it has one.
pub fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    let mut ws: libc::winsize = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` to the pointer, which points at a local one.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws as *mut libc::winsize) };
    if rc != 0 || (ws.ws_col == 0 && ws.ws_row == 0) {
        return None;
    }
    Some((ws.ws_col, ws.ws_row))
}

/// Puts terminal `fd` into raw mode for good (e.g. a pty this process owns).
pub fn make_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: a zeroed termios is valid storage for tcgetattr to fill.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes into `t`, a valid local; cfmakeraw modifies only `t`;
    // tcsetattr reads it.
    let rc = unsafe {
        if libc::tcgetattr(fd, &mut t) != 0 {
            -1
        } else {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd, libc::TCSANOW, &t)
        }
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts a terminal into raw mode and restores its previous settings (and file status flags)
/// when dropped, on every exit path that unwinds or returns.
#[derive(Debug)]
pub struct RawModeGuard {
    fd: RawFd,
    saved: libc::termios,
}

impl RawModeGuard {
    /// Switches `fd` to raw mode (no echo, no line editing, no signals from keys, 8-bit).
    pub fn new(fd: RawFd) -> io::Result<Self> {
        Self::with(fd, false)
    }

    /// Raw input, but output post-processing kept (`OPOST | ONLCR`), so that log lines this
    /// process prints meanwhile still start at column 0: the VMM's serial console.
    pub fn keeping_output_processing(fd: RawFd) -> io::Result<Self> {
        Self::with(fd, true)
    }

    fn with(fd: RawFd, keep_output: bool) -> io::Result<Self> {
        // SAFETY: a zeroed termios is valid storage for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes the settings of `fd` into `saved`, a valid local.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        if keep_output {
            raw.c_oflag |= libc::OPOST | libc::ONLCR;
        }
        install_panic_restore();
        saved_terminals().push((fd, saved));
        // SAFETY: tcsetattr reads a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            let err = io::Error::last_os_error();
            saved_terminals().retain(|(f, _)| *f != fd);
            return Err(err);
        }
        Ok(RawModeGuard { fd, saved })
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        saved_terminals().retain(|(f, _)| *f != self.fd);
        // SAFETY: restores the settings read in `new` on the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSAFLUSH, &self.saved) };
    }
}

/// Terminals in raw mode and their original settings, for the panic hook: a panic on another
/// thread ends the process without running the guard's destructor.
static SAVED: std::sync::Mutex<Vec<(RawFd, libc::termios)>> = std::sync::Mutex::new(Vec::new());

fn saved_terminals() -> std::sync::MutexGuard<'static, Vec<(RawFd, libc::termios)>> {
    SAVED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Chains a panic hook that restores every terminal still in raw mode.
fn install_panic_restore() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // try_lock: never deadlock if the panic happened while the list was locked.
            let list = match SAVED.try_lock() {
                Ok(l) => Some(l),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            };
            for (fd, t) in list.iter().flat_map(|l| l.iter()) {
                // SAFETY: restores settings read earlier from the same descriptor.
                unsafe { libc::tcsetattr(*fd, libc::TCSAFLUSH, t) };
            }
            previous(info);
        }));
    });
}

/// Sets `O_NONBLOCK` on a descriptor this process owns, for good.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor; no memory involved.
    let rc = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `O_NONBLOCK` on a descriptor and restores its previous flags when dropped (stdio
/// descriptors are shared with the parent shell, which must not be left non-blocking).
#[derive(Debug)]
pub struct NonBlockingGuard {
    fd: RawFd,
    saved: libc::c_int,
}

impl NonBlockingGuard {
    /// Makes `fd` non-blocking.
    pub fn new(fd: RawFd) -> io::Result<Self> {
        // SAFETY: F_GETFL on a descriptor; no memory involved.
        let saved = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if saved < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: F_SETFL with flags derived from the current ones.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, saved | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NonBlockingGuard { fd, saved })
    }
}

impl Drop for NonBlockingGuard {
    fn drop(&mut self) {
        // SAFETY: restores the flags read in `new`.
        unsafe { libc::fcntl(self.fd, libc::F_SETFL, self.saved) };
    }
}

/// What the escape filter found in a chunk of keyboard input.
#[derive(Debug, PartialEq, Eq)]
pub enum EscapeAction {
    /// Nothing special: forward the filtered bytes.
    None,
    /// `Ctrl-a x` was typed: quit (or detach); bytes before it are still forwarded.
    Quit,
}

/// Recognises `Ctrl-a x` (quit/detach) in keyboard input; `Ctrl-a Ctrl-a` sends one `Ctrl-a`,
/// `Ctrl-a` followed by anything else sends both bytes.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    pending_prefix: bool,
}

impl EscapeFilter {
    /// Filters `input`, appending what should be forwarded to `out`.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> EscapeAction {
        for &b in input {
            if self.pending_prefix {
                self.pending_prefix = false;
                match b {
                    b'x' | b'X' => return EscapeAction::Quit,
                    ESCAPE_PREFIX => out.push(ESCAPE_PREFIX),
                    other => out.extend([ESCAPE_PREFIX, other]),
                }
            } else if b == ESCAPE_PREFIX {
                self.pending_prefix = true;
            } else {
                out.push(b);
            }
        }
        EscapeAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        assert_eq!(f.filter(b"ab\x01\x01c\x01d", &mut out), EscapeAction::None);
        assert_eq!(out, b"ab\x01c\x01d");
        out.clear();
        // Split across reads.
        assert_eq!(f.filter(b"z\x01", &mut out), EscapeAction::None);
        assert_eq!(f.filter(b"x", &mut out), EscapeAction::Quit);
        assert_eq!(out, b"z");
    }
}
