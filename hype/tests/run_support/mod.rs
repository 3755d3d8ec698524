//! Helpers for the `hype run` tests: starting `hype run` with a private XDG_RUNTIME_DIR,
//! watching its output and child processes, and checking that nothing is left behind.

#![allow(dead_code)]

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `hype` binary under test (`HYPE_BIN` overrides the one cargo built); it must have the
/// `run` subcommand.
pub fn hype_bin() -> PathBuf {
    let bin = std::env::var_os("HYPE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_hype")));
    static CHECKED: std::sync::Once = std::sync::Once::new();
    CHECKED.call_once(|| {
        let ok = Command::new(&bin)
            .args(["run", "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "{} has no `run` subcommand (hype/src/main.rs needs `Run(hype_run::RunArgs)`)",
            bin.display()
        );
    });
    bin
}

/// A fresh, empty directory for one test.
pub fn fresh_dir(base: &Path, name: &str) -> PathBuf {
    let d = base.join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Entries of a directory, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Writes `data` at sector `sector` of `img`.
pub fn write_sector(img: &Path, sector: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.seek(SeekFrom::Start(sector * 512)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Reads `len` bytes at sector `sector` of `img`.
pub fn read_sector(img: &Path, sector: u64, len: usize) -> Vec<u8> {
    let all = std::fs::read(img).unwrap();
    let start = (sector * 512) as usize;
    all[start..start + len].to_vec()
}

/// A running `hype run`, its stdout and stderr going to files.
pub struct Run {
    pub child: Child,
    pub xdg: PathBuf,
    pub out: PathBuf,
    pub err: PathBuf,
}

impl Run {
    /// Starts `hype run ARGS` with XDG_RUNTIME_DIR = `dir/xdg` (made empty).
    pub fn start(dir: &Path, args: &[&str]) -> Run {
        Run::start_under(dir, &[], args)
    }

    /// Starts `PREFIX... hype run ARGS` (a prefix that execs, such as `unshare --net`).
    pub fn start_under(dir: &Path, prefix: &[&str], args: &[&str]) -> Run {
        let xdg = fresh_dir(dir, "xdg");
        let out = dir.join("stdout.txt");
        let err = dir.join("stderr.txt");
        let mut cmd = match prefix.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg(hype_bin());
                c
            }
            None => Command::new(hype_bin()),
        };
        let child = cmd
            .arg("run")
            .args(args)
            .env("XDG_RUNTIME_DIR", &xdg)
            .env("HYPE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("start hype run");
        Run {
            child,
            xdg,
            out,
            err,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits until stdout contains `text`.
    pub fn wait_for_output(&mut self, text: &str, limit: Duration) {
        let t = Instant::now();
        while !self.stdout().contains(text) {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "hype run exited ({st}) before printing {text:?}\nstdout: {}\nstderr: {}",
                    self.stdout(),
                    self.stderr()
                );
            }
            assert!(
                t.elapsed() < limit,
                "no {text:?} within {limit:?}\nstdout: {}\nstderr: {}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for `hype run` to exit.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "hype run did not exit within {limit:?}\nstdout: {}\nstderr: {}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The one runtime directory under XDG_RUNTIME_DIR.
    pub fn runtime_dir(&self) -> PathBuf {
        let e = entries(&self.xdg);
        assert_eq!(e.len(), 1, "runtime dirs: {e:?}");
        assert!(e[0].starts_with("hype-vm."), "{e:?}");
        self.xdg.join(&e[0])
    }

    /// Children of `hype run`: (pid, command line).
    pub fn children(&self) -> Vec<(u32, String)> {
        children_of(self.pid())
    }

    /// Sends `sig` to `hype run`.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            for (pid, _) in self.children() {
                // SAFETY: kill(2) on a child of our child, to not leave processes behind.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Children of `pid`: (pid, command line with spaces).
pub fn children_of(pid: u32) -> Vec<(u32, String)> {
    let mut v = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return v;
    };
    for t in tasks.flatten() {
        let list = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for c in list.split_whitespace() {
            let c: u32 = c.parse().unwrap();
            v.push((c, cmdline(c)));
        }
    }
    v.sort();
    v
}

/// Command line of `pid` with spaces, empty if the process is gone.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Whether process `pid` still exists with a command line containing `marker`.
pub fn still_there(pid: u32, marker: &str) -> bool {
    cmdline(pid).contains(marker)
}

/// Waits until `f` returns something.
pub fn wait_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts that `dir` is a directory with mode 0700 holding exactly the sockets `names`.
pub fn assert_private_sockets(dir: &Path, names: &[&str]) {
    let m = std::fs::metadata(dir).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o700, "{}", dir.display());
    assert_eq!(entries(dir), names);
    for n in names {
        let t = std::fs::symlink_metadata(dir.join(n)).unwrap().file_type();
        assert!(t.is_socket(), "{n} is not a socket");
    }
}
