//! Completing a single instruction the emulator gave up on: `clac`, `stac`, `popcnt reg, reg`,
//! `fwait` and `int3`, each with the architectural checks that decide between completing it and
//! raising the exception hardware would raise.
//!
//! Known simplifications, none of which Linux relies on at these instructions: a single-step
//! trap (RFLAGS.TF) after the completed instruction is not raised, and an interrupt shadow left
//! by a preceding `sti`/`mov ss` is not cleared.

use kvm_bindings::{kvm_regs, kvm_sregs};

use super::decode::{Insn, OperandSize};
use super::vcpu::{advance_rip, cpl, rflags, vector, VcpuAccess, VcpuError, CR0_MP, CR0_TS};
use super::Outcome;

/// FSW.ES: an unmasked x87 exception is pending.
const FSW_ES: u16 = 1 << 7;

/// Completes `insn` (anything but the SYSCALL repair) on `cpu`, whose state is `regs`/`sregs`.
pub(super) fn complete(
    cpu: &mut dyn VcpuAccess,
    insn: Insn,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Result<Outcome, VcpuError> {
    match insn {
        Insn::Clac => set_ac(cpu, regs, sregs, false),
        Insn::Stac => set_ac(cpu, regs, sregs, true),
        Insn::Popcnt {
            size,
            dst,
            src,
            len,
        } => popcnt(cpu, regs, sregs, size, dst, src, len),
        Insn::Fwait => fwait(cpu, regs, sregs),
        Insn::Int3 => int3(cpu, regs, sregs),
    }
}

/// clac/stac: privileged (#UD outside CPL 0, as on hardware), otherwise flip RFLAGS.AC.
fn set_ac(
    cpu: &mut dyn VcpuAccess,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    set: bool,
) -> Result<Outcome, VcpuError> {
    if cpl(regs, sregs) != 0 {
        cpu.inject_exception(vector::UD, None)?;
        return Ok(Outcome::Raised { vector: vector::UD });
    }
    let mut next = *regs;
    next.rflags &= !(rflags::AC | rflags::RF);
    if set {
        next.rflags |= rflags::AC;
    }
    next.rip = advance_rip(regs, sregs, 3);
    cpu.set_regs(&next)?;
    Ok(Outcome::Completed)
}

/// General-purpose register `n` (hardware numbering: rAX, rCX, rDX, rBX, rSP, rBP, rSI, rDI,
/// r8..r15). `n` comes from a 4-bit field, so it is always in range.
fn gpr(regs: &mut kvm_regs, n: u8) -> &mut u64 {
    match n & 0xf {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

/// popcnt: dst = number of set bits in src; ZF = (src == 0); OF, SF, AF, CF, PF cleared.
fn popcnt(
    cpu: &mut dyn VcpuAccess,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    size: OperandSize,
    dst: u8,
    src: u8,
    len: u8,
) -> Result<Outcome, VcpuError> {
    let mut next = *regs;
    let value = *gpr(&mut next, src) & size.mask();
    let count = u64::from(value.count_ones());
    let d = gpr(&mut next, dst);
    *d = match size {
        OperandSize::Word => (*d & !0xffff) | count,
        // 32-bit results zero-extend into the full register.
        OperandSize::Dword | OperandSize::Qword => count,
    };
    next.rflags &=
        !(rflags::OF | rflags::SF | rflags::ZF | rflags::AF | rflags::CF | rflags::PF | rflags::RF);
    if value == 0 {
        next.rflags |= rflags::ZF;
    }
    next.rip = advance_rip(regs, sregs, len);
    cpu.set_regs(&next)?;
    Ok(Outcome::Completed)
}

/// fwait: #NM when CR0.MP and CR0.TS are set, #MF when an unmasked x87 exception is pending
/// (FSW.ES), otherwise nothing but the skip.
fn fwait(
    cpu: &mut dyn VcpuAccess,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Result<Outcome, VcpuError> {
    if sregs.cr0 & (CR0_MP | CR0_TS) == (CR0_MP | CR0_TS) {
        cpu.inject_exception(vector::NM, None)?;
        return Ok(Outcome::Raised { vector: vector::NM });
    }
    let x87 = cpu.x87_state()?;
    if x87.status & FSW_ES != 0 {
        cpu.inject_exception(vector::MF, None)?;
        return Ok(Outcome::Raised { vector: vector::MF });
    }
    let mut next = *regs;
    next.rflags &= !rflags::RF;
    next.rip = advance_rip(regs, sregs, 1);
    cpu.set_regs(&next)?;
    Ok(Outcome::Completed)
}

/// int3: a trap, so the #BP is delivered with RIP after the instruction. The exception is
/// queued first (it fails if another one is pending), then RIP moves.
fn int3(
    cpu: &mut dyn VcpuAccess,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Result<Outcome, VcpuError> {
    cpu.inject_exception(vector::BP, None)?;
    let mut next = *regs;
    next.rip = advance_rip(regs, sregs, 1);
    cpu.set_regs(&next)?;
    Ok(Outcome::Raised { vector: vector::BP })
}
