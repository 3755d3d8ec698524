//! Sequential read throughput of hype-block-http from a local HTTP server (the in-test server
//! of tests/http_server, loopback only), through hype-testkit playing the guest. Run with
//! `cargo bench -p hype-block-http --bench seq_read [-- MIB]` (MIB: image size, default 128).
//!
//! Cases: cold cache (every byte over HTTP) with and without read-ahead, with 0 and 2 ms of
//! server latency per request, at guest queue depth 1 (1 MiB reads, one stream) and 8
//! (eight 1 MiB reads in flight); then a warm pass served from the cache.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

#[path = "../../block/tests/conformance/mod.rs"]
mod conformance;
#[path = "../tests/http_server/mod.rs"]
mod http_server;

use std::time::{Duration, Instant};

use conformance::{connect, tempdir, Process};
use http_server::{Behaviour, HttpServer};
use hype_testkit::blk::{BlkDriver, BlkRequest};

const BIN: &str = env!("CARGO_BIN_EXE_hype-block-http");
const CHUNK: u64 = 1 << 20;

/// Reads the whole disk in 1 MiB requests, `depth` in flight; returns MiB/s.
fn pass(disk: &mut BlkDriver, size: u64, depth: usize) -> f64 {
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        let reqs: Vec<BlkRequest> = (0..depth as u64)
            .map(|i| off + i * CHUNK)
            .filter(|&o| o < size)
            .map(|o| BlkRequest::read(o / 512, CHUNK as u32))
            .collect();
        for (r, resp) in reqs.iter().zip(disk.run_batch(&reqs).expect("batch")) {
            resp.check(r).expect("read failed");
        }
        off += depth as u64 * CHUNK;
    }
    (size as f64 / (1 << 20) as f64) / t.elapsed().as_secs_f64()
}

fn main() {
    let mib: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(128);
    let size = mib << 20;
    let img: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    for delay_ms in [0u64, 2] {
        for (readahead, depth) in [("0", 1), ("4", 1), ("16", 1), ("0", 8), ("4", 8)] {
            let server = HttpServer::start(Behaviour {
                delay: Duration::from_millis(delay_ms),
                ..Behaviour::new(img.clone())
            });
            let dir = tempdir(&format!("bench-{delay_ms}-{readahead}-{depth}"));
            let url = server.url();
            let p = Process::spawn(
                BIN,
                &[
                    "--url",
                    &url,
                    "--readahead",
                    readahead,
                    "--cache-size",
                    "256M",
                ],
                &dir.join("blk.sock"),
            );
            let mut disk = connect(&p.socket, 1);
            let cold = pass(&mut disk, size, depth);
            let warm = pass(&mut disk, size, depth);
            println!(
                "seq read {mib} MiB, server latency {delay_ms} ms, readahead {readahead:>2} blocks, \
                 QD{depth}: cold {cold:7.0} MiB/s, warm {warm:7.0} MiB/s, {} GETs",
                server.served_ranges().len()
            );
        }
    }
}
