//! Repairing a SYSCALL the emulator left half done.
//!
//! # What happens on PVM
//! A correct 64-bit SYSCALL (SDM vol. 2B) does, atomically: RCX <- RIP of the next instruction,
//! R11 <- RFLAGS, RFLAGS <- RFLAGS & ~IA32_FMASK, CS <- STAR[47:32] & ~3 (flat 64-bit code,
//! DPL 0), SS <- STAR[47:32] + 8 (flat data, DPL 0), CPL <- 0, RIP <- LSTAR (CSTAR from
//! compatibility mode). RSP is unchanged.
//!
//! PVM's emulator performs the register part (RCX, R11, RFLAGS, RIP) but leaves the vCPU at
//! CPL 3. Fetching the kernel's entry point at user privilege then faults: a #PF with CR2 = the
//! entry point and a user-mode error code, delivered through IDT vector 14 with a switch to
//! CPL 0 on the stack from TSS.RSP0, which gets the frame `[rsp] error code, RIP (= entry
//! point), CS (user, RPL 3), RFLAGS (already masked, RF set), RSP (user), SS (user)`. The #PF
//! entry's first instruction, `clac`, then fails emulation, which is where the fix-ups see it.
//!
//! Seen on this host (probe guest in `kvm_tests`, and Linux 6.1 booting to its init): error
//! code 0x5 without EFER.NXE/CR4.SMEP and 0x15 with them, frame RFLAGS 0x10002 after a user
//! RFLAGS of 0x202, RCX and R11 as a correct SYSCALL sets them, SS a null selector.
//!
//! # Recognition
//! All of these must hold, or the failure is treated as an ordinary `clac`:
//! - 64-bit mode at CPL 0 with EFER.SCE set;
//! - CR2 equals LSTAR (or a non-zero CSTAR): the fault was on the entry point;
//! - RIP is the #PF handler from the IDT (or 4 bytes into it, after an `endbr64`): nothing of
//!   the handler ran, so RSP still points at the frame the delivery pushed;
//! - the frame's RIP equals CR2, its CS and SS have RPL 3, its error code says user mode and
//!   neither a write nor a reserved-bit fault (the instruction-fetch bit is not required: it is
//!   only reported with EFER.NXE or CR4.SMEP, and PVM was seen without it);
//! - the frame's RFLAGS (RF aside: the fault sets it, and Linux 6.1's FMASK 0x257fd5 has it)
//!   has no bit of FMASK set, IF clear, IOPL 0 and VM clear. Code at CPL 3 with IOPL 0 cannot
//!   clear IF, so a user program jumping to the entry point on its own cannot produce this
//!   frame (Linux puts IF in FMASK; a guest whose FMASK lacks IF gets no repair);
//! - R11 agrees with the frame's RFLAGS: frame = (R11 & ~FMASK) | bit 1, RF ignored;
//! - RCX is a user address (lower half; 32 bits for the CSTAR entry) and the two bytes before
//!   it are `0f 05`, the SYSCALL the user executed.
//!
//! # Rewrite
//! CS and SS are loaded as SYSCALL loads them (selectors from STAR, the fixed flat descriptor
//! fields of the SDM, not whatever the GDT holds, as on hardware); RIP = the entry point;
//! RSP = the user RSP from the frame; RFLAGS = the frame's RFLAGS without RF; RCX and R11 stay as
//! the emulator set them (checked above). The frame is abandoned on the entry stack.
//!
//! # Where the result can still differ from hardware
//! - CR2 keeps the entry-point address (a real SYSCALL leaves CR2 alone); Linux reads CR2 only in
//!   its #PF handler, which is not running.
//! - 48 bytes below TSS.RSP0 hold the dead frame; the stack is free there, nothing reads it.
//! - The emulator's RF handling in R11 is not known exactly; RF is ignored in the comparison
//!   and cleared in the result.
//! - A pending single-step trap from the user's TF is lost; Linux's FMASK clears TF anyway.

use kvm_bindings::{kvm_regs, kvm_sregs};

use super::decode::CpuMode;
use super::vcpu::{
    cpl, cpu_mode, flat_code64_segment, flat_stack_segment, read_u64, rflags, VcpuAccess,
    VcpuError, EFER_SCE, MSR_CSTAR, MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK,
};

/// #PF error code bits.
const PF_WRITE: u64 = 1 << 1;
const PF_USER: u64 = 1 << 2;
const PF_RSVD: u64 = 1 << 3;

/// IDT vector of #PF, and the size of a 64-bit IDT gate.
const PF_VECTOR: u64 = 14;
const IDT_GATE_SIZE: u64 = 16;

/// `endbr64`, which IBT-enabled kernels put before the `clac` of every entry.
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// `syscall`.
const SYSCALL_BYTES: [u8; 2] = [0x0f, 0x05];

/// Highest user (lower-half) canonical address + 1.
const USER_LIMIT_64: u64 = 0x0000_8000_0000_0000;

/// The hardware-pushed exception frame with error code, lowest address first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ExceptionFrame {
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// The state a correct SYSCALL would have produced.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SyscallRepair {
    regs: kvm_regs,
    sregs: kvm_sregs,
}

impl SyscallRepair {
    /// Writes the repaired state.
    pub(super) fn apply(&self, cpu: &mut dyn VcpuAccess) -> Result<(), VcpuError> {
        cpu.set_sregs(&self.sregs)?;
        cpu.set_regs(&self.regs)
    }
}

/// Why a `clac` failure is not the SYSCALL case (for debug logs and tests).
pub(super) type NotSyscall = &'static str;

/// Decides whether the vCPU, stopped on a `clac` it could not emulate, is in the half-done
/// SYSCALL state. Only reads; returns the repaired state if so. MSR read failures are errors;
/// unreadable guest memory means "not this case".
pub(super) fn recognise(
    cpu: &dyn VcpuAccess,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Result<Result<SyscallRepair, NotSyscall>, VcpuError> {
    if cpu_mode(regs, sregs) != CpuMode::Bits64 || cpl(regs, sregs) != 0 {
        return Ok(Err("not 64-bit kernel mode"));
    }
    if sregs.efer & EFER_SCE == 0 {
        return Ok(Err("syscall disabled in efer"));
    }
    // The IDT check first: it costs no ioctl with synced registers, and rules out every
    // other entry path before the MSRs are read.
    match pf_handler_entry(cpu, sregs) {
        Some(handler) if regs.rip == handler => {}
        Some(handler) if regs.rip == handler.wrapping_add(ENDBR64.len() as u64) => {
            let mut b = [0u8; 4];
            if cpu.read_virt(handler, &mut b).is_err() || b != ENDBR64 {
                return Ok(Err("rip is not at the start of the page-fault handler"));
            }
        }
        Some(_) => return Ok(Err("rip is not at the start of the page-fault handler")),
        None => return Ok(Err("page-fault gate not readable")),
    }

    let mut msrs = [0u64; 4];
    cpu.msrs(
        &[MSR_LSTAR, MSR_CSTAR, MSR_STAR, MSR_SYSCALL_MASK],
        &mut msrs,
    )?;
    let [lstar, cstar, star, fmask] = msrs;
    let compat = if sregs.cr2 == lstar {
        false
    } else if cstar != 0 && sregs.cr2 == cstar {
        true
    } else {
        return Ok(Err("cr2 is not a syscall entry point"));
    };
    let entry = sregs.cr2;

    if regs.rsp & 7 != 0 {
        return Ok(Err("misaligned kernel stack"));
    }
    let Some(frame) = read_frame(cpu, regs.rsp) else {
        return Ok(Err("exception frame not readable"));
    };
    if frame.rip != entry {
        return Ok(Err("frame rip is not the entry point"));
    }
    if frame.cs & 3 != 3 || frame.ss & 3 != 3 {
        return Ok(Err("fault did not come from user mode"));
    }
    // The I/D bit is only reported with EFER.NXE or CR4.SMEP, and PVM was seen to omit it
    // (error code 0x5 with neither set): not required. A fault with CR2 and the frame's RIP
    // both at the entry point can only be the fetch there anyway.
    let ec = frame.error_code;
    if ec & PF_USER == 0 || ec & (PF_WRITE | PF_RSVD) != 0 {
        return Ok(Err("error code is not a user read or fetch"));
    }

    // RF is set in the pushed image of every fault, and Linux has RF in FMASK: ignore it.
    let frame_flags = frame.rflags & !rflags::RF;
    if frame_flags & fmask != 0 || frame_flags & (rflags::IF | rflags::IOPL | rflags::VM) != 0 {
        return Ok(Err("frame rflags not masked by syscall"));
    }
    let expected = (regs.r11 & !fmask) | rflags::FIXED;
    if (expected ^ frame.rflags) & !rflags::RF != 0 {
        return Ok(Err("r11 does not match the frame's rflags"));
    }

    let user_limit = if compat { 1 << 32 } else { USER_LIMIT_64 };
    if regs.rcx < SYSCALL_BYTES.len() as u64 || regs.rcx >= user_limit {
        return Ok(Err("rcx is not a user return address"));
    }
    let mut insn = [0u8; 2];
    if cpu.read_virt(regs.rcx - 2, &mut insn).is_err() || insn != SYSCALL_BYTES {
        return Ok(Err("no syscall instruction before rcx"));
    }

    let star_cs = ((star >> 32) & 0xffff) as u16;
    let mut new_sregs = *sregs;
    new_sregs.cs = flat_code64_segment(star_cs & !3);
    new_sregs.ss = flat_stack_segment(star_cs.wrapping_add(8));
    let mut new_regs = *regs;
    new_regs.rip = entry;
    new_regs.rsp = frame.rsp;
    new_regs.rflags = (frame.rflags & !rflags::RF) | rflags::FIXED;
    Ok(Ok(SyscallRepair {
        regs: new_regs,
        sregs: new_sregs,
    }))
}

/// Address of the #PF handler from the IDT, if the gate is inside the limit and readable.
fn pf_handler_entry(cpu: &dyn VcpuAccess, sregs: &kvm_sregs) -> Option<u64> {
    let offset = PF_VECTOR * IDT_GATE_SIZE;
    if u64::from(sregs.idt.limit) < offset + IDT_GATE_SIZE - 1 {
        return None;
    }
    let mut gate = [0u8; 16];
    cpu.read_virt(sregs.idt.base.wrapping_add(offset), &mut gate)
        .ok()?;
    // Present bit.
    if gate[5] & 0x80 == 0 {
        return None;
    }
    let low = u64::from(u16::from_le_bytes([gate[0], gate[1]]));
    let mid = u64::from(u16::from_le_bytes([gate[6], gate[7]]));
    let high = u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]));
    Some(low | (mid << 16) | (high << 32))
}

fn read_frame(cpu: &dyn VcpuAccess, rsp: u64) -> Option<ExceptionFrame> {
    let word = |i: u64| read_u64(cpu, rsp.wrapping_add(i * 8)).ok();
    Some(ExceptionFrame {
        error_code: word(0)?,
        rip: word(1)?,
        cs: word(2)?,
        rflags: word(3)?,
        rsp: word(4)?,
        ss: word(5)?,
    })
}
