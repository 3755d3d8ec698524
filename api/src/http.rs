//! HTTP/1.1 framing on one connection: reading a request within size and time limits
//! (headers parsed by `httparse`), and writing a response.
//!
//! Every limit is enforced before memory is spent: the head is read into a fixed-size buffer,
//! a body is read only when its `Content-Length` is within [`Limits::max_body`], and each
//! request has one deadline for all of its bytes, so a client that trickles bytes is cut off
//! as surely as one that sends nothing.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Size and time limits of one connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request line plus headers.
    pub max_head: usize,
    /// Most headers in one request.
    pub max_headers: usize,
    /// Largest body.
    pub max_body: usize,
    /// Time for all bytes of one request, from its first byte.
    pub request_timeout: Duration,
    /// Time a kept-alive connection may sit idle between requests.
    pub idle_timeout: Duration,
    /// Time for writing one response.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 8192,
            max_headers: 32,
            max_body: 64 * 1024,
            request_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
            write_timeout: Duration::from_secs(5),
        }
    }
}

/// One parsed request.
#[derive(Debug)]
pub struct Request {
    /// Method, as sent.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The query after `?` (without it; empty when there is none).
    pub query: String,
    /// Body bytes (empty without a body).
    pub body: Vec<u8>,
    /// Whether the client wants the connection kept open.
    pub keep_alive: bool,
}

/// Why no request could be read. Each maps to the status it is answered with (or none, when
/// the connection is just closed).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The client closed the connection between requests.
    #[error("connection closed")]
    Closed,
    /// The connection sat idle past the idle timeout.
    #[error("idle connection timed out")]
    Idle,
    /// The request was not complete by its deadline.
    #[error("request not complete within {0:?}")]
    Timeout(Duration),
    /// The client closed the connection in the middle of a request.
    #[error("connection closed in the middle of a request")]
    Truncated,
    /// Reading the socket failed.
    #[error("reading the request failed")]
    Io(#[source] io::Error),
    /// Not HTTP/1.x.
    #[error("malformed request: {0}")]
    Malformed(#[source] httparse::Error),
    /// Head larger than the limit.
    #[error("request head larger than {0} bytes")]
    HeadTooLarge(usize),
    /// More headers than the limit.
    #[error("more than {0} headers")]
    TooManyHeaders(usize),
    /// A Content-Length that is not a number.
    #[error("bad Content-Length")]
    BadLength,
    /// A body over the limit.
    #[error("request body of {0} bytes is larger than {max} bytes", max = .1)]
    BodyTooLarge(u64, usize),
    /// A transfer coding (chunked) the server does not take.
    #[error("Transfer-Encoding is not supported; send Content-Length")]
    TransferEncoding,
    /// An HTTP version other than 1.0 / 1.1.
    #[error("HTTP version not supported")]
    Version,
}

impl ReadError {
    /// The status to answer with, or `None` to close silently.
    pub fn status(&self) -> Option<u16> {
        match self {
            ReadError::Closed | ReadError::Idle | ReadError::Truncated | ReadError::Io(_) => None,
            ReadError::Timeout(_) => Some(408),
            ReadError::Malformed(_) | ReadError::BadLength => Some(400),
            ReadError::HeadTooLarge(_) | ReadError::TooManyHeaders(_) => Some(431),
            ReadError::BodyTooLarge(..) => Some(413),
            ReadError::TransferEncoding => Some(501),
            ReadError::Version => Some(505),
        }
    }
}

/// Reads requests from one connection; bytes after a request's end are kept for the next one.
pub struct Reader {
    limits: Limits,
    buf: Vec<u8>,
    filled: usize,
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Reader {
    /// A reader with `limits`.
    pub fn new(limits: Limits) -> Self {
        Reader {
            limits,
            buf: vec![0; limits.max_head],
            filled: 0,
        }
    }

    /// Reads more bytes into `buf[filled..]` before `deadline`; `Ok(0)` is EOF.
    fn fill(
        &mut self,
        stream: &mut UnixStream,
        deadline: Instant,
        idle: bool,
    ) -> Result<usize, ReadError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(if idle {
                    ReadError::Idle
                } else {
                    ReadError::Timeout(self.limits.request_timeout)
                });
            }
            stream.set_read_timeout(Some(left)).map_err(ReadError::Io)?;
            match stream.read(&mut self.buf[self.filled..]) {
                Ok(n) => {
                    self.filled += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Reads the next request.
    pub fn next(&mut self, stream: &mut UnixStream) -> Result<Request, ReadError> {
        let idle_deadline = Instant::now() + self.limits.idle_timeout;
        let mut deadline = None::<Instant>;
        loop {
            if self.filled > 0 {
                let mut headers = vec![httparse::EMPTY_HEADER; self.limits.max_headers];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&self.buf[..self.filled]) {
                    Ok(httparse::Status::Complete(head_len)) => {
                        let parsed = Parsed::from(&req)?;
                        return self.finish(stream, parsed, head_len, deadline);
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(httparse::Error::TooManyHeaders) => {
                        return Err(ReadError::TooManyHeaders(self.limits.max_headers))
                    }
                    Err(e) => return Err(ReadError::Malformed(e)),
                }
                if self.filled == self.buf.len() {
                    return Err(ReadError::HeadTooLarge(self.limits.max_head));
                }
            }
            let (until, idle) = match deadline {
                Some(d) => (d, false),
                None => (idle_deadline, true),
            };
            let n = self.fill(stream, until, idle)?;
            if n == 0 {
                return Err(if self.filled == 0 {
                    ReadError::Closed
                } else {
                    ReadError::Truncated
                });
            }
            if deadline.is_none() {
                deadline = Some(Instant::now() + self.limits.request_timeout);
            }
        }
    }

    fn finish(
        &mut self,
        stream: &mut UnixStream,
        p: Parsed,
        head_len: usize,
        deadline: Option<Instant>,
    ) -> Result<Request, ReadError> {
        let deadline = deadline.unwrap_or_else(|| Instant::now() + self.limits.request_timeout);
        if p.length > self.limits.max_body as u64 {
            return Err(ReadError::BodyTooLarge(p.length, self.limits.max_body));
        }
        let length = p.length as usize;
        let mut body = Vec::with_capacity(length);
        let have = (self.filled - head_len).min(length);
        body.extend_from_slice(&self.buf[head_len..head_len + have]);
        // Keep what follows this request (pipelining) at the start of the buffer.
        self.buf.copy_within(head_len + have..self.filled, 0);
        self.filled -= head_len + have;
        while body.len() < length {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadError::Timeout(self.limits.request_timeout));
            }
            stream.set_read_timeout(Some(left)).map_err(ReadError::Io)?;
            let want = (length - body.len()).min(self.buf.len());
            match stream.read(&mut self.buf[..want]) {
                Ok(0) => return Err(ReadError::Truncated),
                Ok(n) => body.extend_from_slice(&self.buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted || is_timeout(&e) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        Ok(Request {
            method: p.method,
            path: p.path,
            query: p.query,
            body,
            keep_alive: p.keep_alive,
        })
    }
}

/// A `Content-Length` value: digits only (RFC 9110, 8.6), around them spaces and tabs. Not
/// `u64::from_str`, which also takes a leading `+`.
fn content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

struct Parsed {
    method: String,
    path: String,
    query: String,
    length: u64,
    keep_alive: bool,
}

impl Parsed {
    fn from(req: &httparse::Request<'_, '_>) -> Result<Parsed, ReadError> {
        let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version)
        else {
            return Err(ReadError::Malformed(httparse::Error::Token));
        };
        if version > 1 {
            return Err(ReadError::Version);
        }
        let mut length = None::<u64>;
        let mut keep_alive = version == 1;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = content_length(h.value).ok_or(ReadError::BadLength)?;
                if length.is_some_and(|l| l != v) {
                    return Err(ReadError::BadLength);
                }
                length = Some(v);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(ReadError::TransferEncoding);
            } else if h.name.eq_ignore_ascii_case("connection") {
                let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                if v.split(',').any(|t| t.trim() == "close") {
                    keep_alive = false;
                } else if v.split(',').any(|t| t.trim() == "keep-alive") {
                    keep_alive = true;
                }
            }
        }
        let target = target.split('#').next().unwrap_or("");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Ok(Parsed {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            length: length.unwrap_or(0),
            keep_alive,
        })
    }
}

/// One response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// JSON body (empty for none).
    pub body: Vec<u8>,
    /// Methods for the `Allow` header (405 answers).
    pub allow: Option<&'static str>,
}

/// The reason phrase of the statuses the server uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

impl Response {
    /// Writes the response; `close` adds `Connection: close`.
    pub fn write_to(
        &self,
        stream: &mut UnixStream,
        close: bool,
        timeout: Duration,
    ) -> io::Result<()> {
        stream.set_write_timeout(Some(timeout))?;
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if !self.body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        if let Some(a) = self.allow {
            head.push_str(&format!("Allow: {a}\r\n"));
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        stream.write_all(&out)?;
        stream.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Result<Request, ReadError> {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        client.write_all(bytes).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        Reader::new(Limits::default()).next(&mut server)
    }

    #[test]
    fn content_length_is_digits_only() {
        // Found writing the api_request fuzz target's oracle: `+2` was read as 2.
        for bad in ["+2", "-0", "2 2", "0x2", "", "\u{a0}2"] {
            let req = format!("POST /vm/pause HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n{{}}");
            assert!(
                matches!(read(req.as_bytes()), Err(ReadError::BadLength)),
                "{bad:?}"
            );
        }
        let req = read(b"POST /vm/pause HTTP/1.1\r\nContent-Length: \t2 \r\n\r\n{}").unwrap();
        assert_eq!(req.body, b"{}");
        assert_eq!(content_length(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(content_length(b"18446744073709551616"), None);
    }
}
