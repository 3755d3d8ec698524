//! Block backends side by side: hype-block-file against qemu-storage-daemon and (when given)
//! Cloud Hypervisor's `vhost_user_block`, on the same kind of image, through one client
//! (hype-testkit's frontend playing the guest), in alternating runs.
//!
//! ```text
//! cargo bench -p hype-block-file --bench throughput
//! ```
//!
//! For each workload (4 KiB random read/write at QD1 and QD32, 1 MiB sequential read/write at
//! QD4, 4 KiB random read at QD32 on each of 4 queues) it prints IOPS, MiB/s, p50/p99 latency
//! and the backend's CPU time per request (all its threads, from `/proc/PID/task/*/schedstat`),
//! then the backend's CPU use with a connected, quiet frontend. For the QD1 workloads it also
//! measures a floor: the same round trip with no vhost-user at all (see `floor_qd1`), the
//! most any backend could gain at QD1 on this machine; for the 1 MiB workloads, a copy floor
//! (see `copy_floor`): the most one CPU can copy. Each backend process is started
//! fresh for each measurement (Cloud Hypervisor's serves one frontend and exits).
//!
//! Environment:
//! - `HYPE_BENCH_SECS` seconds per workload (default 2), `HYPE_BENCH_ROUNDS` rounds (default 1;
//!   the summary shows medians, and each round runs the backends in a rotated order);
//! - `HYPE_BENCH_CH=/path/to/vhost_user_block`: also run Cloud Hypervisor's backend, polling
//!   (its default) and with `poll_queue=false` (build it from its own source; never vendored);
//! - `HYPE_BENCH_PIN=split|same`: pin the backend to CPU 1 and the client to CPU 0, or both to
//!   CPU 0 (default: no pinning);
//! - `HYPE_BENCH_BACKENDS=a,b`: only the backends whose names contain one of these (`=NAME`:
//!   exactly that name); `HYPE_BENCH_WORKLOADS=a,b`: the same for workloads;
//! - hype-block-file runs with its defaults and with `--poll-us 0` ("nopoll": what polling
//!   buys and costs);
//! - `HYPE_BENCH_WRAP="valgrind --tool=callgrind"` (or `strace -c -f`, ...): a command each
//!   backend is started under, for profiles (the CPU figures then include the wrapper);
//! - `HYPE_BENCH_POOL=N`: also run hype-block-file with `--io-threads N`, completions in ring
//!   order (the default) and with `--out-of-order` ("ooo");
//! - `HYPE_BENCH_POLL_US=N`: also run hype-block-file with `--poll-us N` ("pollN").
//! - `HYPE_BENCH_NOBOX=1`: also run hype-block-file with `--sandbox off` (the sandbox's cost).
//! - `HYPE_BENCH_VARIANTS="NAME=ARGS;NAME=ARGS"`: also run hype-block-file with each ARGS
//!   ("NAME" variants), e.g. `inline=--large-io-threads 0`.
//!
//! The image lives in /dev/shm when it exists, so the numbers measure the vhost-user path and
//! the backend, not a disk.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails by panicking
#![allow(dead_code)] // the shared conformance module has helpers this bench does not use

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
const QUEUES: usize = 4;

struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    block: u64,
    depth: usize,
    queues: usize,
}

const fn wl(
    name: &'static str,
    write: bool,
    random: bool,
    block: u64,
    depth: usize,
    queues: usize,
) -> Workload {
    Workload {
        name,
        write,
        random,
        block,
        depth,
        queues,
    }
}

const WORKLOADS: &[Workload] = &[
    wl("randread 4K QD1", false, true, 4096, 1, 1),
    wl("randread 4K QD32", false, true, 4096, 32, 1),
    wl("randwrite 4K QD1", true, true, 4096, 1, 1),
    wl("randwrite 4K QD32", true, true, 4096, 32, 1),
    wl("read 1M QD4", false, false, 1 << 20, 4, 1),
    wl("write 1M QD4", true, false, 1 << 20, 4, 1),
    wl("randread 4K QD32 x4q", false, true, 4096, 32, 4),
];

/// Renders a backend's command line for an image and a socket path.
type ArgvFn = Box<dyn Fn(&Path, &Path) -> Vec<String>>;

/// One backend under test: a name and how to start it serving `image` on `socket`.
struct Backend {
    name: String,
    argv: ArgvFn,
}

/// One measurement.
#[derive(Clone, Copy, Default)]
struct Sample {
    iops: f64,
    mibs: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_req: f64,
    /// CPU the client's queue threads used, in percent of one core: near 100 x the threads
    /// sharing a core, the client (not the backend) sets the pace and the tail.
    client_pct: f64,
}

impl Sample {
    /// The sample of a run that completed a request per entry of `latencies` (ns; sorted
    /// here) of `block` bytes in `secs` seconds, with `cpu_ns` of backend CPU time.
    fn of(latencies: &mut [u64], secs: f64, block: u64, cpu_ns: u64) -> Sample {
        let done = latencies.len() as f64;
        latencies.sort_unstable();
        let pct = |q: usize| {
            latencies
                .get(latencies.len() * q / 100)
                .copied()
                .unwrap_or(0) as f64
                / 1e3
        };
        Sample {
            iops: done / secs,
            mibs: done * block as f64 / secs / f64::from(1u32 << 20),
            p50_us: pct(50),
            p99_us: pct(99),
            cpu_us_per_req: cpu_ns as f64 / 1e3 / done.max(1.0),
            client_pct: 0.0,
        }
    }
}

fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').map(|p| p.trim().to_string()).collect())
}

/// Whether `name` passes `filter`: a pattern matches names containing it, or, written
/// `=NAME`, only that exact name.
fn selected(filter: &Option<Vec<String>>, name: &str) -> bool {
    filter.as_ref().is_none_or(|f| {
        f.iter().any(|p| match p.strip_prefix('=') {
            Some(exact) => name == exact,
            None => name.contains(p.as_str()),
        })
    })
}

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

/// Pins the calling thread to `cpu`.
fn pin_self(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu is below CPU_SETSIZE (we only use 0 and 1).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread; the set is valid for the size given.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}

/// CPU time (ns) the process's live threads have used, from their schedstat.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU time (ns) the calling thread has used.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Keeps `w.depth` requests in flight on `q` for `secs`; returns each request's latency (ns)
/// and the CPU time (ns) the thread used for it.
fn drive(q: &mut Virtqueue, w: &Workload, secs: Duration, seed: u64) -> (Vec<u64>, u64) {
    let cpu0 = thread_cpu_ns();
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
            return (latencies, thread_cpu_ns() - cpu0);
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

fn opts(queues: usize) -> DriverOptions {
    DriverOptions {
        num_queues: queues,
        queue_size: 256,
        mem_size: 256 << 20,
        ..DriverOptions::default()
    }
}

/// Starts `b` on `image` (pinned as `pin` says) and waits for its socket.
fn start(b: &Backend, image: &Path, pin: Option<usize>, tag: &str) -> Process {
    let sock = tempdir(tag).join("blk.sock");
    let mut argv = (b.argv)(image, &sock);
    if let Ok(wrap) = std::env::var("HYPE_BENCH_WRAP") {
        let mut w: Vec<String> = wrap.split_whitespace().map(String::from).collect();
        w.append(&mut argv);
        argv = w;
    }
    let mut cmd = match pin {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).args(&argv);
            c
        }
        None => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    cmd.env("HYPE_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Process::from_child(cmd.spawn().unwrap(), &sock)
}

/// The backend's pid: the child itself, or taskset's exec'd image (same pid).
fn measure(b: &Backend, w: &Workload, image: &Path, secs: Duration, pin: &Pin) -> Sample {
    let p = start(b, image, pin.backend, "run");
    let mut disk = BlkDriver::connect(&p.socket, opts(w.queues)).unwrap();
    let client_cpu = pin.client;
    let cpu0 = cpu_ns(p.pid());
    let t0 = Instant::now();
    let per_queue: Vec<(Vec<u64>, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = disk
            .driver()
            .queues_mut()
            .iter_mut()
            .enumerate()
            .map(|(i, q)| {
                s.spawn(move || {
                    if let Some(cpu) = client_cpu {
                        pin_self(cpu);
                    }
                    drive(q, w, secs, 0x9e37_79b9 * (i as u64 + 1))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let t = t0.elapsed().as_secs_f64();
    let client_ns: u64 = per_queue.iter().map(|(_, ns)| ns).sum();
    let mut latencies: Vec<u64> = per_queue.into_iter().flat_map(|(l, _)| l).collect();
    let cpu = cpu_ns(p.pid()).saturating_sub(cpu0);
    drop(disk);
    drop(p);
    let mut s = Sample::of(&mut latencies, t, w.block, cpu);
    s.client_pct = client_ns as f64 / 1e9 / t * 100.0;
    s
}

/// The least a QD1 round trip can take on this machine, with no vhost-user and no virtio at
/// all: a "backend" thread spins on a shared counter (what a polling backend does, yielding
/// between looks), moves the
/// block with one `pread`/`pwrite` of the image (the copy every backend must make), and writes
/// an eventfd; the client publishes a request by bumping the counter and sleeps in `poll()` on
/// the eventfd, as the bench's client sleeps on its call fd. No backend can answer a QD1
/// request faster than this, so `floor latency / backend latency` bounds what any backend can
/// gain over another at QD1 here.
fn floor_qd1(w: &Workload, image: &Path, secs: Duration, pin: &Pin) -> Sample {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    // SAFETY: eventfd takes no pointers; the result is checked.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
    assert!(efd >= 0);
    let requested = AtomicU64::new(0);
    let answered = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let blocks = IMAGE / w.block;
    let mut latencies = Vec::new();
    let t0 = Instant::now();
    let backend_ns = std::thread::scope(|s| {
        let backend = s.spawn(|| {
            if let Some(cpu) = pin.backend {
                pin_self(cpu);
            }
            let cpu0 = thread_cpu_ns();
            let mut buf = vec![0u8; w.block as usize];
            let mut seen = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = requested.load(Ordering::Acquire);
                if r == seen {
                    // Spin as hype's polling does, yielding between looks: a client on the
                    // same core gets the CPU, and no PAUSE loop for the hypervisor to punish
                    // (a PAUSE spin measured 1.5x slower here, the vCPU descheduled).
                    std::thread::yield_now();
                    continue;
                }
                seen = r;
                let off = (r.wrapping_mul(0x9e37_79b9_7f4a_7c15) % blocks) * w.block;
                if w.write {
                    file.write_all_at(&buf, off).unwrap();
                } else {
                    file.read_exact_at(&mut buf, off).unwrap();
                }
                answered.store(r, Ordering::Release);
                let one = 1u64;
                // SAFETY: writes 8 bytes from a live u64 to our eventfd.
                unsafe { libc::write(efd, (&one as *const u64).cast(), 8) };
            }
            thread_cpu_ns() - cpu0
        });
        if let Some(cpu) = pin.client {
            pin_self(cpu);
        }
        let mut seq = 0u64;
        while t0.elapsed() < secs {
            seq += 1;
            let t = Instant::now();
            requested.store(seq, Ordering::Release);
            while answered.load(Ordering::Acquire) != seq {
                let mut pfd = libc::pollfd {
                    fd: efd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 1000) };
            }
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into a live u64 from our eventfd.
            unsafe { libc::read(efd, (&mut v as *mut u64).cast(), 8) };
            latencies.push(t.elapsed().as_nanos() as u64);
        }
        stop.store(true, Ordering::Relaxed);
        backend.join().unwrap()
    });
    let t = t0.elapsed().as_secs_f64();
    // SAFETY: efd is ours and closed once.
    unsafe { libc::close(efd) };
    Sample::of(&mut latencies, t, w.block, backend_ns)
}

/// The most large requests one CPU can serve here: one thread on the backend's CPU does
/// nothing but `pread`/`pwrite` the workload's blocks between the image and a buffer, back to
/// back, with no client, no rings and no signals. A backend whose copies all run on that one
/// CPU (pinned, or inline) cannot beat it; when the client shares the CPU, it gets less.
fn copy_floor(w: &Workload, image: &Path, secs: Duration, pin: &Pin) -> Sample {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(cpu) = pin.backend {
                pin_self(cpu);
            }
            let mut buf = vec![0x5au8; w.block as usize];
            let blocks = IMAGE / w.block;
            let cpu0 = thread_cpu_ns();
            let t0 = Instant::now();
            let mut done = 0u64;
            while t0.elapsed() < secs {
                let off = (done % blocks) * w.block;
                if w.write {
                    file.write_all_at(&buf, off).unwrap();
                } else {
                    file.read_exact_at(&mut buf, off).unwrap();
                }
                done += 1;
            }
            let t = t0.elapsed().as_secs_f64();
            let n = done as f64;
            Sample {
                iops: n / t,
                mibs: n * w.block as f64 / t / f64::from(1u32 << 20),
                cpu_us_per_req: (thread_cpu_ns() - cpu0) as f64 / 1e3 / n.max(1.0),
                ..Sample::default()
            }
        })
        .join()
        .unwrap()
    })
}

/// CPU use (percent of one core) of `b` with a connected frontend that sends nothing.
fn idle(b: &Backend, image: &Path, pin: &Pin) -> f64 {
    let p = start(b, image, pin.backend, "idle");
    let disk = BlkDriver::connect(&p.socket, opts(1)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let cpu0 = cpu_ns(p.pid());
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let cpu = cpu_ns(p.pid()).saturating_sub(cpu0);
    let pct = cpu as f64 / t0.elapsed().as_nanos() as f64 * 100.0;
    drop(disk);
    drop(p);
    pct
}

struct Pin {
    backend: Option<usize>,
    client: Option<usize>,
}

/// hype-block-file on the image with the bench's queues and `extra` options.
fn hype(name: impl Into<String>, extra: Vec<String>) -> Backend {
    Backend {
        name: name.into(),
        argv: Box::new(move |img, sock| {
            let mut a = vec![
                BIN.into(),
                "--path".into(),
                img.display().to_string(),
                "--num-queues".into(),
                QUEUES.to_string(),
            ];
            a.extend(extra.iter().cloned());
            a.extend(["--socket".into(), sock.display().to_string()]);
            a
        }),
    }
}

fn backends(dir: &Path) -> Vec<Backend> {
    let opts = |o: &[&str]| o.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut v = vec![hype("hype-block-file", Vec::new())];
    // What polling buys and costs: the same backend with `--poll-us 0`.
    v.push(hype("hype-block-file nopoll", opts(&["--poll-us", "0"])));
    // Another polling budget (`HYPE_BENCH_POLL_US=N`): what a longer or shorter spin buys.
    if let Some(us) = std::env::var("HYPE_BENCH_POLL_US")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        let us = us.to_string();
        v.push(hype(
            format!("hype-block-file poll{us}"),
            opts(&["--poll-us", &us]),
        ));
    }
    // The I/O pool, completions in ring order (the default) and as they finish.
    if let Some(n) = std::env::var("HYPE_BENCH_POOL")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    {
        let n = n.to_string();
        v.push(hype(
            format!("hype-block-file pool{n}"),
            opts(&["--io-threads", &n]),
        ));
        v.push(hype(
            format!("hype-block-file pool{n} ooo"),
            opts(&["--io-threads", &n, "--out-of-order"]),
        ));
    }
    // Any other options (`HYPE_BENCH_VARIANTS="NAME=ARGS;..."`), e.g.
    // `inline=--large-io-threads 0`: one "hype-block-file NAME" variant each.
    if let Ok(spec) = std::env::var("HYPE_BENCH_VARIANTS") {
        for part in spec.split(';').filter(|p| !p.trim().is_empty()) {
            let (name, args) = part.split_once('=').unwrap_or((part, ""));
            let args = args.split_whitespace().map(String::from).collect();
            v.push(hype(format!("hype-block-file {}", name.trim()), args));
        }
    }
    if std::env::var_os("HYPE_BENCH_NOBOX").is_some() {
        v.push(hype("hype-block-file nobox", opts(&["--sandbox", "off"])));
    }
    let qsd_ok = Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if qsd_ok {
        v.push(Backend {
            name: "qemu-storage-daemon".into(),
            argv: Box::new(|img, sock| {
                vec![
                    "qemu-storage-daemon".into(),
                    "--blockdev".into(),
                    format!(
                        "driver=file,node-name=f0,filename={},discard=unmap",
                        img.display()
                    ),
                    "--export".into(),
                    format!(
                        "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},\
                         writable=on,num-queues={QUEUES}",
                        sock.display()
                    ),
                ]
            }),
        });
    } else {
        eprintln!("qemu-storage-daemon not found: skipped");
    }
    match std::env::var("HYPE_BENCH_CH") {
        Ok(ch) if Path::new(&ch).is_file() => {
            for poll in [true, false] {
                let ch = ch.clone();
                v.push(Backend {
                    name: format!("ch vhost_user_block{}", if poll { "" } else { " nopoll" }),
                    argv: Box::new(move |img, sock| {
                        vec![
                            ch.clone(),
                            "--block-backend".into(),
                            format!(
                                "path={},socket={},num_queues={QUEUES},readonly=false,\
                                 direct=false,poll_queue={poll}",
                                img.display(),
                                sock.display()
                            ),
                        ]
                    }),
                });
            }
        }
        Ok(ch) => eprintln!("HYPE_BENCH_CH={ch} is not a file: Cloud Hypervisor skipped"),
        Err(_) => eprintln!("HYPE_BENCH_CH not set: Cloud Hypervisor's backend skipped"),
    }
    let _ = dir;
    let filter = env_list("HYPE_BENCH_BACKENDS");
    v.retain(|b| selected(&filter, &b.name));
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: keep that quick.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let num = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let secs = Duration::from_secs(num("HYPE_BENCH_SECS", 2));
    let rounds = num("HYPE_BENCH_ROUNDS", 1).max(1) as usize;
    let pin = match std::env::var("HYPE_BENCH_PIN").as_deref() {
        Ok("split") => Pin {
            backend: Some(1),
            client: Some(0),
        },
        Ok("same") => Pin {
            backend: Some(0),
            client: Some(0),
        },
        _ => Pin {
            backend: None,
            client: None,
        },
    };
    let dir = image_dir();
    let img = dir.join("bench.img");
    // Written in full first, so no backend pays for the first touch of the image's pages.
    {
        use std::io::Write;
        let mut f = File::create(&img).unwrap();
        let chunk = vec![0x11u8; 1 << 20];
        for _ in 0..IMAGE / (1 << 20) {
            f.write_all(&chunk).unwrap();
        }
    }
    let all = backends(&dir);
    let wfilter = env_list("HYPE_BENCH_WORKLOADS");
    let workloads: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| selected(&wfilter, w.name))
        .collect();
    println!(
        "{} s per run, {rounds} round(s), pinning {}",
        secs.as_secs(),
        std::env::var("HYPE_BENCH_PIN").unwrap_or_else(|_| "off".into())
    );
    // The QD1 floor (no vhost-user), once per round beside the backends.
    let qd1: Vec<usize> = (0..workloads.len())
        .filter(|&wi| workloads[wi].depth == 1 && workloads[wi].queues == 1)
        .collect();
    let mut floors: Vec<Vec<Sample>> = vec![Vec::new(); workloads.len()];
    // samples[workload][backend] = one Sample per round
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); all.len()]; workloads.len()];
    let mut idles: Vec<Vec<f64>> = vec![Vec::new(); all.len()];
    for round in 0..rounds {
        for (wi, w) in workloads.iter().enumerate() {
            for k in 0..all.len() {
                let bi = (k + round) % all.len();
                let s = measure(&all[bi], w, &img, secs, &pin);
                println!(
                    "{:>26} | {:<21} | {:>8.0} IOPS | {:>7.1} MiB/s | p50 {:>7.1} us | \
                     p99 {:>7.1} us | {:>5.1} CPU-us/req | client {:>3.0}%",
                    all[bi].name,
                    w.name,
                    s.iops,
                    s.mibs,
                    s.p50_us,
                    s.p99_us,
                    s.cpu_us_per_req,
                    s.client_pct
                );
                samples[wi][bi].push(s);
            }
            if w.block >= 1 << 20 {
                let s = copy_floor(w, &img, secs, &pin);
                println!(
                    "{:>26} | {:<21} | {:>8.0} IOPS | {:>5.1} CPU-us/req",
                    "copy floor (one thread)", w.name, s.iops, s.cpu_us_per_req
                );
                floors[wi].push(s);
            } else if qd1.contains(&wi) {
                let s = floor_qd1(w, &img, secs, &pin);
                println!(
                    "{:>26} | {:<21} | {:>8.0} IOPS | p50 {:>7.1} us | p99 {:>7.1} us",
                    "floor (no vhost-user)", w.name, s.iops, s.p50_us, s.p99_us
                );
                floors[wi].push(s);
            }
        }
        for k in 0..all.len() {
            let bi = (k + round) % all.len();
            let pct = idle(&all[bi], &img, &pin);
            println!(
                "{:>26} | idle, connected      | {pct:.2}% of a core",
                all[bi].name
            );
            idles[bi].push(pct);
        }
    }
    println!();
    println!("| backend | workload | IOPS | MiB/s | p50 us | p99 us | CPU-us/req | client CPU % |");
    println!("|---|---|---|---|---|---|---|---|");
    for (wi, w) in workloads.iter().enumerate() {
        for (bi, b) in all.iter().enumerate() {
            let m = |f: fn(&Sample) -> f64| median(samples[wi][bi].iter().map(f).collect());
            println!(
                "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} |",
                b.name,
                w.name,
                m(|s| s.iops),
                m(|s| s.mibs),
                m(|s| s.p50_us),
                m(|s| s.p99_us),
                m(|s| s.cpu_us_per_req),
                m(|s| s.client_pct)
            );
        }
    }
    for (bi, b) in all.iter().enumerate() {
        println!(
            "| {} | idle, connected | {:.2}% of a core |  |  |  |  |  |",
            b.name,
            median(idles[bi].clone())
        );
    }
    // The floors: what no backend could beat here (see `floor_qd1` and `copy_floor`).
    if floors.iter().any(|f| !f.is_empty()) {
        println!();
        println!(
            "| floor (no vhost-user) | workload | IOPS | p50 us | p99 us | CPU-us/req | \
             best possible / hype IOPS |"
        );
        println!("|---|---|---|---|---|---|---|");
        for (wi, w) in workloads
            .iter()
            .enumerate()
            .filter(|(wi, _)| !floors[*wi].is_empty())
        {
            let f = |g: fn(&Sample) -> f64| median(floors[wi].iter().map(g).collect());
            let hype = median(
                samples[wi]
                    .first()
                    .map_or(Vec::new(), |v| v.iter().map(|s| s.iops).collect()),
            );
            println!(
                "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} |",
                if w.block >= 1 << 20 {
                    "one thread copying"
                } else {
                    "QD1 round trip"
                },
                w.name,
                f(|s| s.iops),
                f(|s| s.p50_us),
                f(|s| s.p99_us),
                f(|s| s.cpu_us_per_req),
                f(|s| s.iops) / hype.max(1e-9)
            );
        }
    }
    // Ratios of hype (the first backend) to each other backend, from the medians.
    if all.len() > 1 {
        println!();
        println!("| workload | vs | IOPS ratio | p99 ratio (lower is better) | CPU/req ratio |");
        println!("|---|---|---|---|---|");
        for (wi, w) in workloads.iter().enumerate() {
            let med =
                |bi: usize, f: fn(&Sample) -> f64| median(samples[wi][bi].iter().map(f).collect());
            for (bi, b) in all.iter().enumerate().skip(1) {
                println!(
                    "| {} | {} | {:.2} | {:.2} | {:.2} |",
                    w.name,
                    b.name,
                    med(0, |s| s.iops) / med(bi, |s| s.iops).max(1e-9),
                    med(0, |s| s.p99_us) / med(bi, |s| s.p99_us).max(1e-9),
                    med(0, |s| s.cpu_us_per_req) / med(bi, |s| s.cpu_us_per_req).max(1e-9)
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
