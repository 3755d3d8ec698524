//! Process-level checks of a backend binary's exit codes, shared by the backends' integration
//! tests (included with `#[path]`): usage errors exit 2, runtime errors 1, and stderr holds
//! exactly one line, `program: error chain`.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a binary may take to fail.
const WAIT: Duration = Duration::from_secs(20);

/// Exit code of usage errors.
pub const USAGE: i32 = 2;
/// Exit code of runtime errors.
pub const RUNTIME: i32 = 1;

/// A block backend's options for 64 queues, each on a worker thread of its own: once a
/// frontend connects, more file descriptors (an epoll and an exit event per thread) than a
/// 32-descriptor limit allows.
pub const BLOCK_QUEUES_PAST_FD_LIMIT: [&str; 4] = ["--num-queues", "64", "--queue-threads", "64"];

/// Runs `cmd` (default logging, stdin closed) and waits, bounded, for it to exit.
pub fn run_to_exit(mut cmd: Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_bounded(child)
}

/// Runs `bin args...` to its exit.
pub fn run_bin<S: AsRef<OsStr>>(bin: &str, args: &[S]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    run_to_exit(cmd)
}

/// Waits for `child` to exit (killing it after [`WAIT`]) and collects its output.
pub fn wait_bounded(mut child: Child) -> Output {
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "process did not exit; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// Asserts the exit code and that stderr is exactly one line, `program: ...`, containing
/// `needle`. Returns that line.
pub fn assert_exit(out: &Output, code: i32, program: &str, needle: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr is not one line: {err:?}");
    assert!(err.ends_with('\n'), "{err:?}");
    let line = err.trim_end().to_string();
    assert!(line.starts_with(&format!("{program}: ")), "{line}");
    assert!(line.contains(needle), "expected {needle:?} in {line:?}");
    line
}

/// A command that runs `bin args...` with at most `nofile` open files (a fork of `sh` sets
/// the limit, then execs the binary), logging off.
pub fn with_fd_limit<S: AsRef<OsStr>>(
    prefix: &[&str],
    nofile: u32,
    bin: &str,
    args: &[S],
) -> Command {
    let (first, rest) = match prefix.split_first() {
        Some((f, r)) => (*f, r),
        None => ("sh", &[][..]),
    };
    let mut cmd = Command::new(first);
    cmd.args(rest);
    if !prefix.is_empty() {
        cmd.arg("sh");
    }
    cmd.arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
        .arg(bin)
        .args(args)
        .env("HYPE_LOG", "off");
    cmd
}

/// Starts `cmd`, waits for `socket` to appear, connects a frontend and returns the output
/// of the process, which must exit by itself.
pub fn exit_after_connect(mut cmd: Command, socket: &Path) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !socket.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "exited with {st} before listening: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let conn = UnixStream::connect(socket).unwrap();
    let out = wait_bounded(child);
    drop(conn);
    out
}
