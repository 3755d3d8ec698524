//! What the fix-ups need from a vCPU, as a trait, so that they run on real KVM vCPUs
//! ([`super::KvmVcpuAccess`]) and on synthetic states in unit tests alike.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::decode::{CpuMode, MAX_INSN_LEN};
use super::page_walk::DataAccess;

/// Size of the FXSAVE image (the legacy region of an XSAVE area).
pub const FXSAVE_SIZE: usize = 512;

/// The x87 and SSE state as a 64-bit FXSAVE image (the `fxsave64` layout: FCW at 0, FSW at 2,
/// abridged FTW at 4, FOP at 6, 64-bit FIP at 8 and FDP at 16, MXCSR at 24, MXCSR_MASK at 28,
/// ST0-ST7 at 32, XMM0-XMM15 at 160, bytes 416-511 reserved/available).
pub type FxImage = [u8; FXSAVE_SIZE];

/// MSR_EFER.
pub const MSR_EFER: u32 = 0xc000_0080;
/// MSR_STAR: SYSCALL/SYSRET segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// MSR_LSTAR: 64-bit SYSCALL entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// MSR_CSTAR: compatibility-mode SYSCALL entry point.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// MSR_SYSCALL_MASK (IA32_FMASK): RFLAGS bits SYSCALL clears.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;

/// Exception vectors the fix-ups raise.
pub mod vector {
    /// #BP, breakpoint (int3).
    pub const BP: u8 = 3;
    /// #UD, invalid opcode.
    pub const UD: u8 = 6;
    /// #NM, device not available.
    pub const NM: u8 = 7;
    /// #AC, alignment check.
    pub const AC: u8 = 17;
    /// #SS, stack-segment fault.
    pub const SS: u8 = 12;
    /// #GP, general protection.
    pub const GP: u8 = 13;
    /// #PF, page fault.
    pub const PF: u8 = 14;
    /// #MF, x87 floating-point error.
    pub const MF: u8 = 16;
}

/// RFLAGS bits used here.
pub mod rflags {
    /// Carry flag.
    pub const CF: u64 = 1 << 0;
    /// Bit 1, always set.
    pub const FIXED: u64 = 1 << 1;
    /// Parity flag.
    pub const PF: u64 = 1 << 2;
    /// Auxiliary carry flag.
    pub const AF: u64 = 1 << 4;
    /// Zero flag.
    pub const ZF: u64 = 1 << 6;
    /// Sign flag.
    pub const SF: u64 = 1 << 7;
    /// Interrupt enable flag.
    pub const IF: u64 = 1 << 9;
    /// Overflow flag.
    pub const OF: u64 = 1 << 11;
    /// I/O privilege level (two bits).
    pub const IOPL: u64 = 3 << 12;
    /// Resume flag.
    pub const RF: u64 = 1 << 16;
    /// Virtual-8086 mode.
    pub const VM: u64 = 1 << 17;
    /// Alignment check / SMAP override.
    pub const AC: u64 = 1 << 18;
}

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.MP: monitor coprocessor (makes WAIT honour CR0.TS).
pub const CR0_MP: u64 = 1 << 1;
/// CR0.EM: x87 emulation (x87, MMX and SSE instructions fault).
pub const CR0_EM: u64 = 1 << 2;
/// CR0.TS: task switched (lazy FPU).
pub const CR0_TS: u64 = 1 << 3;
/// CR0.AM: alignment mask (with RFLAGS.AC, alignment checks at CPL 3).
pub const CR0_AM: u64 = 1 << 18;
/// CR4.OSFXSR: the OS supports FXSAVE/FXRSTOR and SSE.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR0.WP: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR4.LA57: 57-bit linear addresses.
pub const CR4_LA57: u64 = 1 << 12;
/// CR4.SMAP: supervisor-mode access prevention.
pub const CR4_SMAP: u64 = 1 << 21;
/// EFER.SCE: SYSCALL enabled.
pub const EFER_SCE: u64 = 1 << 0;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// x87 status and control words, for `fwait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct X87State {
    /// FPU status word (FSW).
    pub status: u16,
    /// FPU control word (FCW).
    pub control: u16,
}

/// A failure to read or change vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_GET_REGS failed.
    #[error("get registers")]
    GetRegs(#[source] kvm_ioctls::Error),
    /// KVM_SET_REGS failed.
    #[error("set registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_GET_SREGS failed.
    #[error("get special registers")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("set special registers")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// KVM_GET_MSRS failed.
    #[error("read msr {index:#x}")]
    GetMsr {
        /// MSR index.
        index: u32,
        /// Underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_GET_MSRS did not return the MSR.
    #[error("msr {index:#x} not readable")]
    MsrUnavailable {
        /// MSR index.
        index: u32,
    },
    /// KVM_GET_FPU failed.
    #[error("get fpu state")]
    GetFpu(#[source] kvm_ioctls::Error),
    /// KVM_TRANSLATE failed.
    #[error("translate guest virtual address {gva:#x}")]
    Translate {
        /// Guest virtual address.
        gva: u64,
        /// Underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest page tables do not map the address.
    #[error("guest virtual address {gva:#x} not mapped")]
    Unmapped {
        /// Guest virtual address.
        gva: u64,
    },
    /// The address translated to guest physical memory the VMM does not have.
    #[error("read guest physical address {gpa:#x} (virtual {gva:#x}) failed")]
    ReadMemory {
        /// Guest virtual address.
        gva: u64,
        /// Guest physical address it translated to.
        gpa: u64,
    },
    /// The access would raise this page fault; nothing was read or written.
    #[error("access to guest virtual address {gva:#x} page-faults (error code {error_code:#x})")]
    PageFault {
        /// Guest virtual address.
        gva: u64,
        /// Page-fault error code.
        error_code: u32,
    },
    /// The address translated to guest physical memory the VMM cannot write atomically.
    #[error("write guest physical address {gpa:#x} (virtual {gva:#x}) failed")]
    WriteMemory {
        /// Guest virtual address.
        gva: u64,
        /// Guest physical address it translated to.
        gpa: u64,
    },
    /// KVM_GET_XSAVE failed.
    #[error("get xsave state")]
    GetXsave(#[source] kvm_ioctls::Error),
    /// KVM_SET_XSAVE failed (KVM also refuses an MXCSR with reserved bits set).
    #[error("set xsave state")]
    SetXsave(#[source] kvm_ioctls::Error),
    /// KVM's XSAVE buffer for this process's vCPUs is larger than the 4096 bytes of
    /// `struct kvm_xsave` (dynamically enabled state such as AMX): not handled.
    #[error("kvm xsave state is {size} bytes, more than the 4096 handled")]
    XsaveTooLarge {
        /// `KVM_CAP_XSAVE2`'s size.
        size: usize,
    },
    /// An atomic 16-byte operation was asked for at an address that is not 16-byte aligned.
    #[error("guest virtual address {gva:#x} not 16-byte aligned")]
    Misaligned {
        /// Guest virtual address.
        gva: u64,
    },
    /// A write through the guest page tables was asked for outside long mode.
    #[error("write to guest virtual address {gva:#x} outside long mode")]
    NotLongMode {
        /// Guest virtual address.
        gva: u64,
    },
    /// KVM_GET_VCPU_EVENTS failed.
    #[error("get vcpu events")]
    GetEvents(#[source] kvm_ioctls::Error),
    /// KVM_SET_VCPU_EVENTS failed.
    #[error("set vcpu events")]
    SetEvents(#[source] kvm_ioctls::Error),
    /// An exception is already pending or being injected; a second one is not stacked.
    #[error("exception {pending} already pending, cannot inject {vector}")]
    ExceptionPending {
        /// Vector already pending.
        pending: u8,
        /// Vector that was to be injected.
        vector: u8,
    },
}

/// Access to one vCPU's state, as the fix-ups need it.
///
/// Implemented by [`super::KvmVcpuAccess`] for real KVM vCPUs. Every method may fail; fix-ups
/// read everything they need before changing anything.
pub trait VcpuAccess {
    /// General-purpose registers, RIP and RFLAGS.
    fn regs(&self) -> Result<kvm_regs, VcpuError>;
    /// Writes general-purpose registers, RIP and RFLAGS.
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), VcpuError>;
    /// Segment, control and descriptor-table registers.
    fn sregs(&self) -> Result<kvm_sregs, VcpuError>;
    /// Writes segment, control and descriptor-table registers.
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), VcpuError>;
    /// Reads the MSRs `indices` into `values` (same length), in one go: on KVM one
    /// `KVM_GET_MSRS`, which costs as much as any vCPU ioctl.
    fn msrs(&self, indices: &[u32], values: &mut [u64]) -> Result<(), VcpuError>;
    /// x87 status and control words.
    fn x87_state(&self) -> Result<X87State, VcpuError>;
    /// Reads `buf.len()` bytes at guest *virtual* address `gva`, translated through the guest's
    /// current page tables without permission checks (supervisor and user pages alike, whatever
    /// SMAP says).
    fn read_virt(&self, gva: u64, buf: &mut [u8]) -> Result<(), VcpuError>;
    /// Atomically compares the 16 bytes at guest *virtual* address `gva` with `expected` and,
    /// if equal, stores `new` (a locked `cmpxchg16b` on guest memory, atomic against the other
    /// vCPUs). `gva` is translated for a data write with `access` (long mode only), setting the
    /// accessed and dirty bits as hardware does. Returns the value found, equal to `expected`
    /// exactly when `new` was stored. A write hardware would refuse fails with
    /// [`VcpuError::PageFault`] and changes nothing; `gva` must be 16-byte aligned.
    fn cmpxchg16b(
        &mut self,
        gva: u64,
        access: DataAccess,
        expected: u128,
        new: u128,
    ) -> Result<u128, VcpuError>;
    /// The x87 and SSE state as an FXSAVE image (64-bit layout, see [`FxImage`]), MXCSR_MASK
    /// included.
    fn fx_state(&self) -> Result<FxImage, VcpuError>;
    /// Loads the x87 and SSE state from `image` (64-bit layout): everything `fxrstor64`
    /// loads. MXCSR_MASK and bytes 416-511 are ignored; the caller checked MXCSR against the
    /// mask. Other state (AVX upper halves, ...) is left as it is.
    fn set_fx_state(&mut self, image: &FxImage) -> Result<(), VcpuError>;
    /// Reads `buf.len()` bytes at guest *virtual* address `gva` as a data read with `access`
    /// (long mode only), with the permission checks hardware makes and the accessed bits it
    /// sets. A read hardware would refuse fails with [`VcpuError::PageFault`].
    fn read_data(&self, gva: u64, access: DataAccess, buf: &mut [u8]) -> Result<(), VcpuError>;
    /// Writes `data` at guest *virtual* address `gva` as a data write with `access` (long
    /// mode only): every page is checked before anything is written, then accessed and dirty
    /// bits are set as hardware does. A write hardware would refuse fails with
    /// [`VcpuError::PageFault`] (for the first refused byte) and changes nothing. Not atomic.
    fn write_data(&mut self, gva: u64, access: DataAccess, data: &[u8]) -> Result<(), VcpuError>;
    /// Injects exception `vector` (with `error_code` if it has one) to be delivered on the next
    /// entry. For `#BP` RIP must already point after the `int3`.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), VcpuError>;
}

/// Current privilege level: the RPL of CS in protected mode, 0 in real mode, 3 in virtual-8086
/// mode.
pub fn cpl(regs: &kvm_regs, sregs: &kvm_sregs) -> u8 {
    if sregs.cr0 & CR0_PE == 0 {
        0
    } else if regs.rflags & rflags::VM != 0 {
        3
    } else {
        (sregs.cs.selector & 3) as u8
    }
}

/// The mode instructions are decoded in.
pub fn cpu_mode(regs: &kvm_regs, sregs: &kvm_sregs) -> CpuMode {
    if sregs.cr0 & CR0_PE == 0 || regs.rflags & rflags::VM != 0 {
        CpuMode::Bits16
    } else if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
        CpuMode::Bits64
    } else if sregs.cs.db != 0 {
        CpuMode::Bits32
    } else {
        CpuMode::Bits16
    }
}

/// Linear address of the instruction pointer.
pub fn linear_rip(regs: &kvm_regs, sregs: &kvm_sregs) -> u64 {
    match cpu_mode(regs, sregs) {
        CpuMode::Bits64 => regs.rip,
        CpuMode::Bits32 => sregs.cs.base.wrapping_add(regs.rip & 0xffff_ffff),
        CpuMode::Bits16 => sregs.cs.base.wrapping_add(regs.rip & 0xffff),
    }
}

/// RIP after skipping `len` bytes, wrapped to the mode's instruction-pointer width.
pub fn advance_rip(regs: &kvm_regs, sregs: &kvm_sregs, len: u8) -> u64 {
    let next = regs.rip.wrapping_add(u64::from(len));
    match cpu_mode(regs, sregs) {
        CpuMode::Bits64 => next,
        CpuMode::Bits32 => next & 0xffff_ffff,
        CpuMode::Bits16 => next & 0xffff,
    }
}

/// Bytes fetched at an instruction pointer.
pub type FetchedInsn = ([u8; MAX_INSN_LEN], usize);

/// Fetches up to 15 instruction bytes at RIP. Stops early at an unmapped page (an instruction
/// that ends before it is still decodable); fails only if not even the first byte is readable.
pub fn fetch_insn(
    cpu: &dyn VcpuAccess,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Result<FetchedInsn, VcpuError> {
    let mut buf = [0u8; MAX_INSN_LEN];
    let start = linear_rip(regs, sregs);
    let first_page_left = (0x1000 - (start & 0xfff)) as usize;
    let first = first_page_left.min(MAX_INSN_LEN);
    cpu.read_virt(start, &mut buf[..first])?;
    let mut len = first;
    if first < MAX_INSN_LEN
        && cpu
            .read_virt(start.wrapping_add(first as u64), &mut buf[first..])
            .is_ok()
    {
        len = MAX_INSN_LEN;
    }
    Ok((buf, len))
}

/// Reads a little-endian u64 at a guest virtual address.
pub fn read_u64(cpu: &dyn VcpuAccess, gva: u64) -> Result<u64, VcpuError> {
    let mut b = [0u8; 8];
    cpu.read_virt(gva, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// A flat 64-bit code segment at privilege level 0, as SYSCALL loads it (SDM vol. 2B, SYSCALL:
/// base 0, limit 4 GiB, type 11 execute/read accessed, S=1, DPL 0, P=1, L=1, D=0, G=1).
pub fn flat_code64_segment(selector: u16) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// A flat data segment at privilege level 0, as SYSCALL loads SS (base 0, limit 4 GiB, type 3
/// read/write accessed, S=1, DPL 0, P=1, B=1, G=1).
pub fn flat_stack_segment(selector: u16) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: 0x3,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}
