//! Test and benchmark helpers: a private network namespace, the backend as a process inside
//! it, sockets on the tap, and frame building/parsing.
#![allow(dead_code)]

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hype_testkit::driver::{Driver, DriverOptions};
use hype_testkit::process::BackendProcess;
use hype_testkit::virtqueue::{Completion, Segment, Virtqueue};

pub const BIN: &str = env!("CARGO_BIN_EXE_hype-net-tap");
pub const TAP: &str = "hnt0";
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const GUEST_MAC_STR: &str = "52:54:00:12:34:56";
pub const HOST_IP: [u8; 4] = [10, 0, 0, 1];
pub const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
pub const HDR: usize = 12;
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this process may create namespaces and taps; prints SKIPPED when not.
pub fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tun = std::path::Path::new("/dev/net/tun").exists();
    let ip = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if root && tun && ip {
        return true;
    }
    eprintln!(
        "SKIPPED {test}: needs root (CAP_NET_ADMIN), /dev/net/tun and iproute2 \
         (root={root}, tun={tun}, ip={ip})"
    );
    false
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of our own, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "hype-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        // No IPv6: no router solicitations or MLD reports in the guest's RX buffers.
        ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]);
        ns
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args));
    }

    /// `ip netns exec <ns> args...`
    pub fn exec(&self, args: &[&str]) {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args));
    }

    /// Runs `f` on a thread inside the namespace (sockets created there stay there).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).expect("open netns");
                // SAFETY: setns on a valid namespace fd; it only affects this thread.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread")
        })
    }

    /// Gives the tap the host address and a static neighbour entry for the guest.
    pub fn configure_tap(&self) {
        self.ip(&["addr", "add", "10.0.0.1/24", "dev", TAP]);
        self.ip(&["link", "set", TAP, "up"]);
        self.ip(&[
            "neigh",
            "replace",
            "10.0.0.2",
            "lladdr",
            GUEST_MAC_STR,
            "dev",
            TAP,
            "nud",
            "permanent",
        ]);
    }

    /// The tap's own MAC address.
    pub fn tap_mac(&self) -> [u8; 6] {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-br", "link", "show", "dev", TAP])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mac = text.split_whitespace().nth(2).expect("mac in ip output");
        let mut m = [0u8; 6];
        for (b, p) in m.iter_mut().zip(mac.split(':')) {
            *b = u8::from_str_radix(p, 16).unwrap();
        }
        m
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The backend running as a process inside a namespace.
pub struct Backend {
    process: BackendProcess,
    pub socket: PathBuf,
    log: PathBuf,
    dir: PathBuf,
}

impl Backend {
    pub fn spawn(ns: &Netns, args: &[&str]) -> Backend {
        let dir = std::env::temp_dir().join(format!("{}-dir", ns.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("net.sock");
        let log = dir.join("backend.log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name, BIN, "--tap", TAP, "--socket"])
            .arg(&socket)
            .args(args)
            .env("HYPE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        // Not waited for here: the driver waits for the socket when it connects.
        let process = BackendProcess::start(&mut cmd, &socket).unwrap();
        Backend {
            process,
            socket,
            log,
            dir,
        }
    }

    /// The backend's pid (`ip netns exec` execs it in place).
    pub fn pid(&self) -> u32 {
        self.process.pid().unwrap()
    }

    /// Connects a driver with `pairs` queue pairs plus the control queue.
    pub fn connect(&self, pairs: usize, feature_mask: u64) -> Driver {
        let opts = DriverOptions {
            num_queues: pairs * 2 + 1,
            queue_size: 256,
            mem_size: 64 << 20,
            feature_mask,
            config_size: 12,
            ..DriverOptions::default()
        };
        match Driver::connect(&self.socket, opts) {
            Ok(d) => d,
            Err(e) => panic!("connect failed: {e}; backend log:\n{}", self.log_text()),
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// User + system CPU time of the backend so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 of stat(5); `rest` starts at field 3.
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    /// SIGTERM, wait for a clean exit, return the log.
    pub fn stop(mut self) -> String {
        match self.process.signal_and_wait(libc::SIGTERM, TIMEOUT) {
            Ok(st) => assert!(
                st.success(),
                "backend exited with {st}:\n{}",
                self.log_text()
            ),
            Err(e) => panic!(
                "backend did not exit on SIGTERM ({e}):\n{}",
                self.log_text()
            ),
        }
        self.log_text()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fd(raw: libc::c_int, what: &str) -> OwnedFd {
    assert!(raw >= 0, "{what}: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

fn set_timeout(s: &OwnedFd, t: Duration) {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: valid socket and option buffer.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
}

/// A packet socket on the tap seeing every frame (call inside the namespace).
pub fn packet_socket() -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2).
    let s = fd(
        unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) },
        "packet socket",
    );
    let name = std::ffi::CString::new(TAP).unwrap();
    // SAFETY: valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex > 0);
    // SAFETY: all-zero sockaddr_ll is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: valid socket and address.
    let rc = unsafe {
        libc::bind(
            s.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    set_timeout(&s, Duration::from_millis(200));
    s
}

/// Receives frames from a packet socket that came in from the tap (not our own sends) until
/// `want` match `pred` or the timeout passes.
pub fn capture(s: &OwnedFd, want: usize, pred: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 70000];
    while got.len() < want && Instant::now() < deadline {
        // SAFETY: all-zero sockaddr_ll is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: valid buffers.
        let n = unsafe {
            libc::recvfrom(
                s.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut sll as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            continue;
        }
        if sll.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let f = &buf[..n as usize];
        if pred(f) {
            got.push(f.to_vec());
        }
    }
    got
}

/// A UDP socket bound to `ip:port` (call inside the namespace).
pub fn udp_socket(ip: [u8; 4], port: u16) -> OwnedFd {
    // SAFETY: plain socket(2).
    let s = fd(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) },
        "udp socket",
    );
    let sa = sockaddr(ip, port);
    // SAFETY: valid socket and address.
    let rc = unsafe {
        libc::bind(
            s.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    set_timeout(&s, Duration::from_millis(500));
    s
}

pub fn sockaddr(ip: [u8; 4], port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    }
}

pub fn udp_send(s: &OwnedFd, ip: [u8; 4], port: u16, data: &[u8]) {
    let sa = sockaddr(ip, port);
    // SAFETY: valid socket, buffer and address.
    let n = unsafe {
        libc::sendto(
            s.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(
        n,
        data.len() as isize,
        "sendto: {}",
        std::io::Error::last_os_error()
    );
}

/// Receives one datagram, or None after the socket timeout.
pub fn udp_recv(s: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70000];
    // SAFETY: valid socket and buffer.
    let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

// ---- frames ----

pub const NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP_L4: u8 = 5;

/// A virtio-net header (VERSION_1 layout).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHdr {
    pub fn bytes(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    pub fn parse(b: &[u8]) -> VnetHdr {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        }
    }
}

pub fn with_hdr(hdr: VnetHdr, frame: &[u8]) -> Vec<u8> {
    let mut v = hdr.bytes().to_vec();
    v.extend_from_slice(frame);
    v
}

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Internet checksum accumulation (not folded).
pub fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

pub fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = !csum_fold(csum_add(0, &h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// Pseudo-header sum for `proto` over `len` bytes of L4 data.
pub fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let mut s = csum_add(0, &src);
    s = csum_add(s, &dst);
    s + u32::from(proto) + len as u32
}

/// How the UDP checksum field is filled.
#[derive(Clone, Copy)]
pub enum UdpCsum {
    /// The correct checksum.
    Full,
    /// The pseudo-header sum only, for NEEDS_CSUM (the tap's peer completes it).
    Partial,
    /// A given (wrong) value.
    Value(u16),
}

pub fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, data: &[u8], c: UdpCsum) -> Vec<u8> {
    let len = 8 + data.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    let ps = pseudo_sum(src, dst, 17, len);
    let v = match c {
        UdpCsum::Full => match !csum_fold(csum_add(ps, &u)) {
            0 => 0xffff,
            v => v,
        },
        UdpCsum::Partial => csum_fold(ps),
        UdpCsum::Value(v) => v,
    };
    u[6..8].copy_from_slice(&v.to_be_bytes());
    ipv4(src, dst, 17, &u)
}

/// Whether the UDP/IPv4 frame's checksum verifies.
pub fn udp_csum_ok(frame: &[u8]) -> bool {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let l4 = &ip[ihl..total];
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    csum_fold(csum_add(pseudo_sum(src, dst, 17, l4.len()), l4)) == 0xffff
}

/// UDP destination port and payload of an IPv4/UDP frame, if it is one.
pub fn udp_of(frame: &[u8]) -> Option<(u16, u16, &[u8])> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let u = &ip[ihl..];
    let sport = u16::from_be_bytes([u[0], u[1]]);
    let dport = u16::from_be_bytes([u[2], u[3]]);
    let len = usize::from(u16::from_be_bytes([u[4], u[5]]));
    Some((sport, dport, u.get(8..len)?))
}

// ---- driver side ----

/// Sends `frame` (header included) on TX queue `q` and waits for its completion.
pub fn send(q: &mut Virtqueue, frame: &[u8]) -> Completion {
    let head = q.submit(&[Segment::Readable(frame)]).unwrap();
    q.wait_for(head, TIMEOUT).unwrap()
}

/// Makes `n` receive buffers of `size` bytes available on RX queue `q`.
pub fn post_rx(q: &mut Virtqueue, n: usize, size: u32) {
    for _ in 0..n {
        q.add(&[Segment::Writable(size)], false).unwrap();
    }
    q.notify().unwrap();
}

/// A frame received by the driver: its header and the frame bytes.
#[derive(Debug, Clone)]
pub struct RxFrame {
    pub hdr: VnetHdr,
    pub frame: Vec<u8>,
    pub buffers: usize,
}

/// Collects RX completions from `q` into frames (joining MRG_RXBUF buffers) until `pred`
/// accepted `want` frames or the timeout passes.
pub fn receive(
    q: &mut Virtqueue,
    want: usize,
    timeout: Duration,
    pred: impl Fn(&RxFrame) -> bool,
) -> Vec<RxFrame> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut cur: Option<RxFrame> = None;
    while out.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Ok(done) = q.wait(1, left.min(Duration::from_millis(100))) else {
            continue;
        };
        for c in done {
            let data = &c.data[0][..c.len as usize];
            match cur.as_mut() {
                None => {
                    assert!(data.len() >= HDR, "rx completion of {} bytes", data.len());
                    let hdr = VnetHdr::parse(data);
                    cur = Some(RxFrame {
                        hdr,
                        frame: data[HDR..].to_vec(),
                        buffers: 1,
                    });
                }
                Some(f) => {
                    f.frame.extend_from_slice(data);
                    f.buffers += 1;
                }
            }
            if let Some(f) = cur.take() {
                if f.buffers < usize::from(f.hdr.num_buffers.max(1)) {
                    cur = Some(f);
                } else if pred(&f) {
                    out.push(f);
                }
            }
        }
    }
    out
}

// ---- TCP, just enough to play a peer by hand ----

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// An IPv4/TCP packet from the guest to the host with a partial (pseudo-header) checksum, for
/// NEEDS_CSUM. `mss` adds the MSS option.
pub fn tcp(
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    mss: Option<u16>,
    data: &[u8],
) -> Vec<u8> {
    let opt_len = if mss.is_some() { 4 } else { 0 };
    let hl = 20 + opt_len;
    let mut t = Vec::with_capacity(hl + data.len());
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.push(((hl / 4) as u8) << 4);
    t.push(flags);
    t.extend_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    if let Some(m) = mss {
        t.extend_from_slice(&[2, 4]);
        t.extend_from_slice(&m.to_be_bytes());
    }
    t.extend_from_slice(data);
    let ps = csum_fold(pseudo_sum(GUEST_IP, HOST_IP, 6, t.len()));
    t[16..18].copy_from_slice(&ps.to_be_bytes());
    ipv4(GUEST_IP, HOST_IP, 6, &t)
}

/// A received IPv4/TCP segment.
#[derive(Debug)]
pub struct TcpSeg {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub data: Vec<u8>,
}

pub fn tcp_of(frame: &[u8]) -> Option<TcpSeg> {
    if frame.len() < 54 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let t = &ip[ihl..total];
    let doff = usize::from(t[12] >> 4) * 4;
    let u32at = |i: usize| u32::from_be_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
    Some(TcpSeg {
        seq: u32at(4),
        ack: u32at(8),
        flags: t[13],
        data: t[doff..].to_vec(),
    })
}
