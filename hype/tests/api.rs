//! The control API of a running `hype vmm` with tiny guests: GET /vm, pause stops a counting
//! guest and resume continues it, shutdown presses the ACPI power button (a guest that powers
//! off on it ends the VM, one that ignores it is stopped after the timeout; with platform
//! mptable there is no button), stop, per-device backend state, `hype ctl`, and hostile
//! clients that must not disturb the VM.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assemble, work_dir, Backend};
use hype_api::model::{BackendState, VmInfo, VmState};
use hype_ctl::client::{Client, ClientError};
use reqwest::Method;

/// A `hype vmm` running the counting guest with an API socket.
struct Vm {
    child: Child,
    api: PathBuf,
    serial: PathBuf,
    stderr: PathBuf,
}

impl Vm {
    fn start(name: &str, extra: &[&str]) -> Vm {
        Vm::start_guest(name, "count", extra)
    }

    fn start_guest(name: &str, guest: &str, extra: &[&str]) -> Vm {
        let dir = work_dir(&format!("api-{name}"));
        let elf = assemble(guest, 0x20_0000);
        let api = dir.join("api.sock");
        let serial = dir.join("serial.out");
        let stderr = dir.join("stderr.log");
        let _ = std::fs::remove_file(&serial);
        let _ = std::fs::remove_file(&api);
        let child = Command::new(env!("CARGO_BIN_EXE_hype"))
            .args(["vmm", "--kernel", elf.to_str().unwrap(), "--memory", "64M"])
            .arg(format!("--serial=file:{}", serial.display()))
            .arg("--api-socket")
            .arg(&api)
            .args(extra)
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
        Client::new(&self.api, Duration::from_secs(10)).unwrap()
    }

    fn info(&self) -> VmInfo {
        self.client().info().unwrap()
    }

    fn post(&self, path: &str, body: Option<serde_json::Value>) -> Result<u16, ClientError> {
        Ok(self
            .client()
            .call(Method::POST, path, body.as_ref())?
            .status)
    }

    /// Bytes the guest printed so far.
    fn progress(&self) -> u64 {
        std::fs::metadata(&self.serial)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    fn wait_for_progress(&self) {
        let start = self.progress();
        wait_until(Duration::from_secs(20), "guest progress", || {
            self.progress() > start + 2
        });
    }

    fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn wait_for_serial(&self, what: &str) {
        wait_until(Duration::from_secs(20), what, || {
            self.serial_text().contains(what)
        });
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the VMM to exit; returns its exit code and how long it took.
    fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st.code(), t.elapsed());
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                panic!("hype vmm did not exit within {limit:?}: {}", self.log());
            }
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

fn status_of(path: &Path, bytes: &[u8]) -> u16 {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

fn conflict(r: Result<u16, ClientError>) -> String {
    match r {
        Err(ClientError::Status {
            status: 409,
            message,
        }) => message,
        other => panic!("expected 409, got {other:?}"),
    }
}

#[test]
fn pause_stops_a_counting_guest_and_resume_continues_it() {
    let mut vm = Vm::start("pause", &[]);
    let mode = std::fs::metadata(&vm.api).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    vm.wait_for_progress();

    let info = vm.info();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.config.cpus, 1);
    assert_eq!(info.config.memory_bytes, 64 << 20);
    assert_eq!(info.memory.bytes, 64 << 20);
    assert_eq!(info.config.serial, format!("file:{}", vm.serial.display()));
    assert!(info.config.kernel.unwrap().ends_with(".elf"));
    assert_eq!(info.vcpus.len(), 1);
    assert!(!info.vcpus[0].paused);
    assert!(info.vcpus[0].exits.io_out >= 3, "{:?}", info.vcpus[0]);
    assert!(info.devices.is_empty());

    assert_eq!(vm.post("/vm/pause", None).unwrap(), 200);
    let paused = vm.info();
    assert_eq!(paused.state, VmState::Paused);
    assert!(paused.vcpus[0].paused);
    let (bytes, outs) = (vm.progress(), paused.vcpus[0].exits.io_out);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vm.progress(), bytes, "the guest ran while paused");
    assert_eq!(vm.info().vcpus[0].exits.io_out, outs);
    assert_eq!(
        conflict(vm.post("/vm/pause", None)),
        "the VM is already paused"
    );

    assert_eq!(vm.post("/vm/resume", None).unwrap(), 200);
    assert_eq!(
        conflict(vm.post("/vm/resume", None)),
        "the VM is not paused"
    );
    vm.wait_for_progress();
    let running = vm.info();
    assert_eq!(running.state, VmState::Running);
    assert!(running.vcpus[0].exits.io_out > outs);
    assert!(running.uptime_ms > info.uptime_ms);

    // The power button is pressed, but the counting guest ignores it: it is stopped after the
    // timeout.
    let t = Instant::now();
    let r = vm
        .client()
        .call(
            Method::POST,
            "/vm/shutdown",
            Some(&serde_json::json!({"timeout_ms": 3000})),
        )
        .unwrap();
    assert_eq!(r.status, 202);
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["state"], "shutting_down");
    assert_eq!(body["power_button"], true);
    assert_eq!(body["timeout_ms"], 3000);
    assert_eq!(
        conflict(vm.post("/vm/shutdown", None)),
        "the VM is shutting down"
    );
    assert_eq!(
        conflict(vm.post("/vm/pause", None)),
        "the VM is shutting down"
    );
    let (code, _) = vm.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{}", vm.log());
    assert!(t.elapsed() >= Duration::from_millis(3000));
    assert!(vm.log().contains("forced stop"), "{}", vm.log());
    assert!(!vm.api.exists(), "socket left behind");
}

#[test]
fn shutdown_powers_off_a_guest_that_handles_the_power_button() {
    let mut vm = Vm::start_guest("power", "power_wait", &[]);
    vm.wait_for_serial("w");
    let t = Instant::now();
    let r = vm
        .client()
        .call(
            Method::POST,
            "/vm/shutdown",
            Some(&serde_json::json!({"timeout_ms": 30000})),
        )
        .unwrap();
    assert_eq!(r.status, 202);
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["power_button"], true);
    let (code, _) = vm.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{}", vm.log());
    // The guest powered off by itself, long before the forced stop.
    assert!(t.elapsed() < Duration::from_secs(20));
    let log = vm.log();
    assert!(log.contains("power button pressed"), "{log}");
    assert!(log.contains("guest powered off"), "{log}");
    assert!(!log.contains("the guest still runs after"), "{log}");
}

#[test]
fn stop_ends_a_paused_vm() {
    let mut vm = Vm::start("stop", &["--cpus", "2"]);
    assert_eq!(vm.info().vcpus.len(), 2);
    assert_eq!(vm.post("/vm/pause", None).unwrap(), 200);
    let info = vm.info();
    assert!(info.vcpus.iter().all(|v| v.paused), "{:?}", info.vcpus);
    let r = vm.client().call(Method::POST, "/vm/stop", None).unwrap();
    assert_eq!(r.status, 202);
    let (code, took) = vm.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{}", vm.log());
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn hostile_clients_never_stop_the_vm() {
    let mut vm = Vm::start("hostile", &[]);
    vm.wait_for_progress();
    let api = vm.api.clone();
    // Idle and slow clients hold every connection slot for a while...
    let idle: Vec<UnixStream> = (0..hype_api::server::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&api).unwrap())
        .collect();
    let mut slow = UnixStream::connect(&api);
    if let Ok(s) = &mut slow {
        let _ = s.write_all(b"GET /vm HTTP/1.1\r\n");
    }
    // ... the VM keeps running meanwhile.
    vm.wait_for_progress();
    drop(idle);
    drop(slow);
    wait_until(Duration::from_secs(30), "a free connection slot", || {
        status_of(&api, b"GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n") == 200
    });
    let cases: &[(&[u8], u16)] = &[
        (
            b"POST /vm/pause HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n",
            413,
        ),
        (
            b"POST /vm/pause HTTP/1.1\r\nContent-Length: 5\r\n\r\n{{{{{",
            400,
        ),
        (
            b"POST /vm/shutdown HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"timeout_ms\":-3}",
            400,
        ),
        (b"GET /nope HTTP/1.1\r\n\r\n", 404),
        (b"PUT /vm HTTP/1.1\r\n\r\n", 405),
        (b"\x00\x01\x02\x03\r\n\r\n", 400),
    ];
    for (bytes, want) in cases {
        assert_eq!(status_of(&api, bytes), *want);
    }
    // Clients that vanish mid-request, and a crowd of concurrent ones.
    for _ in 0..20 {
        let mut s = UnixStream::connect(&api).unwrap();
        let _ = s.write_all(b"POST /vm/pause HTTP/1.1\r\nContent-Length: 100\r\n\r\n{");
    }
    let crowd: Vec<_> = (0..6)
        .map(|_| {
            let api = api.clone();
            std::thread::spawn(move || {
                let c = Client::new(&api, Duration::from_secs(20)).unwrap();
                (0..15).filter(|_| c.info().is_ok()).count()
            })
        })
        .collect();
    let ok: usize = crowd.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(ok, 90);
    vm.wait_for_progress();
    assert_eq!(vm.info().state, VmState::Running);
    assert_eq!(vm.post("/vm/stop", None).unwrap(), 202);
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0, Some(0));
}

#[test]
fn device_backend_state_follows_the_backend() {
    let dir = work_dir("api-device");
    let mut backend = Backend::block_mem(&dir, "4M");
    let spec = backend.socket.to_str().unwrap().to_owned();
    let mut vm = Vm::start("device", &["--device", &spec]);
    let d = &vm.info().devices[0];
    assert_eq!((d.id.as_str(), d.kind.as_str()), ("virtio0", "blk"));
    assert_eq!(d.socket, spec);
    assert_eq!(d.backend, BackendState::Connected);
    assert_eq!((d.mmio_base, d.gsi, d.queues), (0xd000_0000, 5, 1));
    backend.kill();
    wait_until(Duration::from_secs(10), "backend lost", || {
        vm.info().devices[0].backend == BackendState::Reconnecting
    });
    std::thread::sleep(Duration::from_millis(200));
    let lost = vm.info().devices[0].lost_for_ms.unwrap();
    assert!(lost >= 200, "{lost}");
    backend.restart();
    wait_until(Duration::from_secs(10), "backend back", || {
        vm.info().devices[0].backend == BackendState::Connected
    });
    assert_eq!(vm.info().devices[0].reconnects, 1);
    let c = vm.client();
    let a = c.send(Method::DELETE, "/vm/devices/virtio9", None).unwrap();
    assert_eq!(a.status, 404);
    assert_eq!(vm.post("/vm/stop", None).unwrap(), 202);
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0, Some(0));
}

fn ctl(api: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_hype"))
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn hype_ctl_human_and_json() {
    // Platform mptable: no power button, which the shutdown line says.
    let mut vm = Vm::start("ctl", &["--platform", "mptable"]);
    let (code, out, err) = ctl(&vm.api, &["info"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("state: running, up "), "{out}");
    assert!(out.contains("64 MiB, 1 vCPU(s)"), "{out}");
    assert!(out.contains("\nvcpu0: running; exits io_in="), "{out}");
    assert!(out.contains("devices: none"), "{out}");
    let (code, out, _) = ctl(&vm.api, &["--json", "info"]);
    assert_eq!(code, Some(0));
    let v: VmInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(v.state, VmState::Running);

    assert_eq!(ctl(&vm.api, &["pause"]).1, "paused\n");
    let (code, out, err) = ctl(&vm.api, &["pause"]);
    assert_eq!((code, out.as_str()), (Some(1), ""));
    assert_eq!(
        err,
        "hype ctl: pause: the VM is already paused (HTTP 409)\n"
    );
    assert_eq!(
        ctl(&vm.api, &["--json", "resume"]).1,
        "{\"state\":\"running\"}\n"
    );
    let (code, _, err) = ctl(&vm.api, &["remove-device", "virtio3"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no device virtio3 (HTTP 404)"), "{err}");

    // Usage errors exit 2 without contacting the VM; a missing socket is a runtime error.
    let (code, _, err) = ctl(&vm.api, &["shutdown", "--timeout", "soon"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = ctl(Path::new("/nonexistent/api.sock"), &["info"]);
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with("hype ctl: info: no answer from /nonexistent/api.sock"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let (code, out, _) = ctl(&vm.api, &["shutdown", "--timeout", "200ms"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        out,
        "shutting down: no power button: the guest is not told; forced stop in 200 ms if it \
         still runs\n"
    );
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0, Some(0));
}

#[test]
fn api_socket_in_use_is_a_usage_error() {
    let vm = Vm::start("inuse", &[]);
    let elf = assemble("count", 0x20_0000);
    let o = Command::new(env!("CARGO_BIN_EXE_hype"))
        .args(["vmm", "--kernel", elf.to_str().unwrap(), "--memory", "64M"])
        .args(["--serial", "none", "--api-socket"])
        .arg(&vm.api)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.ends_with(&format!(
            "hype: control API: {} is in use by another process\n",
            vm.api.display()
        )),
        "{err}"
    );
    // The first VM is unaffected.
    assert_eq!(vm.info().state, VmState::Running);
}

fn add_device(vm: &Vm, socket: &Path) -> Result<hype_api::model::DeviceInfo, ClientError> {
    let body = serde_json::json!({ "socket": socket });
    let a = vm.client().call(Method::POST, "/vm/devices", Some(&body))?;
    Ok(serde_json::from_slice(&a.body).unwrap())
}

fn remove_device(vm: &Vm, id: &str) -> Result<u16, ClientError> {
    // A removal waits up to 10 s for the guest.
    Ok(Client::new(&vm.api, Duration::from_secs(30))
        .unwrap()
        .call(Method::DELETE, &format!("/vm/devices/{id}"), None)?
        .status)
}

#[test]
fn hot_add_and_remove_seen_by_a_guest() {
    let dir = work_dir("api-hotplug-backends");
    let boot = Backend::start(&["block-mem", "--size", "4M"], &dir.join("boot.sock"));
    let mut extra = Backend::start(&["block-mem", "--size", "8M"], &dir.join("extra.sock"));
    let spec = boot.socket.to_str().unwrap().to_owned();
    let mut vm = Vm::start_guest("hotplug", "hotplug", &["--device", &spec]);
    vm.wait_for_serial("hotplug guest ready\n");

    // A socket nobody serves cannot be attached; nothing changes.
    match add_device(&vm, &dir.join("nobody.sock")) {
        Err(ClientError::Status {
            status: 409,
            message,
        }) => {
            assert!(message.starts_with("cannot attach"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(vm.info().devices.len(), 1);

    // Hot-add: the first free slot (1), seen by the guest through INSERTED and its window.
    let d = add_device(&vm, &extra.socket).unwrap();
    assert_eq!((d.id.as_str(), d.kind.as_str()), ("virtio1", "blk"));
    assert_eq!((d.mmio_base, d.gsi), (0xd000_1000, 6));
    assert_eq!(d.socket, extra.socket.to_str().unwrap());
    assert_eq!(d.backend, BackendState::Connected);
    vm.wait_for_serial("inserted 00000001 magic 74726976 id 00000002\n");
    let ids: Vec<String> = vm.info().devices.into_iter().map(|d| d.id).collect();
    assert_eq!(ids, ["virtio0", "virtio1"]);

    // A boot device is not hot-pluggable; an unknown one is a 404.
    match remove_device(&vm, "virtio0") {
        Err(ClientError::Status {
            status: 409,
            message,
        }) => {
            assert_eq!(
                message,
                "virtio0 was attached at boot and cannot be removed"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        remove_device(&vm, "virtio5"),
        Err(ClientError::Status { status: 404, .. })
    ));

    // Hot-remove: the guest is asked (REMOVE), ejects, and the device is gone; its backend
    // sees the connection close and serves the next frontend.
    assert_eq!(remove_device(&vm, "virtio1").unwrap(), 204);
    assert!(vm.serial_text().contains("remove 00000001\n"));
    let ids: Vec<String> = vm.info().devices.into_iter().map(|d| d.id).collect();
    assert_eq!(ids, ["virtio0"]);
    assert!(extra.alive());
    // The same backend can come back: in a slot never used before (slot 2), which a guest
    // enumerates afresh; once every fresh slot was used, freed ones are taken again.
    let again = add_device(&vm, &extra.socket).unwrap();
    assert_eq!(again.id, "virtio2");
    vm.wait_for_serial("inserted 00000002 magic 74726976 id 00000002\n");
    assert_eq!(vm.post("/vm/stop", None).unwrap(), 202);
    assert_eq!(
        vm.wait_exit(Duration::from_secs(10)).0,
        Some(0),
        "{}",
        vm.log()
    );
}

#[test]
fn a_guest_that_does_not_release_keeps_its_device() {
    let dir = work_dir("api-norelease-backends");
    let b = Backend::start(&["block-mem", "--size", "4M"], &dir.join("b.sock"));
    let mut vm = Vm::start("norelease", &[]);
    let d = add_device(&vm, &b.socket).unwrap();
    assert_eq!(d.id, "virtio0");
    let t = Instant::now();
    match remove_device(&vm, "virtio0") {
        Err(ClientError::Status {
            status: 409,
            message,
        }) => assert_eq!(
            message,
            "the guest did not release virtio0 within 10s; it stays"
        ),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_secs(10));
    assert_eq!(vm.info().devices.len(), 1);
    vm.wait_for_progress();
    assert_eq!(vm.post("/vm/stop", None).unwrap(), 202);
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).0, Some(0));
}
