//! Snapshot and restore of a tiny guest whose disk is a `hype block-mem` RAM disk: the disk
//! exists only in the backend process, so the snapshot carries it (vhost-user DEVICE_STATE,
//! `device0.state`) and the restore loads it into a fresh, empty `block-mem` process. The
//! guest polls its disk when it is snapshotted; the test writes the guest's "GO!!" into the
//! saved disk state (its documented format, checksums renewed), so that the restored guest can
//! only go on if the state reached the new backend; it then reads back every sector written
//! before the snapshot. A damaged state, or a backend that offers no DEVICE_STATE, is refused
//! before the guest runs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assemble, flat, symbol, work_dir, Backend};
use hype_ctl::client::Client;
use hype_fixups::FixupMode;
use hype_vmm::config::{DeviceSpec, SerialSpec};
use hype_vmm::snapshot::{crc::crc32, Manifest};
use hype_vmm::virtio::WaitLimit;
use hype_vmm::vm::{self, BootImage, RawMode, VmConfig, VmEnd};
use reqwest::Method;

const LOAD: u64 = 0x10_0000;
const DOTS: &str = "................................................................";

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn restore(snap: &Path, socket: &Path, serial: &Path, log: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_hype"))
        .args(["vmm", "--restore", snap.to_str().unwrap()])
        .arg("--device")
        .arg(socket)
        .arg(format!("--serial=file:{}", serial.display()))
        .env("HYPE_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn wait(mut child: std::process::Child, serial: &Path, log: &Path) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("restored VM did not end: {:?} {}", read(serial), read(log));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_ram_disk_is_carried_by_the_snapshot_into_a_new_backend() {
    let dir = work_dir("snapshot-blk-mem");
    let mut backend = Backend::block_mem(&dir, "8M");
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
    let half = &DOTS[..32];
    assert_eq!(
        read(&serial),
        format!("virtio-blk guest\ncapacity 0x4000\n{half}\nwaiting\n")
    );
    // The old RAM disk goes away with its process.
    backend.kill();

    // The state: sparse, one 1 MiB chunk (sectors 0..31, the mailbox at 1000 all zero).
    let mpath = snap.join("manifest.json");
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    let rec = m.devices[0].state.clone().expect("block-mem state saved");
    assert_eq!(rec.name, "device0.state");
    let spath = snap.join(&rec.name);
    let mut state = std::fs::read(&spath).unwrap();
    assert_eq!(state.len() as u64, rec.bytes);
    assert_eq!(crc32(&state), rec.crc32);
    assert_eq!(&state[..16], hype_block_mem::STATE_MAGIC);
    assert_eq!(state.len(), 16 + 8 + 8 + (1 << 20) + 8);
    assert_eq!(state[24..32], 0u64.to_le_bytes()); // chunk 0
                                                   // Sector n holds n*7 + j (the guest's pattern).
    for n in [0usize, 17, 31] {
        let at = 32 + n * 512;
        let expected: Vec<u8> = (0..512u32).map(|j| (n as u32 * 7 + j) as u8).collect();
        assert_eq!(state[at..at + 512], expected[..], "sector {n}");
    }

    // A damaged state is refused, before the guest runs.
    let serial2 = dir.join("serial2.txt");
    let log = dir.join("restore.log");
    let _ = std::fs::remove_file(&serial2);
    let mut fresh = Backend::block_mem(&dir, "8M");
    state[40] ^= 0xff;
    std::fs::write(&spath, &state).unwrap();
    let st = wait(
        restore(&snap, &fresh.socket, &serial2, &log),
        &serial2,
        &log,
    );
    assert_eq!(st.code(), Some(1), "{}", read(&log));
    assert!(
        read(&log).contains("device0.state is corrupted"),
        "{}",
        read(&log)
    );
    assert_eq!(read(&serial2), "");
    state[40] ^= 0xff;
    std::fs::write(&spath, &state).unwrap();

    // A blk backend without DEVICE_STATE (block-file) cannot take the RAM disk.
    let img = dir.join("other.img");
    let _ = std::fs::remove_file(&img);
    let file = Backend::block_file(&dir, &img, 8 << 20);
    let st = wait(restore(&snap, &file.socket, &serial2, &log), &serial2, &log);
    assert_eq!(st.code(), Some(1), "{}", read(&log));
    assert!(
        read(&log).contains("the backend refused its saved state"),
        "{}",
        read(&log)
    );
    assert_eq!(read(&serial2), "");
    drop(file);

    // The mailbox written into the saved disk, checksums renewed.
    let at = 32 + 1000 * 512;
    state[at..at + 4].copy_from_slice(b"GO!!");
    std::fs::write(&spath, &state).unwrap();
    if let Some(s) = m.devices[0].state.as_mut() {
        s.crc32 = crc32(&state);
    }
    let text = serde_json::to_vec_pretty(&m).unwrap();
    std::fs::write(&mpath, &text).unwrap();
    std::fs::write(
        snap.join("manifest.crc32"),
        format!("{:08x}\n", crc32(&text)),
    )
    .unwrap();

    // A fresh, empty RAM disk process (the refusals above may have left it disconnected).
    fresh.restart();
    let st = wait(
        restore(&snap, &fresh.socket, &serial2, &log),
        &serial2,
        &log,
    );
    let log_text = read(&log);
    assert!(st.success(), "{log_text}");
    assert!(log_text.contains("backend state loaded"), "{log_text}");
    let after = read(&serial2);
    // GO!! came through the state; the sectors written before the snapshot read back from the
    // new process, those written after it too; every request completed once.
    assert!(
        after.starts_with(&format!("go\n{half}\nall sectors ok, used idx 0x")),
        "{after:?} {log_text}"
    );
}
