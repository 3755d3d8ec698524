//! Driver overhead: 4 KiB random reads at queue depth 32 against the in-test RAM disk backend
//! (tests/common), one queue, with and without EVENT_IDX. Run with
//! `cargo bench -p hype-testkit --bench qd32 [-- SECONDS]`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hype_testkit::blk::{BlkDriver, BlkRequest};
use hype_testkit::driver::DriverOptions;
use hype_testkit::loadgen::{closed_loop, StopAfter};

const DISK: usize = 64 << 20;

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2.0);
    for event_idx in [true, false] {
        let path = common::socket_path(&format!("bench-{event_idx}"));
        let disk = Arc::new(Mutex::new(vec![0u8; DISK]));
        let _srv = common::serve(&path, vec![common::Mode::Blk(disk)]);
        let opts = DriverOptions {
            queue_size: 128,
            feature_mask: if event_idx {
                u64::MAX
            } else {
                !common::EVENT_IDX
            },
            ..DriverOptions::default()
        };
        let mut blk = BlkDriver::connect(&path, opts).expect("connect");
        let sectors = (DISK / 512) as u64 - 8;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let q = blk.driver().queue(0).expect("queue");
        let report = closed_loop(
            q,
            32,
            StopAfter::Time(Duration::from_secs_f64(secs)),
            Duration::from_secs(10),
            |_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                BlkRequest::read((x % sectors) & !7, 4096)
            },
        )
        .expect("closed loop");
        let s = q.stats();
        println!(
            "qd32 4k randread event_idx={event_idx}: {:.0} IOPS, p50 {:?}, p99 {:?}, errors {}, \
             kicks/io {:.3}, sleeps/io {:.3}",
            report.iops(),
            report.percentile(50.0).unwrap_or_default(),
            report.percentile(99.0).unwrap_or_default(),
            report.errors,
            s.kicks as f64 / report.requests.max(1) as f64,
            s.sleeps as f64 / report.requests.max(1) as f64,
        );
    }
}
