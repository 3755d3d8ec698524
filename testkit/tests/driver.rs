//! The driver against a small in-test vhost-user backend (tests/common).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{serve, serve_after, socket_path, wait_until, Mode, EVENT_IDX, INDIRECT, RING_PACKED};
use hype_testkit::driver::{Driver, DriverOptions, ReplayBase, PROTOCOL_FEATURES_BIT};
use hype_testkit::error::Error;
use hype_testkit::virtqueue::{RawDescriptor, Segment, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vhost::vhost_user::message::VhostUserProtocolFeatures;

const T: Duration = Duration::from_secs(5);

fn opts(num_queues: usize, queue_size: u16) -> DriverOptions {
    DriverOptions {
        num_queues,
        queue_size,
        mem_size: 8 << 20,
        connect_timeout: T,
        ..DriverOptions::default()
    }
}

#[test]
fn handshake_negotiates_and_masks_features() {
    let path = socket_path("handshake");
    let srv = serve(&path, vec![Mode::Echo]);
    let mut o = opts(2, 64);
    o.config_size = 40;
    o.feature_mask = !EVENT_IDX;
    let mut drv = Driver::connect(&path, o).unwrap();
    let info = drv.info().clone();
    assert_ne!(info.features & EVENT_IDX, 0, "offered");
    assert_eq!(info.queue_num, Some(common::NUM_QUEUES as u64));
    assert_eq!(
        info.acked_protocol_features,
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
    );
    assert_eq!(info.config, (0..40).collect::<Vec<u8>>());
    assert_eq!(drv.read_config(10, 4).unwrap(), vec![10, 11, 12, 13]);
    // What the backend got: bit 30 ORed back, EVENT_IDX masked, packed ring never acked.
    let acked = srv.seen.acked_features.load(Ordering::SeqCst);
    assert_ne!(acked & PROTOCOL_FEATURES_BIT, 0);
    assert_eq!(acked & EVENT_IDX, 0);
    assert_eq!(acked & RING_PACKED, 0);
    assert_ne!(acked & INDIRECT, 0);
    assert_eq!(drv.acked_features() & PROTOCOL_FEATURES_BIT, 0);
    assert!(!drv.queue(0).unwrap().event_idx());
    assert!(drv.queue(1).unwrap().indirect());
    assert!(matches!(
        drv.queue(2),
        Err(Error::NoSuchQueue { index: 2, count: 2 })
    ));
}

#[test]
fn too_many_queues_is_an_error() {
    let path = socket_path("toomany");
    let _srv = serve(&path, vec![Mode::Echo]);
    let err = Driver::connect(&path, opts(common::NUM_QUEUES + 1, 64)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotEnoughQueues {
                offered: 4,
                wanted: 5
            }
        ),
        "{err}"
    );
}

#[test]
fn connect_waits_for_socket_and_times_out() {
    let path = socket_path("late");
    let _srv = serve_after(&path, vec![Mode::Echo], Duration::from_millis(300));
    let start = Instant::now();
    let mut drv = Driver::connect(&path, opts(1, 16)).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(250));
    let q = drv.queue(0).unwrap();
    let h = q
        .submit(&[Segment::Readable(b"late"), Segment::Writable(8)])
        .unwrap();
    assert_eq!(q.wait_for(h, T).unwrap().len, 4);

    let missing = socket_path("missing");
    let mut o = opts(1, 16);
    o.connect_timeout = Duration::from_millis(200);
    let start = Instant::now();
    assert!(matches!(
        Driver::connect(&missing, o),
        Err(Error::ConnectTimeout { .. })
    ));
    assert!(start.elapsed() < Duration::from_secs(3));
}

fn echo_round_trips(event_idx: bool, always_kick: bool) {
    let path = socket_path(&format!("echo-{event_idx}-{always_kick}"));
    let _srv = serve(&path, vec![Mode::Echo]);
    let mut o = opts(4, 16);
    o.always_kick = always_kick;
    if !event_idx {
        o.feature_mask = !EVENT_IDX;
    }
    let mut drv = Driver::connect(&path, o).unwrap();
    let live = drv.ram().live_allocations();
    for qi in 0..4 {
        let q = drv.queue(qi).unwrap();
        assert_eq!(q.event_idx(), event_idx);
        // 300 requests through a 16-entry queue: descriptors and buffers are reused.
        let mut next = 0u32;
        let mut done = 0u32;
        let mut expect = std::collections::HashMap::new();
        while done < 300 {
            while next < 300 && q.free_descriptors() >= 2 {
                let msg = format!("q{qi}-req{next}-{}", "x".repeat(next as usize % 50));
                let h = q
                    .add(
                        &[Segment::Readable(msg.as_bytes()), Segment::Writable(64)],
                        false,
                    )
                    .unwrap();
                expect.insert(h, msg);
                next += 1;
            }
            q.notify().unwrap();
            for c in q.wait(1, T).unwrap() {
                let msg = expect
                    .remove(&c.head)
                    .expect("completion for an in-flight head");
                assert_eq!(c.len as usize, msg.len());
                assert_eq!(&c.data[0][..msg.len()], msg.as_bytes());
                assert!(c.data[0][msg.len()..].iter().all(|&b| b == 0));
                done += 1;
            }
        }
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.free_descriptors(), 16);
        let s = q.stats();
        assert_eq!(s.submitted, 300);
        assert_eq!(s.completed, 300);
        if always_kick {
            assert_eq!(s.kicks_suppressed, 0);
        }
    }
    assert_eq!(drv.ram().live_allocations(), live, "all buffers returned");
}

#[test]
fn echo_with_event_idx() {
    echo_round_trips(true, false);
}

#[test]
fn echo_without_event_idx() {
    echo_round_trips(false, false);
}

#[test]
fn echo_always_kick() {
    echo_round_trips(true, true);
}

#[test]
fn out_of_order_completions_are_matched_by_head() {
    let path = socket_path("reverse");
    let srv = serve(&path, vec![Mode::Reverse]);
    let mut drv = Driver::connect(&path, opts(1, 32)).unwrap();
    let q = drv.queue(0).unwrap();
    let mut heads = Vec::new();
    for i in 0..8u8 {
        heads.push((
            q.add(&[Segment::Readable(&[i; 3]), Segment::Writable(3)], false)
                .unwrap(),
            i,
        ));
    }
    q.notify().unwrap();
    let mut got = Vec::new();
    while got.len() < 8 {
        got.extend(q.wait(1, T).unwrap());
    }
    for (h, i) in heads {
        let c = got.iter().find(|c| c.head == h).unwrap();
        assert_eq!(c.data[0], vec![i; 3]);
    }
    assert_eq!(srv.seen.chains.load(Ordering::SeqCst), 8);
}

#[test]
fn indirect_chains() {
    let path = socket_path("indirect");
    let _srv = serve(&path, vec![Mode::Echo]);
    let mut drv = Driver::connect(&path, opts(1, 4)).unwrap();
    let q = drv.queue(0).unwrap();
    // 6 segments on a 4-entry queue only fit indirectly.
    let segs = [
        Segment::Readable(b"ab"),
        Segment::Readable(b"cd"),
        Segment::Readable(b"ef"),
        Segment::Writable(3),
        Segment::Writable(1),
        Segment::Writable(4),
    ];
    assert!(matches!(
        q.submit(&segs),
        Err(Error::NoFreeDescriptors { .. })
    ));
    let h = q.submit_indirect(&segs).unwrap();
    assert_eq!(q.free_descriptors(), 3);
    let c = q.wait_for(h, T).unwrap();
    assert_eq!(c.len, 6);
    assert_eq!(
        c.data,
        vec![b"abc".to_vec(), b"d".to_vec(), b"ef\0\0".to_vec()]
    );
    assert_eq!(q.free_descriptors(), 4);

    // Not negotiated: refused client-side.
    let path = socket_path("noindirect");
    let _srv = serve(&path, vec![Mode::Echo]);
    let mut o = opts(1, 4);
    o.feature_mask = !INDIRECT;
    let mut drv = Driver::connect(&path, o).unwrap();
    assert!(matches!(
        drv.queue(0).unwrap().submit_indirect(&segs),
        Err(Error::IndirectNotNegotiated)
    ));
}

#[test]
fn raw_descriptors_reach_the_device() {
    let path = socket_path("raw");
    let srv = serve(&path, vec![Mode::Echo]);
    let mut drv = Driver::connect(&path, opts(1, 8)).unwrap();
    let ram = drv.ram().clone();
    let src = ram.alloc(4, 8).unwrap();
    let dst = ram.alloc(4, 8).unwrap();
    ram.write(src.addr, b"raw!").unwrap();
    let q = drv.queue(0).unwrap();
    let d = q.reserve_descriptors(3).unwrap();
    q.write_descriptor(
        d[0],
        RawDescriptor {
            addr: src.addr,
            len: 4,
            flags: VRING_DESC_F_NEXT,
            next: d[1],
        },
    )
    .unwrap();
    q.write_descriptor(
        d[1],
        RawDescriptor {
            addr: dst.addr,
            len: 4,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        },
    )
    .unwrap();
    q.submit_raw(d[0]).unwrap();
    let c = q.wait(1, T).unwrap();
    assert_eq!((c[0].head, c[0].len), (d[0], 4));
    assert!(c[0].data.is_empty(), "raw chains have no read-back");
    assert_eq!(ram.read_vec(dst.addr, 4).unwrap(), b"raw!");

    // A descriptor that loops onto itself and one far outside guest memory: the device must
    // survive them (this backend completes them with len 0).
    q.write_descriptor(
        d[2],
        RawDescriptor {
            addr: src.addr,
            len: 4,
            flags: VRING_DESC_F_NEXT,
            next: d[2],
        },
    )
    .unwrap();
    q.submit_raw(d[2]).unwrap();
    q.write_descriptor(
        d[0],
        RawDescriptor {
            addr: 1 << 50,
            len: u32::MAX,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        },
    )
    .unwrap();
    q.submit_raw(d[0]).unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(q.wait(1, T).unwrap());
    }
    got.sort_by_key(|c| c.head);
    let mut want = vec![(d[0], 0), (d[2], 0)];
    want.sort();
    assert_eq!(
        got.iter().map(|c| (c.head, c.len)).collect::<Vec<_>>(),
        want
    );
    q.release_descriptors(&d).unwrap();
    // Still alive and in sync.
    let h = q
        .submit(&[Segment::Readable(b"ok"), Segment::Writable(2)])
        .unwrap();
    assert_eq!(q.wait_for(h, T).unwrap().data[0], b"ok");
    assert_eq!(srv.seen.chains.load(Ordering::SeqCst), 4);
}

#[test]
fn wait_times_out_instead_of_hanging() {
    let path = socket_path("blackhole");
    let srv = serve(&path, vec![Mode::Blackhole]);
    let mut drv = Driver::connect(&path, opts(1, 8)).unwrap();
    let q = drv.queue(0).unwrap();
    let h = q.submit(&[Segment::Writable(1)]).unwrap();
    assert!(wait_until(T, || srv.seen.chains.load(Ordering::SeqCst) == 1));
    let start = Instant::now();
    let err = q.wait(1, Duration::from_millis(100)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                got: 0,
                wanted: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(matches!(
        q.wait_for(h, Duration::from_millis(50)),
        Err(Error::Timeout { .. })
    ));
    assert_eq!(q.in_flight(), 1);
}

#[test]
fn reconnect_resubmits_requests_the_old_backend_lost() {
    let path = socket_path("resubmit");
    let srv = serve(&path, vec![Mode::Blackhole, Mode::Reverse]);
    let mut drv = Driver::connect(&path, opts(2, 16)).unwrap();
    let mut heads = Vec::new();
    for i in 0..3u8 {
        let q = drv.queue(0).unwrap();
        heads.push((
            q.submit(&[Segment::Readable(&[i + 1; 5]), Segment::Writable(5)])
                .unwrap(),
            i + 1,
        ));
    }
    assert!(wait_until(T, || srv.seen.chains.load(Ordering::SeqCst) == 3));
    drv.reconnect(ReplayBase::Resubmit).unwrap();
    assert_eq!(srv.seen.connections.load(Ordering::SeqCst), 2);
    let q = drv.queue(0).unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        got.extend(q.wait(1, T).unwrap());
    }
    for (h, b) in heads {
        assert_eq!(
            got.iter().find(|c| c.head == h).unwrap().data[0],
            vec![b; 5]
        );
    }
    assert_eq!(q.avail_idx(), 6, "three originals plus three replays");
    let h = q
        .submit(&[Segment::Readable(b"after"), Segment::Writable(5)])
        .unwrap();
    assert_eq!(q.wait_for(h, T).unwrap().data[0], b"after");
    // The untouched queue works too.
    let q1 = drv.queue(1).unwrap();
    let h = q1
        .submit(&[Segment::Readable(b"q1"), Segment::Writable(2)])
        .unwrap();
    assert_eq!(q1.wait_for(h, T).unwrap().data[0], b"q1");
}

#[test]
fn stop_queues_then_reconnect_with_reported_bases() {
    let path = socket_path("stop");
    let _srv = serve(&path, vec![Mode::Echo, Mode::Echo, Mode::Echo]);
    let mut drv = Driver::connect(&path, opts(2, 8)).unwrap();
    for i in 0..5u8 {
        let q = drv.queue(0).unwrap();
        let h = q
            .submit(&[Segment::Readable(&[i]), Segment::Writable(1)])
            .unwrap();
        q.wait_for(h, T).unwrap();
    }
    let bases = drv.stop_queues().unwrap();
    assert_eq!(bases, vec![5, 0]);
    let bases16 = bases.iter().map(|&b| b as u16).collect();
    drv.reconnect(ReplayBase::Explicit(bases16)).unwrap();
    let q = drv.queue(0).unwrap();
    let h = q
        .submit(&[Segment::Readable(b"z"), Segment::Writable(1)])
        .unwrap();
    assert_eq!(q.wait_for(h, T).unwrap().data[0], b"z");

    // UsedIdx replay after a plain disconnect with nothing in flight.
    drv.disconnect();
    assert!(matches!(drv.stop_queues(), Err(Error::NotConnected)));
    drv.reconnect(ReplayBase::UsedIdx).unwrap();
    let q = drv.queue(0).unwrap();
    let h = q
        .submit(&[Segment::Readable(b"y"), Segment::Writable(1)])
        .unwrap();
    assert_eq!(q.wait_for(h, T).unwrap().data[0], b"y");
    assert_eq!(q.avail_idx(), 7);
}
