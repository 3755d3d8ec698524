//! Cross-check: the same driver scenarios against hype-block-file and against
//! qemu-storage-daemon's vhost-user-blk export (Debian package `qemu-system-common`) give the
//! same statuses, the same data and the same image bytes.
//!
//! Skipped, with a message, when `qemu-storage-daemon` is not installed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

#[path = "../../block/tests/conformance/mod.rs"]
mod conformance;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use conformance::*;
use hype_testkit::blk::{BlkDriver, BlkRange, BlkRequest, BlkRequestType, BlkStatus, SECTOR_SIZE};

const BIN: &str = env!("CARGO_BIN_EXE_hype-block-file");
const QSD: &str = "qemu-storage-daemon";
const SIZE: u64 = 16 << 20;

fn qsd_available() -> bool {
    Command::new(QSD)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    File::create(&p).unwrap().set_len(SIZE).unwrap();
    p
}

fn spawn_qsd(img: &Path, sock: &Path, queues: u16, writable: bool) -> Process {
    let child = Command::new(QSD)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},discard=unmap",
            img.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable={},num-queues={queues}",
            sock.display(),
            if writable { "on" } else { "off" }
        ))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Process::from_child(child, sock)
}

fn spawn_hype(img: &Path, sock: &Path, queues: u16, writable: bool) -> Process {
    let q = queues.to_string();
    let mut args = vec!["--path", img.to_str().unwrap(), "--num-queues", &q];
    if !writable {
        args.push("--readonly");
    }
    Process::spawn(BIN, &args, sock)
}

/// One line per request: what was asked, the status, and the data read back.
fn transcript(disk: &mut BlkDriver) -> Vec<String> {
    let cap = disk.config().capacity;
    let mut reqs = vec![
        BlkRequest::write(0, pattern(0, 65536, 1)),
        BlkRequest::write(128, pattern(128 * SECTOR_SIZE, 12288, 2)).split_segments(4096),
        BlkRequest::write(cap - 8, pattern((cap - 8) * SECTOR_SIZE, 4096, 3)).split_segments(512),
        BlkRequest::read(0, 65536),
        BlkRequest::read(120, 16384).split_segments(1024),
        BlkRequest::read(cap - 16, 8192),
        BlkRequest::flush(),
        BlkRequest::write_zeroes(&[BlkRange {
            sector: 8,
            num_sectors: 16,
            flags: 0,
        }]),
        BlkRequest::write_zeroes(&[BlkRange {
            sector: 40,
            num_sectors: 8,
            flags: 1,
        }]),
        BlkRequest::read(0, 32768),
        // Errors the spec defines.
        BlkRequest::read(cap, 512),
        BlkRequest::read(cap - 1, 1024),
        BlkRequest::write(cap, vec![0; 512]),
        BlkRequest::custom(BlkRequestType::Other(0x55), 0, Vec::new(), 512),
        BlkRequest::custom(BlkRequestType::Other(2), 0, Vec::new(), 512),
        BlkRequest::discard(&[BlkRange {
            sector: 0,
            num_sectors: 8,
            flags: 1,
        }]),
    ];
    // Many in flight on every queue.
    reqs.extend(
        (0..256u64)
            .map(|i| BlkRequest::write(2048 + i * 8, pattern((2048 + i * 8) * 512, 4096, 4))),
    );
    reqs.extend((0..256u64).map(|i| BlkRequest::read(2048 + i * 8, 4096)));
    let mut lines = Vec::new();
    // The first batch one at a time (order matters), the rest as one batch over all queues.
    for r in &reqs[..16] {
        let resp = disk.execute(0, r).unwrap();
        // On errors QEMU reports the whole buffer as used, hype only the status byte (the
        // bytes it wrote); the spec leaves drivers nothing to rely on there.
        let used = if resp.status == BlkStatus::Ok {
            resp.used_len
        } else {
            0
        };
        lines.push(format!(
            "{:?} sector {} -> {:?} used {} data {}",
            r.kind(),
            r.sector(),
            resp.status,
            used,
            digest(&resp.data)
        ));
    }
    for (r, resp) in reqs[16..].iter().zip(disk.run_batch(&reqs[16..]).unwrap()) {
        lines.push(format!(
            "{:?} sector {} -> {:?} data {}",
            r.kind(),
            r.sector(),
            resp.status,
            digest(&resp.data)
        ));
    }
    lines
}

fn digest(data: &[u8]) -> String {
    // FNV-1a: enough to tell contents apart in a transcript.
    let h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{}:{h:016x}", data.len())
}

#[test]
fn same_results_as_qemu_storage_daemon() {
    if !qsd_available() {
        eprintln!("SKIPPED: {QSD} not installed (Debian package qemu-system-common)");
        return;
    }
    let dir = tempdir("qsd");
    let (img_h, img_q) = (image(&dir, "hype.img"), image(&dir, "qsd.img"));
    let hype = spawn_hype(&img_h, &dir.join("hype.sock"), 2, true);
    let qsd = spawn_qsd(&img_q, &dir.join("qsd.sock"), 2, true);
    let mut dh = connect(&hype.socket, 2);
    let mut dq = connect(&qsd.socket, 2);

    assert_eq!(dh.config().capacity, dq.config().capacity);
    assert_eq!(dh.config().num_queues, dq.config().num_queues);
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_RO,
    ] {
        assert_eq!(
            dh.has_feature(bit),
            dq.has_feature(bit),
            "feature bit {bit}"
        );
    }

    let th = transcript(&mut dh);
    let tq = transcript(&mut dq);
    for (i, (h, q)) in th.iter().zip(&tq).enumerate() {
        assert_eq!(
            h, q,
            "request {i} differs (left hype, right qemu-storage-daemon)"
        );
    }
    assert_eq!(th.len(), tq.len());

    // The shared suite passes against both.
    for disk in [&mut dh, &mut dq] {
        check_read_after_write_whole_disk(disk, 30);
        check_flush(disk);
        check_out_of_range_and_unknown(disk);
        check_many_in_flight(disk, 31);
        check_discard_and_write_zeroes(disk);
    }
    dh.flush().unwrap();
    dq.flush().unwrap();
    drop((dh, dq));
    drop((hype, qsd));
    assert!(
        std::fs::read(&img_h).unwrap() == std::fs::read(&img_q).unwrap(),
        "images differ"
    );
}

#[test]
fn same_read_only_behaviour_as_qemu_storage_daemon() {
    if !qsd_available() {
        eprintln!("SKIPPED: {QSD} not installed (Debian package qemu-system-common)");
        return;
    }
    let dir = tempdir("qsdro");
    let img = dir.join("ro.img");
    std::fs::write(&img, pattern(0, SIZE as usize, 40)).unwrap();
    let hype = spawn_hype(&img, &dir.join("hype.sock"), 1, false);
    let qsd = spawn_qsd(&img, &dir.join("qsd.sock"), 1, false);
    for sock in [&hype.socket, &qsd.socket] {
        let mut disk = connect(sock, 1);
        check_read_only(&mut disk, Some(40));
        let r = disk
            .execute(0, &BlkRequest::write(8, vec![1; 512]))
            .unwrap();
        assert_eq!(r.status, BlkStatus::IoErr);
    }
}
