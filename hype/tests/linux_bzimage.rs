//! Boots Debian's cloud kernel (a stock bzImage) through the x86 64-bit boot protocol and checks
//! what the kernel itself prints early: its banner, our command line, the e820 map for the memory
//! we gave, and the initrd it found. The VM is then stopped with SIGTERM (hype exits 0).
//!
//! Needs `HYPE_DEBIAN_KERNEL` (the path `guest/fetch-debian-kernel.sh` prints; `scripts/test`
//! sets it). Without it the test says so and passes vacuously, so plain `cargo test` works offline.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::work_dir;
use hype_fixups::host_needs_fixups;

#[test]
fn debian_bzimage_boots_with_our_command_line_memory_and_initrd() {
    let Some(kernel) = std::env::var_os("HYPE_DEBIAN_KERNEL") else {
        eprintln!("SKIPPED: HYPE_DEBIAN_KERNEL is not set (run guest/fetch-debian-kernel.sh)");
        return;
    };
    let initrd = work_dir("bzimage").join("initrd.img");
    let initrd_size = 200_000u64 + 123;
    std::fs::write(&initrd, vec![0x5au8; initrd_size as usize]).unwrap();
    let cmdline = "earlyprintk=ttyS0 console=ttyS0 hype.bzimage.test=7f3a panic=-1";
    let mem: u64 = 256 << 20;

    let mut child = Command::new(env!("CARGO_BIN_EXE_hype"))
        .args(["vmm", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args([
            "--cmdline",
            cmdline,
            "--memory",
            "256M",
            "--serial",
            "stdio",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hype");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let extra = if host_needs_fixups() { " noxsave" } else { "" };
    let want_cmdline = format!("Command line: {cmdline}{extra}");
    let rd_start = (mem - initrd_size) & !0xfff;
    let rd_end = ((rd_start + initrd_size + 0xfff) & !0xfff) - 1;
    let want_ramdisk = format!("RAMDISK: [mem {rd_start:#010x}-{rd_end:#010x}]");
    let want_e820 = format!(
        "BIOS-e820: [mem 0x0000000000100000-{:#018x}] usable",
        mem - 1
    );
    let mut seen = (false, false, false, false);
    let mut transcript = String::new();
    // The banner comes only after the guest has decompressed the kernel, which takes minutes
    // under PVM's emulation (docs/benchmarks.md: a bzImage boot is ~10x a PVH one) and more on
    // a loaded machine: a long limit that a passing run never waits for.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(900);
    while Instant::now() < deadline && !(seen.0 && seen.1 && seen.2 && seen.3) {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        transcript.push_str(&line);
        transcript.push('\n');
        seen.0 |= line.contains("Linux version 6.") && line.contains("cloud-amd64");
        seen.1 |= line.ends_with(&want_cmdline);
        seen.2 |= line.ends_with(&want_e820);
        seen.3 |= line.ends_with(&want_ramdisk);
    }
    eprintln!("early boot lines seen after {:?}", started.elapsed());
    // Stop the VM the way a service manager would.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    assert!(seen.0, "no banner in:\n{transcript}");
    assert!(seen.1, "no '{want_cmdline}' in:\n{transcript}");
    assert!(seen.2, "no '{want_e820}' in:\n{transcript}");
    assert!(seen.3, "no '{want_ramdisk}' in:\n{transcript}");
    assert_eq!(status.code(), Some(0), "hype stopped by SIGTERM exits 0");
}
