//! hype-block-mem as a real process, driven through hype-testkit.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

#[path = "../../block/tests/conformance/mod.rs"]
mod conformance;
#[path = "../../daemon/tests/exit_check/mod.rs"]
mod exit_check;

use conformance::*;

const BIN: &str = env!("CARGO_BIN_EXE_hype-block-mem");
const MEM: u64 = 64 << 20;

fn spawn(name: &str, args: &[&str]) -> (Process, std::path::PathBuf) {
    let dir = tempdir(name);
    let p = Process::spawn(BIN, args, &dir.join("blk.sock"));
    (p, dir)
}

#[test]
fn conformance_single_queue() {
    let (mut p, _dir) = spawn("mem1", &["--size", "16M", "--serial", "mem-disk-1"]);
    let mut disk = connect(&p.socket, 1);
    check_config(&mut disk, (16 << 20) / 512, 1);
    check_read_after_write_whole_disk(&mut disk, 3);
    check_flush(&mut disk);
    check_get_id(&mut disk, "mem-disk-1");
    check_discard_and_write_zeroes(&mut disk);
    check_discard_payload_policy(&mut disk);
    check_out_of_range_and_unknown(&mut disk);
    check_framing_policy(&mut disk);
    check_hostile_chains(&mut disk, MEM);
    // Still serving after all of that.
    check_read_after_write_whole_disk(&mut disk, 4);
    drop(disk);
    assert!(p.alive());
    let st = p.signal_and_wait(libc::SIGTERM);
    assert!(st.success(), "{st:?}");
    assert!(!p.socket.exists(), "socket left behind");
}

#[test]
fn many_requests_in_flight_on_four_queues() {
    let (_p, _dir) = spawn("mem4", &["--size", "32M", "--num-queues", "4"]);
    let mut disk = connect(&_p.socket, 4);
    check_config(&mut disk, (32 << 20) / 512, 4);
    check_many_in_flight(&mut disk, 9);
    check_read_after_write_whole_disk(&mut disk, 10);
}

#[test]
fn io_pool_mode() {
    let (_p, _dir) = spawn(
        "mempool",
        &["--size", "8M", "--num-queues", "2", "--io-threads", "8"],
    );
    let mut disk = connect(&_p.socket, 2);
    check_many_in_flight(&mut disk, 11);
    check_read_after_write_whole_disk(&mut disk, 12);
    check_hostile_chains(&mut disk, MEM);
    check_discard_and_write_zeroes(&mut disk);
    drop(disk);
    check_stop_and_resume(&_p.socket);
    check_reconnect(&_p.socket, 2);
}

#[test]
fn read_only_disk_from_image() {
    let dir = tempdir("memro");
    let img = dir.join("disk.img");
    std::fs::write(&img, pattern(0, 1 << 20, 5)).unwrap();
    let p = Process::spawn(
        BIN,
        &["--image", img.to_str().unwrap(), "--readonly"],
        &dir.join("blk.sock"),
    );
    let mut disk = connect(&p.socket, 1);
    check_config(&mut disk, (1 << 20) / 512, 1);
    check_read_only(&mut disk, Some(5));
}

#[test]
fn reconnect_keeps_data() {
    let (mut p, _dir) = spawn("memrc", &["--size", "4M"]);
    check_reconnect(&p.socket, 1);
    check_stop_and_resume(&p.socket);
    assert!(p.alive());
    assert!(p.signal_and_wait(libc::SIGINT).success());
}

/// Resident memory of process `pid` in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_10_tib_disk_costs_little_memory_until_written() {
    // The bookkeeping is sparse: a 10 TiB RAM disk the guest has not written is a few MiB of
    // process, not hundreds (it used to be one lock per MiB: 325 MiB idle).
    let (mut p, _dir) = spawn("mem10t", &["--size", "10T"]);
    let mut disk = connect(&p.socket, 1);
    check_config(&mut disk, (10u64 << 40) / 512, 1);
    let rss = rss_kib(p.pid());
    assert!(rss < 64 * 1024, "10 TiB idle RAM disk uses {rss} KiB");
    drop(disk);
    let st = p.signal_and_wait(libc::SIGTERM);
    assert!(st.success(), "{st:?}");
}

#[test]
fn usage_errors_exit_2_runtime_errors_exit_1() {
    let dir = tempdir("memexit");
    let sock = dir.join("blk.sock");
    let sock_s = sock.to_str().unwrap();
    let usage: [(&[&str], &str); 6] = [
        (
            &["--size", "2000000T", "--socket", sock_s],
            "larger than the maximum",
        ),
        (
            &["--size", "12Q", "--socket", sock_s],
            "invalid value '12Q'",
        ),
        (&["--socket", sock_s], "give --size or --image"),
        (
            &["--size", "1000", "--socket", sock_s],
            "not a multiple of 512",
        ),
        (
            &["--image", "/nonexistent/disk.img", "--socket", sock_s],
            "cannot read image /nonexistent/disk.img",
        ),
        (&["--size", "1M"], "no socket"),
    ];
    for (args, needle) in usage {
        let out = exit_check::run_bin(BIN, args);
        exit_check::assert_exit(&out, exit_check::USAGE, "hype-block-mem", needle);
    }
    // A socket path someone else listens on.
    let taken = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let out = exit_check::run_bin(BIN, &["--size", "1M", "--socket", sock_s]);
    exit_check::assert_exit(&out, exit_check::USAGE, "hype-block-mem", "is in use");
    drop(taken);
    std::fs::remove_file(&sock).unwrap();
    // Runtime: serving starts, then the first frontend finds no file descriptors left for
    // 64 queues' worker threads.
    let cmd = exit_check::with_fd_limit(
        &[],
        32,
        BIN,
        &[
            &["--size", "1M"][..],
            &exit_check::BLOCK_QUEUES_PAST_FD_LIMIT,
            &["--socket", sock_s],
        ]
        .concat(),
    );
    let out = exit_check::exit_after_connect(cmd, &sock);
    exit_check::assert_exit(
        &out,
        exit_check::RUNTIME,
        "hype-block-mem",
        "Too many open files",
    );
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn without_event_idx_or_indirect_descriptors() {
    let (_p, _dir) = spawn("memnoevt", &["--size", "8M", "--num-queues", "2"]);
    for mask in [!(1u64 << 29), !(1u64 << 28), !(3u64 << 28)] {
        let o = hype_testkit::driver::DriverOptions {
            feature_mask: mask,
            ..opts(2)
        };
        let mut disk = hype_testkit::blk::BlkDriver::connect(&_p.socket, o).unwrap();
        assert_eq!(disk.has_feature(29), mask & (1 << 29) != 0);
        check_many_in_flight(&mut disk, 13);
        check_hostile_chains(&mut disk, MEM);
    }
}

#[test]
fn event_idx_loses_no_kicks_and_publishes_avail_event() {
    let (_p, _dir) = spawn("memevt", &["--size", "8M"]);
    let mut disk = connect(&_p.socket, 1);
    assert!(disk.has_feature(29));
    // Thousands of requests with kick suppression: a lost kick would time out here.
    check_many_in_flight(&mut disk, 14);
    let q = disk.driver().queue(0).unwrap();
    let stats = q.stats();
    assert_eq!(stats.submitted, stats.completed);
    // Once idle (it may still be leaving its loop), the device asks to be kicked for the
    // next buffer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while q.device_avail_event().unwrap() != q.avail_idx() {
        assert!(
            std::time::Instant::now() < deadline,
            "avail_event never caught up"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn garbage_frontend_does_not_stop_the_daemon() {
    use std::io::Write;
    let (mut p, _dir) = spawn("memjunk", &["--size", "4M"]);
    for junk in [
        &b"\xff\xff\xff\xff garbage that is not vhost-user"[..],
        b"",
        b"\x01\0\0\0\x01\0\0\0\xff\xff\xff\x7f",
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&p.socket).unwrap();
        let _ = s.write_all(junk);
        drop(s);
    }
    let mut disk = connect(&p.socket, 1);
    disk.write(0, &[3; 512]).unwrap();
    assert_eq!(disk.read(0, 512).unwrap(), vec![3; 512]);
    drop(disk);
    assert!(p.alive());
}

#[test]
fn sigterm_with_a_frontend_connected_exits_cleanly() {
    let (mut p, _dir) = spawn(
        "memterm",
        &["--size", "8M", "--num-queues", "2", "--io-threads", "2"],
    );
    let mut disk = connect(&p.socket, 2);
    disk.write(0, &[1; 4096]).unwrap();
    let st = p.signal_and_wait(libc::SIGTERM);
    assert!(st.success(), "{st:?}");
    assert!(!p.socket.exists(), "socket left behind");
    drop(disk);
}

#[test]
fn confined_while_serving_and_forbidden_calls_kill() {
    let (mut p, dir) = spawn("memsb", &["--size", "16M", "--num-queues", "2"]);
    check_every_thread_filtered(&p, 2);
    assert!(p.signal_and_wait(libc::SIGTERM).success());
    assert!(!p.socket.exists());
    check_hook_kills(BIN, &["--size", "1M"], &dir, "execve", "execve");
    check_open_refused(BIN, &["--size", "1M"], &dir, "/etc/hostname");
}

/// Sends SET_FEATURES and then SET_MEM_TABLE with `regions` on a fresh connection; returns
/// whether the backend accepted the table.
fn offer_memory(socket: &std::path::Path, regions: &[vhost::VhostUserMemoryRegionInfo]) -> bool {
    use vhost::VhostBackend;
    let mut d = hype_testkit::driver::Driver::connect_inactive(
        socket,
        hype_testkit::driver::DriverOptions::default(),
    )
    .unwrap();
    let features = d.info().features;
    let fe = d.frontend().unwrap();
    fe.set_features(features).unwrap();
    fe.set_mem_table(regions).is_ok()
}

#[test]
fn memory_beyond_its_file_or_unsealed_is_refused_without_sigbus() {
    let (mut p, _dir) = spawn("memseal", &["--size", "4M"]);
    // 1. A region twice as long as its (sealed) memfd: touching its second half would SIGBUS.
    let ram = hype_testkit::memory::GuestRam::new(1 << 20).unwrap();
    let mut regions = ram.regions().unwrap();
    regions[0].memory_size *= 2;
    assert!(
        !offer_memory(&p.socket, &regions),
        "oversized region accepted"
    );
    assert!(p.alive(), "backend died on an oversized region");
    // 2. A memfd the frontend could still shrink after the backend mapped it.
    // SAFETY: valid name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(1 << 20).unwrap();
    let mut unsealed = ram.regions().unwrap();
    unsealed[0].mmap_handle = std::os::fd::AsRawFd::as_raw_fd(&file);
    assert!(
        !offer_memory(&p.socket, &unsealed),
        "unsealed memfd accepted"
    );
    assert!(p.alive(), "backend died on an unsealed memfd");
    // The next (honest) frontend is served normally.
    let mut disk = connect(&p.socket, 1);
    check_read_after_write_whole_disk(&mut disk, 7);
    drop(disk);
    let st = p.signal_and_wait(libc::SIGTERM);
    assert!(st.success(), "{st:?}");
}

/// Open fds of process `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The fd count of `pid` once it stops changing (a disconnect is torn down asynchronously).
fn settled_fd_count(pid: u32) -> usize {
    let mut last = fd_count(pid);
    for _ in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(25));
        let now = fd_count(pid);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

#[test]
fn fd_count_stays_flat_over_1000_connections() {
    let (mut p, _dir) = spawn(
        "memfds",
        &["--size", "4M", "--num-queues", "4", "--io-threads", "2"],
    );
    let one = |i: usize| {
        let mut disk = connect(&p.socket, 4);
        disk.write(0, &[i as u8; 512]).unwrap();
        assert_eq!(disk.read(0, 512).unwrap(), vec![i as u8; 512]);
        drop(disk);
    };
    for i in 0..10 {
        one(i);
    }
    let before = settled_fd_count(p.pid());
    for i in 10..1000 {
        one(i);
    }
    let after = settled_fd_count(p.pid());
    assert_eq!(
        after, before,
        "fds before {before}, after 990 more connections {after}"
    );
    assert!(p.alive());
}

/// A pipe as (read end, write end), blocking.
fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe() writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both are fresh descriptors owned only by these OwnedFds.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

/// `fd` dressed up as an eventfd, as a hostile frontend hands it over.
fn fake_eventfd(fd: std::os::fd::OwnedFd) -> vmm_sys_util::eventfd::EventFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the descriptor is owned and handed over whole; the EventFd only reads and
    // writes it (which fails or does nothing useful for a non-eventfd).
    unsafe { vmm_sys_util::eventfd::EventFd::from_raw_fd(fd.into_raw_fd()) }
}

#[test]
fn non_eventfd_kick_or_call_does_not_wedge_the_next_frontend() {
    use hype_testkit::blk::{add_request, BlkRequest};
    use hype_testkit::driver::Driver;
    use std::os::fd::AsRawFd;
    let (p, dir) = spawn("memnoevfd", &["--size", "4M", "--io-threads", "2"]);
    let good = || {
        let mut disk = connect(&p.socket, 1);
        disk.write(8, &[7; 512]).unwrap();
        assert_eq!(disk.read(8, 512).unwrap(), vec![7; 512]);
    };
    // 1. A regular file as kick fd (epoll refuses it).
    let file = std::fs::File::create(dir.join("not-an-eventfd")).unwrap();
    let mut drv = Driver::connect_inactive(&p.socket, opts(1)).unwrap();
    let call = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let q = drv.queue(0).unwrap();
    q.replace_event_fds(fake_eventfd(file.into()), call);
    let _ = drv.activate();
    drop(drv);
    good();
    // 2. A pipe nobody reads, already full, as call fd: completing a request writes to it.
    let (rd, wr) = pipe();
    // SAFETY: fcntl and write on our own pipe: fill it without blocking, then hand the
    // write end over blocking.
    unsafe {
        let fl = libc::fcntl(wr.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(wr.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        let chunk = [0u8; 4096];
        while libc::write(wr.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) > 0 {}
        libc::fcntl(wr.as_raw_fd(), libc::F_SETFL, fl);
    }
    let mut drv = Driver::connect_inactive(&p.socket, opts(1)).unwrap();
    let kick = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    drv.queue(0)
        .unwrap()
        .replace_event_fds(kick, fake_eventfd(wr));
    drv.activate().unwrap();
    let q = drv.queue(0).unwrap();
    for i in 0..4 {
        add_request(q, &BlkRequest::write(i * 8, vec![1; 4096])).unwrap();
    }
    q.notify().unwrap();
    // Wait until the backend has completed them (and so tried to signal).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while q.device_used_idx().unwrap() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "requests never completed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(drv);
    drop(rd);
    // 3. A pipe's read end as kick fd (kicks read nothing useful).
    let (rd, wr) = pipe();
    let mut drv = Driver::connect_inactive(&p.socket, opts(1)).unwrap();
    let call = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    drv.queue(0)
        .unwrap()
        .replace_event_fds(fake_eventfd(rd), call);
    let _ = drv.activate();
    // SAFETY: writing 3 bytes from a valid buffer to our pipe.
    unsafe { libc::write(wr.as_raw_fd(), b"abc".as_ptr().cast(), 3) };
    drop(wr);
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(drv);
    good();
}

/// vhost-user DEVICE_STATE: the RAM disk of one process, saved with its rings stopped,
/// loaded into a fresh, empty process before its rings start, reads back there; a state of
/// another disk size, or a damaged one, is refused by CHECK_DEVICE_STATE.
#[test]
fn device_state_carries_the_disk_to_a_new_process() {
    use hype_testkit::blk::{BlkDriver, BLK_CONFIG_SIZE};
    use hype_testkit::driver::Driver;

    let (mut p, _dir) = spawn("memst1", &["--size", "8M"]);
    let mut disk = connect(&p.socket, 1);
    assert!(disk.driver().connection().unwrap().has_device_state());
    disk.write(0, &pattern(0, 65536, 7)).unwrap();
    disk.write(12288, &pattern(12288 * 512, 4096, 8)).unwrap(); // sector 12288: chunk 6
    disk.driver().stop_queues().unwrap();
    let state = disk
        .driver()
        .connection()
        .unwrap()
        .save_state(1 << 30)
        .unwrap()
        .expect("block-mem offers DEVICE_STATE");
    // Sparse: the header, two 1 MiB chunks with their indexes, the end mark.
    assert_eq!(state.len(), 24 + 2 * (8 + (1 << 20)) + 8);
    drop(disk);
    assert!(p.signal_and_wait(libc::SIGTERM).success());

    let inactive = |socket: &std::path::Path| {
        let mut o = opts(1);
        o.config_size = BLK_CONFIG_SIZE;
        Driver::connect_inactive(socket, o).unwrap()
    };
    let (mut q, _dir2) = spawn("memst2", &["--size", "8M"]);
    let mut drv = inactive(&q.socket);
    drv.connection().unwrap().load_state(&state).unwrap();
    drv.activate().unwrap();
    let mut disk = BlkDriver::from_driver(drv).unwrap();
    assert_eq!(disk.read(0, 65536).unwrap(), pattern(0, 65536, 7));
    assert_eq!(
        disk.read(12288, 4096).unwrap(),
        pattern(12288 * 512, 4096, 8)
    );
    assert_eq!(disk.read(1 << 12, 4096).unwrap(), vec![0u8; 4096]);
    drop(disk);
    assert!(q.alive());
    assert!(q.signal_and_wait(libc::SIGTERM).success());

    let (mut r, _dir3) = spawn("memst3", &["--size", "16M"]);
    let mut drv = inactive(&r.socket);
    assert!(drv.connection().unwrap().load_state(&state).is_err());
    drop(drv);
    let mut drv = inactive(&r.socket);
    let mut damaged = state.clone();
    damaged[0] ^= 1;
    assert!(drv.connection().unwrap().load_state(&damaged).is_err());
    drop(drv);
    // Still serving, the disk untouched.
    let mut disk = connect(&r.socket, 1);
    assert_eq!(disk.read(0, 4096).unwrap(), vec![0u8; 4096]);
    drop(disk);
    assert!(r.signal_and_wait(libc::SIGTERM).success());
}
