//! The API server against a fake VM: every route and error status, hostile clients (huge
//! bodies, bad JSON, garbage, slow and vanishing clients, too many connections), keep-alive,
//! the socket's mode.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hype_api::http::Limits;
use hype_api::model::*;
use hype_api::ApiServer;

/// A VM that only keeps a state and counts calls.
struct Fake {
    state: Mutex<VmState>,
    shutdowns: Mutex<Vec<Duration>>,
    infos: AtomicUsize,
}

impl Fake {
    fn new() -> Arc<Fake> {
        Arc::new(Fake {
            state: Mutex::new(VmState::Running),
            shutdowns: Mutex::new(vec![]),
            infos: AtomicUsize::new(0),
        })
    }
}

impl VmApi for Fake {
    fn info(&self) -> VmInfo {
        self.infos.fetch_add(1, Ordering::SeqCst);
        VmInfo {
            state: *self.state.lock().unwrap(),
            uptime_ms: 1,
            config: VmConfigInfo {
                kernel: Some("k".into()),
                initrd: None,
                cmdline: Some("c".into()),
                memory_bytes: 64 << 20,
                cpus: 1,
                serial: "none".into(),
                emulation_fixups: false,
            },
            vcpus: vec![],
            memory: MemoryInfo {
                bytes: 64 << 20,
                regions: vec![],
            },
            devices: vec![],
            counters: Counters {
                mmio_unclaimed: 0,
                fixups: Default::default(),
                fixups_unhandled: 0,
                interrupts: Default::default(),
            },
        }
    }
    fn pause(&self) -> Result<ActionReply, ControlError> {
        let mut s = self.state.lock().unwrap();
        if *s == VmState::Paused {
            return Err(ControlError::AlreadyPaused);
        }
        *s = VmState::Paused;
        Ok(ActionReply::state(*s))
    }
    fn resume(&self) -> Result<ActionReply, ControlError> {
        let mut s = self.state.lock().unwrap();
        if *s != VmState::Paused {
            return Err(ControlError::NotPaused);
        }
        *s = VmState::Running;
        Ok(ActionReply::state(*s))
    }
    fn shutdown(&self, timeout: Duration) -> Result<ActionReply, ControlError> {
        self.shutdowns.lock().unwrap().push(timeout);
        Ok(ActionReply {
            state: VmState::ShuttingDown,
            power_button: Some(false),
            timeout_ms: Some(timeout.as_millis() as u64),
        })
    }
    fn stop(&self) -> Result<ActionReply, ControlError> {
        Ok(ActionReply::state(VmState::Stopping))
    }
    fn add_device(&self, _: &AddDeviceRequest) -> Result<DeviceInfo, ControlError> {
        Err(ControlError::Unavailable("no hot-plug in the fake".into()))
    }
    fn remove_device(&self, id: &str) -> Result<(), ControlError> {
        Err(ControlError::NoSuchDevice(id.into()))
    }
    fn refresh_device_config(&self, id: &str) -> Result<ConfigRefreshReply, ControlError> {
        if id != "virtio0" {
            return Err(ControlError::NoSuchDevice(id.into()));
        }
        Ok(ConfigRefreshReply {
            id: id.into(),
            changed: true,
            config: "capacity 2048 sectors".into(),
        })
    }
    // switch_backend: the trait's default (501).
}

fn socket(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("api-server");
    std::fs::create_dir_all(&d).unwrap();
    d.join(format!("{name}.sock"))
}

fn start(name: &str, limits: Limits) -> (ApiServer, Arc<Fake>, PathBuf) {
    let path = socket(name);
    let fake = Fake::new();
    let server = ApiServer::start_with(&path, fake.clone(), limits).unwrap();
    (server, fake, path)
}

/// Sends raw bytes, reads the whole answer (the server closes after it or after `wait`).
fn raw(path: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

fn body_of(answer: &str) -> serde_json::Value {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

fn req(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn socket_is_private_and_removed_on_close() {
    let (server, _, path) = start("mode", Limits::default());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    // A second server on the same live socket is refused.
    let again = ApiServer::start(&path, Fake::new());
    assert!(
        matches!(again, Err(hype_api::server::ServerError::InUse(_))),
        "{:?}",
        again.err()
    );
    server.close(Duration::from_millis(100));
    assert!(!path.exists());
    // A stale socket file is replaced; a regular file is not touched.
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(l);
    let s = ApiServer::start(&path, Fake::new()).unwrap();
    s.close(Duration::ZERO);
    std::fs::write(&path, b"x").unwrap();
    assert!(matches!(
        ApiServer::start(&path, Fake::new()),
        Err(hype_api::server::ServerError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"x");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn every_route_and_status() {
    let (_server, fake, path) = start("routes", Limits::default());
    let a = raw(&path, &req("GET", "/vm", ""));
    assert_eq!(status_of(&a), 200, "{a}");
    assert!(a.contains("Content-Type: application/json"), "{a}");
    assert_eq!(body_of(&a)["state"], "running");
    // A query string is ignored.
    assert_eq!(status_of(&raw(&path, &req("GET", "/vm?x=1", ""))), 200);

    let a = raw(&path, &req("POST", "/vm/pause", ""));
    assert_eq!(
        (status_of(&a), body_of(&a)["state"].clone()),
        (200, "paused".into())
    );
    let a = raw(&path, &req("POST", "/vm/pause", "{}"));
    assert_eq!(status_of(&a), 409, "{a}");
    assert_eq!(body_of(&a)["error"], "the VM is already paused");
    assert_eq!(status_of(&raw(&path, &req("POST", "/vm/resume", ""))), 200);
    assert_eq!(status_of(&raw(&path, &req("POST", "/vm/resume", ""))), 409);

    let a = raw(
        &path,
        &req("POST", "/vm/shutdown", r#"{"timeout_ms": 1500}"#),
    );
    assert_eq!(status_of(&a), 202, "{a}");
    assert_eq!(body_of(&a)["timeout_ms"], 1500);
    assert_eq!(
        status_of(&raw(&path, &req("POST", "/vm/shutdown", ""))),
        202
    );
    assert_eq!(
        *fake.shutdowns.lock().unwrap(),
        vec![Duration::from_millis(1500), DEFAULT_SHUTDOWN_TIMEOUT]
    );
    let a = raw(
        &path,
        &req("POST", "/vm/shutdown", r#"{"timeout_ms": 3600001}"#),
    );
    assert_eq!(status_of(&a), 400, "{a}");
    let a = raw(&path, &req("POST", "/vm/shutdown", r#"{"timeout_ms": -1}"#));
    assert_eq!(status_of(&a), 400, "{a}");
    let a = raw(&path, &req("POST", "/vm/shutdown", r#"{"timeout": 5}"#));
    assert_eq!(status_of(&a), 400, "unknown field: {a}");
    assert_eq!(status_of(&raw(&path, &req("POST", "/vm/stop", ""))), 202);

    // Bad JSON, wrong shapes.
    for b in ["{", "[]", "null", "\"x\"", "{\"a\":1}", "\u{0}\u{1}"] {
        let a = raw(&path, &req("POST", "/vm/pause", b));
        assert_eq!(status_of(&a), 400, "{b:?}: {a}");
        assert!(body_of(&a)["error"]
            .as_str()
            .unwrap()
            .starts_with("bad JSON body"));
    }
    // Devices.
    let a = raw(&path, &req("POST", "/vm/devices", ""));
    assert_eq!(status_of(&a), 400, "{a}");
    let a = raw(&path, &req("POST", "/vm/devices", r#"{"socket": 3}"#));
    assert_eq!(status_of(&a), 400, "{a}");
    let a = raw(&path, &req("POST", "/vm/devices", r#"{"socket": "/x"}"#));
    assert_eq!(status_of(&a), 501, "{a}");
    let a = raw(&path, &req("DELETE", "/vm/devices/virtio7", ""));
    assert_eq!(status_of(&a), 404, "{a}");
    assert_eq!(body_of(&a)["error"], "no device virtio7");

    // Unknown paths and methods.
    for p in [
        "/",
        "/vm/",
        "/vmx",
        "/vm/devices/",
        "/vm/devices/a/b",
        "/../etc",
    ] {
        assert_eq!(status_of(&raw(&path, &req("GET", p, ""))), 404, "{p}");
    }
    let a = raw(&path, &req("DELETE", "/vm", ""));
    assert_eq!(status_of(&a), 405, "{a}");
    assert!(a.contains("Allow: GET\r\n"), "{a}");
    let a = raw(&path, &req("GET", "/vm/pause", ""));
    assert_eq!(status_of(&a), 405);
    assert!(a.contains("Allow: POST\r\n"), "{a}");
    assert_eq!(
        status_of(&raw(&path, &req("GET", "/vm/devices/virtio0", ""))),
        405
    );
    assert_eq!(status_of(&raw(&path, &req("BREW", "/vm", ""))), 405);
}

#[test]
fn malformed_and_oversized_requests() {
    let (_server, _, path) = start("hostile", Limits::default());
    // A body over the limit is refused from its Content-Length, before it is read.
    let a = raw(
        &path,
        b"POST /vm/pause HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
    );
    assert_eq!(status_of(&a), 413, "{a}");
    // ... and also when it is actually sent.
    let mut big = req("POST", "/vm/shutdown", &"x".repeat(1 << 20));
    big.truncate(big.len());
    assert_eq!(status_of(&raw(&path, &big)), 413);
    // Garbage, bad lengths, chunked, HTTP/2, a head that never ends.
    let cases: &[(&[u8], u16)] = &[
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        (b"GET /vm HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (
            b"GET /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
        ),
        (
            b"POST /vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
        (b"GET /vm HTTP/2.0\r\n\r\n", 400),
        (b"GET /vm FOO/1.1\r\n\r\n", 400),
    ];
    for (bytes, want) in cases {
        let a = raw(&path, bytes);
        assert_eq!(
            status_of(&a),
            *want,
            "{:?}: {a}",
            String::from_utf8_lossy(bytes)
        );
    }
    let mut long = b"GET /vm HTTP/1.1\r\n".to_vec();
    for i in 0..10 {
        long.extend_from_slice(format!("X-H{i}: {}\r\n", "v".repeat(1000)).as_bytes());
    }
    assert_eq!(status_of(&raw(&path, &long)), 431);
    let mut many = b"GET /vm HTTP/1.1\r\n".to_vec();
    for i in 0..40 {
        many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(status_of(&raw(&path, &many)), 431, "too many headers");
    // The server still answers.
    assert_eq!(status_of(&raw(&path, &req("GET", "/vm", ""))), 200);
}

#[test]
fn keep_alive_and_pipelining() {
    let (_server, fake, path) = start("keepalive", Limits::default());
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Two requests in one write, then a third that closes.
    s.write_all(b"GET /vm HTTP/1.1\r\n\r\nPOST /vm/pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    s.write_all(b"GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 3, "{out}");
    assert_eq!(out.matches("Connection: close").count(), 1, "{out}");
    assert_eq!(fake.infos.load(Ordering::SeqCst), 2);
    assert!(out.ends_with(r#""interrupts":{}}}"#), "{out}");
}

#[test]
fn a_head_answer_has_no_body() {
    // Found writing the api_request fuzz target's invariants: the 405 to HEAD carried its JSON
    // body, which a client reads as the start of the next response.
    let (_server, _, path) = start("head", Limits::default());
    let out = raw(
        &path,
        b"HEAD /vm HTTP/1.1\r\n\r\nGET /vm HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    let (first, rest) = out.split_once("\r\n\r\n").unwrap();
    assert!(first.starts_with("HTTP/1.1 405 "), "{out}");
    let headers: Vec<&str> = first.split("\r\n").collect();
    assert!(headers.contains(&"Content-Length: 0"), "{out}");
    assert!(headers.contains(&"Allow: GET"), "{out}");
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
}

#[test]
fn slow_and_vanishing_clients() {
    let limits = Limits {
        request_timeout: Duration::from_millis(400),
        idle_timeout: Duration::from_millis(800),
        ..Limits::default()
    };
    let (_server, _, path) = start("slow", limits);
    // A client that trickles its request byte by byte is cut off at the request deadline.
    let mut s = UnixStream::connect(&path).unwrap();
    let t = Instant::now();
    let mut cut = false;
    for b in b"GET /vm HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n" {
        if s.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(cut || out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(3));
    // Clients that vanish mid-head and mid-body.
    for part in [
        &b"GET /vm HTT"[..],
        b"POST /vm/pause HTTP/1.1\r\nContent-Length: 10\r\n\r\n{",
    ] {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(part).unwrap();
        drop(s);
    }
    assert_eq!(status_of(&raw(&path, &req("GET", "/vm", ""))), 200);
}

#[test]
fn idle_clients_fill_the_slots_until_they_time_out() {
    let limits = Limits {
        idle_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let (_server, _, path) = start("slots", limits);
    // Every connection slot taken by an idle client: the next one gets 503 at once, and once
    // they time out the server answers again.
    let t = Instant::now();
    let idle: Vec<UnixStream> = (0..hype_api::server::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let a = raw(&path, &req("GET", "/vm", ""));
    assert!(t.elapsed() < Duration::from_secs(2), "too slow to tell");
    assert_eq!(status_of(&a), 503, "{a}");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(status_of(&raw(&path, &req("GET", "/vm", ""))), 200);
    drop(idle);
}

#[test]
fn many_concurrent_clients() {
    let (_server, fake, path) = start("concurrent", Limits::default());
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    let a = raw(&path, &req("GET", "/vm", ""));
                    assert_eq!(status_of(&a), 200, "{a}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(fake.infos.load(Ordering::SeqCst), 200);
}

#[test]
fn null_and_unknown_values_are_refused() {
    let (_server, _, path) = start("nulls", Limits::default());
    for (p, b) in [
        ("/vm/shutdown", r#"{"timeout_ms": null}"#),
        ("/vm/shutdown", r#"{"timeout_ms": 1.5}"#),
        ("/vm/devices", r#"{"socket": "/x", "type": null}"#),
        ("/vm/devices", r#"{"socket": "/x", "type": "AAA"}"#),
        ("/vm/devices", r#"{"type": "blk"}"#),
    ] {
        let a = raw(&path, &req("POST", p, b));
        assert_eq!(status_of(&a), 400, "{p} {b}: {a}");
    }
}

#[test]
fn device_resize_and_backend_routes() {
    let (server, _fake, path) = start("device-actions", Limits::default());
    let a = raw(&path, &req("POST", "/vm/devices/virtio0/resize", ""));
    assert_eq!(status_of(&a), 200, "{a}");
    let b = body_of(&a);
    assert_eq!(
        (b["id"].as_str(), b["changed"].as_bool()),
        (Some("virtio0"), Some(true)),
        "{a}"
    );
    assert_eq!(b["config"], "capacity 2048 sectors");
    // An empty object is an empty body; anything else is refused.
    assert_eq!(
        status_of(&raw(
            &path,
            &req("POST", "/vm/devices/virtio0/resize", "{}")
        )),
        200
    );
    assert_eq!(
        status_of(&raw(
            &path,
            &req("POST", "/vm/devices/virtio0/resize", "{\"size\":1}")
        )),
        400
    );
    assert_eq!(
        status_of(&raw(&path, &req("POST", "/vm/devices/virtio9/resize", ""))),
        404
    );
    let a = raw(&path, &req("GET", "/vm/devices/virtio0/resize", ""));
    assert_eq!(status_of(&a), 405, "{a}");
    assert!(a.contains("Allow: POST"), "{a}");
    // The backend switch: a body with the socket is required; the fake cannot switch.
    let sw = req(
        "PUT",
        "/vm/devices/virtio0/backend",
        "{\"socket\":\"/tmp/x.sock\"}",
    );
    assert_eq!(status_of(&raw(&path, &sw)), 501);
    assert_eq!(
        status_of(&raw(&path, &req("PUT", "/vm/devices/virtio0/backend", ""))),
        400
    );
    assert_eq!(
        status_of(&raw(
            &path,
            &req("PUT", "/vm/devices/virtio0/backend", "{\"socket\":1}")
        )),
        400
    );
    let a = raw(&path, &req("POST", "/vm/devices/virtio0/backend", "{}"));
    assert_eq!(status_of(&a), 405, "{a}");
    assert!(a.contains("Allow: PUT"), "{a}");
    for p in [
        "/vm/devices/virtio0/other",
        "/vm/devices//resize",
        "/vm/devices/virtio0/resize/x",
        "/vm/devices/virtio0/",
    ] {
        assert_eq!(status_of(&raw(&path, &req("POST", p, ""))), 404, "{p}");
    }
    server.close(Duration::from_secs(1));
}

#[test]
fn events_query_is_checked_before_the_vm_is_asked() {
    let (server, _, path) = start("events", Limits::default());
    let get = |q: &str| raw(&path, &req("GET", &format!("/vm/events{q}"), ""));
    // A VM without an event log (the trait's default) answers 501.
    for q in [
        "",
        "?since=3",
        "?since=3&timeout=0",
        "?timeout=30#frag",
        "?&since=1&",
    ] {
        assert_eq!(status_of(&get(q)), 501, "{q}");
    }
    for (q, why) in [
        (
            "?since=x",
            "since must be a whole number of events, not \"x\"",
        ),
        (
            "?since=",
            "since must be a whole number of events, not \"\"",
        ),
        (
            "?since=18446744073709551616",
            "since must be a whole number",
        ),
        ("?timeout=31", "timeout 31 is more than 30 seconds"),
        ("?timeout=-1", "timeout must be a whole number of seconds"),
        ("?since", "since must be a whole number"),
        (
            "?follow=1",
            "unknown query parameter \"follow\"; use since and timeout",
        ),
    ] {
        let a = get(q);
        assert_eq!(status_of(&a), 400, "{q}: {a}");
        let e = body_of(&a)["error"].as_str().unwrap().to_owned();
        assert!(e.starts_with(why), "{q}: {e}");
    }
    assert_eq!(
        status_of(&raw(&path, &req("DELETE", "/vm/events", ""))),
        405
    );
    server.close(Duration::ZERO);
}
