//! Entry point for the `http_responses` fuzz target in `fuzz/` (hidden from the docs; no
//! stability promise).
//!
//! [`responses`] feeds a server's answers (status, headers, body, all from the input) to the
//! checks [`Remote`](crate::Remote) runs on every response: HEAD and the one-byte probe when
//! the image is opened ([`check_head`], [`check_probe`], [`check_open`]), then range reads
//! ([`check_range_response`], [`read_body`]), and checks what the guest relies on: an
//! accepted read is exactly the bytes asked for, from the image version that was opened.

use std::io::{self, Read};

use crate::remote::{
    check_head, check_open, check_probe, check_range_response, read_body, ContentRange, FetchError,
    ResponseHeaders, Validator, MAX_IMAGE_SIZE,
};

/// Header names a fuzzed response picks from (one odd-cased, one that nothing reads).
const NAMES: [&str; 8] = [
    "content-length",
    "accept-ranges",
    "etag",
    "last-modified",
    "content-range",
    "Content-Range",
    "ETag",
    "x-other",
];

/// Status codes a fuzzed response picks from (a byte past the table is a raw code).
const STATUSES: [u16; 12] = [200, 206, 405, 501, 404, 416, 500, 503, 204, 299, 302, 100];

/// Most range reads in one input.
const MAX_READS: usize = 8;

/// The input, consumed front to back; reads past its end give zeroes and empty slices.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }

    fn u64(&mut self) -> u64 {
        let mut v = [0u8; 8];
        let b = self.bytes(8);
        v[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(v)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One response from the input.
struct Response<'a> {
    status: u16,
    headers: Vec<(&'static str, &'a [u8])>,
    body: &'a [u8],
    /// Bytes per read of the body (0: all at once), and whether the body ends in an error.
    chunk: usize,
    fails: bool,
}

impl<'a> Response<'a> {
    fn parse(inp: &mut Input<'a>) -> Response<'a> {
        let s = inp.byte();
        let status = match STATUSES.get(usize::from(s)) {
            Some(&st) => st,
            None if s < 0xf0 => STATUSES[usize::from(s) % STATUSES.len()],
            None => u16::from_le_bytes([inp.byte(), inp.byte()]),
        };
        let n = inp.byte() % 8;
        let headers = (0..n)
            .map(|_| {
                let name = NAMES[usize::from(inp.byte()) % NAMES.len()];
                let len = usize::from(inp.byte());
                (name, inp.bytes(len))
            })
            .collect();
        let flags = inp.byte();
        let len = u16::from_le_bytes([inp.byte(), inp.byte()]);
        Response {
            status,
            headers,
            body: inp.bytes(usize::from(len)),
            chunk: usize::from(flags & 0x7f),
            fails: flags & 0x80 != 0,
        }
    }

    fn headers(&self) -> &[(&'static str, &'a [u8])] {
        &self.headers
    }
}

/// A body that comes in pieces, with an `Interrupted` first and maybe an error at the end.
struct Body<'a> {
    data: &'a [u8],
    chunk: usize,
    fails: bool,
    interrupted: bool,
}

impl Read for Body<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.interrupted {
            self.interrupted = true;
            return Err(io::ErrorKind::Interrupted.into());
        }
        if self.data.is_empty() && self.fails {
            return Err(io::Error::other("connection reset"));
        }
        let chunk = if self.chunk == 0 {
            usize::MAX
        } else {
            self.chunk
        };
        let n = buf.len().min(self.data.len()).min(chunk);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Whether `found` shows another image version than `expected` by the rule the backend
/// documents: the opening ETag if there was one, else the opening Last-Modified.
fn changed(expected: &Validator, found: &Validator) -> bool {
    match (&expected.etag, &expected.last_modified) {
        (Some(e), _) => found.etag.as_ref() != Some(e),
        (None, Some(lm)) => found.last_modified.as_ref() != Some(lm),
        (None, None) => false,
    }
}

/// Opens an image from a HEAD answer and a probe answer, then runs range reads against the
/// image opened (or, if opening failed, one of a size and validators from the input), each
/// with its own answer. Returns the number of reads accepted (for the unit tests).
///
/// Checks, besides "no panic": an opened image has a size from 1 to [`MAX_IMAGE_SIZE`] that
/// agrees with HEAD's Content-Length and the probe's Content-Range total, the probe was a
/// 206 for byte 0, and its validators are HEAD's (or the probe's when HEAD had none); an
/// accepted read got exactly the bytes asked for (a body neither shorter nor longer), from a
/// 206 naming exactly that range (or a 200 for the whole image) with the size opened; a
/// response whose validators differ from the opened ones is refused as a changed image.
pub fn responses(data: &[u8]) -> usize {
    let mut inp = Input(data);
    let head = Response::parse(&mut inp);
    let probe = Response::parse(&mut inp);
    let opened = check_head("fuzz", head.status, head.headers()).and_then(|info| {
        let p = check_probe(probe.status, probe.headers());
        check_open("fuzz", &info, p).map(|(size, v)| (size, v, info))
    });
    let (size, validator) = match opened {
        Ok((size, v, info)) => {
            assert!(
                (1..=MAX_IMAGE_SIZE).contains(&size),
                "opened with size {size}"
            );
            assert_eq!(probe.status, 206, "opened on a probe that is not a 206");
            let cr = probe
                .headers()
                .get_text("content-range")
                .and_then(ContentRange::parse);
            let Some(cr) = cr else {
                panic!("opened on a probe without a Content-Range");
            };
            assert_eq!((cr.first, cr.last), (0, 0), "probe range");
            if let Some(t) = cr.total {
                assert_eq!(t, size, "probe total vs size");
            }
            if let Some(h) = info.size {
                assert_eq!(h, size, "HEAD Content-Length vs size");
                let raw = head.headers().get_text("content-length").map(str::trim);
                assert!(
                    raw.is_some_and(|r| r.bytes().all(|b| b.is_ascii_digit())),
                    "a Content-Length that is not 1*DIGIT taken: {raw:?}"
                );
            }
            let probe_v = Validator::from_headers(probe.headers());
            if info.validator == Validator::default() {
                assert_eq!(v, probe_v, "validators of a HEAD without any");
            } else {
                assert_eq!(v, info.validator, "validators are HEAD's");
                assert!(
                    !changed(&v, &probe_v),
                    "probe from another version accepted"
                );
            }
            (size, v)
        }
        Err(_) => (
            1 + inp.u64() % (1 << 40),
            Validator::from_headers(head.headers()),
        ),
    };
    let mut accepted = 0;
    for _ in 0..MAX_READS {
        if inp.is_empty() {
            break;
        }
        let offset = inp.u64() % size;
        let room = (size - offset).min(4096);
        let len = 1 + u64::from(u16::from_le_bytes([inp.byte(), inp.byte()])) % room;
        let resp = Response::parse(&mut inp);
        let mut buf = vec![0u8; len as usize];
        let verdict =
            check_range_response(&validator, size, offset, len, resp.status, resp.headers())
                .and_then(|()| {
                    let mut body = Body {
                        data: resp.body,
                        chunk: resp.chunk,
                        fails: resp.fails,
                        interrupted: false,
                    };
                    let (got, verdict) = read_body(&mut body, &mut buf, offset);
                    assert!(got <= len, "{got} bytes received for {len}");
                    verdict
                });
        let found = Validator::from_headers(resp.headers());
        let status_ok = resp.status == 206 || (resp.status == 200 && offset == 0 && len == size);
        if status_ok && changed(&validator, &found) {
            assert!(
                matches!(verdict, Err(FetchError::ImageChanged { .. })),
                "a response from another image version was not refused as such: {verdict:?}"
            );
        }
        if verdict.is_err() {
            continue;
        }
        accepted += 1;
        assert!(status_ok, "status {} accepted", resp.status);
        assert!(!changed(&validator, &found), "changed validators accepted");
        assert_eq!(
            resp.body.len() as u64,
            len,
            "body length vs the range asked for"
        );
        assert!(!resp.fails, "a body that ended in an error was accepted");
        assert!(buf == resp.body, "bytes read are not the body");
        if resp.status == 206 {
            let cr = resp
                .headers()
                .get_text("content-range")
                .and_then(ContentRange::parse);
            let Some(cr) = cr else {
                panic!("a 206 without a Content-Range accepted");
            };
            assert_eq!((cr.first, cr.last), (offset, offset + len - 1), "range");
            assert!(cr.total.is_none_or(|t| t == size), "total vs size");
        }
    }
    accepted
}

/// Seed inputs for the target (written to `fuzz/corpus/http_responses` by the ignored test
/// `write_seeds`).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    fn resp(status: u8, headers: &[(u8, &[u8])], flags: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![status, headers.len() as u8];
        for (name, value) in headers {
            v.push(*name);
            v.push(value.len() as u8);
            v.extend_from_slice(value);
        }
        v.push(flags);
        v.extend_from_slice(&(body.len() as u16).to_le_bytes());
        v.extend_from_slice(body);
        v
    }
    fn read(offset: u64, len: u16, r: Vec<u8>) -> Vec<u8> {
        let mut v = offset.to_le_bytes().to_vec();
        v.extend_from_slice(&(len - 1).to_le_bytes());
        v.extend(r);
        v
    }
    // Names and statuses by their index in NAMES and STATUSES.
    let (cl, ar, etag, lm, cr) = (0, 1, 2, 3, 4);
    let (ok, partial, not_allowed) = (0, 1, 2);
    let mut good = resp(
        ok,
        &[(cl, b"8192"), (ar, b"bytes"), (etag, b"\"v1\"")],
        0,
        b"",
    );
    good.extend(resp(
        partial,
        &[(cr, b"bytes 0-0/8192"), (etag, b"\"v1\"")],
        0,
        b"x",
    ));
    let mut reads = good.clone();
    reads.extend(read(
        100,
        16,
        resp(
            partial,
            &[(cr, b"bytes 100-115/8192"), (etag, b"\"v1\"")],
            4,
            &[7; 16],
        ),
    ));
    // Short, long, another ETag, another size, a range of other bytes.
    reads.extend(read(
        0,
        8,
        resp(
            partial,
            &[(cr, b"bytes 0-7/8192"), (etag, b"\"v1\"")],
            0,
            &[1; 5],
        ),
    ));
    reads.extend(read(
        0,
        8,
        resp(
            partial,
            &[(cr, b"bytes 0-7/8192"), (etag, b"\"v1\"")],
            0,
            &[1; 9],
        ),
    ));
    reads.extend(read(
        0,
        8,
        resp(
            partial,
            &[(cr, b"bytes 0-7/8192"), (etag, b"\"v2\"")],
            0,
            &[1; 8],
        ),
    ));
    reads.extend(read(
        0,
        8,
        resp(
            partial,
            &[(cr, b"bytes 0-7/9000"), (etag, b"\"v1\"")],
            0,
            &[1; 8],
        ),
    ));
    reads.extend(read(
        0,
        8,
        resp(
            partial,
            &[(cr, b"bytes 1-8/8192"), (etag, b"\"v1\"")],
            0,
            &[1; 8],
        ),
    ));
    let mut no_head = resp(not_allowed, &[], 0, b"");
    no_head.extend(resp(
        partial,
        &[
            (cr, b"bytes 0-0/4096"),
            (lm, b"Wed, 02 Dec 2026 05:00:00 GMT"),
        ],
        0,
        b"x",
    ));
    no_head.extend(read(
        0,
        4096,
        resp(
            ok,
            &[(lm, b"Wed, 02 Dec 2026 05:00:00 GMT")],
            0x80 | 100,
            &[3; 4096],
        ),
    ));
    vec![
        ("open", good),
        ("reads", reads),
        ("head-refused-whole-image", no_head),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        seeds()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap_or_default()
    }

    #[test]
    fn seeds_take_the_paths_they_are_for() {
        assert_eq!(responses(&seed("open")), 0);
        // Only the first read is right; short, long, changed ETag, changed size and the
        // wrong range are refused.
        assert_eq!(responses(&seed("reads")), 1);
        // The whole image in a 200 is fine, but this body ends in a reset connection.
        assert_eq!(responses(&seed("head-refused-whole-image")), 0);
        let mut ok = seed("head-refused-whole-image");
        let n = ok.len();
        // The flags byte of the last response: no error at the end.
        ok[n - 4096 - 3] = 100;
        assert_eq!(responses(&ok), 1);
    }

    #[test]
    fn garbage_responses_do_not_panic() {
        let pattern: Vec<u8> = (0..4000).map(|i| (i * 7 % 251) as u8).collect();
        for start in 0..64 {
            responses(&pattern[start..]);
        }
        responses(&[]);
        responses(&[0xff; 300]);
    }

    #[test]
    #[ignore = "writes fuzz/corpus/http_responses"]
    fn write_seeds() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/corpus/http_responses"
        );
        std::fs::create_dir_all(dir).expect("corpus directory");
        for (name, bytes) in seeds() {
            std::fs::write(format!("{dir}/{name}"), bytes).expect("seed written");
        }
    }
}
