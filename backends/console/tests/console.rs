//! hype-console as a real process, driven through hype-testkit's guest driver.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hype_console::{
    drop_notice, VIRTIO_CONSOLE_F_EMERG_WRITE, VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_SIZE,
};
use hype_testkit::virtqueue::{RawDescriptor, Segment};

#[test]
fn guest_output_arrives_in_order_on_client_and_log() {
    let dir = tempdir("order");
    let csock = dir.join("console.sock");
    let log = dir.join("guest.log");
    std::fs::write(&log, b"earlier\n").unwrap();
    let mut b = Backend::spawn(
        &dir,
        &[
            "--output",
            &format!("socket:{}", csock.display()),
            "--log",
            log.to_str().unwrap(),
        ],
    );
    let mut c = client(&csock);
    let mut drv = guest(&b);
    // A large burst in odd-sized chains, read concurrently by the client.
    let data = pattern(0, 6 << 20, 1);
    let reader = std::thread::spawn(move || read_exact_within(&mut c, 6 << 20));
    guest_write(&mut drv, &data, 3001);
    let got = reader.join().unwrap();
    assert!(got == data, "client stream differs");
    let logged = read_file_when(&log, 8 + data.len());
    assert_eq!(&logged[..8], b"earlier\n", "log is appended to");
    assert!(logged[8..] == data[..], "log differs");
    drop(drv);
    assert!(b.signal_and_wait(libc::SIGTERM).success());
    assert!(!csock.exists() && !b.socket.exists());
}

#[test]
fn detach_and_reattach_lose_nothing_buffered() {
    let dir = tempdir("reattach");
    let csock = dir.join("console.sock");
    let b = Backend::spawn(&dir, &["--output", &format!("socket:{}", csock.display())]);
    let mut drv = guest(&b);
    // Written while nobody is attached: buffered.
    let part1 = pattern(0, 100_000, 2);
    guest_write(&mut drv, &part1, 512);
    let mut c = client(&csock);
    assert!(read_exact_within(&mut c, part1.len()) == part1);
    // A second client is refused while the first is attached.
    let mut other = client(&csock);
    let mut msg = String::new();
    other.set_read_timeout(Some(WAIT)).unwrap();
    other.read_to_string(&mut msg).unwrap();
    assert!(msg.contains("another client"), "{msg:?}");
    drop(c);
    // Give the backend a moment to see the hang-up, then write more while detached.
    std::thread::sleep(Duration::from_millis(100));
    let part2 = pattern(100_000, 300_000, 2);
    guest_write(&mut drv, &part2, 4096);
    let mut c = client(&csock);
    assert!(read_exact_within(&mut c, part2.len()) == part2);
    assert_quiet(&mut c, Duration::from_millis(200));
}

#[test]
fn absent_reader_drops_oldest_and_says_so() {
    let dir = tempdir("overflow");
    let csock = dir.join("console.sock");
    let log = dir.join("guest.log");
    let b = Backend::spawn(
        &dir,
        &[
            "--output",
            &format!("socket:{}", csock.display()),
            "--buffer",
            "4096",
            "--log",
            log.to_str().unwrap(),
        ],
    );
    let mut drv = guest(&b);
    let data = pattern(0, 10_000, 3);
    guest_write(&mut drv, &data, 1000);
    let mut c = client(&csock);
    let notice = drop_notice(10_000 - 4096).into_bytes();
    let got = read_exact_within(&mut c, notice.len() + 4096);
    assert_eq!(
        String::from_utf8_lossy(&got[..notice.len()]),
        String::from_utf8_lossy(&notice)
    );
    assert!(got[notice.len()..] == data[10_000 - 4096..]);
    assert_quiet(&mut c, Duration::from_millis(200));
    // The log never drops.
    assert!(read_file_when(&log, data.len()) == data);
}

#[test]
fn stalled_reader_does_not_block_the_guest_forever() {
    let dir = tempdir("stall");
    let csock = dir.join("console.sock");
    let b = Backend::spawn(
        &dir,
        &[
            "--output",
            &format!("socket:{}", csock.display()),
            "--buffer",
            "65536",
            "--stall-timeout-ms",
            "200",
        ],
    );
    // Attached but never reading (until later).
    let mut c = client(&csock);
    wait_attached(&b);
    let mut drv = guest(&b);
    let data = pattern(0, 4 << 20, 4);
    let t = Instant::now();
    guest_write(&mut drv, &data, 4096);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // The reader gets a notice, then the newest output, in order.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("bytes of guest output dropped"), "no notice");
    assert!(
        got.ends_with(&data[data.len() - 4096..]),
        "newest output missing"
    );
    assert!(got.len() < data.len());
}

/// Waits until the backend logged that a client attached.
fn wait_attached(b: &Backend) {
    let log = b.socket.parent().unwrap().join("stderr.log");
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("client attached")
    {
        assert!(Instant::now() < deadline, "client never attached");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn input_reaches_the_guest_in_order_in_full_buffers() {
    let dir = tempdir("input");
    let csock = dir.join("console.sock");
    let b = Backend::spawn(&dir, &["--output", &format!("socket:{}", csock.display())]);
    let mut drv = guest(&b);
    let mut c = client(&csock);
    // More than the backend buffers, sent before the guest posts any receive buffer: the
    // client is held back, nothing is lost.
    let data = pattern(0, 512 << 10, 5);
    let send = data.clone();
    let writer = std::thread::spawn(move || {
        c.write_all(&send).unwrap();
        c
    });
    std::thread::sleep(Duration::from_millis(200));
    let (got, used) = guest_read(&mut drv, data.len(), 4096);
    assert!(got == data, "guest input differs");
    // Batched: buffers are filled, not one byte per used entry.
    assert!(used <= data.len() / 4096 * 2, "{used} used entries");
    let _c = writer.join().unwrap();
}

#[test]
fn input_sent_before_the_guest_connects_is_kept() {
    let dir = tempdir("early");
    let csock = dir.join("console.sock");
    let b = Backend::spawn(&dir, &["--output", &format!("socket:{}", csock.display())]);
    let mut c = client(&csock);
    c.write_all(b"typed early").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut drv = guest(&b);
    let (got, _) = guest_read(&mut drv, 11, 64);
    assert_eq!(got, b"typed early");
}

#[test]
fn config_features_and_emergency_write() {
    let dir = tempdir("config");
    let csock = dir.join("console.sock");
    let b = Backend::spawn(
        &dir,
        &[
            "--output",
            &format!("socket:{}", csock.display()),
            "--size",
            "100x40",
        ],
    );
    let mut drv = guest(&b);
    let f = drv.info().features;
    assert_ne!(f & 1 << VIRTIO_CONSOLE_F_SIZE, 0);
    assert_ne!(f & 1 << VIRTIO_CONSOLE_F_EMERG_WRITE, 0);
    assert_eq!(f & 1 << VIRTIO_CONSOLE_F_MULTIPORT, 0);
    // Only console-defined device bits (0..=2): how a VMM tells a console from other types.
    assert_eq!(f & ((1 << 24) - 1) & !0b111, 0);
    let cfg = drv.config().to_vec();
    assert_eq!(cfg.len(), 12);
    assert_eq!(u16::from_le_bytes([cfg[0], cfg[1]]), 100);
    assert_eq!(u16::from_le_bytes([cfg[2], cfg[3]]), 40);
    assert_eq!(u32::from_le_bytes(cfg[4..8].try_into().unwrap()), 1);
    // Partial and out-of-range reads return exactly the size asked.
    assert_eq!(drv.read_config(2, 2).unwrap(), 40u16.to_le_bytes());
    assert_eq!(drv.read_config(10, 8).unwrap(), vec![0; 8]);
    // emerg_wr prints one character; other fields are read-only.
    let mut c = client(&csock);
    drv.write_config(8, &[b'!', 0, 0, 0]).unwrap();
    assert_eq!(read_exact_within(&mut c, 1), b"!");
    drv.write_config(0, &[1, 0]).unwrap();
    assert_eq!(drv.read_config(0, 2).unwrap(), 100u16.to_le_bytes());
    // The backend still works.
    guest_write(&mut drv, b"ok", 2);
    assert_eq!(read_exact_within(&mut c, 2), b"ok");
}

#[test]
fn no_size_without_a_terminal() {
    let dir = tempdir("nosize");
    let out = dir.join("out.log");
    let b = Backend::spawn(&dir, &["--output", &format!("file:{}", out.display())]);
    let mut drv = guest(&b);
    assert_eq!(drv.info().features & 1 << VIRTIO_CONSOLE_F_SIZE, 0);
    let data = pattern(0, 200_000, 6);
    guest_write(&mut drv, &data, 777);
    assert!(read_file_when(&out, data.len()) == data);
}

#[test]
fn hostile_transmit_chains_are_returned_and_the_device_goes_on() {
    let dir = tempdir("hostile");
    let csock = dir.join("console.sock");
    let b = Backend::spawn(&dir, &["--output", &format!("socket:{}", csock.display())]);
    let mut c = client(&csock);
    let mut drv = guest(&b);
    let mem = drv.options().mem_size;
    let q = drv.queue(TX).unwrap();
    let ids = q.reserve_descriptors(2).unwrap();
    // Past the end of guest memory, and a huge length.
    q.write_descriptor(
        ids[0],
        RawDescriptor {
            addr: mem + 4096,
            len: 64,
            ..RawDescriptor::default()
        },
    )
    .unwrap();
    q.write_descriptor(
        ids[1],
        RawDescriptor {
            addr: 4096,
            len: u32::MAX,
            ..RawDescriptor::default()
        },
    )
    .unwrap();
    q.submit_raw(ids[0]).unwrap();
    q.submit_raw(ids[1]).unwrap();
    let done = q.wait(2, WAIT).unwrap();
    assert!(done.iter().all(|c| c.len == 0));
    q.release_descriptors(&ids).unwrap();
    guest_write(&mut drv, b"still alive", 64);
    let got = read_exact_within(&mut c, 11);
    assert_eq!(got, b"still alive");
}

#[test]
fn reconnecting_frontend_keeps_the_console() {
    let dir = tempdir("reconnect");
    let csock = dir.join("console.sock");
    let b = Backend::spawn(&dir, &["--output", &format!("socket:{}", csock.display())]);
    let mut c = client(&csock);
    let mut drv = guest(&b);
    guest_write(&mut drv, b"first ", 64);
    drop(drv);
    let mut drv = guest(&b);
    guest_write(&mut drv, b"second", 64);
    assert_eq!(read_exact_within(&mut c, 12), b"first second");
    c.write_all(b"in").unwrap();
    assert_eq!(guest_read(&mut drv, 2, 16).0, b"in");
}

#[test]
fn pty_output_prints_its_path_and_carries_both_ways() {
    let dir = tempdir("pty");
    let mut cmd = Command::new(BIN);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut b = Backend::spawn_cmd(cmd, &dir, &["--output", "pty"]);
    let mut line = String::new();
    let mut out = b.child().stdout.take().unwrap();
    let mut byte = [0u8; 1];
    while !line.ends_with('\n') {
        assert_eq!(out.read(&mut byte).unwrap(), 1);
        line.push(byte[0] as char);
    }
    let path = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(path.starts_with("/dev/pts/"), "{line:?}");
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut drv = guest(&b);
    let data = pattern(0, 100_000, 7);
    guest_write(&mut drv, &data, 1024);
    assert!(read_exact_within(&mut pty, data.len()) == data);
    pty.write_all(b"keys\r\n").unwrap();
    // Raw pty: no translation, no echo.
    assert_eq!(guest_read(&mut drv, 6, 64).0, b"keys\r\n");
}

/// Opens a pty pair: (master, slave).
fn openpty(cols: u16, rows: u16) -> (std::fs::File, std::fs::File) {
    let (mut m, mut s) = (0, 0);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors; name and termios are not requested.
    let rc = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(rc, 0);
    // SAFETY: fresh descriptors we own.
    unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) }
}

fn lflag(fd: &impl AsRawFd) -> libc::tcflag_t {
    // SAFETY: tcgetattr fills a zeroed termios.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(fd.as_raw_fd(), &mut t), 0);
        t.c_lflag
    }
}

#[test]
fn stdio_terminal_raw_mode_resize_and_escape() {
    let dir = tempdir("stdio");
    let (mut master, slave) = openpty(120, 50);
    assert_ne!(lflag(&slave) & libc::ICANON, 0);
    let mut cmd = Command::new(BIN);
    let fd = slave.as_raw_fd();
    cmd.stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap());
    // SAFETY: only async-signal-safe calls between fork and exec: a new session whose
    // controlling terminal is the pty, so resizes send it SIGWINCH.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(fd, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut b = Backend::spawn_cmd(cmd, &dir, &[]);
    let mut drv = guest(&b);
    assert_ne!(drv.info().features & 1 << VIRTIO_CONSOLE_F_SIZE, 0);
    assert_eq!(drv.config()[..4], [120, 0, 50, 0]);
    // Raw while running.
    assert_eq!(lflag(&slave) & (libc::ICANON | libc::ECHO), 0);
    // Resize: the config space follows.
    let ws = libc::winsize {
        ws_row: 30,
        ws_col: 90,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    assert_eq!(
        // SAFETY: TIOCSWINSZ reads a valid winsize.
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
        0
    );
    let deadline = Instant::now() + WAIT;
    while drv.read_config(0, 4).unwrap() != [90, 0, 30, 0] {
        assert!(Instant::now() < deadline, "resize not seen");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Output, then input with an escaped Ctrl-a.
    guest_write(&mut drv, b"login: ", 64);
    assert_eq!(read_exact_within(&mut master, 7), b"login: ");
    master.write_all(b"root\x01\x01\r").unwrap();
    assert_eq!(guest_read(&mut drv, 6, 64).0, b"root\x01\r");
    // Ctrl-a x quits and restores the terminal.
    master.write_all(b"\x01x").unwrap();
    assert!(b.wait().success());
    assert_ne!(lflag(&slave) & libc::ICANON, 0, "terminal left in raw mode");
    assert!(!b.socket.exists());
}

#[test]
fn sigterm_restores_the_terminal() {
    let dir = tempdir("sigterm");
    let (_master, slave) = openpty(80, 24);
    let mut cmd = Command::new(BIN);
    cmd.stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap());
    let mut b = Backend::spawn_cmd(cmd, &dir, &[]);
    let deadline = Instant::now() + WAIT;
    while lflag(&slave) & libc::ICANON != 0 {
        assert!(Instant::now() < deadline, "never raw");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(b.signal_and_wait(libc::SIGTERM).success());
    assert_ne!(lflag(&slave) & libc::ICANON, 0, "terminal left in raw mode");
}

#[test]
fn attach_client_relays_both_ways() {
    let dir = tempdir("attach");
    let csock = dir.join("console.sock");
    let b = Backend::spawn(&dir, &["--output", &format!("socket:{}", csock.display())]);
    let mut drv = guest(&b);
    guest_write(&mut drv, b"buffered before attach\n", 64);
    // `hype-console attach` with piped stdio (not a terminal: no escape, no raw mode).
    let mut child = Command::new(BIN)
        .arg("attach")
        .arg(&csock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let want = b"buffered before attach\n";
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.windows(want.len()).any(|w| w == want) {
        let n = out.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "attach output ended: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    child.stdin.take().unwrap().write_all(b"typed").unwrap();
    assert_eq!(guest_read(&mut drv, 5, 64).0, b"typed");
    drop(drv);
    drop(b); // backend killed: the client sees the close and exits
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "attach did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success());
}

#[test]
fn usage_errors_exit_2() {
    let s = Command::new(BIN)
        .args(["--socket", "/nonexistent/x.sock", "--output", "bogus"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(s.code(), Some(2));
    let s = Command::new(BIN)
        .args(["--socket", "/nonexistent/dir/x.sock", "--output", "pty"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    // A socket path the user gave that cannot be bound is a usage error too.
    assert_eq!(s.code(), Some(2));
    let _ = Segment::Writable(0);
}

#[test]
fn input_burst_into_small_buffers() {
    let dir = tempdir("smallbufs");
    let csock = dir.join("console.sock");
    let b = Backend::spawn(&dir, &["--output", &format!("socket:{}", csock.display())]);
    let mut drv = guest(&b);
    let mut c = client(&csock);
    let data = pattern(0, 1 << 20, 8);
    let send = data.clone();
    let writer = std::thread::spawn(move || {
        c.write_all(&send).unwrap();
        c
    });
    let (got, used) = guest_read(&mut drv, data.len(), 256);
    assert!(got == data, "guest input differs");
    assert!(used <= data.len() / 256 * 2, "{used} used entries");
    let _c = writer.join().unwrap();
}

#[test]
fn client_that_sends_and_leaves_loses_nothing() {
    let dir = tempdir("sendleave");
    let csock = dir.join("console.sock");
    let b = Backend::spawn(&dir, &["--output", &format!("socket:{}", csock.display())]);
    let mut drv = guest(&b);
    // More than the backend buffers, then a full close before the guest reads anything.
    let data = pattern(0, 150_000, 11);
    let mut c = client(&csock);
    let send = data.clone();
    let writer = std::thread::spawn(move || c.write_all(&send).unwrap());
    std::thread::sleep(Duration::from_millis(200));
    let (got, _) = guest_read(&mut drv, data.len(), 4096);
    writer.join().unwrap();
    assert!(got == data);
    // The backend noticed the departure: a new client is accepted, not refused.
    let mut c = client(&csock);
    guest_write(&mut drv, b"hello again", 64);
    assert_eq!(read_exact_within(&mut c, 11), b"hello again");
}

#[test]
fn half_closed_client_still_gets_output() {
    let dir = tempdir("halfclose");
    let csock = dir.join("console.sock");
    let b = Backend::spawn(&dir, &["--output", &format!("socket:{}", csock.display())]);
    let mut drv = guest(&b);
    let mut c = client(&csock);
    c.write_all(b"cmd\n").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(guest_read(&mut drv, 4, 64).0, b"cmd\n");
    guest_write(&mut drv, b"result", 64);
    assert_eq!(read_exact_within(&mut c, 6), b"result");
    // Its final close is noticed: the next client is accepted.
    drop(c);
    let mut c = client(&csock);
    guest_write(&mut drv, b"next", 64);
    assert_eq!(read_exact_within(&mut c, 4), b"next");
}

#[test]
fn attach_on_a_terminal_detaches_with_ctrl_a_x_and_restores_it() {
    let dir = tempdir("attachtty");
    let csock = dir.join("console.sock");
    let b = Backend::spawn(&dir, &["--output", &format!("socket:{}", csock.display())]);
    let mut drv = guest(&b);
    let (mut master, slave) = openpty(80, 24);
    let mut child = Command::new(BIN)
        .arg("attach")
        .arg(&csock)
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while lflag(&slave) & libc::ICANON != 0 {
        assert!(Instant::now() < deadline, "attach never went raw");
        std::thread::sleep(Duration::from_millis(5));
    }
    guest_write(&mut drv, b"prompt$ ", 64);
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !seen.windows(8).any(|w| w == b"prompt$ ") {
        let n = master.read(&mut buf).unwrap();
        seen.extend_from_slice(&buf[..n]);
    }
    // Ctrl-a Ctrl-a is one Ctrl-a for the guest; Ctrl-a x detaches.
    master.write_all(b"ls\x01\x01\r\x01x").unwrap();
    assert_eq!(guest_read(&mut drv, 4, 64).0, b"ls\x01\r");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "attach did not detach");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success());
    assert_ne!(lflag(&slave) & libc::ICANON, 0, "terminal left in raw mode");
    // The backend keeps running: a new client can attach and gets new output.
    let mut c = client(&csock);
    guest_write(&mut drv, b"again", 64);
    assert_eq!(read_exact_within(&mut c, 5), b"again");
}

#[test]
fn confined_while_serving_and_forbidden_calls_kill() {
    let dir = tempdir("sandbox");
    let csock = dir.join("console.sock");
    let log = dir.join("guest.log");
    let mut b = Backend::spawn(
        &dir,
        &[
            "--output",
            &format!("socket:{}", csock.display()),
            "--log",
            log.to_str().unwrap(),
        ],
    );
    let mut c = client(&csock);
    let mut drv = guest(&b);
    let data = pattern(0, 4096, 9);
    guest_write(&mut drv, &data, 1000);
    assert_eq!(read_exact_within(&mut c, data.len()), data);
    let threads = hype_testkit::sandbox::thread_modes(b.child().id()).unwrap();
    // Main, console I/O, shutdown watcher, the queues' worker.
    assert!(threads.len() >= 4, "{threads:?}");
    for t in &threads {
        assert_eq!(
            t.seccomp,
            hype_testkit::sandbox::SECCOMP_MODE_FILTER,
            "{threads:?}"
        );
    }
    drop(drv);
    assert!(b.signal_and_wait(libc::SIGTERM).success());
    // Both sockets were removed on exit under Landlock.
    assert!(!csock.exists() && !b.socket.exists());
    for (hook, call) in [
        ("execve", "execve"),
        ("socket-inet", "socket"),
        ("ptrace", "ptrace"),
    ] {
        let mut cmd = Command::new(BIN);
        cmd.arg("--socket")
            .arg(dir.join("k.sock"))
            .args(["--output", "file:/dev/null"]);
        let (status, stderr) =
            hype_testkit::sandbox::run_hook(cmd, hook, Duration::from_secs(10)).unwrap();
        hype_testkit::sandbox::assert_killed_by_sigsys(status, &stderr, call);
    }
}

/// Open fds of process `pid`, once the count stops changing (a disconnect is torn down
/// asynchronously).
fn settled_fd_count(pid: u32) -> usize {
    let count = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let mut last = count();
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(25));
        let now = count();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

#[test]
fn fd_count_stays_flat_over_1000_connections() {
    let dir = tempdir("fds");
    let csock = dir.join("console.sock");
    let b = Backend::spawn(&dir, &["--output", &format!("socket:{}", csock.display())]);
    let pid = b.process.pid().unwrap();
    let one = |i: usize| {
        let mut drv = guest(&b);
        guest_write(&mut drv, &pattern(i, 64, 3), 64);
        drop(drv);
    };
    for i in 0..10 {
        one(i);
    }
    let before = settled_fd_count(pid);
    for i in 10..1000 {
        one(i);
    }
    let after = settled_fd_count(pid);
    assert_eq!(
        after, before,
        "fds before {before}, after 990 more connections {after}"
    );
}

/// vhost-user DEVICE_STATE: guest output no reader has taken and input the guest has not
/// received, saved with the rings stopped, come out of a fresh console process that loaded
/// the state before its rings started; a damaged state is refused.
#[test]
fn device_state_carries_buffered_output_and_input_to_a_new_process() {
    let dir = tempdir("state1");
    let csock = dir.join("console.sock");
    let mut b = Backend::spawn(&dir, &["--output", &format!("socket:{}", csock.display())]);
    // Input typed while the guest has no receive buffer, then the client leaves.
    let mut c = client(&csock);
    c.write_all(b"typed before the snapshot").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(c);
    std::thread::sleep(Duration::from_millis(100));
    let mut drv = guest(&b);
    // Output written while nobody reads: buffered.
    let out = pattern(0, 20_000, 9);
    guest_write(&mut drv, &out, 512);
    drv.stop_queues().unwrap();
    let state = drv.connection().unwrap().save_state(1 << 20).unwrap();
    let state = state.expect("the console offers DEVICE_STATE");
    assert_eq!(state.len(), 16 + 8 + out.len() + 8 + 25);
    drop(drv);
    b.signal_and_wait(libc::SIGTERM);

    let dir2 = tempdir("state2");
    let csock2 = dir2.join("console.sock");
    let _b2 = Backend::spawn(
        &dir2,
        &["--output", &format!("socket:{}", csock2.display())],
    );
    let mut damaged = state.clone();
    damaged[3] ^= 1;
    let mut drv = hype_testkit::driver::Driver::connect_inactive(&_b2.socket, opts()).unwrap();
    assert!(drv.connection().unwrap().load_state(&damaged).is_err());
    drop(drv);
    let mut drv = hype_testkit::driver::Driver::connect_inactive(&_b2.socket, opts()).unwrap();
    drv.connection().unwrap().load_state(&state).unwrap();
    drv.activate().unwrap();
    let (got, _) = guest_read(&mut drv, 25, 64);
    assert_eq!(got, b"typed before the snapshot");
    let mut c = client(&csock2);
    assert!(read_exact_within(&mut c, out.len()) == out);
    assert_quiet(&mut c, Duration::from_millis(200));
}
