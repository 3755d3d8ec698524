//! `hype run` with the Linux test guest (optional: needs the guest artefacts that
//! `scripts/test` exports as HYPE_GUEST_*; says SKIPPED without them; ~20-60 s of boot here).
//! The guest's agent talks over the serial console, i.e. hype run's own stdin/stdout passed
//! through to the VMM. The guest sees both disks, one backend is SIGKILLed and restarted by
//! hype run while the guest reads, and a poweroff ends the run with nothing left behind.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod run_support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use hype_testkit::guest::{GuestArtifacts, BASE_CMDLINE};
use run_support::*;

const BOOT: Duration = Duration::from_secs(400);
const STEP: Duration = Duration::from_secs(120);

/// Waits for a console line starting with `prefix`, collecting `HYPE-OUT id` lines.
fn wait_line(rx: &Receiver<String>, prefix: &str, limit: Duration, out: &mut Vec<String>) {
    let t = Instant::now();
    loop {
        let left = limit.saturating_sub(t.elapsed());
        assert!(
            !left.is_zero(),
            "no {prefix:?} within {limit:?}; got {out:?}"
        );
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return,
            Ok(l) => out.push(l),
            Err(e) => panic!("console ended waiting for {prefix:?}: {e}; got {out:?}"),
        }
    }
}

#[test]
fn linux_guest_through_hype_run_with_a_backend_restart() {
    let Some(art) = GuestArtifacts::from_env_or_skip("linux_guest_through_hype_run") else {
        return;
    };
    let dir = fresh_dir(
        &std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("run"),
        "linux",
    );
    let img = dir.join("disk.img");
    let mut data = vec![0u8; 4 << 20];
    data[1 << 20..(1 << 20) + 16].copy_from_slice(b"hype-disk-marker");
    std::fs::write(&img, &data).unwrap();
    let xdg = fresh_dir(&dir, "xdg");
    let err = dir.join("stderr.txt");
    let mut child = Command::new(hype_bin())
        .arg("run")
        .arg("--kernel")
        .arg(&art.vmlinux)
        .arg("--initrd")
        .arg(&art.initramfs)
        .args(["--cmdline", BASE_CMDLINE, "--memory", "192M"])
        .arg("--disk")
        .arg(format!("file:{}", img.display()))
        .args(["--disk", "mem:2M"])
        .env("XDG_RUNTIME_DIR", &xdg)
        .env("HYPE_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let run_pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if tx.send(l.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    wait_line(&rx, "HYPE-AGENT READY", BOOT, &mut seen);
    let kids = children_of(run_pid);
    assert_eq!(kids.len(), 3, "{kids:?}");

    let mut step = |id: &str, cmd: &str| -> Vec<String> {
        writeln!(stdin, "RUN {id} {cmd}").unwrap();
        stdin.flush().unwrap();
        let mut lines = Vec::new();
        wait_line(&rx, &format!("HYPE-DONE {id} rc=0"), STEP, &mut lines);
        let p = format!("HYPE-OUT {id} ");
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(&p).map(str::to_string))
            .collect()
    };
    assert_eq!(
        step(
            "s1",
            "cat /sys/block/vda/size /sys/block/vdb/size; \
             dd if=/dev/vda bs=1M skip=1 count=1 2>/dev/null | head -c 16; echo"
        ),
        ["8192", "4096", "hype-disk-marker"]
    );

    // SIGKILL the file backend; hype run restarts it; a direct read goes through the new one.
    let disk0 = kids
        .iter()
        .find(|(_, c)| c.contains(" block-file "))
        .map(|(p, _)| *p)
        .unwrap();
    data[3 << 20..(3 << 20) + 13].copy_from_slice(b"after-restart");
    std::fs::write(&img, &data).unwrap();
    // SAFETY: kill(2) on the backend hype run started for this test.
    unsafe { libc::kill(disk0 as i32, libc::SIGKILL) };
    assert_eq!(
        step(
            "s2",
            "dd if=/dev/vda bs=1M skip=3 count=1 iflag=direct 2>/dev/null | head -c 13; echo"
        ),
        ["after-restart"]
    );

    writeln!(stdin, "POWEROFF").unwrap();
    stdin.flush().unwrap();
    let t = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < STEP, "hype run did not exit after poweroff");
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&err).unwrap();
    assert_eq!(st.code(), Some(0), "{log}");
    assert!(log.contains("disk0 exited (signal 9); restarting"), "{log}");
    for (pid, _) in kids {
        assert!(!still_there(pid, "hype"), "{pid} still runs");
    }
    assert_eq!(entries(&xdg), Vec::<String>::new());
}
