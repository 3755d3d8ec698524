//! Console throughput: guest output to a client socket and to a file, and client input to the
//! guest, through the real backend process. `cargo bench -p hype-console`.
//! `HYPE_BENCH_MB` sets the megabytes moved per case (default 64).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::time::Instant;

use common::*;

fn mb() -> usize {
    std::env::var("HYPE_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn report(case: &str, bytes: usize, secs: f64, chains: usize) {
    println!(
        "{case:<44} {:>8.1} MiB/s  {:>9.0} chains/s",
        bytes as f64 / secs / (1 << 20) as f64,
        chains as f64 / secs
    );
}

fn tx_to_client(chunk: usize) {
    let dir = tempdir(&format!("bench-tx-{chunk}"));
    let csock = dir.join("console.sock");
    let b = Backend::spawn(&dir, &["--output", &format!("socket:{}", csock.display())]);
    let total = mb() << 20;
    let mut c = client(&csock);
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0;
        while got < total {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(_) => {}
            }
        }
        got
    });
    let mut drv = guest(&b);
    let data = pattern(0, total, 9);
    let t = Instant::now();
    guest_write(&mut drv, &data, chunk);
    let got = reader.join().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(got, total);
    report(
        &format!("guest -> socket client, {chunk} B chains"),
        total,
        secs,
        total.div_ceil(chunk),
    );
}

fn tx_to_file(chunk: usize) {
    let dir = tempdir(&format!("bench-file-{chunk}"));
    let out = dir.join("out.log");
    let b = Backend::spawn(&dir, &["--output", &format!("file:{}", out.display())]);
    let total = mb() << 20;
    let mut drv = guest(&b);
    let data = pattern(0, total, 9);
    let t = Instant::now();
    guest_write(&mut drv, &data, chunk);
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(std::fs::metadata(&out).unwrap().len() as usize, total);
    report(
        &format!("guest -> log file, {chunk} B chains"),
        total,
        secs,
        total.div_ceil(chunk),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn rx_from_client(buf: usize) {
    let dir = tempdir(&format!("bench-rx-{buf}"));
    let csock = dir.join("console.sock");
    let b = Backend::spawn(&dir, &["--output", &format!("socket:{}", csock.display())]);
    let total = (mb() / 4).max(1) << 20;
    let mut drv = guest(&b);
    let mut c = client(&csock);
    let data = pattern(0, total, 10);
    let send = data.clone();
    let t = Instant::now();
    let writer = std::thread::spawn(move || c.write_all(&send).unwrap());
    let (got, used) = guest_read(&mut drv, total, buf);
    let secs = t.elapsed().as_secs_f64();
    writer.join().unwrap();
    assert!(got == data);
    report(
        &format!("socket client -> guest, {buf} B buffers"),
        total,
        secs,
        used,
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: run a tiny smoke then.
    if !std::env::args().any(|a| a == "--bench") {
        std::env::set_var("HYPE_BENCH_MB", "1");
    }
    println!(
        "hype-console throughput ({} MiB per guest-output case)",
        mb()
    );
    for chunk in [128, 4096, 65536] {
        tx_to_client(chunk);
    }
    tx_to_file(4096);
    for buf in [256, 4096] {
        rx_from_client(buf);
    }
}
