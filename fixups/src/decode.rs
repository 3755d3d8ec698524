//! Decoder for the few instructions the fix-ups handle.
//!
//! Input is the instruction bytes KVM reports at RIP (or bytes fetched there); output is one of
//! the recognised instructions or `None`. Only exact encodings match: anything that merely looks
//! alike (other `0f 01` group members, `int 3` written as `cd 03`, popcnt with a memory operand,
//! a lock or repne prefix, bytes cut short) is not recognised and stays an unhandled failure.
//!
//! `cmpxchg16b` and the x87/SSE state instructions of group 15 (`fxsave`, `fxrstor`, `ldmxcsr`,
//! `stmxcsr`) have a memory operand: its ModRM/SIB/displacement are decoded into a
//! [`MemOperand`], whose effective address the fix-up computes from the registers.

/// Execution mode of the vCPU, which decides default operand size and whether REX exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// Real mode, virtual-8086 mode, or protected mode with a 16-bit code segment.
    Bits16,
    /// Protected mode (or compatibility mode) with a 32-bit code segment.
    Bits32,
    /// 64-bit long mode (EFER.LMA and CS.L set).
    Bits64,
}

/// Operand size of an instruction with a general-purpose register destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperandSize {
    /// 16-bit: the upper 48 bits of the destination are preserved.
    Word,
    /// 32-bit: the destination is zero-extended to 64 bits.
    Dword,
    /// 64-bit (REX.W).
    Qword,
}

impl OperandSize {
    /// Mask selecting the operand's bits.
    pub fn mask(self) -> u64 {
        match self {
            OperandSize::Word => 0xffff,
            OperandSize::Dword => 0xffff_ffff,
            OperandSize::Qword => u64::MAX,
        }
    }
}

/// An instruction the fix-ups know how to complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insn {
    /// `clac` (`0f 01 ca`): clear RFLAGS.AC.
    Clac,
    /// `stac` (`0f 01 cb`): set RFLAGS.AC.
    Stac,
    /// `fwait`/`wait` (`9b`): a standalone instruction even when an x87 instruction follows.
    Fwait,
    /// `int3` (`cc`): breakpoint trap.
    Int3,
    /// `popcnt reg, reg` (`f3 [rex] 0f b8 /r` with mod == 11).
    Popcnt {
        /// Operand size.
        size: OperandSize,
        /// Destination register number (0 = rAX .. 15 = r15, hardware order).
        dst: u8,
        /// Source register number (hardware order).
        src: u8,
        /// Encoded length in bytes, prefixes included.
        len: u8,
    },
    /// `[lock] cmpxchg16b m128` (`[f0] rex.w 0f c7 /1`, memory form, 64-bit mode only).
    Cmpxchg16b {
        /// The memory operand.
        mem: MemOperand,
        /// Whether the `lock` prefix is present (the fix-up is atomic either way).
        lock: bool,
        /// Encoded length in bytes, prefixes included.
        len: u8,
    },
    /// `fxsave`, `fxrstor`, `ldmxcsr`, `stmxcsr` with a memory operand
    /// (`[seg] [67] [rex] 0f ae /0../3`, 64-bit mode only).
    FxState {
        /// Which one.
        op: FxOp,
        /// The memory operand.
        mem: MemOperand,
        /// REX.W: the 64-bit FXSAVE layout (`fxsave64`/`fxrstor64`).
        rex_w: bool,
        /// Encoded length in bytes, prefixes included.
        len: u8,
    },
}

/// The x87/SSE state instructions of opcode group 15 (`0f ae /0../3`, memory forms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FxOp {
    /// `fxsave m512` (`/0`): store the x87 and SSE state.
    Fxsave,
    /// `fxrstor m512` (`/1`): load the x87 and SSE state.
    Fxrstor,
    /// `ldmxcsr m32` (`/2`): load MXCSR.
    Ldmxcsr,
    /// `stmxcsr m32` (`/3`): store MXCSR.
    Stmxcsr,
}

/// A segment whose base a memory operand adds in 64-bit mode (the others have base 0 there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentBase {
    /// No `fs`/`gs` override: base 0.
    Flat,
    /// `fs` override (`64`).
    Fs,
    /// `gs` override (`65`).
    Gs,
}

/// A decoded 64-bit-mode memory operand: `segment:[base + index * scale + disp]`, or
/// `[rip + disp]`, optionally truncated to 32 bits by the address-size prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    /// Base register (hardware numbering, 0..=15); `None` for no base or RIP-relative.
    pub base: Option<u8>,
    /// Index register and scale (1, 2, 4 or 8); `None` without an index.
    pub index: Option<(u8, u8)>,
    /// Sign-extended displacement.
    pub disp: i32,
    /// RIP-relative: the address is RIP of the *next* instruction plus `disp`.
    pub rip_relative: bool,
    /// 32-bit addressing (`67` prefix): registers and the result are taken modulo 2^32.
    pub addr32: bool,
    /// Segment base added to the effective address.
    pub segment: SegmentBase,
    /// The default segment is SS (base rSP or rBP, no override): a non-canonical address
    /// then raises #SS rather than #GP.
    pub stack: bool,
}

impl Insn {
    /// Encoded length in bytes.
    pub fn length(&self) -> u8 {
        match self {
            Insn::Clac | Insn::Stac => 3,
            Insn::Fwait | Insn::Int3 => 1,
            Insn::Popcnt { len, .. } | Insn::Cmpxchg16b { len, .. } | Insn::FxState { len, .. } => {
                *len
            }
        }
    }
}

/// Architectural limit on the length of one instruction.
pub const MAX_INSN_LEN: usize = 15;

const PREFIX_OPSIZE: u8 = 0x66;
const PREFIX_ADDRSIZE: u8 = 0x67;
const PREFIX_REP: u8 = 0xf3;
const PREFIX_REPNE: u8 = 0xf2;
const PREFIX_LOCK: u8 = 0xf0;
const SEGMENT_PREFIXES: [u8; 6] = [0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65];

/// Decodes the instruction at the start of `bytes` in `mode`.
///
/// Returns `None` for anything that is not exactly one of [`Insn`]'s encodings, including bytes
/// cut short before the instruction is complete.
pub fn decode(bytes: &[u8], mode: CpuMode) -> Option<Insn> {
    let bytes = &bytes[..bytes.len().min(MAX_INSN_LEN)];
    match bytes {
        // Bare encodings only: Linux never emits prefixes on these, and prefixed forms are
        // either reserved or mean something else.
        [0x0f, 0x01, 0xca, ..] => Some(Insn::Clac),
        [0x0f, 0x01, 0xcb, ..] => Some(Insn::Stac),
        [0x9b, ..] => Some(Insn::Fwait),
        [0xcc, ..] => Some(Insn::Int3),
        _ => decode_popcnt(bytes, mode)
            .or_else(|| decode_cmpxchg16b(bytes, mode))
            .or_else(|| decode_group15(bytes, mode)),
    }
}

/// Legacy prefixes seen before the opcode.
#[derive(Default)]
struct Prefixes {
    opsize: bool,
    rep: bool,
}

fn decode_popcnt(bytes: &[u8], mode: CpuMode) -> Option<Insn> {
    let mut prefixes = Prefixes::default();
    let mut pos = 0;
    while let Some(&b) = bytes.get(pos) {
        match b {
            PREFIX_OPSIZE => prefixes.opsize = true,
            PREFIX_REP => prefixes.rep = true,
            // repne changes which mandatory prefix applies; lock makes it #UD.
            PREFIX_REPNE | PREFIX_LOCK => return None,
            // Address size and segment overrides are harmless on a register-only form.
            PREFIX_ADDRSIZE => {}
            b if SEGMENT_PREFIXES.contains(&b) => {}
            _ => break,
        }
        pos += 1;
    }
    if !prefixes.rep {
        return None;
    }
    // REX exists only in 64-bit mode and only directly before the opcode; in other modes
    // 0x40..0x4f are inc/dec and end the instruction.
    let mut rex = 0u8;
    if mode == CpuMode::Bits64 {
        if let Some(&b) = bytes.get(pos) {
            if b & 0xf0 == 0x40 {
                rex = b;
                pos += 1;
            }
        }
    }
    let rest = bytes.get(pos..)?;
    let modrm = match rest {
        [0x0f, 0xb8, modrm, ..] => *modrm,
        _ => return None,
    };
    // Register-to-register form only.
    if modrm >> 6 != 0b11 {
        return None;
    }
    let rex_w = rex & 0x8 != 0;
    let rex_r = (rex >> 2) & 1;
    let rex_b = rex & 1;
    let size = if rex_w {
        OperandSize::Qword
    } else {
        match (mode, prefixes.opsize) {
            (CpuMode::Bits16, false) | (CpuMode::Bits32, true) | (CpuMode::Bits64, true) => {
                OperandSize::Word
            }
            (CpuMode::Bits16, true) | (CpuMode::Bits32, false) | (CpuMode::Bits64, false) => {
                OperandSize::Dword
            }
        }
    };
    let dst = ((modrm >> 3) & 7) | (rex_r << 3);
    let src = (modrm & 7) | (rex_b << 3);
    let len = pos + 3;
    if len > MAX_INSN_LEN {
        return None;
    }
    Some(Insn::Popcnt {
        size,
        dst,
        src,
        len: len as u8,
    })
}

const PREFIX_FS: u8 = 0x64;
const PREFIX_GS: u8 = 0x65;

/// `[f0] [seg] [67] rex.w 0f c7 /1` with a memory operand, in 64-bit mode. REX.W selects
/// cmpxchg16b over cmpxchg8b; REX.X and REX.B extend the index and base registers.
fn decode_cmpxchg16b(bytes: &[u8], mode: CpuMode) -> Option<Insn> {
    // REX.W exists only in 64-bit mode.
    if mode != CpuMode::Bits64 {
        return None;
    }
    let mut lock = false;
    let mut addr32 = false;
    let mut segment = None;
    let mut pos = 0;
    while let Some(&b) = bytes.get(pos) {
        match b {
            PREFIX_LOCK => lock = true,
            PREFIX_ADDRSIZE => addr32 = true,
            // The last segment override wins, as on hardware.
            b if SEGMENT_PREFIXES.contains(&b) => segment = Some(b),
            // 66/f2/f3 select other instructions in the 0f c7 group (or xacquire/xrelease
            // hints): not handled.
            _ => break,
        }
        pos += 1;
    }
    let rex = *bytes.get(pos)?;
    if rex & 0xf0 != 0x40 || rex & 0x8 == 0 {
        return None;
    }
    pos += 1;
    let modrm = match bytes.get(pos..)? {
        [0x0f, 0xc7, modrm, ..] => *modrm,
        _ => return None,
    };
    pos += 3;
    let reg = (modrm >> 3) & 7;
    // /1 only; mod == 11 would be a register operand (#UD for cmpxchg16b).
    if reg != 1 || modrm >> 6 == 0b11 {
        return None;
    }
    let (mem, len) = decode_mem64(bytes, pos, modrm, rex, segment, addr32)?;
    Some(Insn::Cmpxchg16b { mem, lock, len })
}

/// Decodes the memory operand of a 64-bit-mode instruction whose ModRM byte (`modrm`, memory
/// form: mod != 11) is followed by the SIB/displacement bytes at `bytes[pos..]`. `rex` is the
/// REX prefix (0 without one), `segment` the last segment override, `addr32` the `67` prefix.
/// Returns the operand and the instruction's total length, or `None` when the bytes are cut
/// short or the instruction would be longer than 15 bytes.
fn decode_mem64(
    bytes: &[u8],
    mut pos: usize,
    modrm: u8,
    rex: u8,
    segment: Option<u8>,
    addr32: bool,
) -> Option<(MemOperand, u8)> {
    let md = modrm >> 6;
    let rm = modrm & 7;
    if md == 0b11 {
        return None;
    }
    let rex_x = (rex >> 1) & 1;
    let rex_b = rex & 1;
    let mut base = None;
    let mut index = None;
    let mut rip_relative = false;
    let mut disp_len = match md {
        0b01 => 1,
        0b10 => 4,
        _ => 0,
    };
    if rm == 0b100 {
        let sib = *bytes.get(pos)?;
        pos += 1;
        let scale = 1u8 << (sib >> 6);
        let idx = ((sib >> 3) & 7) | (rex_x << 3);
        // Index 100 without REX.X means no index (r12 can be an index).
        if idx != 0b100 {
            index = Some((idx, scale));
        }
        let sib_base = sib & 7;
        if sib_base == 0b101 && md == 0b00 {
            // No base, disp32 (whatever REX.B says).
            disp_len = 4;
        } else {
            base = Some(sib_base | (rex_b << 3));
        }
    } else if rm == 0b101 && md == 0b00 {
        // RIP-relative disp32 (whatever REX.B says).
        rip_relative = true;
        disp_len = 4;
    } else {
        base = Some(rm | (rex_b << 3));
    }
    let disp = match disp_len {
        1 => i32::from(*bytes.get(pos)? as i8),
        4 => i32::from_le_bytes(bytes.get(pos..pos + 4)?.try_into().ok()?),
        _ => 0,
    };
    pos += disp_len;
    if pos > MAX_INSN_LEN {
        return None;
    }
    let segment_base = match segment {
        Some(PREFIX_FS) => SegmentBase::Fs,
        Some(PREFIX_GS) => SegmentBase::Gs,
        _ => SegmentBase::Flat,
    };
    // SS is the default segment for rSP/rBP bases (not r12/r13) when no override is given.
    let stack = match segment {
        Some(s) => s == 0x36,
        None => matches!(base, Some(4) | Some(5)),
    };
    Some((
        MemOperand {
            base,
            index,
            disp,
            rip_relative,
            addr32,
            segment: segment_base,
            stack,
        },
        pos as u8,
    ))
}

/// `[seg] [67] [rex] 0f ae /0../3` with a memory operand, in 64-bit mode: fxsave, fxrstor,
/// ldmxcsr, stmxcsr. REX.W selects the 64-bit FXSAVE layout (fxsave64/fxrstor64; ignored by
/// ldmxcsr/stmxcsr). A lock prefix (#UD), 66/f2/f3 (other instructions of the group:
/// rdfsbase and friends, clflushopt, ...) and every other member of group 15 (xsave family,
/// clflush, fences) are not recognised.
fn decode_group15(bytes: &[u8], mode: CpuMode) -> Option<Insn> {
    if mode != CpuMode::Bits64 {
        return None;
    }
    let mut addr32 = false;
    let mut segment = None;
    let mut pos = 0;
    while let Some(&b) = bytes.get(pos) {
        match b {
            PREFIX_ADDRSIZE => addr32 = true,
            b if SEGMENT_PREFIXES.contains(&b) => segment = Some(b),
            _ => break,
        }
        pos += 1;
    }
    let mut rex = 0u8;
    if let Some(&b) = bytes.get(pos) {
        if b & 0xf0 == 0x40 {
            rex = b;
            pos += 1;
        }
    }
    let modrm = match bytes.get(pos..)? {
        [0x0f, 0xae, modrm, ..] => *modrm,
        _ => return None,
    };
    pos += 3;
    let op = match (modrm >> 3) & 7 {
        0 => FxOp::Fxsave,
        1 => FxOp::Fxrstor,
        2 => FxOp::Ldmxcsr,
        3 => FxOp::Stmxcsr,
        _ => return None,
    };
    let (mem, len) = decode_mem64(bytes, pos, modrm, rex, segment, addr32)?;
    Some(Insn::FxState {
        op,
        mem,
        rex_w: rex & 0x8 != 0,
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use CpuMode::*;

    #[test]
    fn clac_and_stac() {
        assert_eq!(decode(&[0x0f, 0x01, 0xca], Bits64), Some(Insn::Clac));
        assert_eq!(decode(&[0x0f, 0x01, 0xcb], Bits64), Some(Insn::Stac));
        // Trailing bytes of the following instructions do not matter.
        assert_eq!(
            decode(&[0x0f, 0x01, 0xca, 0xfc, 0x48, 0x89, 0xe5], Bits64),
            Some(Insn::Clac)
        );
        assert_eq!(decode(&[0x0f, 0x01, 0xca], Bits32), Some(Insn::Clac));
        assert_eq!(Insn::Clac.length(), 3);
    }

    #[test]
    fn clac_lookalikes_do_not_match() {
        for bytes in [
            &[0x0f, 0x01, 0xc8][..], // monitor
            &[0x0f, 0x01, 0xc9],     // mwait
            &[0x0f, 0x01, 0xcc],
            &[0x0f, 0x01, 0xd0], // xgetbv
            &[0x0f, 0x01, 0xf8], // swapgs
            &[0x0f, 0x00, 0xca],
            &[0x66, 0x0f, 0x01, 0xca], // prefixed: not what Linux emits
            &[0x48, 0x0f, 0x01, 0xcb],
        ] {
            assert_eq!(decode(bytes, Bits64), None, "{bytes:02x?}");
        }
    }

    #[test]
    fn truncated_bytes_do_not_match() {
        for bytes in [
            &[][..],
            &[0x0f],
            &[0x0f, 0x01],
            &[0xf3],
            &[0xf3, 0x0f],
            &[0xf3, 0x0f, 0xb8],
            &[0xf3, 0x48, 0x0f, 0xb8],
            &[0x66, 0xf3, 0x48],
        ] {
            assert_eq!(decode(bytes, Bits64), None, "{bytes:02x?}");
        }
    }

    #[test]
    fn fwait_is_one_byte_even_before_x87_instructions() {
        assert_eq!(decode(&[0x9b], Bits64), Some(Insn::Fwait));
        // fstcw [rbp-4] is fwait followed by fnstcw: only the fwait is completed here.
        let fstcw = [0x9b, 0xd9, 0x7d, 0xfc];
        assert_eq!(decode(&fstcw, Bits64), Some(Insn::Fwait));
        assert_eq!(Insn::Fwait.length(), 1);
        // Prefixed or not starting with 9b: not fwait.
        assert_eq!(decode(&[0x66, 0x9b], Bits64), None);
        assert_eq!(decode(&[0xd9, 0x7d, 0xfc], Bits64), None);
        assert_eq!(decode(&[0xdf, 0xe0], Bits64), None); // fnstsw ax
    }

    #[test]
    fn int3_only_in_its_one_byte_form() {
        assert_eq!(decode(&[0xcc], Bits64), Some(Insn::Int3));
        assert_eq!(decode(&[0xcc, 0x90], Bits32), Some(Insn::Int3));
        assert_eq!(decode(&[0xcd, 0x03], Bits64), None); // int 3 (INT n form)
        assert_eq!(decode(&[0xcd, 0x80], Bits32), None);
        assert_eq!(decode(&[0xf1], Bits64), None); // int1
        assert_eq!(decode(&[0xce], Bits32), None); // into
    }

    fn popcnt(size: OperandSize, dst: u8, src: u8, len: u8) -> Option<Insn> {
        Some(Insn::Popcnt {
            size,
            dst,
            src,
            len,
        })
    }

    #[test]
    fn popcnt_register_forms() {
        use OperandSize::*;
        // popcnt eax, ecx
        assert_eq!(
            decode(&[0xf3, 0x0f, 0xb8, 0xc1], Bits64),
            popcnt(Dword, 0, 1, 4)
        );
        // popcnt rax, rdi
        assert_eq!(
            decode(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7], Bits64),
            popcnt(Qword, 0, 7, 5)
        );
        // popcnt r9, r15 (REX.WRB)
        assert_eq!(
            decode(&[0xf3, 0x4d, 0x0f, 0xb8, 0xcf], Bits64),
            popcnt(Qword, 9, 15, 5)
        );
        // popcnt r10d, esp (REX.R only)
        assert_eq!(
            decode(&[0xf3, 0x44, 0x0f, 0xb8, 0xd4], Bits64),
            popcnt(Dword, 10, 4, 5)
        );
        // popcnt ax, dx (66 prefix, either order with f3)
        assert_eq!(
            decode(&[0x66, 0xf3, 0x0f, 0xb8, 0xc2], Bits64),
            popcnt(Word, 0, 2, 5)
        );
        assert_eq!(
            decode(&[0xf3, 0x66, 0x0f, 0xb8, 0xc2], Bits64),
            popcnt(Word, 0, 2, 5)
        );
        // REX.W wins over 66.
        assert_eq!(
            decode(&[0x66, 0xf3, 0x48, 0x0f, 0xb8, 0xc2], Bits64),
            popcnt(Qword, 0, 2, 6)
        );
        // Segment override is harmless on a register form.
        assert_eq!(
            decode(&[0x2e, 0xf3, 0x0f, 0xb8, 0xd8], Bits64),
            popcnt(Dword, 3, 0, 5)
        );
    }

    #[test]
    fn popcnt_operand_size_follows_mode() {
        use OperandSize::*;
        let bytes = [0xf3, 0x0f, 0xb8, 0xc1];
        assert_eq!(decode(&bytes, Bits32), popcnt(Dword, 0, 1, 4));
        assert_eq!(decode(&bytes, Bits16), popcnt(Word, 0, 1, 4));
        let prefixed = [0x66, 0xf3, 0x0f, 0xb8, 0xc1];
        assert_eq!(decode(&prefixed, Bits32), popcnt(Word, 0, 1, 5));
        assert_eq!(decode(&prefixed, Bits16), popcnt(Dword, 0, 1, 5));
    }

    #[test]
    fn popcnt_lookalikes_do_not_match() {
        for bytes in [
            &[0x0f, 0xb8, 0xc1][..],   // jmpe / no mandatory prefix
            &[0xf2, 0x0f, 0xb8, 0xc1], // repne
            &[0xf3, 0xf2, 0x0f, 0xb8, 0xc1],
            &[0xf0, 0xf3, 0x0f, 0xb8, 0xc1],             // lock
            &[0xf3, 0x0f, 0xb8, 0x01],                   // memory operand [rcx]
            &[0xf3, 0x0f, 0xb8, 0x44, 0x24, 0x08],       // memory operand [rsp+8]
            &[0xf3, 0x48, 0x0f, 0xb8, 0x87, 0, 0, 0, 0], // [rdi+disp32]
            &[0xf3, 0x0f, 0xbc, 0xc1],                   // tzcnt
            &[0xf3, 0x0f, 0xbd, 0xc1],                   // lzcnt
            &[0xf3, 0x0f, 0xb9, 0xc1],
            // REX before a legacy prefix is ignored by hardware; too unusual to handle.
            &[0xf3, 0x48, 0x66, 0x0f, 0xb8, 0xc1],
            &[0xf3, 0x90], // pause
        ] {
            assert_eq!(decode(bytes, Bits64), None, "{bytes:02x?}");
        }
    }

    #[test]
    fn rex_is_not_a_prefix_outside_64_bit_mode() {
        // In 32-bit code 0x48 is `dec eax`, so this is not popcnt.
        assert_eq!(decode(&[0xf3, 0x48, 0x0f, 0xb8, 0xc1], Bits32), None);
        assert_eq!(decode(&[0xf3, 0x48, 0x0f, 0xb8, 0xc1], Bits16), None);
    }

    #[test]
    fn overlong_instruction_is_rejected() {
        // 12 segment prefixes + f3 + 0f b8 c1 = 16 bytes > 15.
        let mut bytes = vec![0x2e; 12];
        bytes.extend_from_slice(&[0xf3, 0x0f, 0xb8, 0xc1]);
        assert_eq!(decode(&bytes, Bits64), None);
        // 11 prefixes: exactly 15 bytes, fine.
        let ok = &bytes[1..];
        assert!(matches!(
            decode(ok, Bits64),
            Some(Insn::Popcnt { len: 15, .. })
        ));
    }

    fn mem(base: Option<u8>, index: Option<(u8, u8)>, disp: i32) -> MemOperand {
        MemOperand {
            base,
            index,
            disp,
            rip_relative: false,
            addr32: false,
            segment: SegmentBase::Flat,
            stack: matches!(base, Some(4) | Some(5)),
        }
    }

    fn cx16(mem: MemOperand, lock: bool, len: u8) -> Option<Insn> {
        Some(Insn::Cmpxchg16b { mem, lock, len })
    }

    #[test]
    fn cmpxchg16b_as_debian_emits_it() {
        // lock cmpxchg16b 0x20(%rbp); je ... (the bytes KVM reported)
        let bytes = [0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20, 0x74, 0x66];
        assert_eq!(
            decode(&bytes, Bits64),
            cx16(mem(Some(5), None, 0x20), true, 6)
        );
    }

    #[test]
    fn cmpxchg16b_addressing_forms() {
        // (%rdi)
        assert_eq!(
            decode(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f], Bits64),
            cx16(mem(Some(7), None, 0), true, 5)
        );
        // Without lock: still cmpxchg16b.
        assert_eq!(
            decode(&[0x48, 0x0f, 0xc7, 0x0f], Bits64),
            cx16(mem(Some(7), None, 0), false, 4)
        );
        // -0x10(%r13): REX.B, disp8 sign-extended
        assert_eq!(
            decode(&[0xf0, 0x49, 0x0f, 0xc7, 0x4d, 0xf0], Bits64),
            cx16(mem(Some(13), None, -16), true, 6)
        );
        // 0x12345678(%rsi) disp32
        assert_eq!(
            decode(
                &[0xf0, 0x48, 0x0f, 0xc7, 0x8e, 0x78, 0x56, 0x34, 0x12],
                Bits64
            ),
            cx16(mem(Some(6), None, 0x1234_5678), true, 9)
        );
        // (%rsp): SIB with no index
        assert_eq!(
            decode(&[0xf0, 0x48, 0x0f, 0xc7, 0x0c, 0x24], Bits64),
            cx16(mem(Some(4), None, 0), true, 6)
        );
        // (%r12): SIB required even with REX.B; not a stack reference
        assert_eq!(
            decode(&[0xf0, 0x49, 0x0f, 0xc7, 0x0c, 0x24], Bits64),
            cx16(mem(Some(12), None, 0), true, 6)
        );
        // 0x8(%rax,%rcx,8)
        assert_eq!(
            decode(&[0xf0, 0x48, 0x0f, 0xc7, 0x4c, 0xc8, 0x08], Bits64),
            cx16(mem(Some(0), Some((1, 8)), 8), true, 7)
        );
        // (%r9,%r12,2): REX.X makes index 100 mean r12
        assert_eq!(
            decode(&[0xf0, 0x4b, 0x0f, 0xc7, 0x0c, 0x61], Bits64),
            cx16(mem(Some(9), Some((12, 2)), 0), true, 6)
        );
        // 0x1000(,%rdx,4): SIB base 101 with mod 00 = no base, disp32
        assert_eq!(
            decode(&[0xf0, 0x48, 0x0f, 0xc7, 0x0c, 0x95, 0, 0x10, 0, 0], Bits64),
            cx16(mem(None, Some((2, 4)), 0x1000), true, 10)
        );
        // 0x10(%r13) with SIB base 101 and mod 01: base r13, disp8
        assert_eq!(
            decode(&[0x49, 0x0f, 0xc7, 0x4c, 0x25, 0x10], Bits64),
            cx16(mem(Some(13), None, 0x10), false, 6)
        );
        // -0x20(%rip)
        let mut rip_rel = mem(None, None, -0x20);
        rip_rel.rip_relative = true;
        assert_eq!(
            decode(
                &[0xf0, 0x48, 0x0f, 0xc7, 0x0d, 0xe0, 0xff, 0xff, 0xff],
                Bits64
            ),
            cx16(rip_rel, true, 9)
        );
        // REX.B does not turn RIP-relative into r13.
        assert_eq!(
            decode(
                &[0xf0, 0x49, 0x0f, 0xc7, 0x0d, 0xe0, 0xff, 0xff, 0xff],
                Bits64
            ),
            cx16(rip_rel, true, 9)
        );
    }

    #[test]
    fn cmpxchg16b_prefixes() {
        // %gs:0x18(%rbx), prefixes in either order; the default SS of rbp is overridden.
        let mut gs = mem(Some(3), None, 0x18);
        gs.segment = SegmentBase::Gs;
        assert_eq!(
            decode(&[0x65, 0xf0, 0x48, 0x0f, 0xc7, 0x4b, 0x18], Bits64),
            cx16(gs, true, 7)
        );
        assert_eq!(
            decode(&[0xf0, 0x65, 0x48, 0x0f, 0xc7, 0x4b, 0x18], Bits64),
            cx16(gs, true, 7)
        );
        let mut fs_rbp = mem(Some(5), None, 0);
        fs_rbp.segment = SegmentBase::Fs;
        fs_rbp.stack = false;
        assert_eq!(
            decode(&[0x64, 0x48, 0x0f, 0xc7, 0x4d, 0x00], Bits64),
            cx16(fs_rbp, false, 6)
        );
        // ds/es/cs overrides have base 0; the last override wins.
        let mut flat = mem(Some(3), None, 0);
        flat.stack = false;
        assert_eq!(
            decode(&[0x3e, 0x48, 0x0f, 0xc7, 0x0b], Bits64),
            cx16(flat, false, 5)
        );
        assert_eq!(
            decode(&[0x65, 0x26, 0x48, 0x0f, 0xc7, 0x0b], Bits64),
            cx16(flat, false, 6)
        );
        // ss override makes it a stack reference.
        let mut ss = flat;
        ss.stack = true;
        assert_eq!(
            decode(&[0x36, 0x48, 0x0f, 0xc7, 0x0b], Bits64),
            cx16(ss, false, 5)
        );
        // Address-size prefix: 32-bit addressing.
        let mut a32 = mem(Some(7), None, 0);
        a32.addr32 = true;
        assert_eq!(
            decode(&[0x67, 0xf0, 0x48, 0x0f, 0xc7, 0x0f], Bits64),
            cx16(a32, true, 6)
        );
    }

    #[test]
    fn cmpxchg16b_lookalikes_do_not_match() {
        for bytes in [
            &[0xf0, 0x0f, 0xc7, 0x4d, 0x20][..],         // cmpxchg8b (no REX)
            &[0xf0, 0x41, 0x0f, 0xc7, 0x4d, 0x20],       // cmpxchg8b (REX without W)
            &[0xf0, 0x48, 0x0f, 0xc7, 0xc9],             // register form
            &[0x48, 0x0f, 0xc7, 0xf0],                   // rdrand rax
            &[0x48, 0x0f, 0xc7, 0xf8],                   // rdseed rax
            &[0x48, 0x0f, 0xc7, 0x45, 0x20],             // /0: undefined
            &[0x48, 0x0f, 0xc7, 0x65, 0x20],             // /4: xsavec
            &[0x48, 0x0f, 0xc7, 0x5d, 0x20],             // /3: xrstors
            &[0x48, 0x0f, 0xc7, 0x6d, 0x20],             // /5: xsaves
            &[0x66, 0x48, 0x0f, 0xc7, 0x4d, 0x20],       // 66 prefix
            &[0xf2, 0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20], // xacquire
            &[0xf3, 0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20], // xrelease
            &[0x48, 0xf0, 0x0f, 0xc7, 0x4d, 0x20],       // REX not directly before 0f
            &[0xf0, 0x48, 0x0f, 0xc6, 0x4d, 0x20],       // other opcode
            &[0xf0, 0x48, 0x0f, 0xc7],                   // cut short
            &[0xf0, 0x48, 0x0f, 0xc7, 0x4d],             // disp8 missing
            &[0xf0, 0x48, 0x0f, 0xc7, 0x0c],             // SIB missing
            &[0xf0, 0x48, 0x0f, 0xc7, 0x8d, 0, 0, 0],    // disp32 cut short
            &[0xf0, 0x48, 0x0f, 0xc7, 0x0d, 0, 0, 0],    // rip disp32 cut short
        ] {
            assert_eq!(decode(bytes, Bits64), None, "{bytes:02x?}");
        }
        // Outside 64-bit mode 0x48 is dec eax and the rest cmpxchg8b: not handled.
        let bytes = [0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20];
        assert_eq!(decode(&bytes, Bits32), None);
        assert_eq!(decode(&bytes, Bits16), None);
    }

    #[test]
    fn overlong_cmpxchg16b_is_rejected() {
        // 5 prefixes + f0 + rex + 0f c7 + modrm + sib + disp32 = 15 bytes: fine.
        let mut bytes = vec![0x3e; 5];
        bytes.extend_from_slice(&[0xf0, 0x48, 0x0f, 0xc7, 0x8c, 0x24, 0, 0, 0, 0]);
        assert!(matches!(
            decode(&bytes, Bits64),
            Some(Insn::Cmpxchg16b { len: 15, .. })
        ));
        bytes.insert(0, 0x3e);
        assert_eq!(decode(&bytes, Bits64), None);
    }
}
