//! The API server: a Unix socket (mode 0600), an accept thread, one short-lived thread per
//! connection (at most [`MAX_CONNECTIONS`] at once), and the routes onto [`VmApi`].
//!
//! Nothing here can stop or block the VM: the vCPUs never wait for the server, each request is
//! bounded in size and time ([`Limits`]), and a request the server cannot understand is
//! answered with a 4xx status and one line of JSON.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::events::MAX_EVENTS_TIMEOUT;
use crate::http::{Limits, ReadError, Reader, Request, Response};
use crate::model::{
    AddDeviceRequest, ControlError, EmptyRequest, ErrorReply, ShutdownRequest, SnapshotRequest,
    SwitchBackendRequest, VmApi, DEFAULT_SHUTDOWN_TIMEOUT, MAX_SHUTDOWN_TIMEOUT,
};

/// Most connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 16;

/// Stack of a connection thread.
pub(crate) const CONNECTION_STACK: usize = 256 * 1024;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Something is at the socket path and it is not a stale socket.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Another process serves the socket.
    #[error("{0} is in use by another process")]
    InUse(PathBuf),
    /// Removing a stale socket failed.
    #[error("cannot remove the stale socket {path}")]
    RemoveStale {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Binding failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Setting the mode failed.
    #[error("cannot make {path} mode 0600")]
    Mode {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The accept thread or its wake-up pipe could not be created.
    #[error("cannot start the API thread")]
    Thread(#[source] io::Error),
}

/// A running API server; [`ApiServer::close`] (or drop) stops it and removes the socket.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    wake: std::os::fd::OwnedFd,
    active: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

fn bind_private(path: &Path) -> Result<UnixListener, ServerError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => return Err(ServerError::NotASocket(path.to_owned())),
        Err(_) => {}
    }
    // The socket is created with mode 0600 (umask 0177 around bind), so nobody else can
    // connect even for a moment; the chmod after it is for file systems that ignore the umask.
    // SAFETY: umask only changes the process's file mode creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| ServerError::Bind {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ServerError::Mode {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// A pipe whose read end becomes readable when the server must stop.
fn wake_pipe() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are fresh descriptors owned by nobody else.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

impl ApiServer {
    /// Listens on `path` and serves `api` with the default [`Limits`].
    pub fn start(path: &Path, api: Arc<dyn VmApi>) -> Result<ApiServer, ServerError> {
        Self::start_with(path, api, Limits::default())
    }

    /// Listens on `path` and serves `api` with `limits`.
    pub fn start_with(
        path: &Path,
        api: Arc<dyn VmApi>,
        limits: Limits,
    ) -> Result<ApiServer, ServerError> {
        let listener = bind_private(path)?;
        let (wake_rx, wake_tx) = wake_pipe().map_err(ServerError::Thread)?;
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let ctx = Accept {
            listener,
            wake: wake_rx,
            stop: stop.clone(),
            active: active.clone(),
            api,
            limits,
        };
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || ctx.run())
            .map_err(ServerError::Thread)?;
        log::info!("API server on {}", path.display());
        Ok(ApiServer {
            path: path.to_owned(),
            stop,
            wake: wake_tx,
            active,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, waits up to `grace` for the requests being served (so an answer to
    /// "stop" reaches its client), and removes the socket.
    pub fn close(mut self, grace: Duration) {
        self.shut(grace);
    }

    fn shut(&mut self, grace: Duration) {
        self.stop.store(true, Ordering::Release);
        // SAFETY: writing one byte from a valid buffer to our own pipe.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let until = Instant::now() + grace;
        while self.active.load(Ordering::Acquire) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shut(Duration::ZERO);
        }
    }
}

struct Accept {
    listener: UnixListener,
    wake: std::os::fd::OwnedFd,
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    api: Arc<dyn VmApi>,
    limits: Limits,
}

/// Decrements the active count when a connection thread ends, however it ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Accept {
    fn run(self) {
        // The connection threads started from here inherit this thread's filter.
        hype_sandbox::thread::enter(hype_sandbox::thread::API_SERVER);
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            if n <= 0 || fds[0].revents == 0 {
                continue;
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    log::debug!("API: accept: {e}");
                    if e.raw_os_error() == Some(libc::EMFILE) {
                        // Out of descriptors: give the connections in flight time to end.
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    continue;
                }
            };
            self.spawn(stream);
        }
    }

    fn spawn(&self, mut stream: UnixStream) {
        if self.active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            self.active.fetch_sub(1, Ordering::AcqRel);
            let r = error_response(503, "too many API connections; try again");
            let _ = r.write_to(&mut stream, true, Duration::from_millis(100));
            return;
        }
        let slot = Slot(self.active.clone());
        let api = self.api.clone();
        let limits = self.limits;
        let stop = self.stop.clone();
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .stack_size(CONNECTION_STACK)
            .spawn(move || {
                let _slot = slot;
                serve_connection(stream, api.as_ref(), limits, &stop);
            });
        if let Err(e) = spawned {
            // The closure (and with it the slot) was dropped: the count is back.
            log::warn!("API: cannot start a connection thread: {e}");
        }
    }
}

pub(crate) fn serve_connection(
    mut stream: UnixStream,
    api: &dyn VmApi,
    limits: Limits,
    stop: &AtomicBool,
) {
    let mut reader = Reader::new(limits);
    loop {
        let req = match reader.next(&mut stream) {
            Ok(r) => r,
            Err(e) => {
                if let Some(status) = e.status() {
                    log::debug!("API: {e}");
                    let _ = error_response(status, &e.to_string()).write_to(
                        &mut stream,
                        true,
                        limits.write_timeout,
                    );
                } else if !matches!(e, ReadError::Closed | ReadError::Idle) {
                    log::debug!("API: {e}");
                }
                return;
            }
        };
        let mut resp = route(api, &req);
        if req.method == "HEAD" {
            // A response to HEAD has no content (RFC 9110, 9.3.2): a client would take the
            // body for the start of the next response.
            resp.body.clear();
        }
        log::debug!("API: {} {} -> {}", req.method, req.path, resp.status);
        let close = !req.keep_alive || stop.load(Ordering::Acquire);
        if resp
            .write_to(&mut stream, close, limits.write_timeout)
            .is_err()
            || close
        {
            return;
        }
    }
}

fn json<T: Serialize>(status: u16, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => Response {
            status,
            body,
            allow: None,
        },
        Err(e) => error_response(500, &format!("cannot encode the answer: {e}")),
    }
}

/// A JSON error answer with a one-line reason.
pub fn error_response(status: u16, why: &str) -> Response {
    let one_line: String = why.lines().collect::<Vec<_>>().join(" ");
    let body = serde_json::to_vec(&ErrorReply { error: one_line })
        .unwrap_or_else(|_| b"{\"error\":\"unknown\"}".to_vec());
    Response {
        status,
        body,
        allow: None,
    }
}

fn control(status: u16, r: Result<impl Serialize, ControlError>) -> Response {
    match r {
        Ok(v) => json(status, &v),
        Err(e) => error_response(e.status(), &e.to_string()),
    }
}

/// Parses a JSON object body (nothing else: serde would take `[]` for an empty struct).
fn object<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T, Response> {
    let bad = |e: String| error_response(400, &format!("bad JSON body: {e}"));
    let v: serde_json::Value = serde_json::from_slice(&req.body).map_err(|e| bad(e.to_string()))?;
    if !v.is_object() {
        return Err(bad("expected an object".into()));
    }
    serde_json::from_value(v).map_err(|e| bad(e.to_string()))
}

/// Parses an optional JSON body; an empty body is `T::default()`.
fn body<T: serde::de::DeserializeOwned + Default>(req: &Request) -> Result<T, Response> {
    if req.body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    object(req)
}

fn required_body<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T, Response> {
    if req.body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(error_response(400, "a JSON body is required"));
    }
    object(req)
}

fn method_not_allowed(allow: &'static str) -> Response {
    let mut r = error_response(405, &format!("method not allowed; use {allow}"));
    r.allow = Some(allow);
    r
}

fn no_body_action(
    req: &Request,
    f: impl FnOnce() -> Result<crate::model::ActionReply, ControlError>,
    status: u16,
) -> Response {
    if req.method != "POST" {
        return method_not_allowed("POST");
    }
    match body::<EmptyRequest>(req) {
        Ok(_) => control(status, f()),
        Err(r) => r,
    }
}

/// Answers one request.
pub fn route(api: &dyn VmApi, req: &Request) -> Response {
    let path = req.path.as_str();
    match path {
        "/vm" => {
            if req.method == "GET" {
                json(200, &api.info())
            } else {
                method_not_allowed("GET")
            }
        }
        "/vm/events" => {
            if req.method != "GET" {
                return method_not_allowed("GET");
            }
            match events_query(&req.query) {
                Ok((since, timeout)) => control(200, api.events(since, timeout)),
                Err(why) => error_response(400, &why),
            }
        }
        "/vm/pause" => no_body_action(req, || api.pause(), 200),
        "/vm/resume" => no_body_action(req, || api.resume(), 200),
        "/vm/stop" => no_body_action(req, || api.stop(), 202),
        "/vm/shutdown" => {
            if req.method != "POST" {
                return method_not_allowed("POST");
            }
            let r = match body::<ShutdownRequest>(req) {
                Ok(r) => r,
                Err(resp) => return resp,
            };
            let timeout = match r.timeout_ms {
                None => DEFAULT_SHUTDOWN_TIMEOUT,
                Some(ms) if Duration::from_millis(ms) <= MAX_SHUTDOWN_TIMEOUT => {
                    Duration::from_millis(ms)
                }
                Some(ms) => {
                    return error_response(
                        400,
                        &format!(
                            "timeout_ms {ms} is more than {}",
                            MAX_SHUTDOWN_TIMEOUT.as_millis()
                        ),
                    )
                }
            };
            control(202, api.shutdown(timeout))
        }
        "/vm/snapshot" => {
            if req.method != "PUT" {
                return method_not_allowed("PUT");
            }
            match required_body::<SnapshotRequest>(req) {
                Ok(r) => control(200, api.snapshot(&r.dir)),
                Err(resp) => resp,
            }
        }
        "/vm/devices" => {
            if req.method != "POST" {
                return method_not_allowed("POST");
            }
            match required_body::<AddDeviceRequest>(req) {
                Ok(r) => control(200, api.add_device(&r)),
                Err(resp) => resp,
            }
        }
        _ => match path.strip_prefix("/vm/devices/") {
            Some(rest) if rest.split('/').count() == 2 => {
                let (id, what) = rest.split_once('/').unwrap_or((rest, ""));
                device_action(api, req, id, what)
            }
            Some(id) if !id.is_empty() && !id.contains('/') => {
                if req.method != "DELETE" {
                    return method_not_allowed("DELETE");
                }
                match api.remove_device(id) {
                    Ok(()) => Response {
                        status: 204,
                        body: Vec::new(),
                        allow: None,
                    },
                    Err(e) => error_response(e.status(), &e.to_string()),
                }
            }
            _ => error_response(404, &format!("no such path: {}", truncate(path, 100))),
        },
    }
}

/// `since` (default 0) and `timeout` (seconds, default 0, at most
/// [`MAX_EVENTS_TIMEOUT`]) from the query of `GET /vm/events`.
fn events_query(query: &str) -> Result<(u64, Duration), String> {
    let mut since = 0u64;
    let mut timeout = Duration::ZERO;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "since" => {
                since = value.parse().map_err(|_| {
                    format!(
                        "since must be a whole number of events, not {:?}",
                        truncate(value, 40)
                    )
                })?
            }
            "timeout" => {
                let secs: u64 = value.parse().map_err(|_| {
                    format!(
                        "timeout must be a whole number of seconds, not {:?}",
                        truncate(value, 40)
                    )
                })?;
                if secs > MAX_EVENTS_TIMEOUT.as_secs() {
                    return Err(format!(
                        "timeout {secs} is more than {} seconds",
                        MAX_EVENTS_TIMEOUT.as_secs()
                    ));
                }
                timeout = Duration::from_secs(secs);
            }
            _ => {
                return Err(format!(
                    "unknown query parameter {:?}; use since and timeout",
                    truncate(key, 40)
                ))
            }
        }
    }
    Ok((since, timeout))
}

/// `/vm/devices/{id}/resize` and `/vm/devices/{id}/backend`.
fn device_action(api: &dyn VmApi, req: &Request, id: &str, what: &str) -> Response {
    if id.is_empty() {
        return error_response(404, &format!("no such path: {}", truncate(&req.path, 100)));
    }
    match what {
        "resize" => {
            if req.method != "POST" {
                return method_not_allowed("POST");
            }
            match body::<EmptyRequest>(req) {
                Ok(_) => control(200, api.refresh_device_config(id)),
                Err(resp) => resp,
            }
        }
        "backend" => {
            if req.method != "PUT" {
                return method_not_allowed("PUT");
            }
            match required_body::<SwitchBackendRequest>(req) {
                Ok(r) => control(200, api.switch_backend(id, &r)),
                Err(resp) => resp,
            }
        }
        _ => error_response(404, &format!("no such path: {}", truncate(&req.path, 100))),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
