//! One vCPU thread's run loop and how each KVM exit is handled.

use std::sync::atomic::{AtomicBool, Ordering};

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
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return VcpuEnd::Stopped;
        }
        let step = match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    shared.pio.read(port, data);
                    Step::Continue
                }
                VcpuExit::IoOut(port, data) => match shared.pio.write(port, data) {
                    PioOutcome::Continue => Step::Continue,
                    PioOutcome::Reset => Step::End(VcpuEnd::Reset),
                    PioOutcome::PowerOff => Step::End(VcpuEnd::PowerOff),
                },
                VcpuExit::MmioRead(addr, data) => {
                    shared.mmio.read(addr, data);
                    Step::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
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
                VcpuExit::InternalError => Step::InternalError,
                VcpuExit::FailEntry(reason, _) => Step::FailEntry(reason),
                VcpuExit::Intr => Step::Continue,
                other => Step::Unexpected(format!("{other:?}")),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
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
