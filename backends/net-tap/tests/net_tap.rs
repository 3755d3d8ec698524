//! hype-net-tap as a real process inside a private network namespace, driven through
//! hype-testkit: frames cross between the driver's virtqueues and host sockets on the tap.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;
#[path = "../../daemon/tests/exit_check/mod.rs"]
mod exit_check;

use std::time::Duration;

use common::*;
use hype_testkit::virtqueue::{RawDescriptor, Segment};
use virtio_bindings::virtio_net::*;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;

fn bit(b: u32) -> u64 {
    1 << b
}

/// GUEST_* offloads, to take them out of the acked features.
const GUEST_OFFLOADS: u64 = (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN)
    | (1 << VIRTIO_NET_F_GUEST_UFO);

#[test]
fn config_space_and_features() {
    if !can_run("config_space_and_features") {
        return;
    }
    let ns = Netns::new();
    let be = Backend::spawn(
        &ns,
        &[
            "--mac",
            GUEST_MAC_STR,
            "--mtu",
            "1400",
            "--queue-pairs",
            "2",
        ],
    );
    let drv = be.connect(2, u64::MAX);
    let cfg = drv.config();
    assert_eq!(&cfg[0..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 2, "max queue pairs");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1400, "mtu");
    assert_eq!(drv.info().queue_num, Some(5));
    let f = drv.info().features;
    for b in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_MQ,
    ] {
        assert_ne!(f & bit(b), 0, "feature bit {b} not offered: {f:#x}");
    }
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & EVENT_IDX, 0);
    assert_eq!(
        f & bit(VIRTIO_NET_F_CTRL_RX),
        0,
        "CTRL_RX is not implemented"
    );
    // The tap got the MTU.
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.name, "link", "show", TAP])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("mtu 1400"));
    drop(drv);
    be.stop();
}

#[test]
fn tx_frames_reach_the_host_with_offloads() {
    if !can_run("tx_frames_reach_the_host_with_offloads") {
        return;
    }
    let ns = Netns::new();
    let be = Backend::spawn(&ns, &["--mac", GUEST_MAC_STR]);
    let mut drv = be.connect(1, u64::MAX);
    ns.configure_tap();
    let tap_mac = ns.tap_mac();
    let (cap, udp_sock) = ns.enter(|| (packet_socket(), udp_socket(HOST_IP, 5000)));
    let q = drv.queue(1).unwrap();

    // Arbitrary frames come out of the tap byte for byte.
    let frames: Vec<Vec<u8>> = (0..8u8)
        .map(|i| {
            let payload: Vec<u8> = (0..60 + usize::from(i) * 100)
                .map(|j| j as u8 ^ i)
                .collect();
            eth([0xff; 6], GUEST_MAC, 0x88b5, &payload)
        })
        .collect();
    for f in &frames {
        let c = send(q, &with_hdr(VnetHdr::default(), f));
        assert_eq!(c.len, 0);
    }
    let got = capture(&cap, frames.len(), |f| {
        f.len() > 14 && f[12..14] == [0x88, 0xb5]
    });
    assert_eq!(got, frames);

    // Checksum offload: a UDP datagram with only the pseudo-header sum and NEEDS_CSUM is
    // accepted by the host stack...
    let ip = udp(
        GUEST_IP,
        HOST_IP,
        4000,
        5000,
        b"partial checksum",
        UdpCsum::Partial,
    );
    let hdr = VnetHdr {
        flags: NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 6,
        ..VnetHdr::default()
    };
    send(q, &with_hdr(hdr, &eth(tap_mac, GUEST_MAC, 0x0800, &ip)));
    assert_eq!(
        udp_recv(&udp_sock).as_deref(),
        Some(&b"partial checksum"[..])
    );
    // ... while the same bytes without the header flag are dropped as a bad checksum.
    let bad = udp(
        GUEST_IP,
        HOST_IP,
        4000,
        5000,
        b"bad checksum",
        UdpCsum::Value(0x1234),
    );
    send(
        q,
        &with_hdr(VnetHdr::default(), &eth(tap_mac, GUEST_MAC, 0x0800, &bad)),
    );
    let good = udp(
        GUEST_IP,
        HOST_IP,
        4000,
        5000,
        b"full checksum",
        UdpCsum::Full,
    );
    send(
        q,
        &with_hdr(VnetHdr::default(), &eth(tap_mac, GUEST_MAC, 0x0800, &good)),
    );
    assert_eq!(udp_recv(&udp_sock).as_deref(), Some(&b"full checksum"[..]));

    // Segmentation offload: one 1500-byte UDP_L4 GSO frame becomes three datagrams.
    let payload: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();
    let ip = udp(GUEST_IP, HOST_IP, 4000, 5000, &payload, UdpCsum::Partial);
    let hdr = VnetHdr {
        flags: NEEDS_CSUM,
        gso_type: GSO_UDP_L4,
        hdr_len: 42,
        gso_size: 500,
        csum_start: 34,
        csum_offset: 6,
        num_buffers: 0,
    };
    // Split over three descriptors, header apart from the frame.
    let full = with_hdr(hdr, &eth(tap_mac, GUEST_MAC, 0x0800, &ip));
    let head = q
        .submit(&[
            Segment::Readable(&full[..HDR]),
            Segment::Readable(&full[HDR..HDR + 100]),
            Segment::Readable(&full[HDR + 100..]),
        ])
        .unwrap();
    q.wait_for(head, TIMEOUT).unwrap();
    for seg in payload.chunks(500) {
        assert_eq!(udp_recv(&udp_sock).as_deref(), Some(seg));
    }
    assert_eq!(udp_recv(&udp_sock), None);
    drop(drv);
    let log = be.stop();
    assert!(log.contains("tx_packets=12 "), "{log}");
}

/// Host datagrams to the guest, with GUEST_CSUM acked or not.
fn rx_udp(ack_guest_csum: bool) {
    let ns = Netns::new();
    let be = Backend::spawn(&ns, &["--mac", GUEST_MAC_STR]);
    let mask = if ack_guest_csum {
        u64::MAX
    } else {
        !GUEST_OFFLOADS
    };
    let mut drv = be.connect(1, mask);
    assert_eq!(
        drv.acked_features() & bit(VIRTIO_NET_F_GUEST_CSUM) != 0,
        ack_guest_csum
    );
    ns.configure_tap();
    let sock = ns.enter(|| udp_socket(HOST_IP, 5000));
    let q = drv.queue(0).unwrap();
    post_rx(q, 64, 2048);
    let sizes = [1usize, 100, 1000, 1472];
    for (i, &n) in sizes.iter().enumerate() {
        let data: Vec<u8> = (0..n).map(|j| (j + i) as u8).collect();
        udp_send(&sock, GUEST_IP, 6000 + i as u16, &data);
    }
    let got = receive(q, sizes.len(), TIMEOUT, |f| {
        udp_of(&f.frame).is_some_and(|(_, d, _)| (6000..6010).contains(&d))
    });
    assert_eq!(got.len(), sizes.len());
    for (i, f) in got.iter().enumerate() {
        let (sport, dport, data) = udp_of(&f.frame).unwrap();
        assert_eq!((sport, dport), (5000, 6000 + i as u16));
        let want: Vec<u8> = (0..sizes[i]).map(|j| (j + i) as u8).collect();
        assert_eq!(data, &want[..]);
        assert_eq!(&f.frame[0..6], &GUEST_MAC);
        assert_eq!(f.hdr.num_buffers, 1);
        assert_eq!(f.hdr.gso_type, GSO_NONE);
        if ack_guest_csum {
            // The host left the checksum to us: partial, with its position.
            assert_eq!(f.hdr.flags & NEEDS_CSUM, NEEDS_CSUM, "{:?}", f.hdr);
            assert_eq!((f.hdr.csum_start, f.hdr.csum_offset), (34, 6));
        } else {
            assert_eq!(f.hdr.flags, 0, "{:?}", f.hdr);
            assert!(udp_csum_ok(&f.frame), "software checksum must be complete");
        }
    }
    drop(drv);
    let log = be.stop();
    assert!(log.contains("rx_malformed=0 rx_dropped=0"), "{log}");
}

#[test]
fn rx_frames_reach_the_driver_with_checksum_offload() {
    if !can_run("rx_frames_reach_the_driver_with_checksum_offload") {
        return;
    }
    rx_udp(true);
}

#[test]
fn rx_without_guest_offloads_gets_complete_checksums() {
    if !can_run("rx_without_guest_offloads_gets_complete_checksums") {
        return;
    }
    rx_udp(false);
}

#[test]
fn rx_waits_for_buffers_without_spinning() {
    if !can_run("rx_waits_for_buffers_without_spinning") {
        return;
    }
    let ns = Netns::new();
    let be = Backend::spawn(&ns, &["--mac", GUEST_MAC_STR]);
    let mut drv = be.connect(1, u64::MAX);
    ns.configure_tap();
    let sock = ns.enter(|| udp_socket(HOST_IP, 5000));
    let q = drv.queue(0).unwrap();
    // One buffer, then a burst: the first frame fills it, the rest must wait in the tap.
    post_rx(q, 1, 2048);
    for i in 0..20u16 {
        udp_send(&sock, GUEST_IP, 7000 + i, &i.to_le_bytes());
    }
    let first = receive(q, 1, TIMEOUT, |_| true);
    assert_eq!(first.len(), 1);
    std::thread::sleep(Duration::from_millis(200));
    let before = be.cpu_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let spent = be.cpu_ticks() - before;
    // A thread polling the readable tap would burn ~100 ticks per second.
    assert!(
        spent <= 10,
        "backend used {spent} ticks while waiting for buffers"
    );
    // Buffers and a kick: everything that waited arrives, in order.
    post_rx(q, 64, 2048);
    let rest = receive(q, 19, TIMEOUT, |f| udp_of(&f.frame).is_some());
    let ports: Vec<u16> = std::iter::once(&first[0])
        .chain(rest.iter())
        .map(|f| udp_of(&f.frame).unwrap().1)
        .collect();
    assert_eq!(ports, (7000..7020).collect::<Vec<_>>());
    drop(drv);
    be.stop();
}

#[test]
fn several_queue_pairs_with_the_control_queue() {
    if !can_run("several_queue_pairs_with_the_control_queue") {
        return;
    }
    let ns = Netns::new();
    let be = Backend::spawn(&ns, &["--mac", GUEST_MAC_STR, "--queue-pairs", "2"]);
    let mut drv = be.connect(2, u64::MAX);
    assert_ne!(drv.acked_features() & bit(VIRTIO_NET_F_MQ), 0);
    ns.configure_tap();
    let (cap, sock_base) = ns.enter(|| (packet_socket(), udp_socket(HOST_IP, 5000)));
    drop(sock_base);
    // VQ_PAIRS_SET: 3 is refused, 2 accepted.
    let ctrl = drv.queue(4).unwrap();
    for (pairs, want) in [
        (3u16, VIRTIO_NET_ERR),
        (0, VIRTIO_NET_ERR),
        (2, VIRTIO_NET_OK),
    ] {
        let [lo, hi] = pairs.to_le_bytes();
        let cmd = [
            VIRTIO_NET_CTRL_MQ as u8,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
            lo,
            hi,
        ];
        let head = ctrl
            .submit(&[Segment::Readable(&cmd), Segment::WritableFilled(1, 0xff)])
            .unwrap();
        let c = ctrl.wait_for(head, TIMEOUT).unwrap();
        assert_eq!((c.len, c.data[0][0]), (1, want as u8), "pairs {pairs}");
    }
    // Unknown commands are refused.
    let head = ctrl
        .submit(&[
            Segment::Readable(&[0, 0, 1]),
            Segment::WritableFilled(1, 0xff),
        ])
        .unwrap();
    assert_eq!(
        ctrl.wait_for(head, TIMEOUT).unwrap().data[0][0],
        VIRTIO_NET_ERR as u8
    );

    // TX on both pairs.
    for (qi, marker) in [(1usize, 1u8), (3, 2)] {
        let q = drv.queue(qi).unwrap();
        for i in 0..4u8 {
            let f = eth(
                [0xff; 6],
                GUEST_MAC,
                0x88b5,
                &[marker, i, 0, 0, 0, 0, 0, 0, 0, 0],
            );
            send(q, &with_hdr(VnetHdr::default(), &f));
        }
    }
    let got = capture(&cap, 8, |f| f.len() > 15 && f[12..14] == [0x88, 0xb5]);
    let mut seen: Vec<(u8, u8)> = got.iter().map(|f| (f[14], f[15])).collect();
    seen.sort();
    let want: Vec<(u8, u8)> = (1..=2).flat_map(|m| (0..4).map(move |i| (m, i))).collect();
    assert_eq!(seen, want);

    // RX: many flows spread over both tap queues; every datagram arrives once.
    post_rx(drv.queue(0).unwrap(), 128, 2048);
    post_rx(drv.queue(2).unwrap(), 128, 2048);
    let flows = 48u16;
    ns.enter(|| {
        for i in 0..flows {
            let s = udp_socket(HOST_IP, 20000 + i);
            udp_send(&s, GUEST_IP, 9000, &i.to_le_bytes());
        }
    });
    let mut ports = Vec::new();
    let mut per_queue = [0usize; 2];
    let deadline = std::time::Instant::now() + TIMEOUT;
    while ports.len() < usize::from(flows) && std::time::Instant::now() < deadline {
        for (k, qi) in [0usize, 2].into_iter().enumerate() {
            let got = receive(drv.queue(qi).unwrap(), 64, Duration::from_millis(50), |f| {
                udp_of(&f.frame).is_some_and(|(_, d, _)| d == 9000)
            });
            per_queue[k] += got.len();
            ports.extend(got.iter().map(|f| udp_of(&f.frame).unwrap().0));
        }
    }
    ports.sort();
    assert_eq!(ports, (20000..20000 + flows).collect::<Vec<_>>());
    assert!(
        per_queue[0] > 0 && per_queue[1] > 0,
        "flows were not spread: {per_queue:?}"
    );
    drop(drv);
    let log = be.stop();
    assert!(log.contains("ctrl_errors=3"), "{log}");
}

#[test]
fn malformed_chains_are_dropped_and_counted() {
    if !can_run("malformed_chains_are_dropped_and_counted") {
        return;
    }
    let ns = Netns::new();
    let be = Backend::spawn(&ns, &["--mac", GUEST_MAC_STR]);
    let mut drv = be.connect(1, u64::MAX);
    ns.configure_tap();
    let (cap, sock) = ns.enter(|| (packet_socket(), udp_socket(HOST_IP, 5000)));
    let mem_size = drv.ram().size();

    // TX: a short header, a device-writable buffer, a buffer outside guest memory.
    let tx = drv.queue(1).unwrap();
    let c = send(tx, &[0u8; 5]);
    assert_eq!(c.len, 0);
    let head = tx.submit(&[Segment::Writable(64)]).unwrap();
    tx.wait_for(head, TIMEOUT).unwrap();
    let ids = tx.reserve_descriptors(1).unwrap();
    tx.write_descriptor(
        ids[0],
        RawDescriptor {
            addr: mem_size - 16,
            len: 4096,
            flags: 0,
            next: 0,
        },
    )
    .unwrap();
    tx.submit_raw(ids[0]).unwrap();
    tx.wait_for(ids[0], TIMEOUT).unwrap();
    // Still working.
    let f = eth([0xff; 6], GUEST_MAC, 0x88b5, b"after the bad ones");
    send(tx, &with_hdr(VnetHdr::default(), &f));
    assert_eq!(capture(&cap, 1, |g| g == &f[..]).len(), 1);

    // RX: a device-readable buffer and one outside memory come back empty, the good one
    // after them gets the frame.
    let rx = drv.queue(0).unwrap();
    let bad1 = rx.add(&[Segment::Readable(&[0u8; 2048])], false).unwrap();
    let ids = rx.reserve_descriptors(1).unwrap();
    rx.write_descriptor(
        ids[0],
        RawDescriptor {
            addr: mem_size + 4096,
            len: 2048,
            flags: 2, // VRING_DESC_F_WRITE
            next: 0,
        },
    )
    .unwrap();
    rx.add_raw(ids[0]).unwrap();
    let good = rx.add(&[Segment::Writable(2048)], false).unwrap();
    rx.notify().unwrap();
    udp_send(&sock, GUEST_IP, 6000, b"to the good buffer");
    let done = rx.wait(3, TIMEOUT).unwrap();
    let by_head = |h: u16| done.iter().find(|c| c.head == h).unwrap().len;
    assert_eq!(by_head(bad1), 0);
    assert_eq!(by_head(ids[0]), 0);
    let good_c = done.iter().find(|c| c.head == good).unwrap();
    let frame = &good_c.data[0][HDR..good_c.len as usize];
    assert_eq!(udp_of(frame).unwrap().2, b"to the good buffer");
    drop(drv);
    let log = be.stop();
    assert!(log.contains("tx_malformed=3 "), "{log}");
    assert!(log.contains("rx_malformed=2 "), "{log}");
}

#[test]
fn tcp_segmentation_offload_both_ways() {
    if !can_run("tcp_segmentation_offload_both_ways") {
        return;
    }
    use std::io::{Read, Write};
    let ns = Netns::new();
    let be = Backend::spawn(&ns, &["--mac", GUEST_MAC_STR]);
    let mut drv = be.connect(1, u64::MAX);
    for b in [
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(drv.acked_features() & bit(b), 0, "bit {b}");
    }
    ns.configure_tap();
    let tap_mac = ns.tap_mac();
    let listener = ns.enter(|| std::net::TcpListener::bind("10.0.0.1:7000").unwrap());
    post_rx(drv.queue(0).unwrap(), 200, 2048);
    let frame = |ip: Vec<u8>| eth(tap_mac, GUEST_MAC, 0x0800, &ip);
    let plain = VnetHdr {
        flags: NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..VnetHdr::default()
    };
    let is_ours = |f: &RxFrame| tcp_of(&f.frame).is_some();

    // Handshake played by hand.
    let (sport, iss) = (40000u16, 1000u32);
    send(
        drv.queue(1).unwrap(),
        &with_hdr(
            plain,
            &frame(tcp(sport, 7000, iss, 0, TCP_SYN, Some(1460), &[])),
        ),
    );
    let synack = receive(drv.queue(0).unwrap(), 1, TIMEOUT, is_ours);
    let synack = tcp_of(&synack[0].frame).unwrap();
    assert_eq!(synack.flags & (TCP_SYN | TCP_ACK), TCP_SYN | TCP_ACK);
    assert_eq!(synack.ack, iss + 1);
    let mut rcv_next = synack.seq.wrapping_add(1);
    let snd_next = iss + 1;
    send(
        drv.queue(1).unwrap(),
        &with_hdr(
            plain,
            &frame(tcp(sport, 7000, snd_next, rcv_next, TCP_ACK, None, &[])),
        ),
    );
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();

    // Host to guest: the host stack hands us TSO frames larger than the MTU, spread over
    // several 2 KiB buffers.
    let total = 40000usize;
    let data: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
    let writer = {
        let mut c = conn.try_clone().unwrap();
        let d = data.clone();
        std::thread::spawn(move || c.write_all(&d).unwrap())
    };
    let mut got = Vec::new();
    let mut biggest = (0usize, VnetHdr::default(), 0usize);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while got.len() < total && std::time::Instant::now() < deadline {
        for f in receive(
            drv.queue(0).unwrap(),
            1,
            Duration::from_millis(200),
            is_ours,
        ) {
            let seg = tcp_of(&f.frame).unwrap();
            if seg.seq == rcv_next && !seg.data.is_empty() {
                if seg.data.len() > biggest.0 {
                    biggest = (seg.data.len(), f.hdr, f.buffers);
                }
                got.extend_from_slice(&seg.data);
                rcv_next = rcv_next.wrapping_add(seg.data.len() as u32);
            }
            // Acknowledge everything in order so the host keeps sending.
            send(
                drv.queue(1).unwrap(),
                &with_hdr(
                    plain,
                    &frame(tcp(sport, 7000, snd_next, rcv_next, TCP_ACK, None, &[])),
                ),
            );
        }
        post_rx(drv.queue(0).unwrap(), 16, 2048);
    }
    writer.join().unwrap();
    assert!(
        got == data,
        "received {} of {total} bytes intact",
        got.len()
    );
    let (len, hdr, buffers) = biggest;
    assert!(
        len > 1460,
        "no segment above the MSS arrived: largest {len}"
    );
    assert_eq!(hdr.gso_type & 0x7f, GSO_TCPV4, "{hdr:?}");
    assert_eq!(hdr.gso_size, 1460, "{hdr:?}");
    assert!(
        buffers > 1 && usize::from(hdr.num_buffers) == buffers,
        "{hdr:?} in {buffers}"
    );

    // Guest to host: one 20000-byte TSO frame, segmented by the host side.
    let payload: Vec<u8> = (0..20000usize).map(|i| (i % 241) as u8).collect();
    let gso = VnetHdr {
        flags: NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    let ip = tcp(
        sport,
        7000,
        snd_next,
        rcv_next,
        TCP_ACK | TCP_PSH,
        None,
        &payload,
    );
    send(drv.queue(1).unwrap(), &with_hdr(gso, &frame(ip)));
    let mut back = vec![0u8; payload.len()];
    conn.read_exact(&mut back).unwrap();
    assert!(back == payload);
    drop(drv);
    let log = be.stop();
    assert!(log.contains("tx_errors=0 "), "{log}");
}

#[test]
fn legacy_driver_gets_10_byte_headers() {
    if !can_run("legacy_driver_gets_10_byte_headers") {
        return;
    }
    let ns = Netns::new();
    let be = Backend::spawn(&ns, &["--mac", GUEST_MAC_STR]);
    let mut drv = be.connect(1, !(VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF)));
    ns.configure_tap();
    let (cap, sock) = ns.enter(|| (packet_socket(), udp_socket(HOST_IP, 5000)));
    // TX: 10-byte header, then the frame.
    let f = eth([0xff; 6], GUEST_MAC, 0x88b5, b"legacy header frame");
    let mut chain = vec![0u8; 10];
    chain.extend_from_slice(&f);
    send(drv.queue(1).unwrap(), &chain);
    assert_eq!(capture(&cap, 1, |g| g == &f[..]).len(), 1);
    // RX: the frame starts right after 10 header bytes.
    let q = drv.queue(0).unwrap();
    post_rx(q, 4, 2048);
    udp_send(&sock, GUEST_IP, 6000, b"legacy rx");
    let c = q.wait(1, TIMEOUT).unwrap().remove(0);
    let frame = &c.data[0][10..c.len as usize];
    assert_eq!(udp_of(frame).unwrap().2, b"legacy rx");
    drop(drv);
    be.stop();
}

#[test]
fn existing_tap_is_used_and_left_in_place() {
    if !can_run("existing_tap_is_used_and_left_in_place") {
        return;
    }
    let ns = Netns::new();
    ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"]);
    let be = Backend::spawn(&ns, &["--mac", GUEST_MAC_STR]);
    let mut drv = be.connect(1, u64::MAX);
    ns.configure_tap();
    let cap = ns.enter(packet_socket);
    let f = eth([0xff; 6], GUEST_MAC, 0x88b5, b"through a persistent tap");
    send(drv.queue(1).unwrap(), &with_hdr(VnetHdr::default(), &f));
    assert_eq!(capture(&cap, 1, |g| g == &f[..]).len(), 1);
    drop(drv);
    let log = be.stop();
    assert!(log.contains("(existing)"), "{log}");
    // Still there after the backend left.
    ns.ip(&["link", "show", TAP]);
}

#[test]
fn usage_and_runtime_errors_exit_with_their_codes() {
    if !can_run("usage_and_runtime_errors_exit_with_their_codes") {
        return;
    }
    let ns = Netns::new();
    let exec = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, BIN])
            .args(args)
            .env("HYPE_LOG", "off")
            .output()
            .unwrap()
    };
    let dir = std::env::temp_dir().join(format!("{}-errs", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("s.sock");
    let sock = sock.to_str().unwrap();
    // Usage errors exit 2, with one line on stderr.
    let out = exec(&["--socket", sock, "--tap", TAP, "--mac", "01:02:03:04:05:06"]);
    exit_check::assert_exit(&out, exit_check::USAGE, "hype-net-tap", "--mac");
    let out = exec(&["--socket", sock, "--tap", TAP, "--queue-size", "100"]);
    exit_check::assert_exit(
        &out,
        exit_check::USAGE,
        "hype-net-tap",
        "invalid queue size",
    );
    let out = exec(&["--socket", sock, "--tap", "a-name-far-too-long"]);
    exit_check::assert_exit(
        &out,
        exit_check::USAGE,
        "hype-net-tap",
        "invalid interface name",
    );
    // The named tap contradicts the arguments: a single-queue tap cannot serve two pairs.
    ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"]);
    let out = exec(&["--socket", sock, "--tap", TAP, "--queue-pairs", "2"]);
    exit_check::assert_exit(
        &out,
        exit_check::USAGE,
        "hype-net-tap",
        "hype-net-tap: cannot attach queue 0 of tap hnt0",
    );
    assert!(!std::path::Path::new(sock).exists(), "socket left behind");
    // A socket path someone else listens on.
    let taken = std::os::unix::net::UnixListener::bind(sock).unwrap();
    let out = exec(&["--socket", sock, "--tap", TAP]);
    exit_check::assert_exit(&out, exit_check::USAGE, "hype-net-tap", "is in use");
    drop(taken);
    std::fs::remove_file(sock).unwrap();
    ns.ip(&["link", "del", TAP]);
    // Runtime: serving starts, then the first frontend finds no file descriptors left for
    // eight queue pairs' worker threads.
    let cmd = exit_check::with_fd_limit(
        &["ip", "netns", "exec", &ns.name],
        32,
        BIN,
        &["--socket", sock, "--tap", TAP, "--queue-pairs", "8"],
    );
    let out = exit_check::exit_after_connect(cmd, std::path::Path::new(sock));
    exit_check::assert_exit(
        &out,
        exit_check::RUNTIME,
        "hype-net-tap",
        "Too many open files",
    );
    assert!(!std::path::Path::new(sock).exists(), "socket left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reconnect_and_work_without_event_idx() {
    if !can_run("reconnect_and_work_without_event_idx") {
        return;
    }
    let ns = Netns::new();
    let be = Backend::spawn(&ns, &["--mac", GUEST_MAC_STR]);
    let mut first = true;
    for mask in [u64::MAX, !EVENT_IDX] {
        let mut drv = be.connect(1, mask);
        assert_eq!(drv.acked_features() & EVENT_IDX != 0, mask == u64::MAX);
        if first {
            ns.configure_tap();
            first = false;
        }
        let (cap, sock) = ns.enter(|| (packet_socket(), udp_socket(HOST_IP, 5000)));
        // A batch of TX frames and a batch of RX frames, the rings kept busy.
        let frames: Vec<Vec<u8>> = (0..100u8)
            .map(|i| eth([0xff; 6], GUEST_MAC, 0x88b5, &[i; 50]))
            .collect();
        let q = drv.queue(1).unwrap();
        let heads: Vec<u16> = frames
            .iter()
            .map(|f| {
                q.add(
                    &[Segment::Readable(&with_hdr(VnetHdr::default(), f))],
                    false,
                )
                .unwrap()
            })
            .collect();
        q.notify().unwrap();
        let done = q.wait(heads.len(), TIMEOUT).unwrap();
        assert_eq!(done.len(), heads.len());
        let got = capture(&cap, frames.len(), |f| {
            f.len() > 14 && f[12..14] == [0x88, 0xb5]
        });
        assert_eq!(got, frames);
        let q = drv.queue(0).unwrap();
        post_rx(q, 32, 2048);
        let mut received = Vec::new();
        for i in 0..100u16 {
            udp_send(&sock, GUEST_IP, 6000, &i.to_le_bytes());
            if i % 20 == 19 {
                let got = receive(q, 20, TIMEOUT, |f| udp_of(&f.frame).is_some());
                post_rx(q, got.len(), 2048);
                received.extend(got.iter().map(|f| {
                    let d = udp_of(&f.frame).unwrap().2;
                    u16::from_le_bytes([d[0], d[1]])
                }));
            }
        }
        assert_eq!(received, (0..100).collect::<Vec<_>>());
        drop(drv);
    }
    let log = be.stop();
    assert_eq!(log.matches("frontend connected").count(), 2, "{log}");
}

#[test]
fn confined_while_serving_and_forbidden_calls_kill() {
    if !can_run("confined_while_serving_and_forbidden_calls_kill") {
        return;
    }
    let ns = Netns::new();
    let be = Backend::spawn(&ns, &["--queue-pairs", "2"]);
    let drv = be.connect(2, u64::MAX);
    let threads = hype_testkit::sandbox::thread_modes(be.pid()).unwrap();
    // Main, shutdown watcher, one worker per queue pair and the control queue's.
    assert!(threads.len() >= 5, "{threads:?}");
    for t in &threads {
        assert_eq!(
            t.seccomp,
            hype_testkit::sandbox::SECCOMP_MODE_FILTER,
            "{threads:?}"
        );
    }
    assert!(
        be.log_text().contains("sandbox: net-tap confined"),
        "{}",
        be.log_text()
    );
    drop(drv);
    be.stop();
    for (hook, call) in [("execve", "execve"), ("socket-inet", "socket")] {
        let mut cmd = std::process::Command::new("ip");
        let sock = std::env::temp_dir().join(format!("{}-{hook}.sock", ns.name));
        cmd.args(["netns", "exec", &ns.name, BIN, "--tap", TAP, "--socket"])
            .arg(&sock);
        let (status, stderr) = hype_testkit::sandbox::run_hook(cmd, hook, TIMEOUT).unwrap();
        hype_testkit::sandbox::assert_killed_by_sigsys(status, &stderr, call);
    }
}

/// `--user nobody`: the TAP (two queue pairs) is created as root, then the backend drops to
/// nobody for good (no capability left, CAP_NET_ADMIN included) and still moves frames.
#[test]
fn drops_root_after_creating_the_tap() {
    if !can_run("drops_root_after_creating_the_tap") {
        return;
    }
    use hype_testkit::sandbox::{check_runs_as, NOBODY};
    let ns = Netns::new();
    let be = Backend::spawn(
        &ns,
        &[
            "--queue-pairs",
            "2",
            "--mac",
            GUEST_MAC_STR,
            "--user",
            "nobody",
        ],
    );
    // The socket's directory is the user's (as hype run's runtime directory is), so the
    // dropped backend can remove its socket on exit.
    let dir = std::env::temp_dir().join(format!("{}-dir", ns.name));
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let mut drv = be.connect(2, u64::MAX);
    if let Err(e) = check_runs_as(be.pid(), NOBODY, NOBODY) {
        panic!("{e}\nlog:\n{}", be.log_text());
    }
    ns.configure_tap();
    let cap = ns.enter(packet_socket);
    let f = eth(
        [0xff; 6],
        GUEST_MAC,
        0x88b5,
        b"sent by a backend that is not root",
    );
    send(drv.queue(1).unwrap(), &with_hdr(VnetHdr::default(), &f));
    assert_eq!(capture(&cap, 1, |g| g == &f[..]).len(), 1);
    drop(drv);
    let log = be.stop();
    assert!(
        log.contains("privileges dropped: uid 65534 gid 65534"),
        "{log}"
    );
    assert!(!dir.join("net.sock").exists(), "{log}");
}
