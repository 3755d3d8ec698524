//! End-to-end: ACPI hot-plug with Linux's own drivers. A guest booted with no disk and an API
//! socket gets a `hype block-file` disk through `POST /vm/devices`: the GED's DEVICE_CHECK
//! makes Linux enumerate the slot's LNRO0005 node, virtio-mmio binds it and `/dev/vda` appears
//! with the host's size and bytes. `DELETE /vm/devices/ID` asks the guest to release it
//! (EJECT_REQUEST, which Linux 6.1 declines for this node: the guest unbinds the driver, as
//! hype's docs tell a guest to), the VMM frees the slot and the backend serves again; a second
//! add (a fresh slot) is enumerated on its own and reads the same bytes.
//!
//! Needs the artefacts from `scripts/test` (HYPE_GUEST_*); without them the test says SKIPPED.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::path::Path;
use std::time::Duration;

use common::{work_dir, Backend};
use hype_api::model::DeviceInfo;
use hype_ctl::client::Client;
use hype_testkit::guest::{GuestArtifacts, GuestVm, VmOptions};
use reqwest::Method;

const BOOT: Duration = Duration::from_secs(400);
const STEP: Duration = Duration::from_secs(180);
const TEXT: &str = "hype-hotplug-disk: host bytes ok";
const SIZE: u64 = 8 << 20;

fn hype() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hype"))
}

fn client(api: &Path) -> Client {
    Client::new(api, Duration::from_secs(30)).unwrap()
}

fn add(api: &Path, socket: &Path) -> DeviceInfo {
    let body = serde_json::json!({ "socket": socket });
    let a = client(api)
        .call(Method::POST, "/vm/devices", Some(&body))
        .unwrap();
    serde_json::from_slice(&a.body).unwrap()
}

/// Waits in the guest for /dev/vda and prints its size in sectors and its first bytes.
const WAIT_VDA: &str = "for i in $(seq 200); do [ -b /dev/vda ] && break; sleep 0.1; done; \
     cat /sys/block/vda/size && head -c 32 /dev/vda && echo";

#[test]
fn linux_hot_add_remove_and_re_add_a_disk() {
    let Some(art) = GuestArtifacts::from_env_or_skip("linux_hotplug") else {
        return;
    };
    let dir = work_dir("linux-hotplug");
    let image = dir.join("disk.img");
    let mut bytes: Vec<u8> = (0..SIZE as usize).map(|i| (i % 253) as u8).collect();
    bytes[..TEXT.len()].copy_from_slice(TEXT.as_bytes());
    std::fs::write(&image, &bytes).unwrap();
    let mut disk = Backend::block_file(&dir, &image, SIZE);
    let api = dir.join("api.sock");
    let _ = std::fs::remove_file(&api);
    let opts = VmOptions::new(&art.vmlinux, &art.initramfs)
        .arg("--api-socket")
        .arg(api.to_str().unwrap());
    let mut vm = GuestVm::boot(hype(), &opts).unwrap();
    vm.wait_ready(BOOT).unwrap();
    assert_eq!(
        vm.check("ls /sys/block | grep -c vd || true", STEP)
            .unwrap(),
        "0"
    );

    // Hot-add into slot 0: the guest enumerates the node and reads the host's bytes.
    let d = add(&api, &disk.socket);
    assert_eq!((d.id.as_str(), d.kind.as_str()), ("virtio0", "blk"));
    let seen = vm.check(WAIT_VDA, STEP).unwrap();
    assert_eq!(seen, format!("{}\n{TEXT}", SIZE >> 9), "{}", vm.log());
    let parent = vm
        .check(
            "basename $(dirname $(readlink -f /sys/block/vda/device))",
            STEP,
        )
        .unwrap();
    assert_eq!(parent, "LNRO0005:00");

    // Hot-remove: the API waits for the guest; the guest lets the driver go.
    let api2 = api.clone();
    let removal = std::thread::spawn(move || {
        client(&api2)
            .call(Method::DELETE, "/vm/devices/virtio0", None)
            .map(|a| a.status)
    });
    std::thread::sleep(Duration::from_millis(500));
    vm.check(
        "echo LNRO0005:00 > /sys/bus/platform/drivers/virtio-mmio/unbind",
        STEP,
    )
    .unwrap();
    assert_eq!(removal.join().unwrap().unwrap(), 204);
    assert_eq!(
        vm.check("ls /dev | grep -c '^vd' || true", STEP).unwrap(),
        "0"
    );
    let info = client(&api).info().unwrap();
    assert!(info.devices.is_empty(), "{:?}", info.devices);
    // The request reached the guest's ACPI (Linux 6.1 declines the ejection itself).
    let dmesg = vm.check("dmesg | grep -i eject || true", STEP).unwrap();
    assert!(dmesg.contains("LNRO0005:00: Eject disabled"), "{dmesg}");
    assert!(disk.alive());

    // Re-add: a fresh slot, enumerated on its own, the same bytes.
    let again = add(&api, &disk.socket);
    assert_eq!(again.id, "virtio1");
    let seen = vm.check(WAIT_VDA, STEP).unwrap();
    assert_eq!(seen, format!("{}\n{TEXT}", SIZE >> 9), "{}", vm.log());
    let host = std::process::Command::new("md5sum")
        .arg(&image)
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    let host_md5 = host.split_whitespace().next().unwrap();
    let md5 = vm.check("md5sum /dev/vda | cut -d' ' -f1", STEP).unwrap();
    assert_eq!(md5, host_md5);
    let st = vm.poweroff(STEP).unwrap();
    assert_eq!(st.code(), Some(0), "{}", vm.log());
    disk.kill();
}
