//! Checks on confined processes: every thread's seccomp mode, and death by a forbidden call.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// `SECCOMP_MODE_FILTER`, what `/proc/PID/task/TID/status` shows as `Seccomp: 2`.
pub const SECCOMP_MODE_FILTER: u32 = 2;

/// The variable that selects a sandbox test hook in a binary built with them (see
/// `hype_sandbox::HOOK_VAR`).
pub const HOOK_VAR: &str = "HYPE_SANDBOX_TEST_HOOK";

/// One thread of a process: its id, name and seccomp mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadMode {
    /// Thread id.
    pub tid: u32,
    /// `Name:` (the thread name).
    pub name: String,
    /// `Seccomp:` (0 none, 1 strict, 2 filter).
    pub seccomp: u32,
}

/// The seccomp mode of every thread of process `pid`, from `/proc/PID/task/*/status`.
pub fn thread_modes(pid: u32) -> io::Result<Vec<ThreadMode>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
        };
        let seccomp = field("Seccomp:")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no Seccomp: line for thread {tid}")))?;
        out.push(ThreadMode {
            tid,
            name: field("Name:").unwrap_or_default(),
            seccomp,
        });
    }
    out.sort_by_key(|t| t.tid);
    Ok(out)
}

/// Runs `cmd` with the sandbox test hook `hook` and waits (at most `timeout`, then kills it)
/// for it to end; returns how it ended and its stderr.
pub fn run_hook(
    mut cmd: Command,
    hook: &str,
    timeout: Duration,
) -> io::Result<(ExitStatus, String)> {
    let mut child = cmd
        .env(HOOK_VAR, hook)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        io::Read::read_to_string(&mut e, &mut err)?;
    }
    Ok((status, err))
}

/// Asserts that `status` is death by SIGSYS and that `stderr` names `syscall` as forbidden.
pub fn assert_killed_by_sigsys(status: ExitStatus, stderr: &str, syscall: &str) {
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "expected death by SIGSYS, got {status:?}; stderr: {stderr}"
    );
    let needle = format!("forbids system call {syscall} (");
    assert!(
        stderr.contains(&needle),
        "no {needle:?} in stderr: {stderr}"
    );
}

/// The uid and gid of `nobody` on these hosts (`hype --user nobody`).
pub const NOBODY: u32 = 65534;

/// Checks that every thread of process `pid` runs as `uid`/`gid` for good (`--user`): real,
/// effective, saved and filesystem ids, no supplementary groups, no effective, permitted,
/// bounding or ambient capability, no_new_privs. Returns the first thread's `status` text on
/// success, or what is wrong.
pub fn check_runs_as(pid: u32, uid: u32, gid: u32) -> Result<String, String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("/proc/{pid}/task: {e}"))?;
    let mut first = None;
    for entry in tasks.flatten() {
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|| "?".into())
        };
        let want = [
            ("Uid:", format!("{uid} {uid} {uid} {uid}")),
            ("Gid:", format!("{gid} {gid} {gid} {gid}")),
            ("Groups:", String::new()),
            ("CapEff:", "0000000000000000".into()),
            ("CapPrm:", "0000000000000000".into()),
            ("CapBnd:", "0000000000000000".into()),
            ("CapAmb:", "0000000000000000".into()),
            ("NoNewPrivs:", "1".into()),
        ];
        for (key, value) in want {
            if field(key) != value {
                return Err(format!(
                    "pid {pid} thread {:?}: {key} is {:?}, want {value:?}\n{status}",
                    entry.file_name(),
                    field(key)
                ));
            }
        }
        first.get_or_insert(status);
    }
    first.ok_or_else(|| format!("pid {pid}: no thread readable"))
}
