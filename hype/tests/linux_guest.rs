//! End-to-end: the Linux test guest (kernel from Debian's linux-source with guest/kernel.config,
//! busybox initramfs with the agent) boots to init under hype, via PVH and via bzImage, reports
//! the command line, memory and vCPUs we asked for, and ends cleanly with poweroff and reboot.
//! The kernel has no MP table parser: it finds both vCPUs, COM1, the power button and the GED
//! through hype's ACPI tables, and `poweroff` ends hype through the ACPI sleep register.
//!
//! Needs the artefacts from `scripts/test` (HYPE_GUEST_*); without them the tests say SKIPPED.
//! On PVM hosts each boot takes ~20 s of CPU (more wall time on a loaded machine).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use hype_testkit::guest::{GuestArtifacts, GuestVm, VmOptions};

const BOOT: Duration = Duration::from_secs(400);
const STEP: Duration = Duration::from_secs(120);

fn hype() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hype"))
}

/// One guest at a time, so the 2-vCPU guest has the host's cores to itself: on PVM hosts an SMP
/// guest on an overcommitted host now and then sees a stale memory mapping (about 1 process in
/// 150 crashed with 2 busy vCPUs on 2 overcommitted host cores, none in 150 on idle cores; see
/// the README's PVM section), and two guests side by side on a 2-core CI machine overcommit it.
fn one_guest_at_a_time() -> MutexGuard<'static, ()> {
    static GUEST: Mutex<()> = Mutex::new(());
    GUEST
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn pvh_boot_reports_cmdline_memory_cpus_and_powers_off() {
    let Some(art) = GuestArtifacts::from_env_or_skip("pvh_boot") else {
        return;
    };
    let _alone = one_guest_at_a_time();
    let opts = VmOptions::new(&art.vmlinux, &art.initramfs)
        .cpus(2)
        .memory("192M")
        .cmdline("hype.e2e=pvh-4d1c");
    let mut vm = GuestVm::boot(hype(), &opts).unwrap();
    vm.wait_ready(BOOT).unwrap();
    eprintln!("PVH boot: agent ready after {:?}", vm.ready_after.unwrap());
    let cmdline = vm.check("cat /proc/cmdline", STEP).unwrap();
    assert!(cmdline.starts_with(&opts.full_cmdline()), "{cmdline}");
    assert_eq!(vm.check("nproc", STEP).unwrap(), "2");
    assert_eq!(
        vm.check("cat /sys/devices/system/cpu/online", STEP)
            .unwrap(),
        "0-1"
    );
    // Found through ACPI: the MADT (no MP table parser in this kernel) and the DSDT's devices.
    let acpi = vm.check("ls /sys/bus/acpi/devices", STEP).unwrap();
    for dev in ["PNP0501:00", "PNP0C0C:00", "ACPI0013:00"] {
        assert!(acpi.contains(dev), "{dev} missing: {acpi}");
    }
    assert_eq!(
        vm.check("cat /sys/firmware/acpi/tables/APIC | wc -c", STEP)
            .unwrap(),
        (44 + 2 * 8 + 12 + 12 * 10 + 6).to_string(),
        "MADT of 2 CPUs: header, 2 local APICs, IOAPIC, 12 overrides, NMI"
    );
    if Path::new("/sys/module/kvm_pvm").exists() {
        // PVM host: the KVM paravirt features whose hypercalls never return for emulated guests
        // are hidden. The guest logs each one it sets up.
        let pv = vm
            .check(
                "dmesg | grep -e 'PV IPIs' -e 'PV sched yield' -e 'PV spinlocks enabled' || true",
                STEP,
            )
            .unwrap();
        assert_eq!(
            pv, "",
            "guest set up KVM paravirt features that break on PVM"
        );
        assert!(
            vm.log().contains("PVM host: with 2 vCPUs"),
            "no SMP warning: {}",
            vm.log()
        );
    }
    // MemTotal is RAM minus what the kernel reserved for itself: within 192 MiB, above 150 MiB.
    let mem = vm
        .check(
            "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
            STEP,
        )
        .unwrap();
    let kib: u64 = mem.trim().parse().unwrap();
    assert!(
        (150 * 1024..=192 * 1024).contains(&kib),
        "MemTotal {kib} kB"
    );
    let st = vm.poweroff(STEP).unwrap();
    assert_eq!(st.code(), Some(0), "{}", vm.log());
    assert!(vm.transcript().iter().any(|l| l == "HYPE-AGENT POWEROFF"));
    // ACPI S5, not the i8042 or a triple fault.
    assert!(vm.log().contains("guest powered off"), "{}", vm.log());
}

#[test]
fn bzimage_boot_reaches_init_and_reboots() {
    let Some(art) = GuestArtifacts::from_env_or_skip("bzimage_boot") else {
        return;
    };
    let _alone = one_guest_at_a_time();
    let opts = VmOptions::new(&art.bzimage, &art.initramfs)
        .memory("128M")
        .cmdline("hype.e2e=bz-77e0");
    let mut vm = GuestVm::boot(hype(), &opts).unwrap();
    vm.wait_ready(BOOT).unwrap();
    eprintln!(
        "bzImage boot: agent ready after {:?}",
        vm.ready_after.unwrap()
    );
    let cmdline = vm.check("cat /proc/cmdline", STEP).unwrap();
    assert!(cmdline.contains("hype.e2e=bz-77e0"), "{cmdline}");
    assert_eq!(vm.check("nproc", STEP).unwrap(), "1");
    let st = vm.reboot(STEP).unwrap();
    assert_eq!(st.code(), Some(0), "{}", vm.log());
    assert!(vm.transcript().iter().any(|l| l == "HYPE-AGENT REBOOT"));
    assert!(vm.log().contains("guest reset"), "{}", vm.log());
}

/// `--graceful-stop`: SIGTERM presses the ACPI power button; the kernel's tiny power button
/// driver signals init (the agent), which powers off; hype exits 0 without forcing the stop.
#[test]
fn sigterm_with_graceful_stop_lets_the_guest_power_off() {
    let Some(art) = GuestArtifacts::from_env_or_skip("graceful_stop") else {
        return;
    };
    let _alone = one_guest_at_a_time();
    let opts = VmOptions::new(&art.vmlinux, &art.initramfs)
        .memory("128M")
        .arg("--graceful-stop")
        .arg("120s");
    let mut vm = GuestVm::boot(hype(), &opts).unwrap();
    vm.wait_ready(BOOT).unwrap();
    let pid = libc::pid_t::try_from(vm.pid()).unwrap();
    // SAFETY: kill has no memory-safety preconditions; pid is our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let st = vm.wait_exit(STEP).unwrap();
    let log = vm.log();
    assert_eq!(st.code(), Some(0), "{log}");
    assert!(log.contains("power button pressed"), "{log}");
    assert!(log.contains("guest powered off"), "{log}");
    assert!(!log.contains("did not power off in time"), "{log}");
    assert!(vm.transcript().iter().any(|l| l == "HYPE-AGENT POWEROFF"));
}
