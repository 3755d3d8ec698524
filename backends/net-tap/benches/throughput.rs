//! net-tap throughput: packets per second and Gbit/s for TX and RX through hype-testkit and the
//! real `hype-net-tap` process, against a plain process reading/writing the same kind of tap.
//!
//! `cargo bench -p hype-net-tap --bench throughput -- [SECONDS]` (root; default 2 s per row;
//! HYPE_BENCH_SANDBOX_AB=ROUNDS for only TX with the sandbox on and off, interleaved:
//! `scripts/bench-sandbox`).
//! The driver uses fixed raw descriptors (no per-frame copy on its side), 256-entry queues,
//! EVENT_IDX, one queue pair. RX frames come from a generator thread sending with sendmmsg on
//! a packet socket bound to the tap; the same generator feeds the plain reader.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hype_testkit::driver::Driver;
use hype_testkit::virtqueue::{RawDescriptor, Virtqueue};

const QUEUE: usize = 256;
const RX_BUF: u32 = 2048;

struct Rate {
    pps: f64,
    gbps: f64,
}

impl Rate {
    fn new(frames: u64, frame_len: usize, elapsed: Duration) -> Rate {
        let s = elapsed.as_secs_f64();
        let pps = frames as f64 / s;
        Rate {
            pps,
            gbps: pps * frame_len as f64 * 8.0 / 1e9,
        }
    }
}

/// Publishes used_event = what we have consumed, so the device signals the next completion.
fn arm(q: &Virtqueue, ram: &hype_testkit::memory::GuestRam) {
    let used_event = q.rings().avail + 4 + 2 * u64::from(q.size());
    ram.store::<u16>(used_event, q.last_used_idx(), Ordering::Release)
        .unwrap();
}

/// A frame of `len` bytes (without header) of ethertype 0x88b5.
fn raw_frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    eth(dst, src, 0x88b5, &vec![0x5a; len - 14])
}

/// A 64 KiB UDP GSO frame (to a port nobody listens on) with its header.
fn gso_frame(tap_mac: [u8; 6]) -> Vec<u8> {
    let payload = vec![0x33u8; 65000];
    let ip = udp(GUEST_IP, HOST_IP, 4000, 9, &payload, UdpCsum::Partial);
    let hdr = VnetHdr {
        flags: NEEDS_CSUM,
        gso_type: GSO_UDP_L4,
        hdr_len: 42,
        gso_size: 1472,
        csum_start: 34,
        csum_offset: 6,
        num_buffers: 0,
    };
    with_hdr(hdr, &eth(tap_mac, GUEST_MAC, 0x0800, &ip))
}

struct TxBench {
    ids: Vec<u16>,
    buf: u64,
}

fn tx_setup(drv: &mut Driver) -> TxBench {
    let ram = drv.ram().clone();
    let buf = ram.alloc(70000, 64).unwrap().addr;
    let q = drv.queue(1).unwrap();
    let ids = q.reserve_descriptors(QUEUE).unwrap();
    TxBench { ids, buf }
}

/// TX through the backend: every descriptor points at the same frame.
fn tx_driver(drv: &mut Driver, tb: &TxBench, frame: &[u8], dur: Duration) -> Rate {
    let ram = drv.ram().clone();
    ram.write(tb.buf, frame).unwrap();
    let q = drv.queue(1).unwrap();
    for &id in &tb.ids {
        q.write_descriptor(
            id,
            RawDescriptor {
                addr: tb.buf,
                len: frame.len() as u32,
                flags: 0,
                next: 0,
            },
        )
        .unwrap();
        q.add_raw(id).unwrap();
    }
    q.notify().unwrap();
    let start = Instant::now();
    let mut frames = 0u64;
    let mut in_flight = tb.ids.len();
    while in_flight > 0 {
        arm(q, &ram);
        let done = q.wait_raw(TIMEOUT).unwrap();
        frames += done.len() as u64;
        in_flight -= done.len();
        if start.elapsed() < dur {
            for (id, _) in &done {
                q.add_raw(*id as u16).unwrap();
            }
            in_flight += done.len();
            q.notify().unwrap();
        }
    }
    Rate::new(frames, frame.len() - HDR, start.elapsed())
}

/// TX by a plain process writing the tap.
fn tx_plain(fd: &OwnedFd, frame: &[u8], dur: Duration) -> Rate {
    let start = Instant::now();
    let mut frames = 0u64;
    while start.elapsed() < dur {
        for _ in 0..64 {
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            assert!(n > 0, "write: {}", std::io::Error::last_os_error());
            frames += 1;
        }
    }
    Rate::new(frames, frame.len() - HDR, start.elapsed())
}

/// Sends `frame` on a packet socket as fast as it can until `stop`; counts frames sent.
fn generator(
    ns: &Netns,
    frame: Vec<u8>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let sock = ns.enter(packet_socket);
    std::thread::spawn(move || {
        const BATCH: usize = 32;
        let mut iov = libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        };
        // SAFETY: all-zero mmsghdr is valid; we fill in the iovec.
        let mut msgs: Vec<libc::mmsghdr> =
            (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for m in &mut msgs {
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: the messages point at `iov`/`frame`, alive for the call.
            let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
            if n > 0 {
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    })
}

/// Makes every RX descriptor a 2 KiB buffer of its own, all available.
fn rx_setup(drv: &mut Driver) {
    let ram = drv.ram().clone();
    let q = drv.queue(0).unwrap();
    let ids = q.reserve_descriptors(QUEUE).unwrap();
    for &id in &ids {
        let buf = ram.alloc(u64::from(RX_BUF), 64).unwrap().addr;
        q.write_descriptor(
            id,
            RawDescriptor {
                addr: buf,
                len: RX_BUF,
                flags: 2, // VRING_DESC_F_WRITE
                next: 0,
            },
        )
        .unwrap();
        q.add_raw(id).unwrap();
    }
    q.notify().unwrap();
}

/// RX through the backend while the generator runs. Returns (delivered, generated).
fn rx_driver(ns: &Netns, drv: &mut Driver, frame_len: usize, dur: Duration) -> (Rate, Rate) {
    let ram = drv.ram().clone();
    let frame = raw_frame(GUEST_MAC, [2, 0, 0, 0, 0, 1], frame_len);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let q = drv.queue(0).unwrap();
    // Give back buffers filled after the previous row stopped counting.
    for (id, _) in q.collect_raw().unwrap() {
        q.add_raw(id as u16).unwrap();
    }
    q.notify().unwrap();
    let gen = generator(ns, frame, stop.clone(), sent.clone());
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let sent0 = sent.load(Ordering::Relaxed);
    let mut frames = 0u64;
    while start.elapsed() < dur {
        arm(q, &ram);
        let Ok(done) = q.wait_raw(Duration::from_millis(100)) else {
            continue;
        };
        frames += done.len() as u64;
        for (id, _) in &done {
            q.add_raw(*id as u16).unwrap();
        }
        q.notify().unwrap();
    }
    let elapsed = start.elapsed();
    let generated = sent.load(Ordering::Relaxed) - sent0;
    stop.store(true, Ordering::Relaxed);
    gen.join().unwrap();
    (
        Rate::new(frames, frame_len, elapsed),
        Rate::new(generated, frame_len, elapsed),
    )
}

/// RX by a plain process reading the tap while the generator runs.
fn rx_plain(ns: &Netns, fd: &OwnedFd, frame_len: usize, dur: Duration) -> (Rate, Rate) {
    let frame = raw_frame([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], frame_len);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut buf = vec![0u8; 70000];
    // Drain leftovers.
    // SAFETY: valid fd and buffer.
    while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    let gen = generator(ns, frame, stop.clone(), sent.clone());
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let sent0 = sent.load(Ordering::Relaxed);
    let mut frames = 0u64;
    while start.elapsed() < dur {
        // SAFETY: valid fd and buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            frames += 1;
        } else {
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 100) };
        }
    }
    let elapsed = start.elapsed();
    let generated = sent.load(Ordering::Relaxed) - sent0;
    stop.store(true, Ordering::Relaxed);
    gen.join().unwrap();
    (
        Rate::new(frames, frame_len, elapsed),
        Rate::new(generated, frame_len, elapsed),
    )
}

fn row(what: &str, size: &str, r: &Rate, extra: &str) {
    println!(
        "| {what} | {size} | {:.0} | {:.2} | {extra} |",
        r.pps / 1000.0,
        r.gbps
    );
}

/// `HYPE_BENCH_SANDBOX_AB=ROUNDS`: only TX of 64 B and 1514 B frames, through a fresh
/// hype-net-tap with the sandbox on and with `--sandbox off`, in alternating order ROUNDS
/// times; prints each round's on/off ratio of packets per second and their median.
fn sandbox_ab(rounds: usize, dur: Duration) {
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(), Vec::new()];
    for round in 0..rounds {
        let mut pps = [[0.0f64; 2]; 2];
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for on in order {
            let ns = Netns::new();
            let mut args = vec!["--mac", GUEST_MAC_STR];
            if !on {
                args.extend(["--sandbox", "off"]);
            }
            let be = Backend::spawn(&ns, &args);
            let mut drv = be.connect(1, u64::MAX);
            ns.configure_tap();
            let tap_mac = ns.tap_mac();
            let tb = tx_setup(&mut drv);
            rx_setup(&mut drv);
            for (i, len) in [64usize, 1514].into_iter().enumerate() {
                let f = with_hdr(VnetHdr::default(), &raw_frame(tap_mac, GUEST_MAC, len));
                let r = tx_driver(&mut drv, &tb, &f, dur);
                let side = if on { "on" } else { "off" };
                row(&format!("TX sandbox {side}"), &format!("{len} B"), &r, "");
                pps[i][usize::from(!on)] = r.pps;
            }
            drop(drv);
            be.stop();
        }
        for i in 0..2 {
            ratios[i].push(pps[i][0] / pps[i][1]);
        }
        println!(
            "round {round}: on/off 64 B {:.3}, 1514 B {:.3}",
            pps[0][0] / pps[0][1],
            pps[1][0] / pps[1][1]
        );
    }
    for (i, len) in [64, 1514].into_iter().enumerate() {
        let r = &mut ratios[i];
        r.sort_by(f64::total_cmp);
        println!(
            "TX {len} B, sandbox on/off over {rounds} interleaved rounds: median {:.3}, range \
             {:.3}-{:.3}",
            r[r.len() / 2],
            r[0],
            r[r.len() - 1]
        );
    }
}

fn main() {
    if !can_run("net-tap throughput benchmark") {
        return;
    }
    let secs: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2.0);
    let dur = Duration::from_secs_f64(secs);
    if let Some(rounds) = std::env::var("HYPE_BENCH_SANDBOX_AB")
        .ok()
        .and_then(|r| r.parse::<usize>().ok())
        .filter(|r| *r > 0)
    {
        sandbox_ab(rounds, dur);
        return;
    }
    println!("| path | frame | kpps | Gbit/s | notes |");
    println!("|---|---|---|---|---|");

    // Through hype-net-tap.
    let ns = Netns::new();
    let be = Backend::spawn(&ns, &["--mac", GUEST_MAC_STR]);
    let mut drv = be.connect(1, u64::MAX);
    ns.configure_tap();
    let tap_mac = ns.tap_mac();
    let tb = tx_setup(&mut drv);
    rx_setup(&mut drv);
    let backend_cpu0 = be.cpu_ticks();
    for len in [64usize, 1514] {
        let f = with_hdr(VnetHdr::default(), &raw_frame(tap_mac, GUEST_MAC, len));
        let r = tx_driver(&mut drv, &tb, &f, dur);
        row("TX hype-net-tap", &format!("{len} B"), &r, "");
    }
    let g = gso_frame(tap_mac);
    let r = tx_driver(&mut drv, &tb, &g, dur);
    row("TX hype-net-tap", "64 KiB UDP GSO", &r, "");
    for len in [64usize, 1514] {
        let (r, gen) = rx_driver(&ns, &mut drv, len, dur);
        row(
            "RX hype-net-tap",
            &format!("{len} B"),
            &r,
            &format!("generator sent {:.0} kpps", gen.pps / 1000.0),
        );
    }
    let ticks = be.cpu_ticks() - backend_cpu0;
    drop(drv);
    let log = be.stop();
    let stats = log
        .lines()
        .rev()
        .find(|l| l.contains("stats:"))
        .unwrap_or("");
    eprintln!("backend CPU: {ticks} ticks; {stats}");

    // A plain process on a tap of its own.
    let ns2 = Netns::new();
    let tap = ns2.enter(|| hype_net_tap::Tap::open(TAP, 1).unwrap());
    ns2.ip(&["link", "set", TAP, "up"]);
    let fd = tap.queue_fd(0).unwrap();
    // SAFETY: the tap outlives this borrowed duplicate's use below.
    let fd: OwnedFd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .unwrap();
    let plain_mac = ns2.tap_mac();
    for len in [64usize, 1514] {
        let f = with_hdr(VnetHdr::default(), &raw_frame(plain_mac, GUEST_MAC, len));
        row(
            "TX plain write()",
            &format!("{len} B"),
            &tx_plain(&fd, &f, dur),
            "",
        );
    }
    row(
        "TX plain write()",
        "64 KiB UDP GSO",
        &tx_plain(&fd, &gso_frame(plain_mac), dur),
        "",
    );
    for len in [64usize, 1514] {
        let (r, gen) = rx_plain(&ns2, &fd, len, dur);
        row(
            "RX plain read()",
            &format!("{len} B"),
            &r,
            &format!("generator sent {:.0} kpps", gen.pps / 1000.0),
        );
    }
}
