//! Snapshot and restore of the real Linux test guest: booted with a block-file disk, it makes a
//! file system and writes files (on the disk and in RAM), is paused, snapshotted and stopped;
//! a new `hype vmm --restore` process with a new backend on the disk continues it: the agent
//! answers, both files read back with the same md5, and new writes land in the image. The same
//! snapshot is then restored a second time into another VM with its own copy of the disk.
//! Prints the cold boot time to the agent, the snapshot's size and time, and the restore time
//! to the agent's first answer (docs/benchmarks.md).
//!
//! For the benchmark's larger guest, `HYPE_SNAPSHOT_BENCH_MEMORY` (default 256M) sets the
//! guest's memory and `HYPE_SNAPSHOT_BENCH_TOUCH_MIB=N` makes the guest touch N MiB more
//! before the snapshot: the disk's first N MiB are filled with pseudo-random bytes on the
//! host and read once in the guest (`dd` of `/dev/vda`), which leaves them in its page cache.
//!
//! Needs the artefacts from `scripts/test` (HYPE_GUEST_*); without them the test says SKIPPED.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{work_dir, Backend};
use hype_api::model::SnapshotReply;
use hype_ctl::client::Client;
use hype_testkit::guest::{GuestArtifacts, GuestVm, VmOptions};
use reqwest::Method;

const BOOT: Duration = Duration::from_secs(400);
const STEP: Duration = Duration::from_secs(180);

/// The hype that runs the VMs: this build's, or `HYPE_SNAPSHOT_BENCH_BIN` (e.g.
/// `target/release/hype`, for the numbers in docs/benchmarks.md; the backends stay this
/// build's).
fn hype() -> std::path::PathBuf {
    std::env::var_os("HYPE_SNAPSHOT_BENCH_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_hype").into())
}

/// `HYPE_SNAPSHOT_BENCH_MEMORY` and `HYPE_SNAPSHOT_BENCH_TOUCH_MIB` (see the file's doc).
fn bench_shape() -> (String, u64) {
    let memory = std::env::var("HYPE_SNAPSHOT_BENCH_MEMORY").unwrap_or_else(|_| "256M".into());
    let touch = std::env::var("HYPE_SNAPSHOT_BENCH_TOUCH_MIB")
        .map(|v| {
            v.parse()
                .expect("HYPE_SNAPSHOT_BENCH_TOUCH_MIB: a number of MiB")
        })
        .unwrap_or(0);
    (memory, touch)
}

/// A disk image of at least 32 MiB whose first `touch_mib` MiB hold pseudo-random bytes
/// (xorshift: incompressible for the snapshot's zero-page check, cheap to make).
fn make_image(path: &Path, touch_mib: u64) {
    let size = (32u64 << 20).max((touch_mib + 8) << 20);
    let mut f = std::fs::File::create(path).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..touch_mib {
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        std::io::Write::write_all(&mut f, &chunk).unwrap();
    }
    f.set_len(size).unwrap();
}

fn image_contains(img: &Path, needle: &[u8]) -> bool {
    let data = std::fs::read(img).unwrap();
    data.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn linux_guest_restored_in_a_new_process_keeps_its_files_and_disk() {
    let Some(art) = GuestArtifacts::from_env_or_skip("linux_snapshot") else {
        return;
    };
    let dir = work_dir("linux-snapshot");
    let image = dir.join("disk.img");
    let (memory, touch_mib) = bench_shape();
    make_image(&image, touch_mib);
    let mut disk = Backend::block_file(&dir, &image, 32 << 20);
    let sock = disk.socket.to_str().unwrap().to_owned();
    let api = dir.join("api.sock");
    let _ = std::fs::remove_file(&api);
    let opts = VmOptions::new(&art.vmlinux, &art.initramfs)
        .memory(&memory)
        .device(&sock)
        .arg("--api-socket")
        .arg(api.to_str().unwrap())
        .arg("--sandbox-allow")
        .arg(dir.to_str().unwrap());
    let mut vm = GuestVm::boot(&hype(), &opts).unwrap();
    vm.wait_ready(BOOT).unwrap();
    let cold = vm.ready_after.unwrap();
    if touch_mib > 0 {
        let t = Instant::now();
        vm.check(
            &format!("dd if=/dev/vda of=/dev/null bs=1M count={touch_mib} 2>/dev/null"),
            STEP,
        )
        .unwrap();
        eprintln!(
            "guest read {touch_mib} MiB of its disk in {:?}",
            t.elapsed()
        );
    }
    vm.check("mke2fs -q /dev/vda && mount -t ext2 /dev/vda /mnt", STEP)
        .unwrap();
    vm.check(
        "echo 'written before the snapshot' > /mnt/note && dd if=/dev/urandom of=/mnt/blob bs=1k count=256 2>/dev/null && echo ram-file-4711 > /tmp/ram-note && sync",
        STEP,
    )
    .unwrap();
    let sum = vm.check("md5sum /mnt/blob | cut -d' ' -f1", STEP).unwrap();
    // What one agent command costs in the booted guest (to compare with the restored one's).
    let cold_cmds = timed_commands(&mut vm);
    let t = Instant::now();
    vm.ping(STEP).unwrap();
    let cold_ping = t.elapsed();

    let client = Client::new(&api, Duration::from_secs(60)).unwrap();
    assert_eq!(
        client.call(Method::POST, "/vm/pause", None).unwrap().status,
        200
    );
    let snap = dir.join("snap");
    let _ = std::fs::remove_dir_all(&snap);
    let body = serde_json::json!({ "dir": snap.to_str().unwrap() });
    let t = Instant::now();
    let a = client
        .call(Method::PUT, "/vm/snapshot", Some(&body))
        .unwrap();
    let snap_wall = t.elapsed();
    let reply: SnapshotReply = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(
        client.call(Method::POST, "/vm/stop", None).unwrap().status,
        202
    );
    assert!(vm.wait_exit(STEP).unwrap().success(), "{}", vm.log());
    assert!(!vm.log().contains("KVM refused"), "{}", vm.log());
    drop(vm);
    // The second VM gets the disk as it was at the snapshot.
    let image2 = dir.join("disk2.img");
    std::fs::copy(&image, &image2).unwrap();

    disk.restart();
    let t = Instant::now();
    let mut r = GuestVm::restore(&hype(), &snap, std::slice::from_ref(&sock), &[]).unwrap();
    r.ping(STEP).unwrap();
    let to_ping = t.elapsed();
    assert_eq!(r.check("cat /tmp/ram-note", STEP).unwrap(), "ram-file-4711");
    let to_agent = t.elapsed();
    let restored_cmds = timed_commands(&mut r);
    assert_eq!(
        r.check("cat /mnt/note", STEP).unwrap(),
        "written before the snapshot"
    );
    assert_eq!(
        r.check("md5sum /mnt/blob | cut -d' ' -f1", STEP).unwrap(),
        sum
    );
    r.check(
        "echo 'written after restore one' > /mnt/after && sync",
        STEP,
    )
    .unwrap();
    r.check("umount /mnt", STEP).unwrap();
    assert!(r.poweroff(STEP).unwrap().success(), "{}", r.log());
    assert!(r.log().contains("restored from"), "{}", r.log());
    let restored_line = r
        .log()
        .lines()
        .find(|l| l.contains("restored from"))
        .map(|l| l.rsplit(" in ").next().unwrap_or_default().to_owned())
        .unwrap_or_default();
    // PVM's KVM took every piece of state (docs/snapshot.md says so).
    assert!(!r.log().contains("KVM refused"), "{}", r.log());
    assert!(image_contains(&image, b"written after restore one"));
    drop(disk);

    // The same snapshot again, into a VM with its own copy of the disk.
    let disk2 = Backend::block_file(&dir, &image2, 32 << 20);
    let t = Instant::now();
    let mut r2 = GuestVm::restore(
        &hype(),
        &snap,
        &[disk2.socket.to_str().unwrap().to_owned()],
        &[],
    )
    .unwrap();
    r2.ping(STEP).unwrap();
    let to_ping2 = t.elapsed();
    assert_eq!(
        r2.check("cat /tmp/ram-note", STEP).unwrap(),
        "ram-file-4711"
    );
    let to_agent2 = t.elapsed();
    assert_eq!(
        r2.check("md5sum /mnt/blob | cut -d' ' -f1", STEP).unwrap(),
        sum
    );
    assert_eq!(
        r2.run("cat /mnt/after", STEP).unwrap().rc,
        1,
        "the second VM sees the first one's write"
    );
    r2.check(
        "echo 'written after restore two' > /mnt/after2 && sync && umount /mnt",
        STEP,
    )
    .unwrap();
    assert!(r2.poweroff(STEP).unwrap().success(), "{}", r2.log());
    assert!(image_contains(&image2, b"written after restore two"));
    assert!(!image_contains(&image2, b"written after restore one"));

    let mem_file = std::fs::metadata(snap.join("memory.bin")).unwrap();
    eprintln!(
        "BENCH linux-snapshot: cold boot to agent {:.2} s; snapshot {:.1} ms (VMM {} ms), \
         {} pages = {:.1} MiB of {} written ({:.1} MiB on disk); restore to agent answer \
         {:.3} s, second restore {:.3} s; restore to PING answer {:.3} s, second {:.3} s \
         (booted guest: PING {:.3} s); agent commands (cat, cat, builtin echo) booted {:?} ms, \
         restored {:?} ms; restored VMM: {}",
        cold.as_secs_f64(),
        snap_wall.as_secs_f64() * 1000.0,
        reply.took_ms,
        reply.memory_pages,
        reply.memory_bytes_written as f64 / (1 << 20) as f64,
        memory,
        std::os::unix::fs::MetadataExt::blocks(&mem_file) as f64 * 512.0 / (1 << 20) as f64,
        to_agent.as_secs_f64(),
        to_agent2.as_secs_f64(),
        to_ping.as_secs_f64(),
        to_ping2.as_secs_f64(),
        cold_ping.as_secs_f64(),
        cold_cmds,
        restored_cmds,
        restored_line
    );
}

/// The wall time of three agent commands in a row: `cat` twice (a fork and an exec each),
/// then a builtin `echo` (the agent's subshell fork only), in ms.
fn timed_commands(vm: &mut GuestVm) -> [u128; 3] {
    let mut ms = [0u128; 3];
    for (i, cmd) in [
        "cat /tmp/ram-note",
        "cat /tmp/ram-note",
        "echo ram-file-4711",
    ]
    .iter()
    .enumerate()
    {
        let t = Instant::now();
        assert_eq!(vm.check(cmd, STEP).unwrap(), "ram-file-4711");
        ms[i] = t.elapsed().as_millis();
    }
    ms
}
