//! `hype`: the VMM and the backends that ship with it, one binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use hype_vmm::config::{parse_memory, parse_wait, DeviceSpec, SerialSpec};
use hype_vmm::fixups::FixupMode;
use hype_vmm::virtio::WaitLimit;
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
    /// Start the backends and the VMM together and supervise them (docs/run.md).
    Run(hype_vmm::run::RunArgs),
    /// Serve a RAM disk as a vhost-user-blk backend.
    BlockMem(hype_block_mem::Args),
    /// Serve a raw image file or block device as a vhost-user-blk backend.
    BlockFile(hype_block_file::Args),
    /// Serve a disk image from an http(s) URL (Range requests) as a vhost-user-blk backend.
    BlockHttp(hype_block_http::Args),
    /// Serve a TAP interface as a vhost-user virtio-net backend.
    NetTap(hype_net_tap::Args),
    /// Serve a virtio-console (terminal, socket, pty or log file) as a vhost-user backend, or
    /// `attach PATH` to a console's client socket.
    Console(hype_console::Command),
    /// Boot a small built-in guest on a RAM disk and a console backend: the architecture at
    /// work in a few seconds.
    Demo(hype_vmm::demo::DemoArgs),
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
    /// A vhost-user backend to attach as a virtio-mmio device: PATH (type learned from the
    /// backend), TYPE:PATH (blk, net, console), or PATH,key=value,... with keys type, queues,
    /// queue-size, wait, reconnect-timeout (see docs/devices.md). Repeatable.
    #[arg(long = "device", value_name = "SPEC")]
    devices: Vec<DeviceSpec>,
    /// How long to wait for a --device socket that is not there yet: forever, or e.g. 500ms,
    /// 10s, 2m. A device's own wait=... overrides it.
    #[arg(long, value_name = "DURATION", default_value = "forever", value_parser = parse_wait)]
    device_wait: WaitLimit,
    /// Userspace fix-ups for instructions an emulating KVM (PVM hosts) cannot run: auto
    /// enables them when the host needs them.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    emulation_fixups: FixupMode,
}

use hype_daemon::error_chain;

/// Runs a backend subcommand: the error chain on one line, exit 2 for usage errors, 1 for
/// runtime errors.
fn run_backend<E: hype_daemon::CommandError>(name: &str, r: Result<(), E>) -> ExitCode {
    hype_daemon::report_exit(&format!("hype {name}"), r)
}

fn run_vmm(a: VmmArgs) -> ExitCode {
    let mut devices = a.devices;
    for d in &mut devices {
        d.wait.get_or_insert(a.device_wait);
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
        devices,
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
    hype_daemon::init_logging();
    match cli.command {
        Command::Vmm(a) => run_vmm(a),
        Command::Run(a) => hype_vmm::run::run(a),
        Command::BlockMem(a) => run_backend("block-mem", hype_block_mem::run(a)),
        Command::BlockFile(a) => run_backend("block-file", hype_block_file::run(a)),
        Command::BlockHttp(a) => run_backend("block-http", hype_block_http::run(a)),
        Command::NetTap(a) => run_backend("net-tap", hype_net_tap::run(a)),
        Command::Console(a) => run_backend("console", hype_console::dispatch(a)),
        Command::Demo(a) => hype_vmm::demo::demo(a),
    }
}
