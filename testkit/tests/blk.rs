//! The virtio-blk helpers against the in-test RAM disk backend (tests/common).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{serve, socket_path, Mode};
use hype_testkit::blk::{BlkDriver, BlkRange, BlkRequest, BlkRequestType, BlkStatus, BLK_ID_BYTES};
use hype_testkit::driver::{DriverOptions, ReplayBase};
use hype_testkit::error::Error;
use virtio_bindings::virtio_blk as vb;

const DISK: usize = 1 << 20;

fn disk() -> Arc<Mutex<Vec<u8>>> {
    Arc::new(Mutex::new(vec![0u8; DISK]))
}

fn opts(num_queues: usize) -> DriverOptions {
    DriverOptions {
        num_queues,
        queue_size: 64,
        mem_size: 16 << 20,
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(5),
        ..DriverOptions::default()
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect()
}

#[test]
fn config_and_basic_requests() {
    let path = socket_path("blk-basic");
    let d = disk();
    let _srv = serve(&path, vec![Mode::Blk(d.clone())]);
    let mut blk = BlkDriver::connect(&path, opts(1)).unwrap();
    let cfg = *blk.config();
    assert_eq!(cfg.capacity, (DISK / 512) as u64);
    assert_eq!(cfg.capacity_bytes(), DISK as u64);
    assert_eq!(cfg.seg_max, 64);
    assert_eq!(cfg.num_queues, 4);
    assert!(blk.has_feature(vb::VIRTIO_BLK_F_FLUSH));
    assert!(!blk.has_feature(vb::VIRTIO_BLK_F_DISCARD));
    assert_eq!(blk.refresh_config().unwrap(), cfg);

    let data = pattern(1, 8192);
    blk.write(3, &data).unwrap();
    assert_eq!(&d.lock().unwrap()[3 * 512..3 * 512 + 8192], &data[..]);
    assert_eq!(blk.read(3, 8192).unwrap(), data);
    assert_eq!(blk.read(4, 512).unwrap(), &data[512..1024]);
    blk.flush().unwrap();
    let id = blk.get_id().unwrap();
    assert_eq!(id.len(), BLK_ID_BYTES as usize);
    assert_eq!(&id[..13], b"hype-test-blk");

    // Multi-segment chains.
    let req = BlkRequest::write(100, pattern(2, 4096)).split_segments(1000);
    assert_eq!(blk.execute(0, &req).unwrap().status, BlkStatus::Ok);
    let resp = blk
        .execute(0, &BlkRequest::read(100, 4096).split_segments(512))
        .unwrap();
    assert_eq!(resp.status, BlkStatus::Ok);
    assert_eq!(resp.data, pattern(2, 4096));
    assert_eq!(resp.used_len, 4097);

    // Errors come back as statuses.
    let past_end = (DISK / 512) as u64;
    assert!(matches!(
        blk.read(past_end, 512),
        Err(Error::BlkStatus { status: 1, .. })
    ));
    assert!(matches!(
        blk.discard(&[BlkRange {
            sector: 0,
            num_sectors: 8,
            flags: 0
        }]),
        Err(Error::BlkStatus {
            status: 2,
            request: "discard",
            ..
        })
    ));
    let odd = BlkRequest::custom(BlkRequestType::Other(0x77), 0, Vec::new(), 0);
    assert_eq!(blk.execute(0, &odd).unwrap().status, BlkStatus::Unsupp);
}

#[test]
fn batch_across_queues() {
    let path = socket_path("blk-batch");
    let d = disk();
    let _srv = serve(&path, vec![Mode::Blk(d)]);
    let mut blk = BlkDriver::connect(&path, opts(4)).unwrap();
    // 4 KiB writes to 200 distinct places, then read them all back in one batch.
    let writes: Vec<_> = (0..200u64)
        .map(|i| BlkRequest::write(i * 8, pattern(i, 4096)))
        .collect();
    let resp = blk.run_batch(&writes).unwrap();
    assert!(resp
        .iter()
        .all(|r| r.status == BlkStatus::Ok && r.used_len == 1));
    let reads: Vec<_> = (0..200u64)
        .rev()
        .map(|i| BlkRequest::read(i * 8, 4096))
        .collect();
    let resp = blk.run_batch(&reads).unwrap();
    for (r, i) in resp.iter().zip((0..200u64).rev()) {
        assert_eq!(r.status, BlkStatus::Ok);
        assert_eq!(r.data, pattern(i, 4096), "sector {}", i * 8);
    }
    let drv = blk.driver();
    for q in 0..4 {
        let s = drv.queue(q).unwrap().stats();
        assert_eq!(
            s.completed, 100,
            "queue {q}: 400 requests spread round-robin"
        );
        assert_eq!(drv.queue(q).unwrap().in_flight(), 0);
    }
}

#[test]
fn data_survives_backend_restart() {
    let path = socket_path("blk-restart");
    let d = disk();
    let _srv = serve(&path, vec![Mode::Blk(d.clone()), Mode::Blk(d)]);
    let mut blk = BlkDriver::connect(&path, opts(2)).unwrap();
    let data = pattern(9, 65536);
    blk.write(64, &data).unwrap();
    blk.driver().reconnect(ReplayBase::Resubmit).unwrap();
    assert_eq!(blk.read(64, 65536).unwrap(), data);
    let resp = blk.execute(1, &BlkRequest::read(64, 512)).unwrap();
    assert_eq!(resp.data, &data[..512]);
}

#[test]
fn batch_waits_when_guest_memory_is_full() {
    let path = socket_path("blk-mempressure");
    let _srv = serve(&path, vec![Mode::Blk(disk())]);
    let mut o = opts(1);
    o.mem_size = 1 << 20; // rings + ~15 buffers of 64 KiB at a time
    let mut blk = BlkDriver::connect(&path, o).unwrap();
    let writes: Vec<_> = (0..16u64)
        .map(|i| BlkRequest::write(i * 128, pattern(i, 65536)))
        .collect();
    assert!(blk
        .run_batch(&writes)
        .unwrap()
        .iter()
        .all(|r| r.status == BlkStatus::Ok));
    let reads: Vec<_> = (0..16u64)
        .map(|i| BlkRequest::read(i * 128, 65536))
        .collect();
    for (i, r) in blk.run_batch(&reads).unwrap().into_iter().enumerate() {
        assert_eq!(r.data, pattern(i as u64, 65536));
    }
    // A single request larger than guest memory is an error, not a hang.
    assert!(matches!(
        blk.run_batch(&[BlkRequest::read(0, 2 << 20)]),
        Err(Error::OutOfBufferMemory { .. })
    ));
}

#[test]
fn closed_loop_keeps_depth_and_counts() {
    use hype_testkit::loadgen::{closed_loop, StopAfter};
    let path = socket_path("blk-loop");
    let _srv = serve(&path, vec![Mode::Blk(disk())]);
    let mut blk = BlkDriver::connect(&path, opts(1)).unwrap();
    let q = blk.driver().queue(0).unwrap();
    let report = closed_loop(
        q,
        8,
        StopAfter::Requests(500),
        Duration::from_secs(5),
        |n| {
            if n % 2 == 0 {
                BlkRequest::write((n % 100) * 8, pattern(n, 4096))
            } else {
                BlkRequest::read((n % 100) * 8, 4096)
            }
        },
    )
    .unwrap();
    assert_eq!(report.requests, 500);
    assert_eq!(report.errors, 0);
    assert_eq!(report.bytes, 500 * 4096);
    assert_eq!(report.latencies_ns.len(), 500);
    assert!(report.percentile(50.0) <= report.percentile(99.0));
    assert_eq!(q.in_flight(), 0);
    // Requests past the end of the disk are counted as errors.
    let report = closed_loop(
        q,
        4,
        StopAfter::Requests(10),
        Duration::from_secs(5),
        |_| BlkRequest::read((DISK / 512) as u64, 512),
    )
    .unwrap();
    assert_eq!(report.errors, 10);
}
