//! Interop: hype's vhost-user backends behind QEMU's frontends. QEMU (TCG, so no KVM is
//! needed) boots the test kernel with its RAM in a shared memfd and drives hype's backends
//! through `vhost-user-blk-pci` and `-netdev vhost-user` + `virtio-net-pci`; Linux's own
//! virtio-pci drivers do the I/O. Proves: the guest reads the host's bytes (block-file,
//! block-mem, block-http), guest writes land in the image, a killed and restarted block-file
//! backend is reconnected by QEMU (`reconnect=1`) and keeps serving, and the NIC passes
//! traffic both ways (ICMP echo from the guest to the TAP's address and the reply back).
//!
//! Needs `qemu-system-x86_64` and the guest artefacts (HYPE_GUEST_*); without them each test
//! prints a SKIPPED line. The net test also needs root (a network namespace).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{work_dir, Backend};
use hype_testkit::guest::{GuestArtifacts, GuestVm, BASE_CMDLINE};
use hype_testkit::http_server::{Behaviour, HttpServer};

/// TCG boots the test kernel in ~20 s on an idle core; allow for a loaded machine.
const BOOT: Duration = Duration::from_secs(400);
const STEP: Duration = Duration::from_secs(180);
const QEMU: &str = "qemu-system-x86_64";
const MEMORY_MIB: u32 = 256;

/// The guest artefacts and QEMU, or a SKIPPED line.
fn setup(test: &str) -> Option<GuestArtifacts> {
    let has_qemu = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_qemu {
        eprintln!("SKIPPED {test}: {QEMU} not found (Debian: qemu-system-x86)");
        return None;
    }
    GuestArtifacts::from_env_or_skip(test)
}

/// A QEMU vhost-user device: its chardev (reconnecting every second) and its `-device`.
enum QemuDevice<'a> {
    Blk(&'a Path),
    Net(&'a Path),
}

/// QEMU with the test kernel and initramfs, serial console on stdio, RAM in a shared memfd
/// (vhost-user needs the backend to map guest memory), and `devices`.
fn qemu(art: &GuestArtifacts, devices: &[QemuDevice<'_>]) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-accel", "tcg", "-M", "pc", "-cpu", "max", "-nodefaults"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .args(["-m", &format!("{MEMORY_MIB}M")])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"),
            "-machine",
            "memory-backend=mem",
        ])
        .arg("-kernel")
        .arg(&art.vmlinux)
        .arg("-initrd")
        .arg(&art.initramfs)
        .args(["-append", BASE_CMDLINE]);
    for (i, d) in devices.iter().enumerate() {
        let (path, device) = match d {
            QemuDevice::Blk(p) => (p, format!("vhost-user-blk-pci,chardev=c{i}")),
            QemuDevice::Net(p) => {
                cmd.args(["-netdev", &format!("vhost-user,id=n{i},chardev=c{i}")]);
                (
                    p,
                    format!("virtio-net-pci,netdev=n{i},mac=52:54:00:12:34:56"),
                )
            }
        };
        cmd.args([
            "-chardev",
            &format!("socket,id=c{i},path={},reconnect=1", path.display()),
            "-device",
            &device,
        ]);
    }
    cmd
}

/// The image a block-file backend serves: a pattern that differs per sector, then a
/// marker at the start.
fn pattern(size: usize, marker: &str) -> Vec<u8> {
    let mut img: Vec<u8> = (0..size)
        .map(|i| ((i / 512) as u8).wrapping_mul(13) ^ (i % 241) as u8)
        .collect();
    img[..marker.len()].copy_from_slice(marker.as_bytes());
    img
}

/// md5 of `data` as hex, by the host's `md5sum`.
fn md5_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run md5sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "md5sum failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The guest's block device (`vda`, ...) with `sectors` 512-byte sectors: QEMU's PCI order
/// decides the names, the sizes tell the disks apart.
fn disk_with_size(vm: &mut GuestVm, sectors: u64) -> String {
    let listing = vm
        .check(
            "for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/size); done",
            STEP,
        )
        .unwrap();
    listing
        .lines()
        .find_map(|l| {
            let (name, size) = l.split_once(' ')?;
            (size.trim() == sectors.to_string()).then(|| name.to_string())
        })
        .unwrap_or_else(|| panic!("no disk of {sectors} sectors in:\n{listing}"))
}

#[test]
fn qemu_drives_hype_block_backends_and_survives_a_backend_restart() {
    let Some(art) = setup("interop_qemu block") else {
        return;
    };
    let dir = work_dir("interop_qemu_blk");
    // block-file: 32 MiB with a known pattern.
    let image = dir.join("disk.img");
    let file_bytes = pattern(32 << 20, "hype-block-file: read by QEMU");
    std::fs::write(&image, &file_bytes).unwrap();
    let mut file = Backend::block_file(&dir, &image, 0);
    // block-mem: 8 MiB, starts as zeros.
    let mem = Backend::block_mem(&dir, "8M");
    // block-http: 4 MiB served by the test kit's server on 127.0.0.1, read-only.
    let http_bytes = pattern(4 << 20, "hype-block-http: read by QEMU");
    let http_md5 = md5_hex(&http_bytes);
    let server = HttpServer::start(Behaviour::new(http_bytes)).unwrap();
    let url = format!("http://127.0.0.1:{}/", server.port());
    let http = Backend::start(&["block-http", "--url", &url], &dir.join("http.sock"));

    let cmd = qemu(
        &art,
        &[
            QemuDevice::Blk(&file.socket),
            QemuDevice::Blk(&mem.socket),
            QemuDevice::Blk(&http.socket),
        ],
    );
    let mut vm = GuestVm::spawn(cmd).unwrap();
    vm.wait_ready(BOOT).unwrap();
    eprintln!("QEMU TCG: agent ready after {:?}", vm.ready_after);
    // Linux found them through virtio-pci.
    let drivers = vm
        .check(
            "for d in /sys/bus/virtio/devices/*; do readlink -f $d; done",
            STEP,
        )
        .unwrap();
    assert_eq!(
        drivers
            .lines()
            .filter(|l| l.contains("/pci0000:00/"))
            .count(),
        3,
        "{drivers}"
    );
    let vfile = disk_with_size(&mut vm, 32 << 11);
    let vmem = disk_with_size(&mut vm, 8 << 11);
    let vhttp = disk_with_size(&mut vm, 4 << 11);

    // block-file: the guest reads the host's bytes, and its writes land in the image.
    assert_eq!(
        vm.check(&format!("md5sum /dev/{vfile} | cut -d' ' -f1"), STEP)
            .unwrap(),
        md5_hex(&file_bytes)
    );
    vm.check(
        &format!(
            "echo guest-write-through-qemu | dd of=/dev/{vfile} bs=512 seek=100 conv=sync,notrunc 2>/dev/null && sync"
        ),
        STEP,
    )
    .unwrap();
    let on_host = std::fs::read(&image).unwrap();
    assert_eq!(
        &on_host[100 * 512..100 * 512 + 24],
        b"guest-write-through-qemu"
    );
    assert_eq!(&on_host[..512], &file_bytes[..512], "sector 0 untouched");

    // block-mem: zeros at first, writes read back.
    assert_eq!(
        vm.check(&format!("md5sum /dev/{vmem} | cut -d' ' -f1"), STEP)
            .unwrap(),
        md5_hex(&vec![0u8; 8 << 20])
    );
    vm.check(
        &format!(
            "echo ramdisk-through-qemu | dd of=/dev/{vmem} bs=512 seek=7 conv=sync 2>/dev/null && sync && echo 3 > /proc/sys/vm/drop_caches"
        ),
        STEP,
    )
    .unwrap();
    assert_eq!(
        vm.check(
            &format!("dd if=/dev/{vmem} bs=512 skip=7 count=1 2>/dev/null | head -c 20"),
            STEP
        )
        .unwrap(),
        "ramdisk-through-qemu"
    );

    // block-http: read-only, the bytes served.
    assert_eq!(
        vm.check(&format!("cat /sys/block/{vhttp}/ro"), STEP)
            .unwrap(),
        "1"
    );
    assert_eq!(
        vm.check(&format!("md5sum /dev/{vhttp} | cut -d' ' -f1"), STEP)
            .unwrap(),
        http_md5
    );
    assert!(!server.served_ranges().is_empty(), "{:?}", server.log());

    // Backend restart: SIGKILL block-file, start it again on the same socket; QEMU's
    // reconnecting chardev finds it and replays the device setup. The guest then reads what
    // it wrote before (from the image, not its page cache) and writes again.
    file.kill();
    std::thread::sleep(Duration::from_millis(500));
    file.restart();
    vm.check(
        &format!(
            "echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/{vfile} bs=512 skip=100 count=1 2>/dev/null | head -c 24"
        ),
        STEP,
    )
    .map(|t| assert_eq!(t, "guest-write-through-qemu"))
    .unwrap_or_else(|e| panic!("after the restart: {e}"));
    vm.check(
        &format!(
            "echo written-after-restart | dd of=/dev/{vfile} bs=512 seek=200 conv=sync,notrunc 2>/dev/null && sync"
        ),
        STEP,
    )
    .unwrap();
    let on_host = std::fs::read(&image).unwrap();
    assert_eq!(
        &on_host[200 * 512..200 * 512 + 21],
        b"written-after-restart"
    );

    let st = vm.poweroff(STEP).unwrap();
    assert!(st.success(), "QEMU exit {st}: {}", vm.log());
    drop((file, mem, http, server));
}

/// A network namespace holding a `hype net-tap` backend whose TAP has 10.78.0.1/24; removed
/// on drop.
struct NetNs {
    name: String,
    backend: std::process::Child,
    socket: PathBuf,
}

impl NetNs {
    fn start(dir: &Path) -> Option<NetNs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED interop_qemu net: needs root for a network namespace");
            return None;
        }
        let name = format!("hype-qemu-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED interop_qemu net: `ip netns add` failed");
            return None;
        }
        let socket = dir.join("net.sock");
        let _ = std::fs::remove_file(&socket);
        let backend = Command::new("ip")
            .args([
                "netns",
                "exec",
                &name,
                env!("CARGO_BIN_EXE_hype"),
                "net-tap",
            ])
            .args(["--tap", "qemutap0", "--socket"])
            .arg(&socket)
            .env("HYPE_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("start net-tap");
        let ns = NetNs {
            name,
            backend,
            socket,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !ns.socket.exists() {
            assert!(std::time::Instant::now() < deadline, "no net-tap socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        for args in [
            &["addr", "add", "10.78.0.1/24", "dev", "qemutap0"][..],
            &["link", "set", "qemutap0", "up"],
        ] {
            let st = Command::new("ip")
                .args(["netns", "exec", &ns.name, "ip"])
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ip {args:?}");
        }
        Some(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = self.backend.kill();
        let _ = self.backend.wait();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn qemu_virtio_net_passes_traffic_through_hype_net_tap() {
    let Some(art) = setup("interop_qemu net") else {
        return;
    };
    let dir = work_dir("interop_qemu_net");
    let Some(net) = NetNs::start(&dir) else {
        return;
    };
    let mut vm = GuestVm::spawn(qemu(&art, &[QemuDevice::Net(&net.socket)])).unwrap();
    vm.wait_ready(BOOT).unwrap();
    assert_eq!(
        vm.check("cat /sys/class/net/eth0/address", STEP).unwrap(),
        "52:54:00:12:34:56"
    );
    vm.check(
        "ip addr add 10.78.0.2/24 dev eth0 && ip link set eth0 up",
        STEP,
    )
    .unwrap();
    // Echo requests leave the guest through net-tap's TX path; the replies come back in
    // through its RX path.
    let ping = vm.check("ping -c 3 -W 10 10.78.0.1", STEP).unwrap();
    assert!(
        ping.contains("3 packets transmitted, 3 packets received"),
        "{ping}"
    );
    // And the host side saw them arrive on the TAP.
    let out = Command::new("ip")
        .args([
            "netns", "exec", &net.name, "ip", "-s", "link", "show", "qemutap0",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let rx_packets: u64 = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("RX:"))
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(rx_packets >= 3, "TAP statistics:\n{text}");
    let st = vm.poweroff(STEP).unwrap();
    assert!(st.success(), "QEMU exit {st}: {}", vm.log());
    drop(net);
}
