//! End to end on KVM: a tiny guest drives a virtio-blk backend process through the virtio-mmio
//! transport; queue notifications never reach the VMM (ioeventfd); the backend is killed and
//! restarted in the middle of a run.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{assemble, flat, symbol, work_dir, Backend};
use hype_fixups::FixupMode;
use hype_vmm::config::{DeviceSpec, SerialSpec};
use hype_vmm::virtio::{DeviceType, WaitLimit};
use hype_vmm::vm::{self, BootImage, RawMode, VmConfig, VmEnd};

const LOAD: u64 = 0x10_0000;

fn guest(mailbox: bool) -> Vec<u8> {
    let elf = assemble("virtio_blk", LOAD);
    let mut code = flat(&elf);
    let off = (symbol(&elf, "mailbox") - LOAD) as usize;
    code[off] = u8::from(mailbox);
    code
}

fn config(code: Vec<u8>, socket: &Path, serial: &Path) -> VmConfig {
    let _ = std::fs::remove_file(serial);
    let mut dev = DeviceSpec::new(socket);
    dev.wait = Some(WaitLimit::For(Duration::from_secs(20)));
    VmConfig {
        image: BootImage::Raw {
            code,
            load_addr: LOAD,
            entry: LOAD,
            mode: RawMode::Long,
        },
        memory: 64 << 20,
        cpus: 1,
        serial: SerialSpec::File(serial.to_owned()),
        devices: vec![dev],
        fixups: FixupMode::Auto,
        api_socket: None,
        platform: Default::default(),
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

const DOTS: &str = "................................................................";

#[test]
fn guest_writes_and_reads_sectors_without_notify_exits() {
    let dir = work_dir("vk_basic");
    let backend = Backend::block_mem(&dir, "8M");
    let serial = dir.join("serial.txt");
    let t = Instant::now();
    let r = vm::run(&config(guest(false), &backend.socket, &serial)).expect("vm runs");
    eprintln!("192 requests in {:?}; MMIO exits {:?}", t.elapsed(), r.mmio);
    assert_eq!(
        read(&serial),
        format!("virtio-blk guest\ncapacity 0x4000\n{DOTS}\nall sectors ok, used idx 0xc0\n")
    );
    assert_eq!(r.end, VmEnd::Reset);
    assert_eq!(
        r.mmio.notifies, 0,
        "QueueNotify reached the VMM: {:?}",
        r.mmio
    );
    assert!(r.mmio.writes > 10, "{:?}", r.mmio);
    assert_eq!(r.mmio.unclaimed, 0);
    assert_eq!(r.devices.len(), 1);
    let d = &r.devices[0];
    assert_eq!(d.kind, DeviceType::Block);
    assert_eq!((d.ring_starts, d.reconnects, d.guest_errors), (1, 0, 0));
    assert_eq!(d.status, 0xf);
}

#[test]
fn backend_killed_and_restarted_mid_run() {
    let dir = work_dir("vk_restart");
    let img = dir.join("disk.img");
    let _ = std::fs::remove_file(&img);
    let mut backend = Backend::block_file(&dir, &img, 8 << 20);
    let serial = dir.join("serial.txt");
    let cfg = config(guest(true), &backend.socket, &serial);
    let vm = std::thread::spawn(move || vm::run(&cfg));

    // The guest prints "waiting" after 32 sectors and then polls sector 1000.
    let t = Instant::now();
    while !read(&serial).contains("waiting") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "guest never got to the mailbox: {:?}",
            read(&serial)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(50));
    backend.kill();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !read(&serial).contains("go"),
        "guest went on without a backend"
    );
    let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.seek(SeekFrom::Start(1000 * 512)).unwrap();
    f.write_all(b"GO!!").unwrap();
    f.sync_all().unwrap();
    backend.restart();

    let r = vm.join().unwrap().expect("vm runs");
    let out = read(&serial);
    let half = &DOTS[..32];
    let prefix = format!(
        "virtio-blk guest\ncapacity 0x4000\n{half}\nwaiting\ngo\n{half}\nall sectors ok, used idx 0x"
    );
    assert!(out.starts_with(&prefix), "{out:?}");
    assert!(out.ends_with('\n'));
    assert_eq!(r.end, VmEnd::Reset);
    assert_eq!(r.mmio.notifies, 0, "{:?}", r.mmio);
    let d = &r.devices[0];
    assert_eq!(d.reconnects, 1);
    assert_eq!(d.ring_starts, 2);
    assert_eq!(d.guest_errors, 0);
}

/// Completions reach the guest only as interrupts: the backend writes the call eventfd, KVM's
/// irqfd raises IRQ 5 through the PIC, and InterruptStatus reports a used-buffer interrupt.
#[test]
fn completions_arrive_as_interrupts_through_the_pic() {
    let dir = work_dir("vk_irq");
    let backend = Backend::block_mem(&dir, "1M");
    let serial = dir.join("serial.txt");
    let elf = assemble("virtio_blk_irq", LOAD);
    let cfg = config(flat(&elf), &backend.socket, &serial);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(vm::run(&cfg));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("guest hangs: {:?}", read(&serial)))
        .expect("vm runs");
    let out = read(&serial);
    // Eight sequential requests; the guest sleeps in hlt until each completes, so it only
    // finishes if the interrupts come. Edge interrupts may coalesce (a completion can also
    // land before the guest sleeps), so count at least one, each with the used-buffer bit.
    let (n, v) = out
        .strip_prefix("interrupts 0x")
        .and_then(|s| s.strip_suffix("\nirq ok\n"))
        .and_then(|s| s.split_once(", vring 0x"))
        .unwrap_or_else(|| panic!("{out:?}"));
    let n = u64::from_str_radix(n, 16).unwrap();
    assert!((1..=8).contains(&n), "{out:?}");
    assert_eq!(n, u64::from_str_radix(v, 16).unwrap(), "{out:?}");
    assert_eq!(r.end, VmEnd::Reset);
    assert_eq!(r.mmio.notifies, 0);
}
