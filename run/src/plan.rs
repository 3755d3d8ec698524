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
use super::argv::{self, ChildArgs};
use super::problem::{Problem, Problems};
use super::spec::{ConsoleSpec, DiskSource, DiskSpec, NetSpec};
use super::tap_probe::probe_tap;
use hype_daemon::ListenArgs;
use hype_vmm::cli::VmmArgs;
use hype_vmm::config::{DeviceSpec, SerialSpec};
use hype_vmm::virtio::MAX_DEVICES;
use hype_vmm::vm::MAX_VCPUS;

/// Default restarts allowed per backend within [`super::supervisor::RESTART_WINDOW`].
pub const DEFAULT_MAX_RESTARTS: u32 = 5;

/// A VM description that passed every check.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The `hype` binary to start backends and the VMM from.
    pub exe: PathBuf,
    /// VM name (runtime directory name).
    pub name: String,
    /// The VMM's arguments, with only the user's own `--device`s (the backends' sockets are
    /// added by [`Checked::plan`]).
    vmm: VmmArgs,
    /// The backends in device order: name, arguments (socket unset unless the user chose
    /// it), whether it takes the terminal.
    backends: Vec<(String, Backend, bool)>,
    /// Restarts allowed per backend per window.
    pub max_restarts: u32,
    /// `--user`/`--group`, set by [`Checked::run_as`].
    pub privileges: hype_sandbox::PrivilegeArgs,
}

/// One backend process, as the typed arguments of its `hype` subcommand (built and checked
/// by that subcommand's own parser).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `hype block-file`.
    BlockFile(hype_block_file::Args),
    /// `hype block-mem`.
    BlockMem(hype_block_mem::Args),
    /// `hype block-http`.
    BlockHttp(hype_block_http::Args),
    /// `hype net-tap`.
    NetTap(hype_net_tap::Args),
    /// `hype console`.
    Console(hype_console::Args),
}

impl Backend {
    /// The `hype` subcommand.
    pub fn subcommand(&self) -> &'static str {
        match self {
            Backend::BlockFile(_) => hype_block_file::Args::SUBCOMMAND,
            Backend::BlockMem(_) => hype_block_mem::Args::SUBCOMMAND,
            Backend::BlockHttp(_) => hype_block_http::Args::SUBCOMMAND,
            Backend::NetTap(_) => hype_net_tap::Args::SUBCOMMAND,
            Backend::Console(_) => hype_console::Args::SUBCOMMAND,
        }
    }

    /// Environment variables the backend needs besides its arguments: a block-http URL with
    /// secrets (user information, query values) travels in `HYPE_HTTP_URL`, where only its
    /// own user can read it, instead of argv, which every local user can.
    pub fn env(&self) -> Vec<(OsString, OsString)> {
        match self {
            Backend::BlockHttp(a) if argv::url_has_secrets(&a.url) => {
                vec![(hype_block_http::URL_ENV.into(), a.url.clone().into())]
            }
            _ => Vec::new(),
        }
    }

    /// The subcommand and its arguments.
    pub fn argv(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![self.subcommand().into()];
        v.extend(match self {
            Backend::BlockFile(a) => a.to_argv(),
            Backend::BlockMem(a) => a.to_argv(),
            // A URL with secrets goes in the environment instead ([`Backend::env`]).
            Backend::BlockHttp(a) if argv::url_has_secrets(&a.url) => {
                let mut words = a.to_argv().into_iter();
                let mut kept = Vec::new();
                while let Some(w) = words.next() {
                    if w == "--url" {
                        words.next();
                    } else {
                        kept.push(w);
                    }
                }
                kept
            }
            Backend::BlockHttp(a) => a.to_argv(),
            Backend::NetTap(a) => a.to_argv(),
            Backend::Console(a) => a.to_argv(),
        });
        v
    }

    fn privileges_mut(&mut self) -> &mut hype_sandbox::PrivilegeArgs {
        match self {
            Backend::BlockFile(a) => &mut a.device.sandbox.privileges,
            Backend::BlockMem(a) => &mut a.device.sandbox.privileges,
            Backend::BlockHttp(a) => &mut a.device.sandbox.privileges,
            Backend::NetTap(a) => &mut a.sandbox.privileges,
            Backend::Console(a) => &mut a.sandbox.privileges,
        }
    }

    fn listen_mut(&mut self) -> &mut ListenArgs {
        match self {
            Backend::BlockFile(a) => &mut a.device.listen,
            Backend::BlockMem(a) => &mut a.device.listen,
            Backend::BlockHttp(a) => &mut a.device.listen,
            Backend::NetTap(a) => &mut a.listen,
            Backend::Console(a) => &mut a.listen,
        }
    }
}

/// `--name=value`: unambiguous whatever the value starts with.
fn kv(name: &str, value: impl AsRef<std::ffi::OsStr>) -> OsString {
    let mut w = OsString::from(format!("--{name}="));
    w.push(value.as_ref());
    w
}

/// Parses `argv` with `A`'s parser; the error is the child's reason.
fn child<A: clap::Args>(argv: Vec<OsString>) -> Result<A, String> {
    argv::parse::<A, _, _>(argv).map_err(|e| argv::reason(&e))
}

/// The backend serving disk `d`, with `hype`'s own parser for that backend.
fn disk_backend(d: &DiskSpec) -> Result<Backend, String> {
    let mut a = Vec::new();
    if let Some(s) = &d.socket {
        a.push(kv("socket", s));
    }
    Ok(match &d.source {
        DiskSource::File { path, readonly } => {
            a.push(kv("path", path));
            if *readonly {
                a.push("--readonly".into());
            }
            Backend::BlockFile(child(a)?)
        }
        DiskSource::Mem { size } => {
            a.push(kv("size", size.to_string()));
            Backend::BlockMem(child(a)?)
        }
        DiskSource::Http {
            url,
            overlay,
            readonly,
        } => {
            a.push(kv("url", url));
            if let Some(o) = overlay {
                a.push(kv("overlay", o));
            }
            if *readonly {
                a.push("--readonly".into());
            }
            Backend::BlockHttp(child(a)?)
        }
    })
}

/// The backend serving net `n`.
fn net_backend(n: &NetSpec) -> Result<Backend, String> {
    let mut a = vec![kv("tap", &n.tap)];
    if let Some(m) = n.mac {
        a.push(kv("mac", m.to_string()));
    }
    if let Some(s) = &n.socket {
        a.push(kv("socket", s));
    }
    Ok(Backend::NetTap(child(a)?))
}

/// The backend serving a virtio console.
fn console_backend(
    output: &hype_console::Output,
    socket: &Option<PathBuf>,
) -> Result<Backend, String> {
    let mut a = vec![kv("output", output.to_string())];
    if let Some(s) = socket {
        a.push(kv("socket", s));
    }
    Ok(Backend::Console(child(a)?))
}

/// One backend process to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendPlan {
    /// Short name: disk0, net0, console.
    pub name: String,
    /// Arguments after the binary (subcommand first, `--socket` included).
    pub args: Vec<OsString>,
    /// Environment variables it gets besides this process's ([`Backend::env`]).
    pub env: Vec<(OsString, OsString)>,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// Whether it gets this process's stdin/stdout (console on the terminal).
    pub stdio: bool,
    /// The typed arguments [`args`](Self::args) is rendered from.
    pub backend: Backend,
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
    /// The typed arguments [`vmm`](Self::vmm) is rendered from.
    pub vmm_args: VmmArgs,
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
        // A restore boots nothing: the snapshot holds the guest.
        _ if cfg.restore.is_some() => PathBuf::new(),
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
    // Each value on its own, with `hype vmm`'s parser, so each problem is reported.
    if let Some(m) = &cfg.memory {
        if let Err(reason) = child::<VmmArgs>(vec![kv("kernel", "k"), kv("memory", m)]) {
            bad(Problem::BadValue {
                what: "--memory".into(),
                reason,
            });
        }
    }
    if let Some(n) = cfg.cpus {
        if !(1..=MAX_VCPUS).contains(&n) {
            bad(Problem::BadValue {
                what: "--cpus".into(),
                reason: format!("{n} is not in 1..={MAX_VCPUS}"),
            });
        }
    }

    // With `hype vmm`'s own parser, like the memory size.
    if let Some(p) = &cfg.platform {
        if let Err(reason) = child::<VmmArgs>(vec![kv("kernel", "k"), kv("platform", p)]) {
            bad(Problem::BadValue {
                what: "--platform".into(),
                reason,
            });
        }
    }
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
                devices.push(d);
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
        subs.push((
            hype_net_tap::Args::SUBCOMMAND,
            format!("--net tap:{}", n.tap),
        ));
    }
    if let ConsoleSpec::Virtio { output, .. } = &console {
        subs.push((
            hype_console::Args::SUBCOMMAND,
            format!("--console {output}"),
        ));
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

    // The children's arguments, made by their own parsers.
    let mut backends = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        match disk_backend(d) {
            Ok(b) => backends.push((format!("disk{i}"), b, false)),
            Err(reason) => bad(Problem::BadValue {
                what: format!("--disk {d}"),
                reason,
            }),
        }
    }
    for (i, n) in nets.iter().enumerate() {
        match net_backend(n) {
            Ok(b) => backends.push((format!("net{i}"), b, false)),
            Err(reason) => bad(Problem::BadValue {
                what: format!("--net tap:{}", n.tap),
                reason,
            }),
        }
    }
    if let ConsoleSpec::Virtio { output, socket } = &console {
        match console_backend(output, socket) {
            Ok(b) => backends.push(("console".into(), b, console.uses_stdio())),
            Err(reason) => bad(Problem::BadValue {
                what: format!("--console {output}"),
                reason,
            }),
        }
    }
    let mut vmm_argv = Vec::new();
    if let Some(dir) = &cfg.restore {
        // The snapshot fixes the guest (kernel, memory, vCPUs, platform): only the devices,
        // the serial sink and the API socket are given again.
        vmm_argv.push(kv("restore", dir));
    } else {
        vmm_argv.push(kv("kernel", &kernel));
        if let Some(i) = &cfg.initrd {
            vmm_argv.push(kv("initrd", i));
        }
        if let Some(c) = &cfg.cmdline {
            vmm_argv.push(kv("cmdline", c));
        }
        if let Some(m) = &cfg.memory {
            vmm_argv.push(kv("memory", m));
        }
        if let Some(n) = cfg.cpus {
            vmm_argv.push(kv("cpus", n.to_string()));
        }
        if let Some(p) = &cfg.platform {
            vmm_argv.push(kv("platform", p));
        }
    }
    vmm_argv.push(kv("serial", serial.to_string()));
    for d in &devices {
        vmm_argv.push(kv("device", d.to_string()));
    }
    if let Some(a) = &cfg.api_socket {
        vmm_argv.push(kv("api-socket", a));
    }
    let vmm = if problems.is_empty() {
        match child::<VmmArgs>(vmm_argv) {
            Ok(v) => Some(v),
            Err(reason) => {
                problems.push(Problem::BadValue {
                    what: "hype vmm".into(),
                    reason,
                });
                None
            }
        }
    } else {
        None
    };
    let (true, Some(vmm)) = (problems.is_empty(), vmm) else {
        return Err(Problems(problems));
    };
    Ok(Checked {
        exe,
        name,
        vmm,
        backends,
        max_restarts: cfg.max_restarts.unwrap_or(DEFAULT_MAX_RESTARTS),
        privileges: hype_sandbox::PrivilegeArgs::default(),
    })
}

/// The backend subcommand serving a disk.
fn disk_subcommand(d: &DiskSource) -> &'static str {
    match d {
        DiskSource::File { .. } => hype_block_file::Args::SUBCOMMAND,
        DiskSource::Mem { .. } => hype_block_mem::Args::SUBCOMMAND,
        DiskSource::Http { .. } => hype_block_http::Args::SUBCOMMAND,
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
    /// `hype run --user/--group`: every backend and the VMM drop to that user once set up
    /// (the supervisor itself stays root, to restart backends).
    pub fn run_as(&mut self, privileges: hype_sandbox::PrivilegeArgs) {
        self.privileges = privileges;
        self.vmm.sandbox.common.privileges = privileges;
        for (_, b, _) in &mut self.backends {
            *b.privileges_mut() = privileges;
        }
    }

    /// The processes for this VM, with automatic sockets in `dir`.
    pub fn plan(&self, dir: &Path) -> Plan {
        let mut backends = Vec::new();
        let mut vmm = self.vmm.clone();
        let mut sockets = Vec::new();
        for (name, b, stdio) in &self.backends {
            let mut b = b.clone();
            let socket = b
                .listen_mut()
                .socket
                .get_or_insert_with(|| dir.join(format!("{name}.sock")))
                .clone();
            sockets.push(DeviceSpec::new(socket.clone()));
            backends.push(BackendPlan {
                name: name.clone(),
                args: b.argv(),
                env: b.env(),
                socket,
                stdio: *stdio,
                backend: b,
            });
        }
        // The backends' devices first, then the user's own, in the order given.
        sockets.append(&mut vmm.devices);
        vmm.devices = sockets;
        let mut vmm_argv: Vec<OsString> = vec![VmmArgs::SUBCOMMAND.into()];
        vmm_argv.extend(vmm.to_argv());
        Plan {
            exe: self.exe.clone(),
            backends,
            vmm_stdin: vmm.serial == SerialSpec::Stdio,
            vmm: vmm_argv,
            vmm_args: vmm,
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
    /// URLs are printed without their secrets (user information, query values:
    /// [`hype_base::redact_url`]), in argv or in the environment ([`Backend::env`]).
    pub fn commands(&self, dir_setup: &str) -> String {
        let exe = self.exe.to_string_lossy();
        let line = |args: &[OsString]| {
            let mut s = shell_word(&exe);
            for a in args {
                s.push(' ');
                let word = a.to_string_lossy();
                if word.contains("://") {
                    s.push_str(&shell_word(&hype_base::redact_url(&word)));
                } else {
                    s.push_str(&shell_word(&word));
                }
            }
            s
        };
        let mut out = String::new();
        out.push_str(dir_setup);
        for b in &self.backends {
            for (k, v) in &b.env {
                out.push_str(&k.to_string_lossy());
                out.push('=');
                out.push_str(&shell_word(&hype_base::redact_url(&v.to_string_lossy())));
                out.push(' ');
            }
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
    use hype_vmm::virtio::WaitLimit;
    use std::time::Duration;

    /// Parses a backend's planned argv with that backend's own parser.
    fn reparse(args: &[OsString]) -> Backend {
        let (sub, rest) = args.split_first().unwrap();
        let rest = rest.to_vec();
        match sub.to_str().unwrap() {
            "block-file" => Backend::BlockFile(argv::parse(rest).unwrap()),
            "block-mem" => Backend::BlockMem(argv::parse(rest).unwrap()),
            "block-http" => Backend::BlockHttp(argv::parse(rest).unwrap()),
            "net-tap" => Backend::NetTap(argv::parse(rest).unwrap()),
            "console" => Backend::Console(argv::parse(rest).unwrap()),
            other => panic!("unexpected subcommand {other}"),
        }
    }

    #[test]
    fn planned_argv_parses_back_with_each_childs_parser() {
        let dir = std::env::temp_dir().join(format!("hype-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF").unwrap();
        let img = dir.join("disk.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let cfg = RunConfig {
            kernel: Some(kernel.clone()),
            cmdline: Some("-v console=ttyS0".into()),
            memory: Some("1536".into()),
            cpus: Some(2),
            disks: vec![
                format!("file:{},ro", img.display()),
                "mem:64M".into(),
                format!("http://h/i.raw,overlay={}/o.img", dir.display()),
            ],
            console: Some("file:/tmp/c.log".into()),
            devices: vec!["blk:/tmp/x.sock,wait=10s".into()],
            ..RunConfig::default()
        };
        // `true` stands in for a hype binary that has every subcommand.
        let checked = check(&cfg, "/bin/true".into()).unwrap();
        let plan = checked.plan(Path::new("/run/vm"));
        let subs: Vec<_> = plan
            .backends
            .iter()
            .map(|b| b.backend.subcommand())
            .collect();
        assert_eq!(subs, ["block-file", "block-mem", "block-http", "console"]);
        for b in &plan.backends {
            assert_eq!(reparse(&b.args), b.backend, "{:?}", b.args);
            assert_eq!(
                b.socket,
                Path::new("/run/vm").join(format!("{}.sock", b.name))
            );
        }
        let Backend::BlockMem(m) = &plan.backends[1].backend else {
            panic!("disk1 is not block-mem");
        };
        assert_eq!(m.size, Some(64 << 20));
        let (sub, rest) = plan.vmm.split_first().unwrap();
        assert_eq!(sub, "vmm");
        let vmm: VmmArgs = argv::parse(rest.to_vec()).unwrap();
        assert_eq!(vmm, plan.vmm_args);
        assert_eq!(vmm.memory, 1536 << 20);
        assert_eq!(vmm.cmdline, "-v console=ttyS0");
        assert_eq!(vmm.serial, SerialSpec::Stdio);
        let sockets: Vec<_> = vmm.devices.iter().map(|d| d.socket.clone()).collect();
        let mut want: Vec<_> = plan.backends.iter().map(|b| b.socket.clone()).collect();
        want.push("/tmp/x.sock".into());
        assert_eq!(sockets, want);
        let user = &vmm.devices[4];
        assert_eq!(user.wait, Some(WaitLimit::For(Duration::from_secs(10))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn restore_passes_the_snapshot_and_devices_but_no_kernel() {
        let dir = std::env::temp_dir().join(format!("hype-plan-r-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let cfg = RunConfig {
            restore: Some("/var/snap/vm1".into()),
            memory: Some("1G".into()),
            disks: vec![format!("file:{}", img.display())],
            ..RunConfig::default()
        };
        let checked = check(&cfg, "/bin/true".into()).unwrap();
        let plan = checked.plan(Path::new("/run/vm"));
        let (_, rest) = plan.vmm.split_first().unwrap();
        let vmm: VmmArgs = argv::parse(rest.to_vec()).unwrap();
        assert_eq!(vmm.restore, Some("/var/snap/vm1".into()));
        assert_eq!(vmm.kernel, None);
        assert_eq!(vmm.devices.len(), 1);
        assert_eq!(vmm.devices[0].socket, plan.backends[0].socket);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_childrens_rules_reject_values() {
        let kernel = std::env::temp_dir().join(format!("hype-plan-k-{}", std::process::id()));
        std::fs::write(&kernel, b"\x7fELF").unwrap();
        let cfg = RunConfig {
            kernel: Some(kernel.clone()),
            memory: Some("lots".into()),
            cpus: Some(0),
            disks: vec!["mem:1000B".into()],
            nets: vec!["tap:a/b".into(), "tap:t0,mac=01:00:00:00:00:01".into()],
            ..RunConfig::default()
        };
        let e = check(&cfg, "/bin/true".into()).unwrap_err().to_string();
        std::fs::remove_file(&kernel).unwrap();
        for want in [
            "--memory: 'lots' is not a size",
            "--cpus: 0 is not in 1..=254",
            "--disk mem:1000B: \"mem:1000B\": bad size: size 1000 is not a multiple of 512",
            "--net tap:a/b: \"tap:a/b\": invalid interface name \"a/b\"",
            "MAC address 01:00:00:00:00:01 is multicast",
        ] {
            assert!(e.contains(want), "{want:?} not in {e}");
        }
    }

    #[test]
    fn printed_commands_hide_url_secrets() {
        let kernel = std::env::temp_dir().join(format!("hype-plan-sec-{}", std::process::id()));
        std::fs::write(&kernel, b"\x7fELF").unwrap();
        let cfg = RunConfig {
            kernel: Some(kernel.clone()),
            disks: vec!["http://alice:pw1@h/i.raw?token=abc123".into()],
            ..RunConfig::default()
        };
        let checked = check(&cfg, "/bin/true".into()).unwrap();
        let plan = checked.plan(Path::new("$DIR"));
        let printed = plan.commands("");
        std::fs::remove_file(&kernel).unwrap();
        assert!(
            !printed.contains("pw1") && !printed.contains("abc123"),
            "{printed}"
        );
        assert!(
            printed.contains("http://***@h/i.raw?token=***"),
            "{printed}"
        );
        assert!(
            printed.contains("HYPE_HTTP_URL='http://***@h/i.raw?token=***' "),
            "{printed}"
        );
        // What is run: no secret in argv (every local user can read it), the URL whole in the
        // backend's environment (only its user can), where block-http reads it.
        let b = &plan.backends[0];
        let argv: Vec<String> = b
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            !argv
                .iter()
                .any(|a| a.contains("pw1") || a.contains("abc123")),
            "{argv:?}"
        );
        assert!(!argv.iter().any(|a| a == "--url"), "{argv:?}");
        assert_eq!(
            b.env,
            [(
                OsString::from("HYPE_HTTP_URL"),
                OsString::from("http://alice:pw1@h/i.raw?token=abc123")
            )]
        );
        // A URL without secrets stays in argv.
        let cfg = RunConfig {
            disks: vec!["http://h/i.raw".into()],
            ..cfg
        };
        std::fs::write(&kernel, b"\x7fELF").unwrap();
        let plan = check(&cfg, "/bin/true".into())
            .unwrap()
            .plan(Path::new("$DIR"));
        std::fs::remove_file(&kernel).unwrap();
        assert!(plan.backends[0].env.is_empty());
        assert!(plan.backends[0].args.iter().any(|a| a == "http://h/i.raw"));
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_word("/a/b.img"), "/a/b.img");
        assert_eq!(shell_word("console=ttyS0 quiet"), "'console=ttyS0 quiet'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word("$DIR/disk0.sock"), "\"$DIR\"/disk0.sock");
        assert_eq!(shell_word(""), "''");
    }
}
