//! The virtio-mmio transport and the vhost-user frontend driven without KVM: the test plays the
//! guest driver (register accesses through the device, rings built with hype-testkit in
//! testkit guest RAM) against real backend processes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::time::{Duration, Instant};

use common::{work_dir, Backend};
use hype_testkit::blk::{submit_request, BlkRequest, BlkResponse};
use hype_testkit::memory::GuestRam;
use hype_testkit::virtqueue::Virtqueue;
use hype_vmm::virtio::device::{DeviceError, DeviceOptions, WaitLimit};
use hype_vmm::virtio::frontend::FrontendError;
use hype_vmm::virtio::mmio::{reg, F_VERSION_1, INT_VRING};
use hype_vmm::virtio::{DeviceType, VhostUserDevice};

use common::vdriver::{capacity, pattern, poll_for, r, w, Guest, IO_TIMEOUT, RUNNING};

#[test]
fn block_mem_is_recognised_and_serves_io_through_the_transport() {
    let dir = work_dir("vt_block_mem");
    let backend = Backend::block_mem(&dir, "16M");
    let mut g = Guest::new(1, 128);
    let d = g.attach(&DeviceOptions::new(&backend.socket));
    assert_eq!(d.kind(), DeviceType::Block);
    assert_eq!(r(&d, reg::DEVICE_ID), 2);
    assert_eq!(capacity(&d), (16 << 20) / 512);
    // Bytes past the 60-byte config read as zero; the generation is stable.
    let mut b = [0xffu8; 4];
    d.mmio_read(reg::CONFIG + 60, &mut b);
    assert_eq!(b, [0; 4]);
    assert_eq!(r(&d, reg::CONFIG_GENERATION), 0);

    g.init(&d, F_VERSION_1 | 1 << 9);
    for i in 0..8u64 {
        g.write(0, i * 8, pattern(i as u8, 4096));
    }
    for i in 0..8u64 {
        assert_eq!(g.read(0, i * 8, 4096), pattern(i as u8, 4096), "block {i}");
    }
    assert_eq!(r(&d, reg::INTERRUPT_STATUS) & INT_VRING, INT_VRING);
    assert_eq!(
        d.stats()
            .notify_exits
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(d.guest_errors(), 0);

    // A QueueNotify that reaches the VMM (no ioeventfd) still gets to the backend.
    let req = BlkRequest::read(0, 512);
    let vq = &mut g.queues[0];
    let head = hype_testkit::blk::add_request(vq, &req).unwrap();
    w(&d, reg::QUEUE_NOTIFY, 0);
    let c = vq.wait_for(head, IO_TIMEOUT).unwrap();
    assert_eq!(BlkResponse::from_completion(c).data, pattern(0, 512));
    assert_eq!(
        d.stats()
            .notify_exits
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // Reset stops the rings; a fresh setup (new rings, index 0) works again and sees the data.
    w(&d, reg::STATUS, 0);
    assert_eq!(r(&d, reg::STATUS), 0);
    g.queues.clear();
    // The new queue has eventfds of its own that the device does not know: kick through
    // QueueNotify (as without ioeventfd) and poll the used ring.
    g.queues.push(Virtqueue::new(g.ram.clone(), 0, 64).unwrap());
    g.init(&d, F_VERSION_1);
    let req = BlkRequest::read(8, 4096);
    let vq = &mut g.queues[0];
    let head = hype_testkit::blk::add_request(vq, &req).unwrap();
    w(&d, reg::QUEUE_NOTIFY, 0);
    let c = poll_for(vq, head);
    assert_eq!(BlkResponse::from_completion(c).data, pattern(1, 4096));
}

#[test]
fn options_limit_queues_and_queue_size() {
    let dir = work_dir("vt_options");
    let backend = Backend::start(
        &["block-mem", "--size", "4M", "--num-queues", "4"],
        &dir.join("mq.sock"),
    );
    let mut g = Guest::new(2, 32);
    let mut opts = DeviceOptions::new(&backend.socket);
    opts.num_queues = Some(2);
    opts.queue_size = Some(32);
    let d = g.attach(&opts);
    assert_eq!(d.num_queues(), 2);
    w(&d, reg::QUEUE_SEL, 1);
    assert_eq!(r(&d, reg::QUEUE_NUM_MAX), 32);
    w(&d, reg::QUEUE_SEL, 2);
    assert_eq!(r(&d, reg::QUEUE_NUM_MAX), 0);
    // virtio-blk num_queues in config says 2, not the backend's 4.
    let mut b = [0u8; 2];
    d.mmio_read(reg::CONFIG + 34, &mut b);
    assert_eq!(u16::from_le_bytes(b), 2);
    g.init(&d, F_VERSION_1 | 1 << 12);
    g.write(1, 100, pattern(7, 512));
    assert_eq!(g.read(0, 100, 512), pattern(7, 512));

    // The backend serves one frontend at a time: let this one go first.
    drop(d);
    opts.num_queues = Some(5);
    let e = VhostUserDevice::attach("test1", &opts, g.ram.memory().clone(), None).unwrap_err();
    assert!(
        e.to_string().contains("queues=5 but the backend has 4"),
        "{e}"
    );
    opts.num_queues = None;
    opts.queue_size = Some(100);
    let e = VhostUserDevice::attach("test1", &opts, g.ram.memory().clone(), None).unwrap_err();
    assert!(matches!(e, DeviceError::Options { .. }), "{e}");
}

#[test]
fn waits_for_a_socket_that_appears_later_and_times_out_when_told() {
    let dir = work_dir("vt_wait");
    let sock = dir.join("late.sock");
    let _ = std::fs::remove_file(&sock);
    let mut opts = DeviceOptions::new(&sock);
    opts.wait = WaitLimit::For(Duration::from_millis(300));
    let ram = GuestRam::new(8 << 20).unwrap();
    let t = Instant::now();
    let e = VhostUserDevice::attach("late", &opts, ram.memory().clone(), None).unwrap_err();
    assert!(
        matches!(e, DeviceError::Frontend(FrontendError::WaitTimeout { .. })),
        "{e}"
    );
    assert!(t.elapsed() >= Duration::from_millis(300));

    // Backend started 500 ms after the device begins waiting (no limit).
    opts.wait = WaitLimit::Forever;
    let mem = ram.memory().clone();
    let waiter = std::thread::spawn(move || VhostUserDevice::attach("late", &opts, mem, None));
    std::thread::sleep(Duration::from_millis(500));
    let _backend = Backend::start(&["block-mem", "--size", "1M"], &sock);
    let d = waiter.join().unwrap().unwrap();
    assert_eq!(d.kind(), DeviceType::Block);
}

#[test]
fn backend_killed_and_restarted_completes_pending_io_exactly_once() {
    let dir = work_dir("vt_reconnect");
    let img = dir.join("disk.img");
    let _ = std::fs::remove_file(&img);
    let mut backend = Backend::block_file(&dir, &img, 8 << 20);
    let mut g = Guest::new(1, 64);
    let d = g.attach(&DeviceOptions::new(&backend.socket));
    g.init(&d, F_VERSION_1 | 1 << 9);
    g.write(0, 0, pattern(1, 4096));

    backend.kill();
    // Wait until the device noticed.
    let t = Instant::now();
    while d
        .stats()
        .connected
        .load(std::sync::atomic::Ordering::Acquire)
    {
        assert!(t.elapsed() < Duration::from_secs(5), "hang-up not noticed");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The guest goes on submitting while the backend is away.
    let reqs: Vec<BlkRequest> = (0..4u64)
        .map(|i| BlkRequest::write(64 + i * 8, pattern(10 + i as u8, 4096)))
        .collect();
    let vq = &mut g.queues[0];
    let heads: Vec<u16> = reqs
        .iter()
        .map(|r| submit_request(vq, r).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert!(vq.poll().unwrap().is_empty(), "completed without a backend");

    backend.restart();
    let done = vq.wait(heads.len(), IO_TIMEOUT).unwrap();
    let mut got: Vec<u16> = done.iter().map(|c| c.head).collect();
    got.sort();
    let mut want = heads.clone();
    want.sort();
    assert_eq!(got, want, "each pending request completed exactly once");
    std::thread::sleep(Duration::from_millis(100));
    assert!(vq.poll().unwrap().is_empty(), "duplicate completions");
    for (i, req) in reqs.iter().enumerate() {
        assert_eq!(
            g.read(0, req.sector(), 4096),
            pattern(10 + i as u8, 4096),
            "request {i}"
        );
    }
    assert_eq!(g.read(0, 0, 4096), pattern(1, 4096));
    assert_eq!(
        d.stats()
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(r(&d, reg::STATUS), RUNNING);
}

#[test]
fn backend_back_with_another_capacity_is_reported_to_the_guest() {
    let dir = work_dir("vt_capacity");
    let sock = dir.join("cap.sock");
    let mut backend = Backend::start(&["block-mem", "--size", "4M"], &sock);
    let mut g = Guest::new(1, 16);
    let d = g.attach(&DeviceOptions::new(&sock));
    let config_irq = d.events().config.try_clone().unwrap();
    g.init(&d, F_VERSION_1);
    assert_eq!(capacity(&d), 8192);
    backend.kill();
    let mut bigger = Backend::start(&["block-mem", "--size", "8M"], &sock);
    let t = Instant::now();
    while capacity(&d) != 16384 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "new capacity not seen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(r(&d, reg::CONFIG_GENERATION), 1);
    assert_eq!(
        r(&d, reg::INTERRUPT_STATUS) & 2,
        2,
        "config interrupt pending"
    );
    assert_eq!(config_irq.read().unwrap(), 1);
    g.write(0, 10000, pattern(3, 512));
    assert_eq!(g.read(0, 10000, 512), pattern(3, 512));
    assert!(bigger.alive());
}

#[test]
fn a_hung_backend_blocks_neither_register_accesses_nor_the_device_end() {
    let dir = work_dir("vt_hung");
    let backend = Backend::block_mem(&dir, "1M");
    let g = Guest::new(1, 16);
    let d = g.attach(&DeviceOptions::new(&backend.socket));
    backend.signal(libc::SIGSTOP);
    // DRIVER_OK: the device thread now waits for a backend that does not answer.
    g.init(&d, F_VERSION_1);
    let t = Instant::now();
    for _ in 0..1000 {
        assert_eq!(r(&d, reg::STATUS), RUNNING);
        let mut b = [0u8; 8];
        d.mmio_read(reg::CONFIG, &mut b);
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let t = Instant::now();
    drop(d);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    backend.signal(libc::SIGCONT);
}

#[test]
fn console_is_recognised_and_emergency_writes_are_never_replayed() {
    let dir = work_dir("vt_console");
    let log = dir.join("console.log");
    let _ = std::fs::remove_file(&log);
    let log_arg = format!("file:{}", log.display());
    let mut backend = Backend::start(
        &["console", "--output", &log_arg, "--size", "80x25"],
        &dir.join("console.sock"),
    );
    let g = Guest::new(2, 16);
    let d = g.attach(&DeviceOptions::new(&backend.socket));
    assert_eq!(d.kind(), DeviceType::Console);
    assert_eq!(r(&d, reg::DEVICE_ID), 3);
    // cols, rows from the config space (VIRTIO_CONSOLE_F_SIZE).
    assert_eq!(r(&d, reg::CONFIG), 80 | 25 << 16);
    // EMERG_WRITE acked: a write to emerg_wr (config offset 8) is a character on the console.
    g.init(&d, F_VERSION_1 | 1 << 2);
    d.mmio_write(reg::CONFIG + 8, &u32::from(b'E').to_le_bytes());
    let t = Instant::now();
    while std::fs::read(&log).unwrap_or_default() != b"E" {
        assert!(t.elapsed() < Duration::from_secs(5), "emergency write lost");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A write to a read-only field is refused before it reaches the backend.
    d.mmio_write(reg::CONFIG, &[1, 2]);
    assert_eq!(d.guest_errors(), 1);
    backend.restart();
    let t = Instant::now();
    while d
        .stats()
        .reconnects
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(t.elapsed() < Duration::from_secs(5), "no reconnect");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        std::fs::read(&log).unwrap(),
        b"E",
        "the emergency write was replayed"
    );
    assert_eq!(
        d.stats()
            .config_writes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn reconnect_timeout_gives_up_with_needs_reset_and_a_new_setup_tries_again() {
    let dir = work_dir("vt_giveup");
    let mut backend = Backend::block_mem(&dir, "1M");
    let g = Guest::new(1, 16);
    let mut opts = DeviceOptions::new(&backend.socket);
    opts.reconnect = WaitLimit::For(Duration::from_millis(300));
    let d = g.attach(&opts);
    g.init(&d, F_VERSION_1);
    backend.kill();
    let t = Instant::now();
    while r(&d, reg::STATUS) & hype_vmm::virtio::mmio::status::DEVICE_NEEDS_RESET == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "never gave up");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(d.events().config.read().unwrap(), 1);
    // The guest resets and sets the device up again: hype tries again and the backend,
    // back by then, is taken.
    backend.restart();
    w(&d, reg::STATUS, 0);
    let g2 = Guest {
        ram: g.ram.clone(),
        queues: vec![Virtqueue::new(g.ram.clone(), 0, 16).unwrap()],
    };
    g2.init(&d, F_VERSION_1);
    let t = Instant::now();
    while d
        .stats()
        .reconnects
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(t.elapsed() < Duration::from_secs(5), "no new attempt");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(r(&d, reg::STATUS), RUNNING);
}
