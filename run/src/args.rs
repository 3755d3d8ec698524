//! The `hype run` command line, and the VM description file (`--config vm.toml`) it can start
//! from: both merge into one [`RunConfig`], flags winning.

use std::path::{Path, PathBuf};

use hype_base::options::{is_url, Spec};
use serde::Deserialize;

use super::problem::Problem;

/// Command-line options of `hype run`.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(after_help = "Examples:
  hype run --kernel vmlinux --initrd initramfs.cpio --cmdline 'console=ttyS0' \\
      --disk file:disk.img --disk mem:256M --disk http://host/image.raw,overlay=/var/tmp/o.img \\
      --net tap:tap0 --cpus 2 --memory 1G
  hype run --config vm.toml --memory 2G
  hype run --config vm.toml --print-commands

Disks: file:PATH[,ro], mem:SIZE, http(s)://URL[,overlay=PATH][,ro]; any spec may end in
,socket=PATH. Each backend runs as its own `hype` process; a crashed backend is restarted
and the guest carries on. Ctrl-C or SIGTERM stops the VM, then the backends. The exit code
is the VMM's. See docs/run.md.")]
pub struct RunArgs {
    /// VM description file (TOML); command-line options override its settings.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Kernel image (bzImage or ELF vmlinux).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest memory (e.g. 512M, 1G; a bare number is MiB).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u8>,
    /// acpi (default) or mptable, as for `hype vmm --platform`.
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// The VMM's serial console (COM1): stdio, none or file:PATH. Default: stdio, or none
    /// when `--console stdio` takes the terminal.
    #[arg(long, value_name = "SINK")]
    pub serial: Option<String>,
    /// A disk: file:PATH[,ro], mem:SIZE, http(s)://URL[,overlay=PATH][,ro]. Repeatable;
    /// given on the command line, they replace the config file's disks.
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// A network interface: tap:NAME[,mac=MAC]. Repeatable; replaces the config file's.
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<String>,
    /// The console: serial (the VMM's UART, default), or a virtio-console backend with
    /// output stdio, pty, socket:PATH or file:PATH.
    #[arg(long, value_name = "SPEC")]
    pub console: Option<String>,
    /// A vhost-user backend you run yourself, as for `hype vmm --device`. Repeatable;
    /// replaces the config file's.
    #[arg(long = "device", value_name = "SPEC")]
    pub devices: Vec<String>,
    /// Name of the VM: names the private runtime directory (hype-NAME.PID.RANDOM).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Restarts allowed per backend within a minute before the VM is stopped.
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<u32>,
    /// Serve the VMM's control API on this Unix socket (docs/api.md).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Print the equivalent separate commands (backends, then the VMM) and exit.
    #[arg(long)]
    pub print_commands: bool,
    /// Continue a VM from a snapshot directory (docs/snapshot.md) instead of booting: the
    /// disks and devices are started as given (the same ones, in the same order, as when the
    /// snapshot was taken); kernel, initrd, command line, memory, vCPUs and platform come from
    /// the snapshot.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline"])]
    pub restore: Option<PathBuf>,
    /// `--user USER [--group GROUP]`: every backend and the VMM drop root to that user once
    /// set up; the runtime directory is given to it (docs/sandbox.md).
    #[command(flatten)]
    pub privileges: hype_sandbox::PrivilegeArgs,
}

/// A size given in the config file: a string with a suffix, or a number of MiB.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum SizeValue {
    Mib(u64),
    Text(String),
}

/// The VM description file. Every key is optional; relative paths are relative to the file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    memory: Option<SizeValue>,
    cpus: Option<u8>,
    platform: Option<String>,
    serial: Option<String>,
    console: Option<String>,
    #[serde(default)]
    disks: Vec<String>,
    #[serde(default)]
    nets: Vec<String>,
    #[serde(default)]
    devices: Vec<String>,
    name: Option<String>,
    max_restarts: Option<u32>,
    api_socket: Option<PathBuf>,
}

/// The VM as described by the config file and the flags together, not yet checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    /// Kernel image.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// Guest memory, as given.
    pub memory: Option<String>,
    /// vCPUs.
    pub cpus: Option<u8>,
    /// Platform (acpi, mptable), as given.
    pub platform: Option<String>,
    /// Serial sink, as given.
    pub serial: Option<String>,
    /// Console spec, as given.
    pub console: Option<String>,
    /// Disk specs, as given (file paths already made relative to the config file's directory).
    pub disks: Vec<String>,
    /// Net specs.
    pub nets: Vec<String>,
    /// External device specs.
    pub devices: Vec<String>,
    /// VM name.
    pub name: Option<String>,
    /// Restart limit per backend per minute.
    pub max_restarts: Option<u32>,
    /// The VMM's control API socket.
    pub api_socket: Option<PathBuf>,
    /// A snapshot to restore instead of booting (command line only).
    pub restore: Option<PathBuf>,
}

/// Reads `path` and merges `args` over it.
pub fn load(args: &RunArgs) -> Result<RunConfig, Problem> {
    let mut cfg = match &args.config {
        Some(path) => read_file(path)?,
        None => RunConfig::default(),
    };
    merge(&mut cfg, args);
    Ok(cfg)
}

/// Flags override the file: scalars one by one, lists as a whole.
fn merge(cfg: &mut RunConfig, a: &RunArgs) {
    fn over<T: Clone>(dst: &mut Option<T>, src: &Option<T>) {
        if src.is_some() {
            dst.clone_from(src);
        }
    }
    over(&mut cfg.kernel, &a.kernel);
    over(&mut cfg.initrd, &a.initrd);
    over(&mut cfg.cmdline, &a.cmdline);
    over(&mut cfg.memory, &a.memory);
    over(&mut cfg.cpus, &a.cpus);
    over(&mut cfg.platform, &a.platform);
    over(&mut cfg.serial, &a.serial);
    over(&mut cfg.console, &a.console);
    over(&mut cfg.name, &a.name);
    over(&mut cfg.max_restarts, &a.max_restarts);
    over(&mut cfg.api_socket, &a.api_socket);
    over(&mut cfg.restore, &a.restore);
    for (dst, src) in [
        (&mut cfg.disks, &a.disks),
        (&mut cfg.nets, &a.nets),
        (&mut cfg.devices, &a.devices),
    ] {
        if !src.is_empty() {
            dst.clone_from(src);
        }
    }
}

/// Largest VM description file read.
pub const CONFIG_MAX_BYTES: u64 = 1 << 20;

/// Parses a VM description file: a regular file of at most [`CONFIG_MAX_BYTES`].
fn read_file(path: &Path) -> Result<RunConfig, Problem> {
    use std::io::Read;
    let read_err = |source| Problem::ConfigRead {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() || meta.len() > CONFIG_MAX_BYTES {
        return Err(Problem::ConfigNotSmallFile {
            path: path.to_owned(),
        });
    }
    let mut text = String::new();
    // Bounded even if the file grows between the check and the read.
    file.take(CONFIG_MAX_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > CONFIG_MAX_BYTES {
        return Err(Problem::ConfigNotSmallFile {
            path: path.to_owned(),
        });
    }
    parse_file(&text, path.parent().unwrap_or(Path::new("")), path)
}

/// Parses the text of a VM description file whose relative paths are relative to `base`.
fn parse_file(text: &str, base: &Path, path: &Path) -> Result<RunConfig, Problem> {
    let f: FileConfig = toml::from_str(text).map_err(|e| Problem::ConfigParse {
        path: path.to_owned(),
        message: e.message().to_string(),
    })?;
    let rebase = |p: PathBuf| {
        if p.is_relative() && !base.as_os_str().is_empty() {
            base.join(p)
        } else {
            p
        }
    };
    let rebase_spec = |s: String| -> String {
        let b = |p: &str| rebase(PathBuf::from(p)).to_string_lossy().into_owned();
        if let Some(p) = s.strip_prefix("file:") {
            format!("file:{}", rebase_opts(p, true, &b))
        } else {
            rebase_opts(&s, false, &b)
        }
    };
    Ok(RunConfig {
        kernel: f.kernel.map(rebase),
        initrd: f.initrd.map(rebase),
        cmdline: f.cmdline,
        memory: f.memory.map(|m| match m {
            SizeValue::Mib(n) => format!("{n}M"),
            SizeValue::Text(s) => s,
        }),
        cpus: f.cpus,
        platform: f.platform,
        serial: f.serial.map(|s| match s.strip_prefix("file:") {
            Some(p) => format!("file:{}", rebase(PathBuf::from(p)).display()),
            None => s,
        }),
        console: f.console,
        disks: f.disks.into_iter().map(rebase_spec).collect(),
        nets: f.nets,
        devices: f.devices,
        name: f.name,
        max_restarts: f.max_restarts,
        api_socket: f.api_socket.map(rebase),
        restore: None,
    })
}

/// Rebases the `overlay=` / `socket=` options of a `HEAD,key=value,...` string, and the head
/// too if `head_is_path`; anything else is kept as it is. A string the option grammar refuses
/// is kept whole: checking it reports the problem.
fn rebase_opts(s: &str, head_is_path: bool, rebase: &dyn Fn(&str) -> String) -> String {
    const KEYS: &[&str] = &["ro", "readonly", "overlay", "socket"];
    let Ok(spec) = Spec::parse(s, KEYS, is_url) else {
        return s.to_string();
    };
    let mut out = if head_is_path && !spec.head.is_empty() {
        rebase(spec.head)
    } else {
        spec.head.to_string()
    };
    for (k, v) in &spec.options {
        match v {
            Some(v) if matches!(*k, "overlay" | "socket") && !v.is_empty() => {
                out.push_str(&format!(",{k}={}", rebase(v)))
            }
            Some(v) => out.push_str(&format!(",{k}={v}")),
            None => out.push_str(&format!(",{k}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
kernel = "vmlinux"
initrd = "/abs/initrd.cpio"
cmdline = "console=ttyS0"
memory = 1024
cpus = 2
disks = ["file:disk.img,ro", "mem:64M", "http://h/i.raw,overlay=o.img"]
nets = ["tap:tap0"]
"#;

    #[test]
    fn config_files_are_small_regular_files() {
        let dir = std::env::temp_dir().join(format!("hype-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = dir.join("vm.toml");
        std::fs::write(&ok, FILE).unwrap();
        assert_eq!(read_file(&ok).unwrap().cpus, Some(2));
        // A directory, a device and a file over the limit are refused before being read.
        let big = dir.join("big.toml");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(CONFIG_MAX_BYTES + 1)
            .unwrap();
        for p in [dir.as_path(), Path::new("/dev/zero"), big.as_path()] {
            let e = read_file(p).unwrap_err();
            assert!(
                matches!(e, Problem::ConfigNotSmallFile { .. }),
                "{}: {e}",
                p.display()
            );
            assert!(e
                .to_string()
                .contains("is not a regular file of at most 1048576 bytes"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_paths_are_relative_to_the_file() {
        let c = parse_file(FILE, Path::new("/etc/vms"), Path::new("/etc/vms/a.toml")).unwrap();
        assert_eq!(c.kernel, Some(PathBuf::from("/etc/vms/vmlinux")));
        assert_eq!(c.initrd, Some(PathBuf::from("/abs/initrd.cpio")));
        assert_eq!(c.memory.as_deref(), Some("1024M"));
        assert_eq!(
            c.disks,
            [
                "file:/etc/vms/disk.img,ro",
                "mem:64M",
                "http://h/i.raw,overlay=/etc/vms/o.img"
            ]
        );
    }

    #[test]
    fn flags_override_the_file() {
        let mut c = parse_file(FILE, Path::new("/d"), Path::new("/d/a.toml")).unwrap();
        let a = RunArgs {
            memory: Some("2G".into()),
            disks: vec!["mem:1M".into()],
            ..RunArgs::default()
        };
        merge(&mut c, &a);
        assert_eq!(c.memory.as_deref(), Some("2G"));
        assert_eq!(c.cpus, Some(2));
        assert_eq!(c.disks, ["mem:1M"]);
        assert_eq!(c.nets, ["tap:tap0"]);
    }

    #[test]
    fn unknown_keys_and_bad_types_are_errors() {
        let p = Path::new("x.toml");
        let e = parse_file("kernal = \"x\"", Path::new(""), p).unwrap_err();
        assert!(e.to_string().contains("unknown field `kernal`"), "{e}");
        let e = parse_file("cpus = \"two\"", Path::new(""), p).unwrap_err();
        assert!(e.to_string().starts_with("x.toml: "), "{e}");
    }
}
