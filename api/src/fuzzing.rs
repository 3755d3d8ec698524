//! Entry point for the fuzz target in `fuzz/` (hidden from the docs; no stability promise).
//!
//! [`request`] serves one connection whose client sends the fuzzer's bytes (one request, or
//! several pipelined) against a fake VM, through the same reader, router and writer a real
//! connection goes through, and checks every answer. A panic here is a bug found.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Duration;

use crate::events::{EventsReply, MAX_EVENTS_TIMEOUT};
use crate::http::{reason, Limits};
use crate::model::{
    ActionReply, AddDeviceRequest, BackendState, ConfigRefreshReply, ControlError, Counters,
    DeviceInfo, MemoryInfo, SnapshotReply, SwitchBackendRequest, VmApi, VmConfigInfo, VmInfo,
    VmState, MAX_SHUTDOWN_TIMEOUT,
};

/// Most devices the fake VM holds.
const MAX_DEVICES: usize = 4;
/// Most bytes of one connection's input (all are written before the server reads: they must
/// fit the socket's buffer).
const MAX_INPUT: usize = 64 * 1024;

/// A VM that keeps a state and a few devices, and checks what the router hands it.
struct Fake {
    state: Mutex<VmState>,
    devices: Mutex<Vec<DeviceInfo>>,
}

impl Fake {
    fn state(&self) -> std::sync::MutexGuard<'_, VmState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, Vec<DeviceInfo>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn running(&self) -> Result<(), ControlError> {
        match *self.state() {
            VmState::Stopping => Err(ControlError::Stopping),
            VmState::ShuttingDown => Err(ControlError::ShuttingDown),
            VmState::Running | VmState::Paused => Ok(()),
        }
    }

    fn device(&self, id: &str) -> Result<DeviceInfo, ControlError> {
        self.devices()
            .iter()
            .find(|d| d.id == id)
            .cloned()
            .ok_or_else(|| ControlError::NoSuchDevice(id.to_owned()))
    }
}

fn device(id: String, socket: &str) -> DeviceInfo {
    DeviceInfo {
        id,
        kind: "blk".into(),
        socket: socket.to_owned(),
        mmio_base: 0xd000_0000,
        gsi: 5,
        backend: BackendState::Connected,
        lost_for_ms: None,
        queues: 1,
        reconnects: 0,
        ring_starts: 1,
        notify_exits: 0,
        guest_errors: 0,
        status: 0xf,
    }
}

impl VmApi for Fake {
    fn info(&self) -> VmInfo {
        VmInfo {
            state: *self.state(),
            uptime_ms: 1,
            config: VmConfigInfo {
                kernel: Some("bzImage".into()),
                initrd: None,
                cmdline: Some("console=ttyS0".into()),
                memory_bytes: 64 << 20,
                cpus: 1,
                serial: "none".into(),
                emulation_fixups: false,
            },
            vcpus: Vec::new(),
            memory: MemoryInfo {
                bytes: 64 << 20,
                regions: Vec::new(),
            },
            devices: self.devices().clone(),
            counters: Counters {
                mmio_unclaimed: 0,
                fixups: Default::default(),
                fixups_unhandled: 0,
                interrupts: Default::default(),
            },
        }
    }

    fn pause(&self) -> Result<ActionReply, ControlError> {
        self.running()?;
        let mut s = self.state();
        if *s == VmState::Paused {
            return Err(ControlError::AlreadyPaused);
        }
        *s = VmState::Paused;
        Ok(ActionReply::state(*s))
    }

    fn resume(&self) -> Result<ActionReply, ControlError> {
        self.running()?;
        let mut s = self.state();
        if *s != VmState::Paused {
            return Err(ControlError::NotPaused);
        }
        *s = VmState::Running;
        Ok(ActionReply::state(*s))
    }

    fn shutdown(&self, timeout: Duration) -> Result<ActionReply, ControlError> {
        assert!(
            timeout <= MAX_SHUTDOWN_TIMEOUT,
            "shutdown timeout {timeout:?}"
        );
        self.running()?;
        *self.state() = VmState::ShuttingDown;
        Ok(ActionReply {
            state: VmState::ShuttingDown,
            power_button: Some(true),
            timeout_ms: Some(timeout.as_millis() as u64),
        })
    }

    fn stop(&self) -> Result<ActionReply, ControlError> {
        *self.state() = VmState::Stopping;
        Ok(ActionReply::state(VmState::Stopping))
    }

    fn add_device(&self, req: &AddDeviceRequest) -> Result<DeviceInfo, ControlError> {
        self.running()?;
        if req.socket.is_empty() {
            return Err(ControlError::BadValue("an empty socket path".into()));
        }
        let mut devices = self.devices();
        if devices.len() >= MAX_DEVICES {
            return Err(ControlError::Conflict("no free device slot".into()));
        }
        let d = device(format!("virtio{}", devices.len()), &req.socket);
        devices.push(d.clone());
        Ok(d)
    }

    fn remove_device(&self, id: &str) -> Result<(), ControlError> {
        self.running()?;
        let mut devices = self.devices();
        let at = devices
            .iter()
            .position(|d| d.id == id)
            .ok_or_else(|| ControlError::NoSuchDevice(id.to_owned()))?;
        devices.remove(at);
        Ok(())
    }

    fn snapshot(&self, dir: &str) -> Result<SnapshotReply, ControlError> {
        if *self.state() != VmState::Paused {
            return Err(ControlError::Conflict("the VM is not paused".into()));
        }
        Ok(SnapshotReply {
            dir: dir.to_owned(),
            memory_pages: 3,
            memory_bytes_written: 3 * 4096,
            took_ms: 1,
        })
    }

    fn refresh_device_config(&self, id: &str) -> Result<ConfigRefreshReply, ControlError> {
        let d = self.device(id)?;
        Ok(ConfigRefreshReply {
            id: d.id,
            changed: false,
            config: "1 GiB".into(),
        })
    }

    fn events(&self, since: u64, timeout: Duration) -> Result<EventsReply, ControlError> {
        assert!(timeout <= MAX_EVENTS_TIMEOUT, "events timeout {timeout:?}");
        Ok(EventsReply {
            events: Vec::new(),
            last_seq: since,
            dropped: 0,
        })
    }

    fn switch_backend(
        &self,
        id: &str,
        req: &SwitchBackendRequest,
    ) -> Result<DeviceInfo, ControlError> {
        self.running()?;
        let mut devices = self.devices();
        let d = devices
            .iter_mut()
            .find(|d| d.id == id)
            .ok_or_else(|| ControlError::NoSuchDevice(id.to_owned()))?;
        d.socket.clone_from(&req.socket);
        Ok(d.clone())
    }
}

/// Small limits, so that an input of a few KiB reaches each of them.
const SMALL: Limits = Limits {
    max_head: 512,
    max_headers: 8,
    max_body: 256,
    request_timeout: Duration::from_secs(5),
    idle_timeout: Duration::from_secs(15),
    write_timeout: Duration::from_secs(5),
};

/// Serves one connection whose client sends `data` after its first byte and then shuts its
/// side down; the first byte's bit 0 picks small limits (else the defaults), bit 1 starts the
/// fake VM paused. Checks: the connection ends; the output is nothing but well-formed
/// HTTP/1.1 responses, each with a status in 200..600 and its reason, a `Content-Length` that
/// is its body's length, a JSON body (never over a bound set by the input's size) marked as
/// such, `Allow` on a 405 and no body on a 204, nothing after a `Connection: close`; the
/// router never hands the VM a timeout over the documented maximum; a first request whose head
/// alone is refused gets the status its refusal has (a `Content-Length` over the body limit
/// 413, a head over the head limit 431, see `first_status`); an answer to HEAD has no body.
pub fn request(data: &[u8]) {
    serve(data);
}

/// [`request`], returning the statuses answered.
fn serve(data: &[u8]) -> Vec<u16> {
    let Some((&flags, input)) = data.split_first() else {
        return Vec::new();
    };
    let input = &input[..input.len().min(MAX_INPUT)];
    let limits = if flags & 1 != 0 {
        SMALL
    } else {
        Limits::default()
    };
    let fake = Fake {
        state: Mutex::new(if flags & 2 != 0 {
            VmState::Paused
        } else {
            VmState::Running
        }),
        devices: Mutex::new(vec![device("virtio0".into(), "/run/blk.sock")]),
    };
    let Ok((mut client, server)) = UnixStream::pair() else {
        return Vec::new();
    };
    if client.write_all(input).is_err() || client.shutdown(std::net::Shutdown::Write).is_err() {
        return Vec::new();
    }
    // The answers are read while they are written: they may not fit the socket's buffer.
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out);
        out
    });
    // On a thread like a real connection's: its stack is small.
    let served = std::thread::Builder::new()
        .stack_size(crate::server::CONNECTION_STACK)
        .spawn(move || {
            crate::server::serve_connection(server, &fake, limits, &AtomicBool::new(false));
        });
    let Ok(served) = served else {
        return Vec::new();
    };
    assert!(served.join().is_ok(), "the connection thread panicked");
    let Ok(out) = reader.join() else {
        panic!("the reading thread panicked");
    };
    let answers = check_responses(&out, input.len());
    if let Some(want) = first_status(input, &limits) {
        assert_eq!(answers.first().map(|a| a.0), Some(want), "first answer");
    }
    if first_method(input, &limits) == Some("HEAD") {
        if let Some((status, len)) = answers.first() {
            assert_eq!(*len, 0, "a {status} to HEAD with a body");
        }
    }
    answers.into_iter().map(|a| a.0).collect()
}

/// The method of the first request, when its head is complete.
fn first_method<'a>(input: &'a [u8], limits: &Limits) -> Option<&'a str> {
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(input) {
        Ok(httparse::Status::Complete(_)) => req.method,
        _ => None,
    }
}

/// Checks that `out` is a sequence of well-formed responses; returns their statuses and body
/// lengths.
fn check_responses(mut out: &[u8], input_len: usize) -> Vec<(u16, usize)> {
    let max_body = 4096 + 8 * input_len;
    let mut statuses = Vec::new();
    while !out.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(out) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!(
                "not a response: {other:?} in {:?}",
                String::from_utf8_lossy(out)
            ),
        };
        assert_eq!(resp.version, Some(1), "HTTP/1.1");
        let status = resp.code.unwrap_or(0);
        assert!((200..600).contains(&status), "status {status}");
        assert_eq!(resp.reason, Some(reason(status)), "reason of {status}");
        let header = |name: &str| {
            let mut found = resp.headers.iter().filter(|h| h.name == name);
            let first = found.next().map(|h| h.value);
            assert!(found.next().is_none(), "two {name} headers");
            first
        };
        let length: usize = header("Content-Length")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no Content-Length in a {status}"));
        let close = header("Connection") == Some(b"close".as_slice());
        let allow = header("Allow").is_some();
        let json = header("Content-Type") == Some(b"application/json".as_slice());
        assert!(length <= max_body, "a body of {length} bytes");
        let body = out
            .get(head_len..head_len + length)
            .unwrap_or_else(|| panic!("a body cut short"));
        assert_eq!(allow, status == 405, "Allow on a {status}");
        assert_eq!(json, length > 0, "Content-Type of a {status}");
        if status == 204 {
            assert_eq!(length, 0, "a body on a 204");
        }
        if length > 0 {
            let v: serde_json::Value =
                serde_json::from_slice(body).unwrap_or_else(|e| panic!("a JSON body: {e}"));
            if status >= 400 {
                assert!(v.get("error").is_some_and(|e| e.is_string()), "{v}");
            }
        }
        statuses.push((status, length));
        out = &out[head_len + length..];
        if close {
            assert!(out.is_empty(), "bytes after Connection: close");
        }
    }
    statuses
}

/// The answer the first request must get from its head alone, where that decides it: 400 for
/// a malformed head, a `Content-Length` that is not digits or two that differ, 413 for one over
/// the body limit, 431 for a head that does not fit the head limit, 501 for a transfer coding.
fn first_status(input: &[u8], limits: &Limits) -> Option<u16> {
    let head = &input[..input.len().min(limits.max_head)];
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Partial) if head.len() == limits.max_head => Some(431),
        Err(httparse::Error::TooManyHeaders) => Some(431),
        Err(_) => Some(400),
        Ok(httparse::Status::Complete(_)) if req.version == Some(1) || req.version == Some(0) => {
            // The head's own errors, in header order: chunked 501, a length that is not
            // digits or a second, different one 400; then a length over the limit 413.
            let mut length = None;
            for h in req.headers.iter() {
                if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    return Some(501);
                }
                if h.name.eq_ignore_ascii_case("content-length") {
                    let v = h.value.trim_ascii();
                    let digits = !v.is_empty() && v.iter().all(u8::is_ascii_digit);
                    let Some(v) = std::str::from_utf8(v)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                        .filter(|_| digits)
                    else {
                        return Some(400);
                    };
                    if length.is_some_and(|l| l != v) {
                        return Some(400);
                    }
                    length = Some(v);
                }
            }
            length.filter(|l| *l > limits.max_body as u64).map(|_| 413)
        }
        _ => None,
    }
}

/// Seed inputs for the fuzz target (`fuzz/corpus/api_request/`): a name, the input, and the
/// statuses it is answered with.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, Vec<u16>)> {
    let with = |flags: u8, text: &str| {
        let mut v = vec![flags];
        v.extend_from_slice(text.as_bytes());
        v
    };
    let post = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let put = |path: &str, body: &str| {
        format!(
            "PUT {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    vec![
        ("get-vm", with(0, "GET /vm HTTP/1.1\r\nHost: hype\r\n\r\n"), vec![200]),
        (
            "pipelined",
            with(
                0,
                &format!(
                    "GET /vm HTTP/1.1\r\n\r\n{}{}GET /vm/events?since=0&timeout=0 HTTP/1.1\r\n\r\nDELETE /vm/devices/virtio0 HTTP/1.1\r\nConnection: close\r\n\r\n",
                    post("/vm/pause", ""),
                    post("/vm/resume", "{}"),
                ),
            ),
            vec![200, 200, 200, 200, 204],
        ),
        (
            "shutdown",
            with(0, &post("/vm/shutdown", r#"{"timeout_ms": 2500}"#)),
            vec![202],
        ),
        (
            "add-device",
            with(0, &post("/vm/devices", r#"{"socket": "/run/net.sock", "type": "net"}"#)),
            vec![200],
        ),
        (
            "switch-backend",
            with(0, &put("/vm/devices/virtio0/backend", r#"{"socket": "/run/b.sock"}"#)),
            vec![200],
        ),
        (
            "resize",
            with(0, "POST /vm/devices/virtio0/resize HTTP/1.0\r\n\r\n"),
            vec![200],
        ),
        (
            "snapshot-paused",
            with(2, &put("/vm/snapshot", r#"{"dir": "/tmp/snap"}"#)),
            vec![200],
        ),
        (
            "stop-keep-alive",
            with(
                0,
                "POST /vm/stop HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /nowhere HTTP/1.1\r\n\r\n",
            ),
            vec![202, 404],
        ),
        (
            "body-too-large",
            with(1, "POST /vm/devices HTTP/1.1\r\nContent-Length: 100000\r\n\r\n{}"),
            vec![413],
        ),
        (
            "bad-json",
            with(1, &post("/vm/devices", r#"{"socket": 5}"#)),
            vec![400],
        ),
        (
            "chunked",
            with(0, "POST /vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            vec![501],
        ),
        ("wrong-method", with(0, "PUT /vm HTTP/1.1\r\n\r\n"), vec![405]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_get_their_answers() {
        for (name, input, want) in seeds() {
            assert_eq!(serve(&input), want, "{name}");
        }
    }

    #[test]
    fn a_head_request_gets_no_body() {
        // The harness's own check (tests/server.rs has the server's).
        let input = b"\0HEAD /vm HTTP/1.1\r\n\r\nGET /vm HTTP/1.1\r\n\r\n";
        assert_eq!(serve(input), vec![405, 200]);
    }

    #[test]
    fn deeply_nested_json_is_refused_on_a_connection_stack() {
        for depth in [100, 127, 128, 129, 200, 10_000] {
            let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let mut input = vec![0u8];
            input.extend_from_slice(
                format!(
                    "POST /vm/devices HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            assert_eq!(serve(&input), vec![400], "depth {depth}");
            let mut input = vec![0u8];
            let body = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
            input.extend_from_slice(
                format!(
                    "PUT /vm/devices/virtio0/backend HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            assert_eq!(serve(&input), vec![400], "objects, depth {depth}");
        }
    }

    #[test]
    fn a_head_over_the_limit_is_431_and_garbage_is_400() {
        let mut long = vec![1u8];
        long.extend_from_slice(b"GET /vm HTTP/1.1\r\nX: ");
        long.resize(SMALL.max_head + 10, b'a');
        assert_eq!(serve(&long), vec![431]);
        assert_eq!(serve(b"\0\x01\x02 garbage\r\n\r\n"), vec![400]);
        // Cut short: closed without an answer.
        assert_eq!(serve(b"\0GET /vm HTTP/1.1\r\n"), Vec::<u16>::new());
    }

    /// Writes the seeds into `fuzz/corpus/api_request/` (run it by name with `--ignored` after
    /// changing them).
    #[test]
    #[ignore = "writes the fuzz seed corpus"]
    fn write_fuzz_seeds() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/api_request");
        std::fs::create_dir_all(&dir).expect("creating the corpus directory");
        for (name, input, _) in seeds() {
            std::fs::write(dir.join(name), input).expect("writing a seed");
        }
    }
}
