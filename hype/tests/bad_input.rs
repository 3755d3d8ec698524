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
        "is neither a bzImage nor an ELF kernel",
    );
}

#[test]
fn truncated_elf() {
    let p = file_with("trunc.elf", b"\x7fELF\x02\x01\x01\x00");
    usage_error(
        &["vmm", "--kernel", p.to_str().unwrap()],
        "cannot load kernel",
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
