//! Checking a [`RunConfig`] against the host and turning it into a [`Plan`]: the exact
//! processes `hype run` starts. Every check happens here, before anything is started, and
//! every problem is reported, not just the first.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::args::RunConfig;
use super::problem::{Problem, Problems};
use super::spec::{ConsoleSpec, DiskSource, DiskSpec, NetSpec};
use super::tap_probe::probe_tap;
use hype_vmm::config::{parse_memory, DeviceSpec, SerialSpec};

/// Default restarts allowed per backend within [`super::supervisor::RESTART_WINDOW`].
pub const DEFAULT_MAX_RESTARTS: u32 = 5;

/// A VM description that passed every check.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The `hype` binary to start backends and the VMM from.
    pub exe: PathBuf,
    /// VM name (runtime directory name).
    pub name: String,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    memory: Option<String>,
    cpus: Option<u8>,
    platform: Option<hype_vmm::platform::Platform>,
    serial: SerialSpec,
    disks: Vec<DiskSpec>,
    nets: Vec<NetSpec>,
    console: ConsoleSpec,
    devices: Vec<(String, DeviceSpec)>,
    /// Restarts allowed per backend per window.
    pub max_restarts: u32,
}

/// One backend process to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendPlan {
    /// Short name: disk0, net0, console.
    pub name: String,
    /// Arguments after the binary (subcommand first, `--socket` included).
    pub args: Vec<OsString>,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// Whether it gets this process's stdin/stdout (console on the terminal).
    pub stdio: bool,
}

/// The processes of one VM.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The `hype` binary.
    pub exe: PathBuf,
    /// Backends, in device order.
    pub backends: Vec<BackendPlan>,
    /// Arguments of the VMM process after the binary (`vmm` first).
    pub vmm: Vec<OsString>,
    /// Whether the VMM gets this process's stdin (serial on the terminal).
    pub vmm_stdin: bool,
    /// Restarts allowed per backend per window.
    pub max_restarts: u32,
}

/// Checks everything about `cfg` that can be checked without starting anything.
pub fn check(cfg: &RunConfig, exe: PathBuf) -> Result<Checked, Problems> {
    let mut problems = Vec::new();
    let mut bad = |p: Problem| problems.push(p);

    let kernel = match &cfg.kernel {
        Some(k) => {
            if check_readable("--kernel", k, false, &mut bad) {
                check_kernel(k, &mut bad);
            }
            k.clone()
        }
        None => {
            bad(Problem::NoKernel);
            PathBuf::new()
        }
    };
    if let Some(i) = &cfg.initrd {
        check_readable("--initrd", i, false, &mut bad);
    }
    if let Some(m) = &cfg.memory {
        if let Err(reason) = parse_memory(m) {
            bad(Problem::BadValue {
                what: "--memory".into(),
                reason,
            });
        }
    }
    if let Some(n) = cfg.cpus {
        if !(1..=254).contains(&n) {
            bad(Problem::BadValue {
                what: "--cpus".into(),
                reason: format!("{n} is not in 1..=254"),
            });
        }
    }

    let platform = match cfg.platform.as_deref().map(str::parse) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(reason)) => {
            bad(Problem::BadValue {
                what: "--platform".into(),
                reason,
            });
            None
        }
    };
    let console = match cfg.console.as_deref().map(str::parse::<ConsoleSpec>) {
        None => ConsoleSpec::Serial,
        Some(Ok(c)) => c,
        Some(Err(source)) => {
            bad(Problem::Spec {
                what: "--console".into(),
                source,
            });
            ConsoleSpec::Serial
        }
    };
    let serial = match cfg.serial.as_deref().map(str::parse::<SerialSpec>) {
        None if console.uses_stdio() => SerialSpec::None,
        None => SerialSpec::Stdio,
        Some(Ok(s)) => {
            if s == SerialSpec::Stdio && console.uses_stdio() {
                bad(Problem::TerminalTwice);
            }
            s
        }
        Some(Err(reason)) => {
            bad(Problem::BadValue {
                what: "--serial".into(),
                reason,
            });
            SerialSpec::None
        }
    };

    // Sockets chosen by the user, to find duplicates.
    let mut sockets: HashMap<PathBuf, String> = HashMap::new();
    let mut claim_socket = |what: &str, p: &Path, bad: &mut dyn FnMut(Problem)| {
        let key = normalize(p);
        if let Some(first) = sockets.get(&key) {
            bad(Problem::DuplicateSocket {
                path: p.to_owned(),
                first: first.clone(),
                second: what.to_string(),
            });
        } else {
            check_parent(what, p, bad);
            sockets.insert(key, what.to_string());
        }
    };

    let mut disks = Vec::new();
    let mut images: HashMap<PathBuf, (String, bool)> = HashMap::new();
    for s in &cfg.disks {
        let what = format!("--disk {s}");
        let d = match s.parse::<DiskSpec>() {
            Ok(d) => d,
            Err(source) => {
                bad(Problem::Spec { what, source });
                continue;
            }
        };
        if let Some(sock) = &d.socket {
            claim_socket(&what, sock, &mut bad);
        }
        match &d.source {
            DiskSource::File { path, readonly }
                if check_readable(&what, path, !readonly, &mut bad) =>
            {
                let key = normalize(path);
                if let Some((first, first_ro)) = images.get(&key) {
                    if !(*readonly && *first_ro) {
                        bad(Problem::DuplicateDisk {
                            path: key.clone(),
                            first: first.clone(),
                            second: what.clone(),
                        });
                    }
                } else {
                    images.insert(key, (what.clone(), *readonly));
                }
            }
            DiskSource::Http {
                overlay: Some(o), ..
            } => check_parent(&what, o, &mut bad),
            _ => {}
        }
        disks.push(d);
    }

    let mut nets = Vec::new();
    let mut taps: HashMap<String, String> = HashMap::new();
    for s in &cfg.nets {
        let what = format!("--net {s}");
        let n = match s.parse::<NetSpec>() {
            Ok(n) => n,
            Err(source) => {
                bad(Problem::Spec { what, source });
                continue;
            }
        };
        if let Some(sock) = &n.socket {
            claim_socket(&what, sock, &mut bad);
        }
        if let Some(first) = taps.get(&n.tap) {
            bad(Problem::DuplicateTap {
                name: n.tap.clone(),
                first: first.clone(),
                second: what.clone(),
            });
        } else {
            taps.insert(n.tap.clone(), what.clone());
            if let Err(p) = probe_tap(&what, &n.tap) {
                bad(p);
            }
        }
        nets.push(n);
    }

    if let ConsoleSpec::Virtio {
        output,
        socket: Some(sock),
    } = &console
    {
        claim_socket(&format!("--console {output}"), sock, &mut bad);
    }

    let mut devices = Vec::new();
    for s in &cfg.devices {
        let what = format!("--device {s}");
        match s.parse::<DeviceSpec>() {
            Ok(d) => {
                claim_socket(&what, &d.socket, &mut bad);
                devices.push((s.clone(), d));
            }
            Err(reason) => bad(Problem::BadValue { what, reason }),
        }
    }
    if disks.len() + nets.len() + devices.len() + usize::from(console != ConsoleSpec::Serial)
        > MAX_DEVICES
    {
        bad(Problem::BadValue {
            what: "devices".into(),
            reason: format!("at most {MAX_DEVICES} devices per VM"),
        });
    }

    // The backends this binary must have.
    let mut subs: Vec<(&str, String)> = Vec::new();
    for d in &disks {
        subs.push((disk_subcommand(&d.source), format!("--disk {d}")));
    }
    if let Some(n) = nets.first() {
        subs.push(("net-tap", format!("--net tap:{}", n.tap)));
    }
    if let ConsoleSpec::Virtio { output, .. } = &console {
        subs.push(("console", format!("--console {output}")));
    }
    let mut seen = Vec::new();
    for (sub, what) in subs {
        if seen.contains(&sub) {
            continue;
        }
        seen.push(sub);
        if !has_subcommand(&exe, sub) {
            bad(Problem::MissingBackend {
                what,
                subcommand: sub.to_string(),
                exe: exe.clone(),
            });
        }
    }

    let name = cfg.name.clone().unwrap_or_else(|| "vm".to_string());
    if name.is_empty() || name.contains('/') || name.len() > 64 {
        bad(Problem::BadValue {
            what: "--name".into(),
            reason: format!("{name:?} must be 1 to 64 characters without '/'"),
        });
    }

    if !problems.is_empty() {
        return Err(Problems(problems));
    }
    Ok(Checked {
        exe,
        name,
        kernel,
        initrd: cfg.initrd.clone(),
        cmdline: cfg.cmdline.clone(),
        memory: cfg.memory.clone(),
        cpus: cfg.cpus,
        platform,
        serial,
        disks,
        nets,
        console,
        devices,
        max_restarts: cfg.max_restarts.unwrap_or(DEFAULT_MAX_RESTARTS),
    })
}

/// The VMM's limit on virtio-mmio devices (interrupt lines).
const MAX_DEVICES: usize = 10;

/// The backend subcommand serving a disk.
fn disk_subcommand(d: &DiskSource) -> &'static str {
    match d {
        DiskSource::File { .. } => "block-file",
        DiskSource::Mem { .. } => "block-mem",
        DiskSource::Http { .. } => "block-http",
    }
}

/// Whether `exe SUB --help` succeeds, i.e. the binary has that subcommand.
fn has_subcommand(exe: &Path, sub: &str) -> bool {
    Command::new(exe)
        .args([sub, "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Opens `path` (for writing too if `write`) and checks it is a file or block device.
fn check_readable(what: &str, path: &Path, write: bool, bad: &mut dyn FnMut(Problem)) -> bool {
    let f = File::options().read(true).write(write).open(path);
    let meta = f.and_then(|f| f.metadata());
    match meta {
        Err(source) => {
            bad(Problem::File {
                what: what.to_string(),
                path: path.to_owned(),
                source,
            });
            false
        }
        Ok(m) if !(m.is_file() || m.file_type().is_block_device()) => {
            bad(Problem::NotAFile {
                what: what.to_string(),
                path: path.to_owned(),
            });
            false
        }
        Ok(_) => true,
    }
}

/// Checks that `path` looks like something `hype vmm` boots: an ELF file or a bzImage
/// (`HdrS` at offset 0x202).
fn check_kernel(path: &Path, bad: &mut dyn FnMut(Problem)) {
    use std::io::Read;
    let mut head = [0u8; 0x206];
    let n = File::open(path)
        .and_then(|mut f| {
            let mut n = 0;
            while n < head.len() {
                match f.read(&mut head[n..])? {
                    0 => break,
                    k => n += k,
                }
            }
            Ok(n)
        })
        .unwrap_or(0);
    let elf = n >= 4 && head[..4] == *b"\x7fELF";
    let bzimage = n >= 0x206 && head[0x202..0x206] == *b"HdrS";
    if !elf && !bzimage {
        bad(Problem::NotAKernel {
            path: path.to_owned(),
        });
    }
}

/// Checks that the directory `path` is to be created in exists.
fn check_parent(what: &str, path: &Path, bad: &mut dyn FnMut(Problem)) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bad(Problem::NoDirectory {
            what: what.to_string(),
            path: parent.to_owned(),
        });
    }
}

/// An absolute, canonical-as-possible form of `p` for comparisons (the file may not exist).
fn normalize(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let abs = if p.is_absolute() {
        p.to_owned()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    match (
        abs.parent().and_then(|d| d.canonicalize().ok()),
        abs.file_name(),
    ) {
        (Some(d), Some(n)) => d.join(n),
        _ => abs,
    }
}

impl Checked {
    /// The processes for this VM, with automatic sockets in `dir`.
    pub fn plan(&self, dir: &Path) -> Plan {
        let mut backends = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            let name = format!("disk{i}");
            let socket = d
                .socket
                .clone()
                .unwrap_or_else(|| dir.join(format!("{name}.sock")));
            let mut args: Vec<OsString> = vec![disk_subcommand(&d.source).into()];
            match &d.source {
                DiskSource::File { path, readonly } => {
                    args.extend(["--path".into(), path.into()]);
                    if *readonly {
                        args.push("--readonly".into());
                    }
                }
                DiskSource::Mem { size } => {
                    args.extend(["--size".into(), size.to_string().into()]);
                }
                DiskSource::Http {
                    url,
                    overlay,
                    readonly,
                } => {
                    args.extend(["--url".into(), url.into()]);
                    if let Some(o) = overlay {
                        args.extend(["--overlay".into(), o.into()]);
                    }
                    if *readonly {
                        args.push("--readonly".into());
                    }
                }
            }
            args.extend(["--socket".into(), socket.clone().into()]);
            backends.push(BackendPlan {
                name,
                args,
                socket,
                stdio: false,
            });
        }
        for (i, n) in self.nets.iter().enumerate() {
            let name = format!("net{i}");
            let socket = n
                .socket
                .clone()
                .unwrap_or_else(|| dir.join(format!("{name}.sock")));
            let mut args: Vec<OsString> = vec!["net-tap".into(), "--tap".into(), (&n.tap).into()];
            if let Some(m) = &n.mac {
                args.extend(["--mac".into(), m.into()]);
            }
            args.extend(["--socket".into(), socket.clone().into()]);
            backends.push(BackendPlan {
                name,
                args,
                socket,
                stdio: false,
            });
        }
        if let ConsoleSpec::Virtio { output, socket } = &self.console {
            let socket = socket.clone().unwrap_or_else(|| dir.join("console.sock"));
            let args = vec![
                "console".into(),
                "--output".into(),
                output.into(),
                "--socket".into(),
                socket.clone().into(),
            ];
            backends.push(BackendPlan {
                name: "console".into(),
                args,
                socket,
                stdio: self.console.uses_stdio(),
            });
        }

        let mut vmm: Vec<OsString> = vec!["vmm".into(), "--kernel".into(), (&self.kernel).into()];
        if let Some(i) = &self.initrd {
            vmm.extend(["--initrd".into(), i.into()]);
        }
        if let Some(c) = &self.cmdline {
            vmm.extend(["--cmdline".into(), c.into()]);
        }
        if let Some(m) = &self.memory {
            vmm.extend(["--memory".into(), m.into()]);
        }
        if let Some(n) = self.cpus {
            vmm.extend(["--cpus".into(), n.to_string().into()]);
        }
        if let Some(p) = self.platform {
            vmm.extend(["--platform".into(), p.name().into()]);
        }
        let serial: OsString = match &self.serial {
            SerialSpec::Stdio => "stdio".into(),
            SerialSpec::None => "none".into(),
            SerialSpec::File(p) => {
                let mut s = OsString::from("file:");
                s.push(p);
                s
            }
        };
        vmm.extend(["--serial".into(), serial]);
        for b in &backends {
            vmm.extend(["--device".into(), b.socket.clone().into()]);
        }
        for (s, _) in &self.devices {
            vmm.extend(["--device".into(), s.into()]);
        }
        Plan {
            exe: self.exe.clone(),
            backends,
            vmm,
            vmm_stdin: self.serial == SerialSpec::Stdio,
            max_restarts: self.max_restarts,
        }
    }
}

/// Quotes one word for a POSIX shell; a leading `$DIR/` stays expandable.
fn shell_word(w: &str) -> String {
    if let Some(rest) = w.strip_prefix("$DIR/") {
        return format!("\"$DIR\"/{}", shell_word(rest));
    }
    let safe = |c: char| c.is_ascii_alphanumeric() || "_./:=,@%+-".contains(c);
    if !w.is_empty() && w.chars().all(safe) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

impl Plan {
    /// The equivalent shell commands: runtime directory, backends in the background, VMM.
    /// Build the plan with `dir` = `$DIR` to get a reusable script.
    pub fn commands(&self, dir_setup: &str) -> String {
        let exe = self.exe.to_string_lossy();
        let line = |args: &[OsString]| {
            let mut s = shell_word(&exe);
            for a in args {
                s.push(' ');
                s.push_str(&shell_word(&a.to_string_lossy()));
            }
            s
        };
        let mut out = String::new();
        out.push_str(dir_setup);
        for b in &self.backends {
            out.push_str(&line(&b.args));
            out.push_str(" &\n");
        }
        out.push_str(&line(&self.vmm));
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words() {
        assert_eq!(shell_word("/a/b.img"), "/a/b.img");
        assert_eq!(shell_word("console=ttyS0 quiet"), "'console=ttyS0 quiet'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word("$DIR/disk0.sock"), "\"$DIR\"/disk0.sock");
        assert_eq!(shell_word(""), "''");
    }
}
