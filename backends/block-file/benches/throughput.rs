//! Throughput of hype-block-file (and, when installed, qemu-storage-daemon on the same kind of
//! image) through hype-testkit's frontend: 1 MiB sequential write/read at QD 4, 4 KiB random
//! read/write at QD 32 on one queue, and 4 KiB random read at QD 32 on each of 4 queues; hype
//! with its sandbox (the default) and with `--sandbox off`, side by side.
//!
//! `cargo bench -p hype-block-file --bench throughput` (HYPE_BENCH_SECS=N per workload,
//! default 2; HYPE_BENCH_SANDBOX_AB=ROUNDS for only the 4 KiB random read with the sandbox on
//! and off, interleaved: `scripts/bench-sandbox`). The image lives in /dev/shm when it exists, so the numbers measure the
//! vhost-user path and the backend, not a disk.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

#[path = "../../block/tests/conformance/mod.rs"]
mod conformance;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use conformance::{tempdir, Process};
use hype_testkit::blk::{add_request, BlkDriver, BlkRequest, SECTOR_SIZE};
use hype_testkit::driver::DriverOptions;
use hype_testkit::virtqueue::Virtqueue;

const BIN: &str = env!("CARGO_BIN_EXE_hype-block-file");
const IMAGE: u64 = 512 << 20;

struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    block: u64,
    depth: usize,
    queues: usize,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "seq write 1M QD4",
        write: true,
        random: false,
        block: 1 << 20,
        depth: 4,
        queues: 1,
    },
    Workload {
        name: "seq read 1M QD4",
        write: false,
        random: false,
        block: 1 << 20,
        depth: 4,
        queues: 1,
    },
    Workload {
        name: "rand read 4K QD32",
        write: false,
        random: true,
        block: 4096,
        depth: 32,
        queues: 1,
    },
    Workload {
        name: "rand write 4K QD32",
        write: true,
        random: true,
        block: 4096,
        depth: 32,
        queues: 1,
    },
    Workload {
        name: "rand read 4K QD32 x4 queues",
        write: false,
        random: true,
        block: 4096,
        depth: 32,
        queues: 4,
    },
];

fn image_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("hype-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Keeps `w.depth` requests in flight on `q` for `secs`; returns each request's latency (ns).
fn drive(q: &mut Virtqueue, w: &Workload, secs: Duration, seed: u64) -> Vec<u64> {
    q.set_read_back(false);
    let blocks = IMAGE / w.block;
    let data = vec![0x5au8; w.block as usize];
    let mut rng = seed | 1;
    let mut next_seq = 0u64;
    let mut in_flight = 0usize;
    let mut latencies: Vec<u64> = Vec::new();
    let mut submitted: HashMap<u16, Instant> = HashMap::new();
    let start = Instant::now();
    loop {
        let running = start.elapsed() < secs;
        if running {
            let mut added = false;
            while in_flight < w.depth {
                let blk = if w.random {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % blocks
                } else {
                    next_seq = (next_seq + 1) % blocks;
                    next_seq
                };
                let sector = blk * w.block / SECTOR_SIZE;
                let req = if w.write {
                    BlkRequest::write(sector, data.clone())
                } else {
                    BlkRequest::read(sector, w.block as u32)
                };
                let head = add_request(q, &req).unwrap();
                submitted.insert(head, Instant::now());
                in_flight += 1;
                added = true;
            }
            if added {
                q.notify().unwrap();
            }
        } else if in_flight == 0 {
            return latencies;
        }
        for c in q.wait(1, Duration::from_secs(10)).unwrap() {
            let want = if w.write { 1 } else { w.block as u32 + 1 };
            assert_eq!(c.len, want, "request failed");
            in_flight -= 1;
            if let Some(t) = submitted.remove(&c.head) {
                latencies.push(t.elapsed().as_nanos() as u64);
            }
        }
    }
}

fn run(name: &str, socket: &Path) {
    run_only(name, socket, |_| true);
}

/// Runs the workloads `pick` selects; returns their IOPS.
fn run_only(name: &str, socket: &Path, pick: impl Fn(&Workload) -> bool) -> Vec<f64> {
    let secs = Duration::from_secs(
        std::env::var("HYPE_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2),
    );
    let mut iops = Vec::new();
    for w in WORKLOADS.iter().filter(|w| pick(w)) {
        let opts = DriverOptions {
            num_queues: w.queues,
            queue_size: 256,
            mem_size: 256 << 20,
            ..DriverOptions::default()
        };
        let mut disk = BlkDriver::connect(socket, opts).unwrap();
        let start = Instant::now();
        let mut latencies: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = disk
                .driver()
                .queues_mut()
                .iter_mut()
                .enumerate()
                .map(|(i, q)| s.spawn(move || drive(q, w, secs, 0x9e37_79b9 * (i as u64 + 1))))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let t = start.elapsed().as_secs_f64();
        let done = latencies.len() as u64;
        latencies.sort_unstable();
        let p99_us = latencies
            .get(latencies.len() * 99 / 100)
            .copied()
            .unwrap_or(0) as f64
            / 1e3;
        println!(
            "{name:>22} | {:<28} | {:>9.0} IOPS | {:>8.1} MiB/s | p99 {:>8.1} us",
            w.name,
            done as f64 / t,
            done as f64 * w.block as f64 / t / (1 << 20) as f64,
            p99_us
        );
        iops.push(done as f64 / t);
    }
    iops
}

/// `HYPE_BENCH_SANDBOX_AB=ROUNDS`: only the 4 KiB random read at QD 32 on one queue, with the
/// sandbox on and off in alternating order (on/off, off/on, ...) ROUNDS times, a fresh backend
/// each time; prints each round's on/off ratio and their median. Interleaving spreads the
/// load of a shared machine over both sides.
fn sandbox_ab(rounds: usize, img: &Path) {
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let mut iops = [0.0f64; 2];
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for on in order {
            let mut args = vec!["--path", img.to_str().unwrap()];
            if !on {
                args.extend(["--sandbox", "off"]);
            }
            let name = if on { "sandbox on" } else { "sandbox off" };
            let p = Process::spawn(
                BIN,
                &args,
                &tempdir(&format!("ab{round}{on}")).join("b.sock"),
            );
            let r = run_only(name, &p.socket, |w| {
                !w.write && w.random && w.block == 4096 && w.queues == 1
            });
            iops[usize::from(!on)] = r.first().copied().unwrap_or(0.0);
            drop(p);
        }
        let ratio = iops[0] / iops[1];
        println!("round {round}: on/off = {ratio:.3}");
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "4K rand read QD32, sandbox on/off over {rounds} interleaved rounds: median {:.3}, \
         range {:.3}-{:.3}",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    );
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: keep that quick.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = image_dir();
    let img = dir.join("hype.img");
    File::create(&img).unwrap().set_len(IMAGE).unwrap();
    if let Some(rounds) = std::env::var("HYPE_BENCH_SANDBOX_AB")
        .ok()
        .and_then(|r| r.parse::<usize>().ok())
        .filter(|r| *r > 0)
    {
        sandbox_ab(rounds, &img);
        return;
    }
    let p = Process::spawn(
        BIN,
        &["--path", img.to_str().unwrap(), "--num-queues", "4"],
        &tempdir("bench").join("blk.sock"),
    );
    run("hype-block-file", &p.socket);
    drop(p);
    // The same without the sandbox, to measure what the seccomp filter costs.
    let p = Process::spawn(
        BIN,
        &[
            "--path",
            img.to_str().unwrap(),
            "--num-queues",
            "4",
            "--sandbox",
            "off",
        ],
        &tempdir("benchoff").join("blk.sock"),
    );
    run("hype-block-file nobox", &p.socket);
    drop(p);
    let p = Process::spawn(
        BIN,
        &[
            "--path",
            img.to_str().unwrap(),
            "--num-queues",
            "4",
            "--io-threads",
            "4",
        ],
        &tempdir("benchpool").join("blk.sock"),
    );
    run("hype-block-file pool4", &p.socket);
    drop(p);

    let qsd_ok = Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if qsd_ok {
        let img = dir.join("qsd.img");
        File::create(&img).unwrap().set_len(IMAGE).unwrap();
        let sock = tempdir("benchqsd").join("qsd.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f0,filename={},discard=unmap", img.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues=4",
                sock.display()
            ))
            .spawn()
            .unwrap();
        let p = Process::from_child(child, &sock);
        run("qemu-storage-daemon", &p.socket);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
