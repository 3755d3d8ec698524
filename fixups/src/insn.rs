//! Completing a single instruction the emulator gave up on: `clac`, `stac`, `popcnt reg, reg`,
//! `fwait`, `int3` and `cmpxchg16b m128` (the x87/SSE state instructions are in module `fx`), each with the architectural checks that decide between completing it and
//! raising the exception hardware would raise.
//!
//! Known simplifications, none of which Linux relies on at these instructions: a single-step
//! trap (RFLAGS.TF) after the completed instruction is not raised, and an interrupt shadow left
//! by a preceding `sti`/`mov ss` is not cleared.

use kvm_bindings::{kvm_regs, kvm_sregs};

use super::decode::{Insn, MemOperand, OperandSize, SegmentBase};
use super::page_walk::DataAccess;
use super::vcpu::{
    advance_rip, cpl, rflags, vector, VcpuAccess, VcpuError, CR0_MP, CR0_TS, CR0_WP, CR4_LA57,
    CR4_SMAP,
};
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
        Insn::Cmpxchg16b { mem, len, .. } => cmpxchg16b(cpu, regs, sregs, mem, len),
        Insn::FxState {
            op,
            mem,
            rex_w,
            len,
        } => super::fx::complete(cpu, regs, sregs, op, mem, rex_w, len),
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

/// Effective linear address of `mem` (64-bit mode): base + index * scale + displacement (or
/// next RIP + displacement), truncated to 32 bits with the address-size prefix, plus the FS/GS
/// base.
pub(super) fn effective_address(
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    mem: &MemOperand,
    next_rip: u64,
) -> u64 {
    let mut r = *regs;
    let width = if mem.addr32 { 0xffff_ffff } else { u64::MAX };
    let mut ea = mem.disp as i64 as u64;
    if mem.rip_relative {
        ea = ea.wrapping_add(next_rip);
    }
    if let Some(base) = mem.base {
        ea = ea.wrapping_add(*gpr(&mut r, base) & width);
    }
    if let Some((index, scale)) = mem.index {
        ea = ea.wrapping_add((*gpr(&mut r, index) & width).wrapping_mul(u64::from(scale)));
    }
    ea &= width;
    let segment_base = match mem.segment {
        SegmentBase::Flat => 0,
        SegmentBase::Fs => sregs.fs.base,
        SegmentBase::Gs => sregs.gs.base,
    };
    ea.wrapping_add(segment_base)
}

/// Whether `addr` is canonical: bits above the linear-address width (48, or 57 with LA57)
/// copy the top bit.
pub(super) fn canonical(addr: u64, sregs: &kvm_sregs) -> bool {
    let bits = if sregs.cr4 & CR4_LA57 != 0 { 57 } else { 48 };
    let shift = 64 - bits;
    (((addr << shift) as i64) >> shift) as u64 == addr
}

/// cmpxchg16b m128: compare RDX:RAX with the 16 bytes at the operand; if equal, ZF = 1 and
/// RCX:RBX is stored, else ZF = 0 and RDX:RAX is loaded with them. The compare-exchange is
/// done atomically on guest memory (a locked operation on hardware either way). Faults as
/// hardware raises them: #SS(0)/#GP(0) for a non-canonical address, #GP(0) when not 16-byte
/// aligned, #PF when the write is not allowed.
fn cmpxchg16b(
    cpu: &mut dyn VcpuAccess,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    mem: MemOperand,
    len: u8,
) -> Result<Outcome, VcpuError> {
    let next_rip = advance_rip(regs, sregs, len);
    let gva = effective_address(regs, sregs, &mem, next_rip);
    if !canonical(gva, sregs) {
        let vector = if mem.stack { vector::SS } else { vector::GP };
        cpu.inject_exception(vector, Some(0))?;
        return Ok(Outcome::Raised { vector });
    }
    if gva % 16 != 0 {
        cpu.inject_exception(vector::GP, Some(0))?;
        return Ok(Outcome::Raised { vector: vector::GP });
    }
    let user = cpl(regs, sregs) == 3;
    let access = DataAccess {
        user,
        write_protect: sregs.cr0 & CR0_WP != 0,
        smap: !user && sregs.cr4 & CR4_SMAP != 0 && regs.rflags & rflags::AC == 0,
    };
    let expected = (u128::from(regs.rdx) << 64) | u128::from(regs.rax);
    let new = (u128::from(regs.rcx) << 64) | u128::from(regs.rbx);
    let found = match cpu.cmpxchg16b(gva, access, expected, new) {
        Ok(found) => found,
        Err(VcpuError::PageFault { gva, error_code }) => {
            // Queued first (it fails, changing nothing, if another exception is pending);
            // CR2 is set before the next entry delivers it.
            cpu.inject_exception(vector::PF, Some(error_code))?;
            let mut with_cr2 = *sregs;
            with_cr2.cr2 = gva;
            cpu.set_sregs(&with_cr2)?;
            return Ok(Outcome::Raised { vector: vector::PF });
        }
        Err(e) => return Err(e),
    };
    let mut next = *regs;
    next.rflags &= !(rflags::ZF | rflags::RF);
    if found == expected {
        next.rflags |= rflags::ZF;
    } else {
        next.rax = found as u64;
        next.rdx = (found >> 64) as u64;
    }
    next.rip = next_rip;
    cpu.set_regs(&next)?;
    Ok(Outcome::Completed)
}
