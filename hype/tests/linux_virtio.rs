//! End-to-end: Linux's own virtio drivers against hype's backends, each a separate process,
//! attached with `--device`. Two boots share one disk image served by `hype block-file`: the
//! first formats it, writes a file, syncs and reboots; the second finds the file. The second boot
//! also gets a RAM disk from `hype block-mem` and a virtio console from `hype console` (types
//! learned from the backends): the guest writes to hvc0 and the text lands in the console's log.
//! When the test may create network namespaces (root), the second boot also gets a virtio-net
//! device from `hype net-tap`, whose TAP lives in a namespace made by the test, and the guest
//! pings the TAP's address. The second boot also reads a disk from `hype block-http`, served by
//! the test kit's HTTP server on 127.0.0.1: read-only, first sector and md5 as served.
//!
//! Needs the artefacts from `scripts/test` (HYPE_GUEST_*); without them the test says SKIPPED.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{work_dir, Backend};
use hype_testkit::guest::{GuestArtifacts, GuestVm, VmOptions};
use hype_testkit::http_server::{Behaviour, HttpServer};

const BOOT: Duration = Duration::from_secs(400);
const STEP: Duration = Duration::from_secs(180);

fn hype() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hype"))
}

/// The first 32 bytes of the image served over HTTP.
const HTTP_DISK_TEXT: &str = "hype-http-disk: served over HTTP";
/// Size of the image served over HTTP.
const HTTP_DISK_SIZE: usize = 4 << 20;

/// The image served over HTTP: [`HTTP_DISK_TEXT`], then a pattern that differs per sector.
fn http_disk_image() -> Vec<u8> {
    let mut img: Vec<u8> = (0..HTTP_DISK_SIZE)
        .map(|i| ((i / 512) as u8).wrapping_mul(31) ^ (i % 251) as u8)
        .collect();
    img[..HTTP_DISK_TEXT.len()].copy_from_slice(HTTP_DISK_TEXT.as_bytes());
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
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().next().unwrap().to_string()
}

/// A network namespace with a `hype net-tap` backend whose TAP is there, addressed 10.77.0.1/24.
/// Everything is removed on drop.
struct NetNs {
    name: String,
    backend: std::process::Child,
    socket: std::path::PathBuf,
}

impl NetNs {
    fn start(dir: &Path) -> Option<NetNs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED net part: needs root for a network namespace");
            return None;
        }
        let name = format!("hype-e2e-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIPPED net part: `ip netns add` failed");
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
                "--tap",
                "hypetap0",
                "--socket",
            ])
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
            assert!(
                std::time::Instant::now() < deadline,
                "net-tap socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for cmd in [
            &["addr", "add", "10.77.0.1/24", "dev", "hypetap0"][..],
            &["link", "set", "hypetap0", "up"],
        ] {
            let st = Command::new("ip")
                .args(["netns", "exec", &ns.name, "ip"])
                .args(cmd)
                .status()
                .unwrap();
            assert!(st.success(), "ip {cmd:?} in the namespace");
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
fn block_file_data_survives_reboot_and_block_mem_is_recognised() {
    let Some(art) = GuestArtifacts::from_env_or_skip("linux_virtio") else {
        return;
    };
    let dir = work_dir("linux_virtio");
    let image = dir.join("disk.img");
    let _ = std::fs::remove_file(&image);

    // Boot 1: format, write, sync, reboot.
    let disk = Backend::block_file(&dir, &image, 32 << 20);
    let disk_sock = disk.socket.clone();
    let opts = VmOptions::new(&art.vmlinux, &art.initramfs).device(disk_sock.to_str().unwrap());
    let mut vm = GuestVm::boot(hype(), &opts).unwrap();
    vm.wait_ready(BOOT).unwrap();
    assert_eq!(
        vm.check("cat /sys/block/vda/size", STEP).unwrap(),
        (32u64 << 20 >> 9).to_string()
    );
    vm.check("mke2fs -q /dev/vda && mount -t ext2 /dev/vda /mnt", STEP)
        .unwrap();
    vm.check("echo 'written by boot one' > /mnt/note && dd if=/dev/urandom of=/mnt/blob bs=1k count=256 2>/dev/null && sync", STEP).unwrap();
    let sum1 = vm.check("md5sum /mnt/blob | cut -d' ' -f1", STEP).unwrap();
    vm.check("umount /mnt", STEP).unwrap();
    let st = vm.reboot(STEP).unwrap();
    assert_eq!(st.code(), Some(0), "{}", vm.log());
    drop(vm);

    // Boot 2: same backend process (it keeps serving after the VMM disconnects), plus a RAM disk.
    let ram = Backend::block_mem(&dir, "8M");
    let ram_sock = ram.socket.clone();
    let console_log = dir.join("console.log");
    let _ = std::fs::remove_file(&console_log);
    let console = Backend::start(
        &[
            "console",
            "--output",
            &format!("file:{}", console_log.display()),
        ],
        &dir.join("con.sock"),
    );
    let net = NetNs::start(&dir);
    let http_image = http_disk_image();
    let http_md5 = md5_hex(&http_image);
    let server = HttpServer::start(Behaviour::new(http_image)).unwrap();
    let http_url = format!("http://127.0.0.1:{}/", server.port());
    let http = Backend::start(&["block-http", "--url", &http_url], &dir.join("http.sock"));
    // Block devices are named in --device order: vda (file), vdb (RAM), vdc (HTTP).
    let mut opts = VmOptions::new(&art.vmlinux, &art.initramfs)
        .device(disk_sock.to_str().unwrap())
        .device(ram_sock.to_str().unwrap())
        .device(http.socket.to_str().unwrap())
        .device(console.socket.to_str().unwrap());
    if let Some(n) = &net {
        opts = opts.device(n.socket.to_str().unwrap());
    }
    let mut vm = GuestVm::boot(hype(), &opts).unwrap();
    vm.wait_ready(BOOT).unwrap();
    // Every device was found through the DSDT (one LNRO0005 each), none on the command line.
    let n = opts.devices.len();
    assert!(!vm
        .check("cat /proc/cmdline", STEP)
        .unwrap()
        .contains("virtio_mmio.device="));
    let parents = vm
        .check(
            "for d in /sys/bus/virtio/devices/*; do readlink -f $d; done",
            STEP,
        )
        .unwrap();
    let below_acpi: std::collections::BTreeSet<&str> = parents
        .lines()
        .filter_map(|l| l.split('/').find(|c| c.starts_with("LNRO0005:")))
        .collect();
    assert_eq!(parents.lines().count(), n, "{parents}");
    assert_eq!(
        below_acpi.len(),
        n,
        "each device below its own LNRO0005:\n{parents}"
    );
    vm.check("mount -t ext2 /dev/vda /mnt", STEP).unwrap();
    assert_eq!(
        vm.check("cat /mnt/note", STEP).unwrap(),
        "written by boot one"
    );
    assert_eq!(
        vm.check("md5sum /mnt/blob | cut -d' ' -f1", STEP).unwrap(),
        sum1
    );
    assert_eq!(
        vm.check("cat /sys/block/vdb/size", STEP).unwrap(),
        (8u64 << 20 >> 9).to_string()
    );
    vm.check(
        "echo ramdisk-ok | dd of=/dev/vdb bs=512 conv=sync 2>/dev/null && sync",
        STEP,
    )
    .unwrap();
    assert_eq!(vm.check("head -c 10 /dev/vdb", STEP).unwrap(), "ramdisk-ok");
    assert_eq!(
        vm.check("cat /sys/block/vdc/size", STEP).unwrap(),
        (HTTP_DISK_SIZE >> 9).to_string()
    );
    assert_eq!(vm.check("cat /sys/block/vdc/ro", STEP).unwrap(), "1");
    assert_eq!(
        vm.check("head -c 32 /dev/vdc", STEP).unwrap(),
        HTTP_DISK_TEXT
    );
    assert_eq!(
        vm.check("md5sum /dev/vdc | cut -d' ' -f1", STEP).unwrap(),
        http_md5
    );
    assert!(
        !server.served_ranges().is_empty(),
        "the guest's reads reached the server: {:?}",
        server.log()
    );
    vm.check("echo hello-from-hvc0 > /dev/hvc0", STEP).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&console_log).unwrap_or_default();
        if text.contains("hello-from-hvc0") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "console log: {text:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    if net.is_some() {
        vm.check(
            "ip addr add 10.77.0.2/24 dev eth0 && ip link set eth0 up",
            STEP,
        )
        .unwrap();
        let ping = vm.check("ping -c 3 -W 10 10.77.0.1", STEP).unwrap();
        assert!(
            ping.contains("3 packets transmitted, 3 packets received"),
            "{ping}"
        );
    }
    let st = vm.poweroff(STEP).unwrap();
    assert_eq!(st.code(), Some(0), "{}", vm.log());
    assert!(vm.log().contains("guest powered off"), "{}", vm.log());
    drop((disk, ram, console, net, http, server));
}
