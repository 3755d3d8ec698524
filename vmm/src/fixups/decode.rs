//! Decoder for the few instructions the fix-ups handle.
//!
//! Input is the instruction bytes KVM reports at RIP (or bytes fetched there); output is one of
//! the recognised instructions or `None`. Only exact encodings match: anything that merely looks
//! alike (other `0f 01` group members, `int 3` written as `cd 03`, popcnt with a memory operand,
//! a lock or repne prefix, bytes cut short) is not recognised and stays an unhandled failure.

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
}

impl Insn {
    /// Encoded length in bytes.
    pub fn length(&self) -> u8 {
        match self {
            Insn::Clac | Insn::Stac => 3,
            Insn::Fwait | Insn::Int3 => 1,
            Insn::Popcnt { len, .. } => *len,
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
        _ => decode_popcnt(bytes, mode),
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
}
