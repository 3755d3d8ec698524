//! hype-block-file as a real process, driven through hype-testkit.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

#[path = "../../block/tests/conformance/mod.rs"]
mod conformance;
#[path = "../../daemon/tests/exit_check/mod.rs"]
mod exit_check;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use conformance::*;
use hype_testkit::blk::BlkRequest;

const BIN: &str = env!("CARGO_BIN_EXE_hype-block-file");
const MEM: u64 = 64 << 20;

fn image(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("disk.img");
    File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn conformance_single_queue() {
    let dir = tempdir("file1");
    let img = image(&dir, 16 << 20);
    let mut p = Process::spawn(
        BIN,
        &["--path", img.to_str().unwrap(), "--serial", "file-disk"],
        &dir.join("blk.sock"),
    );
    let mut disk = connect(&p.socket, 1);
    check_config(&mut disk, (16 << 20) / 512, 1);
    check_read_after_write_whole_disk(&mut disk, 21);
    check_flush(&mut disk);
    check_get_id(&mut disk, "file-disk");
    check_discard_and_write_zeroes(&mut disk);
    check_discard_payload_policy(&mut disk);
    check_out_of_range_and_unknown(&mut disk);
    check_framing_policy(&mut disk);
    check_hostile_chains(&mut disk, MEM);
    check_read_after_write_whole_disk(&mut disk, 22);
    drop(disk);
    assert!(p.signal_and_wait(libc::SIGTERM).success());
    assert!(!p.socket.exists());
    // The data is in the file.
    let bytes = std::fs::read(&img).unwrap();
    assert!(bytes == pattern(0, 16 << 20, 22));
}

#[test]
fn sparse_file_stays_sparse() {
    let dir = tempdir("filesparse");
    let img = image(&dir, 256 << 20);
    let p = Process::spawn(
        BIN,
        &["--path", img.to_str().unwrap()],
        &dir.join("blk.sock"),
    );
    let mut disk = connect(&p.socket, 1);
    assert_eq!(allocated(&img), 0);
    disk.write(2048, &vec![0x5a; 1 << 20]).unwrap();
    disk.flush().unwrap();
    let used = allocated(&img);
    assert!((1 << 20..4 << 20).contains(&used), "{used}");
    // Discard punches the hole again; write-zeroes with unmap keeps it a hole.
    disk.discard(&[hype_testkit::blk::BlkRange {
        sector: 2048,
        num_sectors: 2048,
        flags: 0,
    }])
    .unwrap();
    assert_eq!(allocated(&img), 0);
    disk.write(8192, &vec![0x5a; 1 << 20]).unwrap();
    disk.write_zeroes(&[hype_testkit::blk::BlkRange {
        sector: 8192,
        num_sectors: 2048,
        flags: hype_testkit::blk::WRITE_ZEROES_FLAG_UNMAP,
    }])
    .unwrap();
    assert_eq!(allocated(&img), 0);
    assert_eq!(disk.read(8192, 4096).unwrap(), vec![0; 4096]);
    // Reading a never-written region allocates nothing.
    disk.read(100_000, 1 << 20).unwrap();
    assert_eq!(allocated(&img), 0);
}

#[test]
fn many_requests_in_flight_on_four_queues_with_io_pool() {
    let dir = tempdir("file4");
    let img = image(&dir, 32 << 20);
    let p = Process::spawn(
        BIN,
        &[
            "--path",
            img.to_str().unwrap(),
            "--num-queues",
            "4",
            "--io-threads",
            "4",
        ],
        &dir.join("blk.sock"),
    );
    let mut disk = connect(&p.socket, 4);
    check_config(&mut disk, (32 << 20) / 512, 4);
    check_many_in_flight(&mut disk, 23);
    check_read_after_write_whole_disk(&mut disk, 24);
}

/// CPU time (ns) used so far by the process's threads whose names start with `prefix`.
fn threads_cpu_ns(pid: u32, prefix: &str) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| t.ok())
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The names of the process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

#[test]
fn large_requests_run_on_the_large_request_threads_small_ones_stay_inline() {
    let dir = tempdir("filelarge");
    let img = image(&dir, 32 << 20);
    // By default: 2, on the CPUs beyond two the process may use.
    let pd = Process::spawn(
        BIN,
        &["--path", img.to_str().unwrap()],
        &dir.join("blkd.sock"),
    );
    let conn = connect(&pd.socket, 1);
    let large = thread_names(pd.pid())
        .iter()
        .filter(|n| n.starts_with("blk-large"))
        .count();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(
        large,
        cpus.saturating_sub(2).min(2),
        "default large threads"
    );
    drop(conn);
    drop(pd);
    let p = Process::spawn(
        BIN,
        &["--path", img.to_str().unwrap(), "--large-io-threads", "2"],
        &dir.join("blk.sock"),
    );
    let mut disk = connect(&p.socket, 1);
    let large = thread_names(p.pid())
        .iter()
        .filter(|n| n.starts_with("blk-large"))
        .count();
    assert_eq!(large, 2, "--large-io-threads 2");
    let large_cpu = threads_cpu_ns(p.pid(), "blk-large");
    // 512 KiB requests, several in flight, mixed with small ones: all verified.
    let big = 512u64 << 10;
    let mut writes = Vec::new();
    for i in 0..16u64 {
        writes.push(BlkRequest::write(
            i * big / 512,
            pattern(i * big, big as usize, 5),
        ));
        let small_off = (20 << 20) + i * 4096;
        writes.push(BlkRequest::write(
            small_off / 512,
            pattern(small_off, 4096, 6),
        ));
    }
    for (r, resp) in writes.iter().zip(disk.run_batch(&writes).unwrap()) {
        resp.check(r).unwrap();
    }
    assert!(
        threads_cpu_ns(p.pid(), "blk-large") > large_cpu + 1_000_000,
        "the large writes ran on the large-request threads"
    );
    let reads: Vec<BlkRequest> = writes
        .iter()
        .map(|w| BlkRequest::read(w.sector(), w.payload_len() as u32))
        .collect();
    for (r, resp) in reads.iter().zip(disk.run_batch(&reads).unwrap()) {
        resp.check(r).unwrap();
        let off = r.sector() * 512;
        let seed = if off >= 20 << 20 { 6 } else { 5 };
        assert!(resp.data == pattern(off, r.in_len() as usize, seed));
    }
    // Completions reach the used ring in the order the chains were offered, although the
    // large reads finish on other threads after the small ones (the crash-recovery rule of
    // docs/devices.md depends on it).
    {
        let q = disk.driver().queue(0).unwrap();
        let mut offered = Vec::new();
        let mut reqs = Vec::new();
        for i in 0..12u64 {
            reqs.push(if i % 3 == 0 {
                BlkRequest::read(i * big / 512, big as u32)
            } else {
                BlkRequest::read(((20 << 20) + i * 4096) / 512, 4096)
            });
        }
        for r in &reqs {
            offered.push(hype_testkit::blk::add_request(q, r).unwrap());
        }
        q.notify().unwrap();
        let mut used = Vec::new();
        while used.len() < offered.len() {
            for c in q.wait(1, std::time::Duration::from_secs(10)).unwrap() {
                used.push(c.head);
            }
        }
        assert_eq!(used, offered);
    }
    drop(disk);
    check_reconnect(&p.socket, 1);

    // --large-io-threads 0 keeps everything on the queue thread.
    let dir0 = tempdir("filelarge0");
    let img0 = image(&dir0, 8 << 20);
    let p0 = Process::spawn(
        BIN,
        &["--path", img0.to_str().unwrap(), "--large-io-threads", "0"],
        &dir0.join("blk.sock"),
    );
    let mut disk0 = connect(&p0.socket, 1);
    assert!(!thread_names(p0.pid())
        .iter()
        .any(|n| n.starts_with("blk-large")));
    check_read_after_write_whole_disk(&mut disk0, 7);
}

#[test]
fn direct_io_with_4k_blocks() {
    let dir = tempdir("filedirect");
    let img = image(&dir, 8 << 20);
    let p = Process::spawn(
        BIN,
        &[
            "--path",
            img.to_str().unwrap(),
            "--direct",
            "--num-queues",
            "2",
        ],
        &dir.join("blk.sock"),
    );
    let mut disk = connect(&p.socket, 2);
    assert_eq!(disk.config().blk_size, 4096);
    check_read_after_write_whole_disk(&mut disk, 25);
    check_discard_and_write_zeroes(&mut disk);
    // 512-byte requests do not fit a 4096-byte block size.
    let r = hype_testkit::blk::BlkRequest::read(1, 512);
    assert_eq!(
        disk.execute(0, &r).unwrap().status,
        hype_testkit::blk::BlkStatus::IoErr
    );
}

#[test]
fn read_only_and_locking() {
    let dir = tempdir("filero");
    let img = dir.join("disk.img");
    std::fs::write(&img, pattern(0, 4 << 20, 26)).unwrap();
    let mut writer = Process::spawn(BIN, &["--path", img.to_str().unwrap()], &dir.join("w.sock"));
    // A second writer, or a reader, is refused while the writer runs.
    for extra in [&[][..], &["--readonly"][..]] {
        let out = Command::new(BIN)
            .args(["--path", img.to_str().unwrap(), "--socket"])
            .arg(dir.join("x.sock"))
            .args(extra)
            .output()
            .unwrap();
        // Locked by another process, like a socket in use: a usage error.
        exit_check::assert_exit(&out, exit_check::USAGE, "hype-block-file", "in use");
        assert!(!dir.join("x.sock").exists());
    }
    assert!(writer.signal_and_wait(libc::SIGTERM).success());
    // Two readers may share the image.
    let r1 = Process::spawn(
        BIN,
        &["--path", img.to_str().unwrap(), "--readonly"],
        &dir.join("r1.sock"),
    );
    let _r2 = Process::spawn(
        BIN,
        &["--path", img.to_str().unwrap(), "--readonly"],
        &dir.join("r2.sock"),
    );
    let mut disk = connect(&r1.socket, 1);
    check_read_only(&mut disk, Some(26));
    assert!(std::fs::read(&img).unwrap() == pattern(0, 4 << 20, 26));
}

#[test]
fn reconnect_keeps_data() {
    let dir = tempdir("filerc");
    let img = image(&dir, 4 << 20);
    let mut p = Process::spawn(
        BIN,
        &["--path", img.to_str().unwrap(), "--num-queues", "2"],
        &dir.join("blk.sock"),
    );
    check_reconnect(&p.socket, 2);
    check_stop_and_resume(&p.socket);
    check_reconnect(&p.socket, 1);
    assert!(p.alive());
    assert!(p.signal_and_wait(libc::SIGINT).success());
}

#[test]
fn socket_mode_option() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir("filemode");
    let img = image(&dir, 1 << 20);
    let p = Process::spawn(
        BIN,
        &["--path", img.to_str().unwrap(), "--socket-mode", "0660"],
        &dir.join("blk.sock"),
    );
    let mode = std::fs::metadata(&p.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let q = Process::spawn(
        BIN,
        &["--path", image(&dir.join(".."), 1 << 20).to_str().unwrap()],
        &dir.join("b.sock"),
    );
    let mode = std::fs::metadata(&q.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "default mode");
}

#[test]
fn systemd_socket_activation() {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;
    use std::os::unix::process::CommandExt;
    let dir = tempdir("fileact");
    let img = image(&dir, 1 << 20);
    let sock = dir.join("activated.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("/bin/sh");
    // LISTEN_PID must name the backend itself: the shell exports its own pid and execs.
    cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\""])
        .arg(BIN)
        .args(["--path", img.to_str().unwrap()])
        .env("HYPE_LOG", "error");
    // SAFETY: only async-signal-safe dup2/fcntl between fork and exec; fd is a live listener.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec set: clear it explicitly then.
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(listener);
    let mut p = Process::from_child(child, &sock);
    let mut disk = connect(&sock, 1);
    disk.write(0, &[9; 4096]).unwrap();
    assert_eq!(disk.read(0, 4096).unwrap(), vec![9; 4096]);
    drop(disk);
    // Reconnects work on the inherited socket too.
    let mut disk = connect(&sock, 1);
    assert_eq!(disk.read(0, 4096).unwrap(), vec![9; 4096]);
    drop(disk);
    assert!(p.signal_and_wait(libc::SIGTERM).success());
    assert!(
        sock.exists(),
        "a socket we did not create must not be removed"
    );
}

#[test]
fn usage_errors_exit_2_runtime_errors_exit_1() {
    let dir = tempdir("fileexit");
    let img = image(&dir, 1 << 20);
    let img_s = img.to_str().unwrap();
    let sock = dir.join("blk.sock");
    let sock_s = sock.to_str().unwrap();
    let usage: [(&[&str], &str); 5] = [
        (&["--socket", sock_s], "--path <PATH>"),
        (
            &["--path", "/nonexistent/disk.img", "--socket", sock_s],
            "cannot open /nonexistent/disk.img",
        ),
        (
            &["--path", "/dev/null", "--socket", sock_s],
            "/dev/null is neither a regular file nor a block device",
        ),
        (
            &["--path", img_s, "--block-size", "1000", "--socket", sock_s],
            "invalid block size 1000",
        ),
        (
            &["--path", img_s, "--num-queues", "0", "--socket", sock_s],
            "invalid queue count 0",
        ),
    ];
    for (args, needle) in usage {
        let out = exit_check::run_bin(BIN, args);
        exit_check::assert_exit(&out, exit_check::USAGE, "hype-block-file", needle);
        assert!(!sock.exists());
    }
    let taken = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let out = exit_check::run_bin(BIN, &["--path", img_s, "--socket", sock_s]);
    exit_check::assert_exit(&out, exit_check::USAGE, "hype-block-file", "is in use");
    drop(taken);
    std::fs::remove_file(&sock).unwrap();
    // Runtime: serving starts, then the first frontend finds no file descriptors left for
    // 64 queues' worker threads (one per queue, asked for).
    let cmd = exit_check::with_fd_limit(
        &[],
        32,
        BIN,
        &[
            &["--path", img_s][..],
            &exit_check::BLOCK_QUEUES_PAST_FD_LIMIT,
            &["--socket", sock_s],
        ]
        .concat(),
    );
    let out = exit_check::exit_after_connect(cmd, &sock);
    exit_check::assert_exit(
        &out,
        exit_check::RUNTIME,
        "hype-block-file",
        "Too many open files",
    );
    assert!(!sock.exists(), "socket left behind");
}
