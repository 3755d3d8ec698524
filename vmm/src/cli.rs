//! `hype vmm`'s command line: the arguments, and running a VM from them. Shared by the
//! multi-call `hype` binary and the VMM-only `hype-vmm` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::{parse_memory, parse_wait, DeviceSpec, SerialSpec};
use crate::platform::Platform;
use crate::virtio::WaitLimit;
use crate::vm::{self, BootImage, VmConfig, VmControls, DEFAULT_CMDLINE};
use hype_fixups::FixupMode;

/// The arguments of `hype vmm`.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
#[command(after_help = "Examples:
  hype vmm --kernel vmlinux --initrd initramfs.cpio --cmdline 'console=ttyS0' --memory 512M --cpus 2
  hype vmm --kernel bzImage --serial file:/tmp/console.log --device /run/disk0.sock
  hype vmm --kernel vmlinux --device blk:/run/third-party.sock
  hype vmm --kernel vmlinux --serial none --api-socket /run/vm.api
  hype vmm --cpus 2 --device /run/disk0.sock --dump-acpi /tmp/tables   (then: iasl -d /tmp/tables/dsdt.dat)

Press Ctrl-a x to stop the VM from the serial console (Ctrl-a Ctrl-a sends Ctrl-a).
A guest write to I/O port 0x440 is logged with the time since start (boot-time marker).
Logging: HYPE_LOG=debug (or RUST_LOG).")]
pub struct VmmArgs {
    /// Kernel image: a bzImage, or an ELF vmlinux (booted through PVH when it has the PVH note).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["dump_acpi", "restore"])]
    pub kernel: Option<PathBuf>,
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
    /// How the guest learns its CPUs and devices: acpi (ACPI tables; poweroff ends the VM), or
    /// mptable (MP table + virtio_mmio.device= on the command line, for kernels without ACPI).
    #[arg(long, value_name = "PLATFORM", default_value = "acpi")]
    pub platform: Platform,
    /// On SIGTERM/SIGINT/SIGHUP press the guest's ACPI power button first and stop the VM only
    /// if it has not powered off after DURATION (e.g. 30s) or on a second signal. Default: stop
    /// at once.
    #[arg(long, value_name = "DURATION", value_parser = parse_graceful)]
    pub graceful_stop: Option<std::time::Duration>,
    /// Write the ACPI tables this VM would get (rsdp.dat, xsdt.dat, facp.dat, apic.dat,
    /// dsdt.dat) into DIR and exit without starting it. Uses --cpus and the number of --device.
    #[arg(long, value_name = "DIR")]
    pub dump_acpi: Option<PathBuf>,
    /// The sandbox (docs/sandbox.md): `--sandbox on|off`, `--print-sandbox`,
    /// `--sandbox-allow DIR`.
    #[command(flatten)]
    pub sandbox: crate::sandbox::VmmSandboxArgs,
    /// Restore the VM from a snapshot directory (written by `PUT /vm/snapshot`, `hype ctl
    /// snapshot`) instead of booting: memory, vCPUs and platform come from the snapshot, the
    /// guest continues where it was paused. --kernel is not needed (docs/snapshot.md).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "dump_acpi"])]
    pub restore: Option<PathBuf>,
}

fn parse_graceful(s: &str) -> Result<std::time::Duration, String> {
    match parse_wait(s)? {
        WaitLimit::For(d) => Ok(d),
        WaitLimit::Forever => Err("--graceful-stop needs a duration, not forever".into()),
    }
}

/// `--dump-acpi`: writes the tables and exits.
fn dump_acpi(cfg: &VmConfig, dir: &std::path::Path) -> ExitCode {
    let r = vm::validate(cfg).and_then(|()| vm::acpi_tables(cfg));
    let written = match r {
        Ok(Some(tables)) => tables.dump(dir).map_err(vm::VmmError::from),
        Ok(None) => {
            eprintln!("hype: --dump-acpi needs --platform acpi");
            return ExitCode::from(2);
        }
        Err(e) => Err(e),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hype: {}", hype_base::error_chain(&e));
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}

/// Runs the VM `a` describes; errors become one line on stderr (`hype: ...`), exit code 2 for
/// usage errors and 1 for runtime errors.
pub fn run(a: VmmArgs) -> ExitCode {
    if let Err(e) = crate::config::check_devices(&a.devices) {
        eprintln!("hype: {e}");
        return ExitCode::from(2);
    }
    let mut devices = a.devices;
    for d in &mut devices {
        d.wait.get_or_insert(a.device_wait);
    }
    let cfg = VmConfig {
        image: BootImage::Kernel {
            kernel: a.kernel.unwrap_or_default(),
            initrd: a.initrd,
            cmdline: a.cmdline,
        },
        memory: a.memory,
        cpus: a.cpus,
        serial: a.serial,
        devices,
        fixups: a.emulation_fixups,
        api_socket: a.api_socket,
        platform: a.platform,
    };
    if a.sandbox.common.print_sandbox {
        print!(
            "{}",
            crate::sandbox::describe(&a.sandbox, &cfg, a.dump_acpi.as_deref())
        );
        return ExitCode::SUCCESS;
    }
    if let Err(e) = crate::sandbox::prepare(&a.sandbox, &cfg, a.dump_acpi.as_deref()) {
        eprintln!("hype: {}", hype_base::error_chain(&e));
        return ExitCode::from(1);
    }
    if let Some(dir) = &a.dump_acpi {
        return dump_acpi(&cfg, dir);
    }
    let controls = VmControls {
        graceful_stop: a.graceful_stop,
        restore: a.restore,
        ..Default::default()
    };
    match vm::run_with(&cfg, &controls) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hype: {}", hype_base::error_chain(&e));
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}
