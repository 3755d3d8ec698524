//! hype's ACPI tables checked by an outside validator: Debian's `acpica-tools`.
//!
//! `hype vmm --dump-acpi DIR` writes the tables a VM would get; `iasl -d` must disassemble every
//! table (the RSDP excepted: iasl cannot load an RSDP from a file, the unit tests check it)
//! without errors or warnings, the disassembled DSDT must compile back cleanly, and `acpiexec`
//! must load the tables and evaluate `_S5_` and every device's `_CRS` and `_STA` to the values
//! hype means, and every empty hot-plug slot's `_STA` (absent), `_CRS`, `_DSD` and `_EJ0`, and
//! the GED's `_EVT`. Without `iasl`/`acpiexec` on PATH the test says SKIPPED (`.ci/run` installs
//! them).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::path::Path;
use std::process::Command;

use common::{hype, texts, work_dir};

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("-v")
        .output()
        .map(|o| o.status.success() || !o.stdout.is_empty())
        .unwrap_or(false)
}

fn dump(dir: &Path, cpus: u8, devices: usize) {
    let _ = std::fs::remove_dir_all(dir);
    let cpus = cpus.to_string();
    let dir_s = dir.to_str().unwrap().to_owned();
    let socks: Vec<String> = (0..devices)
        .map(|i| format!("/nonexistent/d{i}.sock"))
        .collect();
    let mut args: Vec<&str> = vec!["vmm", "--cpus", &cpus, "--dump-acpi", &dir_s];
    for s in &socks {
        args.push("--device");
        args.push(s);
    }
    let o = hype(&args);
    let (_, err) = texts(&o);
    assert_eq!(o.status.code(), Some(0), "dump failed: {err}");
}

/// Runs a tool in `dir`; returns (success, stdout + stderr).
fn run(dir: &Path, tool: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// Lines that report a problem (the banner and summary lines are not problems).
fn problems(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            (l.contains("error") || l.contains("warning") || l.contains("ae_"))
                && !l.contains("0 errors, 0 warnings")
        })
        .collect()
}

fn check(cpus: u8, devices: usize) {
    let dir = work_dir(&format!("acpi-{cpus}-{devices}"));
    dump(&dir, cpus, devices);
    for t in ["xsdt", "facp", "apic", "dsdt"] {
        let (ok, out) = run(&dir, "iasl", &["-d", &format!("{t}.dat")]);
        assert!(ok, "iasl -d {t}.dat failed:\n{out}");
        assert!(problems(&out).is_empty(), "iasl -d {t}.dat:\n{out}");
        assert!(dir.join(format!("{t}.dsl")).exists());
    }
    let apic = std::fs::read_to_string(dir.join("apic.dsl")).unwrap();
    assert_eq!(
        apic.matches("[Processor Local APIC]").count(),
        usize::from(cpus),
        "{apic}"
    );
    assert_eq!(apic.matches("[I/O APIC]").count(), 1);
    let facp = std::fs::read_to_string(dir.join("facp.dsl")).unwrap();
    for line in [
        "Hardware Reduced (V5) : 1",
        "Reset Register Supported (V2) : 1",
    ] {
        assert!(facp.contains(line), "FADT lacks '{line}':\n{facp}");
    }
    // The disassembly compiles back without errors or warnings.
    let (ok, out) = run(&dir, "iasl", &["-p", "recompiled", "dsdt.dsl"]);
    assert!(ok && out.contains("0 Errors, 0 Warnings"), "{out}");

    let mut cmds = vec!["evaluate \\_S5_".to_owned()];
    let mut names = vec!["COM1".to_owned(), "PWRB".to_owned(), "GED0".to_owned()];
    names.extend((0..devices).map(|i| format!("VR{i:02X}")));
    for n in &names {
        cmds.push(format!("evaluate \\_SB.{n}._STA"));
        if n != "PWRB" {
            cmds.push(format!("evaluate \\_SB.{n}._CRS"));
        }
    }
    // The empty hot-plug slots after the boot devices: absent (acpiexec's I/O ports read 0),
    // their _CRS and _DSD, _EJ0, and the GED's _EVT that walks them.
    let slots: Vec<String> = (devices..10).map(|i| format!("VR{i:02X}")).collect();
    let mut slot_cmds = vec!["evaluate \\_SB.GED0._EVT 0".to_owned()];
    for n in &slots {
        for m in ["_STA", "_CRS", "_DSD"] {
            slot_cmds.push(format!("evaluate \\_SB.{n}.{m}"));
        }
        slot_cmds.push(format!("evaluate \\_SB.{n}._EJ0 1"));
    }
    // acpiexec takes at most 1023 characters of commands: a few batches.
    let mut out = String::new();
    let mut ok = true;
    for chunk in [&cmds[..], &slot_cmds[..]]
        .iter()
        .flat_map(|c| c.chunks(12))
    {
        let batch = chunk.join("; ");
        let (o, text) = run(
            &dir,
            "acpiexec",
            &["-b", &batch, "facp.dat", "apic.dat", "dsdt.dat"],
        );
        ok &= o;
        out.push_str(&text);
    }
    assert!(ok, "acpiexec failed:\n{out}");
    assert!(problems(&out).is_empty(), "acpiexec:\n{out}");
    assert!(
        out.contains("successfully acquired and loaded"),
        "acpiexec did not load the DSDT:\n{out}"
    );
    // _S5_ = Package { 5, 0 }
    let s5 = out.split("Evaluating \\_S5_").nth(1).unwrap();
    assert!(
        s5.contains("[Package] Contains 2 Elements") && s5.contains("[Integer] = 0000000000000005"),
        "{out}"
    );
    assert_eq!(
        out.matches("[Integer] = 000000000000000F").count(),
        names.len(),
        "every _STA is 0x0F:\n{out}"
    );
    for n in &slots {
        let sta = out
            .split(&format!("Evaluating \\_SB.{n}._STA"))
            .nth(1)
            .unwrap();
        assert!(
            sta.split("Evaluating")
                .next()
                .unwrap()
                .contains("[Integer] = 0000000000000000"),
            "{n}._STA is 0 while the slot is empty:\n{out}"
        );
        let dsd = out
            .split(&format!("Evaluating \\_SB.{n}._DSD"))
            .nth(1)
            .unwrap();
        assert!(dsd.contains("\"virtio,mmio\""), "{n}._DSD:\n{out}");
    }
    assert!(out.contains("Evaluating \\_SB.GED0._EVT"), "{out}");
    // Each virtio device's and slot's _CRS: Memory32Fixed(RW, base, 0x1000) then its GSI.
    for i in 0..10 {
        let base = 0xd000_0000u32 + 0x1000 * i as u32;
        let b = base.to_le_bytes();
        let needle = format!(
            "86 09 00 01 {:02X} {:02X} {:02X} {:02X} 00 10 00 00 89 06 00 03",
            b[0], b[1], b[2], b[3]
        );
        let section = out
            .split(&format!("Evaluating \\_SB.VR{i:02X}._CRS"))
            .nth(1)
            .unwrap();
        assert!(section.contains(&needle), "VR{i:02X}._CRS: {needle}\n{out}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn acpica_tools_accept_the_tables() {
    if !have("iasl") || !have("acpiexec") {
        eprintln!("SKIPPED: iasl/acpiexec not found (apt-get install acpica-tools)");
        return;
    }
    for (cpus, devices) in [(1, 0), (2, 1), (8, 3), (254, 10)] {
        check(cpus, devices);
    }
}

#[test]
fn dump_acpi_refuses_mptable_and_too_many_devices() {
    let dir = work_dir("acpi-refused");
    let d = dir.to_str().unwrap();
    let o = hype(&["vmm", "--platform", "mptable", "--dump-acpi", d]);
    assert_eq!(o.status.code(), Some(2), "{}", texts(&o).1);
    let socks: Vec<String> = (0..11).map(|i| format!("/x/{i}")).collect();
    let mut args = vec!["vmm", "--dump-acpi", d];
    for s in &socks {
        args.extend(["--device", s.as_str()]);
    }
    let o = hype(&args);
    let (_, err) = texts(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("11 devices"), "{err}");
}
