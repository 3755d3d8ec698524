//! qemu-storage-daemon's vhost-user-blk export as a third-party backend: recognised without a
//! type, serves I/O through the transport, and survives a restart with requests pending
//! (through INFLIGHT_SHMFD, which libvhost-user offers). Skipped when qemu-storage-daemon is
//! not installed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::vdriver::{capacity, pattern, Guest, IO_TIMEOUT, RUNNING};
use common::work_dir;
use hype_testkit::blk::{submit_request, BlkRequest};
use hype_vmm::virtio::device::DeviceOptions;
use hype_vmm::virtio::mmio::{reg, F_VERSION_1};
use hype_vmm::virtio::DeviceType;
use vhost::vhost_user::message::VhostUserProtocolFeatures;

const QSD: &str = "qemu-storage-daemon";

fn have_qsd() -> bool {
    Command::new(QSD)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Qsd {
    img: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
}

impl Qsd {
    fn start(img: &Path, socket: &Path) -> Qsd {
        let mut q = Qsd {
            img: img.to_owned(),
            socket: socket.to_owned(),
            child: None,
        };
        q.spawn();
        q
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new(QSD)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                self.img.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable=on",
                self.socket.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("start qemu-storage-daemon");
        self.child = Some(child);
        let t = Instant::now();
        while !self.socket.exists() {
            assert!(t.elapsed() < Duration::from_secs(10), "qsd socket missing");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn qemu_storage_daemon_is_recognised_serves_io_and_survives_a_restart() {
    if !have_qsd() {
        eprintln!("{QSD} not installed: skipped");
        return;
    }
    let dir = work_dir("vq_qsd");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let mut qsd = Qsd::start(&img, &dir.join("qsd.sock"));
    let mut g = Guest::new(1, 64);
    let d = g.attach(&DeviceOptions::new(&qsd.socket));
    assert_eq!(d.kind(), DeviceType::Block);
    assert_eq!(capacity(&d), (8 << 20) / 512);
    let inflight = d
        .backend()
        .protocol_features
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    eprintln!(
        "qsd features {:#x}, protocol features acked {:?}",
        d.backend().features,
        d.backend().protocol_features
    );
    // FLUSH and CONFIG_WCE: the guest may write `writeback` (config offset 32), which goes to
    // the backend as SET_CONFIG.
    g.init(&d, F_VERSION_1 | 1 << 9 | 1 << 11);
    d.mmio_write(reg::CONFIG + 32, &[0]);
    let t = Instant::now();
    while d.stats().config_writes.load(Ordering::Relaxed) == 0 {
        assert_eq!(d.stats().config_writes_failed.load(Ordering::Relaxed), 0);
        assert!(t.elapsed() < Duration::from_secs(5), "SET_CONFIG not sent");
        std::thread::sleep(Duration::from_millis(5));
    }
    d.mmio_write(reg::CONFIG, &[0]);
    assert_eq!(d.guest_errors(), 1, "capacity is not writable");
    for i in 0..4u64 {
        g.write(0, i * 8, pattern(i as u8, 4096));
    }
    for i in 0..4u64 {
        assert_eq!(g.read(0, i * 8, 4096), pattern(i as u8, 4096));
    }

    qsd.kill();
    let t = Instant::now();
    while d.stats().connected.load(Ordering::Acquire) {
        assert!(t.elapsed() < Duration::from_secs(5), "hang-up not noticed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let reqs: Vec<BlkRequest> = (0..4u64)
        .map(|i| BlkRequest::write(100 + i * 8, pattern(50 + i as u8, 4096)))
        .collect();
    let vq = &mut g.queues[0];
    let heads: Vec<u16> = reqs
        .iter()
        .map(|r| submit_request(vq, r).unwrap())
        .collect();
    qsd.spawn();
    let done = vq.wait(heads.len(), IO_TIMEOUT).unwrap();
    let mut got: Vec<u16> = done.iter().map(|c| c.head).collect();
    got.sort();
    let mut want = heads;
    want.sort();
    assert_eq!(got, want);
    std::thread::sleep(Duration::from_millis(100));
    assert!(vq.poll().unwrap().is_empty(), "duplicate completions");
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(g.read(0, r.sector(), 4096), pattern(50 + i as u8, 4096));
    }
    assert_eq!(g.read(0, 8, 4096), pattern(1, 4096));
    assert_eq!(d.stats().reconnects.load(Ordering::Relaxed), 1);
    // The guest's writeback=0 went to the new process too.
    assert_eq!(d.stats().config_writes.load(Ordering::Relaxed), 2);
    assert_eq!(d.stats().config_writes_failed.load(Ordering::Relaxed), 0);
    let mut wce = [0xffu8];
    d.mmio_read(reg::CONFIG + 32, &mut wce);
    assert_eq!(wce, [0]);
    let mut b = [0u8; 4];
    d.mmio_read(reg::STATUS, &mut b);
    assert_eq!(u32::from_le_bytes(b), RUNNING);
    eprintln!("inflight tracking used: {inflight}");
}
