//! The ACPI power device seen from a guest: tiny real-mode programs write the FADT's sleep and
//! reset registers and poll the GED event port while the host presses the power button.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::time::{Duration, Instant};

use hype_fixups::FixupMode;
use hype_vmm::config::SerialSpec;
use hype_vmm::devices::power::PowerButton;
use hype_vmm::platform::Platform;
use hype_vmm::vm::{self, BootImage, RawMode, VmConfig, VmControls, VmEnd};

fn config(code: Vec<u8>, platform: Platform) -> VmConfig {
    VmConfig {
        image: BootImage::Raw {
            code,
            load_addr: 0x1000,
            entry: 0x1000,
            mode: RawMode::Real,
        },
        memory: 64 << 20,
        cpus: 1,
        serial: SerialSpec::None,
        devices: vec![],
        fixups: FixupMode::Auto,
        api_socket: None,
        platform,
    }
}

/// `mov al, v; mov dx, port; out dx, al`
fn out8(port: u16, v: u8) -> Vec<u8> {
    let p = port.to_le_bytes();
    vec![0xb0, v, 0xba, p[0], p[1], 0xee]
}

/// `mov ax, v; mov dx, port; out dx, ax`
fn out16(port: u16, v: u16) -> Vec<u8> {
    let p = port.to_le_bytes();
    let v = v.to_le_bytes();
    vec![0xb8, v[0], v[1], 0xba, p[0], p[1], 0xef]
}

/// i8042 reset (`mov al, 0xfe; out 0x64, al`) and `hlt`: the end when nothing else ended it.
const I8042_RESET: [u8; 5] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4];
/// SLP_TYP 5 | SLP_EN.
const S5: u8 = (5 << 2) | (1 << 5);

#[test]
fn s5_write_powers_off_with_acpi_only() {
    let mut code = out8(0x600, S5);
    code.extend(I8042_RESET);
    let r = vm::run(&config(code.clone(), Platform::Acpi)).expect("vm runs");
    assert_eq!(r.end, VmEnd::PowerOff);
    // Without ACPI there is no power device: the write is ignored and the i8042 resets.
    let r = vm::run(&config(code, Platform::Mptable)).expect("vm runs");
    assert_eq!(r.end, VmEnd::Reset);
}

#[test]
fn reset_register_resets_and_bad_writes_are_ignored() {
    // Wrong reset value, S5 without SLP_EN, S3 with SLP_EN, WAK_STS clear, a 16-bit write over
    // sleep control + status, GED port writes: none of these ends the VM ...
    let mut code = out8(0x602, 0x55);
    code.extend(out8(0x600, 5 << 2));
    code.extend(out8(0x600, (3 << 2) | (1 << 5)));
    code.extend(out8(0x601, 0x80));
    code.extend(out16(0x600, 0x8014));
    code.extend(out8(0x603, 0xff));
    // ... the reset value does, before the S5 that follows it.
    code.extend(out8(0x602, 1));
    code.extend(out8(0x600, S5));
    code.extend(I8042_RESET);
    let r = vm::run(&config(code, Platform::Acpi)).expect("vm runs");
    assert_eq!(r.end, VmEnd::Reset);
}

#[test]
fn power_button_event_reaches_the_guest() {
    // loop: in al, 0x603 (dx); test al, 1; jz loop; then S5.
    let mut code = vec![0xba, 0x03, 0x06, 0xec, 0xa8, 0x01, 0x74, 0xf8];
    code.extend(out8(0x600, S5));
    code.push(0xf4);
    let button = PowerButton::new();
    let presser = button.clone();
    let t = std::thread::spawn(move || {
        let start = Instant::now();
        while presser.press().is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "VM never attached"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let controls = VmControls {
        power_button: button.clone(),
        graceful_stop: None,
        ..Default::default()
    };
    let r = vm::run_with(&config(code, Platform::Acpi), &controls).expect("vm runs");
    t.join().unwrap();
    assert_eq!(r.end, VmEnd::PowerOff);
    assert_eq!(button.presses(), 1);
    assert!(!button.is_attached(), "the VM's end detaches the button");
}
