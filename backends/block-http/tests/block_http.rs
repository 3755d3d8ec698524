//! hype-block-http as a real process against HTTP servers started by the tests: one that
//! honours Range, one that does not, one that fails transiently, one whose content changes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

#[path = "../../block/tests/conformance/mod.rs"]
mod conformance;
#[path = "../../daemon/tests/exit_check/mod.rs"]
mod exit_check;
mod http_server;

use std::process::Command;
use std::time::Duration;

use conformance::*;
use http_server::{Behaviour, HttpServer};
use hype_testkit::blk::{BlkDriver, BlkRequest, BlkStatus, SECTOR_SIZE};

const BIN: &str = env!("CARGO_BIN_EXE_hype-block-http");
const MEM: u64 = 64 << 20;
const KIB64: u64 = 64 << 10;

/// An image of `len` bytes with the conformance pattern for `seed`.
fn image(len: usize, seed: u8) -> Vec<u8> {
    pattern(0, len, seed)
}

fn spawn(name: &str, server: &HttpServer, extra: &[&str]) -> (Process, std::path::PathBuf) {
    let dir = tempdir(name);
    let url = server.url();
    let mut args = vec!["--url", url.as_str()];
    args.extend_from_slice(extra);
    let p = Process::spawn(BIN, &args, &dir.join("blk.sock"));
    (p, dir)
}

/// Runs the binary expecting a start-up failure with exit code `code`; returns its stderr,
/// which must be one line.
fn start_fails(server_url: &str, extra: &[&str], code: i32) -> String {
    let dir = tempdir("fail");
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--url",
        server_url,
        "--retries",
        "1",
        "--retry-delay-ms",
        "1",
    ])
    .args(extra)
    .arg("--socket")
    .arg(dir.join("blk.sock"))
    .env("HYPE_LOG", "off");
    let out = exit_check::run_to_exit(cmd);
    let line = exit_check::assert_exit(&out, code, "hype-block-http", "");
    assert!(
        !dir.join("blk.sock").exists(),
        "no socket on a refused image"
    );
    line
}

fn status(disk: &mut BlkDriver, req: &BlkRequest) -> BlkStatus {
    disk.execute(0, req).unwrap().status
}

fn read_status(disk: &mut BlkDriver, offset: u64, len: u32) -> BlkStatus {
    status(disk, &BlkRequest::read(offset / SECTOR_SIZE, len))
}

#[test]
fn serves_image_read_only_through_range_requests_with_bounded_cache() {
    // 3 MiB + 1000 bytes: the ragged tail reads as zeroes up to the sector boundary.
    let len = (3 << 20) + 1000;
    let img = image(len, 1);
    let server = HttpServer::start(Behaviour::new(img.clone()));
    let (_p, _dir) = spawn(
        "http-ro",
        &server,
        &[
            "--cache-block",
            "64K",
            "--cache-size",
            "1M",
            "--readahead",
            "0",
            "--serial",
            "http0",
            // Requests run in order on the queue thread (large ones too), so which blocks
            // the bounded cache still holds after the whole-disk pass is deterministic.
            "--io-threads",
            "0",
            "--large-io-threads",
            "0",
        ],
    );
    let mut disk = connect(&_p.socket, 1);
    let cap = (len as u64).div_ceil(SECTOR_SIZE);
    check_config(&mut disk, cap, 1);
    check_get_id(&mut disk, "http0");

    // The whole disk, in mixed sizes and segment splits, in one batch.
    let mut reqs = Vec::new();
    let mut off = 0u64;
    let sizes = [128 << 10, 4096, 512, 300 << 10, 1 << 20];
    let mut i = 0;
    while off < cap * SECTOR_SIZE {
        let n = sizes[i % sizes.len()].min(cap * SECTOR_SIZE - off);
        reqs.push(BlkRequest::read(off / SECTOR_SIZE, n as u32).split_segments(64 << 10));
        off += n;
        i += 1;
    }
    let mut got = Vec::new();
    for (r, resp) in reqs.iter().zip(disk.run_batch(&reqs).unwrap()) {
        resp.check(r).unwrap();
        got.extend_from_slice(&resp.data);
    }
    assert_eq!(got.len() as u64, cap * SECTOR_SIZE);
    assert!(got[..len] == img[..], "image bytes");
    assert!(
        got[len..].iter().all(|&b| b == 0),
        "tail past the image is zero"
    );
    // Every request was a 64 KiB-aligned range inside the image, none twice.
    let mut ranges = server.served_ranges();
    let probe = ranges.remove(0);
    assert_eq!(probe, (0, 0), "first GET is the one-byte probe");
    for &(a, b) in &ranges {
        assert_eq!(a % KIB64, 0, "{a}");
        assert!(b - a < KIB64 && b < len as u64);
    }
    let mut sorted = ranges.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        ranges.len(),
        "a block was fetched twice in one pass"
    );
    assert_eq!(ranges.len() as u64, (len as u64).div_ceil(KIB64));

    // 256 KiB read twice: the second time comes from the cache.
    server.clear_log();
    assert!(disk.read(0, 256 << 10).unwrap() == img[..256 << 10]);
    assert_eq!(server.served_ranges().len(), 4);
    assert!(disk.read(0, 256 << 10).unwrap() == img[..256 << 10]);
    assert_eq!(server.served_ranges().len(), 4, "{:?}", server.log());
    // 1 MiB elsewhere fills the 1 MiB cache: the first blocks are evicted and fetched again.
    assert!(disk.read(2048, 1 << 20).unwrap() == img[1 << 20..2 << 20]);
    server.clear_log();
    assert_eq!(disk.read(0, 4096).unwrap(), img[..4096]);
    assert_eq!(server.served_ranges(), [(0, KIB64 - 1)]);

    check_read_only(&mut disk, Some(1));
    check_out_of_range_and_unknown(&mut disk);
    check_hostile_chains(&mut disk, MEM);
    assert_eq!(disk.read(8, 4096).unwrap(), img[4096..8192]);
}

#[test]
fn refuses_servers_that_ignore_range_or_hide_the_size() {
    let img = image(1 << 20, 2);
    let plain = HttpServer::start(Behaviour {
        honour_range: false,
        ..Behaviour::new(img.clone())
    });
    let err = start_fails(&plain.url(), &[], exit_check::USAGE);
    assert!(err.contains("does not support Range requests"), "{err}");
    assert!(err.contains("answered with 200"), "{err}");

    let no_size = HttpServer::start(Behaviour {
        head_length: false,
        hide_total: true,
        ..Behaviour::new(img.clone())
    });
    let err = start_fails(&no_size.url(), &[], exit_check::USAGE);
    assert!(err.contains("image size unknown"), "{err}");

    let lying = HttpServer::start(Behaviour {
        head_size: Some(1 << 60),
        ..Behaviour::new(img.clone())
    });
    let err = start_fails(&lying.url(), &[], exit_check::USAGE);
    assert!(
        err.contains("HEAD says 1152921504606846976 bytes but Content-Range says 1048576"),
        "{err}"
    );
    lying.set(|b| b.hide_total = true);
    let err = start_fails(&lying.url(), &[], exit_check::USAGE);
    assert!(err.contains("larger than the supported"), "{err}");

    // No HEAD, but the probe's Content-Range gives the size: accepted.
    let no_head = HttpServer::start(Behaviour {
        head_allowed: false,
        etag: None,
        ..Behaviour::new(img.clone())
    });
    let (_p, _dir) = spawn("http-nohead", &no_head, &[]);
    let mut disk = connect(&_p.socket, 1);
    check_config(&mut disk, (1 << 20) / SECTOR_SIZE, 1);
    assert_eq!(
        disk.read(1000, 8192).unwrap(),
        img[1000 * 512..1000 * 512 + 8192]
    );

    let err = start_fails("http://127.0.0.1:1/disk.img", &[], exit_check::RUNTIME);
    assert!(
        err.contains("HEAD http://127.0.0.1:1/disk.img failed"),
        "{err}"
    );
    let err = start_fails("ftp://example.invalid/x", &[], exit_check::USAGE);
    assert!(err.contains("invalid url"), "{err}");
    let err = start_fails(
        &no_head.url(),
        &["--cache-block", "1000"],
        exit_check::USAGE,
    );
    assert!(err.contains("invalid --cache-block 1000"), "{err}");
}

#[test]
fn retries_transient_failures_then_fails_only_that_request() {
    let img = image(2 << 20, 3);
    // The first two requests (HEAD included) fail: start-up retries through them.
    let server = HttpServer::start(Behaviour {
        fail_next: 2,
        ..Behaviour::new(img.clone())
    });
    let (_p, _dir) = spawn(
        "http-retry",
        &server,
        &[
            "--cache-block",
            "64K",
            "--readahead",
            "0",
            "--retries",
            "3",
            "--retry-delay-ms",
            "5",
        ],
    );
    let mut disk = connect(&_p.socket, 1);
    assert_eq!(server.count(503), 2);
    assert_eq!(disk.read(0, 4096).unwrap(), img[..4096]);

    // Two failures in a row: retried, the guest sees success.
    server.set(|b| b.fail_next = 2);
    assert_eq!(
        disk.read(1024, 4096).unwrap(),
        img[1024 * 512..1024 * 512 + 4096]
    );
    assert_eq!(server.count(503), 4);

    // More failures than retries: IOERR after 1 + 3 attempts, for that request only.
    server.set(|b| b.fail_next = 100);
    server.clear_log();
    assert_eq!(read_status(&mut disk, 1 << 20, 4096), BlkStatus::IoErr);
    assert_eq!(server.count(503), 4, "1 attempt + 3 retries");
    // Cached data is still served while the server is down.
    assert_eq!(disk.read(0, 4096).unwrap(), img[..4096]);
    // The server recovers: the same read now works.
    server.set(|b| b.fail_next = 0);
    assert_eq!(
        disk.read((1 << 20) / SECTOR_SIZE, 4096).unwrap(),
        img[1 << 20..(1 << 20) + 4096]
    );
}

#[test]
fn short_bodies_are_retried_and_wrong_ranges_refused() {
    let img = image(2 << 20, 14);
    let server = HttpServer::start(Behaviour::new(img.clone()));
    let (_p, _dir) = spawn(
        "http-bad",
        &server,
        &[
            "--cache-block",
            "64K",
            "--readahead",
            "0",
            "--retries",
            "2",
            "--retry-delay-ms",
            "1",
        ],
    );
    let mut disk = connect(&_p.socket, 1);
    // Two answers cut short (connection closed mid-body): retried, then correct data.
    server.set(|b| b.truncate_next = 2);
    server.clear_log();
    assert_eq!(disk.read(0, 8192).unwrap(), img[..8192]);
    assert_eq!(server.served_ranges(), [(0, KIB64 - 1); 3]);
    // Three in a row exceed two retries: IOERR.
    server.set(|b| b.truncate_next = 3);
    assert_eq!(read_status(&mut disk, KIB64, 4096), BlkStatus::IoErr);
    // A server answering other bytes than asked for: IOERR at once, no retry.
    server.set(|b| b.shift_ranges = true);
    server.clear_log();
    assert_eq!(read_status(&mut disk, 4 * KIB64, 4096), BlkStatus::IoErr);
    assert_eq!(
        server.served_ranges().len(),
        1,
        "a wrong Content-Range is not retried"
    );
    // Back to normal: everything reads right, nothing bad was cached.
    server.set(|b| b.shift_ranges = false);
    assert!(disk.read(0, 1 << 20).unwrap() == img[..1 << 20]);
}

#[test]
fn detects_a_changed_image_by_etag_and_by_last_modified() {
    for by_etag in [true, false] {
        let img = image(2 << 20, 4);
        let mut b = Behaviour::new(img.clone());
        if !by_etag {
            b.etag = None;
        }
        let server = HttpServer::start(b);
        let (_p, _dir) = spawn(
            if by_etag { "http-etag" } else { "http-lm" },
            &server,
            &[
                "--cache-block",
                "64K",
                "--readahead",
                "0",
                "--retry-delay-ms",
                "1",
            ],
        );
        let mut disk = connect(&_p.socket, 1);
        assert_eq!(disk.read(0, 4096).unwrap(), img[..4096]);

        // New content under a new validator.
        server.set(|b| {
            b.content = std::sync::Arc::new(image(2 << 20, 5));
            if by_etag {
                b.etag = Some("\"v2\"".into());
            } else {
                b.last_modified = Some("Sun, 22 Nov 2026 06:00:00 GMT".into());
            }
        });
        assert_eq!(
            read_status(&mut disk, 1 << 20, 4096),
            BlkStatus::IoErr,
            "by_etag={by_etag}"
        );
        // Stale from now on: no further requests, IOERR; cached blocks of the original
        // version are still served.
        let before = server.log().len();
        assert_eq!(read_status(&mut disk, 512 << 10, 4096), BlkStatus::IoErr);
        assert_eq!(
            server.log().len(),
            before,
            "a stale image sends no requests"
        );
        assert_eq!(disk.read(0, 4096).unwrap(), img[..4096]);
        // Even if the server goes back to the old version, the backend stays stale.
        server.set(|b| {
            b.content = std::sync::Arc::new(img.clone());
            b.etag = Some("\"v1\"".into()).filter(|_| by_etag);
            b.last_modified = Some("Sat, 21 Nov 2026 06:00:00 GMT".into());
        });
        assert_eq!(read_status(&mut disk, 1 << 20, 4096), BlkStatus::IoErr);
    }

    // Without any validator, a size change is still caught.
    let server = HttpServer::start(Behaviour {
        etag: None,
        last_modified: None,
        ..Behaviour::new(image(1 << 20, 6))
    });
    let (_p, _dir) = spawn("http-size", &server, &["--readahead", "0"]);
    let mut disk = connect(&_p.socket, 1);
    server.set(|b| b.content = std::sync::Arc::new(image(2 << 20, 6)));
    assert_eq!(read_status(&mut disk, 0, 4096), BlkStatus::IoErr);
}

#[test]
fn overlay_keeps_writes_locally_across_restarts() {
    let len = 4 << 20;
    let img = image(len, 7);
    let server = HttpServer::start(Behaviour::new(img.clone()));
    let dir = tempdir("http-overlay");
    let overlay = dir.join("disk.overlay");
    let ov = overlay.to_str().unwrap().to_string();
    let args = ["--overlay", ov.as_str(), "--cache-block", "64K"];
    let mut want = img.clone();
    {
        let (mut p, _d) = spawn("http-ov1", &server, &args);
        let mut disk = connect(&p.socket, 1);
        assert!(
            !disk.has_feature(VIRTIO_BLK_F_RO),
            "an overlay makes the disk writable"
        );
        // One sector inside a 4 KiB granule: the rest of the granule comes from the image.
        disk.write(3, &[0xaa; 512]).unwrap();
        want[3 * 512..4 * 512].fill(0xaa);
        assert_eq!(disk.read(0, 8192).unwrap(), want[..8192]);
        // Unaligned multi-granule write: partial head and tail granules.
        let at = (1 << 20) + 1536;
        disk.write(at as u64 / 512, &[0xbb; 9216]).unwrap();
        want[at..at + 9216].fill(0xbb);
        // Whole granules, and write-zeroes.
        disk.write(1024, &[0xcc; 65536]).unwrap();
        want[512 << 10..(512 << 10) + 65536].fill(0xcc);
        disk.write_zeroes(&[hype_testkit::blk::BlkRange {
            sector: 2048 + 8,
            num_sectors: 16,
            flags: 0,
        }])
        .unwrap();
        want[(1 << 20) + 4096..(1 << 20) + 12288].fill(0);
        // Zeroes covering partial granules (copy on write) around a whole one (a hole).
        disk.write_zeroes(&[hype_testkit::blk::BlkRange {
            sector: 4096 + 6,
            num_sectors: 12,
            flags: 0,
        }])
        .unwrap();
        want[(2 << 20) + 3072..(2 << 20) + 9216].fill(0);
        disk.flush().unwrap();
        assert!(disk.read(0, len as u32 / 4).unwrap() == want[..len / 4]);
        assert!(disk.read(2048, len as u32 / 4).unwrap() == want[len / 4..len / 2]);
        drop(disk);
        assert!(p.signal_and_wait(libc::SIGTERM).success());
    }
    // The overlay file is sparse and holds only what was written.
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&overlay).unwrap();
        assert!(
            m.blocks() * 512 < (1 << 20),
            "overlay allocated {} bytes",
            m.blocks() * 512
        );
    }
    // A new process with the same overlay sees the writes; the rest still comes from HTTP.
    {
        let (_p, _d) = spawn("http-ov2", &server, &args);
        let mut disk = connect(&_p.socket, 1);
        for off in (0..len).step_by(1 << 20) {
            let got = disk.read(off as u64 / 512, 1 << 20).unwrap();
            assert!(
                got == want[off..off + (1 << 20)],
                "mismatch in MiB at {off}"
            );
        }
        // Read-only on request: reads the overlay, refuses writes.
        drop(disk);
    }
    {
        let (_p, _d) = spawn(
            "http-ov3",
            &server,
            &["--overlay", ov.as_str(), "--readonly"],
        );
        let mut disk = connect(&_p.socket, 1);
        assert!(disk.has_feature(VIRTIO_BLK_F_RO));
        assert_eq!(disk.read(0, 8192).unwrap(), want[..8192]);
        assert_eq!(
            status(&mut disk, &BlkRequest::write(0, vec![1; 512])),
            BlkStatus::IoErr
        );
    }
    // The image changes on the server: the old overlay is refused.
    server.set(|b| {
        b.content = std::sync::Arc::new(image(len, 8));
        b.etag = Some("\"v2\"".into());
    });
    let err = start_fails(
        &server.url(),
        &["--overlay", ov.as_str()],
        exit_check::USAGE,
    );
    assert!(err.contains("was made for"), "{err}");
}

#[test]
fn overlay_conformance_whole_disk_and_many_in_flight() {
    let server = HttpServer::start(Behaviour::new(image(4 << 20, 9)));
    let dir = tempdir("http-ovc");
    let ov = dir.join("o").to_str().unwrap().to_string();
    let (_p, _d) = spawn(
        "http-ovc-p",
        &server,
        &[
            "--overlay",
            ov.as_str(),
            "--num-queues",
            "2",
            "--io-threads",
            "4",
        ],
    );
    let mut disk = connect(&_p.socket, 2);
    check_read_after_write_whole_disk(&mut disk, 10);
    check_many_in_flight(&mut disk, 11);
    check_flush(&mut disk);
    drop(disk);
    check_reconnect(&_p.socket, 2);
    check_stop_and_resume(&_p.socket);
}

#[test]
fn reads_ahead_on_sequential_streams_with_requests_in_flight() {
    let len = 8 << 20;
    let img = image(len, 12);
    let server = HttpServer::start(Behaviour {
        delay: Duration::from_millis(30),
        ..Behaviour::new(img.clone())
    });
    let (_p, _dir) = spawn(
        "http-ra",
        &server,
        &[
            "--cache-block",
            "64K",
            "--readahead",
            "4",
            "--connections",
            "8",
            "--cache-size",
            "4M",
        ],
    );
    let mut disk = connect(&_p.socket, 1);

    // One 1 MiB read spans 16 blocks: they are fetched in parallel.
    assert!(disk.read(0, 1 << 20).unwrap() == img[..1 << 20]);
    assert!(
        server.max_concurrent() >= 4,
        "max concurrent GETs {}",
        server.max_concurrent()
    );

    // Random reads (the block before was never read) trigger no read-ahead.
    server.clear_log();
    let blk = |b: u64| (b * KIB64, b * KIB64 + KIB64 - 1);
    disk.read(40 * KIB64 / 512, 4096).unwrap();
    disk.read(60 * KIB64 / 512, 4096).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(server.served_ranges(), [blk(40), blk(60)]);

    // A sequential stream: reading block 41 right after 40 fetches 42..=45 ahead.
    server.clear_log();
    disk.read(41 * KIB64 / 512, KIB64 as u32).unwrap();
    server.wait_for("read-ahead of blocks 42..=45", |l| {
        (42..=45).all(|b| l.iter().any(|e| e.range == Some(blk(b))))
    });
    // Reading on through them sends no further request for them, and keeps reading ahead.
    for b in 42..=45u64 {
        let got = disk.read(b * KIB64 / 512, KIB64 as u32).unwrap();
        assert!(got == img[(b * KIB64) as usize..((b + 1) * KIB64) as usize]);
    }
    server.wait_for("read-ahead of blocks 46..=49", |l| {
        (46..=49).all(|b| l.iter().any(|e| e.range == Some(blk(b))))
    });
    let ranges = server.served_ranges();
    for b in 41..=49 {
        assert_eq!(
            ranges.iter().filter(|&&r| r == blk(b)).count(),
            1,
            "block {b}: {ranges:?}"
        );
    }
}

#[cfg(feature = "https")]
#[test]
fn https_with_a_private_ca() {
    let tls = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls");
    let img = image(1 << 20, 13);
    let server = HttpServer::start_tls(
        Behaviour::new(img.clone()),
        &tls.join("server.pem"),
        &tls.join("server.key"),
    );
    assert!(server.url().starts_with("https://"));
    // The test CA is not a system root: refused without --ca-cert.
    let err = start_fails(&server.url(), &[], exit_check::RUNTIME);
    assert!(
        err.contains("HEAD") && err.to_lowercase().contains("certificate"),
        "{err}"
    );
    let ca = tls.join("ca.pem");
    let (_p, _dir) = spawn("https", &server, &["--ca-cert", ca.to_str().unwrap()]);
    let mut disk = connect(&_p.socket, 1);
    check_config(&mut disk, (1 << 20) / SECTOR_SIZE, 1);
    assert!(disk.read(0, 1 << 20).unwrap() == img);
    let missing = tls.join("missing.pem");
    let err = start_fails(
        &server.url(),
        &["--ca-cert", missing.to_str().unwrap()],
        exit_check::USAGE,
    );
    assert!(err.contains("cannot use CA certificates"), "{err}");
}

#[test]
fn usage_errors_exit_2_runtime_errors_exit_1() {
    let server = HttpServer::start(Behaviour::new(image(1 << 20, 4)));
    let url = server.url();
    let err = start_fails(&url, &["--connections", "0"], exit_check::USAGE);
    assert!(err.contains("invalid --connections 0"), "{err}");
    let err = start_fails(&url, &["--timeout", "x"], exit_check::USAGE);
    assert!(err.contains("invalid value 'x' for '--timeout"), "{err}");
    let dir = tempdir("http-exit");
    let sock = dir.join("blk.sock");
    let sock_s = sock.to_str().unwrap();
    let taken = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["--url", &url, "--socket", sock_s])
        .env("HYPE_LOG", "off");
    let out = exit_check::run_to_exit(cmd);
    exit_check::assert_exit(&out, exit_check::USAGE, "hype-block-http", "is in use");
    drop(taken);
    std::fs::remove_file(&sock).unwrap();
    // A server that keeps answering 503 may come back: runtime.
    server.set(|b| b.fail_next = 1000);
    let err = start_fails(&url, &[], exit_check::RUNTIME);
    assert!(err.contains("server answered 503"), "{err}");
    server.set(|b| b.fail_next = 0);
    // Runtime after serving started: no file descriptors left for 64 queues' threads.
    let cmd = exit_check::with_fd_limit(
        &[],
        32,
        BIN,
        &[
            &["--url", &url][..],
            &exit_check::BLOCK_QUEUES_PAST_FD_LIMIT,
            &["--socket", sock_s],
        ]
        .concat(),
    );
    let out = exit_check::exit_after_connect(cmd, &sock);
    exit_check::assert_exit(
        &out,
        exit_check::RUNTIME,
        "hype-block-http",
        "Too many open files",
    );
    assert!(!sock.exists(), "socket left behind");
}

/// Reads of `n` separate cache blocks, all submitted at once on queue 0; checks the data.
fn read_blocks_at_once(disk: &mut BlkDriver, img: &[u8], n: u64) {
    let reqs: Vec<BlkRequest> = (0..n)
        .map(|i| BlkRequest::read(i * 2 * KIB64 / SECTOR_SIZE, 4096))
        .collect();
    for (r, resp) in reqs.iter().zip(disk.run_batch(&reqs).unwrap()) {
        resp.check(r).unwrap();
        let off = (r.sector() * SECTOR_SIZE) as usize;
        assert!(resp.data == img[off..off + 4096]);
    }
}

#[test]
fn io_threads_default_to_16_so_one_queue_keeps_requests_in_flight() {
    let img = image(8 << 20, 13);
    let slow = || {
        HttpServer::start(Behaviour {
            delay: Duration::from_millis(100),
            ..Behaviour::new(img.clone())
        })
    };
    let opts = [
        "--cache-block",
        "64K",
        "--readahead",
        "0",
        "--connections",
        "32",
    ];
    // No --io-threads: 16 pool threads, so up to 16 of one queue's reads wait on the network
    // together (more than the 8 connections of the default, at most the 16 threads).
    let server = slow();
    let (_p, _dir) = spawn("http-iot16", &server, &opts);
    let mut disk = connect(&_p.socket, 1);
    read_blocks_at_once(&mut disk, &img, 24);
    let most = server.max_concurrent();
    assert!((9..=16).contains(&most), "max concurrent GETs {most}");
    // --io-threads 0: the queue thread runs one request at a time.
    let server = slow();
    let mut args = opts.to_vec();
    args.extend(["--io-threads", "0"]);
    let (_p, _dir) = spawn("http-iot0", &server, &args);
    let mut disk = connect(&_p.socket, 1);
    read_blocks_at_once(&mut disk, &img, 4);
    assert_eq!(server.max_concurrent(), 1);
}

#[test]
fn confined_while_serving_files_and_calls_outside_the_sandbox_refused() {
    let img = image(1 << 20, 5);
    let server = HttpServer::start(Behaviour::new(img.clone()));
    let url = server.url();
    let dir = tempdir("http-sb");
    let overlay = dir.join("overlay");
    let overlay_arg = overlay.to_str().unwrap().to_string();
    let args = ["--url", url.as_str(), "--overlay", overlay_arg.as_str()];
    let mut p = Process::spawn(BIN, &args, &dir.join("blk.sock"));
    // The overlay takes writes, the server the reads; client, fetcher, I/O and worker threads
    // are all filtered.
    check_every_thread_filtered(&p, 1);
    // The I/O pool lives while a frontend is connected (a new one per connection): count
    // the threads during a connection, after a read went through.
    let mut disk = connect(&p.socket, 1);
    // (The first 64 KiB now hold check_every_thread_filtered's write: read past them.)
    assert_eq!(
        disk.read(256, 4096).unwrap(),
        img[128 << 10..(128 << 10) + 4096]
    );
    let threads = hype_testkit::sandbox::thread_modes(p.pid()).unwrap();
    assert!(threads.len() > 16, "I/O pool and fetchers: {threads:?}");
    assert!(
        threads
            .iter()
            .all(|t| t.seccomp == hype_testkit::sandbox::SECCOMP_MODE_FILTER),
        "{threads:?}"
    );
    drop(disk);
    assert!(p.signal_and_wait(libc::SIGTERM).success());
    assert!(!p.socket.exists());
    // Landlock: a file outside its set cannot be opened; serving goes on.
    assert!(std::fs::read("/etc/hostname").is_ok());
    check_open_refused(BIN, &args, &dir, "/etc/hostname");
    for (hook, call) in [("execve", "execve"), ("ptrace", "ptrace")] {
        check_hook_kills(BIN, &args, &dir, hook, call);
    }
}

/// Starts the backend on `url` with `extra` arguments and `env`, logging at info level into
/// a file; returns the process and the log path.
fn spawn_logged(
    name: &str,
    url: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Process, std::path::PathBuf) {
    let dir = tempdir(name);
    let sock = dir.join("blk.sock");
    let log = dir.join("stderr.log");
    let mut cmd = Command::new(BIN);
    // An empty `url`: none in argv (the test gives it in the environment).
    if !url.is_empty() {
        cmd.args(["--url", url]);
    }
    cmd.args(extra)
        .arg("--socket")
        .arg(&sock)
        .env("HYPE_LOG", "info")
        .env_remove("HYPE_HTTP_CREDENTIALS")
        .env_remove("HYPE_HTTP_URL")
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    (Process::from_child(child, &sock), log)
}

#[test]
fn credentials_from_a_file_or_the_environment_and_never_printed() {
    let img = image(1 << 20, 9);
    let mut b = Behaviour::new(img.clone());
    // alice:s3cret
    b.require_authorization = Some("Basic YWxpY2U6czNjcmV0".into());
    let server = HttpServer::start(b);
    let url = server.url();
    // Without credentials the server says 401.
    let err = start_fails(&url, &[], exit_check::USAGE);
    assert!(err.contains("server answered 401"), "{err}");
    // From a file (mode and size checked, first line only).
    let dir = tempdir("http-creds");
    let creds = dir.join("creds");
    std::fs::write(&creds, "alice:s3cret\nignored\n").unwrap();
    let (p, log) = spawn_logged(
        "http-cred-file",
        &url,
        &["--credentials-file", creds.to_str().unwrap()],
        &[],
    );
    let mut disk = connect(&p.socket, 1);
    assert_eq!(disk.read(0, 4096).unwrap(), img[..4096]);
    drop(disk);
    drop(p);
    assert!(!std::fs::read_to_string(&log).unwrap().contains("s3cret"));
    // From the environment.
    let (p, _log) = spawn_logged(
        "http-cred-env",
        &url,
        &[],
        &[("HYPE_HTTP_CREDENTIALS", "alice:s3cret")],
    );
    let mut disk = connect(&p.socket, 1);
    assert_eq!(disk.read(8, 4096).unwrap(), img[4096..8192]);
    drop(disk);
    drop(p);
    // Wrong ones are refused by the server; malformed ones by the backend.
    std::fs::write(&creds, "alice:wrong\n").unwrap();
    let err = start_fails(
        &url,
        &["--credentials-file", creds.to_str().unwrap()],
        exit_check::USAGE,
    );
    assert!(err.contains("server answered 401"), "{err}");
    std::fs::write(&creds, "no colon here\n").unwrap();
    let err = start_fails(
        &url,
        &["--credentials-file", creds.to_str().unwrap()],
        exit_check::USAGE,
    );
    assert!(
        err.contains("expected user:password on the first line"),
        "{err}"
    );
    let err = start_fails(
        &url,
        &["--credentials-file", dir.to_str().unwrap()],
        exit_check::USAGE,
    );
    assert!(err.contains("is not a regular file"), "{err}");
    // Credentials in the URL still work, but the log and every error show them redacted.
    let port = server.port();
    let secret_url = format!("http://alice:s3cret@127.0.0.1:{port}/disk.raw?token=tok123");
    let (p, log) = spawn_logged("http-cred-url", &secret_url, &[], &[]);
    let mut disk = connect(&p.socket, 1);
    assert_eq!(disk.read(0, 512).unwrap(), img[..512]);
    drop(disk);
    drop(p);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        !logged.contains("s3cret") && !logged.contains("tok123"),
        "{logged}"
    );
    assert!(logged.contains("http://***@127.0.0.1"), "{logged}");
    assert!(logged.contains("visible to every local user"), "{logged}");
    assert!(logged.contains("--credentials-file"), "{logged}");
    // The same URL from the environment (how `hype run` passes it): it works, nothing is
    // printed with the secrets, and there is nothing to warn about.
    let (p, log) = spawn_logged("http-url-env", "", &[], &[("HYPE_HTTP_URL", &secret_url)]);
    let mut disk = connect(&p.socket, 1);
    assert_eq!(disk.read(0, 512).unwrap(), img[..512]);
    drop(disk);
    drop(p);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        !logged.contains("s3cret") && !logged.contains("tok123"),
        "{logged}"
    );
    assert!(logged.contains("http://***@127.0.0.1"), "{logged}");
    assert!(!logged.contains("visible to every local user"), "{logged}");
    // An error naming the URL (nobody listens on port 1).
    let err = start_fails(
        "http://alice:s3cret@127.0.0.1:1/i.raw?token=tok123",
        &[],
        exit_check::RUNTIME,
    );
    assert!(!err.contains("s3cret") && !err.contains("tok123"), "{err}");
    assert!(err.contains("***"), "{err}");
    let err = start_fails(
        "ftp://alice:s3cret@h/i?token=tok123",
        &[],
        exit_check::USAGE,
    );
    assert!(!err.contains("s3cret") && !err.contains("tok123"), "{err}");
}

/// `--user nobody`: block-http drops before it opens anything or starts a thread, then binds
/// its socket, creates its overlay and serves as nobody (all its threads: four ids, no groups,
/// no capabilities).
#[test]
fn drops_root_before_its_threads_start() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED drops_root_before_its_threads_start: needs root");
        return;
    }
    use hype_testkit::sandbox::{check_runs_as, NOBODY};
    use std::os::unix::fs::MetadataExt;
    let img = image(1 << 20, 6);
    let server = HttpServer::start(Behaviour::new(img.clone()));
    let url = server.url();
    let dir = tempdir("http-user");
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let overlay = dir.join("overlay");
    let overlay_arg = overlay.to_str().unwrap().to_string();
    let args = [
        "--url",
        url.as_str(),
        "--overlay",
        overlay_arg.as_str(),
        "--user",
        "nobody",
    ];
    let mut p = Process::spawn(BIN, &args, &dir.join("blk.sock"));
    // It listened as nobody: the (root) driver must allow that user, as a root VMM would
    // with `--device blk:PATH,allow-uid=65534`.
    let allow = hype_testkit::driver::DriverOptions {
        allowed_peer_uids: vec![NOBODY],
        ..opts(1)
    };
    let mut disk = BlkDriver::connect(&p.socket, allow).unwrap();
    check_read_after_write_whole_disk(&mut disk, 7);
    check_runs_as(p.pid(), NOBODY, NOBODY).unwrap();
    for f in [&overlay, &p.socket] {
        let m = std::fs::symlink_metadata(f).unwrap();
        assert_eq!((m.uid(), m.gid()), (NOBODY, NOBODY), "{}", f.display());
    }
    drop(disk);
    assert!(p.signal_and_wait(libc::SIGTERM).success());
    assert!(!p.socket.exists());
}
