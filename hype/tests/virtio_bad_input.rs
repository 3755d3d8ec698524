//! Bad input around virtio devices: sockets that are not vhost-user, backends that hang up in
//! the middle of the handshake, unknown device types, and a guest writing nonsense to the
//! registers. Every case is a clear error, and nothing takes the VMM down.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assemble, hype, texts, work_dir, Backend};
use hype_testkit::memory::GuestRam;
use hype_vmm::virtio::device::{DeviceError, DeviceOptions};
use hype_vmm::virtio::frontend::FrontendError;
use hype_vmm::virtio::mmio::{reg, status};
use hype_vmm::virtio::{DeviceType, VhostUserDevice};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

fn ram() -> GuestRam {
    GuestRam::new(8 << 20).unwrap()
}

/// A listener at `path` that runs `serve` on every connection, in a thread.
fn fake_server(path: &Path, serve: fn(std::os::unix::net::UnixStream)) {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            serve(s);
        }
    });
}

fn attach_err(path: &Path, kind: Option<DeviceType>) -> DeviceError {
    let mut opts = DeviceOptions::new(path);
    opts.kind = kind;
    VhostUserDevice::attach("bad", &opts, ram().memory().clone(), None).unwrap_err()
}

#[test]
fn sockets_that_are_not_vhost_user() {
    let dir = work_dir("vb_not_vu");
    // Answers with HTTP.
    let http = dir.join("http.sock");
    fake_server(&http, |mut s| {
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        std::thread::sleep(Duration::from_millis(200));
    });
    let e = attach_err(&http, None);
    assert!(
        matches!(e, DeviceError::Frontend(FrontendError::NotVhostUser { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("is not a vhost-user backend"), "{e}");
    // Closes at once.
    let closer = dir.join("closer.sock");
    fake_server(&closer, drop);
    let e = attach_err(&closer, Some(DeviceType::Block));
    assert!(e.to_string().contains("is not a vhost-user backend"), "{e}");
    // Says nothing at all: the watchdog ends the handshake.
    let silent = dir.join("silent.sock");
    fake_server(&silent, |s| {
        std::thread::sleep(Duration::from_secs(8));
        drop(s);
    });
    let t = Instant::now();
    let e = attach_err(&silent, None);
    assert!(e.to_string().contains("is not a vhost-user backend"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(7), "{:?}", t.elapsed());
    // A path that is a regular file.
    let file = dir.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let e = attach_err(&file, None);
    assert!(
        matches!(e, DeviceError::Frontend(FrontendError::Connect { .. })),
        "{e}"
    );
}

#[test]
fn backend_hanging_up_during_the_handshake() {
    let dir = work_dir("vb_hangup");
    let p = dir.join("hangup.sock");
    // Reads SET_OWNER and GET_FEATURES, then goes away.
    fake_server(&p, |mut s| {
        let mut buf = [0u8; 24];
        let _ = s.read(&mut buf);
    });
    let e = attach_err(&p, None);
    assert!(
        matches!(
            e,
            DeviceError::Frontend(FrontendError::NotVhostUser {
                op: "GET_FEATURES",
                ..
            })
        ),
        "{e}"
    );
}

#[test]
fn vmm_binary_reports_bad_devices_in_one_line() {
    let dir = work_dir("vb_binary");
    let elf = assemble("long_hello", 0x20_0000);
    let http = dir.join("http.sock");
    fake_server(&http, |mut s| {
        let _ = s.write_all(&[0xff; 64]);
        std::thread::sleep(Duration::from_millis(200));
    });
    let missing = dir.join("missing.sock");
    let _ = std::fs::remove_file(&missing);
    for (dev, want) in [
        (
            format!("{}", http.display()),
            "is not a vhost-user backend".to_string(),
        ),
        (
            format!("{},wait=200ms", missing.display()),
            "was not there after waiting".to_string(),
        ),
        (
            format!("gpu:{}", http.display()),
            "was not there after waiting".to_string(),
        ),
    ] {
        let o = hype(&[
            "vmm",
            "--kernel",
            elf.to_str().unwrap(),
            "--memory",
            "64M",
            "--device-wait",
            "100ms",
            "--device",
            &dev,
        ]);
        let (_, err) = texts(&o);
        assert_ne!(o.status.code(), Some(0), "{dev}: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("hype: device 0 ("), "{dev}: {err}");
        assert!(last.contains(&want), "{dev}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let o = hype(&[
        "vmm",
        "--kernel",
        elf.to_str().unwrap(),
        "--device",
        "/x.sock,colour=red",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(texts(&o).1.contains("unknown device option 'colour'"));
}

/// A backend served by another user (here `nobody`) does not get guest memory unless the
/// device allows that uid: one clear line, exit 1; with `allow-uid=` the VM runs.
#[test]
fn backend_of_another_user_is_refused_unless_allowed() {
    // SAFETY: geteuid() has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot start a backend as another user; skipped");
        return;
    }
    const NOBODY: u32 = 65534;
    // A directory `nobody` can create its socket in (the target dir may not be reachable).
    let dir = std::env::temp_dir().join(format!("hype-peer-vmm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.join("disk.sock");
    let _b = Backend::start_as(&["block-mem", "--size", "1M"], &sock, Some(NOBODY));
    let elf = assemble("long_hello", 0x20_0000);
    let vmm = |dev: &str| {
        hype(&[
            "vmm",
            "--kernel",
            elf.to_str().unwrap(),
            "--memory",
            "64M",
            "--device",
            dev,
        ])
    };
    let o = vmm(sock.to_str().unwrap());
    let (_, err) = texts(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("is served by uid 65534") && last.contains("allow-uid=65534"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let o = vmm(&format!("{},allow-uid={NOBODY}", sock.display()));
    let (out, err) = texts(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(!err.contains("served by uid"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backend with configurable features and nothing behind its queues.
struct Mystery {
    features: u64,
    /// GET_CONFIG requests seen (each handshake sends one).
    config_reads: Arc<AtomicUsize>,
}

impl VhostUserBackend for Mystery {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>;
    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn get_config(&self, _offset: u32, size: u32) -> Vec<u8> {
        self.config_reads.fetch_add(1, AtomicOrdering::SeqCst);
        vec![0; size as usize]
    }
    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        Ok(())
    }
    fn handle_event(
        &self,
        _event: u16,
        _evset: EventSet,
        _vrings: &[Self::Vring],
        _thread: usize,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

fn mystery_backend(path: &Path, features: u64) -> Arc<AtomicUsize> {
    let _ = std::fs::remove_file(path);
    // One connection per backend: vhost-user-backend daemons serve one frontend.
    let sock = path.to_owned();
    let reads = Arc::new(AtomicUsize::new(0));
    let config_reads = reads.clone();
    std::thread::spawn(move || {
        let mut d = VhostUserDaemon::new(
            "mystery".into(),
            Arc::new(Mystery {
                features,
                config_reads,
            }),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap();
        let _ = d.serve(&sock);
    });
    // No wait for the socket here: serve() unlinks it as soon as it accepted, and a frontend
    // waits for a missing socket anyway.
    reads
}

#[test]
fn unknown_device_type_needs_an_explicit_type() {
    let dir = work_dir("vb_unknown");
    let p = dir.join("mystery.sock");
    // VERSION_1, PROTOCOL_FEATURES and one device bit that identifies nothing.
    let _ = mystery_backend(&p, 1 << 32 | 1 << 30 | 1 << 3);
    let e = attach_err(&p, None);
    assert!(
        e.to_string()
            .contains("match no known device type; give the type explicitly"),
        "{e}"
    );
    let p = dir.join("mystery2.sock");
    let _ = mystery_backend(&p, 1 << 32 | 1 << 30 | 1 << 3);
    let mut opts = DeviceOptions::new(&p);
    opts.kind = Some(DeviceType::Console);
    let d = VhostUserDevice::attach("mystery", &opts, ram().memory().clone(), None).unwrap();
    assert_eq!(d.kind(), DeviceType::Console);
    let mut b = [0u8; 4];
    d.mmio_read(reg::DEVICE_ID, &mut b);
    assert_eq!(u32::from_le_bytes(b), 3);
    drop(d);
    // Without VERSION_1 there is nothing virtio-mmio v2 can do.
    let p2 = dir.join("legacy.sock");
    let _ = mystery_backend(&p2, 1 << 30 | 1 << 2 | 1 << 6 | 1 << 9);
    let e = attach_err(&p2, Some(DeviceType::Block));
    assert!(e.to_string().contains("lack VIRTIO_F_VERSION_1"), "{e}");
}

fn w(d: &VhostUserDevice, off: u64, v: u32) {
    d.mmio_write(off, &v.to_le_bytes());
}

fn r(d: &VhostUserDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.mmio_read(off, &mut b);
    u32::from_le_bytes(b)
}

/// The driver initialisation sequence with VERSION_1, one 16-entry queue at the given guest
/// addresses, ending with DRIVER_OK.
fn driver_setup(d: &VhostUserDevice, desc: u32, driver: u32, device: u32) {
    w(d, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(d, reg::DRIVER_FEATURES_SEL, 1);
    w(d, reg::DRIVER_FEATURES, 1);
    w(
        d,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    w(d, reg::QUEUE_SEL, 0);
    w(d, reg::QUEUE_NUM, 16);
    w(d, reg::QUEUE_DESC_LOW, desc);
    w(d, reg::QUEUE_DRIVER_LOW, driver);
    w(d, reg::QUEUE_DEVICE_LOW, device);
    w(d, reg::QUEUE_READY, 1);
    w(d, reg::STATUS, 0xf);
}

#[test]
fn guest_writing_nonsense_gets_needs_reset_and_the_device_recovers() {
    let dir = work_dir("vb_nonsense");
    let backend = Backend::block_mem(&dir, "1M");
    let ram = ram();
    let d = VhostUserDevice::attach(
        "nonsense",
        &DeviceOptions::new(&backend.socket),
        ram.memory().clone(),
        None,
    )
    .unwrap();
    // Pseudo-random writes of every width everywhere in the window.
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x >> 8) % 0x1000;
        let len = [1usize, 2, 4, 8][(x & 3) as usize];
        d.mmio_write(off, &x.to_le_bytes()[..len]);
        let mut b = [0u8; 8];
        d.mmio_read(off, &mut b[..len]);
    }
    assert!(d.guest_errors() > 1000);
    // Rings outside guest RAM: DRIVER_OK is accepted by the register file, the device thread
    // refuses the rings and asks for a reset.
    w(&d, reg::STATUS, 0);
    driver_setup(&d, 0xfff0_0000, 0x1000, 0x2000);
    let t = Instant::now();
    while r(&d, reg::STATUS) & status::DEVICE_NEEDS_RESET == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "no NEEDS_RESET");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(r(&d, reg::INTERRUPT_STATUS) & 2, 2);
    assert_eq!(d.events().config.read().unwrap(), 1);
    // After a reset the same device takes a correct setup.
    w(&d, reg::STATUS, 0);
    assert_eq!(r(&d, reg::STATUS), 0);
    driver_setup(&d, 0x10000, 0x11000, 0x12000);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r(&d, reg::STATUS), 0xf);
    assert_eq!(
        d.stats()
            .ring_starts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn backend_coming_back_as_another_type_is_refused_until_the_right_one_returns() {
    let dir = work_dir("vb_other_type");
    let sock = dir.join("disk.sock");
    let mut backend = Backend::start(&["block-mem", "--size", "1M"], &sock);
    let ram = ram();
    let d = VhostUserDevice::attach(
        "swap",
        &DeviceOptions::new(&sock),
        ram.memory().clone(),
        None,
    )
    .unwrap();
    assert_eq!(d.kind(), DeviceType::Block);
    backend.kill();
    // A console-looking backend takes the socket: hype must not use it.
    let reads = mystery_backend(&sock, 1 << 32 | 1 << 30 | 1 << 2);
    // The device connects, runs the handshake (GET_CONFIG included), sees a console and hangs
    // up.
    let t = Instant::now();
    while reads.load(AtomicOrdering::SeqCst) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "device never tried the new backend"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(!d
        .stats()
        .connected
        .load(std::sync::atomic::Ordering::Acquire));
    assert_eq!(
        d.stats()
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // The block backend comes back: accepted.
    backend.restart();
    let t = Instant::now();
    while !d
        .stats()
        .connected
        .load(std::sync::atomic::Ordering::Acquire)
    {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "block backend not taken back"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        d.stats()
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}
