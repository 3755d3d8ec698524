//! `--user`/`--group` (docs/sandbox.md): a backend and the VMM started as root with
//! `--user nobody` drop to uid/gid 65534 for good (all four ids, no supplementary groups, no
//! capabilities) once set up and still serve and boot a guest; `hype run --user nobody` runs
//! every child as nobody (restarted ones too) and the guest's disk I/O completes; an unknown
//! user, root, or `--group` without `--user` is a usage error (exit 2, one line).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;
mod run_support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assemble, work_dir};
use hype_testkit::sandbox::{check_runs_as, thread_modes, NOBODY, SECCOMP_MODE_FILTER};
use run_support::*;

const LIMIT: Duration = Duration::from_secs(60);

/// These tests start processes as root and check they stop being root.
fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIP: --user tests need root");
    }
    root
}

/// A fresh directory owned by nobody (as `hype run`'s runtime directory is with `--user`).
fn nobody_dir(name: &str) -> PathBuf {
    let d = fresh_dir(&work_dir("privileges"), name);
    std::os::unix::fs::chown(&d, Some(NOBODY), Some(NOBODY)).unwrap();
    d
}

fn wait_for(what: &str, log: &Path, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < LIMIT,
            "timed out waiting for {what}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every thread of `pid` runs as nobody and is confined.
fn wait_dropped_and_confined(pid: u32, what: &str) {
    let t = Instant::now();
    loop {
        let dropped = check_runs_as(pid, NOBODY, NOBODY);
        let threads = thread_modes(pid).unwrap_or_default();
        let confined =
            !threads.is_empty() && threads.iter().all(|t| t.seccomp == SECCOMP_MODE_FILTER);
        if dropped.is_ok() && confined {
            return;
        }
        assert!(
            t.elapsed() < LIMIT,
            "{what} (pid {pid}): {dropped:?}, threads {threads:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(args: &[&str], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_hype"))
        .args(args)
        .env("HYPE_LOG", "info")
        .env_remove("HYPE_SANDBOX")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn owner(p: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}

#[test]
fn backend_and_vmm_run_as_nobody() {
    if !is_root() {
        return;
    }
    let dir = nobody_dir("vmm");
    let sock = dir.join("mem.sock");
    let be_log = dir.join("backend.log");
    let s = sock.to_str().unwrap();
    let mut backend = spawn(
        &[
            "block-mem",
            "--size",
            "4M",
            "--socket",
            s,
            "--user",
            "nobody",
        ],
        &be_log,
    );
    wait_for("the backend's socket", &be_log, || sock.exists());
    wait_dropped_and_confined(backend.id(), "block-mem");
    // Bound as root, given to the user: the dropped VMM can connect.
    assert_eq!(owner(&sock), (NOBODY, NOBODY));

    let elf = assemble("count", 0x20_0000);
    let serial = dir.join("serial.txt");
    let vmm_log = dir.join("vmm.log");
    let serial_arg = format!("file:{}", serial.display());
    let mut vmm = spawn(
        &[
            "vmm",
            "--kernel",
            elf.to_str().unwrap(),
            "--memory",
            "64M",
            "--cpus",
            "2",
            "--serial",
            &serial_arg,
            "--device",
            s,
            "--user",
            "nobody",
        ],
        &vmm_log,
    );
    // The guest runs: it prints dots on COM1.
    wait_for("the guest's output", &vmm_log, || {
        std::fs::read_to_string(&serial).is_ok_and(|t| t.contains("..."))
    });
    wait_dropped_and_confined(vmm.id(), "hype vmm");
    let log = std::fs::read_to_string(&vmm_log).unwrap();
    assert!(
        log.contains("privileges dropped: uid 65534 gid 65534"),
        "{log}"
    );
    // The serial file is created after the drop, as nobody.
    assert_eq!(owner(&serial), (NOBODY, NOBODY));
    let names: Vec<String> = thread_modes(vmm.id())
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    for n in ["vcpu0", "vcpu1", "vu-virtio0"] {
        assert!(names.iter().any(|t| t == n), "{names:?}");
    }
    let _ = vmm.kill();
    let _ = vmm.wait();

    // SAFETY: kill(2) on the backend this test started.
    unsafe { libc::kill(backend.id() as i32, libc::SIGTERM) };
    let st = backend.wait().unwrap();
    let log = std::fs::read_to_string(&be_log).unwrap();
    assert!(st.success(), "{st}: {log}");
    // No longer root, it still removed its socket (its directory is the user's).
    assert!(!sock.exists(), "{log}");
}

#[test]
fn hype_run_runs_every_child_as_nobody() {
    if !is_root() {
        return;
    }
    let dir = fresh_dir(&work_dir("privileges"), "run");
    let elf = assemble("run_two_disks", 0x20_0000);
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    write_sector(&img, 0, b"HYPE");
    let img_spec = format!("file:{}", img.display());
    let console = format!("file:{}", dir.join("console.log").display());
    let mut run = Run::start(
        &dir,
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--memory",
            "64M",
            "--disk",
            &img_spec,
            "--disk",
            "mem:1M",
            "--console",
            &console,
            "--user",
            "nobody",
        ],
    );
    run.wait_for_output("waiting\n", LIMIT);
    let kids = run.children();
    assert_eq!(kids.len(), 4, "{kids:?}");
    for (pid, cmd) in &kids {
        assert!(cmd.contains(" --user 65534 --group 65534"), "{cmd}");
        wait_dropped_and_confined(*pid, cmd);
    }
    // The supervisor stays root: it restarts backends, which may need root to set up.
    assert!(check_runs_as(run.pid(), NOBODY, NOBODY).is_err());
    let rt = run.runtime_dir();
    assert_eq!(owner(&rt), (NOBODY, NOBODY));
    for s in ["disk0.sock", "disk1.sock", "console.sock"] {
        assert_eq!(owner(&rt.join(s)), (NOBODY, NOBODY), "{s}");
    }

    // A restarted backend drops too, and the dropped VMM reconnects to it.
    let (old, _) = kids
        .iter()
        .find(|(_, c)| c.contains(" block-file "))
        .unwrap()
        .clone();
    // SAFETY: kill(2) on the block-file backend hype run started for this test.
    unsafe { libc::kill(old as i32, libc::SIGKILL) };
    let new = wait_until(Duration::from_secs(20), "disk0 restarted", || {
        run.children()
            .into_iter()
            .find(|(p, c)| *p != old && c.contains(" block-file "))
            .map(|(p, _)| p)
    });
    wait_dropped_and_confined(new, "restarted block-file");
    wait_until(Duration::from_secs(20), "disk0 socket back", || {
        rt.join("disk0.sock").exists().then_some(())
    });

    write_sector(&img, 1, b"GO!!");
    let st = run.wait(LIMIT);
    assert_eq!(st.code(), Some(0), "stderr: {}", run.stderr());
    assert_eq!(read_sector(&img, 2, 4), b"DONE");
    assert!(run.stdout().contains("done"), "{}", run.stdout());
}

/// One line on stderr, exit code 2.
fn usage_error(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hype"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    err
}

#[test]
fn bad_users_and_groups_are_usage_errors() {
    let dir = work_dir("privileges");
    let s = dir.join("unused.sock");
    let s = s.to_str().unwrap();
    for cmd in [
        vec!["block-mem", "--size", "1M", "--socket", s],
        vec!["block-file", "--path", "/nonexistent", "--socket", s],
        vec!["net-tap", "--tap", "hypenotap0", "--socket", s],
        vec!["console", "--socket", s],
        vec!["vmm", "--kernel", "/nonexistent"],
        vec!["run", "--kernel", "/nonexistent"],
    ] {
        let with = |extra: &[&'static str]| -> Vec<&str> {
            cmd.iter().copied().chain(extra.iter().copied()).collect()
        };
        let e = usage_error(&with(&["--user", "no-such-user-hype"]));
        assert!(e.contains("unknown user 'no-such-user-hype'"), "{e}");
        let e = usage_error(&with(&["--user", "root"]));
        assert!(e.contains("unprivileged user"), "{e}");
        let e = usage_error(&with(&[
            "--user",
            "nobody",
            "--group",
            "no-such-group-hype",
        ]));
        assert!(e.contains("unknown group 'no-such-group-hype'"), "{e}");
        let e = usage_error(&with(&["--group", "nogroup"]));
        assert!(e.contains("--user"), "{e}");
    }
}
