//! Helpers shared by the VMM's integration tests: assembling tiny guest programs with binutils and
//! running the `hype` binary.

#![allow(dead_code)]

pub mod vdriver;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Directory for test artefacts.
pub fn work_dir(test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(test);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Assembles `guests/<name>.S` and links it at `text_addr`; returns the ELF path.
pub fn assemble(name: &str, text_addr: u64) -> PathBuf {
    let guests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests");
    let src = guests.join(format!("{name}.S"));
    let dir = work_dir("guests");
    // Tests run in parallel and may assemble the same program: build under a unique name and
    // rename into place atomically.
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let uniq = format!(
        "{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let obj = dir.join(format!("{name}.{uniq}.o"));
    let tmp_elf = dir.join(format!("{name}.{uniq}.elf"));
    let elf = dir.join(format!("{name}.{text_addr:x}.elf"));
    let st = Command::new("as")
        .arg("--64")
        .arg("-I")
        .arg(&guests) // for `.include "serial.inc"`
        .arg("-o")
        .arg(&obj)
        .arg(&src)
        .status()
        .expect("run as (binutils)");
    assert!(st.success(), "assembling {name}");
    let st = Command::new("ld")
        .args([
            "-static",
            "-nostdlib",
            "-z",
            "max-page-size=4096",
            "--no-warn-rwx-segments",
        ])
        .arg(format!("-Ttext={text_addr:#x}"))
        .arg("-o")
        .arg(&tmp_elf)
        .arg(&obj)
        .status()
        .expect("run ld");
    assert!(st.success(), "linking {name}");
    let _ = std::fs::remove_file(&obj);
    std::fs::rename(&tmp_elf, &elf).unwrap();
    elf
}

/// Flat binary of the `.text` section of an ELF.
pub fn flat(elf: &Path) -> Vec<u8> {
    let bin = elf.with_extension(format!("{}.bin", std::process::id()));
    let st = Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(elf)
        .arg(&bin)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(bin).unwrap()
}

/// Address of a symbol in an ELF (via nm).
pub fn symbol(elf: &Path, name: &str) -> u64 {
    let out = Command::new("nm").arg(elf).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 3 && f[2] == name {
            return u64::from_str_radix(f[0], 16).unwrap();
        }
    }
    panic!("symbol {name} not in {}", elf.display());
}

/// Runs `hype` with arguments, stdin closed; returns its output.
pub fn hype(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hype"))
        .args(args)
        .stdin(Stdio::null())
        .env("HYPE_LOG", "info")
        .output()
        .expect("run hype")
}

/// Stdout and stderr as strings.
pub fn texts(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A vhost-user backend process (`hype block-mem` / `hype block-file`) that a test can kill
/// and start again on the same socket.
pub struct Backend {
    args: Vec<String>,
    pub socket: PathBuf,
    process: Option<hype_testkit::process::BackendProcess>,
    /// Runs the process as this uid (and gid), when set.
    uid: Option<u32>,
}

impl Backend {
    /// Starts `hype <args...> --socket <socket>` and waits for the socket.
    pub fn start(args: &[&str], socket: &Path) -> Backend {
        Backend::start_as(args, socket, None)
    }

    /// [`Backend::start`] as user (and group) `uid` when given (the test must be root).
    pub fn start_as(args: &[&str], socket: &Path, uid: Option<u32>) -> Backend {
        let _ = std::fs::remove_file(socket);
        let mut b = Backend {
            args: args.iter().map(|s| s.to_string()).collect(),
            socket: socket.to_owned(),
            process: None,
            uid,
        };
        b.spawn();
        b
    }

    /// A RAM disk of `size` (e.g. "16M").
    pub fn block_mem(dir: &Path, size: &str) -> Backend {
        Backend::start(&["block-mem", "--size", size], &dir.join("mem.sock"))
    }

    /// A disk backed by `file`, created with `size` bytes if missing.
    pub fn block_file(dir: &Path, file: &Path, size: u64) -> Backend {
        if !file.exists() {
            std::fs::File::create(file).unwrap().set_len(size).unwrap();
        }
        Backend::start(
            &["block-file", "--path", file.to_str().unwrap()],
            &dir.join("file.sock"),
        )
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hype"));
        cmd.args(&self.args)
            .arg("--socket")
            .arg(&self.socket)
            .env("HYPE_LOG", "warn")
            .stdin(Stdio::null());
        if let Some(uid) = self.uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        let p = hype_testkit::process::BackendProcess::spawn(&mut cmd, &self.socket)
            .unwrap_or_else(|e| panic!("{}", hype_daemon::error_chain(&e)));
        self.process = Some(p);
    }

    /// SIGKILLs the process (a crash) and removes its socket.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Starts the process again with the same arguments.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Sends `sig` to the process (SIGSTOP makes a hung backend).
    pub fn signal(&self, sig: i32) {
        if let Some(p) = &self.process {
            p.signal(sig);
        }
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.alive())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}
