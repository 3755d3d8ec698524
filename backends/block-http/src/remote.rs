//! The image on the server: probing it (size, Range support, validators) and reading byte
//! ranges from it with retries, checking on every response that the image has not changed.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use reqwest::blocking::{Client, Response};
use reqwest::header::{
    HeaderMap, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, ETAG, LAST_MODIFIED, RANGE,
};
use reqwest::{StatusCode, Url};

use crate::retry::RetryPolicy;

/// Largest image accepted (64 PiB): sizes come from the server, and offsets computed from
/// them must not overflow.
pub const MAX_IMAGE_SIZE: u64 = 1 << 56;

/// What identifies one version of the image: its ETag and Last-Modified headers.
///
/// When the first probe saw an ETag, every later response must carry the same ETag; otherwise,
/// when it saw a Last-Modified date, every response must carry that date. A server that sends
/// neither is only checked by size (Content-Range's total).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Validator {
    /// The ETag header, verbatim (weak tags included).
    pub etag: Option<String>,
    /// The Last-Modified header, verbatim.
    pub last_modified: Option<String>,
}

impl Validator {
    /// Reads the validators of a response.
    pub fn from_headers(h: &HeaderMap) -> Self {
        let get = |name| {
            h.get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(|s| s.trim().to_string())
        };
        Validator {
            etag: get(ETAG),
            last_modified: get(LAST_MODIFIED),
        }
    }

    /// Whether a response carrying `other` belongs to the same image version.
    pub fn matches(&self, other: &Validator) -> bool {
        match (&self.etag, &self.last_modified) {
            (Some(e), _) => other.etag.as_ref() == Some(e),
            (None, Some(lm)) => other.last_modified.as_ref() == Some(lm),
            (None, None) => true,
        }
    }

    /// A one-line identity of the image version, stored in overlays: `etag:<tag>`,
    /// `last-modified:<date>` or `none`.
    pub fn identity(&self) -> String {
        match (&self.etag, &self.last_modified) {
            (Some(e), _) => format!("etag:{e}"),
            (None, Some(lm)) => format!("last-modified:{lm}"),
            (None, None) => "none".to_string(),
        }
    }
}

impl std::fmt::Display for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "etag {}, last-modified {}",
            self.etag.as_deref().unwrap_or("(none)"),
            self.last_modified.as_deref().unwrap_or("(none)")
        )
    }
}

/// A parsed `Content-Range: bytes FIRST-LAST/TOTAL` header (`TOTAL` may be `*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentRange {
    /// First byte (inclusive).
    pub first: u64,
    /// Last byte (inclusive).
    pub last: u64,
    /// Size of the whole representation, if the server said.
    pub total: Option<u64>,
}

impl ContentRange {
    /// Parses the header value; `None` when it is not a satisfied byte range.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.trim().strip_prefix("bytes")?.trim_start();
        let (range, total) = rest.split_once('/')?;
        let (first, last) = range.trim().split_once('-')?;
        let first: u64 = first.trim().parse().ok()?;
        let last: u64 = last.trim().parse().ok()?;
        let total = match total.trim() {
            "*" => None,
            t => Some(t.parse().ok()?),
        };
        if last < first || total.is_some_and(|t| last >= t) {
            return None;
        }
        Some(ContentRange { first, last, total })
    }
}

/// Why reading a range from the server failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The request could not be sent or the answer not received (connection, timeout, body).
    #[error("http request for bytes {offset}+{len} failed: {message}")]
    Transport {
        /// Range start.
        offset: u64,
        /// Range length.
        len: u64,
        /// What reqwest said, with its sources.
        message: String,
    },
    /// The server answered with an unexpected status.
    #[error("server answered {status} for bytes {offset}+{len}")]
    Status {
        /// The status code.
        status: u16,
        /// Range start.
        offset: u64,
        /// Range length.
        len: u64,
    },
    /// The server sent the whole image (200) instead of the range (206).
    #[error("server ignored the Range header for bytes {offset}+{len} (answered 200)")]
    RangeIgnored {
        /// Range start.
        offset: u64,
        /// Range length.
        len: u64,
    },
    /// The Content-Range of a 206 is missing or names other bytes than asked for.
    #[error("bad Content-Range {got:?} for bytes {offset}+{len}")]
    BadContentRange {
        /// The header value, if any.
        got: Option<String>,
        /// Range start.
        offset: u64,
        /// Range length.
        len: u64,
    },
    /// The body was shorter than the range (the connection ended early).
    #[error("short body for bytes {offset}+{len}: got {got} bytes")]
    ShortBody {
        /// Range start.
        offset: u64,
        /// Range length.
        len: u64,
        /// Bytes received.
        got: u64,
    },
    /// The body was longer than the range.
    #[error("body longer than the {len} bytes asked for at {offset}")]
    LongBody {
        /// Range start.
        offset: u64,
        /// Range length.
        len: u64,
    },
    /// A response carried another ETag/Last-Modified/size than the image had when opened.
    #[error("image changed on the server (opened with {expected}; now {found})")]
    ImageChanged {
        /// Validators and size when the image was opened.
        expected: String,
        /// Validators (and size, when it differs) of the offending response.
        found: String,
    },
    /// An earlier response showed the image changed; no further reads are sent.
    #[error("image changed on the server earlier; restart the backend to use the new image")]
    Stale,
    /// The backend is stopping; the read was not sent.
    #[error("backend is shutting down")]
    Closed,
}

impl FetchError {
    /// Whether retrying the same request may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Transport { .. } | FetchError::ShortBody { .. } => true,
            FetchError::Status { status, .. } => is_transient_status(*status),
            _ => false,
        }
    }
}

fn is_transient_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429 | 500 | 502 | 503 | 504)
}

/// Errors while opening the image.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL does not parse or is not http(s).
    #[error("invalid url {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// Why.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the http client: {0}")]
    Client(String),
    /// The CA certificate file could not be used.
    #[error("cannot use CA certificates from {path}: {message}")]
    CaCert {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// HEAD failed (after retries).
    #[error("HEAD {url} failed: {message}")]
    Head {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// HEAD answered a status that is not success.
    #[error("HEAD {url}: server answered {status}")]
    HeadStatus {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// Neither HEAD's Content-Length nor the probe's Content-Range gave the size.
    #[error("{url}: image size unknown (no Content-Length on HEAD and no total in Content-Range)")]
    SizeUnknown {
        /// The URL.
        url: String,
    },
    /// The server claims an absurd size.
    #[error("{url}: image size {size} is larger than the supported {MAX_IMAGE_SIZE} bytes")]
    TooLarge {
        /// The URL.
        url: String,
        /// The size the server gave.
        size: u64,
    },
    /// The image is empty.
    #[error("{url}: image is empty")]
    Empty {
        /// The URL.
        url: String,
    },
    /// The server does not do Range requests.
    #[error("{url}: server does not support Range requests ({detail})")]
    RangeUnsupported {
        /// The URL.
        url: String,
        /// How it showed.
        detail: String,
    },
    /// HEAD and the probe disagree on the size.
    #[error("{url}: HEAD says {head} bytes but Content-Range says {range}")]
    SizeMismatch {
        /// The URL.
        url: String,
        /// Size from HEAD.
        head: u64,
        /// Size from Content-Range.
        range: u64,
    },
    /// The probe range request failed.
    #[error("range probe of {url} failed")]
    Probe {
        /// The URL.
        url: String,
        /// The failure.
        #[source]
        source: Box<FetchError>,
    },
}

impl hype_block::CommandError for OpenError {
    /// A URL that is not an http(s) disk image server (bad URL, not found, no Range support,
    /// no usable size) or an unusable `--ca-cert` is the command line's fault. A server that
    /// cannot be reached or answers with a transient status may come back: a runtime error.
    fn is_usage(&self) -> bool {
        match self {
            OpenError::Url { .. }
            | OpenError::CaCert { .. }
            | OpenError::SizeUnknown { .. }
            | OpenError::TooLarge { .. }
            | OpenError::Empty { .. }
            | OpenError::RangeUnsupported { .. }
            | OpenError::SizeMismatch { .. } => true,
            OpenError::HeadStatus { status, .. } => !is_transient_status(*status),
            OpenError::Probe { source, .. } => match **source {
                FetchError::Status { status, .. } => !is_transient_status(status),
                FetchError::RangeIgnored { .. }
                | FetchError::BadContentRange { .. }
                | FetchError::LongBody { .. } => true,
                FetchError::Transport { .. }
                | FetchError::ShortBody { .. }
                | FetchError::ImageChanged { .. }
                | FetchError::Stale
                | FetchError::Closed => false,
            },
            OpenError::Client(_) | OpenError::Head { .. } => false,
        }
    }
}

/// Tunables of the HTTP side.
#[derive(Clone, Debug)]
pub struct RemoteOptions {
    /// Whole-request timeout (connect, headers and body).
    pub timeout: Duration,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// Idle connections kept per host (about the number of requests in flight).
    pub connections: usize,
    /// PEM file of extra CA certificates to trust for https, besides the system's.
    pub ca_cert: Option<std::path::PathBuf>,
    /// HTTP basic credentials sent with every request (given from a file or the environment,
    /// so they need not be in the URL and argv).
    pub credentials: Option<Credentials>,
}

/// HTTP basic credentials. Never printed: `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &hype_base::redact::REDACTED)
            .finish()
    }
}

impl Credentials {
    /// Parses `user:password` (the first line; surrounding white space and a trailing
    /// newline are not part of it). `None` without a colon or with an empty user.
    pub fn parse(s: &str) -> Option<Credentials> {
        let line = s.lines().next()?.trim();
        let (user, password) = line.split_once(':')?;
        (!user.is_empty()).then(|| Credentials {
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            connections: 8,
            ca_cert: None,
            credentials: None,
        }
    }
}

/// Counters of the HTTP traffic, for logs, tests and benchmarks.
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// Range requests sent (retries included).
    pub requests: AtomicU64,
    /// Retries after transient failures.
    pub retries: AtomicU64,
    /// Body bytes received.
    pub bytes: AtomicU64,
}

/// An image at an http(s) URL, read with Range requests.
pub struct Remote {
    client: Client,
    url: Url,
    /// The URL as printed: [`hype_base::redact_url`] of `url`.
    shown: String,
    auth: Option<Credentials>,
    size: u64,
    validator: Validator,
    retry: RetryPolicy,
    changed: AtomicBool,
    stats: RemoteStats,
}

impl Remote {
    /// Opens the image: HEAD for the size and validators, then a one-byte range request that
    /// must come back as 206 with a matching Content-Range.
    pub fn open(url: &str, opts: &RemoteOptions) -> Result<Remote, OpenError> {
        let parsed = Url::parse(url).map_err(|e| OpenError::Url {
            url: hype_base::redact_url(url).into_owned(),
            reason: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(OpenError::Url {
                url: hype_base::redact_url(url).into_owned(),
                reason: format!("scheme {:?} is not http or https", parsed.scheme()),
            });
        }
        let builder = Client::builder()
            .timeout(opts.timeout)
            .connect_timeout(opts.timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(opts.connections.max(1))
            .tcp_nodelay(true);
        let builder = match &opts.ca_cert {
            Some(path) => with_ca_certs(builder, path)?,
            None => builder,
        };
        let client = builder
            .build()
            .map_err(|e| OpenError::Client(error_text(&e)))?;
        // Every message names the URL without its secrets.
        let url_s = hype_base::redact_url(parsed.as_str()).into_owned();
        let auth = opts.credentials.clone();

        // HEAD: size, validators, Accept-Ranges.
        let head = retry_loop(&opts.retry, "HEAD", || {
            match with_auth(client.head(parsed.clone()), auth.as_ref()).send() {
                Ok(r) if is_transient_status(r.status().as_u16()) => Err((
                    true,
                    OpenError::HeadStatus {
                        url: url_s.clone(),
                        status: r.status().as_u16(),
                    },
                )),
                Ok(r) => Ok(r),
                Err(e) => Err((
                    !e.is_builder(),
                    OpenError::Head {
                        url: url_s.clone(),
                        message: error_text(&e),
                    },
                )),
            }
        })?;
        let head_ok = head.status().is_success();
        // Some servers refuse HEAD; the probe below can still give the size.
        if !head_ok
            && !matches!(
                head.status(),
                StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED
            )
        {
            return Err(OpenError::HeadStatus {
                url: url_s,
                status: head.status().as_u16(),
            });
        }
        let head_size = if head_ok {
            // Read the header itself: reqwest reports a HEAD body as empty.
            head.headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        } else {
            None
        };
        if head_ok {
            let accept = head
                .headers()
                .get(ACCEPT_RANGES)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_ascii_lowercase());
            if accept.as_deref() == Some("none") {
                return Err(OpenError::RangeUnsupported {
                    url: url_s,
                    detail: "HEAD says Accept-Ranges: none".into(),
                });
            }
        }
        if head_size == Some(0) {
            return Err(OpenError::Empty { url: url_s });
        }
        let validator = if head_ok {
            Validator::from_headers(head.headers())
        } else {
            Validator::default()
        };
        drop(head);

        // Probe: one byte with Range. It must come back as 206.
        let mut remote = Remote {
            client,
            shown: url_s.clone(),
            auth,
            url: parsed,
            size: head_size.unwrap_or(0),
            validator,
            retry: opts.retry,
            changed: AtomicBool::new(false),
            stats: RemoteStats::default(),
        };
        let probe = remote.with_retries(0, 1, |r| {
            let resp = r.send_range(0, 1)?;
            let status = resp.status();
            if status == StatusCode::OK {
                return Err(FetchError::RangeIgnored { offset: 0, len: 1 });
            }
            if status != StatusCode::PARTIAL_CONTENT {
                return Err(FetchError::Status {
                    status: status.as_u16(),
                    offset: 0,
                    len: 1,
                });
            }
            let cr = content_range(&resp);
            Ok((cr, Validator::from_headers(resp.headers())))
        });
        let (cr, probe_validator) = match probe {
            Ok(p) => p,
            Err(FetchError::RangeIgnored { .. }) => {
                return Err(OpenError::RangeUnsupported {
                    url: url_s,
                    detail: "a Range request was answered with 200 and the whole image".into(),
                })
            }
            Err(source) => {
                return Err(OpenError::Probe {
                    url: url_s,
                    source: Box::new(source),
                })
            }
        };
        let Some(cr) = cr.filter(|c| c.first == 0 && c.last == 0) else {
            return Err(OpenError::Probe {
                url: url_s,
                source: Box::new(FetchError::BadContentRange {
                    got: None,
                    offset: 0,
                    len: 1,
                }),
            });
        };
        let size = match (head_size, cr.total) {
            (Some(h), Some(t)) if h != t => {
                return Err(OpenError::SizeMismatch {
                    url: url_s,
                    head: h,
                    range: t,
                })
            }
            (Some(h), _) => h,
            (None, Some(t)) => t,
            (None, None) => return Err(OpenError::SizeUnknown { url: url_s }),
        };
        if size == 0 {
            return Err(OpenError::Empty { url: url_s });
        }
        if size > MAX_IMAGE_SIZE {
            return Err(OpenError::TooLarge { url: url_s, size });
        }
        remote.size = size;
        if remote.validator.etag.is_none() && remote.validator.last_modified.is_none() {
            remote.validator = probe_validator;
        } else if !remote.validator.matches(&probe_validator) {
            return Err(OpenError::Probe {
                url: url_s,
                source: Box::new(remote.changed_error(&probe_validator, None)),
            });
        }
        if remote.validator.etag.is_none() && remote.validator.last_modified.is_none() {
            log::warn!(
                "{}: server sends neither ETag nor Last-Modified; only size changes are detected",
                remote.url
            );
        }
        Ok(remote)
    }

    /// The image size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The validators the image was opened with.
    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    /// The URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The URL as it may be printed (user information and query values hidden).
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// Traffic counters.
    pub fn stats(&self) -> &RemoteStats {
        &self.stats
    }

    /// Whether a response has shown that the image changed since it was opened.
    pub fn is_stale(&self) -> bool {
        self.changed.load(Ordering::Relaxed)
    }

    /// Fills `buf` with the image bytes at `offset` (the range must lie inside the image),
    /// retrying transient failures. A response from another version of the image fails with
    /// [`FetchError::ImageChanged`] and makes every later read fail with [`FetchError::Stale`].
    pub fn read_range(&self, offset: u64, buf: &mut [u8]) -> Result<(), FetchError> {
        let len = buf.len() as u64;
        self.with_retries(offset, len, |r| r.try_read_range(offset, buf))
    }

    fn with_retries<T>(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&Self) -> Result<T, FetchError>,
    ) -> Result<T, FetchError> {
        let mut retry = 0;
        loop {
            if self.is_stale() {
                return Err(FetchError::Stale);
            }
            match f(self) {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && retry < self.retry.retries => {
                    let delay = self.retry.delay(retry);
                    log::warn!(
                        "{}: {e}; retry {}/{} in {delay:?}",
                        self.shown,
                        retry + 1,
                        self.retry.retries
                    );
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(delay);
                    retry += 1;
                }
                Err(e) => {
                    if let FetchError::ImageChanged { .. } = e {
                        if !self.changed.swap(true, Ordering::Relaxed) {
                            log::error!("{}: {e}; reads that need the server now fail", self.shown);
                        }
                    } else {
                        log::error!("{}: bytes {offset}+{len}: {e}", self.shown);
                    }
                    return Err(e);
                }
            }
        }
    }

    fn send_range(&self, offset: u64, len: u64) -> Result<Response, FetchError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let last = offset + len.max(1) - 1;
        let req = self.client.get(self.url.clone());
        with_auth(req, self.auth.as_ref())
            .header(RANGE, format!("bytes={offset}-{last}"))
            .send()
            .map_err(|e| FetchError::Transport {
                offset,
                len,
                message: error_text(&e),
            })
    }

    fn changed_error(&self, found: &Validator, found_size: Option<u64>) -> FetchError {
        FetchError::ImageChanged {
            expected: format!("{}, {} bytes", self.validator, self.size),
            found: match found_size {
                Some(s) => format!("{found}, {s} bytes"),
                None => found.to_string(),
            },
        }
    }

    fn try_read_range(&self, offset: u64, buf: &mut [u8]) -> Result<(), FetchError> {
        let len = buf.len() as u64;
        let mut resp = self.send_range(offset, len)?;
        let status = resp.status();
        let whole = offset == 0 && len == self.size;
        if status == StatusCode::OK && !whole {
            return Err(FetchError::RangeIgnored { offset, len });
        }
        if status != StatusCode::PARTIAL_CONTENT && status != StatusCode::OK {
            return Err(FetchError::Status {
                status: status.as_u16(),
                offset,
                len,
            });
        }
        let v = Validator::from_headers(resp.headers());
        if !self.validator.matches(&v) {
            return Err(self.changed_error(&v, None));
        }
        if status == StatusCode::PARTIAL_CONTENT {
            let cr = content_range(&resp);
            if let Some(total) = cr.and_then(|c| c.total) {
                if total != self.size {
                    return Err(self.changed_error(&v, Some(total)));
                }
            }
            if cr.map(|c| (c.first, c.last)) != Some((offset, offset + len - 1)) {
                return Err(FetchError::BadContentRange {
                    got: resp
                        .headers()
                        .get(CONTENT_RANGE)
                        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned()),
                    offset,
                    len,
                });
            }
        }
        let mut got = 0usize;
        while got < buf.len() {
            match resp.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(FetchError::Transport {
                        offset,
                        len,
                        message: format!("reading body: {e}"),
                    })
                }
            }
        }
        self.stats.bytes.fetch_add(got as u64, Ordering::Relaxed);
        if got < buf.len() {
            return Err(FetchError::ShortBody {
                offset,
                len,
                got: got as u64,
            });
        }
        let mut extra = [0u8; 1];
        match resp.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(FetchError::LongBody { offset, len }),
            Err(e) => Err(FetchError::Transport {
                offset,
                len,
                message: format!("reading body: {e}"),
            }),
        }
    }
}

#[cfg(feature = "https")]
fn with_ca_certs(
    builder: reqwest::blocking::ClientBuilder,
    path: &std::path::Path,
) -> Result<reqwest::blocking::ClientBuilder, OpenError> {
    let err = |message: String| OpenError::CaCert {
        path: path.to_path_buf(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(error_text(&e)))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(builder.tls_certs_merge(certs))
}

#[cfg(not(feature = "https"))]
fn with_ca_certs(
    _builder: reqwest::blocking::ClientBuilder,
    path: &std::path::Path,
) -> Result<reqwest::blocking::ClientBuilder, OpenError> {
    Err(OpenError::CaCert {
        path: path.to_path_buf(),
        message: "built without the https feature".into(),
    })
}

fn content_range(resp: &Response) -> Option<ContentRange> {
    resp.headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(ContentRange::parse)
}

/// Retries `f` while it reports a transient error (`(true, e)`).
fn retry_loop<T, E: std::fmt::Display>(
    policy: &RetryPolicy,
    what: &str,
    mut f: impl FnMut() -> Result<T, (bool, E)>,
) -> Result<T, E> {
    let mut retry = 0;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err((true, e)) if retry < policy.retries => {
                let delay = policy.delay(retry);
                log::warn!(
                    "{what}: {e}; retry {}/{} in {delay:?}",
                    retry + 1,
                    policy.retries
                );
                std::thread::sleep(delay);
                retry += 1;
            }
            Err((_, e)) => return Err(e),
        }
    }
}

/// reqwest's error with its source chain, on one line.
/// Adds the basic credentials, if any, to a request.
fn with_auth(
    req: reqwest::blocking::RequestBuilder,
    auth: Option<&Credentials>,
) -> reqwest::blocking::RequestBuilder {
    match auth {
        Some(c) => req.basic_auth(&c.user, Some(&c.password)),
        None => req,
    }
}

/// The error and its causes in one line, with the URL reqwest quotes redacted.
fn error_text(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    match e.url() {
        Some(u) => hype_base::redact::redact_in(&s, u.as_str()),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            ContentRange::parse("bytes 0-0/4096"),
            Some(ContentRange {
                first: 0,
                last: 0,
                total: Some(4096)
            })
        );
        assert_eq!(
            ContentRange::parse("bytes 512-1023/*"),
            Some(ContentRange {
                first: 512,
                last: 1023,
                total: None
            })
        );
        assert_eq!(
            ContentRange::parse(" bytes  10-20/ 100 ").map(|c| c.last),
            Some(20)
        );
        for bad in [
            "",
            "bytes */4096",
            "bytes 5-4/10",
            "bytes 0-10/10",
            "items 0-1/2",
            "bytes 0-x/10",
            "bytes 0-1",
            "bytes -1-2/10",
            "bytes 0-99999999999999999999/1",
        ] {
            assert_eq!(ContentRange::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn validator_matching_prefers_etag() {
        let a = Validator {
            etag: Some("\"1\"".into()),
            last_modified: Some("x".into()),
        };
        let same_tag = Validator {
            etag: Some("\"1\"".into()),
            last_modified: Some("y".into()),
        };
        let other_tag = Validator {
            etag: Some("\"2\"".into()),
            last_modified: Some("x".into()),
        };
        let no_tag = Validator {
            etag: None,
            last_modified: Some("x".into()),
        };
        assert!(a.matches(&same_tag));
        assert!(!a.matches(&other_tag));
        assert!(
            !a.matches(&no_tag),
            "a response without the ETag is not trusted"
        );
        let lm = Validator {
            etag: None,
            last_modified: Some("x".into()),
        };
        assert!(lm.matches(&a));
        assert!(!lm.matches(&Validator {
            etag: None,
            last_modified: Some("z".into())
        }));
        assert!(Validator::default().matches(&a));
        assert_eq!(a.identity(), "etag:\"1\"");
        assert_eq!(lm.identity(), "last-modified:x");
        assert_eq!(Validator::default().identity(), "none");
    }

    #[test]
    fn transient_classification() {
        let st = |status| FetchError::Status {
            status,
            offset: 0,
            len: 1,
        };
        assert!(st(503).is_transient());
        assert!(st(429).is_transient());
        assert!(!st(404).is_transient());
        assert!(!st(416).is_transient());
        assert!(FetchError::ShortBody {
            offset: 0,
            len: 2,
            got: 1
        }
        .is_transient());
        assert!(!FetchError::RangeIgnored { offset: 0, len: 1 }.is_transient());
        assert!(!FetchError::Stale.is_transient());
    }
}
