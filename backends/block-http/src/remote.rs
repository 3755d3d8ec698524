//! The image on the server: probing it (size, Range support, validators) and reading byte
//! ranges from it with retries, checking on every response that the image has not changed.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use reqwest::blocking::{Client, Response};
use reqwest::header::{
    HeaderMap, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, ETAG, LAST_MODIFIED, RANGE,
};
use reqwest::Url;

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

/// Response headers as the checks below see them, so they can run on reqwest's
/// [`HeaderMap`] and on plain `(name, value)` pairs (the fuzz target's) alike.
pub trait ResponseHeaders {
    /// The first value of header `name` (lower case), as sent.
    fn get_bytes(&self, name: &str) -> Option<&[u8]>;

    /// That value as text, when it is visible ASCII (tabs allowed), as `HeaderValue::to_str`
    /// has it; otherwise `None`.
    fn get_text(&self, name: &str) -> Option<&str> {
        let v = self.get_bytes(name)?;
        if v.iter().all(|&b| b == b'\t' || (32..127).contains(&b)) {
            std::str::from_utf8(v).ok()
        } else {
            None
        }
    }
}

impl ResponseHeaders for HeaderMap {
    fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(|v| v.as_bytes())
    }
}

impl ResponseHeaders for [(&str, &[u8])] {
    fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

impl Validator {
    /// Reads the validators of a response.
    pub fn from_headers(h: &(impl ResponseHeaders + ?Sized)) -> Self {
        let get = |name: &str| h.get_text(name).map(|s| s.trim().to_string());
        Validator {
            etag: get(ETAG.as_str()),
            last_modified: get(LAST_MODIFIED.as_str()),
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
        let first = parse_digits(first.trim())?;
        let last = parse_digits(last.trim())?;
        let total = match total.trim() {
            "*" => None,
            t => Some(parse_digits(t)?),
        };
        if last < first || total.is_some_and(|t| last >= t) {
            return None;
        }
        Some(ContentRange { first, last, total })
    }
}

/// A decimal number as HTTP writes them (`1*DIGIT`): no sign, unlike `u64::from_str`, which
/// takes `+5`.
fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
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
        let head_info = check_head(&url_s, head.status().as_u16(), head.headers())?;
        drop(head);

        // Probe: one byte with Range. It must come back as 206.
        let mut remote = Remote {
            client,
            shown: url_s.clone(),
            auth,
            url: parsed,
            size: head_info.size.unwrap_or(0),
            validator: head_info.validator.clone(),
            retry: opts.retry,
            changed: AtomicBool::new(false),
            stats: RemoteStats::default(),
        };
        let probe = remote.with_retries(0, 1, |r| {
            let resp = r.send_range(0, 1)?;
            check_probe(resp.status().as_u16(), resp.headers())
        });
        let (size, validator) = check_open(&url_s, &head_info, probe)?;
        remote.size = size;
        remote.validator = validator;
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

    fn try_read_range(&self, offset: u64, buf: &mut [u8]) -> Result<(), FetchError> {
        let len = buf.len() as u64;
        let mut resp = self.send_range(offset, len)?;
        let status = resp.status().as_u16();
        check_range_response(
            &self.validator,
            self.size,
            offset,
            len,
            status,
            resp.headers(),
        )?;
        let (got, result) = read_body(&mut resp, buf, offset);
        self.stats.bytes.fetch_add(got, Ordering::Relaxed);
        result
    }
}

/// What HEAD said about the image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeadInfo {
    /// Its Content-Length, if it answered with success and one.
    pub size: Option<u64>,
    /// Its validators (none if HEAD was refused).
    pub validator: Validator,
}

/// Judges the answer to HEAD (after the retries of transient statuses): a success gives the
/// size and validators; 405 and 501 (HEAD refused) give nothing, the probe may still tell;
/// any other status, `Accept-Ranges: none` or `Content-Length: 0` refuse the image.
pub fn check_head(
    url: &str,
    status: u16,
    h: &(impl ResponseHeaders + ?Sized),
) -> Result<HeadInfo, OpenError> {
    let ok = (200..300).contains(&status);
    // Some servers refuse HEAD; the probe can still give the size.
    if !ok {
        if matches!(status, 405 | 501) {
            return Ok(HeadInfo::default());
        }
        return Err(OpenError::HeadStatus {
            url: url.to_string(),
            status,
        });
    }
    // Read the header itself: reqwest reports a HEAD body as empty.
    let size = h
        .get_text(CONTENT_LENGTH.as_str())
        .and_then(|v| parse_digits(v.trim()));
    let accept = h
        .get_text(ACCEPT_RANGES.as_str())
        .map(|v| v.trim().to_ascii_lowercase());
    if accept.as_deref() == Some("none") {
        return Err(OpenError::RangeUnsupported {
            url: url.to_string(),
            detail: "HEAD says Accept-Ranges: none".into(),
        });
    }
    if size == Some(0) {
        return Err(OpenError::Empty {
            url: url.to_string(),
        });
    }
    Ok(HeadInfo {
        size,
        validator: Validator::from_headers(h),
    })
}

/// Judges the answer to the one-byte probe (`Range: bytes=0-0`): it must be a 206; gives its
/// Content-Range, if it parses, and its validators.
pub fn check_probe(
    status: u16,
    h: &(impl ResponseHeaders + ?Sized),
) -> Result<(Option<ContentRange>, Validator), FetchError> {
    if status == 200 {
        return Err(FetchError::RangeIgnored { offset: 0, len: 1 });
    }
    if status != 206 {
        return Err(FetchError::Status {
            status,
            offset: 0,
            len: 1,
        });
    }
    Ok((content_range(h), Validator::from_headers(h)))
}

/// Decides the image's size and validators from HEAD and the probe (its result after
/// retries): the probe's Content-Range must be byte 0; the size comes from HEAD or the
/// range's total, which must agree; the validators from HEAD, or the probe if HEAD had none,
/// and then the two must match.
pub fn check_open(
    url: &str,
    head: &HeadInfo,
    probe: Result<(Option<ContentRange>, Validator), FetchError>,
) -> Result<(u64, Validator), OpenError> {
    let url = url.to_string();
    let (cr, probe_validator) = match probe {
        Ok(p) => p,
        Err(FetchError::RangeIgnored { .. }) => {
            return Err(OpenError::RangeUnsupported {
                url,
                detail: "a Range request was answered with 200 and the whole image".into(),
            })
        }
        Err(source) => {
            return Err(OpenError::Probe {
                url,
                source: Box::new(source),
            })
        }
    };
    let Some(cr) = cr.filter(|c| c.first == 0 && c.last == 0) else {
        return Err(OpenError::Probe {
            url,
            source: Box::new(FetchError::BadContentRange {
                got: None,
                offset: 0,
                len: 1,
            }),
        });
    };
    let size = match (head.size, cr.total) {
        (Some(h), Some(t)) if h != t => {
            return Err(OpenError::SizeMismatch {
                url,
                head: h,
                range: t,
            })
        }
        (Some(h), _) => h,
        (None, Some(t)) => t,
        (None, None) => return Err(OpenError::SizeUnknown { url }),
    };
    if size == 0 {
        return Err(OpenError::Empty { url });
    }
    if size > MAX_IMAGE_SIZE {
        return Err(OpenError::TooLarge { url, size });
    }
    let v = &head.validator;
    if v.etag.is_none() && v.last_modified.is_none() {
        return Ok((size, probe_validator));
    }
    if !v.matches(&probe_validator) {
        return Err(OpenError::Probe {
            url,
            source: Box::new(changed_error(v, size, &probe_validator, None)),
        });
    }
    Ok((size, v.clone()))
}

/// The error for a response from another version of the image than the one opened
/// (`expected`, `size` bytes).
fn changed_error(
    expected: &Validator,
    size: u64,
    found: &Validator,
    found_size: Option<u64>,
) -> FetchError {
    FetchError::ImageChanged {
        expected: format!("{expected}, {size} bytes"),
        found: match found_size {
            Some(s) => format!("{found}, {s} bytes"),
            None => found.to_string(),
        },
    }
}

/// Judges the status and headers of the answer to a range request for `len` bytes (at
/// least one) at `offset` of an image of `size` bytes opened with validators `expected`: a
/// 206 for exactly those bytes (or a 200 when they are the whole image), from the same image
/// version.
pub fn check_range_response(
    expected: &Validator,
    size: u64,
    offset: u64,
    len: u64,
    status: u16,
    h: &(impl ResponseHeaders + ?Sized),
) -> Result<(), FetchError> {
    let whole = offset == 0 && len == size;
    if status == 200 && !whole {
        return Err(FetchError::RangeIgnored { offset, len });
    }
    if status != 206 && status != 200 {
        return Err(FetchError::Status {
            status,
            offset,
            len,
        });
    }
    let v = Validator::from_headers(h);
    if !expected.matches(&v) {
        return Err(changed_error(expected, size, &v, None));
    }
    if status == 206 {
        let cr = content_range(h);
        if let Some(total) = cr.and_then(|c| c.total) {
            if total != size {
                return Err(changed_error(expected, size, &v, Some(total)));
            }
        }
        let last = len.checked_sub(1).and_then(|l| offset.checked_add(l));
        if !matches!((cr, last), (Some(c), Some(l)) if c.first == offset && c.last == l) {
            return Err(FetchError::BadContentRange {
                got: h
                    .get_bytes(CONTENT_RANGE.as_str())
                    .map(|v| String::from_utf8_lossy(v).into_owned()),
                offset,
                len,
            });
        }
    }
    Ok(())
}

/// Reads the body of a range response into `buf` (the range at `offset`): it must hold
/// exactly `buf.len()` bytes. Returns the bytes received, and the verdict.
pub fn read_body(
    body: &mut impl Read,
    buf: &mut [u8],
    offset: u64,
) -> (u64, Result<(), FetchError>) {
    let len = buf.len() as u64;
    let mut got = 0usize;
    while got < buf.len() {
        match body.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let err = FetchError::Transport {
                    offset,
                    len,
                    message: format!("reading body: {e}"),
                };
                return (got as u64, Err(err));
            }
        }
    }
    if got < buf.len() {
        let err = FetchError::ShortBody {
            offset,
            len,
            got: got as u64,
        };
        return (got as u64, Err(err));
    }
    let mut extra = [0u8; 1];
    let verdict = loop {
        match body.read(&mut extra) {
            Ok(0) => break Ok(()),
            Ok(_) => break Err(FetchError::LongBody { offset, len }),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                break Err(FetchError::Transport {
                    offset,
                    len,
                    message: format!("reading body: {e}"),
                })
            }
        }
    };
    (got as u64, verdict)
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

fn content_range(h: &(impl ResponseHeaders + ?Sized)) -> Option<ContentRange> {
    h.get_text(CONTENT_RANGE.as_str())
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
            // Signs: u64::from_str takes them, HTTP's 1*DIGIT does not.
            "bytes +0-0/10",
            "bytes 0-+0/10",
            "bytes 0-0/+10",
        ] {
            assert_eq!(ContentRange::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn head_content_length_is_digits_only() {
        let head = |v: &'static [u8]| {
            let h: &[(&str, &[u8])] = &[("Content-Length", v)];
            check_head("u", 200, h).map(|i| i.size)
        };
        assert_eq!(head(b" 8192 ").ok(), Some(Some(8192)));
        assert_eq!(head(b"+8192").ok(), Some(None));
        assert_eq!(head(b"-1").ok(), Some(None));
        assert!(matches!(head(b"0"), Err(OpenError::Empty { .. })));
        assert!(matches!(head(b"+0"), Ok(None)));
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
