//! The VMM's sandbox (docs/sandbox.md): every thread of a running `hype vmm` (main, vCPUs,
//! device worker and its watchdog, serial stdin, API accept and connection threads, and the
//! threads of a hot-plugged device) runs under a seccomp filter; a forbidden call kills the
//! VMM with SIGSYS and names the call; `--sandbox off` leaves every thread unconfined;
//! `--print-sandbox` shows each thread kind's policy and the Landlock rules. A descriptor a
//! parent leaves open by accident is closed at startup, in the VMM and in a backend.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assemble, hype, texts, work_dir, Backend};
use hype_ctl::client::Client;
use hype_testkit::sandbox::{
    assert_killed_by_sigsys, run_hook, thread_modes, ThreadMode, SECCOMP_MODE_FILTER,
};
use reqwest::Method;

/// A `hype vmm` running the counting guest with two vCPUs, a block device, the serial
/// console on stdio (stdin kept open: the stdin thread runs) and an API socket.
struct Vm {
    child: Child,
    api: PathBuf,
    stderr: PathBuf,
}

impl Vm {
    fn start(name: &str, device: &Path, extra: &[&str]) -> Vm {
        let dir = work_dir(&format!("vmm-sandbox-{name}"));
        let elf = assemble("count", 0x20_0000);
        let api = dir.join("api.sock");
        let stderr = dir.join("stderr.log");
        let _ = std::fs::remove_file(&api);
        let child = Command::new(env!("CARGO_BIN_EXE_hype"))
            .args(["vmm", "--kernel", elf.to_str().unwrap(), "--memory", "64M"])
            .args(["--cpus", "2", "--serial", "stdio", "--device"])
            .arg(device)
            .arg("--api-socket")
            .arg(&api)
            .args(extra)
            .env("HYPE_LOG", "debug")
            .env_remove("HYPE_SANDBOX")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let vm = Vm { child, api, stderr };
        let t = Instant::now();
        while !vm.api.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "no API socket: {}",
                vm.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        vm
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn threads(&self) -> Vec<ThreadMode> {
        thread_modes(self.child.id()).unwrap()
    }

    /// Waits until threads named `names` (prefixes) exist and every thread is in `mode`.
    fn wait_for_threads(&self, names: &[&str], mode: u32) -> Vec<ThreadMode> {
        let t = Instant::now();
        loop {
            let threads = self.threads();
            let all_named = names
                .iter()
                .all(|n| threads.iter().any(|t| t.name.starts_with(n)));
            if all_named && threads.iter().all(|t| t.seccomp == mode) {
                return threads;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "threads {threads:?} (want {names:?} all in seccomp mode {mode}); log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every thread of the VMM, at boot and after a hot-plug, shows `Seccomp: 2`.
#[test]
fn every_vmm_thread_is_confined() {
    let dir = work_dir("vmm-sandbox-threads");
    let boot = Backend::block_mem(&dir, "4M");
    let extra = Backend::start(&["block-mem", "--size", "4M"], &dir.join("extra.sock"));
    let vm = Vm::start("threads", &boot.socket, &[]);
    // A client that keeps its connection open: an api-conn thread waits in it.
    let mut idle = UnixStream::connect(&vm.api).unwrap();
    idle.write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
    let names = [
        "hype",
        "vcpu0",
        "vcpu1",
        "vu-virtio0",
        "vu-watchdog",
        "serial-stdin",
        "api",
        "api-conn",
    ];
    let threads = vm.wait_for_threads(&names, SECCOMP_MODE_FILTER);
    let log = vm.log();
    for kind in [
        "vmm-main",
        "vmm-vcpu",
        "vmm-device",
        "vmm-watchdog",
        "vmm-stdin",
        "vmm-api",
    ] {
        assert!(
            log.contains(&format!("confined by policy {kind} ")),
            "no thread confined by {kind}: {threads:?}\n{log}"
        );
    }

    // A hot-plugged device's worker and watchdog, started by an API thread, are confined too
    // (its link was made by a confined thread: hot-plug works under the sandbox).
    let before = threads.len();
    let client = Client::new(&vm.api, Duration::from_secs(10)).unwrap();
    let body = serde_json::json!({ "socket": extra.socket });
    let answer = client
        .call(Method::POST, "/vm/devices", Some(&body))
        .unwrap();
    assert_eq!(answer.status, 200, "{}", vm.log());
    let threads = vm.wait_for_threads(&["vu-virtio1"], SECCOMP_MODE_FILTER);
    assert!(threads.len() > before, "{threads:?}");
    drop(idle);
}

/// A forbidden call kills the VMM with SIGSYS, and the message names the call and the policy.
#[test]
fn a_forbidden_call_kills_the_vmm() {
    let elf = assemble("count", 0x20_0000);
    for (hook, call) in [
        ("execve", "execve"),
        ("socket-inet", "socket"),
        ("ptrace", "ptrace"),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hype"));
        cmd.args(["vmm", "--kernel", elf.to_str().unwrap(), "--memory", "64M"])
            .args(["--serial", "none"])
            .env_remove("HYPE_SANDBOX");
        let (status, stderr) = run_hook(cmd, hook, Duration::from_secs(20)).unwrap();
        assert_killed_by_sigsys(status, &stderr, call);
        assert!(
            stderr.contains("hype sandbox: policy vmm-main forbids"),
            "{stderr}"
        );
    }
}

/// `--sandbox off` leaves every thread unconfined.
#[test]
fn sandbox_off_leaves_the_vmm_unconfined() {
    let dir = work_dir("vmm-sandbox-off");
    let boot = Backend::block_mem(&dir, "4M");
    let vm = Vm::start("off", &boot.socket, &["--sandbox", "off"]);
    vm.wait_for_threads(&["hype", "vcpu0", "vcpu1", "vu-virtio0", "api"], 0);
    assert!(vm.log().contains("the VMM is not confined"), "{}", vm.log());
}

/// `--print-sandbox` prints every thread kind's policy and the Landlock rules, and exits.
#[test]
fn print_sandbox_shows_every_thread_kind() {
    let dir = work_dir("vmm-sandbox-print");
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let allow = dir.join("snapshots");
    std::fs::create_dir_all(&allow).unwrap();
    let o = hype(&[
        "vmm",
        "--kernel",
        kernel.to_str().unwrap(),
        "--api-socket",
        dir.join("api.sock").to_str().unwrap(),
        "--sandbox-allow",
        allow.to_str().unwrap(),
        "--print-sandbox",
    ]);
    let (out, err) = texts(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    for kind in [
        "vmm-main",
        "vmm-vcpu",
        "vmm-device",
        "vmm-watchdog",
        "vmm-stdin",
        "vmm-api",
    ] {
        assert!(out.contains(&format!("seccomp policy {kind}: ")), "{out}");
    }
    assert!(out.contains("ioctl if arg1 == 0xae80"), "KVM_RUN: {out}");
    assert!(
        out.contains(&format!("{} (create/remove sockets)", dir.display())),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{} (read, write, create, rename, remove)",
            allow.display()
        )),
        "{out}"
    );
}

/// Runs `hype ARGS` with the test's `/etc/hostname` open (not close-on-exec) as fd 9.
fn spawn_with_fd9(args: &[&str]) -> Child {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let f = std::fs::File::open("/etc/hostname").unwrap();
    let fd = f.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hype"));
    cmd.args(args)
        .env("HYPE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: dup2 is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(f);
    child
}

/// The descriptors open in `pid` above stderr.
fn fds_above_stderr(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|fd| *fd > 2)
        .collect()
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An fd inherited from the parent is not open in a backend nor in the VMM.
#[test]
fn inherited_descriptors_are_closed() {
    let dir = work_dir("vmm-sandbox-fds");
    let sock = dir.join("fds.sock");
    let _ = std::fs::remove_file(&sock);
    let mut backend = spawn_with_fd9(&[
        "block-mem",
        "--size",
        "1M",
        "--socket",
        sock.to_str().unwrap(),
    ]);
    wait_for(&sock);
    let fds = fds_above_stderr(backend.id());
    let target = std::fs::read_link(format!("/proc/{}/fd/9", backend.id()));
    assert!(
        target
            .as_ref()
            .map_or(true, |t| t != Path::new("/etc/hostname")),
        "fd 9 inherited by the backend is still open ({target:?}); open: {fds:?}"
    );

    let elf = assemble("count", 0x20_0000);
    let api = dir.join("api.sock");
    let _ = std::fs::remove_file(&api);
    let mut vmm = spawn_with_fd9(&[
        "vmm",
        "--kernel",
        elf.to_str().unwrap(),
        "--memory",
        "64M",
        "--serial",
        "none",
        "--device",
        sock.to_str().unwrap(),
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    wait_for(&api);
    let target = std::fs::read_link(format!("/proc/{}/fd/9", vmm.id()));
    // fd 9 may be reused by the VMM for its own files: never for the inherited one.
    assert!(
        target
            .as_ref()
            .map_or(true, |t| t != Path::new("/etc/hostname")),
        "fd 9 inherited by the VMM is still open ({target:?})"
    );
    let _ = vmm.kill();
    let _ = vmm.wait();
    let _ = backend.kill();
    let _ = backend.wait();
}
