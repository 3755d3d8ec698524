//! KVM tests with tiny guest programs (run in well under a second, also on PVM hosts).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use common::{assemble, flat, hype, symbol, texts, work_dir};
use hype_fixups::{host_needs_fixups, FixupMode};
use hype_vmm::config::SerialSpec;
use hype_vmm::vm::{self, BootImage, RawMode, VmConfig, VmEnd};

fn raw_config(
    code: Vec<u8>,
    load_addr: u64,
    entry: u64,
    mode: RawMode,
    cpus: u8,
    out: &std::path::Path,
) -> VmConfig {
    let _ = std::fs::remove_file(out);
    VmConfig {
        image: BootImage::Raw {
            code,
            load_addr,
            entry,
            mode,
        },
        memory: 64 << 20,
        cpus,
        serial: SerialSpec::File(out.to_owned()),
        devices: vec![],
        fixups: FixupMode::Auto,
        api_socket: None,
        platform: Default::default(),
    }
}

#[test]
fn long_mode_elf_prints_and_resets() {
    let elf = assemble("long_hello", 0x20_0000);
    let o = hype(&["vmm", "--kernel", elf.to_str().unwrap(), "--memory", "128M"]);
    let (out, err) = texts(&o);
    assert_eq!(o.status.code(), Some(0), "stderr: {err}");
    // 128 MiB without the hole: base RAM, EBDA, BIOS area, high RAM = 4 e820 entries.
    assert_eq!(out, "hello from long mode, e820 entries: 4\n");
    assert!(err.contains("guest reset"), "{err}");
}

/// A guest larger than 3 GiB gets RAM above 4 GiB (second memory slot) and one more e820 entry.
#[test]
fn large_guest_memory_skips_the_mmio_hole() {
    let elf = assemble("long_hello", 0x20_0000);
    let o = hype(&["vmm", "--kernel", elf.to_str().unwrap(), "--memory", "4G"]);
    let (out, err) = texts(&o);
    assert_eq!(o.status.code(), Some(0), "stderr: {err}");
    assert_eq!(out, "hello from long mode, e820 entries: 5\n");
}

#[test]
fn pvh_elf_gets_start_info_and_marker() {
    let elf = assemble("pvh_hello", 0x20_0000);
    let o = hype(&[
        "vmm",
        "--kernel",
        elf.to_str().unwrap(),
        "--memory",
        "96M",
        "--cmdline",
        "hype-pvh-test x=1",
    ]);
    let (out, err) = texts(&o);
    assert_eq!(o.status.code(), Some(0), "stderr: {err}");
    let extra = if host_needs_fixups() { " noxsave" } else { "" };
    assert_eq!(
        out,
        format!("pvh ok, cmdline: hype-pvh-test x=1{extra}\n96 MiB\n")
    );
    assert!(err.contains("boot marker 7 at"), "{err}");
    assert!(err.contains("shut down or triple-faulted"), "{err}");
}

/// Without fix-ups, an instruction the emulating KVM of a PVM host gives up on (the guest's
/// final int3) is a clean error naming the exit, vCPU, RIP and bytes; elsewhere the int3 simply
/// triple-faults.
#[test]
fn unhandled_emulation_failure_is_a_clean_error() {
    let elf = assemble("pvh_hello", 0x20_0000);
    let o = hype(&[
        "vmm",
        "--kernel",
        elf.to_str().unwrap(),
        "--memory",
        "64M",
        "--emulation-fixups",
        "off",
    ]);
    let (_, err) = texts(&o);
    if host_needs_fixups() {
        assert_eq!(o.status.code(), Some(1), "{err}");
        let last = err.lines().last().unwrap();
        assert!(
            last.starts_with("hype: KVM_EXIT_INTERNAL_ERROR (suberror 1) on vCPU 0 at RIP 0x"),
            "{last}"
        );
        // The failing instruction is the guest's int3 (0xcc).
        assert!(last.contains(", bytes [cc "), "{last}");
        assert!(!err.contains("panicked"));
    } else {
        assert_eq!(o.status.code(), Some(0), "{err}");
    }
}

#[test]
fn real_mode_interrupt_from_uart() {
    let elf = assemble("real_irq", 0x1000);
    let out = work_dir("real_irq").join("serial.txt");
    let cfg = raw_config(flat(&elf), 0x1000, 0x1000, RawMode::Real, 1, &out);
    let r = vm::run(&cfg).expect("vm runs");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "real mode\nirq 4 taken\n"
    );
    assert_eq!(r.end, VmEnd::Reset);
}

#[test]
fn application_processors_start_through_init_sipi() {
    for cpus in [2u8, 4] {
        let elf = assemble("smp", 0x8000);
        let mut code = flat(&elf);
        let off = (symbol(&elf, "expected") - 0x8000) as usize;
        code[off] = cpus - 1;
        let out = work_dir("smp").join(format!("serial{cpus}.txt"));
        let cfg = raw_config(code, 0x8000, 0x8100, RawMode::Long, cpus, &out);
        let r = vm::run(&cfg).expect("vm runs");
        assert_eq!(r.end, VmEnd::Reset);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            format!("application processors up: {}\n", cpus - 1)
        );
    }
}

#[test]
fn a_guest_looping_on_the_marker_port_cannot_flood_the_log() {
    let elf = assemble("marker_flood", 0x20_0000);
    let o = hype(&["vmm", "--kernel", elf.to_str().unwrap(), "--memory", "64M"]);
    let (_, err) = texts(&o);
    assert_eq!(o.status.code(), Some(0), "stderr: {err}");
    let lines = err.lines().filter(|l| l.contains("boot marker")).count();
    // 16 one by one, then powers of two up to 32768: 28 lines for 50,000 writes.
    assert!((17..=40).contains(&lines), "{lines} marker lines:\n{err}");
    assert!(
        err.contains("(marker #32768; only some are logged)"),
        "{err}"
    );
}
