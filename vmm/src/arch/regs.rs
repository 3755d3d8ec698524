//! Initial vCPU state: MSRs, FPU, local APIC, and the segment/control registers of the entry mode.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{self, boot_gdt, CODE32_SELECTOR, CODE64_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use crate::layout::{GDT_ADDR, IDT_ADDR};
use crate::memory::GuestMemoryMmap;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// The CPU mode a vCPU starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 16-bit real mode at CS:IP = (`cs` << 4) + `ip` (test programs).
    Real,
    /// 32-bit protected mode, paging off (PVH).
    Protected32,
    /// 64-bit long mode with identity-mapped paging (Linux 64-bit boot protocol).
    Long64 {
        /// CR3 (the PML4 address).
        cr3: u64,
    },
}

/// The MSRs every boot vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
}

/// Errors setting up registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM vCPU ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs")]
    Msrs {
        /// MSRs set.
        set: usize,
        /// MSRs given.
        wanted: usize,
    },
    /// Building the MSR list failed.
    #[error("cannot build MSR list")]
    MsrList,
    /// Writing the GDT/IDT failed.
    #[error("cannot write descriptor tables")]
    Tables(#[source] vm_memory::GuestMemoryError),
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, RegsError> {
    r.map_err(|source| RegsError::Kvm { what, source })
}

/// Programs the boot MSRs.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::MsrList)?;
    let set = kvm("KVM_SET_MSRS", vcpu.set_msrs(&msrs))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// Default x87/SSE state: FCW 0x37f, MXCSR 0x1f80.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    kvm("KVM_SET_FPU", vcpu.set_fpu(&fpu))
}

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as _;
    }
}

/// LINT0 = ExtINT (the 8259 PIC), LINT1 = NMI, as a BIOS leaves them.
pub fn lint_setup(state: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
}

/// Configures the local APIC's LINT pins.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut state = kvm("KVM_GET_LAPIC", vcpu.get_lapic())?;
    lint_setup(&mut state);
    kvm("KVM_SET_LAPIC", vcpu.set_lapic(&state))
}

/// Writes the boot GDT and an empty IDT into guest memory.
pub fn write_descriptor_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, d) in boot_gdt().iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(RegsError::Tables)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(RegsError::Tables)
}

/// The special registers for an entry mode, starting from KVM's defaults.
pub fn entry_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    if mode == EntryMode::Real {
        return sregs;
    }
    let gdt_len = std::mem::size_of_val(&boot_gdt());
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt_len - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let data = gdt::boot_segment(DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::boot_segment(TSS_SELECTOR);
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & !CR0_PG;
    match mode {
        EntryMode::Protected32 => {
            sregs.cs = gdt::boot_segment(CODE32_SELECTOR);
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Long64 { cr3 } => {
            sregs.cs = gdt::boot_segment(CODE64_SELECTOR);
            sregs.cr3 = cr3;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 |= CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Real => unreachable!("handled above"),
    }
    sregs
}

/// General registers at entry: RIP, a boot stack, and the protocol's pointer register
/// (RSI = boot_params for the 64-bit protocol, EBX = hvm_start_info for PVH).
pub fn entry_regs(mode: EntryMode, rip: u64, boot_info: u64, stack: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip,
        ..Default::default()
    };
    match mode {
        EntryMode::Long64 { .. } => {
            regs.rsi = boot_info;
            regs.rsp = stack;
            regs.rbp = stack;
        }
        EntryMode::Protected32 => regs.rbx = boot_info,
        EntryMode::Real => {}
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_sregs() {
        let s = entry_sregs(kvm_sregs::default(), EntryMode::Long64 { cr3: 0x9000 });
        assert_eq!(s.cr3, 0x9000);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr0 & CR0_PE, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.ds.selector, 0x18);
        assert_eq!(s.gdt.base, GDT_ADDR);
    }

    #[test]
    fn protected_mode_sregs() {
        let s = entry_sregs(kvm_sregs::default(), EntryMode::Protected32);
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr0 & CR0_PE, 0);
        assert_eq!(s.efer, 0);
        assert_eq!((s.cs.selector, s.cs.db, s.cs.l), (0x08, 1, 0));
    }

    #[test]
    fn boot_info_register_per_protocol() {
        let r = entry_regs(EntryMode::Long64 { cr3: 0 }, 0x100_0200, 0x7000, 0x8ff0);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100_0200, 0x7000, 0x8ff0, 2)
        );
        let r = entry_regs(EntryMode::Protected32, 0x100_0000, 0x6000, 0);
        assert_eq!((r.rbx, r.rsi), (0x6000, 0));
    }

    #[test]
    fn lint_pins() {
        let mut st = kvm_lapic_state::default();
        set_lapic_reg(&mut st, APIC_LVT0, 0x0001_0000);
        lint_setup(&mut st);
        assert_eq!(lapic_reg(&st, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&st, APIC_LVT1), 0x0000_0400);
    }

    #[test]
    fn msrs_include_syscall_state() {
        let m = boot_msrs();
        assert!(m.iter().any(|e| e.index == MSR_LSTAR));
        assert!(m
            .iter()
            .any(|e| e.index == MSR_MTRR_DEF_TYPE && e.data == 0x806));
    }
}
