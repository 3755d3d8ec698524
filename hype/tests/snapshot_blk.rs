//! Snapshot and restore of a tiny guest with a virtio-blk device served by a `hype block-file`
//! process: the guest is snapshotted while it polls the disk, the VM is stopped, and a new
//! `hype vmm --restore` process with a new backend on the same image continues it: its next
//! reads see what the host wrote meanwhile, its writes after the restore land in the image, and
//! its used index shows every request completed exactly once. A restore without the device, or
//! with a backend of another type, is refused before the disk is touched.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assemble, flat, symbol, work_dir, Backend};
use hype_ctl::client::Client;
use hype_fixups::FixupMode;
use hype_vmm::config::{DeviceSpec, SerialSpec};
use hype_vmm::snapshot::Manifest;
use hype_vmm::virtio::WaitLimit;
use hype_vmm::vm::{self, BootImage, RawMode, VmConfig, VmEnd};
use reqwest::Method;

const LOAD: u64 = 0x10_0000;
const DOTS: &str = "................................................................";

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn sector(img: &Path, n: u64) -> Vec<u8> {
    let mut f = std::fs::File::open(img).unwrap();
    f.seek(SeekFrom::Start(n * 512)).unwrap();
    let mut b = vec![0u8; 512];
    f.read_exact(&mut b).unwrap();
    b
}

#[test]
fn restored_guest_with_a_disk_finishes_its_io() {
    let dir = work_dir("snapshot-blk");
    let img = dir.join("disk.img");
    let _ = std::fs::remove_file(&img);
    let mut backend = Backend::block_file(&dir, &img, 8 << 20);
    let serial = dir.join("serial1.txt");
    let api = dir.join("api.sock");
    let _ = std::fs::remove_file(&serial);
    let _ = std::fs::remove_file(&api);
    let elf = assemble("virtio_blk", LOAD);
    let mut code = flat(&elf);
    code[(symbol(&elf, "mailbox") - LOAD) as usize] = 1;
    let mut dev = DeviceSpec::new(&backend.socket);
    dev.wait = Some(WaitLimit::For(Duration::from_secs(20)));
    let cfg = VmConfig {
        image: BootImage::Raw {
            code,
            load_addr: LOAD,
            entry: LOAD,
            mode: RawMode::Long,
        },
        memory: 64 << 20,
        cpus: 1,
        serial: SerialSpec::File(serial.clone()),
        devices: vec![dev],
        fixups: FixupMode::Auto,
        api_socket: Some(api.clone()),
        platform: Default::default(),
    };
    let vm = std::thread::spawn(move || vm::run(&cfg));

    // The guest wrote and checked sectors 0..31 and now polls sector 1000 for "GO!!".
    let t = Instant::now();
    while !read(&serial).contains("waiting") {
        assert!(t.elapsed() < Duration::from_secs(60), "{:?}", read(&serial));
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    let client = Client::new(&api, Duration::from_secs(30)).unwrap();
    assert_eq!(
        client.call(Method::POST, "/vm/pause", None).unwrap().status,
        200
    );
    let snap = dir.join("snap");
    let _ = std::fs::remove_dir_all(&snap);
    let body = serde_json::json!({ "dir": snap.to_str().unwrap() });
    let a = client
        .call(Method::PUT, "/vm/snapshot", Some(&body))
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(
        client.call(Method::POST, "/vm/stop", None).unwrap().status,
        202
    );
    let r = vm.join().unwrap().unwrap();
    assert_eq!(r.end, VmEnd::Stopped);
    let before = read(&serial);
    let half = &DOTS[..32];
    assert_eq!(
        before,
        format!("virtio-blk guest\ncapacity 0x4000\n{half}\nwaiting\n")
    );

    let m: Manifest =
        serde_json::from_slice(&std::fs::read(snap.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m.devices.len(), 1);
    let d = &m.devices[0];
    assert_eq!(d.kind, "blk");
    assert_eq!(d.socket, backend.socket.to_str().unwrap());
    assert!(d.transport.activated);
    assert_eq!(d.transport.status, 0xf);
    assert_eq!(d.rings.len(), 1);
    // 2 requests per sector for 32 sectors, then the mailbox polls: all completed.
    assert!(d.rings[0].used >= 64, "{:?}", d.rings);
    assert!(
        d.rings[0].next_avail >= u32::from(d.rings[0].used)
            && d.rings[0].next_avail <= u32::from(d.rings[0].used) + 1,
        "{:?}",
        d.rings
    );

    // The sectors the guest writes after the restore are still empty.
    assert_eq!(sector(&img, 40), vec![0u8; 512]);
    // A new backend process on the same image; the host writes the mailbox meanwhile.
    backend.restart();
    let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.seek(SeekFrom::Start(1000 * 512)).unwrap();
    f.write_all(b"GO!!").unwrap();
    f.sync_all().unwrap();

    // Without its device the snapshot is refused, and the disk is not touched.
    let serial2 = dir.join("serial2.txt");
    let _ = std::fs::remove_file(&serial2);
    let out = Command::new(env!("CARGO_BIN_EXE_hype"))
        .args(["vmm", "--restore", snap.to_str().unwrap()])
        .arg(format!("--serial=file:{}", serial2.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the snapshot has 1 device(s), 0 given with --device"),
        "{err}"
    );
    assert_eq!(sector(&img, 40), vec![0u8; 512]);
    // Nor with a backend of another type in its slot.
    let console = Backend::start(
        &[
            "console",
            "--output",
            &format!("file:{}", dir.join("console.out").display()),
        ],
        &dir.join("con.sock"),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_hype"))
        .args(["vmm", "--restore", snap.to_str().unwrap()])
        .arg("--device")
        .arg(&console.socket)
        .arg(format!("--serial=file:{}", serial2.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "device 0 (virtio0): the snapshot has a blk device here, the backend given is console"
        ),
        "{err}"
    );
    assert_eq!(read(&serial2), "");
    drop(console);
    assert_eq!(sector(&img, 40), vec![0u8; 512]);

    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hype"))
        .args(["vmm", "--restore", snap.to_str().unwrap()])
        .arg("--device")
        .arg(&backend.socket)
        .arg(format!("--serial=file:{}", serial2.display()))
        .env("HYPE_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("restore.log")).unwrap())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!(
                "restored VM did not end: {:?} {}",
                read(&serial2),
                read(&dir.join("restore.log"))
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = read(&dir.join("restore.log"));
    assert!(status.success(), "{log}");
    let after = read(&serial2);
    // The restored guest read GO!! on its next poll, wrote and checked sectors 32..63, read all
    // 64 back, and found the used index equal to its own request count.
    assert!(
        after.starts_with(&format!("go\n{half}\nall sectors ok, used idx 0x")),
        "{after:?} {log}"
    );
    assert!(log.contains("rings resume at used"), "{log}");
    // Its writes after the restore landed in the image: sector n holds n*7 + j.
    for n in [32u64, 40, 63] {
        let expected: Vec<u8> = (0..512u32).map(|j| (n as u32 * 7 + j) as u8).collect();
        assert_eq!(sector(&img, n), expected, "sector {n}");
    }
}
