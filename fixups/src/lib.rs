//! PVM emulation fix-ups.
//!
//! On hosts whose `/dev/kvm` is PVM (see [`host_needs_fixups`]) an ordinary guest kernel runs
//! under an in-kernel instruction emulator that gives up on a few instructions:
//! `KVM_RUN` returns `KVM_EXIT_INTERNAL_ERROR` with suberror `KVM_INTERNAL_ERROR_EMULATION`.
//! This crate completes those instructions from userspace so that `KVM_RUN` can go on:
//!
//! | fix-up | bytes | what is done |
//! |---|---|---|
//! | `clac` | `0f 01 ca` | RFLAGS.AC cleared, RIP += 3 (#UD outside CPL 0) |
//! | `stac` | `0f 01 cb` | RFLAGS.AC set, RIP += 3 (#UD outside CPL 0) |
//! | `syscall` | `0f 01 ca` in a recognised state | half-done SYSCALL completed (module `syscall` documents the state) |
//! | `popcnt` | `f3 [rex] 0f b8 /r`, register form | result and flags computed, RIP skipped |
//! | `fwait` | `9b` | RIP += 1 (#NM / #MF when hardware would raise them) |
//! | `int3` | `cc` | RIP += 1, #BP injected |
//! | `cmpxchg16b` | `[f0] rex.w 0f c7 /1`, memory form | locked compare-exchange on the host mapping, ZF and RDX:RAX set, RIP skipped (#GP/#SS/#PF when hardware would raise them) |
//! | `ldmxcsr` | `[rex] 0f ae /2`, memory form | MXCSR loaded from guest memory into the vCPU's XSAVE state, RIP skipped (#UD/#NM/#GP/#SS/#PF/#AC when hardware would raise them) |
//! | `stmxcsr` | `[rex] 0f ae /3`, memory form | MXCSR stored to guest memory, RIP skipped (same faults) |
//! | `fxsave` | `[rex.w] 0f ae /0`, memory form | x87/SSE state stored as an FXSAVE image (32- or 64-bit layout), RIP skipped (#NM/#GP/#SS/#PF) |
//! | `fxrstor` | `[rex.w] 0f ae /1`, memory form | x87/SSE state loaded from an FXSAVE image, RIP skipped (#NM/#GP/#SS/#PF) |
//!
//! Each instruction is decoded from the bytes KVM reports and checked against the vCPU state
//! before anything is changed; anything else stays an error ([`FixupError`]) carrying RIP and the
//! bytes. Hits are counted per fix-up ([`Fixups::summary`] for the exit log) and logged at debug
//! level as they happen, rate-limited.
//!
//! The vCPU run loop calls, on `VcpuExit::InternalError`:
//! ```ignore
//! // Once per vCPU, before the first KVM_RUN (optional, makes a fix-up ~3x cheaper on PVM):
//! vcpu_fd.set_sync_valid_reg(SyncReg::Register);
//! vcpu_fd.set_sync_valid_reg(SyncReg::SystemRegister);
//! // On each VcpuExit::InternalError:
//! if let Some(failure) = fixups::emulation_failure(vcpu_fd.get_kvm_run()) {
//!     let bytes = failure.insn_bytes().to_vec(); // empty: handle() fetches them at RIP
//!     let mut cpu = fixups::KvmVcpuAccess::with_sync_regs(&mut vcpu_fd, &guest_mem);
//!     // (or KvmVcpuAccess::new(&vcpu_fd, &guest_mem) to use plain ioctls)
//!     match fixups.handle(&mut cpu, &bytes) {
//!         Ok(_) => continue,              // run the vCPU again
//!         Err(e) => return Err(e.into()), // clean error: RIP and bytes in the message
//!     }
//! }
//! ```
//! At start-up: `Fixups::new(mode)`, append [`Fixups::guest_cmdline_additions`] to the kernel
//! command line, [`Fixups::announce`]; at exit: [`Fixups::log_summary`].
//!
//! May depend on: kvm-ioctls, kvm-bindings, vm-memory, `hype-base` (its log limit). It knows nothing of the rest of the VMM:
//! the vCPU loop calls it through [`Fixups::handle`].

mod decode;
mod error;
mod fx;
mod host;
mod host_atomic;
mod insn;
mod kvm_access;
mod page_walk;
mod stats;
mod syscall;
mod vcpu;

#[cfg(test)]
mod fake_vcpu;
#[cfg(test)]
mod fx_tests;
#[cfg(test)]
mod kvm_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

pub use decode::{decode, CpuMode, FxOp, Insn, MemOperand, OperandSize, SegmentBase, MAX_INSN_LEN};
pub use error::{FixupError, InsnBytes};
pub use host::{host_needs_fixups, pvm_module_loaded, PVM_MODULE, SYS_MODULE_DIR};
pub use kvm_access::{emulation_failure, prepare_for_sandbox, EmulationFailure, KvmVcpuAccess};
pub use page_walk::{AccessKind, DataAccess};
pub use vcpu::{
    cpl, cpu_mode, FxImage, VcpuAccess, VcpuError, X87State, FXSAVE_SIZE, MSR_CSTAR, MSR_EFER,
    MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK,
};

use stats::{should_log, Stats};

/// The `--emulation-fixups` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FixupMode {
    /// On when the host needs them ([`host_needs_fixups`]).
    #[default]
    Auto,
    /// Always on.
    On,
    /// Always off: every emulation failure is an error.
    Off,
}

impl FixupMode {
    /// The command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FixupMode::Auto => "auto",
            FixupMode::On => "on",
            FixupMode::Off => "off",
        }
    }
}

impl fmt::Display for FixupMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown `--emulation-fixups` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid emulation fix-up mode {0:?}: expected auto, on or off")]
pub struct ParseFixupModeError(pub String);

impl FromStr for FixupMode {
    type Err = ParseFixupModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(FixupMode::Auto),
            "on" => Ok(FixupMode::On),
            "off" => Ok(FixupMode::Off),
            _ => Err(ParseFixupModeError(s.to_string())),
        }
    }
}

/// One kind of fix-up, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fixup {
    /// `clac` completed (or #UD raised outside CPL 0).
    Clac,
    /// `stac` completed (or #UD raised outside CPL 0).
    Stac,
    /// A half-done SYSCALL completed (found at the #PF handler's `clac`).
    Syscall,
    /// `popcnt reg, reg` computed.
    Popcnt,
    /// `fwait` skipped (or #NM/#MF raised).
    Fwait,
    /// `int3` turned into an injected #BP.
    Int3,
    /// `cmpxchg16b m128` completed atomically (or #GP/#SS/#PF raised).
    Cmpxchg16b,
    /// `ldmxcsr m32` completed (or the exception hardware raises injected).
    Ldmxcsr,
    /// `stmxcsr m32` completed (or the exception injected).
    Stmxcsr,
    /// `fxsave m512` completed (or the exception injected).
    Fxsave,
    /// `fxrstor m512` completed (or the exception injected).
    Fxrstor,
}

impl Fixup {
    /// Every fix-up, in summary order.
    pub const ALL: [Fixup; 11] = [
        Fixup::Clac,
        Fixup::Stac,
        Fixup::Syscall,
        Fixup::Popcnt,
        Fixup::Fwait,
        Fixup::Int3,
        Fixup::Cmpxchg16b,
        Fixup::Ldmxcsr,
        Fixup::Stmxcsr,
        Fixup::Fxsave,
        Fixup::Fxrstor,
    ];

    /// Short name, as logged.
    pub fn name(self) -> &'static str {
        match self {
            Fixup::Clac => "clac",
            Fixup::Stac => "stac",
            Fixup::Syscall => "syscall",
            Fixup::Popcnt => "popcnt",
            Fixup::Fwait => "fwait",
            Fixup::Int3 => "int3",
            Fixup::Cmpxchg16b => "cmpxchg16b",
            Fixup::Ldmxcsr => "ldmxcsr",
            Fixup::Stmxcsr => "stmxcsr",
            Fixup::Fxsave => "fxsave",
            Fixup::Fxrstor => "fxrstor",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn of(insn: Insn) -> Fixup {
        match insn {
            Insn::Clac => Fixup::Clac,
            Insn::Stac => Fixup::Stac,
            Insn::Popcnt { .. } => Fixup::Popcnt,
            Insn::Fwait => Fixup::Fwait,
            Insn::Int3 => Fixup::Int3,
            Insn::Cmpxchg16b { .. } => Fixup::Cmpxchg16b,
            Insn::FxState { op, .. } => match op {
                FxOp::Ldmxcsr => Fixup::Ldmxcsr,
                FxOp::Stmxcsr => Fixup::Stmxcsr,
                FxOp::Fxsave => Fixup::Fxsave,
                FxOp::Fxrstor => Fixup::Fxrstor,
            },
        }
    }
}

impl fmt::Display for Fixup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a fix-up left the vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The instruction was completed; RIP is past it.
    Completed,
    /// The exception hardware raises here was injected instead (#BP for `int3`, #UD for
    /// `clac`/`stac` outside CPL 0, #NM/#MF for `fwait`, #GP/#SS/#PF for `cmpxchg16b`, and
    /// #UD/#NM/#GP/#SS/#PF/#AC for the x87/SSE state instructions).
    Raised {
        /// Exception vector.
        vector: u8,
    },
}

/// A fix-up that was applied; the vCPU can be run again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Which fix-up.
    pub fixup: Fixup,
    /// Guest RIP of the failing instruction.
    pub rip: u64,
    /// What it did.
    pub outcome: Outcome,
}

/// Guest command-line additions needed when the fix-ups are active: PVM passes the host's
/// XSAVE CPUID bits through whatever the VMM says, and the guest must not use XSAVE/XRSTOR,
/// which the emulator cannot do.
const GUEST_CMDLINE_ADDITIONS: &[&str] = &["noxsave"];

/// The fix-ups of one VM: mode, whether active, counters. Shared by all vCPU threads by `&`.
#[derive(Debug)]
pub struct Fixups {
    mode: FixupMode,
    host_needs: bool,
    active: bool,
    stats: Stats,
    announced: AtomicBool,
}

impl Fixups {
    /// Resolves `mode` against this host ([`host_needs_fixups`]).
    pub fn new(mode: FixupMode) -> Self {
        Self::with_host(mode, host_needs_fixups())
    }

    /// Resolves `mode` given whether the host needs fix-ups.
    pub fn with_host(mode: FixupMode, host_needs: bool) -> Self {
        let active = match mode {
            FixupMode::Auto => host_needs,
            FixupMode::On => true,
            FixupMode::Off => false,
        };
        Fixups {
            mode,
            host_needs,
            active,
            stats: Stats::default(),
            announced: AtomicBool::new(false),
        }
    }

    /// The configured mode.
    pub fn mode(&self) -> FixupMode {
        self.mode
    }

    /// Whether fix-ups are applied.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Words to append to the guest kernel command line (`["noxsave"]` when active, else none).
    pub fn guest_cmdline_additions(&self) -> &'static [&'static str] {
        if self.active {
            GUEST_CMDLINE_ADDITIONS
        } else {
            &[]
        }
    }

    /// One sentence on whether fix-ups are on and why, and what the guest gets.
    pub fn describe(&self) -> String {
        let why = match (self.mode, self.host_needs) {
            (FixupMode::Auto, true) => format!("auto: {PVM_MODULE} module loaded, KVM is PVM"),
            (FixupMode::Auto, false) => format!("auto: no {PVM_MODULE} module, KVM is not PVM"),
            (mode, _) => format!("--emulation-fixups={mode}"),
        };
        if self.active {
            format!(
                "emulation fix-ups on ({why}); guest command line gets: {}",
                GUEST_CMDLINE_ADDITIONS.join(" ")
            )
        } else {
            format!("emulation fix-ups off ({why})")
        }
    }

    /// Logs [`Self::describe`] at info level, once per `Fixups` however often it is called.
    pub fn announce(&self) {
        if !self.announced.swap(true, Ordering::Relaxed) {
            log::info!("{}", self.describe());
        }
    }

    /// Hits of `fixup` so far.
    pub fn hits(&self, fixup: Fixup) -> u64 {
        self.stats.hits(fixup)
    }

    /// Emulation failures left unhandled so far.
    pub fn unhandled(&self) -> u64 {
        self.stats.unhandled_count()
    }

    /// Counters for the exit log, e.g.
    /// `emulation fix-ups: clac=3780 stac=395 syscall=167 popcnt=3 fwait=3 int3=1 cmpxchg16b=2
    /// ldmxcsr=0 stmxcsr=0 fxsave=0 fxrstor=0 unhandled=0`.
    pub fn summary(&self) -> String {
        self.stats.summary()
    }

    /// Logs [`Self::summary`] at info level when fix-ups are active.
    pub fn log_summary(&self) {
        if self.active {
            log::info!("{}", self.summary());
        }
    }

    /// Handles one emulation failure of the vCPU behind `cpu`. `insn` holds the bytes KVM
    /// reported at RIP (see [`emulation_failure`]); if empty they are fetched at RIP.
    ///
    /// On `Ok` the vCPU state was changed and it can run again. On `Err` nothing was changed
    /// (except for [`FixupError::Apply`]) and the VMM should stop with the error.
    pub fn handle(&self, cpu: &mut dyn VcpuAccess, insn: &[u8]) -> Result<Applied, FixupError> {
        let regs = cpu.regs().map_err(FixupError::State)?;
        let sregs = cpu.sregs().map_err(FixupError::State)?;
        let rip = regs.rip;
        let fetched;
        let insn = if insn.is_empty() {
            fetched = vcpu::fetch_insn(cpu, &regs, &sregs)
                .map_err(|source| FixupError::Fetch { rip, source })?;
            &fetched.0[..fetched.1]
        } else {
            insn
        };
        let bytes = InsnBytes::new(insn);
        let decoded = decode(insn, cpu_mode(&regs, &sregs));
        if !self.active {
            self.stats.unhandled();
            return Err(FixupError::Disabled {
                rip,
                bytes,
                recognised: decoded.map(Fixup::of),
            });
        }
        let Some(decoded) = decoded else {
            self.stats.unhandled();
            return Err(FixupError::Unrecognised { rip, bytes });
        };

        let mut fixup = Fixup::of(decoded);
        let applied = if decoded == Insn::Clac {
            let check = syscall::recognise(cpu, &regs, &sregs)
                .map_err(|source| FixupError::Apply { fixup, rip, source })?;
            match check {
                Ok(repair) => {
                    fixup = Fixup::Syscall;
                    repair
                        .apply(cpu)
                        .map(|()| Outcome::Completed)
                        .map_err(|source| FixupError::Apply { fixup, rip, source })
                }
                Err(reason) => {
                    log::trace!("clac at {rip:#x}: not the syscall case: {reason}");
                    insn::complete(cpu, decoded, &regs, &sregs)
                        .map_err(|source| FixupError::Apply { fixup, rip, source })
                }
            }
        } else {
            insn::complete(cpu, decoded, &regs, &sregs).map_err(|source| FixupError::Apply {
                fixup,
                rip,
                source,
            })
        };
        let outcome = match applied {
            Ok(outcome) => outcome,
            Err(e) => {
                self.stats.unhandled();
                return Err(e);
            }
        };
        let count = self.stats.hit(fixup);
        if should_log(count) {
            log::debug!("emulation fix-up #{count} {fixup} at rip {rip:#x} ({bytes}): {outcome:?}");
        }
        Ok(Applied {
            fixup,
            rip,
            outcome,
        })
    }
}
