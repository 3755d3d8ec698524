//! `hype vmm`'s command line: the arguments, and running a VM from them. Shared by the
//! multi-call `hype` binary and the VMM-only `hype-vmm` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::{parse_memory, parse_wait, DeviceSpec, SerialSpec};
use crate::virtio::WaitLimit;
use crate::vm::{self, BootImage, VmConfig, DEFAULT_CMDLINE};
use hype_fixups::FixupMode;

/// The arguments of `hype vmm`.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
#[command(after_help = "Examples:
  hype vmm --kernel vmlinux --initrd initramfs.cpio --cmdline 'console=ttyS0' --memory 512M --cpus 2
  hype vmm --kernel bzImage --serial file:/tmp/console.log --device /run/disk0.sock
  hype vmm --kernel vmlinux --device blk:/run/third-party.sock
  hype vmm --kernel vmlinux --serial none --api-socket /run/vm.api

Press Ctrl-a x to stop the VM from the serial console (Ctrl-a Ctrl-a sends Ctrl-a).
A guest write to I/O port 0x440 is logged with the time since start (boot-time marker).
Logging: HYPE_LOG=debug (or RUST_LOG).")]
pub struct VmmArgs {
    /// Kernel image: a bzImage, or an ELF vmlinux (booted through PVH when it has the PVH note).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk (cpio, optionally compressed if the kernel can decompress it).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest memory: a number with an optional K/M/G suffix (a bare number is MiB).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_memory)]
    pub memory: u64,
    /// Number of vCPUs (1 to 254).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u8,
    /// Serial console (COM1): stdio, none, or file:PATH.
    #[arg(long, value_name = "SINK", default_value = "stdio")]
    pub serial: SerialSpec,
    /// A vhost-user backend to attach as a virtio-mmio device: PATH (type learned from the
    /// backend), TYPE:PATH (blk, net, console), or PATH,key=value,... with keys type, queues,
    /// queue-size, wait, reconnect-timeout (see docs/devices.md). Repeatable.
    #[arg(long = "device", value_name = "SPEC")]
    pub devices: Vec<DeviceSpec>,
    /// How long to wait for a --device socket that is not there yet: forever, or e.g. 500ms,
    /// 10s, 2m. A device's own wait=... overrides it.
    #[arg(long, value_name = "DURATION", default_value = "forever", value_parser = parse_wait)]
    pub device_wait: WaitLimit,
    /// Userspace fix-ups for instructions an emulating KVM (PVM hosts) cannot run: auto
    /// enables them when the host needs them.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub emulation_fixups: FixupMode,
    /// Serve the control API (HTTP/1.1 + JSON, docs/api.md) on this Unix socket, mode 0600.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
}

/// Runs the VM `a` describes; errors become one line on stderr (`hype: ...`), exit code 2 for
/// usage errors and 1 for runtime errors.
pub fn run(a: VmmArgs) -> ExitCode {
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
        api_socket: a.api_socket,
    };
    match vm::run(&cfg) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hype: {}", hype_base::error_chain(&e));
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}
