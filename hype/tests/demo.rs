//! `hype demo` end to end on KVM: the built-in guest, a block-mem backend and a console
//! backend, each its own process, started and cleaned up by `hype run`'s supervisor. Checks
//! what the guest printed on the virtio console and its UART, the exit code, and that no
//! process, socket or runtime directory is left behind.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};

use common::{texts, work_dir, Backend};
use hype_run::demo::{self, console_report, DemoOptions, Verdict};

/// 16 MiB in 512-byte sectors.
const DEMO_SECTORS: u64 = 32768;

/// One demo at a time in this process, checks included: the runtime directory is named after
/// the process, and the supervisor takes SIGCHLD on its own thread.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn hype() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hype"))
}

fn fresh_dir(name: &str) -> PathBuf {
    let d = work_dir("demo").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Processes whose command line mentions `marker` (e.g. a runtime directory).
fn processes_mentioning(marker: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(marker) {
            out.push((pid, cmd));
        }
    }
    out
}

/// The UART log of a passing guest with the devices in `hype run`'s order (disk, console).
fn passing_uart_log(sectors: u64) -> String {
    format!(
        "hype demo guest: probing virtio-mmio windows\n\
         \x20 window 0: virtio device id 2 (block)\n\
         \x20 window 1: virtio device id 3 (console)\n\
         virtio-console ready\n\
         virtio-blk ready, capacity {sectors} sectors\n\
         wrote 8 sectors\n\
         read back 8 sectors: data matches\n\
         {}\n\
         report sent on the virtio-console\n\
         hype demo guest: PASS\n",
        console_report(sectors).trim_end()
    )
}

fn assert_cleaned_up(runtime_dir: &Path) {
    assert!(
        !runtime_dir.exists(),
        "runtime directory {} left behind",
        runtime_dir.display()
    );
    let left = processes_mentioning(runtime_dir.to_str().unwrap());
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn demo_guest_reports_through_the_virtio_console() {
    let dir = fresh_dir("library");
    let console = dir.join("console.txt");
    let opts = DemoOptions {
        exe: hype(),
        disk_size: "16M".into(),
        console: format!("file:{}", console.display()),
        show_processes: false,
    };
    let _one = one_at_a_time();
    let o = demo::run_demo(&opts).expect("demo runs");
    eprintln!("demo took {:?}", o.elapsed);
    assert_eq!(o.uart_log, passing_uart_log(DEMO_SECTORS));
    assert_eq!(o.verdict, Verdict::Pass);
    assert_eq!(o.vmm_exit, 0);
    assert!(o.passed());
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        console_report(DEMO_SECTORS)
    );
    assert_cleaned_up(&o.runtime_dir);
}

/// A disk of fewer than 8 sectors: the guest says so on the console and the UART, and the
/// demo does not pass.
#[test]
fn demo_guest_failure_is_reported_on_the_console() {
    let dir = fresh_dir("small_disk");
    let console = dir.join("console.txt");
    let opts = DemoOptions {
        exe: hype(),
        disk_size: "2K".into(),
        console: format!("file:{}", console.display()),
        show_processes: false,
    };
    let _one = one_at_a_time();
    let o = demo::run_demo(&opts).expect("demo runs");
    let reason = "disk too small, sectors: 4";
    assert_eq!(o.verdict, Verdict::Fail(Some(reason.into())));
    assert!(!o.passed());
    assert!(
        o.uart_log.ends_with(
            "virtio-blk ready, capacity 4 sectors\n\
             hype demo: FAILED: disk too small, sectors: 4\n\
             hype demo guest: FAIL\n"
        ),
        "{}",
        o.uart_log
    );
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        format!("hype demo: FAILED: {reason}\r\n")
    );
    assert_cleaned_up(&o.runtime_dir);
}

/// Writes the built-in guest to `dir` for `hype vmm --kernel`.
fn guest_elf(dir: &Path) -> PathBuf {
    let p = dir.join("demo-guest.elf");
    std::fs::write(&p, demo::GUEST_ELF).unwrap();
    p
}

/// Runs the built-in guest with `hype vmm` on the given backend sockets, UART to a file;
/// returns the UART log.
fn boot_guest(dir: &Path, sockets: &[&Path]) -> String {
    let elf = guest_elf(dir);
    let uart = dir.join("uart.txt");
    let serial = format!("file:{}", uart.display());
    let mut args = vec![
        "vmm",
        "--kernel",
        elf.to_str().unwrap(),
        "--memory",
        "64M",
        "--serial",
        &serial,
        "--device-wait",
        "10s",
    ];
    for s in sockets {
        args.extend(["--device", s.to_str().unwrap()]);
    }
    let o = common::hype(&args);
    let (_, err) = texts(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("guest reset"), "{err}");
    std::fs::read_to_string(&uart).unwrap()
}

/// The guest probes every window: a console before the disk works as well.
#[test]
fn guest_finds_its_devices_in_any_window() {
    let dir = fresh_dir("any_window");
    let console_out = dir.join("console.txt");
    let console = Backend::start(
        &[
            "console",
            "--output",
            &format!("file:{}", console_out.display()),
        ],
        &dir.join("console.sock"),
    );
    let disk = Backend::block_mem(&dir, "1M");
    let uart = boot_guest(&dir, &[&console.socket, &disk.socket]);
    assert!(
        uart.starts_with(
            "hype demo guest: probing virtio-mmio windows\n\
             \x20 window 0: virtio device id 3 (console)\n\
             \x20 window 1: virtio device id 2 (block)\n"
        ),
        "{uart}"
    );
    assert!(uart.ends_with("hype demo guest: PASS\n"), "{uart}");
    assert_eq!(
        std::fs::read_to_string(&console_out).unwrap(),
        console_report(2048)
    );
}

/// Without a console the guest can only say so on the UART.
#[test]
fn guest_without_a_console_fails_on_the_uart() {
    let dir = fresh_dir("no_console");
    let disk = Backend::block_mem(&dir, "1M");
    let uart = boot_guest(&dir, &[&disk.socket]);
    assert_eq!(
        uart,
        "hype demo guest: probing virtio-mmio windows\n\
         \x20 window 0: virtio device id 2 (block)\n\
         hype demo: FAILED: no virtio-console device found\n\
         hype demo guest: FAIL\n"
    );
    assert_eq!(
        demo::verdict(&uart),
        Verdict::Fail(Some("no virtio-console device found".into()))
    );
}

fn binary_has_demo() -> bool {
    Command::new(hype())
        .args(["demo", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `hype demo` as a user runs it: the report on stdout (from the console backend), exit code
/// 0, nothing left in the runtime directory's parent.
#[test]
fn hype_demo_command() {
    if !binary_has_demo() {
        eprintln!("SKIPPED: this hype binary has no `demo` subcommand yet (main.rs)");
        return;
    }
    let dir = fresh_dir("command");
    let xdg = dir.join("xdg");
    std::fs::create_dir_all(&xdg).unwrap();
    let child = Command::new(hype())
        .arg("demo")
        .env("XDG_RUNTIME_DIR", &xdg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The directory name has a random part after the PID: this prefix is what processes mention.
    let runtime_dir = xdg.join(format!("hype-demo.{}.", child.id()));
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(stdout, console_report(DEMO_SECTORS), "stderr: {stderr}");
    assert!(stderr.contains("hype demo: guest passed in "), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&xdg).unwrap().flatten().collect();
    assert!(left.is_empty(), "left in XDG_RUNTIME_DIR: {left:?}");
    assert_cleaned_up(&runtime_dir);
}

/// A bad disk size is a usage error (exit code 2) found before anything starts.
#[test]
fn hype_demo_bad_disk_size() {
    if !binary_has_demo() {
        eprintln!("SKIPPED: this hype binary has no `demo` subcommand yet (main.rs)");
        return;
    }
    let dir = fresh_dir("bad_size");
    let o = Command::new(hype())
        .args(["demo", "--disk-size", "12X"])
        .env("XDG_RUNTIME_DIR", &dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("hype demo: "), "{stderr}");
    assert!(std::fs::read_dir(&dir).unwrap().next().is_none());
}
