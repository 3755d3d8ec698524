//! Bad input gets one clear line on stderr and exit code 2: never a panic or a backtrace.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{assemble, work_dir};

fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hype"));
    c.args(args)
        .stdin(Stdio::null())
        .env("HYPE_LOG", "warn")
        .env("RUST_BACKTRACE", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run hype");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Asserts exit 2 and a single stderr line containing `needle`.
fn usage_error(args: &[&str], needle: &str) {
    usage_error_env(args, &[], needle)
}

fn usage_error_env(args: &[&str], env: &[(&str, &str)], needle: &str) {
    let (code, err) = run(args, env);
    assert_eq!(code, Some(2), "args {args:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected for {args:?}, got: {err}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: '{}' lacks '{needle}'",
        lines[0]
    );
}

fn tiny_kernel() -> PathBuf {
    assemble("long_hello", 0x20_0000)
}

fn file_with(name: &str, bytes: &[u8]) -> PathBuf {
    let p = work_dir("bad_input").join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn missing_kernel() {
    usage_error(
        &["vmm", "--kernel", "/nonexistent/vmlinux"],
        "cannot read kernel /nonexistent/vmlinux",
    );
}

#[test]
fn unreadable_initrd() {
    let k = tiny_kernel();
    usage_error(
        &[
            "vmm",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        "cannot read initrd /nonexistent/initrd",
    );
}

#[test]
fn not_a_kernel() {
    let p = file_with("script.sh", b"#!/bin/sh\necho hello\n");
    usage_error(
        &["vmm", "--kernel", p.to_str().unwrap()],
        "is neither a bzImage nor an ELF kernel",
    );
    let d = work_dir("bad_input");
    usage_error(
        &["vmm", "--kernel", d.to_str().unwrap()],
        "is not a regular file",
    );
}

#[test]
fn truncated_elf() {
    let p = file_with("trunc.elf", b"\x7fELF\x02\x01\x01\x00");
    usage_error(
        &["vmm", "--kernel", p.to_str().unwrap()],
        "is 8 bytes, shorter than an ELF64 header",
    );
}

/// The tiny test kernel with `patch` applied to its bytes.
fn patched_kernel(name: &str, patch: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = std::fs::read(tiny_kernel()).unwrap();
    patch(&mut b);
    file_with(name, &b)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Offset of the first PT_LOAD program header of an ELF64 image.
fn first_load(b: &[u8]) -> usize {
    let phoff = u64_at(b, 32) as usize;
    let phnum = u16::from_le_bytes([b[56], b[57]]) as usize;
    (0..phnum)
        .map(|i| phoff + 56 * i)
        .find(|&o| b[o..o + 4] == 1u32.to_le_bytes())
        .unwrap()
}

#[test]
fn each_elf_header_problem_has_its_own_line() {
    let vm = |p: &PathBuf, needle: &str| {
        usage_error(
            &["vmm", "--kernel", p.to_str().unwrap(), "--memory", "64M"],
            needle,
        )
    };
    vm(
        &patched_kernel("class32.elf", |b| b[4] = 1),
        "is not 64-bit little-endian (class 1",
    );
    vm(
        &patched_kernel("bigendian.elf", |b| b[5] = 2),
        "is not 64-bit little-endian (class 2, data 2)",
    );
    vm(
        &patched_kernel("arm.elf", |b| {
            b[18..20].copy_from_slice(&183u16.to_le_bytes())
        }),
        "is for machine 183, not x86-64",
    );
    vm(
        &patched_kernel("nophdr.elf", |b| {
            b[56..58].copy_from_slice(&0u16.to_le_bytes())
        }),
        "bad program header table: there are none",
    );
    vm(
        &patched_kernel("phoff.elf", |b| {
            b[32..40].copy_from_slice(&(1u64 << 40).to_le_bytes())
        }),
        "run past the end of the file",
    );
    vm(
        &patched_kernel("segfile.elf", |b| {
            let o = first_load(b);
            b[o + 32..o + 40].copy_from_slice(&(1u64 << 30).to_le_bytes());
            b[o + 40..o + 48].copy_from_slice(&(1u64 << 30).to_le_bytes());
        }),
        "past the end of the file",
    );
    vm(
        &patched_kernel("segram.elf", |b| {
            let o = first_load(b);
            b[o + 24..o + 32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        }),
        "does not fit below the end of low guest RAM",
    );
    vm(
        &patched_kernel("entry.elf", |b| {
            b[24..32].copy_from_slice(&0x7000_0000u64.to_le_bytes())
        }),
        "entry point 0x70000000 is in no loadable segment",
    );
}

#[test]
fn truncated_bzimage() {
    // A header promising 1 MiB of kernel in a 64 KiB file.
    let mut bz = vec![0u8; 64 << 10];
    bz[0x1f1] = 4;
    bz[0x1f4..0x1f8].copy_from_slice(&(1u32 << 16).to_le_bytes());
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    let p = file_with("short.bzimage", &bz);
    usage_error(
        &["vmm", "--kernel", p.to_str().unwrap(), "--memory", "64M"],
        "is truncated: its header says 1051136 bytes (setup and syssize), the file has 65536",
    );
}

#[test]
fn kernel_and_initrd_must_be_regular_files() {
    let d = work_dir("bad_input");
    let fifo = d.join("kernel.fifo");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // A FIFO with no writer: a plain open() would hang here.
    usage_error(&["vmm", "--kernel", fifo.to_str().unwrap()], "kernel ");
    usage_error(
        &["vmm", "--kernel", fifo.to_str().unwrap()],
        "is not a regular file",
    );
    let k = tiny_kernel();
    usage_error(
        &[
            "vmm",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            fifo.to_str().unwrap(),
            "--memory",
            "64M",
        ],
        "initrd",
    );
    usage_error(
        &[
            "vmm",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            "/dev/zero",
            "--memory",
            "64M",
        ],
        "initrd /dev/zero is not a regular file",
    );
}

#[test]
fn real_kernels_pass_the_image_checks() {
    use hype_vmm::boot::image;
    for var in ["HYPE_GUEST_VMLINUX", "HYPE_GUEST_BZIMAGE"] {
        let Some(p) = std::env::var_os(var).map(PathBuf::from) else {
            eprintln!("{var} not set; skipped");
            continue;
        };
        let (mut f, size) = match image::open_regular(&p, "kernel") {
            Ok(x) => x,
            Err(e) => panic!("{}: {e:?}", p.display()),
        };
        if var == "HYPE_GUEST_VMLINUX" {
            image::check_elf(&p, &mut f, size, 3 << 30).unwrap();
        } else {
            let head = std::fs::read(&p).unwrap();
            image::check_bzimage(&p, &head[..0x206], size).unwrap();
            // And a byte less than syssize needs (beyond the rounding) is caught.
            let syssize = u32::from_le_bytes(head[0x1f4..0x1f8].try_into().unwrap()) as u64;
            let setup = match head[0x1f1] {
                0 => 4,
                n => u64::from(n),
            };
            let needs = (setup + 1) * 512 + syssize * 16;
            assert!(image::check_bzimage(&p, &head[..0x206], needs - 16).is_err());
        }
    }
}

#[test]
fn unaligned_memory_long_socket_paths_and_duplicate_devices() {
    let k = tiny_kernel();
    let k = k.to_str().unwrap();
    usage_error(
        &["vmm", "--kernel", k, "--memory", "65M"],
        "not a multiple of 2 MiB",
    );
    usage_error(
        &["vmm", "--kernel", k, "--memory", "67108865"],
        "not a multiple of 2 MiB",
    );
    let long = format!("/tmp/{}.sock", "x".repeat(120));
    usage_error(
        &["vmm", "--kernel", k, "--device", &long],
        "a Unix socket path has at most 107",
    );
    usage_error(
        &[
            "vmm",
            "--kernel",
            k,
            "--device",
            "/run/a.sock",
            "--device",
            "blk:/run/a.sock,wait=1s",
        ],
        "devices 0 and 1 both use the socket /run/a.sock",
    );
}

#[test]
fn kernel_too_big_for_memory() {
    let mut bz = vec![0u8; 70 << 20];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    let p = file_with("huge.bzimage", &bz);
    usage_error(
        &["vmm", "--kernel", p.to_str().unwrap(), "--memory", "64M"],
        "does not fit in 64 MiB",
    );
}

#[test]
fn initrd_too_big_for_memory() {
    let k = tiny_kernel();
    let i = file_with("huge.initrd", &vec![1u8; 80 << 20]);
    usage_error(
        &[
            "vmm",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            i.to_str().unwrap(),
            "--memory",
            "64M",
        ],
        "does not fit in guest memory",
    );
}

#[test]
fn command_line_too_long() {
    let k = tiny_kernel();
    let long = "x".repeat(3000);
    usage_error(
        &["vmm", "--kernel", k.to_str().unwrap(), "--cmdline", &long],
        "the kernel accepts at most 2047",
    );
}

#[test]
fn memory_limits() {
    let k = tiny_kernel();
    usage_error(
        &["vmm", "--kernel", k.to_str().unwrap(), "--memory", "32M"],
        "too little",
    );
    usage_error(
        &["vmm", "--kernel", k.to_str().unwrap(), "--memory", "100T"],
        "more than the host has",
    );
    usage_error(
        &["vmm", "--kernel", k.to_str().unwrap(), "--memory", "lots"],
        "not a size",
    );
}

#[test]
fn vcpu_limits() {
    let k = tiny_kernel();
    usage_error(
        &["vmm", "--kernel", k.to_str().unwrap(), "--cpus", "0"],
        "0 vCPUs",
    );
    usage_error(
        &["vmm", "--kernel", k.to_str().unwrap(), "--cpus", "255"],
        "255 vCPUs",
    );
    usage_error(
        &["vmm", "--kernel", k.to_str().unwrap(), "--cpus", "1000"],
        "1000",
    );
}

#[test]
fn kvm_device_missing_or_inaccessible() {
    let k = tiny_kernel();
    usage_error_env(
        &["vmm", "--kernel", k.to_str().unwrap()],
        &[("HYPE_KVM_DEVICE", "/nonexistent/kvm")],
        "cannot open the KVM device",
    );
    let not_kvm = file_with("not-kvm", b"");
    usage_error_env(
        &["vmm", "--kernel", k.to_str().unwrap()],
        &[("HYPE_KVM_DEVICE", not_kvm.to_str().unwrap())],
        "cannot open the KVM device",
    );
}

#[test]
fn bad_serial_spec() {
    let k = tiny_kernel();
    usage_error(
        &[
            "vmm",
            "--kernel",
            k.to_str().unwrap(),
            "--serial",
            "tcp:1234",
        ],
        "not one of stdio, none, file:PATH",
    );
    usage_error(
        &[
            "vmm",
            "--kernel",
            k.to_str().unwrap(),
            "--serial",
            "file:/nonexistent/dir/log",
        ],
        "cannot open serial output",
    );
}

#[test]
fn sigterm_while_waiting_for_a_device_is_a_clean_stop() {
    let k = tiny_kernel();
    let sock = work_dir("bad_input").join("never-there.sock");
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(env!("CARGO_BIN_EXE_hype"))
        .args([
            "vmm",
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "64M",
            "--device",
        ])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("HYPE_LOG", "info")
        .spawn()
        .unwrap();
    // Wait for the "waiting for backend socket" line, then stop it.
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&seen).contains("waiting for backend socket") {
        use std::io::Read;
        let n = stderr.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "hype ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            panic!("SIGTERM did not stop hype while it waited for a device");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // README: stopped from the host (SIGTERM) is exit code 0.
    assert_eq!(status.code(), Some(0), "{status:?}");
}
