//! `hype`: the VMM and the backends that ship with it, one binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use hype_vmm::config::{parse_memory, DeviceSpec, SerialSpec};
use hype_vmm::fixups::FixupMode;
use hype_vmm::vm::{self, BootImage, VmConfig, DEFAULT_CMDLINE};

#[derive(Parser)]
#[command(
    name = "hype",
    version,
    about = "A KVM virtual machine monitor whose virtio devices are vhost-user backend processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a Linux kernel in a VM.
    Vmm(VmmArgs),
}

#[derive(Args)]
#[command(after_help = "Examples:
  hype vmm --kernel vmlinux --initrd initramfs.cpio --cmdline 'console=ttyS0' --memory 512M --cpus 2
  hype vmm --kernel bzImage --serial file:/tmp/console.log --device /run/disk0.sock
  hype vmm --kernel vmlinux --device blk:/run/third-party.sock

Press Ctrl-a x to stop the VM from the serial console (Ctrl-a Ctrl-a sends Ctrl-a).
A guest write to I/O port 0x440 is logged with the time since start (boot-time marker).
Logging: HYPE_LOG=debug (or RUST_LOG).")]
struct VmmArgs {
    /// Kernel image: a bzImage, or an ELF vmlinux (booted through PVH when it has the PVH note).
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initial ramdisk (cpio, optionally compressed if the kernel can decompress it).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory: a number with an optional K/M/G suffix (a bare number is MiB).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_memory)]
    memory: u64,
    /// Number of vCPUs (1 to 254).
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u8,
    /// Serial console (COM1): stdio, none, or file:PATH.
    #[arg(long, value_name = "SINK", default_value = "stdio")]
    serial: SerialSpec,
    /// A vhost-user backend socket to attach as a virtio device; TYPE:PATH (blk, net, console)
    /// names the type explicitly. Repeatable.
    #[arg(long = "device", value_name = "SOCKET")]
    devices: Vec<DeviceSpec>,
    /// Userspace fix-ups for instructions an emulating KVM (PVM hosts) cannot run: auto
    /// enables them when the host needs them.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    emulation_fixups: FixupMode,
}

fn init_logging() {
    let env = env_logger::Env::new().filter_or(
        "HYPE_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}

/// Prints an error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

fn run_vmm(a: VmmArgs) -> ExitCode {
    if !a.devices.is_empty() {
        eprintln!("hype: --device is not supported yet (the virtio transport is not built)");
        return ExitCode::from(2);
    }
    let cfg = VmConfig {
        image: BootImage::Kernel {
            kernel: a.kernel,
            initrd: a.initrd,
            cmdline: a.cmdline,
        },
        memory: a.memory,
        cpus: a.cpus,
        serial: a.serial,
        devices: a.devices,
        fixups: a.emulation_fixups,
    };
    match vm::run(&cfg) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hype: {}", error_chain(&e));
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}

/// Parses the command line; usage errors become one line on stderr and exit code 2.
fn parse_cli() -> Result<Cli, ExitCode> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("hype: {first} (see --help)");
            Err(ExitCode::from(2))
        }
    }
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    init_logging();
    match cli.command {
        Command::Vmm(a) => run_vmm(a),
    }
}
