//! Start-up benchmark: `hype vmm` against `qemu-system-x86_64 -M microvm` on the same tiny PVH
//! guest, side by side in one run. The guest's first instruction writes hype's boot marker, then
//! it resets (i8042 for hype, isa-debug-exit for QEMU), so a run is: VMM start, guest's first
//! instruction, VM teardown.
//!
//! Reported per VMM (median of N runs, alternating): wall time from spawn to exit, CPU time of the
//! whole process (user + system, from wait4), peak RSS. For hype also the boot marker time it logs
//! (from the start of VM setup to the guest's first instruction).
//!
//! `cargo bench -p hype-vmm --bench startup [-- RUNS]` (needs binutils, /dev/kvm; QEMU optional).
//! It runs the VMM-only binary `hype-vmm`. `HYPE_BENCH_OTHER=/path/to/hype[:/path/to/another]`
//! adds other builds (say, the multi-call `hype`, run as `hype vmm`, or a build with other
//! profile settings) to the same alternating runs, to compare builds side by side.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Sample {
    wall: Duration,
    cpu: Duration,
    max_rss_kib: i64,
    marker_ms: Option<f64>,
}

fn build_guest() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("startup-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/startup.S");
    let obj = dir.join("startup.o");
    let elf = dir.join("startup.elf");
    assert!(Command::new("as")
        .args(["--64", "-o"])
        .arg(&obj)
        .arg(&src)
        .status()
        .unwrap()
        .success());
    assert!(Command::new("ld")
        .args([
            "-static",
            "-nostdlib",
            "-z",
            "max-page-size=4096",
            "-Ttext=0x200000",
            "-o"
        ])
        .arg(&elf)
        .arg(&obj)
        .status()
        .unwrap()
        .success());
    elf
}

/// Spawns `cmd`, waits with wait4 to get its rusage.
fn measure(mut cmd: Command) -> Option<Sample> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().ok()?;
    let pid = child.id() as libc::pid_t;
    let mut stderr = child.stderr.take()?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pid of our child and valid pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = start.elapsed();
    if r != pid {
        return None;
    }
    let err = reader.join().unwrap_or_default();
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    let marker_ms = err
        .lines()
        .find_map(|l| l.split("boot marker 1 at ").nth(1))
        .and_then(|rest| rest.trim_end_matches(" ms").trim().parse().ok());
    Some(Sample {
        wall,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        max_rss_kib: ru.ru_maxrss,
        marker_ms,
    })
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn report(name: &str, s: &[Sample]) {
    let wall = median(s.iter().map(|x| x.wall.as_secs_f64() * 1e3).collect());
    let cpu = median(s.iter().map(|x| x.cpu.as_secs_f64() * 1e3).collect());
    let rss = median(s.iter().map(|x| x.max_rss_kib).collect());
    let marker: Vec<f64> = s.iter().filter_map(|x| x.marker_ms).collect();
    let marker = if marker.is_empty() {
        "-".to_string()
    } else {
        format!("{:.2}", median(marker))
    };
    println!(
        "| {name} | {} | {wall:.2} | {cpu:.2} | {marker} | {:.1} |",
        s.len(),
        rss as f64 / 1024.0
    );
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20);
    let guest = build_guest();
    let hype = env!("CARGO_BIN_EXE_hype-vmm");
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    let others: Vec<String> = std::env::var("HYPE_BENCH_OTHER")
        .map(|v| {
            v.split(':')
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let hype_run = |exe: &str| {
        let mut c = Command::new(exe);
        // The multi-call `hype` takes the VMM's arguments after `vmm`; `hype-vmm` directly.
        if !exe.ends_with("hype-vmm") {
            c.arg("vmm");
        }
        c.args(["--memory", "64M", "--serial", "none", "--kernel"])
            .arg(&guest)
            .env("HYPE_LOG", "info");
        measure(c)
    };
    let mut h = Vec::new();
    let mut o: Vec<Vec<Sample>> = others.iter().map(|_| Vec::new()).collect();
    let mut q = Vec::new();
    for _ in 0..runs {
        h.extend(hype_run(hype));
        for (exe, samples) in others.iter().zip(o.iter_mut()) {
            samples.extend(hype_run(exe));
        }
        if qemu {
            let mut c = Command::new("qemu-system-x86_64");
            c.args([
                "-M",
                "microvm",
                "-accel",
                "kvm",
                "-m",
                "64M",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
            ])
            .args([
                "-no-reboot",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=1",
                "-kernel",
            ])
            .arg(&guest);
            q.extend(measure(c));
        }
    }
    println!("| VMM | runs | wall to exit (ms) | CPU (ms) | start to first instruction (ms) | peak RSS (MiB) |");
    println!("|---|---|---|---|---|---|");
    report("hype-vmm", &h);
    for (exe, samples) in others.iter().zip(&o) {
        if samples.is_empty() {
            println!("({exe}: no successful run)");
        } else {
            report(&format!("hype vmm ({exe})"), samples);
        }
    }
    if !q.is_empty() {
        report("qemu-system-x86_64 -M microvm", &q);
    } else {
        println!("(qemu-system-x86_64 not installed: no comparison)");
    }
}
