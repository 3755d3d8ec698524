//! Helpers shared by the console tests and benchmark: the backend as a process, a guest
//! driver for its two queues, and a client of its client socket.

#![allow(dead_code)]

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hype_testkit::driver::{Driver, DriverOptions};
use hype_testkit::process::BackendProcess;
use hype_testkit::virtqueue::Segment;

pub const BIN: &str = env!("CARGO_BIN_EXE_hype-console");
pub const WAIT: Duration = Duration::from_secs(20);
pub const RX: usize = 0;
pub const TX: usize = 1;

/// A fresh, empty directory under the system temp dir.
pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hype-console-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic bytes: position `i` of stream `seed`.
pub fn pattern(start: usize, len: usize, seed: u8) -> Vec<u8> {
    (start..start + len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32 % 31) as u8
        })
        .collect()
}

/// The backend running as a separate process ([`BackendProcess`], the test kit's one helper).
pub struct Backend {
    pub process: BackendProcess,
    pub socket: PathBuf,
}

impl Backend {
    /// Spawns `hype-console --socket DIR/vu.sock args...` with stdin from /dev/null.
    pub fn spawn(dir: &Path, args: &[&str]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        Self::spawn_cmd(cmd, dir, args)
    }

    /// Spawns a prepared command (stdio already chosen) with the socket and `args`.
    pub fn spawn_cmd(mut cmd: Command, dir: &Path, args: &[&str]) -> Self {
        let socket = dir.join("vu.sock");
        let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
        cmd.arg("--socket")
            .arg(&socket)
            .args(args)
            .env("HYPE_LOG", "info")
            .stderr(log);
        let mut process = BackendProcess::start(&mut cmd, &socket).unwrap();
        process.wait_for_socket(WAIT).unwrap();
        Backend { process, socket }
    }

    /// The child, for its pipes.
    pub fn child(&mut self) -> &mut Child {
        self.process.child_mut().unwrap()
    }

    /// Sends `signal` and waits for the exit.
    pub fn signal_and_wait(&mut self, signal: i32) -> ExitStatus {
        self.process.signal_and_wait(signal, WAIT).unwrap()
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        self.process.wait(WAIT).unwrap()
    }
}

/// Waits until `p` exists.
pub fn wait_for_path(p: &Path) {
    let deadline = Instant::now() + WAIT;
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Driver options for the console: both queues, 256 entries.
pub fn opts() -> DriverOptions {
    DriverOptions {
        num_queues: 2,
        queue_size: 256,
        config_size: 12,
        ..DriverOptions::default()
    }
}

/// The guest side: connects and activates both queues.
pub fn guest(b: &Backend) -> Driver {
    Driver::connect(&b.socket, opts()).unwrap()
}

/// The guest writes `data` to its console in chains of `chunk` bytes, many in flight at once,
/// and waits until every chain is returned.
pub fn guest_write(drv: &mut Driver, data: &[u8], chunk: usize) {
    let q = drv.queue(TX).unwrap();
    let mut pending = 0usize;
    for piece in data.chunks(chunk) {
        while q.free_descriptors() == 0 || pending >= 128 {
            pending -= q.wait(1, WAIT).unwrap().len();
        }
        q.add(&[Segment::Readable(piece)], false).unwrap();
        pending += 1;
        if pending % 16 == 0 {
            q.notify().unwrap();
        }
    }
    q.notify().unwrap();
    while pending > 0 {
        pending -= q.wait(1, WAIT).unwrap().len();
    }
}

/// The guest reads `len` bytes from its console, posting receive buffers of `buf` bytes.
/// Returns the bytes and the number of used entries they came in.
pub fn guest_read(drv: &mut Driver, len: usize, buf: usize) -> (Vec<u8>, usize) {
    let q = drv.queue(RX).unwrap();
    let mut out = Vec::with_capacity(len);
    let mut used = 0;
    let mut posted = 0;
    let deadline = Instant::now() + WAIT;
    while out.len() < len {
        while posted < 32 {
            q.add(&[Segment::Writable(buf as u32)], false).unwrap();
            posted += 1;
        }
        q.notify().unwrap();
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "guest got {} of {len} bytes", out.len());
        for c in q.wait(1, left).unwrap() {
            posted -= 1;
            used += 1;
            out.extend_from_slice(&c.data[0][..c.len as usize]);
        }
    }
    (out, used)
}

/// A client of the backend's client socket.
pub fn client(path: &Path) -> UnixStream {
    wait_for_path(path);
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    s
}

/// Reads exactly `len` bytes (bounded wait).
pub fn read_exact_within(s: &mut impl Read, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut got = 0;
    let deadline = Instant::now() + WAIT;
    while got < len {
        assert!(Instant::now() < deadline, "read {got} of {len} bytes");
        match s.read(&mut out[got..]) {
            Ok(0) => panic!("closed after {got} of {len} bytes"),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    out
}

/// Asserts nothing more arrives within `quiet`.
pub fn assert_quiet(s: &mut UnixStream, quiet: Duration) {
    s.set_read_timeout(Some(quiet)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(n) => panic!("unexpected {n} bytes: {:?}", &b[..n]),
        Err(e) => assert!(matches!(
            e.kind(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut
        )),
    }
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
}

/// Waits until file `p` holds `len` bytes and returns them.
pub fn read_file_when(p: &Path, len: usize) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    loop {
        let d = std::fs::read(p).unwrap_or_default();
        if d.len() >= len || Instant::now() >= deadline {
            return d;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
