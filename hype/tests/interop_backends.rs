//! Interop: third-party vhost-user backends behind hype's frontend, driven by real Linux
//! drivers. virtiofsd (C, QEMU 7.2's, Debian's `qemu-system-common`) serves a host directory
//! as `--device fs:SOCKET,tag=share`: it offers no CONFIG protocol feature, so hype builds the
//! virtio-fs config (the tag) itself. The guest mounts the share, reads a host file, writes
//! files; the host sees them. rust-vmm's `vhost-device-rng` (from crates.io) serves
//! `--device rng:SOCKET`: Linux's virtio-rng driver becomes the current hwrng and
//! `/dev/hwrng` reads come from it.
//!
//! Needs the guest artefacts (HYPE_GUEST_*) and the backend (virtiofsd at `HYPE_VIRTIOFSD` or
//! /usr/lib/qemu/virtiofsd; vhost-device-rng at `HYPE_VHOST_DEVICE_RNG` or on PATH); without
//! them a test prints a SKIPPED line.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::work_dir;
use hype_testkit::guest::{GuestArtifacts, GuestVm, VmOptions};

const BOOT: Duration = Duration::from_secs(400);
const STEP: Duration = Duration::from_secs(180);

fn hype() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hype"))
}

/// A third-party backend process, killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `socket` to appear (the backend listens).
fn wait_for_socket(socket: &Path, p: &mut Process) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Ok(Some(st)) = p.0.try_wait() {
            panic!("backend exited before listening: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn virtiofsd() -> Option<PathBuf> {
    let p = std::env::var_os("HYPE_VIRTIOFSD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/qemu/virtiofsd"));
    p.exists().then_some(p)
}

#[test]
fn virtiofsd_share_is_mounted_read_and_written_by_linux() {
    let Some(art) = GuestArtifacts::from_env_or_skip("interop_backends virtiofsd") else {
        return;
    };
    let Some(fsd) = virtiofsd() else {
        eprintln!("SKIPPED interop_backends virtiofsd: no virtiofsd (Debian: qemu-system-common)");
        return;
    };
    let dir = work_dir("interop_virtiofsd");
    let share = dir.join("share");
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(share.join("sub")).unwrap();
    std::fs::write(share.join("host.txt"), "written by the host\n").unwrap();
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(share.join("sub/blob.bin"), &blob).unwrap();
    let socket = dir.join("fs.sock");
    let _ = std::fs::remove_file(&socket);
    let mut fsd = Process(
        Command::new(fsd)
            .arg(format!("--socket-path={}", socket.display()))
            .arg("-o")
            .arg(format!("source={}", share.display()))
            .args(["-o", "cache=none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start virtiofsd"),
    );
    wait_for_socket(&socket, &mut fsd);

    let spec = format!("fs:{},tag=share", socket.display());
    let opts = VmOptions::new(&art.vmlinux, &art.initramfs).device(&spec);
    let mut vm = GuestVm::boot(hype(), &opts).unwrap();
    vm.wait_ready(BOOT).unwrap();
    assert_eq!(
        vm.check("cat /sys/bus/virtio/devices/virtio0/device", STEP)
            .unwrap(),
        "0x001a",
        "virtio-fs device ID 26"
    );
    vm.check("mount -t virtiofs share /mnt", STEP).unwrap();
    // The guest reads the host's files.
    assert_eq!(
        vm.check("cat /mnt/host.txt", STEP).unwrap(),
        "written by the host"
    );
    let md5 = vm
        .check("md5sum /mnt/sub/blob.bin | cut -d' ' -f1", STEP)
        .unwrap();
    let host_md5 = Command::new("md5sum")
        .arg(share.join("sub/blob.bin"))
        .output()
        .unwrap();
    let host_md5 = String::from_utf8_lossy(&host_md5.stdout);
    assert_eq!(md5, host_md5.split_whitespace().next().unwrap());
    // The guest writes; the host sees it.
    vm.check(
        "echo written by the guest > /mnt/guest.txt && mkdir /mnt/made && dd if=/dev/zero of=/mnt/made/zeros bs=4k count=64 2>/dev/null && rm /mnt/host.txt && sync",
        STEP,
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(share.join("guest.txt")).unwrap(),
        "written by the guest\n"
    );
    assert_eq!(
        std::fs::read(share.join("made/zeros")).unwrap(),
        vec![0u8; 256 << 10]
    );
    assert!(!share.join("host.txt").exists(), "the guest's rm landed");
    // A host change is seen by the guest (cache=none).
    std::fs::write(share.join("late.txt"), "after the mount\n").unwrap();
    assert_eq!(
        vm.check("cat /mnt/late.txt", STEP).unwrap(),
        "after the mount"
    );
    vm.check("umount /mnt", STEP).unwrap();
    let st = vm.poweroff(STEP).unwrap();
    assert_eq!(st.code(), Some(0), "{}", vm.log());
    assert!(vm.log().contains("fs backend at"), "{}", vm.log());
    drop(fsd);
}

/// rust-vmm's `vhost-device-rng` (crates.io; `cargo install vhost-device-rng`), at
/// `HYPE_VHOST_DEVICE_RNG` or on PATH.
fn vhost_device_rng() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HYPE_VHOST_DEVICE_RNG") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("vhost-device-rng"))
        .find(|p| p.exists())
}

#[test]
fn vhost_device_rng_feeds_linux_hwrng() {
    let Some(art) = GuestArtifacts::from_env_or_skip("interop_backends vhost-device-rng") else {
        return;
    };
    let Some(rng) = vhost_device_rng() else {
        eprintln!(
            "SKIPPED interop_backends vhost-device-rng: not installed (cargo install vhost-device-rng; HYPE_VHOST_DEVICE_RNG names the binary)"
        );
        return;
    };
    let dir = work_dir("interop_vhost_device_rng");
    // vhost-device-rng serves --socket-count sockets, each path suffixed with its index.
    let base = dir.join("rng.sock");
    let socket = dir.join("rng.sock0");
    let _ = std::fs::remove_file(&socket);
    let mut p = Process(
        Command::new(rng)
            .arg("--socket-path")
            .arg(&base)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vhost-device-rng"),
    );
    wait_for_socket(&socket, &mut p);
    let spec = format!("rng:{}", socket.display());
    let opts = VmOptions::new(&art.vmlinux, &art.initramfs).device(&spec);
    let mut vm = GuestVm::boot(hype(), &opts).unwrap();
    vm.wait_ready(BOOT).unwrap();
    assert_eq!(
        vm.check("cat /sys/class/misc/hw_random/rng_current", STEP)
            .unwrap(),
        "virtio_rng.0"
    );
    // 64 KiB from the device: all read, and not a constant.
    let out = vm
        .check(
            "dd if=/dev/hwrng bs=4096 count=16 2>/dev/null | wc -c; dd if=/dev/hwrng bs=4096 count=16 2>/dev/null | md5sum | cut -d' ' -f1; dd if=/dev/hwrng bs=4096 count=16 2>/dev/null | md5sum | cut -d' ' -f1",
            STEP,
        )
        .unwrap();
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "65536", "{out}");
    assert_ne!(lines[1], lines[2], "two reads gave the same bytes: {out}");
    let st = vm.poweroff(STEP).unwrap();
    assert_eq!(st.code(), Some(0), "{}", vm.log());
    assert!(vm.log().contains("rng backend at"), "{}", vm.log());
    drop(p);
}
