//! hype-block-file confined: every thread filtered while serving, forbidden calls fatal,
//! `--sandbox off` and `--print-sandbox`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

#[path = "../../block/tests/conformance/mod.rs"]
mod conformance;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use conformance::*;

const BIN: &str = env!("CARGO_BIN_EXE_hype-block-file");

fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.img");
    File::create(&p).unwrap().set_len(16 << 20).unwrap();
    p
}

#[test]
fn every_thread_is_filtered_while_serving() {
    let dir = tempdir("sbthreads");
    let img = image(&dir);
    for extra in [&[][..], &["--io-threads", "4"][..]] {
        let mut args = vec!["--path", img.to_str().unwrap(), "--num-queues", "3"];
        args.extend_from_slice(extra);
        let mut p = Process::spawn(BIN, &args, &dir.join("blk.sock"));
        check_every_thread_filtered(&p, 3);
        assert!(p.signal_and_wait(libc::SIGTERM).success());
        // The socket file was removed under Landlock (its directory's entries only).
        assert!(!p.socket.exists());
    }
}

#[test]
fn forbidden_calls_kill_the_process() {
    let dir = tempdir("sbkill");
    let img = image(&dir);
    let args = ["--path", img.to_str().unwrap()];
    check_hook_kills(BIN, &args, &dir, "execve", "execve");
    check_hook_kills(BIN, &args, &dir, "socket-inet", "socket");
    check_hook_kills(BIN, &args, &dir, "ptrace", "ptrace");
}

#[test]
fn opening_a_file_fails_and_serving_goes_on() {
    let dir = tempdir("sbopen");
    let img = image(&dir);
    // Readable for this test process, not for the confined backend.
    assert!(std::fs::read("/etc/hostname").is_ok());
    check_open_refused(
        BIN,
        &["--path", img.to_str().unwrap()],
        &dir,
        "/etc/hostname",
    );
}

#[test]
fn sandbox_off_leaves_the_process_unfiltered() {
    let dir = tempdir("sboff");
    let img = image(&dir);
    let mut p = Process::spawn(
        BIN,
        &["--path", img.to_str().unwrap(), "--sandbox", "off"],
        &dir.join("blk.sock"),
    );
    let threads = hype_testkit::sandbox::thread_modes(p.pid()).unwrap();
    assert!(threads.iter().all(|t| t.seccomp == 0), "{threads:?}");
    assert!(p.signal_and_wait(libc::SIGTERM).success());
}

#[test]
fn print_sandbox_shows_the_policy_and_exits() {
    let out = Command::new(BIN)
        .args([
            "--path",
            "/nonexistent",
            "--socket",
            "/nonexistent/s",
            "--print-sandbox",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("seccomp policy block-file: "), "{text}");
    for call in [
        "pwritev",
        "fdatasync",
        "fallocate",
        "ioctl if arg1 == 0x1277 or arg1 == 0x80081272",
        "accept4",
    ] {
        assert!(
            text.contains(&format!("    {call}")),
            "{call} missing: {text}"
        );
    }
    assert!(text.contains("  openat fails with errno 13"), "{text}");
    assert!(text.contains("landlock: "), "{text}");
}
