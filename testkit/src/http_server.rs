//! A tiny threaded HTTP/1.1 server on 127.0.0.1 that serves one byte image (whatever the path)
//! with HEAD and ranged GET, for tests of HTTP-backed disks. Its misbehaviour is switchable at
//! any time ([`HttpServer::set`]): ignoring Range, failing requests with 503, cutting answers
//! short, shifting ranges, changing content and validators, hiding or lying about the size, and
//! slow answers. Every request is logged ([`HttpServer::log`]).
//!
//! The server speaks plain HTTP; a test that needs TLS wraps each accepted connection itself
//! with [`HttpServer::start_wrapped`], so this crate carries no TLS code.
//!
//! ```no_run
//! use hype_testkit::http_server::{Behaviour, HttpServer};
//! # fn main() -> Result<(), hype_testkit::http_server::ServerError> {
//! let server = HttpServer::start(Behaviour::new(vec![7u8; 1 << 20]))?;
//! let url = server.url(); // http://127.0.0.1:PORT/disk.img
//! server.set(|b| b.fail_next = 2); // the next two requests get 503
//! # let _ = url;
//! # Ok(()) }
//! ```

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Longest request or header line the server reads; a longer one ends the connection.
const MAX_LINE: u64 = 8 * 1024;

/// Errors of the test HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the listening socket failed.
    #[error("cannot listen on 127.0.0.1")]
    Bind(#[source] io::Error),
    /// The listening socket has no local address.
    #[error("cannot read the listening address")]
    LocalAddr(#[source] io::Error),
    /// The accept thread could not be started.
    #[error("cannot start the accept thread")]
    Thread(#[source] io::Error),
    /// [`HttpServer::wait_for`] gave up.
    #[error("timed out after {timeout:?} waiting for {what}; log: {log:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The timeout that expired.
        timeout: Duration,
        /// The request log when it expired.
        log: Vec<Logged>,
    },
}

/// How the server behaves; change it at any time with [`HttpServer::set`].
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// The bytes served.
    pub content: Arc<Vec<u8>>,
    /// `ETag` sent with every successful answer.
    pub etag: Option<String>,
    /// `Last-Modified` sent with every successful answer.
    pub last_modified: Option<String>,
    /// Answer Range requests with 206 (false: 200 and the whole body).
    pub honour_range: bool,
    /// Send Content-Length on HEAD.
    pub head_length: bool,
    /// Answer HEAD at all (false: 405).
    pub head_allowed: bool,
    /// Content-Range total as `*`.
    pub hide_total: bool,
    /// Lie about the size: HEAD's Content-Length says this.
    pub head_size: Option<u64>,
    /// Answer this many of the next requests with 503.
    pub fail_next: usize,
    /// Cut this many of the next range answers short: full Content-Length, half the body,
    /// then close the connection.
    pub truncate_next: usize,
    /// Answer range requests with the bytes (and Content-Range) 512 bytes further on.
    pub shift_ranges: bool,
    /// Wait this long before answering a GET.
    pub delay: Duration,
    /// Answer 401 to every request whose `Authorization` header is not exactly this.
    pub require_authorization: Option<String>,
}

impl Behaviour {
    /// A well-behaved server of `content` with fixed validators.
    pub fn new(content: Vec<u8>) -> Self {
        Behaviour {
            content: Arc::new(content),
            etag: Some("\"v1\"".into()),
            last_modified: Some("Sat, 21 Nov 2026 06:00:00 GMT".into()),
            honour_range: true,
            head_length: true,
            head_allowed: true,
            hide_total: false,
            head_size: None,
            fail_next: 0,
            truncate_next: 0,
            shift_ranges: false,
            delay: Duration::ZERO,
            require_authorization: None,
        }
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    /// Request method (`GET`, `HEAD`, ...).
    pub method: String,
    /// The requested byte range (first, last inclusive), clamped to the content.
    pub range: Option<(u64, u64)>,
    /// Status code answered.
    pub status: u16,
}

/// A byte stream the server speaks HTTP/1.1 over: a TCP connection or a wrapper around one.
pub trait Connection: Read + Write + Send {}

impl<T: Read + Write + Send> Connection for T {}

/// State shared by the accept thread, the connection threads and the handle.
struct Shared {
    behaviour: Mutex<Behaviour>,
    log: Mutex<Vec<Logged>>,
    active: AtomicUsize,
    max_active: AtomicUsize,
    stop: AtomicBool,
}

/// Locks `m`, carrying on with the data when another thread panicked while holding it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The running server; it stops accepting when dropped (open connections finish on their own).
pub struct HttpServer {
    shared: Arc<Shared>,
    port: u16,
    scheme: &'static str,
}

impl HttpServer {
    /// Starts a plain HTTP server on an ephemeral port of 127.0.0.1.
    pub fn start(behaviour: Behaviour) -> Result<Self, ServerError> {
        Self::start_wrapped(behaviour, "http", |conn| Some(Box::new(conn)))
    }

    /// Starts a server that hands each accepted connection to `wrap` (on that connection's own
    /// thread) and speaks HTTP over what it returns; `None` drops the connection. `scheme` is
    /// what [`HttpServer::url`] starts with (e.g. `https` for a TLS wrapper).
    pub fn start_wrapped(
        behaviour: Behaviour,
        scheme: &'static str,
        wrap: impl Fn(TcpStream) -> Option<Box<dyn Connection>> + Send + Sync + 'static,
    ) -> Result<Self, ServerError> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(ServerError::Bind)?;
        let port = listener
            .local_addr()
            .map_err(ServerError::LocalAddr)?
            .port();
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(behaviour),
            log: Mutex::new(Vec::new()),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let accept_shared = shared.clone();
        let wrap = Arc::new(wrap);
        std::thread::Builder::new()
            .name(format!("http-server-{port}"))
            .spawn(move || accept_loop(&listener, &accept_shared, wrap))
            .map_err(ServerError::Thread)?;
        Ok(HttpServer {
            shared,
            port,
            scheme,
        })
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `SCHEME://127.0.0.1:PORT/disk.img` (any path serves the same content).
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}/disk.img", self.scheme, self.port)
    }

    /// Changes the behaviour.
    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut lock(&self.shared.behaviour));
    }

    /// Every request answered so far (since the last [`HttpServer::clear_log`]).
    pub fn log(&self) -> Vec<Logged> {
        lock(&self.shared.log).clone()
    }

    /// Forgets the requests logged so far.
    pub fn clear_log(&self) {
        lock(&self.shared.log).clear();
    }

    /// GETs answered with 206, as (first, last) ranges.
    pub fn served_ranges(&self) -> Vec<(u64, u64)> {
        self.log()
            .into_iter()
            .filter(|l| l.method == "GET" && l.status == 206)
            .filter_map(|l| l.range)
            .collect()
    }

    /// How many requests were answered with `status`.
    pub fn count(&self, status: u16) -> usize {
        self.log().iter().filter(|l| l.status == status).count()
    }

    /// Most GETs being answered at the same moment.
    pub fn max_concurrent(&self) -> usize {
        self.shared.max_active.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` until `pred` holds for the log.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Logged]) -> bool,
    ) -> Result<(), ServerError> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if pred(&log) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ServerError::Timeout {
                    what: what.to_string(),
                    timeout,
                    log,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Accepts connections until the server is dropped, serving each on its own thread.
fn accept_loop<W>(listener: &TcpListener, shared: &Arc<Shared>, wrap: Arc<W>)
where
    W: Fn(TcpStream) -> Option<Box<dyn Connection>> + Send + Sync + 'static,
{
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let shared = shared.clone();
        let wrap = wrap.clone();
        // A connection that cannot get a thread is dropped, as an overloaded server would.
        let _ = std::thread::Builder::new()
            .name("http-conn".into())
            .spawn(move || {
                if let Some(conn) = wrap(conn) {
                    serve_connection(&shared, conn);
                }
            });
    }
}

/// Parses a `Range: bytes=A-B` / `bytes=A-` value into (first, last) clamped to `len`.
fn parse_range(v: &str, len: u64) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let a: u64 = a.trim().parse().ok()?;
    let b: u64 = if b.trim().is_empty() {
        len.checked_sub(1)?
    } else {
        b.trim().parse().ok()?
    };
    (a <= b).then_some((a, b.min(len.saturating_sub(1))))
}

/// Reads one line of at most [`MAX_LINE`] bytes; `None` at end of stream, on error or when the
/// line is too long.
fn read_line<R: BufRead>(reader: &mut R) -> Option<String> {
    let mut line = String::new();
    let n = reader.by_ref().take(MAX_LINE).read_line(&mut line).ok()?;
    (n > 0 && line.ends_with('\n')).then_some(line)
}

/// A parsed request head.
struct Request {
    method: String,
    range: Option<String>,
    authorization: Option<String>,
}

/// Reads a request line and its headers; `None` when the connection ends first.
fn read_request<R: BufRead>(reader: &mut R) -> Option<Request> {
    let line = read_line(reader)?;
    let method = line.split_whitespace().next().unwrap_or("").to_string();
    let mut range = None;
    let mut authorization = None;
    loop {
        let h = read_line(reader)?;
        let h = h.trim_end();
        if h.is_empty() {
            return Some(Request {
                method,
                range,
                authorization,
            });
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            } else if k.eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
}

/// Takes a snapshot of the behaviour for one request and consumes one of its one-shot faults.
fn behaviour_for(s: &Shared, method: &str) -> Behaviour {
    let mut g = lock(&s.behaviour);
    let snapshot = g.clone();
    if g.fail_next > 0 {
        g.fail_next -= 1;
    } else if g.truncate_next > 0 && method == "GET" {
        g.truncate_next -= 1;
    }
    snapshot
}

/// An answer: status, extra headers, and the body (a range of the content).
struct Answer<'a> {
    status: u16,
    headers: Vec<String>,
    body: &'a [u8],
}

/// Decides the answer to `method` with `range` under behaviour `b`.
fn answer<'a>(b: &'a Behaviour, method: &str, range: Option<(u64, u64)>) -> Answer<'a> {
    let len = b.content.len() as u64;
    let mut headers = Vec::new();
    if let Some(e) = &b.etag {
        headers.push(format!("ETag: {e}"));
    }
    if let Some(lm) = &b.last_modified {
        headers.push(format!("Last-Modified: {lm}"));
    }
    let bare = |status| Answer {
        status,
        headers: Vec::new(),
        body: &[],
    };
    if b.fail_next > 0 {
        return bare(503);
    }
    if method == "HEAD" {
        if !b.head_allowed {
            return bare(405);
        }
        if b.honour_range {
            headers.push("Accept-Ranges: bytes".into());
        }
        if b.head_length {
            let claimed = b.head_size.unwrap_or(len);
            headers.push(format!("Content-Length: {claimed}"));
        }
        return Answer {
            status: 200,
            headers,
            body: &[],
        };
    }
    if method != "GET" {
        return Answer {
            status: 405,
            headers,
            body: &[],
        };
    }
    let body = match range {
        Some((mut first, mut last)) if b.honour_range => {
            if b.shift_ranges && last + 512 < len {
                first += 512;
                last += 512;
            }
            let slice = usize::try_from(first)
                .ok()
                .zip(usize::try_from(last).ok())
                .and_then(|(f, l)| b.content.get(f..=l));
            let Some(slice) = slice else {
                return Answer {
                    status: 416,
                    headers,
                    body: &[],
                };
            };
            let total = if b.hide_total {
                "*".to_string()
            } else {
                len.to_string()
            };
            headers.push(format!("Content-Range: bytes {first}-{last}/{total}"));
            return Answer {
                status: 206,
                headers,
                body: slice,
            };
        }
        _ => &b.content[..],
    };
    Answer {
        status: 200,
        headers,
        body,
    }
}

/// The reason phrase of the statuses the server uses.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        401 => "Unauthorized",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        503 => "Service Unavailable",
        _ => "Other",
    }
}

/// Counts a GET as being answered while it lives.
struct ActiveGet<'a>(&'a Shared);

impl<'a> ActiveGet<'a> {
    fn new(s: &'a Shared) -> Self {
        let now = s.active.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_active.fetch_max(now, Ordering::SeqCst);
        ActiveGet(s)
    }
}

impl Drop for ActiveGet<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Answers requests on one connection until it closes or a fault closes it.
fn serve_connection<S: Read + Write>(s: &Shared, conn: S) {
    let mut reader = BufReader::new(conn);
    while let Some(req) = read_request(&mut reader) {
        let b = behaviour_for(s, &req.method);
        let len = b.content.len() as u64;
        let range = req.range.as_deref().and_then(|r| parse_range(r, len));
        let a = match &b.require_authorization {
            Some(want) if req.authorization.as_ref() != Some(want) => Answer {
                status: 401,
                headers: Vec::new(),
                body: &[],
            },
            _ => answer(&b, &req.method, range),
        };
        let active = (req.method == "GET").then(|| ActiveGet::new(s));
        if active.is_some() {
            std::thread::sleep(b.delay);
        }
        let mut head = format!("HTTP/1.1 {} {}\r\n", a.status, reason(a.status));
        for h in &a.headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        if req.method != "HEAD" || a.status != 200 {
            head.push_str(&format!("Content-Length: {}\r\n", a.body.len()));
        }
        head.push_str("\r\n");
        lock(&s.log).push(Logged {
            method: req.method.clone(),
            range,
            status: a.status,
        });
        let truncate = b.fail_next == 0 && b.truncate_next > 0 && a.status == 206;
        let body = if req.method == "HEAD" {
            &[][..]
        } else if truncate {
            &a.body[..a.body.len() / 2]
        } else {
            a.body
        };
        let out = reader.get_mut();
        let ok = out.write_all(head.as_bytes()).is_ok()
            && out.write_all(body).is_ok()
            && out.flush().is_ok();
        drop(active);
        if !ok || truncate {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `request` on a fresh connection, shuts down its sending side (so the server ends
    /// the connection once it has answered) and reads everything answered.
    fn exchange(server: &HttpServer, request: &str) -> String {
        let mut c = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    fn content() -> Vec<u8> {
        (0..4096u32).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn parse_range_forms() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=90-500", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=9-0", 100), None);
        assert_eq!(parse_range("items=0-9", 100), None);
        assert_eq!(parse_range("bytes=0-", 0), None);
        assert_eq!(parse_range("bytes=x-1", 100), None);
    }

    #[test]
    fn range_get_head_and_faults() {
        let server = HttpServer::start(Behaviour::new(content())).unwrap();
        assert!(server.url().starts_with("http://127.0.0.1:"));

        let r = exchange(&server, "GET /x HTTP/1.1\r\nRange: bytes=10-13\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 206 "), "{r}");
        assert!(r.contains("Content-Range: bytes 10-13/4096\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n\x0a\x0b\x0c\x0d"), "{r:?}");

        let r = exchange(&server, "HEAD / HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(r.contains("Content-Length: 4096\r\n"), "{r}");
        assert!(r.contains("Accept-Ranges: bytes\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n"), "HEAD has no body: {r:?}");

        let r = exchange(&server, "GET / HTTP/1.1\r\nRange: bytes=5000-5001\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 416 "), "{r}");

        server.set(|b| b.fail_next = 1);
        let r = exchange(&server, "GET / HTTP/1.1\r\nRange: bytes=0-1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        let r = exchange(&server, "GET / HTTP/1.1\r\nRange: bytes=0-1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 206 "), "one failure only: {r}");

        server.set(|b| b.honour_range = false);
        let r = exchange(&server, "GET / HTTP/1.1\r\nRange: bytes=0-1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(r.contains("Content-Length: 4096\r\n"), "{r}");

        assert_eq!(server.count(503), 1);
        assert_eq!(server.served_ranges(), [(10, 13), (0, 1)]);
        server
            .wait_for("six requests", Duration::from_secs(1), |l| l.len() == 6)
            .unwrap();
        let err = server
            .wait_for("never", Duration::from_millis(20), |_| false)
            .unwrap_err();
        assert!(matches!(err, ServerError::Timeout { .. }), "{err}");
    }

    #[test]
    fn keep_alive_serves_several_requests_and_truncation_closes() {
        let server = HttpServer::start(Behaviour::new(content())).unwrap();
        server.set(|b| b.truncate_next = 1);
        let r = exchange(
            &server,
            "GET / HTTP/1.1\r\nRange: bytes=0-99\r\n\r\nGET / HTTP/1.1\r\nRange: bytes=0-99\r\n\r\n",
        );
        assert!(r.contains("Content-Length: 100\r\n"), "{r}");
        // Half the body, then the connection closes: the second request is never answered.
        assert_eq!(r.split("\r\n\r\n").nth(1).map(str::len), Some(50), "{r:?}");
        assert_eq!(server.log().len(), 1);

        let r = exchange(
            &server,
            "GET / HTTP/1.1\r\nRange: bytes=0-0\r\n\r\nGET / HTTP/1.1\r\nRange: bytes=1-1\r\n\r\n",
        );
        assert_eq!(r.matches("HTTP/1.1 206").count(), 2, "{r}");
        assert_eq!(server.served_ranges()[1..], [(0, 0), (1, 1)]);
    }
}
