//! Stress: an SMP Linux test guest starts many short processes and every one must succeed.
//!
//! Ignored by default (minutes of guest time). This is the measurement behind the README's
//! "Known PVM issue": on a PVM host whose cores are overcommitted, about 1 in 150 of these
//! processes segfaults. Run it with the guest artefacts of `scripts/test`:
//!
//! ```text
//! HYPE_GUEST_VMLINUX=... HYPE_GUEST_INITRAMFS=... HYPE_GUEST_BZIMAGE=... \
//!   cargo test -p hype --test linux_smp_stress -- --ignored --nocapture
//! ```
//!
//! Knobs (environment): `STRESS_CPUS` (vCPUs, default 2), `STRESS_LOOPS` (parallel shell loops,
//! default 2), `STRESS_N` (processes per loop, default 100), `STRESS_PIN=1` (pin loop i to vCPU
//! i with `taskset`). Run something CPU-bound beside it (e.g. a second copy) to overcommit.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::Path;
use std::time::Duration;

use hype_testkit::guest::{GuestArtifacts, GuestVm, VmOptions};

fn knob(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The guest command: `loops` shell loops side by side, each starting `n` busybox `sed`s and
/// printing `fails=K` at the end.
fn stress_command(loops: u32, n: u32, pin: bool) -> String {
    let one = format!(
        "f=0; for i in $(seq {n}); do sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo \
         >/dev/null || f=$((f+1)); done; echo fails=$f"
    );
    let mut cmd = String::new();
    for l in 0..loops {
        if pin {
            let quoted = one.replace('\'', "'\\''");
            cmd += &format!("taskset {} sh -c '{quoted}' & ", 1u64 << (l % 64));
        } else {
            cmd += &format!("( {one} ) & ");
        }
    }
    cmd + "wait"
}

#[test]
#[ignore = "minutes of guest time; a measurement, see the module docs"]
fn smp_guest_processes_all_succeed() {
    let Some(art) = GuestArtifacts::from_env_or_skip("smp_stress") else {
        return;
    };
    let cpus = u8::try_from(knob("STRESS_CPUS", 2)).expect("STRESS_CPUS fits in u8");
    let loops = knob("STRESS_LOOPS", 2);
    let n = knob("STRESS_N", 100);
    let pin = std::env::var_os("STRESS_PIN").is_some();
    let opts = VmOptions::new(&art.vmlinux, &art.initramfs)
        .cpus(cpus)
        .memory("192M")
        .cmdline("loglevel=7");
    let mut vm = GuestVm::boot(Path::new(env!("CARGO_BIN_EXE_hype")), &opts).unwrap();
    vm.wait_ready(Duration::from_secs(400)).unwrap();
    let r = vm
        .run(
            &stress_command(loops, n, pin),
            Duration::from_secs(u64::from(loops * n) * 5 + 120),
        )
        .unwrap();
    let fails: u32 = r
        .lines
        .iter()
        .filter_map(|l| l.strip_prefix("fails="))
        .map(|k| k.parse::<u32>().unwrap())
        .sum();
    let loops_done = r.lines.iter().filter(|l| l.starts_with("fails=")).count();
    let crashes = vm
        .check("dmesg | grep segfault || true", Duration::from_secs(60))
        .unwrap();
    eprintln!(
        "{cpus} vCPUs, {loops} loops x {n} processes (pinned: {pin}): {fails} failed\n{crashes}"
    );
    let _ = vm.poweroff(Duration::from_secs(60));
    assert_eq!(loops_done, loops as usize, "{:?}", r.lines);
    assert_eq!(fails, 0, "{crashes}");
}
