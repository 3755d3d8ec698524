//! Completing the x87/SSE state instructions of opcode group 15 that PVM's emulator gives up on:
//! `ldmxcsr m32`, `stmxcsr m32`, `fxsave m512` and `fxrstor m512` (64-bit mode).
//!
//! The vCPU's x87/SSE state is read and written through KVM's XSAVE ioctls as an FXSAVE image
//! ([`VcpuAccess::fx_state`]); the memory operand goes through the checked page walk
//! ([`VcpuAccess::read_data`] / [`VcpuAccess::write_data`]). Before anything changes, the
//! architectural checks decide between completing the instruction and raising what hardware
//! raises (SDM vol. 2, each instruction's "64-Bit Mode Exceptions"), in this order:
//!
//! | check | ldmxcsr / stmxcsr | fxsave / fxrstor |
//! |---|---|---|
//! | CR0.EM set, or CR4.OSFXSR clear | #UD | (#NM for CR0.EM) |
//! | CR0.TS set | #NM | #NM |
//! | operand not canonical | #SS(0) with an rSP/rBP base, else #GP(0) | same |
//! | misaligned | #AC(0) at CPL 3 with CR0.AM and RFLAGS.AC, 4-byte | #GP(0) unless 16-byte aligned |
//! | page not present / not writable / user or SMAP | #PF with CR2 | #PF with CR2 |
//! | MXCSR value with bits outside MXCSR_MASK | #GP(0) (ldmxcsr) | #GP(0) (fxrstor) |
//!
//! Layouts: with REX.W (`fxsave64`, what Linux uses) the image is KVM's as it is; without it the
//! 32-bit layout stores FIP/FDP as 32-bit offsets followed by the FCS/FDS selectors, which KVM's
//! state does not keep: they are stored as 0 (as CPUs with CPUID.(7,0):EBX[13], "FCS and FDS
//! deprecated", do) and ignored on load. With CR4.OSFXSR clear `fxrstor` leaves MXCSR and the XMM
//! registers alone (allowed by the SDM). Bytes 416-511 of the area are not written by `fxsave`
//! nor read by `fxrstor`, as on hardware.

use kvm_bindings::{kvm_regs, kvm_sregs};

use super::decode::{FxOp, MemOperand};
use super::insn::{canonical, effective_address};
use super::page_walk::DataAccess;
use super::vcpu::{
    advance_rip, cpl, rflags, vector, FxImage, VcpuAccess, VcpuError, CR0_AM, CR0_EM, CR0_TS,
    CR0_WP, CR4_OSFXSR, CR4_SMAP, FXSAVE_SIZE,
};
use super::Outcome;

/// Offset of MXCSR in the FXSAVE image.
const MXCSR: usize = 24;
/// Offset of MXCSR_MASK in the FXSAVE image.
const MXCSR_MASK: usize = 28;
/// Offset of FIP (64-bit layout; FIP[31:0] then FCS in the 32-bit layout).
const FIP: usize = 8;
/// Offset of FDP (64-bit layout; FDP[31:0] then FDS in the 32-bit layout).
const FDP: usize = 16;
/// Offset of XMM0: bytes before it are the x87 part, [`XMM_END`] ends XMM15.
const XMM0: usize = 160;
/// End of XMM15, and of what fxsave writes in 64-bit mode.
const XMM_END: usize = 416;
/// The MXCSR_MASK to assume when the image holds 0 (SDM vol. 1, 11.6.6: CPUs without DAZ).
const DEFAULT_MXCSR_MASK: u32 = 0xffbf;

fn u32_at(image: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&image[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(image: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&image[at..at + 8]);
    u64::from_le_bytes(b)
}

/// The MXCSR bits software may set, from an FXSAVE image of this CPU.
pub(super) fn mxcsr_mask(image: &FxImage) -> u32 {
    match u32_at(image, MXCSR_MASK) {
        0 => DEFAULT_MXCSR_MASK,
        mask => mask,
    }
}

/// Completes `op` with memory operand `mem` (encoded in `len` bytes) on `cpu`.
pub(super) fn complete(
    cpu: &mut dyn VcpuAccess,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    op: FxOp,
    mem: MemOperand,
    rex_w: bool,
    len: u8,
) -> Result<Outcome, VcpuError> {
    let mxcsr_op = matches!(op, FxOp::Ldmxcsr | FxOp::Stmxcsr);
    if mxcsr_op && (sregs.cr0 & CR0_EM != 0 || sregs.cr4 & CR4_OSFXSR == 0) {
        return raise(cpu, vector::UD, None);
    }
    if sregs.cr0 & CR0_TS != 0 || (!mxcsr_op && sregs.cr0 & CR0_EM != 0) {
        return raise(cpu, vector::NM, None);
    }
    let next_rip = advance_rip(regs, sregs, len);
    let gva = effective_address(regs, sregs, &mem, next_rip);
    let size: u64 = if mxcsr_op { 4 } else { FXSAVE_SIZE as u64 };
    if !canonical(gva, sregs) || !canonical(gva.wrapping_add(size - 1), sregs) {
        let vector = if mem.stack { vector::SS } else { vector::GP };
        return raise(cpu, vector, Some(0));
    }
    let user = cpl(regs, sregs) == 3;
    if mxcsr_op {
        let alignment_check =
            user && sregs.cr0 & CR0_AM != 0 && regs.rflags & rflags::AC != 0 && gva % 4 != 0;
        if alignment_check {
            return raise(cpu, vector::AC, Some(0));
        }
    } else if gva % 16 != 0 {
        return raise(cpu, vector::GP, Some(0));
    }
    let access = DataAccess {
        user,
        write_protect: sregs.cr0 & CR0_WP != 0,
        smap: !user && sregs.cr4 & CR4_SMAP != 0 && regs.rflags & rflags::AC == 0,
    };
    let done = match op {
        FxOp::Ldmxcsr => ldmxcsr(cpu, gva, access)?,
        FxOp::Stmxcsr => stmxcsr(cpu, gva, access)?,
        FxOp::Fxsave => fxsave(cpu, gva, access, rex_w)?,
        FxOp::Fxrstor => fxrstor(cpu, sregs, gva, access, rex_w)?,
    };
    if let Some(outcome) = done {
        return Ok(outcome);
    }
    let mut next = *regs;
    next.rflags &= !rflags::RF;
    next.rip = next_rip;
    cpu.set_regs(&next)?;
    Ok(Outcome::Completed)
}

/// Injects `vector`; nothing else changes.
fn raise(
    cpu: &mut dyn VcpuAccess,
    vector: u8,
    error_code: Option<u32>,
) -> Result<Outcome, VcpuError> {
    cpu.inject_exception(vector, error_code)?;
    Ok(Outcome::Raised { vector })
}

/// Turns a refused access into the #PF hardware raises (CR2 set before the next entry
/// delivers it); other failures stay failures. `Ok(None)`: the access succeeded.
fn page_fault_or(
    cpu: &mut dyn VcpuAccess,
    result: Result<(), VcpuError>,
) -> Result<Option<Outcome>, VcpuError> {
    match result {
        Ok(()) => Ok(None),
        Err(VcpuError::PageFault { gva, error_code }) => {
            // Queued first (it fails, changing nothing, if another exception is pending).
            cpu.inject_exception(vector::PF, Some(error_code))?;
            let mut sregs = cpu.sregs()?;
            sregs.cr2 = gva;
            cpu.set_sregs(&sregs)?;
            Ok(Some(Outcome::Raised { vector: vector::PF }))
        }
        Err(e) => Err(e),
    }
}

/// ldmxcsr: MXCSR = the dword at `gva`; #GP(0) for bits outside MXCSR_MASK.
fn ldmxcsr(
    cpu: &mut dyn VcpuAccess,
    gva: u64,
    access: DataAccess,
) -> Result<Option<Outcome>, VcpuError> {
    let mut value = [0u8; 4];
    let read = cpu.read_data(gva, access, &mut value);
    if let Some(raised) = page_fault_or(cpu, read)? {
        return Ok(Some(raised));
    }
    let value = u32::from_le_bytes(value);
    let mut image = cpu.fx_state()?;
    if value & !mxcsr_mask(&image) != 0 {
        return raise(cpu, vector::GP, Some(0)).map(Some);
    }
    image[MXCSR..MXCSR + 4].copy_from_slice(&value.to_le_bytes());
    cpu.set_fx_state(&image)?;
    Ok(None)
}

/// stmxcsr: the dword at `gva` = MXCSR.
fn stmxcsr(
    cpu: &mut dyn VcpuAccess,
    gva: u64,
    access: DataAccess,
) -> Result<Option<Outcome>, VcpuError> {
    let image = cpu.fx_state()?;
    let written = cpu.write_data(gva, access, &image[MXCSR..MXCSR + 4]);
    page_fault_or(cpu, written)
}

/// fxsave: the 416 bytes of x87/SSE state at `gva` (64-bit or 32-bit layout); bytes 416-511
/// are written back as they were, so that the whole area is checked for the write.
fn fxsave(
    cpu: &mut dyn VcpuAccess,
    gva: u64,
    access: DataAccess,
    rex_w: bool,
) -> Result<Option<Outcome>, VcpuError> {
    let image = cpu.fx_state()?;
    let mut area = [0u8; FXSAVE_SIZE];
    // Unchecked read of the bytes left alone; if it fails the checked write below faults or
    // fails as well.
    let _ = cpu.read_virt(gva.wrapping_add(XMM_END as u64), &mut area[XMM_END..]);
    area[..XMM_END].copy_from_slice(&image[..XMM_END]);
    if !rex_w {
        let fip = u64_at(&image, FIP) as u32;
        let fdp = u64_at(&image, FDP) as u32;
        area[FIP..FIP + 8].copy_from_slice(&u64::from(fip).to_le_bytes());
        area[FDP..FDP + 8].copy_from_slice(&u64::from(fdp).to_le_bytes());
    }
    let written = cpu.write_data(gva, access, &area);
    page_fault_or(cpu, written)
}

/// fxrstor: x87/SSE state from the area at `gva`; #GP(0) when its MXCSR has bits outside
/// MXCSR_MASK.
fn fxrstor(
    cpu: &mut dyn VcpuAccess,
    sregs: &kvm_sregs,
    gva: u64,
    access: DataAccess,
    rex_w: bool,
) -> Result<Option<Outcome>, VcpuError> {
    let mut area = [0u8; FXSAVE_SIZE];
    let read = cpu.read_data(gva, access, &mut area[..XMM_END]);
    if let Some(raised) = page_fault_or(cpu, read)? {
        return Ok(Some(raised));
    }
    let current = cpu.fx_state()?;
    let osfxsr = sregs.cr4 & CR4_OSFXSR != 0;
    if osfxsr && u32_at(&area, MXCSR) & !mxcsr_mask(&current) != 0 {
        return raise(cpu, vector::GP, Some(0)).map(Some);
    }
    let mut next = current;
    next[..XMM0].copy_from_slice(&area[..XMM0]);
    next[MXCSR_MASK..MXCSR_MASK + 4].copy_from_slice(&current[MXCSR_MASK..MXCSR_MASK + 4]);
    if !rex_w {
        // 32-bit layout: 32-bit offsets, then the selectors (dropped).
        let fip = u32_at(&area, FIP);
        let fdp = u32_at(&area, FDP);
        next[FIP..FIP + 8].copy_from_slice(&u64::from(fip).to_le_bytes());
        next[FDP..FDP + 8].copy_from_slice(&u64::from(fdp).to_le_bytes());
    }
    if osfxsr {
        next[XMM0..XMM_END].copy_from_slice(&area[XMM0..XMM_END]);
    } else {
        next[MXCSR..MXCSR + 4].copy_from_slice(&current[MXCSR..MXCSR + 4]);
    }
    cpu.set_fx_state(&next)?;
    Ok(None)
}
