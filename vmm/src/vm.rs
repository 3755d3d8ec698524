//! Building and running a VM: KVM, memory, irqchip, boot, vCPU threads, and the end of the VM.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::acpi::{AcpiError, AcpiTables, Machine};
use crate::arch::regs::{self, EntryMode};
use crate::arch::{cpuid, mptable};
use crate::boot::{self, BootError, BootSource};
use crate::config::{DeviceSpec, SerialSpec};
use crate::control::{StopReason, VmControl};
use crate::devices::hotplug::HotplugSlots;
use crate::devices::pio::PioBus;
use crate::devices::power::{PowerButton, PowerDevice, GED_GSI};
use crate::devices::serial::{Serial, COM1_IRQ};
use crate::devices::CountedIrq;
use crate::hotplug::Hotplug;
use crate::memory::{self, GuestMemoryMmap, MemoryError, MIN_MEMORY};
use crate::platform::{self, Platform};
use crate::vcpu::{self, VcpuEnd, VcpuError, VcpuShared};
use crate::virtio::bus::{MmioBus, MmioExitCounts};
use crate::virtio::device::DeviceError;
use crate::virtio::{self as virtio_mod, VhostUserDevice};
use hype_api::events::EventKind;
use hype_base::signals;
use hype_base::terminal::{is_tty, EscapeAction, EscapeFilter, RawModeGuard};
use hype_fixups::{FixupMode, Fixups};

/// Command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Most vCPUs hype gives a guest.
pub const MAX_VCPUS: u8 = mptable::MAX_CPUS;

/// Everything needed to start a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// What to boot.
    pub image: BootImage,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub cpus: u8,
    /// UART sink.
    pub serial: SerialSpec,
    /// vhost-user backends (wired up by the transport).
    pub devices: Vec<DeviceSpec>,
    /// PVM emulation fix-ups.
    pub fixups: FixupMode,
    /// Where to serve the control API (`docs/api.md`), if anywhere.
    pub api_socket: Option<PathBuf>,
    /// How the guest learns its CPUs and devices.
    pub platform: Platform,
}

/// The host's handles on a running VM, beyond its configuration.
#[derive(Clone, Debug, Default)]
pub struct VmControls {
    /// The VM's power button (platform acpi): press it from any thread while the VM runs.
    pub power_button: PowerButton,
    /// What SIGTERM/SIGINT/SIGHUP do: `None` stops the VM at once; `Some(t)` presses the power
    /// button first and stops the VM only if the guest has not ended within `t` (or on a second
    /// signal). Needs platform acpi; with mptable the VM stops at once.
    pub graceful_stop: Option<Duration>,
    /// Restore the VM from this snapshot directory (`docs/snapshot.md`) instead of booting:
    /// memory, vCPUs and platform come from the snapshot; the image is not loaded.
    pub restore: Option<PathBuf>,
}

/// A Linux kernel, or a raw program (tests, demos).
#[derive(Clone, Debug)]
pub enum BootImage {
    /// A bzImage or ELF kernel.
    Kernel {
        /// Kernel path.
        kernel: PathBuf,
        /// Initrd path.
        initrd: Option<PathBuf>,
        /// Command line as given (hype may append to it).
        cmdline: String,
    },
    /// Raw code loaded at `load_addr` and entered at `entry` in `mode`.
    Raw {
        /// The code.
        code: Vec<u8>,
        /// Where it goes.
        load_addr: u64,
        /// Entry point (real mode: linear address below 64 KiB, CS = 0).
        entry: u64,
        /// CPU mode.
        mode: RawMode,
    },
}

/// Entry mode for raw programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawMode {
    /// 16-bit real mode.
    Real,
    /// 64-bit long mode with the identity map.
    Long,
}

/// How the VM ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest reset the machine (i8042, reboot).
    Reset,
    /// The guest shut down or triple-faulted.
    Shutdown,
    /// The guest switched itself off (ACPI S5: `poweroff`).
    PowerOff,
    /// Stopped from the host (signal, Ctrl-a x).
    Stopped,
}

/// Errors creating or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm missing or not accessible.
    #[error("cannot open the KVM device (is KVM enabled, and may you open /dev/kvm?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// KVM lacks a needed capability.
    #[error("KVM lacks the {0} capability")]
    KvmCap(&'static str),
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Memory below the minimum.
    #[error("{0} MiB of memory is too little (at least {min} MiB)", min = MIN_MEMORY >> 20)]
    MemoryTooSmall(u64),
    /// Memory above the host's.
    #[error("{req} MiB of memory is more than the host has ({host} MiB)")]
    MemoryTooLarge {
        /// Requested MiB.
        req: u64,
        /// Host MiB.
        host: u64,
    },
    /// Bad vCPU count.
    #[error("{n} vCPUs: hype supports 1 to {max} on this host")]
    Cpus {
        /// Requested.
        n: u64,
        /// Maximum.
        max: u64,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel/initrd/cmdline.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Raw program does not fit.
    #[error("program of {0} bytes does not fit at its load address")]
    RawTooBig(usize),
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// vCPU registers.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// Serial output file.
    #[error("cannot open serial output {path}")]
    SerialFile {
        /// Path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Eventfd/thread/signal setup.
    #[error("{what}")]
    Os {
        /// What failed.
        what: &'static str,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// More `--device`s than hype has windows and interrupt lines for.
    #[error("{0} devices: hype attaches at most {max}", max = virtio_mod::MAX_DEVICES)]
    TooManyDevices(usize),
    /// The sandbox could not be set up.
    #[error(transparent)]
    Sandbox(crate::sandbox::SandboxError),
    /// The control API socket could not be served.
    #[error("control API")]
    Api(#[source] hype_api::server::ServerError),
    /// Taking or restoring a snapshot.
    #[error("snapshot")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// Attaching a `--device` failed. The message gives the position and the name the logs
    /// use; the socket path is named once, by the source.
    #[error("device {index} (virtio{index})")]
    Device {
        /// Position on the command line (0-based).
        index: usize,
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: DeviceError,
    },
}

impl VmmError {
    /// Whether this is the user's input being wrong (exit code 2) rather than a runtime failure.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            VmmError::KvmOpen(_)
                | VmmError::MemoryTooSmall(_)
                | VmmError::MemoryTooLarge { .. }
                | VmmError::Cpus { .. }
                | VmmError::Boot(_)
                | VmmError::RawTooBig(_)
                | VmmError::SerialFile { .. }
                | VmmError::TooManyDevices(_)
                | VmmError::Api(_)
        )
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn os_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Os { what, source }
}

/// Physical RAM of the host in bytes.
pub fn host_memory() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as u64).saturating_mul(size.max(0) as u64)
}

/// Checks memory and vCPU counts that do not need KVM.
pub fn validate(cfg: &VmConfig) -> Result<(), VmmError> {
    if cfg.memory < MIN_MEMORY {
        return Err(VmmError::MemoryTooSmall(cfg.memory >> 20));
    }
    let host = host_memory();
    if host > 0 && cfg.memory > host {
        return Err(VmmError::MemoryTooLarge {
            req: cfg.memory >> 20,
            host: host >> 20,
        });
    }
    if cfg.cpus == 0 || cfg.cpus > MAX_VCPUS {
        return Err(VmmError::Cpus {
            n: u64::from(cfg.cpus),
            max: u64::from(MAX_VCPUS),
        });
    }
    Ok(())
}

/// Environment variable naming the KVM device node (default `/dev/kvm`).
pub const KVM_DEVICE_ENV: &str = "HYPE_KVM_DEVICE";

fn open_kvm() -> Result<Kvm, VmmError> {
    let kvm = match std::env::var_os(KVM_DEVICE_ENV) {
        Some(path) => {
            let path =
                std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
                    .map_err(|_| VmmError::KvmOpen(kvm_ioctls::Error::new(libc::EINVAL)))?;
            Kvm::new_with_path(&path).map_err(VmmError::KvmOpen)?
        }
        None => Kvm::new().map_err(VmmError::KvmOpen)?,
    };
    // A node that opens but does not speak the KVM API (API version 12) is not a KVM device.
    if kvm.get_api_version() != 12 {
        return Err(VmmError::KvmOpen(kvm_ioctls::Error::new(libc::ENOTTY)));
    }
    Ok(kvm)
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_signal_handlers() -> Result<(), VmmError> {
    register_signal_handler(SIGRTMIN(), on_kick).map_err(|e| VmmError::Os {
        what: "cannot install the vCPU kick handler",
        source: e.into(),
    })?;
    // The main loop polls the flag; restarting keeps other threads' blocking calls going.
    signals::install_stop_handler(
        &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP],
        signals::Interrupt::Restart,
    )
    .map_err(os_err("cannot install signal handlers"))
}

fn serial_sink(spec: &SerialSpec) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match spec {
        SerialSpec::Stdio => {
            // SAFETY: dup of stdout returns a new fd we own (checked below).
            let fd = unsafe { libc::dup(libc::STDOUT_FILENO) };
            if fd < 0 {
                return Err(os_err("cannot dup stdout")(std::io::Error::last_os_error()));
            }
            // SAFETY: fd is a fresh descriptor owned by this File.
            Box::new(unsafe { std::fs::File::from_raw_fd(fd) })
        }
        SerialSpec::None => Box::new(std::io::sink()),
        SerialSpec::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

/// Reads stdin into the UART; Ctrl-a x stops the VM, Ctrl-a Ctrl-a sends one Ctrl-a.
fn spawn_stdin_reader(serial: Arc<Mutex<Serial>>, stop_req: Arc<AtomicBool>) {
    let _ = std::thread::Builder::new()
        .name("serial-stdin".into())
        .spawn(move || {
            crate::sandbox::enter(crate::sandbox::Thread::Stdin);
            let mut buf = [0u8; 256];
            let mut escape = EscapeFilter::default();
            loop {
                // SAFETY: reading into a valid buffer of the given length.
                let n =
                    unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    if n < 0
                        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                    {
                        continue;
                    }
                    return;
                }
                let mut out = Vec::with_capacity(n as usize);
                if escape.filter(&buf[..n as usize], &mut out) == EscapeAction::Quit {
                    stop_req.store(true, Ordering::SeqCst);
                    return;
                }
                let mut rest = &out[..];
                while !rest.is_empty() {
                    let took = match serial.lock() {
                        Ok(mut s) => s.enqueue_input(rest),
                        Err(_) => return,
                    };
                    rest = &rest[took..];
                    if !rest.is_empty() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        });
}

/// The outcome of a VM run.
#[derive(Debug)]
pub struct VmOutcome {
    /// How it ended.
    pub end: VmEnd,
    /// Boot markers: (value, time since start).
    pub markers: Vec<(u32, Duration)>,
    /// MMIO exits the vCPUs took.
    pub mmio: MmioExitCounts,
    /// What happened to each virtio device.
    pub devices: Vec<DeviceReport>,
}

/// A virtio device's counters at the end of the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceReport {
    /// Device type.
    pub kind: virtio_mod::DeviceType,
    /// QueueNotify writes that reached userspace.
    pub notify_exits: u64,
    /// Times rings were started on a backend.
    pub ring_starts: u64,
    /// Reconnections to a restarted backend.
    pub reconnects: u64,
    /// Register accesses that made no sense.
    pub guest_errors: u64,
    /// Final device status register.
    pub status: u32,
}

/// Connects every `--device` backend, registers its eventfds with KVM and returns the bus and
/// the command-line entries describing the devices.
fn attach_devices(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    devices: &[DeviceSpec],
    hotplug: &Hotplug,
    restore: Option<&crate::snapshot::Restore>,
) -> Result<(MmioBus, Vec<String>), VmmError> {
    if devices.len() > virtio_mod::MAX_DEVICES {
        return Err(VmmError::TooManyDevices(devices.len()));
    }
    let bus = MmioBus::new();
    let mut cmdline = Vec::new();
    for (index, spec) in devices.iter().enumerate() {
        let base = virtio_mod::device_base(index);
        let gsi = virtio_mod::DEVICE_GSIS[index];
        let dev_err = |source| VmmError::Device {
            index,
            path: spec.socket.clone(),
            source,
        };
        let name = format!("virtio{index}");
        let dev =
            VhostUserDevice::attach(&name, &spec.options(), mem.clone(), None).map_err(dev_err)?;
        crate::hotplug::wire(vm, &dev, base, gsi)
            .map_err(|(what, source)| VmmError::Kvm { what, source })?;
        if let Some(r) = restore {
            r.restore_device(index, &dev)?;
        }
        hotplug.boot_device(index, &spec.socket);
        log::debug!("{name}: window {base:#x}, GSI {gsi}");
        cmdline.push(virtio_mod::cmdline_entry(base, gsi));
        bus.add(base, Arc::new(dev));
    }
    Ok((bus, cmdline))
}

fn device_reports(bus: &MmioBus) -> Vec<DeviceReport> {
    bus.devices()
        .iter()
        .map(|(_, d)| {
            let s = d.stats();
            DeviceReport {
                kind: d.kind(),
                notify_exits: s.notify_exits.load(Ordering::Relaxed),
                ring_starts: s.ring_starts.load(Ordering::Relaxed),
                reconnects: s.reconnects.load(Ordering::Relaxed),
                guest_errors: d.guest_errors(),
                status: d.status(),
            }
        })
        .collect()
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
    for (cap, name) in [
        (Cap::Irqchip, "IRQCHIP"),
        (Cap::Ioeventfd, "IOEVENTFD"),
        (Cap::Irqfd, "IRQFD"),
        (Cap::UserMemory, "USER_MEMORY"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::KvmCap(name));
        }
    }
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_identity_map_address(crate::layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.set_tss_address(crate::layout::KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM's vCPUs
        // (it is kept in the shared vCPU state until every vCPU thread has been joined).
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn load_raw(mem: &GuestMemoryMmap, code: &[u8], load_addr: u64) -> Result<(), VmmError> {
    mem.write_slice(code, GuestAddress(load_addr))
        .map_err(|_| VmmError::RawTooBig(code.len()))
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
struct BootEntry {
    mode: EntryMode,
    rip: u64,
    /// boot_params (RSI) or hvm_start_info (EBX).
    boot_info: u64,
    stack: u64,
}

fn setup_vcpu(
    vm: &VmFd,
    supported: &kvm_bindings::CpuId,
    index: u8,
    count: u8,
    boot: Option<BootEntry>,
) -> Result<VcpuFd, VmmError> {
    let vcpu = vm
        .create_vcpu(u64::from(index))
        .map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let mut ids = supported.clone();
    cpuid::filter(ids.as_mut_slice(), index, count);
    vcpu.set_cpuid2(&ids).map_err(kvm_err("KVM_SET_CPUID2"))?;
    regs::setup_msrs(&vcpu)?;
    regs::setup_fpu(&vcpu)?;
    regs::setup_lapic(&vcpu)?;
    if let Some(b) = boot {
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let mut sregs = regs::entry_sregs(sregs, b.mode);
        if b.mode == EntryMode::Real {
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
        }
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs::entry_regs(b.mode, b.rip, b.boot_info, b.stack))
            .map_err(kvm_err("KVM_SET_REGS"))?;
    }
    Ok(vcpu)
}

/// Loads what `cfg.image` names into guest memory; returns where the boot vCPU starts. A kernel's
/// command line gets the device descriptions and, on PVM hosts, the fix-ups' additions.
fn load_image(
    cfg: &VmConfig,
    mem: &GuestMemoryMmap,
    device_cmdline: &[String],
    fixups: &Fixups,
    rsdp: Option<u64>,
) -> Result<BootEntry, VmmError> {
    match &cfg.image {
        BootImage::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            let mut cmdline = cmdline.clone();
            for entry in device_cmdline {
                cmdline.push(' ');
                cmdline.push_str(entry);
            }
            if fixups.is_active() {
                for extra in fixups.guest_cmdline_additions() {
                    if !cmdline.split_whitespace().any(|w| w == *extra) {
                        cmdline.push(' ');
                        cmdline.push_str(extra);
                    }
                }
            }
            let src = BootSource {
                kernel,
                initrd: initrd.as_deref(),
                cmdline: &cmdline,
                rsdp,
            };
            let setup = boot::load(mem, cfg.memory, &src)?;
            log::debug!(
                "boot: {:?} entry {:#x}, command line: {cmdline}",
                setup.protocol,
                setup.entry
            );
            Ok(BootEntry {
                mode: setup.mode,
                rip: setup.entry,
                boot_info: setup.boot_info,
                stack: setup.stack,
            })
        }
        BootImage::Raw {
            code,
            load_addr,
            entry,
            mode,
        } => {
            load_raw(mem, code, *load_addr)?;
            regs::write_descriptor_tables(mem)?;
            let (mode, stack) = match mode {
                RawMode::Real => (EntryMode::Real, 0),
                RawMode::Long => {
                    let cr3 = crate::arch::paging::write_identity_map(mem)
                        .map_err(BootError::GuestWrite)?;
                    (EntryMode::Long64 { cr3 }, crate::layout::BOOT_STACK_POINTER)
                }
            };
            Ok(BootEntry {
                mode,
                rip: *entry,
                boot_info: 0,
                stack,
            })
        }
    }
}

/// The CPUID table every vCPU starts from (filtered per vCPU later).
fn guest_cpuid(kvm: &Kvm, fixups: &Fixups) -> Result<kvm_bindings::CpuId, VmmError> {
    let mut supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    if fixups.is_active() {
        // See cpuid::PVM_HIDDEN_KVM_FEATURES: hypercalls never return for emulated guests.
        cpuid::hide_kvm_features(supported.as_mut_slice(), cpuid::PVM_HIDDEN_KVM_FEATURES);
        log::debug!("PVM host: KVM PV IPIs, PV sched yield and PV unhalt hidden from the guest");
    }
    Ok(supported)
}

/// Waits for the first vCPU to end, or for a stop request from the host (signal, Ctrl-a x,
/// the control API). With `graceful` set, the first signal presses `button` and the VM gets
/// that long to end by itself; a second signal or the deadline stops it.
fn wait_for_end(
    rx: &mpsc::Receiver<(u8, VcpuEnd)>,
    stop_req: &AtomicBool,
    control: &VmControl,
    button: &PowerButton,
    graceful: Option<Duration>,
) -> Option<(u8, VcpuEnd)> {
    let mut deadline: Option<Instant> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(ev) => return Some(ev),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if stop_req.load(Ordering::SeqCst) {
                    return None;
                }
                match control.stop_due() {
                    Some(StopReason::Requested) => return None,
                    Some(StopReason::ShutdownTimeout(t)) => {
                        log::warn!("shutdown: the guest still runs after {t:?}; forced stop");
                        control.record_event(EventKind::StopRequested, None);
                        return None;
                    }
                    None => {}
                }
                let signals = signals::stop_count();
                if signals == 0 {
                    continue;
                }
                match (graceful, deadline) {
                    (Some(t), None) if signals == 1 => match button.press() {
                        Ok(()) => {
                            log::info!(
                                "stop signal: power button pressed, the guest has {:.1} s to \
                                 power off",
                                t.as_secs_f64()
                            );
                            deadline = Some(Instant::now() + t);
                            control.record_event(
                                EventKind::ShutdownRequested,
                                Some(format!(
                                    "stop signal: power button pressed; stop in {} ms",
                                    t.as_millis()
                                )),
                            );
                        }
                        Err(e) => {
                            log::info!("stop signal: {e}; stopping the VM");
                            return None;
                        }
                    },
                    (Some(_), Some(d)) if signals == 1 && Instant::now() < d => {}
                    (Some(_), Some(_)) if signals == 1 => {
                        log::warn!("the guest did not power off in time: stopping the VM");
                        return None;
                    }
                    _ => return None,
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return None,
        }
    }
}

/// Stops every vCPU thread and joins it.
fn stop_vcpus(shared: &VcpuShared, handles: Vec<std::thread::JoinHandle<()>>) {
    shared.stop.store(true, Ordering::Release);
    // Kick every vCPU out of KVM_RUN until all threads are gone; a kick can race with the
    // thread entering KVM_RUN, so repeat it.
    while handles.iter().any(|h| !h.is_finished()) {
        for h in handles.iter().filter(|h| !h.is_finished()) {
            let _ = h.kill(SIGRTMIN());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    for h in handles {
        let _ = h.join();
    }
}

/// Creates the VM described by `cfg` and runs it to its end.
pub fn run(cfg: &VmConfig) -> Result<VmOutcome, VmmError> {
    run_with(cfg, &VmControls::default())
}

/// The ACPI tables `cfg` gets (`None` for the mptable platform).
pub fn acpi_tables(cfg: &VmConfig) -> Result<Option<AcpiTables>, VmmError> {
    if cfg.devices.len() > virtio_mod::MAX_DEVICES {
        return Err(VmmError::TooManyDevices(cfg.devices.len()));
    }
    match cfg.platform {
        Platform::Acpi => Ok(Some(AcpiTables::build(&Machine::for_vm(
            cfg.cpus,
            cfg.devices.len(),
        ))?)),
        Platform::Mptable => Ok(None),
    }
}

/// [`run`], with the host's handles on the VM: press `controls.power_button` from another
/// thread to ask the guest to shut down.
pub fn run_with(cfg: &VmConfig, controls: &VmControls) -> Result<VmOutcome, VmmError> {
    let started = Instant::now();
    let kvm = open_kvm()?;
    let fixups = Fixups::new(cfg.fixups);
    let supported = guest_cpuid(&kvm, &fixups)?;
    let host_cpu = crate::snapshot::CpuIdentity::from_cpuid(&supported);
    // A snapshot is checked whole before anything of the VM exists.
    let restore = match &controls.restore {
        Some(dir) => Some(crate::snapshot::Restore::open(dir, &host_cpu)?),
        None => None,
    };
    let restored_cfg;
    let cfg = match &restore {
        Some(r) => {
            restored_cfg = r.config_for(cfg)?;
            &restored_cfg
        }
        None => cfg,
    };
    validate(cfg)?;
    let max = kvm.get_max_vcpus().min(usize::from(MAX_VCPUS));
    if usize::from(cfg.cpus) > max {
        return Err(VmmError::Cpus {
            n: u64::from(cfg.cpus),
            max: max as u64,
        });
    }
    let vm = Arc::new(create_vm(&kvm)?);
    let mem = match &restore {
        Some(r) => r.memory()?,
        None => memory::create_guest_memory(cfg.memory)?,
    };
    register_memory(&vm, &mem)?;
    let slots = Arc::new(HotplugSlots::new());
    let hotplug = Hotplug::new(vm.clone(), mem.clone(), slots.clone());
    let acpi = acpi_tables(cfg)?;
    // --user: KVM, the VM and its memory exist and no thread runs yet (docs/sandbox.md).
    crate::sandbox::drop_privileges().map_err(VmmError::Sandbox)?;
    // Stop signals count from here: SIGTERM while waiting for a backend socket is a stop.
    install_signal_handlers()?;
    let (mmio, mut device_cmdline) =
        match attach_devices(&vm, &mem, &cfg.devices, &hotplug, restore.as_ref()) {
            Err(VmmError::Device {
                source:
                    DeviceError::Frontend(crate::virtio::frontend::FrontendError::Stopped { .. }),
                ..
            }) => {
                log::info!("stopped from the host while waiting for a backend");
                return Ok(VmOutcome {
                    end: VmEnd::Stopped,
                    markers: Vec::new(),
                    mmio: MmioExitCounts::default(),
                    devices: Vec::new(),
                });
            }
            other => other?,
        };
    if acpi.is_some() {
        // The DSDT describes the devices: never describe them twice.
        device_cmdline.clear();
        if let BootImage::Kernel { cmdline, .. } = &cfg.image {
            if platform::cmdline_has_devices(cmdline) {
                log::warn!(
                    "the command line has virtio_mmio.device= entries and the ACPI tables \
                     describe the devices too: the guest may probe them twice"
                );
            }
        }
    }
    let rsdp = acpi.as_ref().map(AcpiTables::rsdp_addr);
    let boot = match &restore {
        Some(_) => None,
        None => Some(load_image(cfg, &mem, &device_cmdline, &fixups, rsdp)?),
    };
    fixups.announce();

    if fixups.is_active() && cfg.cpus > 1 {
        log::warn!(
            "PVM host: with {} vCPUs a busy host can show guest processes stale memory \
             mappings after they move between vCPUs (a known PVM issue, see README)",
            cfg.cpus
        );
    }
    let (signature, features) = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 1)
        .map(|e| (e.eax, e.edx))
        .unwrap_or((0x600, 0x201));
    match (&acpi, &restore) {
        // The snapshot's memory holds the tables the guest was booted with.
        (_, Some(_)) => {}
        (Some(tables), None) => tables.write(&mem)?,
        (None, None) => mptable::write(&mem, cfg.cpus, signature, features)?,
    }

    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("cannot create eventfd"))?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD"))?;
    let serial_irqs = Arc::new(AtomicU64::new(0));
    let serial = Arc::new(Mutex::new(Serial::new(
        serial_sink(&cfg.serial)?,
        Box::new(CountedIrq::new(serial_irq, serial_irqs.clone())),
    )));

    if acpi.is_some() {
        // The slots tell the guest through the GED (its _EVT reads the slot registers).
        slots.set_notifier(Box::new(controls.power_button.hotplug_line()));
    }
    let mut pio = PioBus::new(serial.clone(), started).with_hotplug(slots.clone());
    if acpi.is_some() {
        let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("cannot create eventfd"))?;
        vm.register_irqfd(&ged_irq, GED_GSI)
            .map_err(kvm_err("KVM_IRQFD"))?;
        pio = pio.with_power(PowerDevice::new(
            controls.power_button.clone(),
            Box::new(ged_irq),
        ));
    }

    let mut vcpus = Vec::with_capacity(usize::from(cfg.cpus));
    for i in 0..cfg.cpus {
        vcpus.push(setup_vcpu(
            &vm,
            &supported,
            i,
            cfg.cpus,
            if i == 0 { boot } else { None },
        )?);
    }
    if let Some(r) = &restore {
        // Only the legacy 4 KiB XSAVE area is saved; KVM_CAP_XSAVE2 says whether KVM wants more.
        let xsave_fits = kvm.check_extension_int(Cap::Xsave2) <= 4096;
        for (i, vcpu) in vcpus.iter().enumerate() {
            r.restore_vcpu(vcpu, i, xsave_fits)?;
        }
        crate::snapshot::state::restore_vm(&vm, &r.vm)
            .map_err(crate::snapshot::SnapshotError::from)?;
        if let Ok(mut s) = serial.lock() {
            s.restore_state(&r.manifest.serial);
        }
        if acpi.is_some() {
            controls.power_button.restore_events(r.manifest.ged_events);
        }
        slots.restore_inserted(r.manifest.hotplug_inserted);
        for (_, d) in mmio.devices() {
            d.start_restored();
        }
        log::info!(
            "restored from {} in {:.1} ms",
            r.dir.display(),
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
    let msr_indices = kvm
        .get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .unwrap_or_default();

    crate::sandbox::restrict_files().map_err(VmmError::Sandbox)?;
    install_signal_handlers()?;
    let stop_req = Arc::new(AtomicBool::new(false));
    let raw_guard = if cfg.serial == SerialSpec::Stdio {
        spawn_stdin_reader(serial.clone(), stop_req.clone());
        if is_tty(libc::STDIN_FILENO) {
            RawModeGuard::keeping_output_processing(libc::STDIN_FILENO).ok()
        } else {
            None
        }
    } else {
        None
    };

    let shared = Arc::new(VcpuShared {
        pio,
        mmio,
        mem: mem.clone(),
        stop: AtomicBool::new(false),
        fixups,
        exits: (0..cfg.cpus).map(|_| Default::default()).collect(),
        pause: vcpu::PauseGate::new(usize::from(cfg.cpus)),
        snapshot: crate::snapshot::VcpuSlots::new(usize::from(cfg.cpus), msr_indices),
    });
    let (tx, rx) = mpsc::channel::<(u8, VcpuEnd)>();
    let mut handles = Vec::with_capacity(vcpus.len());
    for (i, vcpu) in vcpus.into_iter().enumerate() {
        let shared = shared.clone();
        let tx = tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || {
                crate::sandbox::enter(crate::sandbox::Thread::Vcpu);
                let end = vcpu::run(vcpu, i as u8, &shared);
                let _ = tx.send((i as u8, end));
            })
            .map_err(os_err("cannot start vCPU thread"))?;
        handles.push(h);
    }
    drop(tx);

    // The control API's shutdown presses the ACPI power button (none with platform mptable).
    let power_button: Option<crate::control::PowerButton> = acpi.as_ref().map(|_| {
        let button = controls.power_button.clone();
        Box::new(move || button.press().is_ok()) as crate::control::PowerButton
    });
    let control = Arc::new(VmControl::new(
        cfg,
        started,
        shared.clone(),
        power_button,
        serial_irqs,
        hotplug,
    ));
    control.set_vcpu_threads(handles.iter().map(|h| h.as_pthread_t()).collect());
    control.set_snapshotter(crate::snapshot::Snapshotter {
        vm: vm.clone(),
        mem: mem.clone(),
        memory_bytes: cfg.memory,
        cpus: cfg.cpus,
        platform: cfg.platform.name().to_owned(),
        cpu: host_cpu,
        serial: serial.clone(),
        power: acpi.as_ref().map(|_| controls.power_button.clone()),
        slots: slots.clone(),
    });
    let api = match &cfg.api_socket {
        Some(path) => match hype_api::ApiServer::start(path, control.clone()) {
            Ok(s) => Some(s),
            Err(e) => {
                control.forget_vcpu_threads();
                stop_vcpus(&shared, handles);
                drop(raw_guard);
                return Err(VmmError::Api(e));
            }
        },
        None => None,
    };

    let graceful = controls.graceful_stop.filter(|_| acpi.is_some());
    crate::sandbox::enter(crate::sandbox::Thread::Main);
    let first = wait_for_end(&rx, &stop_req, &control, &controls.power_button, graceful);
    match &first {
        Some((_, VcpuEnd::PowerOff)) => control.record_event(EventKind::GuestPoweredOff, None),
        Some((_, VcpuEnd::Reset)) => control.record_event(EventKind::GuestReset, None),
        _ => {}
    }
    control.forget_vcpu_threads();
    stop_vcpus(&shared, handles);
    for (_, d) in shared.mmio.devices() {
        d.shut_down();
    }
    if let Some(api) = api {
        // Lets the answer to a stop or shutdown request reach its client.
        api.close(Duration::from_millis(500));
    }
    if let Ok(mut s) = serial.lock() {
        s.flush();
    }
    drop(raw_guard);
    shared.fixups.log_summary();
    let end = match first {
        Some((i, VcpuEnd::Error(e))) => {
            log::debug!("vCPU {i} failed");
            return Err(e.into());
        }
        Some((i, VcpuEnd::Reset)) => {
            log::info!("guest reset (vCPU {i}): VM ends");
            VmEnd::Reset
        }
        Some((i, VcpuEnd::PowerOff)) => {
            log::info!("guest powered off (vCPU {i}): VM ends");
            VmEnd::PowerOff
        }
        Some((i, VcpuEnd::Shutdown)) => {
            log::info!("guest shut down or triple-faulted (vCPU {i}): VM ends");
            VmEnd::Shutdown
        }
        Some((_, VcpuEnd::Stopped)) | None => {
            log::info!("VM stopped from the host");
            VmEnd::Stopped
        }
    };
    Ok(VmOutcome {
        end,
        markers: shared.pio.markers(),
        mmio: shared.mmio.counts(),
        devices: device_reports(&shared.mmio),
    })
}
