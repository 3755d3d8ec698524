//! Entry point for the `backend_replies` fuzz target in `fuzz/` (hidden from the docs; no
//! stability promise).
//!
//! [`handshake`] runs the frontend's real handshake ([`Connection::handshake_device`]:
//! SET_OWNER, features, protocol features, the BACKEND_REQ channel, GET_QUEUE_NUM, GET_CONFIG
//! and the device type's config check) against a hostile backend: a thread on the other end
//! of a socket pair that answers every request with a reply built from the input. It must end
//! with an error or a consistent success, never panic or hang.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use crate::connection::{Connection, HandshakeOptions};
use crate::features::{PROTOCOL_FEATURES, VERSION_1};
use crate::types::DeviceType;

/// vhost-user header flags: version 1, and the reply bit.
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;

/// Requests that always get a reply (GET_FEATURES, GET_VRING_BASE, GET_PROTOCOL_FEATURES,
/// GET_QUEUE_NUM, GET_CONFIG, GET_INFLIGHT_FD, GET_MAX_MEM_SLOTS).
const GETS: [u32; 7] = [1, 11, 15, 17, 24, 31, 36];

/// GET_CONFIG.
const GET_CONFIG: u32 = 24;

/// Largest payload the fake backend sends in one reply.
const MAX_PAYLOAD: usize = 0x2000;

/// The input, consumed front to back; reads past its end give zeroes.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        let mut v = a.to_vec();
        v.resize(n, 0);
        v
    }
}

/// A reply header whose code (one byte), flags (one byte) and size (two bytes) are from
/// the input.
fn raw_header(inp: &mut Input<'_>) -> [u8; 12] {
    let req = u32::from(inp.byte().unwrap_or(0));
    let flags = u32::from(inp.byte().unwrap_or(0));
    let size = u16::from_le_bytes([inp.byte().unwrap_or(0), inp.byte().unwrap_or(0)]);
    header(req, flags, u32::from(size))
}

fn header(request: u32, flags: u32, size: u32) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&request.to_le_bytes());
    h[4..8].copy_from_slice(&flags.to_le_bytes());
    h[8..].copy_from_slice(&size.to_le_bytes());
    h
}

/// The hostile backend: reads each request and answers it from the input. Per request a
/// control byte says how: a well-formed reply (the request's code and the size it expects,
/// payload from the input), a reply whose header comes from the input, an unsolicited reply
/// to a request that wants none, or none (for a request that needs one, the connection is
/// cut instead, so the frontend never waits for an answer that will not come). When the
/// input runs out it cuts the connection.
fn serve(mut sock: UnixStream, data: &[u8]) {
    let mut inp = Input(data);
    loop {
        let mut hdr = [0u8; 12];
        if sock.read_exact(&mut hdr).is_err() {
            return;
        }
        let request = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let flags = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        // Our own frontend sent it: its size is honest (and small).
        let mut payload = vec![0u8; size.min(1 << 16)];
        if sock.read_exact(&mut payload).is_err() {
            return;
        }
        let needs_reply = GETS.contains(&request) || flags & NEED_REPLY != 0;
        let Some(control) = inp.byte() else {
            break;
        };
        // The frontend reads a reply of a fixed size (12-byte header and the body its
        // request expects), whatever the header says: send exactly that, or cut.
        let expected = if request == GET_CONFIG { size } else { 8 };
        let reply = match (control % 4, needs_reply) {
            (2, true) => break,
            (0 | 3, true) => {
                let body = if request == GET_CONFIG {
                    // The request's offset, size and flags, then the config bytes.
                    let mut b = payload.get(..12).unwrap_or(&[0; 12]).to_vec();
                    b.extend(inp.take(size.saturating_sub(12)));
                    b.truncate(expected);
                    b
                } else {
                    inp.take(8)
                };
                let mut r = header(request, VERSION | REPLY, body.len() as u32).to_vec();
                r.extend(body);
                Some(r)
            }
            (1, true) => {
                // Header fields from the input, the body the size the frontend reads.
                let mut r = raw_header(&mut inp).to_vec();
                r.extend(inp.take(expected.min(MAX_PAYLOAD)));
                Some(r)
            }
            (3, false) => {
                // An answer nobody asked for, of any size: the next reply read starts with it.
                let h = raw_header(&mut inp);
                let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
                let mut r = h.to_vec();
                r.extend(inp.take(len.min(MAX_PAYLOAD)));
                Some(r)
            }
            _ => None,
        };
        if let Some(r) = reply {
            if sock.write_all(&r).is_err() {
                return;
            }
        }
    }
    let _ = sock.shutdown(Shutdown::Both);
}

/// Runs a handshake against a backend that answers from `data`. The first byte picks the
/// device type the frontend is told to expect (none: learned from the features) and which
/// protocol features it asks for; the rest are the backend's answers. Returns whether the
/// handshake succeeded (for the unit tests).
///
/// Checks, besides "no panic, no hang": a successful handshake saw VERSION_1 and
/// PROTOCOL_FEATURES offered, acked only offered protocol features and the required ones,
/// has GET_QUEUE_NUM's answer exactly when MQ was acked, and a config of the type's size.
pub fn handshake(data: &[u8]) -> bool {
    let Some((&first, replies)) = data.split_first() else {
        return false;
    };
    let kind = match first % 5 {
        0 => None,
        1 => Some(DeviceType::Block),
        2 => Some(DeviceType::Net),
        3 => Some(DeviceType::Console),
        _ => Some(DeviceType::Rng),
    };
    let Ok((ours, theirs)) = UnixStream::pair() else {
        return false;
    };
    let replies = replies.to_vec();
    let Ok(backend) = std::thread::Builder::new()
        .name("fuzz-backend".into())
        .spawn(move || serve(theirs, &replies))
    else {
        return false;
    };
    let mut opts = HandshakeOptions {
        // Bounds a hang the fake backend did not foresee; libFuzzer's -timeout catches it.
        timeout: Duration::from_secs(3),
        ..HandshakeOptions::default()
    };
    if first & 0x80 != 0 {
        opts.protocol_features = VhostUserProtocolFeatures::all();
    }
    let result = Connection::handshake_device(Path::new("fuzz"), ours, &opts, kind);
    let ok = match &result {
        Ok((conn, detected)) => {
            let info = conn.info();
            assert!(info.features & VERSION_1 != 0, "accepted without VERSION_1");
            assert!(
                info.features & PROTOCOL_FEATURES != 0,
                "accepted without bit 30"
            );
            assert!(
                info.offered_protocol_features
                    .contains(info.protocol_features),
                "acked protocol features that were not offered"
            );
            let mq = info
                .protocol_features
                .contains(VhostUserProtocolFeatures::MQ);
            assert_eq!(info.queue_num.is_some(), mq, "GET_QUEUE_NUM vs MQ");
            if let Some(k) = kind {
                assert_eq!(detected.kind, k, "the type given is the type used");
            }
            let size = detected.kind.config_size() as usize;
            assert!(
                info.config.len() == size || size == 0,
                "config of {} bytes for a {} config",
                info.config.len(),
                detected.kind
            );
            true
        }
        Err(_) => false,
    };
    // Dropping the connection closes our end: the backend thread's read ends.
    drop(result);
    let _ = backend.join();
    ok
}

/// Seed inputs for the target (written to `fuzz/corpus/backend_replies` by the ignored test
/// `write_seeds`): a console and a block backend answering the whole handshake well, and one
/// with a reply of the wrong request code.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    // The console's features: VERSION_1, bit 30, console's own bits 0 and 2 (SIZE, EMERG_WR).
    let features = VERSION_1 | PROTOCOL_FEATURES | 0b101;
    let protocol = (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ).bits();
    let well = |v: u64| {
        let mut r = vec![0u8];
        r.extend_from_slice(&v.to_le_bytes());
        r
    };
    // Type 3 (console): SET_OWNER (no reply), GET_FEATURES, GET_PROTOCOL_FEATURES,
    // SET_PROTOCOL_FEATURES (no reply), GET_QUEUE_NUM, GET_CONFIG (12 bytes: 80x25, 1 port).
    let mut console = vec![3, 0];
    console.extend(well(features));
    console.extend(well(protocol));
    console.push(0);
    console.extend(well(2));
    console.push(0);
    console.extend_from_slice(&80u16.to_le_bytes());
    console.extend_from_slice(&25u16.to_le_bytes());
    console.extend_from_slice(&1u32.to_le_bytes());
    console.extend_from_slice(&0u32.to_le_bytes());
    let mut learned = console.clone();
    learned[0] = 0;
    // All protocol features asked for, REPLY_ACK offered: every SET_* wants an ack (0).
    let reply_ack =
        (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK).bits();
    let mut acked = vec![0x80 | 3, 0];
    acked.extend(well(features));
    acked.extend(well(reply_ack));
    acked.extend(well(0));
    acked.push(0);
    acked.extend(std::iter::repeat_n(0, 12));
    // GET_FEATURES answered as if it were GET_PROTOCOL_FEATURES.
    let mut wrong = vec![3, 0, 1, 15, 5, 8, 0];
    wrong.extend_from_slice(&features.to_le_bytes());
    vec![
        ("console", console),
        ("console-learned", learned),
        ("reply-ack", acked),
        ("wrong-reply", wrong),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Less than one watchdog timeout (3 s): no input may leave the frontend waiting.
    const HANDSHAKE_LIMIT: Duration = Duration::from_secs(2);

    fn seed(name: &str) -> Vec<u8> {
        seeds()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap_or_default()
    }

    #[test]
    fn seeds_take_the_paths_they_are_for() {
        assert!(handshake(&seed("console")));
        assert!(handshake(&seed("console-learned")));
        assert!(handshake(&seed("reply-ack")));
        assert!(!handshake(&seed("wrong-reply")));
        // Cut short anywhere before GET_CONFIG's control byte (byte 31; the fake backend pads
        // missing config bytes with zeroes): an error, never a hang.
        let full = seed("console");
        for n in 0..31 {
            assert!(!handshake(&full[..n]), "{n} bytes");
        }
        assert!(handshake(&full[..31]));
    }

    #[test]
    fn garbage_replies_end_without_waiting_for_the_watchdog() {
        let t = std::time::Instant::now();
        let pattern: Vec<u8> = (0..600).map(|i| (i * 7 % 251) as u8).collect();
        for start in 0..32 {
            handshake(&pattern[start..]);
        }
        handshake(&[0xff; 64]);
        // Raw reply headers whose size field says less than the frontend reads: found by the
        // first fuzz run, each took the 3 s watchdog until the fake backend sent the body
        // size the frontend expects.
        let short_size = [
            &b"\x03\x00\x01\x0f\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x09\x00\x00"[..],
            &[
                3, 0, 5, 0x40, 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x27, 0, 0, 0x27,
            ][..],
        ];
        for input in short_size {
            handshake(input);
        }
        assert!(t.elapsed() < HANDSHAKE_LIMIT, "{:?}", t.elapsed());
    }

    #[test]
    #[ignore = "writes fuzz/corpus/backend_replies"]
    fn write_seeds() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/corpus/backend_replies"
        );
        std::fs::create_dir_all(dir).expect("corpus directory");
        for (name, bytes) in seeds() {
            std::fs::write(format!("{dir}/{name}"), bytes).expect("seed written");
        }
    }
}
