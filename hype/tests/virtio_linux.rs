//! End to end with Linux: the test guest kernel finds a hype block backend through
//! `virtio_mmio.device=` on its command line, and its virtio-blk driver reads and writes it;
//! the backend is killed and restarted while the guest reads, and the read completes with the
//! right data.
//!
//! Needs the guest artefacts (`scripts/test` exports HYPE_GUEST_*); without them it says
//! SKIPPED. On PVM hosts a boot takes ~20 s of CPU.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::path::Path;
use std::time::Duration;

use common::{work_dir, Backend};
use hype_testkit::guest::{GuestArtifacts, GuestVm, VmOptions};

const BOOT: Duration = Duration::from_secs(400);
const STEP: Duration = Duration::from_secs(120);

fn hype() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hype"))
}

#[test]
fn linux_virtio_blk_reads_writes_and_survives_a_backend_restart() {
    let Some(art) = GuestArtifacts::from_env_or_skip("linux_virtio_blk") else {
        return;
    };
    let dir = work_dir("vl_blk");
    let img = dir.join("disk.img");
    let _ = std::fs::remove_file(&img);
    // 4 MiB with a marker the guest must read at offset 1 MiB.
    let mut data = vec![0u8; 4 << 20];
    data[1 << 20..(1 << 20) + 16].copy_from_slice(b"hype-disk-marker");
    std::fs::write(&img, &data).unwrap();
    let mut backend = Backend::block_file(&dir, &img, 4 << 20);
    // A second disk, with options, started after the VMM (which waits for it).
    let second = dir.join("second.sock");
    let _ = std::fs::remove_file(&second);
    let opts = VmOptions::new(&art.vmlinux, &art.initramfs)
        .memory("192M")
        .device(backend.socket.to_str().unwrap())
        .device(&format!(
            "socket={},type=blk,queue-size=64",
            second.display()
        ));
    let mut vm = GuestVm::boot(hype(), &opts).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let _second = Backend::start(&["block-mem", "--size", "2M"], &second);
    vm.wait_ready(BOOT).unwrap();
    assert!(
        vm.log().contains("waiting for backend socket"),
        "{}",
        vm.log()
    );
    assert_eq!(vm.check("cat /sys/block/vdb/size", STEP).unwrap(), "4096");
    // The devices come from the ACPI DSDT (one LNRO0005 each), not the kernel command line.
    assert!(
        !vm.check("cat /proc/cmdline", STEP)
            .unwrap()
            .contains("virtio_mmio.device="),
        "{}",
        vm.log()
    );
    let parents = vm
        .check(
            "for d in /sys/bus/virtio/devices/*; do readlink -f $d; done",
            STEP,
        )
        .unwrap();
    assert_eq!(parents.lines().count(), 2, "{parents}");
    assert!(
        parents.lines().all(|l| l.contains("/LNRO0005:")),
        "each device below an ACPI LNRO0005 node:\n{parents}"
    );
    assert_eq!(vm.check("cat /sys/block/vda/size", STEP).unwrap(), "8192");
    assert_eq!(
        vm.check(
            "dd if=/dev/vda bs=1M skip=1 count=1 2>/dev/null | head -c 16",
            STEP
        )
        .unwrap(),
        "hype-disk-marker"
    );
    vm.check(
        "echo guest-wrote-this | dd of=/dev/vda bs=512 seek=4000 conv=fsync 2>/dev/null; echo ok",
        STEP,
    )
    .unwrap();
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(&on_disk[4000 * 512..4000 * 512 + 16], b"guest-wrote-this");

    // Backend gone: the guest's direct read waits; backend back: it completes.
    backend.kill();
    let mut changed = on_disk;
    changed[3 << 20..(3 << 20) + 13].copy_from_slice(b"after-restart");
    std::fs::write(&img, &changed).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let restart = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        backend.restart();
        backend
    });
    let got = vm
        .check(
            "dd if=/dev/vda bs=1M skip=3 count=1 iflag=direct 2>/dev/null | head -c 13",
            STEP,
        )
        .unwrap();
    let _backend = restart.join().unwrap();
    assert_eq!(got, "after-restart", "{}", vm.log());
    let st = vm.poweroff(STEP).unwrap();
    assert_eq!(st.code(), Some(0), "{}", vm.log());
    assert!(vm.log().contains("is back after"), "{}", vm.log());
}
