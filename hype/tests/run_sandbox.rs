//! `hype run` under the sandbox (docs/sandbox.md): once the backends and the VMM run, the
//! supervisor is confined (a deny-list its restarted children inherit), and every thread of
//! every process of the VM shows `Seccomp: 2`; a call the supervisor's deny-list names kills
//! it with SIGSYS and a message naming the call.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;
mod run_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assemble, work_dir};
use hype_testkit::sandbox::{assert_killed_by_sigsys, thread_modes, SECCOMP_MODE_FILTER};
use run_support::*;

const LIMIT: Duration = Duration::from_secs(60);

fn args(dir: &std::path::Path) -> Vec<String> {
    let elf = assemble("run_two_disks", 0x20_0000);
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    write_sector(&img, 0, b"HYPE");
    vec![
        "--kernel".into(),
        elf.display().to_string(),
        "--memory".into(),
        "64M".into(),
        "--disk".into(),
        format!("file:{}", img.display()),
        "--disk".into(),
        "mem:1M".into(),
        "--console".into(),
        format!("file:{}", dir.join("console.log").display()),
    ]
}

/// Waits until every thread of `pid` is in seccomp filter mode; returns their names.
fn wait_confined(pid: u32, what: &str) -> Vec<String> {
    let t = Instant::now();
    loop {
        let threads = thread_modes(pid).unwrap();
        if !threads.is_empty() && threads.iter().all(|t| t.seccomp == SECCOMP_MODE_FILTER) {
            return threads.into_iter().map(|t| t.name).collect();
        }
        assert!(t.elapsed() < LIMIT, "{what} (pid {pid}): {threads:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_process_of_hype_run_is_confined() {
    let dir = fresh_dir(&work_dir("run-sandbox"), "all");
    let a = args(&dir);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut run = Run::start(&dir, &a);
    run.wait_for_output("waiting\n", LIMIT);
    wait_confined(run.pid(), "hype run");
    let kids = run.children();
    assert_eq!(kids.len(), 4, "{kids:?}");
    for (pid, cmd) in &kids {
        wait_confined(*pid, cmd);
    }
    assert!(
        run.stderr().contains("sandbox: hype-run confined"),
        "{}",
        run.stderr()
    );
    run.signal(libc::SIGTERM);
    run.wait(LIMIT);
}

#[test]
fn a_forbidden_call_kills_the_supervisor() {
    let dir = fresh_dir(&work_dir("run-sandbox"), "hook");
    let xdg = fresh_dir(&dir, "xdg");
    let child = Command::new(hype_bin())
        .arg("run")
        .args(args(&dir))
        .env("XDG_RUNTIME_DIR", &xdg)
        .env("HYPE_LOG", "info")
        .env_remove("HYPE_SANDBOX")
        // Only the supervisor runs a hook addressed to it; its children ignore it.
        .env(hype_testkit::sandbox::HOOK_VAR, "ptrace@hype-run")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_killed_by_sigsys(out.status, &stderr, "ptrace");
    assert!(
        stderr.contains("policy hype-run forbids system call ptrace"),
        "{stderr}"
    );
}
