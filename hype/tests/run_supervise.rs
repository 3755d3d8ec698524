//! `hype run` end to end with a tiny guest (`guests/run_two_disks.S`) on two disks (a file and
//! a RAM disk) and a virtio console: the processes it starts, the guest completing, and
//! cleanup (no processes, no sockets, no runtime directory) after a normal end, after SIGTERM,
//! and after a backend is SIGKILLed mid-run (restarted; the guest carries on).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;
mod run_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{assemble, work_dir};
use run_support::*;

const GUEST_OUTPUT: &str = "run guest\ndisk1 ok\ndisk0 ok\nwaiting\ndone\n";
const LIMIT: Duration = Duration::from_secs(60);

struct Setup {
    dir: PathBuf,
    img: PathBuf,
    elf: PathBuf,
}

/// A test directory with the guest and an 8 MiB image whose sector 0 starts with HYPE.
fn setup(name: &str) -> Setup {
    let dir = fresh_dir(&work_dir("run"), name);
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    write_sector(&img, 0, b"HYPE");
    let elf = assemble("run_two_disks", 0x20_0000);
    Setup { dir, img, elf }
}

fn start(s: &Setup, extra: &[&str]) -> Run {
    let disk0 = format!("file:{}", s.img.display());
    let console = format!("file:{}", s.dir.join("console.log").display());
    let mut args = vec![
        "--kernel",
        s.elf.to_str().unwrap(),
        "--memory",
        "64M",
        "--disk",
        &disk0,
        "--disk",
        "mem:1M",
        "--console",
        &console,
    ];
    args.extend_from_slice(extra);
    Run::start(&s.dir, &args)
}

/// The four children expected while the VM runs: (role, pid).
fn expected_children(run: &Run, img: &Path) -> Vec<(&'static str, u32)> {
    let kids = run.children();
    let rt = run.runtime_dir();
    let rt = rt.to_str().unwrap();
    let find = |role: &'static str, needle: &str| {
        let hits: Vec<u32> = kids
            .iter()
            .filter(|(_, c)| c.contains(needle))
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(hits.len(), 1, "{role}: {kids:?}");
        (role, hits[0])
    };
    let v = vec![
        find(
            "disk0",
            &format!(
                " block-file --path {} --socket {rt}/disk0.sock",
                img.display()
            ),
        ),
        find(
            "disk1",
            &format!(" block-mem --size 1048576 --socket {rt}/disk1.sock"),
        ),
        find("console", " console --output file:"),
        find("vmm", " vmm --kernel "),
    ];
    assert_eq!(kids.len(), 4, "{kids:?}");
    v
}

/// Everything `hype run` started is gone and XDG_RUNTIME_DIR is empty again.
fn assert_clean(run: &Run, pids: &[(&str, u32)]) {
    for (role, pid) in pids {
        assert!(
            !still_there(*pid, "hype"),
            "{role} (pid {pid}) still runs: {}",
            cmdline(*pid)
        );
    }
    assert_eq!(entries(&run.xdg), Vec::<String>::new(), "runtime dir left");
}

#[test]
fn two_disks_and_a_console_run_to_completion() {
    let s = setup("complete");
    let mut run = start(&s, &[]);
    run.wait_for_output("waiting\n", LIMIT);

    let rt = run.runtime_dir();
    assert_private_sockets(&rt, &["console.sock", "disk0.sock", "disk1.sock"]);
    let pids = expected_children(&run, &s.img);
    // The VMM got one --device per backend socket, in order.
    let vmm = cmdline(pids[3].1);
    let rt = rt.display();
    assert!(
        vmm.contains(&format!(
            "--device {rt}/disk0.sock --device {rt}/disk1.sock --device {rt}/console.sock"
        )),
        "{vmm}"
    );

    write_sector(&s.img, 1, b"GO!!");
    let st = run.wait(LIMIT);
    assert_eq!(st.code(), Some(0), "stderr: {}", run.stderr());
    assert_eq!(run.stdout(), GUEST_OUTPUT);
    assert_eq!(read_sector(&s.img, 2, 4), b"DONE");
    assert_clean(&run, &pids);
    let err = run.stderr();
    assert!(!err.contains("restarting"), "{err}");
    assert!(err.contains("virtio2: console backend"), "{err}");
}

#[test]
fn sigterm_stops_the_vm_first_then_the_backends() {
    let s = setup("sigterm");
    let mut run = start(&s, &[]);
    run.wait_for_output("waiting\n", LIMIT);
    let pids = expected_children(&run, &s.img);

    run.signal(libc::SIGTERM);
    let st = run.wait(LIMIT);
    let err = run.stderr();
    // The exit code is the VMM's: it stops cleanly (0) on SIGTERM.
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(!run.stdout().contains("done"), "{}", run.stdout());
    assert_clean(&run, &pids);

    let at = |needle: &str| {
        err.find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in {err}"))
    };
    let vmm_exit = at("vmm exited (exit code 0)");
    assert!(at("signal 15: stopping the VM") < vmm_exit, "{err}");
    for b in ["disk0 stopped", "disk1 stopped", "console stopped"] {
        assert!(vmm_exit < at(b), "{b} before the VMM exited: {err}");
    }
    assert!(!err.contains("killing"), "a process needed SIGKILL: {err}");
}

#[test]
fn backend_killed_mid_run_is_restarted_and_the_guest_completes() {
    let s = setup("restart");
    let mut run = start(&s, &[]);
    run.wait_for_output("waiting\n", LIMIT);
    let mut pids = expected_children(&run, &s.img);
    let old = pids[0].1;

    // SAFETY: kill(2) on the block-file backend that hype run started for this test.
    unsafe { libc::kill(old as i32, libc::SIGKILL) };
    let new = wait_until(Duration::from_secs(20), "disk0 restarted", || {
        run.children()
            .into_iter()
            .find(|(p, c)| *p != old && c.contains(" block-file "))
            .map(|(p, _)| p)
    });
    assert!(!still_there(old, "hype"));
    let rt = run.runtime_dir();
    wait_until(Duration::from_secs(20), "disk0 socket back", || {
        rt.join("disk0.sock").exists().then_some(())
    });
    pids.push(("disk0 (restarted)", new));

    write_sector(&s.img, 1, b"GO!!");
    let st = run.wait(LIMIT);
    let err = run.stderr();
    assert_eq!(st.code(), Some(0), "{err}");
    assert_eq!(run.stdout(), GUEST_OUTPUT);
    assert_eq!(read_sector(&s.img, 2, 4), b"DONE");
    assert!(
        err.contains("disk0 exited (signal 9); restarting in 100ms"),
        "{err}"
    );
    assert!(err.contains(&format!("disk0 started (pid {new})")), "{err}");
    assert_clean(&run, &pids);
}

#[test]
fn crashes_past_the_restart_limit_stop_the_vm() {
    let s = setup("limit");
    let mut run = start(&s, &["--max-restarts", "0"]);
    run.wait_for_output("waiting\n", LIMIT);
    let pids = expected_children(&run, &s.img);

    // SAFETY: kill(2) on the RAM disk backend that hype run started for this test.
    unsafe { libc::kill(pids[1].1 as i32, libc::SIGKILL) };
    let st = run.wait(LIMIT);
    let err = run.stderr();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(
        err.contains("hype run: disk1 crashed 1 times within 60s; stopped the VM"),
        "{err}"
    );
    assert!(!run.stdout().contains("done"));
    assert_clean(&run, &pids);
}

#[test]
fn sigint_and_sighup_also_stop_the_vm_in_order() {
    for (name, sig) in [("sigint", libc::SIGINT), ("sighup", libc::SIGHUP)] {
        let s = setup(name);
        let mut run = start(&s, &[]);
        run.wait_for_output("waiting\n", LIMIT);
        let pids = expected_children(&run, &s.img);
        run.signal(sig);
        let st = run.wait(LIMIT);
        let err = run.stderr();
        assert_eq!(st.code(), Some(0), "{name}: {err}");
        let vmm_exit = err.find("vmm exited").expect(&err);
        assert!(err.find(&format!("signal {sig}: stopping the VM")).unwrap() < vmm_exit);
        assert!(vmm_exit < err.find("disk0 stopped").expect(&err), "{err}");
        assert_clean(&run, &pids);
    }
}

/// A VMM that fails gives hype run its exit code; the backends are stopped and removed.
#[test]
fn the_exit_code_is_the_vmms() {
    let s = setup("vmm_fails");
    // An ELF linked at 256 MiB does not fit in 64 MiB: the VMM fails after the backends are up.
    let high = assemble("run_two_disks", 0x1000_0000);
    let mut run = Run::start(
        &s.dir,
        &[
            "--kernel",
            high.to_str().unwrap(),
            "--memory",
            "64M",
            "--disk",
            &format!("file:{}", s.img.display()),
        ],
    );
    let st = run.wait(LIMIT);
    let err = run.stderr();
    let vmm_line = err
        .lines()
        .find(|l| l.contains("vmm exited (exit code "))
        .unwrap_or_else(|| panic!("{err}"));
    let code: u8 = vmm_line
        .rsplit_once("exit code ")
        .and_then(|(_, c)| c.strip_suffix(')'))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{vmm_line}"));
    assert_ne!(code, 0, "{err}");
    assert_eq!(st.code(), Some(i32::from(code)), "{err}");
    assert!(err.contains("disk0 stopped"), "{err}");
    assert!(err.contains("\nhype: "), "the VMM's own error: {err}");
    assert_eq!(entries(&run.xdg), Vec::<String>::new());
}

/// A backend that cannot start (its image is locked by another process) stops the run
/// before the VMM is started.
#[test]
fn backend_failing_at_start_stops_the_run() {
    let s = setup("locked");
    let lock = std::fs::File::open(&s.img).unwrap();
    assert_eq!(
        // SAFETY: flock(2) on a file this test opened.
        unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        },
        0
    );
    let mut run = start(&s, &[]);
    let st = run.wait(LIMIT);
    let err = run.stderr();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(
        err.contains("is already in use by another process"),
        "the backend's own error: {err}"
    );
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("hype run: disk0 exited (exit code ")
            && last.contains(") before its socket ")
            && last.ends_with("appeared; nothing else was started"),
        "{err}"
    );
    assert!(!err.contains("vmm started"), "{err}");
    assert_eq!(run.stdout(), "");
    assert_eq!(entries(&run.xdg), Vec::<String>::new());
    drop(lock);
}

/// The demo guest built into hype, booted by `hype run` on two disks and a console: it finds
/// the first disk and the console, verifies its sectors and reports through the console
/// backend, which writes the report to a file.
#[test]
fn demo_guest_completes_with_two_disks_and_a_console() {
    use hype_run::demo::{console_report, verdict, Verdict, GUEST_ELF};
    let s = setup("demo");
    let elf = s.dir.join("demo.elf");
    std::fs::write(&elf, GUEST_ELF).unwrap();
    let console = s.dir.join("console.log");
    let uart = s.dir.join("uart.log");
    let mut run = Run::start(
        &s.dir,
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--memory",
            "64M",
            "--disk",
            "mem:16M",
            "--disk",
            &format!("file:{}", s.img.display()),
            "--console",
            &format!("file:{}", console.display()),
            "--serial",
            &format!("file:{}", uart.display()),
        ],
    );
    let st = run.wait(LIMIT);
    let err = run.stderr();
    let uart_log = std::fs::read_to_string(&uart).unwrap_or_default();
    assert_eq!(st.code(), Some(0), "{err}\n{uart_log}");
    assert_eq!(verdict(&uart_log), Verdict::Pass, "{uart_log}");
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        console_report(16 << 11)
    );
    for b in ["disk0 stopped", "disk1 stopped", "console stopped"] {
        assert!(err.contains(b), "{err}");
    }
    assert_eq!(run.stdout(), "");
    assert_eq!(entries(&run.xdg), Vec::<String>::new());
}

/// With a TAP (in a private network namespace, so as root only): the net-tap backend runs
/// and the VMM shows a net device; the guest (which ignores it) completes.
#[test]
fn net_tap_backend_in_a_private_network_namespace() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED net_tap_backend_in_a_private_network_namespace: needs root");
        return;
    }
    let s = setup("net");
    let disk0 = format!("file:{}", s.img.display());
    let mut run = Run::start_under(
        &s.dir,
        &["unshare", "--net"],
        &[
            "--kernel",
            s.elf.to_str().unwrap(),
            "--memory",
            "64M",
            "--disk",
            &disk0,
            "--disk",
            "mem:1M",
            "--net",
            "tap:hruntap0",
        ],
    );
    run.wait_for_output("waiting\n", LIMIT);
    let kids = run.children();
    let rt = run.runtime_dir();
    assert_private_sockets(&rt, &["disk0.sock", "disk1.sock", "net0.sock"]);
    let net = kids
        .iter()
        .find(|(_, c)| c.contains(" net-tap --tap hruntap0 --socket "))
        .unwrap_or_else(|| panic!("{kids:?}"))
        .0;
    write_sector(&s.img, 1, b"GO!!");
    let st = run.wait(LIMIT);
    let err = run.stderr();
    assert_eq!(st.code(), Some(0), "{err}");
    assert_eq!(run.stdout(), GUEST_OUTPUT);
    assert!(err.contains("virtio2: net backend at "), "{err}");
    assert!(err.contains("net0 stopped"), "{err}");
    assert!(!still_there(net, "hype"));
    assert_eq!(entries(&run.xdg), Vec::<String>::new());
}

/// A block-http URL with credentials and a token: the backend gets it in its environment
/// (readable by its own user only), never in argv (readable by every local user), and the
/// guest reads the disk through it.
#[test]
fn url_secrets_reach_the_backend_in_its_environment_not_its_argv() {
    use hype_testkit::http_server::{Behaviour, HttpServer};
    let s = setup("url-secrets");
    let mut image = vec![0u8; 8 << 20];
    image[..4].copy_from_slice(b"HYPE");
    let server = HttpServer::start(Behaviour::new(image)).unwrap();
    let url = format!(
        "http://alice:pw4711@127.0.0.1:{}/disk.raw?token=tok4711,overlay={}",
        server.port(),
        s.dir.join("overlay.img").display()
    );
    let console = format!("file:{}", s.dir.join("console.log").display());
    let mut run = Run::start(
        &s.dir,
        &[
            "--kernel",
            s.elf.to_str().unwrap(),
            "--memory",
            "64M",
            "--disk",
            &url,
            "--disk",
            "mem:1M",
            "--console",
            &console,
        ],
    );
    // The guest got past reading both disks: block-http served with the URL it was given.
    run.wait_for_output("waiting\n", LIMIT);
    let kids = run.children();
    let (pid, argv) = kids
        .iter()
        .find(|(_, c)| c.contains(" block-http "))
        .unwrap_or_else(|| panic!("no block-http child: {kids:?}"));
    assert!(
        !argv.contains("pw4711") && !argv.contains("tok4711") && !argv.contains("--url"),
        "{argv}"
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let want = format!(
        "HYPE_HTTP_URL=http://alice:pw4711@127.0.0.1:{}/disk.raw?token=tok4711",
        server.port()
    );
    assert!(
        environ.split(|b| *b == 0).any(|v| v == want.as_bytes()),
        "no {want} in the backend's environment"
    );
    run.signal(libc::SIGTERM);
    let st = run.wait(LIMIT);
    let err = run.stderr();
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(!err.contains("pw4711") && !err.contains("tok4711"), "{err}");
    assert!(!err.contains("visible to every local user"), "{err}");
}
