//! One vCPU thread's run loop and how each KVM exit is handled.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::pio::{PioBus, PioOutcome};
use crate::memory::GuestMemoryMmap;
use crate::virtio::bus::MmioBus;
use hype_fixups::{self as fixups, Fixups};

/// Why a vCPU stopped running.
#[derive(Debug)]
pub enum VcpuEnd {
    /// Guest reset (i8042 0xFE, or KVM reset event).
    Reset,
    /// Guest shutdown: triple fault or KVM shutdown event.
    Shutdown,
    /// The guest switched itself off (ACPI S5).
    PowerOff,
    /// The VMM asked the vCPU to stop.
    Stopped,
    /// An exit the VMM cannot handle.
    Error(VcpuError),
}

/// Where a vCPU was when it failed.
#[derive(Debug, Clone)]
pub struct FailurePoint {
    /// vCPU index.
    pub vcpu: u8,
    /// Instruction pointer.
    pub rip: u64,
    /// Up to 15 instruction bytes at RIP (empty if unreadable).
    pub bytes: Vec<u8>,
}

impl std::fmt::Display for FailurePoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vCPU {} at RIP {:#x}, bytes [", self.vcpu, self.rip)?;
        if self.bytes.is_empty() {
            write!(f, "unreadable")?;
        }
        for (i, b) in self.bytes.iter().enumerate() {
            write!(f, "{}{b:02x}", if i == 0 { "" } else { " " })?;
        }
        write!(f, "]")
    }
}

/// vCPU failures.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM could not emulate an instruction (and no fix-up applied).
    #[error("KVM_EXIT_INTERNAL_ERROR (suberror {suberror}) on {at}")]
    Internal {
        /// KVM's suberror.
        suberror: u32,
        /// Where.
        at: FailurePoint,
    },
    /// VM entry failed.
    #[error("KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}) on {at}")]
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// Where.
        at: FailurePoint,
    },
    /// Any other exit hype does not handle.
    #[error("unexpected exit {exit} on {at}")]
    Unexpected {
        /// The exit, as text.
        exit: String,
        /// Where.
        at: FailurePoint,
    },
    /// KVM_RUN itself failed.
    #[error("KVM_RUN failed on vCPU {vcpu}")]
    Run {
        /// vCPU index.
        vcpu: u8,
        /// Underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// KVM exits one vCPU handled, by kind (relaxed counters, read by the control API).
#[derive(Debug, Default)]
pub struct ExitStats {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// KVM_RUN interrupted by a signal (kicks for pause and stop).
    pub interrupted: AtomicU64,
    /// Emulation failures handed to the fix-ups.
    pub emulation: AtomicU64,
    /// Every other exit.
    pub other: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Why [`PauseGate::pause`] gave up.
#[derive(Debug, thiserror::Error)]
#[error("{parked} of {total} vCPUs stopped within {waited:?}")]
pub struct PauseTimeout {
    /// vCPUs that did stop.
    pub parked: usize,
    /// vCPUs in all.
    pub total: usize,
    /// How long the pause waited.
    pub waited: Duration,
}

/// Where paused vCPU threads wait. A pause sets the request and kicks the vCPUs out of
/// KVM_RUN until every one of them has parked here; a resume clears it and wakes them.
#[derive(Debug)]
pub struct PauseGate {
    requested: AtomicBool,
    parked: Mutex<Vec<bool>>,
    changed: Condvar,
}

impl PauseGate {
    /// A gate for `cpus` vCPUs, open.
    pub fn new(cpus: usize) -> Self {
        PauseGate {
            requested: AtomicBool::new(false),
            parked: Mutex::new(vec![false; cpus]),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<bool>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a pause is requested.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Whether vCPU `index` is parked now.
    pub fn is_parked(&self, index: usize) -> bool {
        self.lock().get(index).copied().unwrap_or(false)
    }

    /// Called by vCPU `index` between two KVM_RUNs: waits while a pause is requested and
    /// `stop` is not set.
    pub fn park_if_requested(&self, index: usize, stop: &AtomicBool) {
        self.park_if_requested_with(index, stop, || {});
    }

    /// [`PauseGate::park_if_requested`], running `before_park` (on the vCPU's thread) before
    /// the vCPU counts as parked: a pause returns only after every vCPU has run it.
    pub fn park_if_requested_with(
        &self,
        index: usize,
        stop: &AtomicBool,
        before_park: impl FnOnce(),
    ) {
        if !self.is_requested() {
            return;
        }
        before_park();
        let mut g = self.lock();
        if let Some(p) = g.get_mut(index) {
            *p = true;
        }
        self.changed.notify_all();
        while self.is_requested() && !stop.load(Ordering::Acquire) {
            // The timeout lets a stop (which does not use this condvar) end the wait.
            g = match self.changed.wait_timeout(g, Duration::from_millis(20)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        if let Some(p) = g.get_mut(index) {
            *p = false;
        }
        self.changed.notify_all();
    }

    /// Requests a pause and calls `kick` (which must push every vCPU out of KVM_RUN) until all
    /// vCPUs are parked, or `timeout` passes (then the request is withdrawn).
    pub fn pause(&self, kick: impl Fn(), timeout: Duration) -> Result<(), PauseTimeout> {
        self.requested.store(true, Ordering::Release);
        let start = Instant::now();
        loop {
            {
                let g = self.lock();
                let parked = g.iter().filter(|p| **p).count();
                if parked == g.len() {
                    return Ok(());
                }
                if start.elapsed() >= timeout {
                    drop(g);
                    self.resume();
                    return Err(PauseTimeout {
                        parked,
                        total: self.lock().len(),
                        waited: start.elapsed(),
                    });
                }
            }
            // A kick can land just before the vCPU enters KVM_RUN and be lost: repeat it.
            kick();
            let g = self.lock();
            let _ = self.changed.wait_timeout(g, Duration::from_millis(1));
        }
    }

    /// Withdraws the pause request and wakes the parked vCPUs.
    pub fn resume(&self) {
        self.requested.store(false, Ordering::Release);
        let _g = self.lock();
        self.changed.notify_all();
    }
}

/// What every vCPU thread shares.
pub struct VcpuShared {
    /// Port I/O devices.
    pub pio: PioBus,
    /// virtio-mmio devices.
    pub mmio: MmioBus,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Set when all vCPUs must stop.
    pub stop: AtomicBool,
    /// PVM emulation fix-ups.
    pub fixups: Fixups,
    /// Exit counters, by vCPU index.
    pub exits: Vec<ExitStats>,
    /// Where vCPUs wait while the VM is paused.
    pub pause: PauseGate,
    /// Where each vCPU records its state when it parks (for snapshots).
    pub snapshot: crate::snapshot::VcpuSlots,
}

/// Reads the instruction bytes at the vCPU's RIP (linear address through the guest's paging).
pub fn failure_point(vcpu: &VcpuFd, index: u8, mem: &GuestMemoryMmap) -> FailurePoint {
    let (rip, linear) = match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => (r.rip, s.cs.base.wrapping_add(r.rip)),
        (Ok(r), Err(_)) => (r.rip, r.rip),
        _ => {
            return FailurePoint {
                vcpu: index,
                rip: 0,
                bytes: vec![],
            }
        }
    };
    let mut bytes = Vec::with_capacity(15);
    for i in 0..15u64 {
        let Ok(t) = vcpu.translate_gva(linear.wrapping_add(i)) else {
            break;
        };
        if t.valid == 0 {
            break;
        }
        match mem.read_obj::<u8>(GuestAddress(t.physical_address)) {
            Ok(b) => bytes.push(b),
            Err(_) => break,
        }
    }
    FailurePoint {
        vcpu: index,
        rip,
        bytes,
    }
}

enum Step {
    Continue,
    End(VcpuEnd),
    InternalError,
    FailEntry(u64),
    Unexpected(String),
}

/// Runs the vCPU until the guest or the VMM ends it.
pub fn run(mut vcpu: VcpuFd, index: u8, shared: &VcpuShared) -> VcpuEnd {
    if shared.fixups.is_active() {
        // Fix-ups read and write registers through kvm_run instead of ioctls (~3x cheaper).
        vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
    }
    let fallback = ExitStats::default();
    let exits = shared.exits.get(usize::from(index)).unwrap_or(&fallback);
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return VcpuEnd::Stopped;
        }
        shared
            .pause
            .park_if_requested_with(usize::from(index), &shared.stop, || {
                shared.snapshot.capture(usize::from(index), &mut vcpu)
            });
        if shared.stop.load(Ordering::Acquire) {
            return VcpuEnd::Stopped;
        }
        let step = match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    bump(&exits.io_in);
                    shared.pio.read(port, data);
                    Step::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    bump(&exits.io_out);
                    match shared.pio.write(port, data) {
                        PioOutcome::Continue => Step::Continue,
                        PioOutcome::Reset => Step::End(VcpuEnd::Reset),
                        PioOutcome::PowerOff => Step::End(VcpuEnd::PowerOff),
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    bump(&exits.mmio_read);
                    shared.mmio.read(addr, data);
                    Step::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    bump(&exits.mmio_write);
                    shared.mmio.write(addr, data);
                    Step::Continue
                }
                VcpuExit::Shutdown => Step::End(VcpuEnd::Shutdown),
                VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_SHUTDOWN => {
                    Step::End(VcpuEnd::Shutdown)
                }
                VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_RESET => {
                    Step::End(VcpuEnd::Reset)
                }
                VcpuExit::InternalError => {
                    bump(&exits.emulation);
                    Step::InternalError
                }
                VcpuExit::FailEntry(reason, _) => Step::FailEntry(reason),
                VcpuExit::Intr => {
                    bump(&exits.interrupted);
                    Step::Continue
                }
                other => {
                    bump(&exits.other);
                    Step::Unexpected(format!("{other:?}"))
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                bump(&exits.interrupted);
                vcpu.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(source) => Step::End(VcpuEnd::Error(VcpuError::Run {
                vcpu: index,
                source,
            })),
        };
        match step {
            Step::Continue => {}
            Step::End(end) => return end,
            Step::InternalError => {
                if let Some(failure) = fixups::emulation_failure(vcpu.get_kvm_run()) {
                    // Empty bytes: handle() fetches them at RIP itself.
                    let bytes = failure.insn_bytes().to_vec();
                    let handled = {
                        let mut cpu = fixups::KvmVcpuAccess::with_sync_regs(&mut vcpu, &shared.mem);
                        shared.fixups.handle(&mut cpu, &bytes)
                    };
                    match handled {
                        Ok(_) => continue,
                        Err(e) => {
                            log::debug!("vCPU {index}: {}", hype_base::error_chain(&e));
                            let at = failure_point(&vcpu, index, &shared.mem);
                            return VcpuEnd::Error(VcpuError::Internal {
                                suberror: KVM_INTERNAL_ERROR_EMULATION,
                                at,
                            });
                        }
                    }
                }
                // SAFETY: KVM filled the `internal` member of the exit union for
                // KVM_EXIT_INTERNAL_ERROR; `suberror` is a plain integer.
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let at = failure_point(&vcpu, index, &shared.mem);
                return VcpuEnd::Error(VcpuError::Internal { suberror, at });
            }
            Step::FailEntry(reason) => {
                let at = failure_point(&vcpu, index, &shared.mem);
                return VcpuEnd::Error(VcpuError::FailEntry { reason, at });
            }
            Step::Unexpected(exit) => {
                let at = failure_point(&vcpu, index, &shared.mem);
                return VcpuEnd::Error(VcpuError::Unexpected { exit, at });
            }
        }
    }
}
