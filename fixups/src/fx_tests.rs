//! The x87/SSE state fix-ups (`ldmxcsr`, `stmxcsr`, `fxsave`, `fxrstor`) on synthetic vCPU
//! states: decoding of the operand forms, the state they move, and the faults hardware raises.

use super::decode::{decode, CpuMode, FxOp, Insn, MemOperand, SegmentBase};
use super::fake_vcpu::FakeVcpu;
use super::vcpu::{rflags, vector, CR0_AM, CR0_EM, CR0_TS, CR0_WP, CR4_OSFXSR, CR4_SMAP};
use super::*;

const RIP: u64 = 0xffff_ffff_8103_de40;
/// Kernel stack, where `kernel_fpu_begin_mask` keeps its MXCSR constant.
const RBP: u64 = 0xffff_c900_0001_3e80;
/// A 16-byte aligned FXSAVE area (Linux's `fpu->fpstate->regs`).
const AREA: u64 = 0xffff_8880_0123_4a00;
const MASK: u32 = 0xffff;

fn active() -> Fixups {
    Fixups::with_host(FixupMode::On, false)
}

fn mem(base: Option<u8>, disp: i32) -> MemOperand {
    MemOperand {
        base,
        index: None,
        disp,
        rip_relative: false,
        addr32: false,
        segment: SegmentBase::Flat,
        stack: matches!(base, Some(4) | Some(5)),
    }
}

fn fx(op: FxOp, mem: MemOperand, rex_w: bool, len: u8) -> Option<Insn> {
    Some(Insn::FxState {
        op,
        mem,
        rex_w,
        len,
    })
}

#[test]
fn group15_memory_forms_decode() {
    use CpuMode::Bits64;
    // ldmxcsr -0x4(%rbp)
    assert_eq!(
        decode(&[0x0f, 0xae, 0x55, 0xfc, 0x90], Bits64),
        fx(FxOp::Ldmxcsr, mem(Some(5), -4), false, 4)
    );
    // stmxcsr 0x4(%rsp): SIB with base rsp.
    assert_eq!(
        decode(&[0x0f, 0xae, 0x5c, 0x24, 0x04], Bits64),
        fx(FxOp::Stmxcsr, mem(Some(4), 4), false, 5)
    );
    // ldmxcsr (%r12): REX.B, SIB (r12 needs one); not a stack access.
    assert_eq!(
        decode(&[0x41, 0x0f, 0xae, 0x14, 0x24], Bits64),
        fx(FxOp::Ldmxcsr, mem(Some(12), 0), false, 5)
    );
    // ldmxcsr 0x12345678(%rip)
    let mut rip_rel = mem(None, 0x1234_5678);
    rip_rel.rip_relative = true;
    assert_eq!(
        decode(&[0x0f, 0xae, 0x15, 0x78, 0x56, 0x34, 0x12], Bits64),
        fx(FxOp::Ldmxcsr, rip_rel, false, 7)
    );
    // fxsaveq (%rdi), fxrstorq (%rdi), fxsave (%rax), fxrstor 0x40(%rbx)
    assert_eq!(
        decode(&[0x48, 0x0f, 0xae, 0x07], Bits64),
        fx(FxOp::Fxsave, mem(Some(7), 0), true, 4)
    );
    assert_eq!(
        decode(&[0x48, 0x0f, 0xae, 0x0f], Bits64),
        fx(FxOp::Fxrstor, mem(Some(7), 0), true, 4)
    );
    assert_eq!(
        decode(&[0x0f, 0xae, 0x00], Bits64),
        fx(FxOp::Fxsave, mem(Some(0), 0), false, 3)
    );
    assert_eq!(
        decode(&[0x0f, 0xae, 0x4b, 0x40], Bits64),
        fx(FxOp::Fxrstor, mem(Some(3), 0x40), false, 4)
    );
    // gs override and 32-bit addressing: fxsave64 %gs:(%eax,%ecx,8)
    let mut gs = mem(Some(0), 0);
    gs.index = Some((1, 8));
    gs.segment = SegmentBase::Gs;
    gs.addr32 = true;
    assert_eq!(
        decode(&[0x65, 0x67, 0x48, 0x0f, 0xae, 0x04, 0xc8], Bits64),
        fx(FxOp::Fxsave, gs, true, 7)
    );
    assert_eq!(Insn::length(&fx(FxOp::Fxsave, gs, true, 7).unwrap()), 7);
}

#[test]
fn group15_lookalikes_do_not_decode() {
    for bytes in [
        &[0xf0, 0x0f, 0xae, 0x10][..],   // lock ldmxcsr: #UD
        &[0x66, 0x0f, 0xae, 0x38],       // clflushopt
        &[0xf3, 0x48, 0x0f, 0xae, 0xc0], // rdfsbase
        &[0xf3, 0x0f, 0xae, 0x10],       // f3 changes the group
        &[0x0f, 0xae, 0xe8],             // lfence
        &[0x0f, 0xae, 0xf0],             // mfence
        &[0x0f, 0xae, 0xf8],             // sfence
        &[0x0f, 0xae, 0xd0],             // register form of /2
        &[0x0f, 0xae, 0x20],             // xsave
        &[0x0f, 0xae, 0x28],             // xrstor
        &[0x0f, 0xae, 0x30],             // xsaveopt
        &[0x0f, 0xae, 0x38],             // clflush
        &[0xc5, 0xf8, 0xae, 0x10],       // vldmxcsr
        &[0x0f, 0xae],                   // cut short
        &[0x0f, 0xae, 0x55],
        &[0x0f, 0xae, 0x15, 0x78, 0x56],
        &[0x0f, 0xae, 0x14],
    ] {
        assert_eq!(decode(bytes, CpuMode::Bits64), None, "{bytes:02x?}");
    }
    // 64-bit mode only.
    assert_eq!(decode(&[0x0f, 0xae, 0x10], CpuMode::Bits32), None);
}

/// A kernel vCPU with SSE enabled and a known x87/SSE state.
fn sse_cpu() -> FakeVcpu {
    let mut cpu = FakeVcpu::long_mode(0);
    cpu.sregs.cr0 |= CR0_WP;
    cpu.sregs.cr4 |= CR4_OSFXSR | CR4_SMAP;
    cpu.regs.rip = RIP;
    cpu.regs.rbp = RBP;
    cpu.regs.rflags = 0x2 | rflags::RF | rflags::ZF;
    let image = &mut cpu.fx.0;
    for (i, b) in image.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7) ^ 0x5a;
    }
    image[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    image[28..32].copy_from_slice(&MASK.to_le_bytes());
    cpu
}

fn mxcsr(cpu: &FakeVcpu) -> u32 {
    u32::from_le_bytes(cpu.fx.0[24..28].try_into().unwrap())
}

fn dword(cpu: &FakeVcpu, gva: u64) -> u32 {
    let mut b = [0u8; 4];
    cpu.read_virt(gva, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// ldmxcsr -0x4(%rbp), as Debian's kernel_fpu_begin_mask runs it.
const LDMXCSR_RBP: [u8; 4] = [0x0f, 0xae, 0x55, 0xfc];
/// stmxcsr -0x4(%rbp)
const STMXCSR_RBP: [u8; 4] = [0x0f, 0xae, 0x5d, 0xfc];

#[test]
fn ldmxcsr_loads_mxcsr_and_skips() {
    let fixups = active();
    let mut cpu = sse_cpu();
    cpu.poke(RBP - 4, &0x9fc0u32.to_le_bytes());
    let before = cpu.clone();
    let applied = fixups.handle(&mut cpu, &LDMXCSR_RBP).unwrap();
    assert_eq!(
        applied,
        Applied {
            fixup: Fixup::Ldmxcsr,
            rip: RIP,
            outcome: Outcome::Completed
        }
    );
    assert_eq!(mxcsr(&cpu), 0x9fc0);
    // Nothing else of the x87/SSE state changed; one state write.
    assert_eq!(cpu.fx.0[..24], before.fx.0[..24]);
    assert_eq!(cpu.fx.0[28..], before.fx.0[28..]);
    assert_eq!(cpu.fx_writes, 1);
    assert_eq!(cpu.regs.rip, RIP + 4);
    assert_eq!(cpu.regs.rflags, 0x2 | rflags::ZF);
    assert_eq!(fixups.hits(Fixup::Ldmxcsr), 1);
    assert!(cpu.injected.is_empty());
    // A kernel read with SMAP in force (AC clear).
    assert_eq!(
        cpu.last_data_access.get(),
        Some(DataAccess {
            user: false,
            write_protect: true,
            smap: true
        })
    );
}

#[test]
fn ldmxcsr_reserved_bits_raise_gp0() {
    let fixups = active();
    // Bit 16 is outside a 0xffff mask; bit 6 (DAZ) is outside the default mask 0xffbf.
    for (mask, value) in [(MASK, 0x1_1f80u32), (0, 0x1fc0), (MASK, 0x8000_0000)] {
        let mut cpu = sse_cpu();
        cpu.fx.0[28..32].copy_from_slice(&mask.to_le_bytes());
        cpu.poke(RBP - 4, &value.to_le_bytes());
        let before = cpu.clone();
        let applied = fixups.handle(&mut cpu, &LDMXCSR_RBP).unwrap();
        assert_eq!(applied.outcome, Outcome::Raised { vector: vector::GP });
        assert_eq!(cpu.injected, [(vector::GP, Some(0))]);
        assert_eq!(cpu.fx, before.fx);
        assert_eq!(cpu.regs, before.regs);
    }
    // DAZ is fine where the mask has it.
    let mut cpu = sse_cpu();
    cpu.poke(RBP - 4, &0x1fc0u32.to_le_bytes());
    fixups.handle(&mut cpu, &LDMXCSR_RBP).unwrap();
    assert_eq!(mxcsr(&cpu), 0x1fc0);
}

#[test]
fn ldmxcsr_and_stmxcsr_raise_ud_and_nm_like_hardware() {
    let fixups = active();
    for bytes in [LDMXCSR_RBP, STMXCSR_RBP] {
        for (cr0, cr4_clear, want) in [
            (CR0_EM, 0, vector::UD),
            (0, CR4_OSFXSR, vector::UD),
            (CR0_TS, 0, vector::NM),
            // #UD before #NM.
            (CR0_TS | CR0_EM, 0, vector::UD),
        ] {
            let mut cpu = sse_cpu();
            cpu.poke(RBP - 4, &0x1f80u32.to_le_bytes());
            cpu.sregs.cr0 |= cr0;
            cpu.sregs.cr4 &= !cr4_clear;
            let before = cpu.clone();
            let applied = fixups.handle(&mut cpu, &bytes).unwrap();
            assert_eq!(applied.outcome, Outcome::Raised { vector: want });
            assert_eq!(cpu.injected, [(want, None)]);
            assert_eq!(cpu.regs, before.regs);
            assert_eq!(cpu.fx, before.fx);
            assert_eq!(dword(&cpu, RBP - 4), 0x1f80);
        }
    }
}

#[test]
fn ldmxcsr_unmapped_raises_pf_with_cr2() {
    let fixups = active();
    let mut cpu = sse_cpu();
    let before = cpu.clone();
    let applied = fixups.handle(&mut cpu, &LDMXCSR_RBP).unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::PF });
    // Kernel read of a page not present: error code 0.
    assert_eq!(cpu.injected, [(vector::PF, Some(0))]);
    assert_eq!(cpu.sregs.cr2, RBP - 4);
    assert_eq!(cpu.regs, before.regs);
    assert_eq!(cpu.fx, before.fx);
    // From user mode: U bit, and no SMAP.
    let mut cpu = sse_cpu();
    cpu.sregs.cs = FakeVcpu::long_mode(3).sregs.cs;
    cpu.regs.rbp = 0x7ffc_0000_1000;
    fixups.handle(&mut cpu, &LDMXCSR_RBP).unwrap();
    assert_eq!(cpu.injected, [(vector::PF, Some(0b100))]);
    assert_eq!(cpu.sregs.cr2, 0x7ffc_0000_0ffc);
    assert!(cpu.last_data_access.get().unwrap().user);
    assert!(!cpu.last_data_access.get().unwrap().smap);
}

#[test]
fn ldmxcsr_alignment_check_only_at_cpl3_with_am_and_ac() {
    let fixups = active();
    let user = FakeVcpu::long_mode(3);
    let at = 0x7ffc_0000_1002u64;
    let setup = |am: bool, ac: bool, cpl3: bool| {
        let mut cpu = sse_cpu();
        if cpl3 {
            cpu.sregs.cs = user.sregs.cs;
        }
        if am {
            cpu.sregs.cr0 |= CR0_AM;
        }
        if ac {
            cpu.regs.rflags |= rflags::AC;
        }
        // ldmxcsr (%rdi), misaligned
        cpu.regs.rdi = at;
        cpu.poke(at, &0x1f81u32.to_le_bytes());
        cpu
    };
    let mut cpu = setup(true, true, true);
    let applied = fixups.handle(&mut cpu, &[0x0f, 0xae, 0x17]).unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::AC });
    assert_eq!(cpu.injected, [(vector::AC, Some(0))]);
    assert_eq!(mxcsr(&cpu), 0x1f80);
    for (am, ac, cpl3) in [
        (false, true, true),
        (true, false, true),
        (true, true, false),
    ] {
        let mut cpu = setup(am, ac, cpl3);
        let applied = fixups.handle(&mut cpu, &[0x0f, 0xae, 0x17]).unwrap();
        assert_eq!(applied.outcome, Outcome::Completed, "{am} {ac} {cpl3}");
        assert_eq!(mxcsr(&cpu), 0x1f81);
    }
}

#[test]
fn ldmxcsr_non_canonical_raises_ss_or_gp() {
    let fixups = active();
    let mut cpu = sse_cpu();
    cpu.regs.rbp = 0x0000_8000_0000_0004;
    let applied = fixups.handle(&mut cpu, &LDMXCSR_RBP).unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::SS });
    assert_eq!(cpu.injected, [(vector::SS, Some(0))]);
    let mut cpu = sse_cpu();
    cpu.regs.rax = 0x0000_8000_0000_0000;
    let applied = fixups.handle(&mut cpu, &[0x0f, 0xae, 0x10]).unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::GP });
    assert_eq!(cpu.injected, [(vector::GP, Some(0))]);
}

#[test]
fn stmxcsr_stores_mxcsr() {
    let fixups = active();
    let mut cpu = sse_cpu();
    cpu.fx.0[24..28].copy_from_slice(&0x3f80u32.to_le_bytes());
    cpu.poke(RBP - 8, &[0xee; 12]);
    let before = cpu.clone();
    let applied = fixups.handle(&mut cpu, &STMXCSR_RBP).unwrap();
    assert_eq!(applied.fixup, Fixup::Stmxcsr);
    assert_eq!(applied.outcome, Outcome::Completed);
    assert_eq!(dword(&cpu, RBP - 4), 0x3f80);
    // Only those four bytes were written.
    assert_eq!(dword(&cpu, RBP - 8), 0xeeee_eeee);
    assert_eq!(dword(&cpu, RBP), 0xeeee_eeee);
    assert_eq!(cpu.fx, before.fx);
    assert_eq!(cpu.fx_writes, 0);
    assert_eq!(cpu.regs.rip, RIP + 4);
    assert_eq!(fixups.hits(Fixup::Stmxcsr), 1);
}

#[test]
fn stmxcsr_to_a_read_only_page_raises_pf() {
    let fixups = active();
    let mut cpu = sse_cpu();
    cpu.poke(RBP - 4, &[0; 4]);
    cpu.read_only.insert((RBP - 4) / 0x1000);
    let before = cpu.clone();
    let applied = fixups.handle(&mut cpu, &STMXCSR_RBP).unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::PF });
    assert_eq!(cpu.injected, [(vector::PF, Some(0b011))]);
    assert_eq!(cpu.sregs.cr2, RBP - 4);
    assert_eq!(dword(&cpu, RBP - 4), 0);
    assert_eq!(cpu.regs, before.regs);
}

fn area(cpu: &FakeVcpu, at: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    cpu.read_virt(at, &mut b).unwrap();
    b
}

#[test]
fn fxsave64_stores_the_state_and_leaves_the_tail() {
    let fixups = active();
    let mut cpu = sse_cpu();
    cpu.regs.rdi = AREA;
    cpu.poke(AREA, &[0xcc; 512]);
    let before = cpu.clone();
    let applied = fixups.handle(&mut cpu, &[0x48, 0x0f, 0xae, 0x07]).unwrap();
    assert_eq!(applied.fixup, Fixup::Fxsave);
    assert_eq!(applied.outcome, Outcome::Completed);
    let stored = area(&cpu, AREA);
    assert_eq!(stored[..416], before.fx.0[..416]);
    assert_eq!(stored[416..], [0xcc; 96]);
    assert_eq!(cpu.fx, before.fx);
    assert_eq!(cpu.regs.rip, RIP + 4);
    assert!(!cpu.last_data_access.get().unwrap().user);
}

#[test]
fn fxsave_32_bit_layout_has_32_bit_fip_fdp_and_no_selectors() {
    let fixups = active();
    let mut cpu = sse_cpu();
    cpu.fx.0[8..16].copy_from_slice(&0xffff_ffff_8123_4567u64.to_le_bytes());
    cpu.fx.0[16..24].copy_from_slice(&0xffff_8880_89ab_cdefu64.to_le_bytes());
    cpu.regs.rax = AREA;
    cpu.poke(AREA, &[0xcc; 512]);
    fixups.handle(&mut cpu, &[0x0f, 0xae, 0x00]).unwrap();
    let stored = area(&cpu, AREA);
    assert_eq!(stored[8..12], 0x8123_4567u32.to_le_bytes());
    assert_eq!(stored[12..16], [0; 4]); // FCS, reserved
    assert_eq!(stored[16..20], 0x89ab_cdefu32.to_le_bytes());
    assert_eq!(stored[20..24], [0; 4]); // FDS, reserved
    assert_eq!(stored[..8], cpu.fx.0[..8]);
    assert_eq!(stored[24..416], cpu.fx.0[24..416]);
}

#[test]
fn fxsave_misaligned_raises_gp0_and_unmapped_second_page_raises_pf() {
    let fixups = active();
    let mut cpu = sse_cpu();
    cpu.regs.rdi = AREA + 8;
    cpu.poke(AREA, &[0xcc; 528]);
    let before = cpu.clone();
    let applied = fixups.handle(&mut cpu, &[0x48, 0x0f, 0xae, 0x07]).unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::GP });
    assert_eq!(cpu.injected, [(vector::GP, Some(0))]);
    assert_eq!(area(&cpu, AREA), area(&before, AREA));
    // The area's second half lies on an unmapped page: #PF there, nothing written.
    let page_end = 0xffff_8880_0124_0000u64;
    let mut cpu = sse_cpu();
    cpu.regs.rdi = page_end - 0x100;
    cpu.poke(page_end - 0x100, &[0xcc; 0x100]);
    let applied = fixups.handle(&mut cpu, &[0x48, 0x0f, 0xae, 0x07]).unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::PF });
    assert_eq!(cpu.injected, [(vector::PF, Some(0b010))]);
    assert_eq!(cpu.sregs.cr2, page_end);
    let mut first = vec![0u8; 0x100];
    cpu.read_virt(page_end - 0x100, &mut first).unwrap();
    assert_eq!(first, [0xcc; 0x100]);
    assert_eq!(cpu.regs.rip, RIP);
}

#[test]
fn fxsave_and_fxrstor_raise_nm_with_ts_or_em() {
    let fixups = active();
    for bytes in [[0x48, 0x0f, 0xae, 0x07], [0x48, 0x0f, 0xae, 0x0f]] {
        for cr0 in [CR0_TS, CR0_EM] {
            let mut cpu = sse_cpu();
            cpu.regs.rdi = AREA;
            cpu.poke(AREA, &[0; 512]);
            cpu.sregs.cr0 |= cr0;
            let before = cpu.clone();
            let applied = fixups.handle(&mut cpu, &bytes).unwrap();
            assert_eq!(applied.outcome, Outcome::Raised { vector: vector::NM });
            assert_eq!(cpu.fx, before.fx);
            assert_eq!(area(&cpu, AREA), [0; 512]);
        }
    }
}

/// An FXSAVE area at AREA holding a state different from the vCPU's.
fn fxrstor_cpu() -> FakeVcpu {
    let mut cpu = sse_cpu();
    cpu.regs.rdi = AREA;
    let mut saved = [0u8; 512];
    for (i, b) in saved.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(13) ^ 0xa5;
    }
    saved[24..28].copy_from_slice(&0x1fa0u32.to_le_bytes());
    // A different mask in memory: ignored, the CPU's stays.
    saved[28..32].copy_from_slice(&0x1234u32.to_le_bytes());
    cpu.poke(AREA, &saved);
    cpu
}

#[test]
fn fxrstor64_loads_the_state() {
    let fixups = active();
    let mut cpu = fxrstor_cpu();
    let before = cpu.clone();
    let saved = area(&cpu, AREA);
    let applied = fixups.handle(&mut cpu, &[0x48, 0x0f, 0xae, 0x0f]).unwrap();
    assert_eq!(applied.fixup, Fixup::Fxrstor);
    assert_eq!(applied.outcome, Outcome::Completed);
    assert_eq!(cpu.fx.0[..28], saved[..28]);
    assert_eq!(cpu.fx.0[28..32], MASK.to_le_bytes());
    assert_eq!(cpu.fx.0[32..416], saved[32..416]);
    assert_eq!(cpu.fx.0[416..], before.fx.0[416..]);
    assert_eq!(mxcsr(&cpu), 0x1fa0);
    assert_eq!(cpu.regs.rip, RIP + 4);
    assert_eq!(area(&cpu, AREA), saved);
    assert_eq!(fixups.hits(Fixup::Fxrstor), 1);
}

#[test]
fn fxrstor_32_bit_layout_zero_extends_fip_fdp() {
    let fixups = active();
    let mut cpu = fxrstor_cpu();
    let saved = area(&cpu, AREA);
    fixups.handle(&mut cpu, &[0x0f, 0xae, 0x0f]).unwrap();
    let fip = u64::from(u32::from_le_bytes(saved[8..12].try_into().unwrap()));
    let fdp = u64::from(u32::from_le_bytes(saved[16..20].try_into().unwrap()));
    assert_eq!(cpu.fx.0[8..16], fip.to_le_bytes());
    assert_eq!(cpu.fx.0[16..24], fdp.to_le_bytes());
    assert_eq!(cpu.fx.0[..8], saved[..8]);
    assert_eq!(cpu.fx.0[32..416], saved[32..416]);
}

#[test]
fn fxrstor_reserved_mxcsr_bits_raise_gp0_and_load_nothing() {
    let fixups = active();
    let mut cpu = fxrstor_cpu();
    cpu.poke(AREA + 24, &0x2_1f80u32.to_le_bytes());
    let before = cpu.clone();
    let applied = fixups.handle(&mut cpu, &[0x48, 0x0f, 0xae, 0x0f]).unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::GP });
    assert_eq!(cpu.injected, [(vector::GP, Some(0))]);
    assert_eq!(cpu.fx, before.fx);
    assert_eq!(cpu.fx_writes, 0);
    assert_eq!(cpu.regs, before.regs);
}

#[test]
fn fxrstor_without_osfxsr_keeps_mxcsr_and_xmm() {
    let fixups = active();
    let mut cpu = fxrstor_cpu();
    cpu.sregs.cr4 &= !CR4_OSFXSR;
    // Even a reserved MXCSR in memory is not looked at.
    cpu.poke(AREA + 24, &0xffff_ffffu32.to_le_bytes());
    let before = cpu.clone();
    let saved = area(&cpu, AREA);
    fixups.handle(&mut cpu, &[0x48, 0x0f, 0xae, 0x0f]).unwrap();
    assert_eq!(cpu.fx.0[..24], saved[..24]);
    assert_eq!(cpu.fx.0[24..32], before.fx.0[24..32]);
    assert_eq!(cpu.fx.0[32..160], saved[32..160]);
    assert_eq!(cpu.fx.0[160..], before.fx.0[160..]);
}

#[test]
fn fxrstor_unmapped_raises_pf_and_pending_exception_fails_cleanly() {
    let fixups = active();
    let mut cpu = fxrstor_cpu();
    cpu.unmap(AREA);
    let before = cpu.clone();
    let applied = fixups.handle(&mut cpu, &[0x48, 0x0f, 0xae, 0x0f]).unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::PF });
    assert_eq!(cpu.injected, [(vector::PF, Some(0))]);
    assert_eq!(cpu.sregs.cr2, AREA);
    assert_eq!(cpu.fx, before.fx);
    // With an exception already pending nothing changes and the failure is an error.
    let mut cpu = fxrstor_cpu();
    cpu.unmap(AREA);
    cpu.exception_pending = true;
    let before = cpu.clone();
    let err = fixups
        .handle(&mut cpu, &[0x48, 0x0f, 0xae, 0x0f])
        .unwrap_err();
    assert!(
        matches!(
            err,
            FixupError::Apply {
                fixup: Fixup::Fxrstor,
                source: VcpuError::ExceptionPending { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(cpu.regs, before.regs);
    assert_eq!(cpu.sregs.cr2, before.sregs.cr2);
    assert_eq!(cpu.fx, before.fx);
}

#[test]
fn group15_fixups_are_named_when_disabled() {
    let fixups = Fixups::with_host(FixupMode::Off, true);
    let mut cpu = sse_cpu();
    let err = fixups.handle(&mut cpu, &LDMXCSR_RBP).unwrap_err();
    assert!(
        matches!(
            err,
            FixupError::Disabled {
                recognised: Some(Fixup::Ldmxcsr),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(cpu.writes, 0);
    assert_eq!(cpu.fx_writes, 0);
}

#[test]
fn fxsave_at_the_top_of_the_address_space_does_not_overflow() {
    // The last 256 bytes of the address space: the area wraps; nothing is mapped there, so
    // a #PF, and no arithmetic overflow on the way.
    let fixups = active();
    let mut cpu = sse_cpu();
    cpu.regs.rdi = 0xffff_ffff_ffff_ff00;
    let applied = fixups.handle(&mut cpu, &[0x48, 0x0f, 0xae, 0x07]).unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::PF });
    assert_eq!(cpu.sregs.cr2, 0xffff_ffff_ffff_ff00);
}
