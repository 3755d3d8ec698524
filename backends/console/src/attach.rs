//! `hype console attach PATH`: a tiny raw-mode terminal client for the backend's client socket.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::EventFd;

use crate::terminal::{is_tty, EscapeAction, EscapeFilter, NonBlockingGuard, RawModeGuard};
use crate::Error;

static STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop(_: libc::c_int) {
    let fd = STOP_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a valid 8-byte u64.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Why [`attach`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detach {
    /// The user typed `Ctrl-a x`.
    Escape,
    /// The backend closed the connection (it exited, or refused a second client).
    Closed,
    /// stdin reached end of file (not a terminal).
    InputEnded,
    /// SIGINT, SIGTERM or SIGHUP.
    Signal,
}

/// Connects to a console backend's client socket and joins it to this terminal until the
/// user types `Ctrl-a x` (when stdin is a terminal), the backend goes away, or a signal
/// arrives. The terminal is in raw mode meanwhile and restored on every return.
pub fn attach(path: &Path) -> Result<Detach, Error> {
    let mut sock = UnixStream::connect(path).map_err(|source| Error::Attach {
        path: path.to_path_buf(),
        source,
    })?;
    let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::Signals)?;
    STOP_FD.store(stop.as_raw_fd(), Ordering::Release);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with our handler and an empty mask; the handler only
        // calls write(2).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(Error::Signals(io::Error::last_os_error()));
        }
    }
    let (inp, out) = (libc::STDIN_FILENO, libc::STDOUT_FILENO);
    let tty = is_tty(inp);
    let result = {
        let _raw = if tty {
            Some(RawModeGuard::new(inp).map_err(Error::Terminal)?)
        } else {
            None
        };
        if tty {
            let _ = write_all_fd(
                libc::STDERR_FILENO,
                format!("[attached to {}; Ctrl-a x detaches]\r\n", path.display()).as_bytes(),
            );
        }
        let _nb = NonBlockingGuard::new(sock.as_raw_fd()).map_err(Error::Terminal)?;
        pump(&mut sock, inp, out, tty, &stop)
    };
    STOP_FD.store(-1, Ordering::Release);
    if tty && result.is_ok() {
        let _ = write_all_fd(libc::STDERR_FILENO, b"\n[detached]\n");
    }
    result.map_err(|source| Error::Attach {
        path: path.to_path_buf(),
        source,
    })
}

fn pump(
    sock: &mut UnixStream,
    inp: RawFd,
    out: RawFd,
    tty: bool,
    stop: &EventFd,
) -> io::Result<Detach> {
    let mut escape = EscapeFilter::default();
    let mut buf = vec![0u8; 16 << 10];
    let mut filtered = Vec::new();
    let mut input_open = true;
    loop {
        let mut fds = vec![
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if input_open {
            fds.push(libc::pollfd {
                fd: inp,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: valid array of pollfd structs of the given length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            return Ok(Detach::Signal);
        }
        if fds[1].revents != 0 {
            match sock.read(&mut buf) {
                Ok(0) => return Ok(Detach::Closed),
                Ok(n) => write_all_fd(out, &buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Detach::Closed),
                Err(e) => return Err(e),
            }
        }
        if input_open && fds.get(2).is_some_and(|f| f.revents != 0) {
            // SAFETY: read(2) into a valid buffer of buf.len() bytes.
            let n = unsafe { libc::read(inp, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted && e.kind() != io::ErrorKind::WouldBlock {
                    return Err(e);
                }
                continue;
            }
            if n == 0 {
                if tty {
                    return Ok(Detach::InputEnded);
                }
                // Piped input ended: keep showing output until the backend closes.
                input_open = false;
                let _ = sock.shutdown(std::net::Shutdown::Write);
                continue;
            }
            let bytes = &buf[..n as usize];
            let action = if tty {
                filtered.clear();
                let a = escape.filter(bytes, &mut filtered);
                send_all(sock, &filtered)?;
                a
            } else {
                send_all(sock, bytes)?;
                EscapeAction::None
            };
            if action == EscapeAction::Quit {
                return Ok(Detach::Escape);
            }
        }
    }
}

/// Writes everything to a possibly non-blocking socket, waiting for room as needed.
fn send_all(sock: &mut UnixStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match sock.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_fd(sock.as_raw_fd(), libc::POLLOUT)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_all_fd(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: write(2) from a valid buffer of data.len() bytes.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    wait_fd(fd, libc::POLLOUT);
                    continue;
                }
                _ => return Err(e),
            }
        }
        data = &data[n as usize..];
    }
    Ok(())
}

fn wait_fd(fd: RawFd, events: libc::c_short) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 1000) };
}
