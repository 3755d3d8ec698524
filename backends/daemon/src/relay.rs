//! A message relay between the frontend and `vhost-user-backend`'s daemon, so that backends
//! accept message orders the vhost-user spec allows but the `vhost` crate's request handler
//! refuses.
//!
//! The one such order met so far: QEMU's virtio-net sends `SET_VRING_ENABLE` as soon as the
//! device is realized or reset, before `SET_FEATURES` (it checks that the backend *offers*
//! `VHOST_USER_F_PROTOCOL_FEATURES`, not that it was acked). `vhost` 0.18 ends the connection
//! with "inactive feature" then. The relay answers such an early request itself (an ack when
//! the frontend asked for one), remembers the ring's state, and hands it to the backend right
//! after the `SET_FEATURES` that acks `VHOST_USER_F_PROTOCOL_FEATURES` (without it, the spec
//! starts every ring enabled and the request has nothing to say). Every other message, and
//! every reply, passes through unchanged with its file descriptors.
//!
//! The daemon only accepts connections from a listener, so the relay talks to it over a
//! private abstract-namespace socket, bound once before the process confines itself, with a
//! backlog of one: the relay drains it, then connects without waiting, so the one connection
//! the daemon accepts is the relay's own.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::shutdown::poll_readable;

/// `VHOST_USER_SET_FEATURES`.
const SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_VRING_ENABLE`.
const SET_VRING_ENABLE: u32 = 18;
/// Header flags: version 1.
const VERSION_1: u32 = 0x1;
/// Header flags: this is a reply.
const REPLY: u32 = 0x4;
/// Header flags: the frontend wants a reply (REPLY_ACK).
const NEED_REPLY: u32 = 0x8;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Largest payload relayed (the `vhost` crate's own limit is 4 KiB).
const MAX_PAYLOAD: usize = 0x1000;
/// Most file descriptors one message carries (the `vhost` crate's limit).
const MAX_FDS: usize = 32;
/// How often a connection to the inner listener is retried when a stranger holds its
/// one-slot backlog.
const CONNECT_TRIES: u32 = 16;

/// The daemon's side of the relay: a private listening socket.
pub(crate) struct InnerListener {
    listener: Listener,
    name: Vec<u8>,
}

impl std::fmt::Debug for InnerListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InnerListener")
            .field("name", &String::from_utf8_lossy(&self.name))
            .finish()
    }
}

impl InnerListener {
    /// Binds a fresh abstract socket with a backlog of one pending connection.
    pub(crate) fn bind() -> io::Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "hype-daemon-relay-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        )
        .into_bytes();
        let addr = SocketAddr::from_abstract_name(&name)?;
        let l = UnixListener::bind_addr(&addr)?;
        // SAFETY: listen(2) on the socket `l` owns; 0 lets exactly one connection wait.
        if unsafe { libc::listen(l.as_raw_fd(), 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        l.set_nonblocking(true)?;
        Ok(InnerListener {
            listener: Listener::from(l),
            name,
        })
    }

    /// The listener `VhostUserDaemon::start` accepts from, once [`InnerListener::connect`]
    /// made the one connection waiting there.
    pub(crate) fn listener(&mut self) -> &mut Listener {
        &mut self.listener
    }

    /// Drops whatever waits in the backlog, then connects without blocking: the connection
    /// that then waits is this one.
    pub(crate) fn connect(&mut self) -> io::Result<UnixStream> {
        for _ in 0..CONNECT_TRIES {
            while let Ok(Some(stranger)) = self.listener.accept() {
                // A connection left from a frontend that went away before it was accepted,
                // or one nobody here made.
                log::debug!("relay: dropping a waiting connection");
                drop(stranger);
            }
            match connect_nonblocking(&self.name) {
                Ok(s) => {
                    set_blocking(&s)?;
                    return Ok(s);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        // `WouldBlock`: the caller waits a little and tries again, so a local stranger who
        // keeps the slot busy delays the next frontend but cannot end the backend.
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "the relay's private socket stays busy (someone else keeps connecting)",
        ))
    }
}

/// Clears O_NONBLOCK with fcntl(2) (`set_nonblocking` would use an ioctl the sandbox
/// forbids).
fn set_blocking(s: &UnixStream) -> io::Result<()> {
    // SAFETY: fcntl(2) F_GETFL/F_SETFL on a descriptor `s` owns.
    unsafe {
        let flags = libc::fcntl(s.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(s.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// socket(2) + connect(2) to the abstract `name`, failing with `WouldBlock` instead of
/// waiting when the backlog is full.
fn connect_nonblocking(name: &[u8]) -> io::Result<UnixStream> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if name.len() + 1 > addr.sun_path.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // Abstract: a leading NUL, then the name (not NUL-terminated).
    for (dst, src) in addr.sun_path[1..].iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes; `sock` is open.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}

/// One vhost-user message: header, payload, descriptors.
struct Message {
    header: [u8; 12],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ])
    }

    fn new(request: u32, flags: u32, payload: Vec<u8>) -> Message {
        let mut header = [0u8; 12];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Message {
            header,
            payload,
            fds: Vec::new(),
        }
    }
}

/// Reads one message; `None` at a clean end of stream.
fn read_message(sock: &mut UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; 12];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    }];
    // SAFETY: the iovec points into `header`, which outlives the call.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw) }.map_err(io::Error::from)?;
    let fds: Vec<OwnedFd> = raw[..nfds.min(MAX_FDS)]
        .iter()
        // SAFETY: the kernel just installed these descriptors in this process for us.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    read_exact(sock, &mut header[n..])?;
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {size} bytes (at most {MAX_PAYLOAD})"),
        ));
    }
    let mut payload = vec![0u8; size];
    read_exact(sock, &mut payload)?;
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
}

fn write_message(sock: &mut UnixStream, m: &Message) -> io::Result<()> {
    let fds: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut bytes = Vec::with_capacity(12 + m.payload.len());
    bytes.extend_from_slice(&m.header);
    bytes.extend_from_slice(&m.payload);
    let sent = sock
        .send_with_fds(&[&bytes[..]], &fds)
        .map_err(io::Error::from)?;
    let mut rest = bytes.get(sent..).unwrap_or_default();
    while !rest.is_empty() {
        // SAFETY: write(2) from a live buffer of `rest.len()` bytes to an open socket.
        let n = unsafe { libc::write(sock.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
        match n {
            n if n > 0 => rest = &rest[n as usize..],
            0 => return Err(io::ErrorKind::WriteZero.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Fills `buf` with read(2) (std's socket reads use recvfrom(2), which the sandbox does not
/// allow).
fn read_exact(sock: &UnixStream, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: read(2) into a live buffer of `buf.len()` bytes from an open socket.
        let n = unsafe { libc::read(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            n if n > 0 => buf = &mut buf[n as usize..],
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// What the relay remembers of the frontend's requests.
#[derive(Debug, Default)]
struct Fixer {
    /// Whether the last SET_FEATURES acked `VHOST_USER_F_PROTOCOL_FEATURES`.
    protocol_features_acked: bool,
    /// SET_VRING_ENABLE payloads held back until then, by ring.
    held_enables: BTreeMap<u32, Vec<u8>>,
}

impl Fixer {
    /// One message from the frontend: what goes to the backend, and what goes straight back.
    fn frontend_message(&mut self, m: Message) -> (Vec<Message>, Option<Message>) {
        match m.request() {
            SET_VRING_ENABLE if !self.protocol_features_acked && m.payload.len() == 8 => {
                let index =
                    u32::from_le_bytes([m.payload[0], m.payload[1], m.payload[2], m.payload[3]]);
                log::debug!(
                    "relay: SET_VRING_ENABLE for ring {index} before SET_FEATURES: held until the features are set"
                );
                let reply = (m.flags() & NEED_REPLY != 0)
                    .then(|| Message::new(SET_VRING_ENABLE, VERSION_1 | REPLY, vec![0u8; 8]));
                self.held_enables.insert(index, m.payload);
                (Vec::new(), reply)
            }
            SET_FEATURES if m.payload.len() == 8 => {
                let mut v = [0u8; 8];
                v.copy_from_slice(&m.payload);
                self.protocol_features_acked = u64::from_le_bytes(v) & PROTOCOL_FEATURES != 0;
                let mut out = vec![m];
                if self.protocol_features_acked {
                    let held = std::mem::take(&mut self.held_enables);
                    out.extend(
                        held.into_values()
                            .map(|p| Message::new(SET_VRING_ENABLE, VERSION_1, p)),
                    );
                } else {
                    // Without the feature every ring is enabled from the start.
                    self.held_enables.clear();
                }
                (out, None)
            }
            _ => (vec![m], None),
        }
    }
}

/// A running relay between a frontend and the daemon; [`Relay::finish`] ends it.
pub(crate) struct Relay {
    frontend: UnixStream,
    backend: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Relays between `frontend` and `backend` (the connection the daemon accepted) on a
    /// thread, until either side ends.
    pub(crate) fn spawn(frontend: UnixStream, backend: UnixStream) -> io::Result<Relay> {
        let mut f = frontend.try_clone()?;
        let mut b = backend.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("vhost-user-relay".into())
            .spawn(move || {
                if let Err(e) = run(&mut f, &mut b) {
                    log::warn!("relay: {e}");
                }
                let _ = f.shutdown(std::net::Shutdown::Both);
                let _ = b.shutdown(std::net::Shutdown::Both);
            })?;
        Ok(Relay {
            frontend,
            backend,
            thread: Some(thread),
        })
    }

    /// Cuts both sides and waits for the thread.
    pub(crate) fn finish(mut self) {
        let _ = self.frontend.shutdown(std::net::Shutdown::Both);
        let _ = self.backend.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(frontend: &mut UnixStream, backend: &mut UnixStream) -> io::Result<()> {
    let mut fixer = Fixer::default();
    loop {
        let ready = poll_readable(&[frontend.as_raw_fd(), backend.as_raw_fd()], -1)?;
        if ready[0] {
            let Some(m) = read_message(frontend)? else {
                return Ok(());
            };
            let (to_backend, to_frontend) = fixer.frontend_message(m);
            for m in &to_backend {
                write_message(backend, m)?;
            }
            if let Some(r) = to_frontend {
                write_message(frontend, &r)?;
            }
        }
        if ready[1] {
            let Some(m) = read_message(backend)? else {
                return Ok(());
            };
            write_message(frontend, &m)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enable(index: u32, on: u32, flags: u32) -> Message {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&on.to_le_bytes());
        Message::new(SET_VRING_ENABLE, flags, p)
    }

    #[test]
    fn early_enables_wait_for_the_features_and_are_acked_when_asked() {
        let mut f = Fixer::default();
        let (out, reply) = f.frontend_message(enable(0, 1, VERSION_1 | NEED_REPLY));
        assert!(out.is_empty());
        let reply = reply.unwrap();
        assert_eq!(reply.request(), SET_VRING_ENABLE);
        assert_eq!(reply.flags(), VERSION_1 | REPLY);
        assert_eq!(reply.payload, vec![0u8; 8]);
        let (out, reply) = f.frontend_message(enable(1, 0, VERSION_1));
        assert!(out.is_empty() && reply.is_none());
        // SET_FEATURES with bit 30: forwarded, then the held states in ring order.
        let feats = Message::new(
            SET_FEATURES,
            VERSION_1,
            (PROTOCOL_FEATURES | 1).to_le_bytes().to_vec(),
        );
        let (out, reply) = f.frontend_message(feats);
        assert!(reply.is_none());
        let reqs: Vec<(u32, Vec<u8>)> = out
            .iter()
            .map(|m| (m.request(), m.payload.clone()))
            .collect();
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[0].0, SET_FEATURES);
        assert_eq!(reqs[1], (SET_VRING_ENABLE, enable(0, 1, 0).payload));
        assert_eq!(reqs[2], (SET_VRING_ENABLE, enable(1, 0, 0).payload));
        assert!(out[1].flags() & NEED_REPLY == 0, "nobody waits for a reply");
        // From now on enables pass straight through.
        let (out, reply) = f.frontend_message(enable(0, 0, VERSION_1 | NEED_REPLY));
        assert_eq!(out.len(), 1);
        assert!(reply.is_none());
    }

    #[test]
    fn without_protocol_features_held_enables_are_dropped() {
        let mut f = Fixer::default();
        let _ = f.frontend_message(enable(0, 0, VERSION_1));
        let (out, _) = f.frontend_message(Message::new(
            SET_FEATURES,
            VERSION_1,
            1u64.to_le_bytes().to_vec(),
        ));
        assert_eq!(out.len(), 1);
        assert!(f.held_enables.is_empty());
    }

    #[test]
    fn messages_and_fds_cross_the_inner_socket() {
        let mut inner = InnerListener::bind().unwrap();
        let mut client = inner.connect().unwrap();
        let mut server = loop {
            if let Some(s) = inner.listener().accept().unwrap() {
                break s;
            }
        };
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut m = Message::new(5, VERSION_1, vec![1, 2, 3]);
        m.fds.push(OwnedFd::from(file));
        write_message(&mut client, &m).unwrap();
        let got = read_message(&mut server).unwrap().unwrap();
        assert_eq!(
            (got.request(), got.payload.clone(), got.fds.len()),
            (5, vec![1, 2, 3], 1)
        );
        drop(client);
        assert!(read_message(&mut server).unwrap().is_none());
        // Oversized payloads are refused, not allocated.
        let mut client = inner.connect().unwrap();
        let mut server = loop {
            if let Some(s) = inner.listener().accept().unwrap() {
                break s;
            }
        };
        let mut big = Message::new(5, VERSION_1, Vec::new());
        big.header[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
        write_message(&mut client, &big).unwrap();
        assert!(read_message(&mut server).is_err());
    }
}
