//! A tiny threaded HTTP/1.1 server on 127.0.0.1 for the block-http tests, with switchable
//! misbehaviour: ignoring Range, failing requests with 503, changing content and validators,
//! hiding the size, and slow answers. Every request is logged.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the server behaves; change it at any time with [`HttpServer::set`].
#[derive(Clone, Debug)]
pub struct Behaviour {
    pub content: Arc<Vec<u8>>,
    pub etag: Option<String>,
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
}

impl Behaviour {
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
        }
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    /// The requested byte range (first, last inclusive).
    pub range: Option<(u64, u64)>,
    pub status: u16,
}

struct Shared {
    behaviour: Mutex<Behaviour>,
    log: Mutex<Vec<Logged>>,
    active: AtomicUsize,
    max_active: AtomicUsize,
    stop: AtomicBool,
}

/// The server; stops accepting when dropped.
pub struct HttpServer {
    shared: Arc<Shared>,
    port: u16,
    tls: bool,
}

impl HttpServer {
    /// A plain HTTP server.
    pub fn start(b: Behaviour) -> Self {
        Self::start_with(b, None)
    }

    /// An https server with the certificate chain and key of the PEM files given.
    pub fn start_tls(b: Behaviour, cert: &std::path::Path, key: &std::path::Path) -> Self {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Self::start_with(b, Some(Arc::new(config)))
    }

    fn start_with(b: Behaviour, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(b),
            log: Mutex::new(Vec::new()),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let tls_on = tls.is_some();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                let tls = tls.clone();
                std::thread::spawn(move || match tls {
                    None => serve_connection(&s, conn),
                    Some(cfg) => {
                        let Ok(tls) = rustls::ServerConnection::new(cfg) else {
                            return;
                        };
                        serve_connection(&s, rustls::StreamOwned::new(tls, conn));
                    }
                });
            }
        });
        HttpServer {
            shared,
            port,
            tls: tls_on,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/disk.img", self.port)
    }

    /// Changes the behaviour.
    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.shared.behaviour.lock().unwrap());
    }

    pub fn log(&self) -> Vec<Logged> {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.shared.log.lock().unwrap().clear();
    }

    /// GETs answered with 206, as (first, last) ranges.
    pub fn served_ranges(&self) -> Vec<(u64, u64)> {
        self.log()
            .into_iter()
            .filter(|l| l.method == "GET" && l.status == 206)
            .filter_map(|l| l.range)
            .collect()
    }

    pub fn count(&self, status: u16) -> usize {
        self.log().iter().filter(|l| l.status == status).count()
    }

    /// Most GETs being answered at the same moment.
    pub fn max_concurrent(&self) -> usize {
        self.shared.max_active.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `pred` holds for the log.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&[Logged]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pred(&self.log()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

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

fn serve_connection<S: Read + Write>(s: &Shared, conn: S) {
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let mut range_header = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("range") {
                    range_header = Some(v.trim().to_string());
                }
            }
        }
        let b = {
            let mut g = s.behaviour.lock().unwrap();
            let snapshot = g.clone();
            if g.fail_next > 0 {
                g.fail_next -= 1;
            } else if g.truncate_next > 0 && method == "GET" {
                g.truncate_next -= 1;
            }
            snapshot
        };
        let len = b.content.len() as u64;
        let range = range_header.as_deref().and_then(|r| parse_range(r, len));
        let mut headers = Vec::new();
        if let Some(e) = &b.etag {
            headers.push(format!("ETag: {e}"));
        }
        if let Some(lm) = &b.last_modified {
            headers.push(format!("Last-Modified: {lm}"));
        }
        let (status, body): (u16, &[u8]) = if b.fail_next > 0 {
            headers.clear();
            (503, b"")
        } else if method == "HEAD" {
            if !b.head_allowed {
                headers.clear();
                (405, b"")
            } else {
                if b.honour_range {
                    headers.push("Accept-Ranges: bytes".into());
                }
                (200, b"")
            }
        } else if method != "GET" {
            (405, b"")
        } else if let (Some((mut first, mut last)), true) = (range, b.honour_range) {
            if b.shift_ranges && last + 512 < len {
                first += 512;
                last += 512;
            }
            if first >= len {
                (416, b"")
            } else {
                let total = if b.hide_total {
                    "*".to_string()
                } else {
                    len.to_string()
                };
                headers.push(format!("Content-Range: bytes {first}-{last}/{total}"));
                (206, &b.content[first as usize..=last as usize])
            }
        } else {
            (200, &b.content[..])
        };
        let is_get = method == "GET";
        if is_get {
            let now = s.active.fetch_add(1, Ordering::SeqCst) + 1;
            s.max_active.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(b.delay);
        }
        let reason = match status {
            200 => "OK",
            206 => "Partial Content",
            405 => "Method Not Allowed",
            416 => "Range Not Satisfiable",
            503 => "Service Unavailable",
            _ => "Other",
        };
        let mut resp = format!("HTTP/1.1 {status} {reason}\r\n");
        for h in &headers {
            resp.push_str(h);
            resp.push_str("\r\n");
        }
        if method == "HEAD" && status == 200 {
            if b.head_length {
                let claimed = b.head_size.unwrap_or(len);
                resp.push_str(&format!("Content-Length: {claimed}\r\n"));
            }
        } else {
            resp.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        resp.push_str("\r\n");
        s.log.lock().unwrap().push(Logged {
            method: method.clone(),
            range,
            status,
        });
        let out = reader.get_mut();
        let mut ok = out.write_all(resp.as_bytes()).is_ok();
        let truncate = b.fail_next == 0 && b.truncate_next > 0 && status == 206;
        if ok && method != "HEAD" {
            let body = if truncate {
                &body[..body.len() / 2]
            } else {
                body
            };
            ok = out.write_all(body).is_ok();
        }
        if truncate {
            let _ = out.flush();
            if is_get {
                s.active.fetch_sub(1, Ordering::SeqCst);
            }
            return;
        }
        ok = ok && out.flush().is_ok();
        if is_get {
            s.active.fetch_sub(1, Ordering::SeqCst);
        }
        if !ok {
            return;
        }
    }
}
