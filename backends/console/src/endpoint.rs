//! The user's end of the console and the I/O thread that moves bytes between it and the
//! buffers: the backend's own terminal, a Unix socket clients attach to, a pty, or nothing
//! but the log file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use hype_daemon::{Shutdown, SocketListener};
use log::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::shared::Shared;
use crate::terminal::{
    is_tty, make_raw, set_nonblocking, window_size, EscapeAction, EscapeFilter, NonBlockingGuard,
    RawModeGuard,
};

/// Bytes read from the user's side at a time.
const READ_CHUNK: usize = 16 << 10;
/// Bytes written to the user's side at a time.
const WRITE_CHUNK: usize = 64 << 10;

/// The backend's own terminal (or whatever stdin/stdout are).
pub(crate) struct Stdio {
    /// stdin, until it reaches end of file.
    input: Option<RawFd>,
    output: Option<RawFd>,
    /// Present when stdin is a terminal: `Ctrl-a x` quits.
    escape: Option<EscapeFilter>,
    /// The terminal whose size is the console size.
    tty: Option<RawFd>,
    // Field order matters: drop the raw mode guard first, then restore the flags.
    _raw: Option<RawModeGuard>,
    _nonblock: Vec<NonBlockingGuard>,
}

/// A pty whose slave side the user opens (screen, minicom, `cat`).
pub(crate) struct Pty {
    master: File,
    /// Kept open so the master never sees a hang-up while no one has the slave open.
    _slave: File,
    /// The slave's path.
    pub path: PathBuf,
}

/// A Unix socket that one client at a time attaches to.
pub(crate) struct ClientSocket {
    listener: SocketListener,
    client: Option<UnixStream>,
    /// The client hung up or stopped taking output: it gets no more output, but what it sent
    /// before leaving is still read (until end of file) and given to the guest.
    closing: bool,
    /// The client shut down its sending side: no more input, output still goes to it.
    input_done: bool,
}

/// Where the console's other end is.
pub(crate) enum Endpoint {
    /// The backend's stdin/stdout.
    Stdio(Stdio),
    /// A pty.
    Pty(Pty),
    /// A client socket.
    Socket(ClientSocket),
    /// No reader: output only goes to the log file(s).
    None,
}

impl Stdio {
    /// Takes over stdin/stdout: raw mode if stdin is a terminal, non-blocking I/O.
    pub fn open() -> io::Result<Self> {
        let (inp, out) = (libc::STDIN_FILENO, libc::STDOUT_FILENO);
        let tty_in = is_tty(inp);
        let raw = if tty_in {
            Some(RawModeGuard::new(inp)?)
        } else {
            None
        };
        let mut nonblock = vec![NonBlockingGuard::new(inp)?];
        nonblock.push(NonBlockingGuard::new(out)?);
        let tty = [out, inp].into_iter().find(|&fd| is_tty(fd));
        Ok(Stdio {
            input: Some(inp),
            output: Some(out),
            escape: tty_in.then(EscapeFilter::default),
            tty,
            _raw: raw,
            _nonblock: nonblock,
        })
    }

    /// The terminal's size, if stdin or stdout is a terminal.
    pub fn size(&self) -> Option<(u16, u16)> {
        self.tty.and_then(window_size)
    }
}

impl Pty {
    /// Allocates a pty in raw mode.
    pub fn open() -> io::Result<Self> {
        // SAFETY: posix_openpt returns a new descriptor or -1.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let master = unsafe { File::from_raw_fd(fd) };
        // SAFETY: grantpt/unlockpt on the master descriptor we own.
        if unsafe { libc::grantpt(fd) } != 0 || unsafe { libc::unlockpt(fd) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: ptsname_r writes a NUL-terminated name of at most `name.len()` bytes.
        let rc = unsafe { libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        let path = PathBuf::from(path.to_string_lossy().into_owned());
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&path)?;
        // Raw on the slave side: no echo, no CR/LF translation of guest output.
        make_raw(slave.as_raw_fd())?;
        set_nonblocking(master.as_raw_fd())?;
        Ok(Pty {
            master,
            _slave: slave,
            path,
        })
    }
}

impl ClientSocket {
    /// Listens for clients on `path` (mode `mode`).
    pub fn bind(path: &std::path::Path, mode: u32) -> Result<Self, hype_daemon::Error> {
        Ok(ClientSocket {
            listener: SocketListener::bind(path, mode)?,
            client: None,
            closing: false,
            input_done: false,
        })
    }
}

impl Endpoint {
    /// Whether a reader drains output from the start (a socket waits for its first client).
    pub fn reader_at_start(&self) -> bool {
        matches!(self, Endpoint::Stdio(_) | Endpoint::Pty(_))
    }

    fn input_fd(&self) -> Option<RawFd> {
        match self {
            Endpoint::Stdio(s) => s.input,
            Endpoint::Pty(p) => Some(p.master.as_raw_fd()),
            Endpoint::Socket(s) if s.input_done => None,
            Endpoint::Socket(s) => s.client.as_ref().map(|c| c.as_raw_fd()),
            Endpoint::None => None,
        }
    }

    fn output_fd(&self) -> Option<RawFd> {
        match self {
            Endpoint::Stdio(s) => s.output,
            Endpoint::Pty(p) => Some(p.master.as_raw_fd()),
            Endpoint::Socket(s) if s.closing => None,
            Endpoint::Socket(s) => s.client.as_ref().map(|c| c.as_raw_fd()),
            Endpoint::None => None,
        }
    }
}

/// The eventfd SIGWINCH writes to, or -1.
static WINCH_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_winch(_: libc::c_int) {
    write_one(WINCH_FD.load(Ordering::Acquire));
}

fn write_one(fd: RawFd) {
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a valid 8-byte u64.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

fn install_handler(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) -> io::Result<()> {
    // SAFETY: a zeroed sigaction with our handler and an empty mask; the handler only calls
    // write(2). SA_RESTART keeps other threads' blocking calls going.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(sig, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Routes SIGWINCH to a new eventfd, for the I/O thread to re-read the terminal size.
pub(crate) fn watch_resizes() -> io::Result<EventFd> {
    let e = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
    WINCH_FD.store(e.as_raw_fd(), Ordering::Release);
    install_handler(libc::SIGWINCH, on_winch)?;
    Ok(e)
}

/// Routes SIGHUP to the shutdown latch (a closed terminal must restore nothing but still
/// exit cleanly, like SIGINT/SIGTERM).
pub(crate) fn hangup_shuts_down(shutdown: &Shutdown) -> io::Result<()> {
    // hype's one stop handler, already writing to `shutdown` for SIGINT/SIGTERM.
    hype_base::signals::set_wake_fd(shutdown.as_raw_fd());
    hype_base::signals::install_stop_handler(
        &[libc::SIGHUP],
        hype_base::signals::Interrupt::Restart,
    )
}

/// Moves bytes between `endpoint` and the shared buffers until `shutdown` triggers.
///
/// `winch` is the eventfd from [`watch_resizes`], for a terminal endpoint.
pub(crate) fn run_io(
    mut endpoint: Endpoint,
    shared: Arc<Shared>,
    shutdown: Shutdown,
    winch: Option<EventFd>,
) {
    shared.set_reader_live(endpoint.reader_at_start());
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut filtered = Vec::with_capacity(READ_CHUNK);
    loop {
        // What to wait for.
        let (want_in, want_out) = {
            let st = shared.lock();
            (st.input.room() > 0, !st.out.is_empty())
        };
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(6);
        let mut add = |fd: RawFd, events: libc::c_short| {
            fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
            fds.len() - 1
        };
        let i_shutdown = add(shutdown.as_raw_fd(), libc::POLLIN);
        let i_wake = add(shared.wake.as_raw_fd(), libc::POLLIN);
        let i_winch = winch.as_ref().map(|w| add(w.as_raw_fd(), libc::POLLIN));
        let i_listen = match &endpoint {
            Endpoint::Socket(s) => Some(add(s.listener.as_raw_fd(), libc::POLLIN)),
            _ => None,
        };
        let in_fd = endpoint.input_fd();
        let out_fd = endpoint.output_fd();
        let mut i_in = None;
        let mut i_out = None;
        let closing = matches!(&endpoint, Endpoint::Socket(s) if s.closing);
        // A departing client is only read while there is room (its hang-up is permanent).
        let in_fd = in_fd.filter(|_| want_in || !closing);
        if let Some(fd) = in_fd {
            // Hang-ups are reported even without POLLIN, so a gone client is noticed.
            let ev = if want_in { libc::POLLIN } else { 0 };
            i_in = Some(add(fd, ev));
        }
        // A half-closed client is not read any more, but its final hang-up must be seen.
        let i_gone = match &endpoint {
            Endpoint::Socket(ClientSocket {
                client: Some(c),
                input_done: true,
                ..
            }) => Some(add(c.as_raw_fd(), 0)),
            _ => None,
        };
        if let (Some(fd), true) = (out_fd, want_out) {
            i_out = Some(add(fd, libc::POLLOUT));
        }
        // SAFETY: `fds` is a valid array of pollfd structs of the given length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!("console I/O poll failed: {e}");
            break;
        }
        let ready =
            |i: Option<usize>, mask: libc::c_short| i.is_some_and(|i| fds[i].revents & mask != 0);
        if ready(Some(i_shutdown), libc::POLLIN) {
            break;
        }
        if ready(Some(i_wake), libc::POLLIN) {
            let _ = shared.wake.read();
        }
        if let (true, Some(w)) = (ready(i_winch, libc::POLLIN), &winch) {
            let _ = w.read();
            if let Endpoint::Stdio(s) = &endpoint {
                if let Some((cols, rows)) = s.size() {
                    if shared.set_size(cols, rows) {
                        info!("terminal resized to {cols}x{rows} (seen by the guest on its next config read; no config-change notification)");
                    }
                }
            }
        }
        // Output first: it frees room the guest may be waiting for.
        if ready(i_out, libc::POLLOUT | libc::POLLERR | libc::POLLHUP) {
            if let Err(e) = write_output(&mut endpoint, &shared) {
                lost_endpoint(&mut endpoint, &shared, Loss::Output(e));
            }
        }
        if ready(i_gone, libc::POLLHUP | libc::POLLERR) {
            lost_endpoint(&mut endpoint, &shared, Loss::InputEnded { hangup: true });
        }
        let hangup = ready(i_in, libc::POLLHUP);
        if !want_in && ready(i_in, libc::POLLERR | libc::POLLHUP) {
            // Gone while the guest is not reading: stop writing to it, keep what it sent.
            let e = io::Error::from(io::ErrorKind::BrokenPipe);
            lost_endpoint(&mut endpoint, &shared, Loss::Output(e));
        } else if ready(i_in, libc::POLLIN | libc::POLLERR | libc::POLLHUP) {
            match read_input(&mut endpoint, &shared, &mut chunk, &mut filtered) {
                Ok(InputEvent::Data) => {}
                Ok(InputEvent::Quit) => {
                    info!("Ctrl-a x typed: quitting");
                    shutdown.trigger();
                    break;
                }
                Ok(InputEvent::Eof) => {
                    lost_endpoint(&mut endpoint, &shared, Loss::InputEnded { hangup })
                }
                Err(e) => lost_endpoint(&mut endpoint, &shared, Loss::InputFailed(e)),
            }
        }
        // New clients last, so a departing client's end of file is seen first.
        if ready(i_listen, libc::POLLIN) {
            if let Endpoint::Socket(s) = &mut endpoint {
                accept_client(s, &shared);
            }
        }
    }
    WINCH_FD.store(-1, Ordering::Release);
    // Nobody drains output any more: never hold the guest back waiting for us.
    shared.set_reader_live(false);
    shared.log_totals();
    drop(endpoint);
}

enum InputEvent {
    Data,
    Quit,
    Eof,
}

fn read_input(
    endpoint: &mut Endpoint,
    shared: &Shared,
    chunk: &mut [u8],
    filtered: &mut Vec<u8>,
) -> io::Result<InputEvent> {
    let room = shared.lock().input.room();
    if room == 0 {
        return Ok(InputEvent::Data);
    }
    let want = room.min(chunk.len());
    let n = match endpoint {
        Endpoint::Stdio(s) => match s.input {
            Some(fd) => read_fd(fd, &mut chunk[..want]),
            None => return Ok(InputEvent::Data),
        },
        Endpoint::Pty(p) => (&p.master).read(&mut chunk[..want]),
        Endpoint::Socket(s) => match &mut s.client {
            Some(c) => c.read(&mut chunk[..want]),
            None => return Ok(InputEvent::Data),
        },
        Endpoint::None => return Ok(InputEvent::Data),
    };
    let n = match n {
        Ok(0) => return Ok(InputEvent::Eof),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(InputEvent::Data),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(InputEvent::Data),
        Err(e) => return Err(e),
    };
    let mut quit = false;
    let bytes: &[u8] = match endpoint {
        Endpoint::Stdio(Stdio {
            escape: Some(f), ..
        }) => {
            filtered.clear();
            quit = f.filter(&chunk[..n], filtered) == EscapeAction::Quit;
            filtered
        }
        _ => &chunk[..n],
    };
    let mut st = shared.lock();
    // Never more than `room` bytes were read, and filtering only shrinks them... except a
    // lone `Ctrl-a` carried over from the previous read; cap at the room either way.
    let taken = st.input.push(bytes);
    if taken < bytes.len() {
        warn!(
            "console input buffer full: {} bytes of input dropped",
            bytes.len() - taken
        );
    }
    shared.deliver_input(&mut st);
    Ok(if quit {
        InputEvent::Quit
    } else {
        InputEvent::Data
    })
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: read(2) into a valid, exclusively borrowed buffer of buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn write_fd(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: write(2) from a valid buffer of buf.len() bytes.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Writes as much buffered output as the endpoint takes without blocking.
fn write_output(endpoint: &mut Endpoint, shared: &Shared) -> io::Result<()> {
    let Some(fd) = endpoint.output_fd() else {
        return Ok(());
    };
    let mut st = shared.lock();
    if let Some(n) = st.out.insert_drop_notice() {
        info!("telling the reader that {n} bytes were dropped");
    }
    let mut progress = false;
    let result = loop {
        let front = st.out.front();
        if front.is_empty() {
            break Ok(());
        }
        let len = front.len().min(WRITE_CHUNK);
        match write_fd(fd, &front[..len]) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                st.out.consume(n);
                progress = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        }
    };
    if progress {
        if st.stalled {
            info!("console reader reads again");
        }
        st.stalled = false;
        drop(st);
        shared.room.notify_all();
    }
    result
}

/// What went away on the user's side.
enum Loss {
    /// Writing output failed (or the peer hung up while we were not reading).
    Output(io::Error),
    /// Input reached end of file; `hangup` when the peer closed both directions.
    InputEnded { hangup: bool },
    /// Reading input failed.
    InputFailed(io::Error),
}

/// The reader or writer side went away: a socket client detaches, stdin reached EOF, etc.
fn lost_endpoint(endpoint: &mut Endpoint, shared: &Shared, loss: Loss) {
    match endpoint {
        Endpoint::Socket(s) => {
            let detach = match &loss {
                // Keep reading what it sent before leaving; no more output to it.
                Loss::Output(_) => s.input_done,
                // A half-closed client (shutdown of its write side) still reads output.
                Loss::InputEnded { hangup } => *hangup || s.closing,
                Loss::InputFailed(_) => true,
            };
            if detach {
                if s.client.take().is_some() {
                    info!("console client detached");
                }
                s.closing = false;
                s.input_done = false;
                shared.set_reader_live(false);
            } else if matches!(loss, Loss::Output(_)) {
                s.closing = true;
                shared.set_reader_live(false);
            } else {
                s.input_done = true;
            }
        }
        Endpoint::Stdio(s) => match loss {
            Loss::Output(e) => {
                warn!("stdout failed ({e}); guest output is only buffered now");
                s.output = None;
                shared.set_reader_live(false);
            }
            Loss::InputEnded { .. } => {
                info!("stdin reached end of file; guest input ends");
                s.input = None;
            }
            Loss::InputFailed(e) => {
                warn!("stdin failed ({e}); guest input ends");
                s.input = None;
            }
        },
        Endpoint::Pty(_) => {
            // Our own slave descriptor keeps the pty alive; a transient error is logged.
            match loss {
                Loss::Output(e) | Loss::InputFailed(e) => warn!("pty: {e}"),
                Loss::InputEnded { .. } => warn!("pty: end of file"),
            }
        }
        Endpoint::None => {}
    }
}

fn accept_client(s: &mut ClientSocket, shared: &Shared) {
    // SAFETY: accept4(2) on our listening socket; no address is requested.
    let fd = unsafe {
        libc::accept4(
            s.listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
            warn!("cannot accept a console client: {e}");
        }
        return;
    }
    // SAFETY: accept4 returned a new descriptor that we own.
    let mut stream = unsafe { UnixStream::from_raw_fd(fd) };
    if s.client.is_some() && !s.closing {
        let _ = stream.write_all(b"hype-console: another client is attached\r\n");
        info!("refused a second console client");
        return;
    }
    if s.client.is_some() {
        info!("console client detached (replaced before all of its input was read)");
    }
    info!("console client attached");
    s.client = Some(stream);
    s.closing = false;
    s.input_done = false;
    shared.set_reader_live(true);
    shared.wake_io();
}
