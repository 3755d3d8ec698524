//! With `--serial stdio` on a terminal, hype puts it in raw mode while the guest runs and restores
//! it on every exit path: guest reset, a runtime error, SIGTERM, and the Ctrl-a x escape.
//! The terminal is a pseudo-terminal made by the test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::assemble;

struct Pty {
    master: std::fs::File,
    slave: OwnedFd,
}

fn openpty() -> Pty {
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two fds into the provided integers; null name/termios/winsize are allowed.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just returned by openpty and are owned here.
    unsafe {
        Pty {
            master: std::fs::File::from_raw_fd(m),
            slave: OwnedFd::from_raw_fd(s),
        }
    }
}

fn termios(fd: i32) -> libc::termios {
    // SAFETY: termios is plain data filled by tcgetattr; the result is checked.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
    t
}

fn same(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_cflag == b.c_cflag
        && a.c_lflag == b.c_lflag
        && a.c_cc == b.c_cc
}

fn is_raw(t: &libc::termios) -> bool {
    t.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG) == 0
}

fn spawn_on(pty: &Pty, kernel: &str, extra: &[&str]) -> Child {
    let fd = |p: &Pty| Stdio::from(p.slave.try_clone().unwrap());
    Command::new(env!("CARGO_BIN_EXE_hype"))
        .args([
            "vmm", "--kernel", kernel, "--memory", "64M", "--serial", "stdio",
        ])
        .args(extra)
        .stdin(fd(pty))
        .stdout(fd(pty))
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        assert!(Instant::now() < deadline, "hype did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the terminal is in raw mode (hype has started the guest).
fn wait_raw(pty: &Pty) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_raw(&termios(pty.slave.as_raw_fd())) {
        assert!(Instant::now() < deadline, "terminal never went raw");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Drains what hype wrote to the terminal so it never blocks on a full pty buffer.
fn drain(pty: &Pty) {
    let mut m = pty.master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = m.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
}

/// Runs `guest` on a fresh pty, does `during` while it runs, expects exit `code`, and checks the
/// terminal settings are exactly what they were before.
fn check_restored(
    guest: &str,
    extra: &[&str],
    code: Option<i32>,
    during: impl FnOnce(&Pty, &Child),
) {
    let elf = assemble(guest, 0x20_0000);
    let pty = openpty();
    drain(&pty);
    let before = termios(pty.slave.as_raw_fd());
    assert!(!is_raw(&before));
    let mut c = spawn_on(&pty, elf.to_str().unwrap(), extra);
    during(&pty, &c);
    assert_eq!(wait(&mut c, Duration::from_secs(20)), code);
    assert!(same(&before, &termios(pty.slave.as_raw_fd())));
}

#[test]
fn restored_after_guest_reset() {
    check_restored("long_hello", &[], Some(0), |_, _| {});
}

#[test]
fn restored_after_sigterm_and_raw_while_running() {
    check_restored("spin", &[], Some(0), |pty, c| {
        wait_raw(pty);
        // SAFETY: sending SIGTERM to our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    });
}

#[test]
fn restored_after_ctrl_a_x() {
    check_restored("spin", &[], Some(0), |pty, _| {
        wait_raw(pty);
        pty.master.try_clone().unwrap().write_all(b"\x01x").unwrap();
    });
}

#[test]
fn restored_after_a_runtime_error() {
    // Without fix-ups the final int3 of this guest is an error on PVM hosts (exit 1); elsewhere it
    // triple-faults (exit 0). Either way the terminal must come back.
    let code = if hype_fixups::host_needs_fixups() {
        Some(1)
    } else {
        Some(0)
    };
    check_restored("pvh_hello", &["--emulation-fixups", "off"], code, |_, _| {});
}
