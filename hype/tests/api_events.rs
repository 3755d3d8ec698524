//! `GET /vm/events` of a running `hype vmm` with tiny guests (sandbox on, as by default):
//! events for pause and resume, a backend lost and back or given up, a resize, a backend switch, a hot-add and hot-remove, a shutdown
//! that the guest answers by powering off (seen by `hype ctl events --follow`); the long-poll
//! returns when an event arrives, times out with nothing, and blocks no other request; bad
//! queries are 400 with a one-line reason.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assemble, work_dir, Backend};
use hype_api::events::{EventKind, EventsReply};
use hype_ctl::client::{Client, ClientError};
use reqwest::Method;

/// A `hype vmm` running a tiny guest with an API socket.
struct Vm {
    child: Child,
    api: PathBuf,
    serial: PathBuf,
    stderr: PathBuf,
}

impl Vm {
    fn start(name: &str, guest: &str, extra: &[&str]) -> Vm {
        let dir = work_dir(&format!("api-events-{name}"));
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
        Client::new(&self.api, Duration::from_secs(40)).unwrap()
    }

    fn events(&self, query: &str) -> Result<EventsReply, ClientError> {
        let a = self
            .client()
            .call(Method::GET, &format!("/vm/events{query}"), None)?;
        Ok(serde_json::from_slice(&a.body).unwrap())
    }

    fn kinds(&self, since: u64) -> Vec<(EventKind, Option<String>)> {
        self.events(&format!("?since={since}"))
            .unwrap()
            .events
            .into_iter()
            .map(|e| (e.kind, e.device))
            .collect()
    }

    fn post(&self, path: &str) -> u16 {
        self.client().call(Method::POST, path, None).unwrap().status
    }

    fn wait_for_serial(&self, what: &str) {
        wait_until(Duration::from_secs(20), what, || {
            std::fs::read_to_string(&self.serial)
                .unwrap_or_default()
                .contains(what)
        });
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn stop(&mut self) {
        assert_eq!(self.post("/vm/stop"), 202);
        let t = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(t.elapsed() < Duration::from_secs(10), "{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!self.log().contains("SIGSYS"), "{}", self.log());
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

fn bad_request(vm: &Vm, query: &str) -> String {
    match vm.events(query) {
        Err(ClientError::Status {
            status: 400,
            message,
        }) => {
            assert!(!message.contains('\n'), "{message}");
            message
        }
        other => panic!("{query}: {other:?}"),
    }
}

#[test]
fn pause_and_resume_events_and_the_long_poll() {
    let mut vm = Vm::start("pause", "count", &[]);
    let r = vm.events("").unwrap();
    assert!(r.events.is_empty(), "{r:?}");
    assert_eq!((r.last_seq, r.dropped), (0, 0));

    assert_eq!(vm.post("/vm/pause"), 200);
    assert_eq!(vm.post("/vm/resume"), 200);
    let r = vm.events("?since=0").unwrap();
    let seqs: Vec<u64> = r.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2]);
    assert_eq!(r.events[0].kind, EventKind::Paused);
    assert_eq!(r.events[1].kind, EventKind::Resumed);
    assert!(r.events[0].time_ms <= r.events[1].time_ms);
    assert_eq!(r.last_seq, 2);
    assert_eq!(vm.kinds(1), [(EventKind::Resumed, None)]);

    // Nothing new: the wait ends after the timeout with no events.
    let t = Instant::now();
    let r = vm.events("?since=2&timeout=1").unwrap();
    assert!(r.events.is_empty());
    assert_eq!(r.last_seq, 2);
    assert!(t.elapsed() >= Duration::from_secs(1));

    // A waiting client is woken by the next event; other requests are served meanwhile.
    let api = vm.api.clone();
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let a = Client::new(&api, Duration::from_secs(40))
            .unwrap()
            .call(Method::GET, "/vm/events?since=2&timeout=30", None)
            .unwrap();
        (
            serde_json::from_slice::<EventsReply>(&a.body).unwrap(),
            t.elapsed(),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    for _ in 0..5 {
        assert_eq!(vm.client().info().unwrap().devices.len(), 0);
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(vm.post("/vm/pause"), 200);
    let (r, waited) = waiter.join().unwrap();
    assert_eq!(r.events.len(), 1, "{r:?}");
    assert_eq!((r.events[0].seq, r.events[0].kind), (3, EventKind::Paused));
    assert!(waited < Duration::from_secs(20), "{waited:?}");

    // Bad queries: 400 with one line; the wrong method is 405.
    assert!(bad_request(&vm, "?since=abc").contains("since must be a whole number"));
    assert!(bad_request(&vm, "?since=-1").contains("since"));
    assert!(bad_request(&vm, "?timeout=31").contains("more than 30 seconds"));
    assert!(bad_request(&vm, "?timeout=1.5").contains("timeout must be"));
    assert!(bad_request(&vm, "?wait=1").contains("unknown query parameter"));
    let a = vm.client().send(Method::POST, "/vm/events", None).unwrap();
    assert_eq!(a.status, 405);
    vm.stop();
}

#[test]
fn a_backend_lost_and_back() {
    let dir = work_dir("api-events-device");
    let mut backend = Backend::block_mem(&dir, "4M");
    let spec = backend.socket.to_str().unwrap().to_owned();
    let mut vm = Vm::start("device", "count", &["--device", &spec]);
    let v0 = Some("virtio0".to_owned());
    assert_eq!(vm.kinds(0), []);
    backend.kill();
    wait_until(Duration::from_secs(10), "device_lost", || {
        vm.kinds(0) == [(EventKind::DeviceLost, v0.clone())]
    });
    backend.restart();
    wait_until(Duration::from_secs(10), "device_reconnected", || {
        vm.kinds(1) == [(EventKind::DeviceReconnected, v0.clone())]
    });
    vm.stop();
}

#[test]
fn a_backend_given_up() {
    let dir = work_dir("api-events-gaveup");
    let mut backend = Backend::block_mem(&dir, "4M");
    let spec = format!("{},reconnect-timeout=300ms", backend.socket.display());
    let mut vm = Vm::start("gaveup", "count", &["--device", &spec]);
    let v0 = Some("virtio0".to_owned());
    backend.kill();
    wait_until(Duration::from_secs(10), "device_gave_up", || {
        vm.kinds(0)
            == [
                (EventKind::DeviceLost, v0.clone()),
                (EventKind::DeviceGaveUp, v0.clone()),
            ]
    });
    vm.stop();
}

#[test]
fn resize_and_backend_switch() {
    let dir = work_dir("api-events-switch");
    let image = dir.join("disk.img");
    let _ = std::fs::remove_file(&image);
    let file = Backend::block_file(&dir, &image, 1 << 20);
    let other = Backend::start(&["block-mem", "--size", "1M"], &dir.join("other.sock"));
    let spec = file.socket.to_str().unwrap().to_owned();
    let mut vm = Vm::start("switch", "count", &["--device", &spec]);
    let v0 = Some("virtio0".to_owned());
    // Same size: no event; a grown image: config_changed.
    let a = vm
        .client()
        .call(Method::POST, "/vm/devices/virtio0/resize", None)
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(vm.kinds(0), []);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let a = vm
        .client()
        .call(Method::POST, "/vm/devices/virtio0/resize", None)
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(vm.kinds(0), [(EventKind::ConfigChanged, v0.clone())]);
    let body = serde_json::json!({ "socket": other.socket });
    let a = vm
        .client()
        .call(Method::PUT, "/vm/devices/virtio0/backend", Some(&body))
        .unwrap();
    assert_eq!(a.status, 200);
    let r = vm.events("?since=1").unwrap();
    let e: Vec<_> = r
        .events
        .iter()
        .map(|e| (e.kind, e.device.clone()))
        .collect();
    assert_eq!(e, [(EventKind::BackendSwitched, v0.clone())], "{r:?}");
    assert_eq!(r.events[0].detail.as_deref(), other.socket.to_str());
    vm.stop();
}

#[test]
fn hot_add_and_remove() {
    let dir = work_dir("api-events-hotplug");
    let boot = Backend::start(&["block-mem", "--size", "4M"], &dir.join("boot.sock"));
    let extra = Backend::start(&["block-mem", "--size", "8M"], &dir.join("extra.sock"));
    let spec = boot.socket.to_str().unwrap().to_owned();
    let mut vm = Vm::start("hotplug", "hotplug", &["--device", &spec]);
    vm.wait_for_serial("hotplug guest ready\n");
    let body = serde_json::json!({ "socket": extra.socket });
    let a = vm
        .client()
        .call(Method::POST, "/vm/devices", Some(&body))
        .unwrap();
    assert_eq!(a.status, 200);
    let r = vm.events("").unwrap();
    assert_eq!(r.events.len(), 1, "{r:?}");
    let e = &r.events[0];
    assert_eq!(e.kind, EventKind::DeviceAdded);
    assert_eq!(e.device.as_deref(), Some("virtio1"));
    assert_eq!(e.detail.as_deref(), extra.socket.to_str());
    vm.wait_for_serial("inserted 00000001");
    let a = vm
        .client()
        .call(Method::DELETE, "/vm/devices/virtio1", None)
        .unwrap();
    assert_eq!(a.status, 204);
    assert_eq!(
        vm.kinds(1),
        [(EventKind::DeviceRemoved, Some("virtio1".to_owned()))]
    );
    vm.stop();
}

fn ctl(api: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hype"));
    c.arg("ctl").arg("--api-socket").arg(api);
    c
}

#[test]
fn hype_ctl_follows_a_shutdown_to_the_power_off() {
    use std::io::BufRead;
    let vm = Vm::start("power", "power_wait", &[]);
    vm.wait_for_serial("w");
    assert_eq!(vm.post("/vm/pause"), 200);
    let mut follower = ctl(&vm.api)
        .args(["--json", "events", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(follower.stdout.take().unwrap()).lines();
    let kind = |l: std::io::Result<String>| {
        serde_json::from_str::<hype_api::events::Event>(&l.unwrap())
            .unwrap()
            .kind
    };
    // Once the follower printed the pause it is long-polling: the guest, which powers off
    // at once on the button, cannot end the VM before the follower is waiting.
    assert_eq!(kind(lines.next().unwrap()), EventKind::Paused);
    std::thread::sleep(Duration::from_millis(100));
    let a = vm
        .client()
        .call(
            Method::POST,
            "/vm/shutdown",
            Some(&serde_json::json!({"timeout_ms": 30000})),
        )
        .unwrap();
    assert_eq!(a.status, 202);
    // A shutdown of a paused VM resumes it first; the follower ends by itself once it has
    // seen the power-off.
    let kinds: Vec<EventKind> = lines.map(kind).collect();
    let o = follower.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(
        kinds,
        [
            EventKind::Resumed,
            EventKind::ShutdownRequested,
            EventKind::GuestPoweredOff
        ],
        "{}",
        vm.log()
    );
}

#[test]
fn hype_ctl_events_human() {
    let mut vm = Vm::start("ctl", "count", &[]);
    assert_eq!(vm.post("/vm/pause"), 200);
    let o = ctl(&vm.api).arg("events").output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("1 ") && out.ends_with(" paused\n"), "{out}");
    let o = ctl(&vm.api)
        .args(["events", "--since", "1"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "");
    let o = ctl(&vm.api)
        .args(["events", "--since", "x"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    vm.stop();
}

#[test]
fn a_stop_signal_presses_the_power_button() {
    let mut vm = Vm::start("signal", "power_wait", &["--graceful-stop", "20s"]);
    vm.wait_for_serial("w");
    // The guest powers off at once: the client must be waiting before the signal.
    let api = vm.api.clone();
    let waiter = std::thread::spawn(move || {
        let a = Client::new(&api, Duration::from_secs(40))
            .unwrap()
            .call(Method::GET, "/vm/events?since=0&timeout=20", None)
            .unwrap();
        serde_json::from_slice::<EventsReply>(&a.body).unwrap()
    });
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill() only sends a signal, to our own child process.
    let sent = unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let first = waiter.join().unwrap();
    assert_eq!(
        first.events[0].kind,
        EventKind::ShutdownRequested,
        "{first:?}"
    );
    let detail = first.events[0].detail.clone().unwrap();
    assert!(
        detail.starts_with("stop signal: power button pressed"),
        "{detail}"
    );
    let t = Instant::now();
    while vm.child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(20), "{}", vm.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}
