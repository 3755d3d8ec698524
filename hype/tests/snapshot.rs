//! Snapshot and restore with tiny guests: a counting guest is paused, snapshotted through the
//! control API (and `hype ctl snapshot`), stopped, and restored in a new `hype vmm` process,
//! where its count goes on from the tick after the last one printed (not from 1); and snapshots
//! that are truncated, corrupted, from another format or hype version, from another CPU, or
//! restored with the wrong devices are refused with their reason before the guest runs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{assemble, work_dir};
use hype_api::model::SnapshotReply;
use hype_ctl::client::{Client, ClientError};
use hype_vmm::snapshot::{crc::crc32, Manifest};
use reqwest::Method;

struct Vm {
    child: Child,
    api: PathBuf,
    serial: PathBuf,
    stderr: PathBuf,
}

impl Vm {
    /// `hype vmm` with an API socket and the serial console in `dir`, plus `args`.
    fn start(dir: &Path, args: &[&str]) -> Vm {
        std::fs::create_dir_all(dir).unwrap();
        let api = dir.join("api.sock");
        let serial = dir.join("serial.out");
        let stderr = dir.join("stderr.log");
        let _ = std::fs::remove_file(&serial);
        let _ = std::fs::remove_file(&api);
        let child = Command::new(env!("CARGO_BIN_EXE_hype"))
            .arg("vmm")
            .args(args)
            .arg(format!("--serial=file:{}", serial.display()))
            .arg("--api-socket")
            .arg(&api)
            .env("HYPE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let vm = Vm {
            child,
            api,
            serial,
            stderr,
        };
        wait_until(Duration::from_secs(20), "API socket", || vm.api.exists());
        vm
    }

    fn client(&self) -> Client {
        Client::new(&self.api, Duration::from_secs(30)).unwrap()
    }

    fn post(&self, path: &str) -> u16 {
        self.client().call(Method::POST, path, None).unwrap().status
    }

    fn snapshot(&self, dir: &Path) -> Result<SnapshotReply, ClientError> {
        let body = serde_json::json!({ "dir": dir.to_str().unwrap() });
        let a = self
            .client()
            .call(Method::PUT, "/vm/snapshot", Some(&body))?;
        Ok(serde_json::from_slice(&a.body).unwrap())
    }

    fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn wait_for_lines(&self, n: usize) {
        wait_until(Duration::from_secs(30), "guest ticks", || {
            self.serial_text().matches('\n').count() >= n
        });
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn stop(&mut self) {
        assert_eq!(self.post("/vm/stop"), 202);
        let t = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(t.elapsed() < Duration::from_secs(20), "{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what} not seen within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The ticks in `text`: every complete line must be `Txxxxxxxx`.
fn ticks(text: &str) -> Vec<u32> {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .lines()
        .map(|l| {
            let hex = l.strip_prefix('T').unwrap_or_else(|| panic!("line {l:?}"));
            u32::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("line {l:?}"))
        })
        .collect()
}

/// Runs the counting guest, snapshots it paused, stops it; returns the snapshot directory and
/// what the guest printed before it.
fn take_snapshot(name: &str) -> (PathBuf, String) {
    let dir = work_dir(&format!("snapshot-{name}"));
    let elf = assemble("snap_count", 0x20_0000);
    // The confined VMM writes snapshots only beneath a --sandbox-allow directory.
    let mut vm = Vm::start(
        &dir.join("first"),
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--memory",
            "64M",
            "--sandbox-allow",
            dir.to_str().unwrap(),
        ],
    );
    vm.wait_for_lines(3);
    // A running VM is not snapshotted.
    let snap = dir.join("snap");
    let _ = std::fs::remove_dir_all(&snap);
    match vm.snapshot(&snap) {
        Err(ClientError::Status { status: 409, .. }) => {}
        other => panic!("snapshot of a running VM: {other:?}"),
    }
    assert!(!snap.exists());
    assert_eq!(vm.post("/vm/pause"), 200);
    let reply = vm.snapshot(&snap).unwrap();
    assert_eq!(reply.dir, snap.to_str().unwrap());
    assert!(reply.memory_pages >= 2, "{reply:?}");
    // A tiny guest touches a few pages of its 64 MiB: the file is sparse.
    assert!(reply.memory_bytes_written < 1 << 20, "{reply:?}");
    // A second snapshot into the same directory is refused.
    match vm.snapshot(&snap) {
        Err(ClientError::Status {
            status: 409,
            message,
        }) => {
            assert!(message.contains("not empty"), "{message}")
        }
        other => panic!("snapshot into a full directory: {other:?}"),
    }
    vm.stop();
    let before = vm.serial_text();
    (snap, before)
}

fn shared_snapshot() -> &'static (PathBuf, String) {
    static SNAP: OnceLock<(PathBuf, String)> = OnceLock::new();
    SNAP.get_or_init(|| take_snapshot("shared"))
}

#[test]
fn restored_guest_continues_counting_where_it_stopped() {
    let (snap, before) = take_snapshot("continue");
    let first = ticks(&before);
    assert!(first.len() >= 3, "{before:?}");
    let dir = work_dir("snapshot-continue").join("restored");
    let snap_s = snap.to_str().unwrap();
    let vm = Vm::start(&dir, &["--restore", snap_s]);
    vm.wait_for_lines(3);
    let after = vm.serial_text();
    // The two outputs together are one unbroken count from 1: the restored guest went on with
    // the very next tick (finishing a line cut by the pause), never starting over.
    let all = ticks(&(before.clone() + &after));
    let expected: Vec<u32> = (1..=all.len() as u32).collect();
    assert_eq!(all, expected, "before: {before:?} after: {after:?}");
    assert!(all.len() >= first.len() + 2);
    assert!(
        !after.starts_with("T00000001"),
        "the restored guest started over: {after:?}"
    );
    assert!(vm.log().contains("restored from"), "{}", vm.log());
    // The same snapshot restores again, into another VM: it is not consumed.
    let vm2 = Vm::start(&dir.join("again"), &["--restore", snap_s]);
    vm2.wait_for_lines(2);
    let again = ticks(&(before.clone() + &vm2.serial_text()));
    assert_eq!(again, (1..=again.len() as u32).collect::<Vec<_>>());
}

#[test]
fn ctl_snapshot_writes_a_restorable_snapshot() {
    let dir = work_dir("snapshot-ctl");
    let elf = assemble("snap_count", 0x20_0000);
    let allowed = dir.join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    let mut vm = Vm::start(
        &dir.join("first"),
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--memory",
            "64M",
            "--sandbox-allow",
            allowed.to_str().unwrap(),
        ],
    );
    vm.wait_for_lines(2);
    let snap = allowed.join("snap");
    let _ = std::fs::remove_dir_all(&snap);
    // Outside the --sandbox-allow directories the confined VMM cannot write: refused, and
    // the VM goes on.
    let outside = dir.join("outside");
    let _ = std::fs::remove_dir_all(&outside);
    let ctl = |verb: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hype"))
            .args(["ctl", "--api-socket", vm.api.to_str().unwrap()])
            .args(verb)
            .output()
            .unwrap()
    };
    assert!(ctl(&["pause"]).status.success());
    let out = ctl(&["snapshot", outside.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(!outside.exists());
    let out = ctl(&["snapshot", snap.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with(&format!("snapshot in {}", snap.display())),
        "{text}"
    );
    vm.stop();
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(snap.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m.magic, "hype-snapshot");
    assert_eq!(m.memory_bytes, 64 << 20);
    assert_eq!(m.cpus, 1);
    let restored = Vm::start(
        &dir.join("restored"),
        &["--restore", snap.to_str().unwrap()],
    );
    restored.wait_for_lines(1);
}

/// A copy of the shared snapshot in a directory of its own, changed by `spoil`; returns the
/// restore's exit code and stderr.
fn restore_spoiled(name: &str, spoil: impl FnOnce(&Path), extra: &[&str]) -> (Option<i32>, String) {
    let (snap, _) = shared_snapshot();
    let dir = work_dir(&format!("snapshot-bad-{name}"));
    let copy = dir.join("snap");
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(&copy).unwrap();
    for e in std::fs::read_dir(snap).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    spoil(&copy);
    let serial = dir.join("serial.out");
    let _ = std::fs::remove_file(&serial);
    let out = Command::new(env!("CARGO_BIN_EXE_hype"))
        .args(["vmm", "--restore", copy.to_str().unwrap()])
        .arg(format!("--serial=file:{}", serial.display()))
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    // Refused before the guest ran: it printed nothing.
    assert_eq!(std::fs::read(&serial).unwrap_or_default(), b"", "{name}");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Rewrites the manifest through `f` and gives it a matching checksum.
fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut v);
    let text = serde_json::to_vec_pretty(&v).unwrap();
    std::fs::write(&path, &text).unwrap();
    std::fs::write(
        dir.join("manifest.crc32"),
        format!("{:08x}\n", crc32(&text)),
    )
    .unwrap();
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

fn assert_refused(r: (Option<i32>, String), reason: &str) {
    let (code, stderr) = r;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(reason), "expected {reason:?} in {stderr:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn truncated_memory_is_refused() {
    let r = restore_spoiled(
        "truncated",
        |d| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("memory.bin"))
                .unwrap();
            f.set_len(32 << 20).unwrap();
        },
        &[],
    );
    assert_refused(
        r,
        "memory.bin has 33554432 bytes, the manifest says 67108864: truncated",
    );
}

#[test]
fn corrupted_memory_is_refused() {
    // The guest's code page (linked at 2 MiB) is in the snapshot.
    let r = restore_spoiled(
        "memory",
        |d| flip_byte(&d.join("memory.bin"), 0x20_0010),
        &[],
    );
    assert_refused(r, "memory.bin is corrupted");
}

#[test]
fn corrupted_state_is_refused() {
    let r = restore_spoiled("state", |d| flip_byte(&d.join("state.bin"), 20), &[]);
    assert_refused(r, "state.bin is corrupted");
}

#[test]
fn truncated_state_is_refused() {
    let r = restore_spoiled(
        "state-cut",
        |d| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("state.bin"))
                .unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len - 100).unwrap();
        },
        &[],
    );
    assert_refused(r, "state.bin has");
}

#[test]
fn corrupted_manifest_is_refused() {
    let r = restore_spoiled(
        "manifest",
        |d| {
            let p = d.join("manifest.json");
            let t = std::fs::read_to_string(&p)
                .unwrap()
                .replace("\"cpus\": 1", "\"cpus\": 2");
            std::fs::write(&p, t).unwrap();
        },
        &[],
    );
    assert_refused(r, "manifest.json is corrupted");
}

#[test]
fn missing_manifest_is_refused() {
    let r = restore_spoiled(
        "no-manifest",
        |d| std::fs::remove_file(d.join("manifest.json")).unwrap(),
        &[],
    );
    assert_refused(r, "is not a snapshot (no manifest.json)");
}

#[test]
fn other_format_version_is_refused() {
    let r = restore_spoiled(
        "format",
        |d| edit_manifest(d, |v| v["format_version"] = 99.into()),
        &[],
    );
    assert_refused(r, "format version 99; this hype reads version 1");
}

#[test]
fn other_hype_version_is_refused() {
    let r = restore_spoiled(
        "version",
        |d| edit_manifest(d, |v| v["hype_version"] = "0.0.1-other".into()),
        &[],
    );
    assert_refused(r, "taken by hype 0.0.1-other; this is hype");
}

#[test]
fn other_cpu_is_refused() {
    let r = restore_spoiled(
        "cpu",
        |d| edit_manifest(d, |v| v["host_cpu"]["signature"] = 0x12345.into()),
        &[],
    );
    assert_refused(
        r,
        "taken on another CPU (family/model/stepping: snapshot 0x12345",
    );
    let r = restore_spoiled(
        "vendor",
        |d| edit_manifest(d, |v| v["host_cpu"]["vendor"] = "OtherVendor1".into()),
        &[],
    );
    assert_refused(r, "taken on another CPU (vendor: snapshot OtherVendor1");
}

#[test]
fn wrong_devices_are_refused() {
    let r = restore_spoiled("devices", |_| {}, &["--device", "/nonexistent/disk.sock"]);
    assert_refused(r, "the snapshot has 0 device(s), 1 given with --device");
}

#[test]
fn hype_run_restores_a_snapshot() {
    let (snap, before) = take_snapshot("run");
    let dir = work_dir("snapshot-run");
    let serial = dir.join("serial.out");
    let api = dir.join("api.sock");
    let _ = std::fs::remove_file(&serial);
    let _ = std::fs::remove_file(&api);
    let mut child = Command::new(env!("CARGO_BIN_EXE_hype"))
        .args(["run", "--restore", snap.to_str().unwrap()])
        .arg(format!("--serial=file:{}", serial.display()))
        .arg("--api-socket")
        .arg(&api)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "restored guest ticks", || {
        std::fs::read_to_string(&serial)
            .unwrap_or_default()
            .matches('\n')
            .count()
            >= 2
    });
    let after = std::fs::read_to_string(&serial).unwrap();
    let all = ticks(&(before.clone() + &after));
    assert_eq!(all, (1..=all.len() as u32).collect::<Vec<_>>(), "{after:?}");
    let client = Client::new(&api, Duration::from_secs(10)).unwrap();
    assert_eq!(
        client.call(Method::POST, "/vm/stop", None).unwrap().status,
        202
    );
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    // `hype run --print-commands` shows the VMM getting the snapshot and no kernel.
    let out = Command::new(env!("CARGO_BIN_EXE_hype"))
        .args([
            "run",
            "--restore",
            snap.to_str().unwrap(),
            "--print-commands",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("--restore"), "{text}");
    assert!(!text.contains("--kernel"), "{text}");
}
