//! Fix-ups applied through [`Fixups::handle`] on synthetic vCPU states.

use super::fake_vcpu::FakeVcpu;
use super::syscall;
use super::vcpu::{rflags, vector, CR0_MP, CR0_TS, EFER_SCE};
use super::*;

fn active() -> Fixups {
    Fixups::with_host(FixupMode::On, false)
}

const KERNEL_RIP: u64 = 0xffff_ffff_8100_1000;
const LSTAR: u64 = 0xffff_ffff_81a0_0000;
const CSTAR: u64 = 0xffff_ffff_81a0_1000;
const STAR: u64 = (0x23 << 48) | (0x10 << 32);
/// Linux 6.1's MSR_SYSCALL_MASK: CF PF AF ZF SF TF IF DF OF IOPL NT RF AC ID.
const FMASK: u64 = 0x257fd5;
/// Older Linux's MSR_SYSCALL_MASK: TF DF IF IOPL AC NT.
const OLD_FMASK: u64 = 0x47700;

/// A kernel-mode vCPU with the syscall MSRs set, about to execute at KERNEL_RIP.
fn kernel_cpu() -> FakeVcpu {
    let mut cpu = FakeVcpu::long_mode(0);
    cpu.regs.rip = KERNEL_RIP;
    cpu.msrs.insert(MSR_LSTAR, LSTAR);
    cpu.msrs.insert(MSR_CSTAR, CSTAR);
    cpu.msrs.insert(MSR_STAR, STAR);
    cpu.msrs.insert(MSR_SYSCALL_MASK, FMASK);
    cpu
}

#[test]
fn clac_clears_ac_and_skips() {
    let fixups = active();
    let mut cpu = kernel_cpu();
    cpu.regs.rflags = 0x2 | rflags::AC | rflags::RF | rflags::ZF;
    cpu.regs.rax = 42;
    let before = cpu.regs;
    let applied = fixups.handle(&mut cpu, &[0x0f, 0x01, 0xca, 0xfc]).unwrap();
    assert_eq!(
        applied,
        Applied {
            fixup: Fixup::Clac,
            rip: KERNEL_RIP,
            outcome: Outcome::Completed
        }
    );
    assert_eq!(cpu.regs.rip, KERNEL_RIP + 3);
    assert_eq!(cpu.regs.rflags, 0x2 | rflags::ZF);
    assert_eq!(cpu.regs.rax, before.rax);
    assert_eq!(fixups.hits(Fixup::Clac), 1);
    assert_eq!(fixups.hits(Fixup::Syscall), 0);
    // Not at the #PF entry: the SYSCALL check did not even read the MSRs.
    assert_eq!(cpu.msr_reads.get(), 0);
}

#[test]
fn stac_sets_ac_and_skips() {
    let fixups = active();
    let mut cpu = kernel_cpu();
    fixups.handle(&mut cpu, &[0x0f, 0x01, 0xcb]).unwrap();
    assert_eq!(cpu.regs.rip, KERNEL_RIP + 3);
    assert_eq!(cpu.regs.rflags, 0x2 | rflags::AC);
    assert_eq!(fixups.hits(Fixup::Stac), 1);
}

#[test]
fn clac_and_stac_in_user_mode_raise_ud() {
    let fixups = active();
    for bytes in [[0x0f, 0x01, 0xca], [0x0f, 0x01, 0xcb]] {
        let mut cpu = FakeVcpu::long_mode(3);
        cpu.regs.rip = 0x401000;
        cpu.regs.rflags = 0x202;
        let applied = fixups.handle(&mut cpu, &bytes).unwrap();
        assert_eq!(applied.outcome, Outcome::Raised { vector: vector::UD });
        assert_eq!(cpu.injected, [(vector::UD, None)]);
        assert_eq!(cpu.regs.rip, 0x401000);
        assert_eq!(cpu.regs.rflags, 0x202);
    }
}

#[test]
fn rip_wraps_in_32_bit_mode() {
    let fixups = active();
    let mut cpu = FakeVcpu::protected32();
    cpu.regs.rip = 0xffff_fffe;
    fixups.handle(&mut cpu, &[0x0f, 0x01, 0xca]).unwrap();
    assert_eq!(cpu.regs.rip, 1);
}

fn popcnt_on(cpu: &mut FakeVcpu, bytes: &[u8]) -> Applied {
    active().handle(cpu, bytes).unwrap()
}

#[test]
fn popcnt_64_bit() {
    let mut cpu = kernel_cpu();
    cpu.regs.rdi = 0xf000_0000_0000_00ff;
    cpu.regs.rax = 0xdead;
    cpu.regs.rflags =
        0x2 | rflags::CF | rflags::OF | rflags::SF | rflags::PF | rflags::AF | rflags::ZF;
    // popcnt rax, rdi
    let a = popcnt_on(&mut cpu, &[0xf3, 0x48, 0x0f, 0xb8, 0xc7]);
    assert_eq!(a.fixup, Fixup::Popcnt);
    assert_eq!(cpu.regs.rax, 12);
    assert_eq!(cpu.regs.rdi, 0xf000_0000_0000_00ff);
    assert_eq!(cpu.regs.rflags, 0x2);
    assert_eq!(cpu.regs.rip, KERNEL_RIP + 5);
}

#[test]
fn popcnt_32_bit_reads_low_half_and_zero_extends() {
    let mut cpu = kernel_cpu();
    cpu.regs.rcx = 0xffff_ffff_0000_0007;
    cpu.regs.rax = 0xffff_ffff_ffff_ffff;
    // popcnt eax, ecx
    popcnt_on(&mut cpu, &[0xf3, 0x0f, 0xb8, 0xc1]);
    assert_eq!(cpu.regs.rax, 3);
    assert_eq!(cpu.regs.rip, KERNEL_RIP + 4);
}

#[test]
fn popcnt_16_bit_preserves_upper_bits() {
    let mut cpu = kernel_cpu();
    cpu.regs.rdx = 0xffff_0003;
    cpu.regs.rax = 0x1234_5678_9abc_def0;
    // popcnt ax, dx
    popcnt_on(&mut cpu, &[0x66, 0xf3, 0x0f, 0xb8, 0xc2]);
    assert_eq!(cpu.regs.rax, 0x1234_5678_9abc_0002);
}

#[test]
fn popcnt_extended_registers_and_zero_source() {
    let mut cpu = kernel_cpu();
    cpu.regs.r15 = 0;
    cpu.regs.r9 = 77;
    // popcnt r9, r15
    popcnt_on(&mut cpu, &[0xf3, 0x4d, 0x0f, 0xb8, 0xcf]);
    assert_eq!(cpu.regs.r9, 0);
    assert_eq!(cpu.regs.rflags, 0x2 | rflags::ZF);
    // popcnt rsp, rsp: source and destination the same register.
    cpu.regs.rsp = 0xff;
    popcnt_on(&mut cpu, &[0xf3, 0x48, 0x0f, 0xb8, 0xe4]);
    assert_eq!(cpu.regs.rsp, 8);
    assert_eq!(cpu.regs.rflags, 0x2);
}

#[test]
fn fwait_skips_one_byte() {
    let fixups = active();
    let mut cpu = kernel_cpu();
    // fstcw: only the fwait is skipped; fnstcw runs next.
    let a = fixups.handle(&mut cpu, &[0x9b, 0xd9, 0x7d, 0xfc]).unwrap();
    assert_eq!(a.outcome, Outcome::Completed);
    assert_eq!(cpu.regs.rip, KERNEL_RIP + 1);
    assert!(cpu.injected.is_empty());
    // TS alone (without MP) does not make wait fault.
    cpu.sregs.cr0 |= CR0_TS;
    fixups.handle(&mut cpu, &[0x9b]).unwrap();
    assert_eq!(cpu.regs.rip, KERNEL_RIP + 2);
    assert_eq!(fixups.hits(Fixup::Fwait), 2);
}

#[test]
fn fwait_raises_nm_and_mf_like_hardware() {
    let fixups = active();
    let mut cpu = kernel_cpu();
    cpu.sregs.cr0 |= CR0_TS | CR0_MP;
    let a = fixups.handle(&mut cpu, &[0x9b]).unwrap();
    assert_eq!(a.outcome, Outcome::Raised { vector: vector::NM });
    assert_eq!(cpu.regs.rip, KERNEL_RIP);

    let mut cpu = kernel_cpu();
    cpu.x87 = X87State {
        status: 0x0081, // IE + ES
        control: 0x037e,
    };
    let a = fixups.handle(&mut cpu, &[0x9b]).unwrap();
    assert_eq!(a.outcome, Outcome::Raised { vector: vector::MF });
    assert_eq!(cpu.injected, [(vector::MF, None)]);
    assert_eq!(cpu.regs.rip, KERNEL_RIP);
}

#[test]
fn int3_skips_and_injects_bp() {
    let fixups = active();
    let mut cpu = FakeVcpu::long_mode(3);
    cpu.regs.rip = 0x401000;
    let a = fixups.handle(&mut cpu, &[0xcc]).unwrap();
    assert_eq!(a.outcome, Outcome::Raised { vector: vector::BP });
    assert_eq!(cpu.regs.rip, 0x401001);
    assert_eq!(cpu.injected, [(vector::BP, None)]);
    assert_eq!(fixups.hits(Fixup::Int3), 1);
}

#[test]
fn int3_with_an_exception_already_pending_changes_nothing() {
    let fixups = active();
    let mut cpu = FakeVcpu::long_mode(3);
    cpu.regs.rip = 0x401000;
    cpu.exception_pending = true;
    let e = fixups.handle(&mut cpu, &[0xcc]).unwrap_err();
    assert!(
        matches!(
            e,
            FixupError::Apply {
                fixup: Fixup::Int3,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(cpu.regs.rip, 0x401000);
    assert_eq!(cpu.writes, 0);
    assert_eq!(fixups.hits(Fixup::Int3), 0);
    assert_eq!(fixups.unhandled(), 1);
}

#[test]
fn unknown_instruction_is_a_clean_error() {
    let fixups = active();
    let mut cpu = kernel_cpu();
    // xrstor (%rsi)
    let e = fixups.handle(&mut cpu, &[0x0f, 0xae, 0x2e]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unhandled emulation failure at rip 0xffffffff81001000, bytes 0f ae 2e"
    );
    assert_eq!(e.rip(), Some(KERNEL_RIP));
    assert_eq!(cpu.writes, 0);
    assert_eq!(fixups.unhandled(), 1);
    // int 3 in its two-byte form is not int3.
    assert!(matches!(
        fixups.handle(&mut cpu, &[0xcd, 0x03]),
        Err(FixupError::Unrecognised { .. })
    ));
    assert!(cpu.injected.is_empty());
}

#[test]
fn disabled_fixups_change_nothing_but_name_the_fix() {
    let fixups = Fixups::with_host(FixupMode::Off, true);
    let mut cpu = kernel_cpu();
    cpu.regs.rflags |= rflags::AC;
    let e = fixups.handle(&mut cpu, &[0x0f, 0x01, 0xca]).unwrap_err();
    assert!(matches!(
        e,
        FixupError::Disabled {
            recognised: Some(Fixup::Clac),
            ..
        }
    ));
    assert_eq!(cpu.writes, 0);
    assert_eq!(cpu.regs.rflags & rflags::AC, rflags::AC);
    assert_eq!(fixups.hits(Fixup::Clac), 0);
    assert_eq!(fixups.unhandled(), 1);
}

#[test]
fn bytes_are_fetched_at_rip_when_kvm_reported_none() {
    let fixups = active();
    let mut cpu = kernel_cpu();
    cpu.poke(KERNEL_RIP, &[0xf3, 0x0f, 0xb8, 0xc1]);
    cpu.regs.rcx = 0b1011;
    fixups.handle(&mut cpu, &[]).unwrap();
    assert_eq!(cpu.regs.rax, 3);

    // An instruction ending right at an unmapped page is still fetched.
    let mut cpu = kernel_cpu();
    let rip = 0x7000 - 3;
    cpu.regs.rip = rip;
    cpu.poke(rip, &[0x0f, 0x01, 0xcb]);
    fixups.handle(&mut cpu, &[]).unwrap();
    assert_eq!(cpu.regs.rip, 0x7000);

    // One cut short by the unmapped page is not recognised.
    let mut cpu = kernel_cpu();
    cpu.regs.rip = rip;
    cpu.poke(rip, &[0xf3, 0x0f, 0xb8]);
    assert!(matches!(
        fixups.handle(&mut cpu, &[]),
        Err(FixupError::Unrecognised { .. })
    ));

    // Nothing readable at RIP.
    let mut cpu = kernel_cpu();
    let e = fixups.handle(&mut cpu, &[]).unwrap_err();
    assert!(
        matches!(
            e,
            FixupError::Fetch {
                rip: KERNEL_RIP,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn fetch_uses_the_code_segment_base_outside_long_mode() {
    let fixups = active();
    let mut cpu = FakeVcpu::protected32();
    cpu.sregs.cs.base = 0x10000;
    cpu.regs.rip = 0x20;
    cpu.poke(0x10020, &[0x9b]);
    fixups.handle(&mut cpu, &[]).unwrap();
    assert_eq!(cpu.regs.rip, 0x21);
}

#[test]
fn mode_parsing() {
    assert_eq!("auto".parse::<FixupMode>(), Ok(FixupMode::Auto));
    assert_eq!("ON".parse::<FixupMode>(), Ok(FixupMode::On));
    assert_eq!(" off ".parse::<FixupMode>(), Ok(FixupMode::Off));
    assert!("yes".parse::<FixupMode>().is_err());
    assert_eq!(FixupMode::default(), FixupMode::Auto);
    for mode in [FixupMode::Auto, FixupMode::On, FixupMode::Off] {
        assert_eq!(mode.to_string().parse::<FixupMode>(), Ok(mode));
        assert_eq!(
            <FixupMode as clap::ValueEnum>::from_str(mode.as_str(), false),
            Ok(mode)
        );
    }
}

#[test]
fn activation_and_guest_cmdline() {
    let cases = [
        (FixupMode::Auto, true, true),
        (FixupMode::Auto, false, false),
        (FixupMode::On, false, true),
        (FixupMode::Off, true, false),
    ];
    for (mode, host, active) in cases {
        let f = Fixups::with_host(mode, host);
        assert_eq!(f.is_active(), active, "{mode} host={host}");
        let extra: &[&str] = if active { &["noxsave"] } else { &[] };
        assert_eq!(f.guest_cmdline_additions(), extra);
        assert_eq!(f.describe().starts_with("emulation fix-ups on"), active);
    }
    assert_eq!(
        Fixups::with_host(FixupMode::Auto, true).describe(),
        "emulation fix-ups on (auto: kvm_pvm module loaded, KVM is PVM); \
         guest command line gets: noxsave"
    );
    assert_eq!(
        Fixups::with_host(FixupMode::Off, true).describe(),
        "emulation fix-ups off (--emulation-fixups=off)"
    );
    assert_eq!(
        Fixups::new(FixupMode::Auto).is_active(),
        host_needs_fixups()
    );
}

#[test]
fn summary_counts_each_fixup() {
    let fixups = active();
    let mut cpu = kernel_cpu();
    for _ in 0..3 {
        fixups.handle(&mut cpu, &[0x0f, 0x01, 0xca]).unwrap();
    }
    fixups.handle(&mut cpu, &[0x9b]).unwrap();
    let _ = fixups.handle(&mut cpu, &[0x0f, 0x0b]);
    assert_eq!(
        fixups.summary(),
        "emulation fix-ups: clac=3 stac=0 syscall=0 popcnt=0 fwait=1 int3=0 cmpxchg16b=0 \
         ldmxcsr=0 stmxcsr=0 fxsave=0 fxrstor=0 unhandled=1"
    );
}

// ---- The half-done SYSCALL ----

const PF_HANDLER: u64 = 0xffff_ffff_81a0_0a00;
const IDT_BASE: u64 = 0xffff_fe00_0000_0000;
const ENTRY_STACK_TOP: u64 = 0xffff_fe00_0000_6000;
const USER_RIP_AFTER_SYSCALL: u64 = 0x40_1a2c;
const USER_RSP: u64 = 0x7ffc_1234_5670;
const USER_RFLAGS: u64 = 0x246; // IF ZF PF
/// user instruction fetch, page present
const PF_ERROR: u64 = 0x15;
/// What PVM reported without EFER.NXE: user read, page present, no fetch bit.
const PF_ERROR_NO_NX: u64 = 0x5;

/// The state PVM leaves: user SYSCALL emulated at CPL 3, #PF on fetching LSTAR delivered to
/// the kernel, stopped on the handler's `clac`.
fn half_done_syscall() -> FakeVcpu {
    let mut cpu = kernel_cpu();
    // IDT gate 14 -> PF_HANDLER (present interrupt gate, kernel CS).
    cpu.sregs.idt.base = IDT_BASE;
    cpu.sregs.idt.limit = 256 * 16 - 1;
    let h = PF_HANDLER;
    let gate: [u8; 16] = [
        h as u8,
        (h >> 8) as u8,
        0x10,
        0,
        0,
        0x8e,
        (h >> 16) as u8,
        (h >> 24) as u8,
        (h >> 32) as u8,
        (h >> 40) as u8,
        (h >> 48) as u8,
        (h >> 56) as u8,
        0,
        0,
        0,
        0,
    ];
    cpu.poke(IDT_BASE + 14 * 16, &gate);
    cpu.poke(PF_HANDLER, &[0x0f, 0x01, 0xca]);
    // The user's syscall instruction.
    cpu.poke(USER_RIP_AFTER_SYSCALL - 2, &[0x0f, 0x05]);
    // The frame the #PF delivery pushed.
    let rsp = ENTRY_STACK_TOP - 48;
    let masked = (USER_RFLAGS & !FMASK) | 2;
    cpu.poke_u64s(rsp, &[PF_ERROR, LSTAR, 0x33, masked, USER_RSP, 0x2b]);
    cpu.regs.rip = PF_HANDLER;
    cpu.regs.rsp = rsp;
    cpu.regs.rcx = USER_RIP_AFTER_SYSCALL;
    cpu.regs.r11 = USER_RFLAGS;
    cpu.regs.rax = 39; // getpid
    cpu.regs.rflags = masked; // IF cleared by the interrupt gate as well
    cpu.sregs.cr2 = LSTAR;
    // After delivery to CPL 0 in long mode SS is a null selector.
    cpu.sregs.ss = Default::default();
    cpu
}

#[test]
fn half_done_syscall_is_completed() {
    let fixups = active();
    let mut cpu = half_done_syscall();
    let pages_before = cpu.pages.clone();
    let applied = fixups.handle(&mut cpu, &[0x0f, 0x01, 0xca]).unwrap();
    assert_eq!(
        applied,
        Applied {
            fixup: Fixup::Syscall,
            rip: PF_HANDLER,
            outcome: Outcome::Completed
        }
    );
    assert_eq!(cpu.regs.rip, LSTAR);
    assert_eq!(cpu.regs.rsp, USER_RSP);
    assert_eq!(cpu.regs.rflags, 0x2);
    assert_eq!(cpu.regs.rcx, USER_RIP_AFTER_SYSCALL);
    assert_eq!(cpu.regs.r11, USER_RFLAGS);
    assert_eq!(cpu.regs.rax, 39);
    let cs = cpu.sregs.cs;
    assert_eq!(
        (cs.selector, cs.dpl, cs.l, cs.db, cs.present, cs.s),
        (0x10, 0, 1, 0, 1, 1)
    );
    assert_eq!(
        (cs.type_, cs.base, cs.limit, cs.g, cs.unusable),
        (0xb, 0, 0xffff_ffff, 1, 0)
    );
    let ss = cpu.sregs.ss;
    assert_eq!(
        (ss.selector, ss.dpl, ss.db, ss.present, ss.s),
        (0x18, 0, 1, 1, 1)
    );
    assert_eq!(
        (ss.type_, ss.base, ss.limit, ss.g, ss.unusable),
        (0x3, 0, 0xffff_ffff, 1, 0)
    );
    // CPL 0 now, and nothing else in sregs changed.
    assert_eq!(cpl(&cpu.regs, &cpu.sregs), 0);
    let mut expect = half_done_syscall().sregs;
    expect.cs = cs;
    expect.ss = ss;
    assert_eq!(cpu.sregs, expect);
    // No guest memory written.
    assert_eq!(cpu.pages, pages_before);
    assert_eq!(fixups.hits(Fixup::Syscall), 1);
    assert_eq!(fixups.hits(Fixup::Clac), 0);
    assert_eq!(cpu.msr_reads.get(), 1);
}

#[test]
fn half_done_syscall_behind_endbr64() {
    let mut cpu = half_done_syscall();
    cpu.poke(PF_HANDLER, &[0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x01, 0xca]);
    cpu.regs.rip = PF_HANDLER + 4;
    let a = active().handle(&mut cpu, &[0x0f, 0x01, 0xca]).unwrap();
    assert_eq!(a.fixup, Fixup::Syscall);
    assert_eq!(cpu.regs.rip, LSTAR);
}

#[test]
fn half_done_syscall_as_seen_on_pvm() {
    // Error code without the fetch bit, RF set in the frame's RFLAGS.
    let mut cpu = half_done_syscall();
    let rsp = cpu.regs.rsp;
    cpu.poke_u64s(rsp, &[PF_ERROR_NO_NX]);
    cpu.poke_u64s(rsp + 24, &[0x10002]);
    let a = active().handle(&mut cpu, &[0x0f, 0x01, 0xca]).unwrap();
    assert_eq!(a.fixup, Fixup::Syscall);
    assert_eq!(cpu.regs.rflags, 0x2);
    assert_eq!(cpu.regs.rsp, USER_RSP);
}

#[test]
fn half_done_syscall_with_an_older_fmask() {
    // FMASK without the arithmetic flags and RF: ZF and PF survive into the kernel.
    let mut cpu = half_done_syscall();
    cpu.msrs.insert(MSR_SYSCALL_MASK, OLD_FMASK);
    let rsp = cpu.regs.rsp;
    cpu.poke_u64s(rsp + 24, &[0x10046]);
    let a = active().handle(&mut cpu, &[0x0f, 0x01, 0xca]).unwrap();
    assert_eq!(a.fixup, Fixup::Syscall);
    assert_eq!(cpu.regs.rflags, 0x46);
}

#[test]
fn half_done_compat_syscall_goes_to_cstar() {
    let mut cpu = half_done_syscall();
    cpu.sregs.cr2 = CSTAR;
    let rsp = cpu.regs.rsp;
    cpu.poke_u64s(rsp + 8, &[CSTAR, 0x23]);
    let a = active().handle(&mut cpu, &[0x0f, 0x01, 0xca]).unwrap();
    assert_eq!(a.fixup, Fixup::Syscall);
    assert_eq!(cpu.regs.rip, CSTAR);
    assert_eq!(cpu.sregs.cs.l, 1);
}

/// Each case is a state that resembles the half-done SYSCALL but is not it: the `clac` must
/// be completed as a plain `clac` and nothing else changed.
#[test]
fn lookalike_states_are_plain_clac() {
    let frame = ENTRY_STACK_TOP - 48;
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, &str, Box<dyn Fn(&mut FakeVcpu)>)> = vec![
        (
            "ordinary user page fault",
            "cr2 is not a syscall entry point",
            Box::new(|c| c.sregs.cr2 = 0x40_0000),
        ),
        (
            "user jumped to the entry point (IF set in frame)",
            "frame rflags not masked by syscall",
            Box::new(move |c| {
                c.poke_u64s(frame + 24, &[USER_RFLAGS]);
                c.regs.rflags = 0x46;
            }),
        ),
        (
            "r11 does not match",
            "r11 does not match the frame's rflags",
            Box::new(|c| c.regs.r11 = USER_RFLAGS | (1 << 19)),
        ),
        (
            "kernel-mode fault at the entry point",
            "fault did not come from user mode",
            Box::new(move |c| c.poke_u64s(frame + 16, &[0x10])),
        ),
        (
            "write fault",
            "error code is not a user read or fetch",
            Box::new(move |c| c.poke_u64s(frame, &[0x17])),
        ),
        (
            "supervisor-mode fault",
            "error code is not a user read or fetch",
            Box::new(move |c| c.poke_u64s(frame, &[0x11])),
        ),
        (
            "reserved-bit fault",
            "error code is not a user read or fetch",
            Box::new(move |c| c.poke_u64s(frame, &[0x1d])),
        ),
        (
            "frame rip is not the entry point",
            "frame rip is not the entry point",
            Box::new(move |c| c.poke_u64s(frame + 8, &[LSTAR + 0x10])),
        ),
        (
            "no syscall before rcx",
            "no syscall instruction before rcx",
            Box::new(|c| c.poke(USER_RIP_AFTER_SYSCALL - 2, &[0x0f, 0x34])),
        ),
        (
            "rcx page unmapped",
            "no syscall instruction before rcx",
            Box::new(|c| c.unmap(USER_RIP_AFTER_SYSCALL - 2)),
        ),
        (
            "rcx is a kernel address",
            "rcx is not a user return address",
            Box::new(|c| c.regs.rcx = LSTAR + 2),
        ),
        (
            "rcx is tiny",
            "rcx is not a user return address",
            Box::new(|c| c.regs.rcx = 1),
        ),
        (
            "rip is inside the handler",
            "rip is not at the start of the page-fault handler",
            Box::new(|c| {
                c.regs.rip = PF_HANDLER + 3;
                c.poke(PF_HANDLER + 3, &[0x0f, 0x01, 0xca]);
            }),
        ),
        (
            "rip 4 bytes in without endbr64",
            "rip is not at the start of the page-fault handler",
            Box::new(|c| c.regs.rip = PF_HANDLER + 4),
        ),
        (
            "another handler (not #PF)",
            "rip is not at the start of the page-fault handler",
            Box::new(|c| c.regs.rip = PF_HANDLER + 0x100),
        ),
        (
            "idt too short",
            "page-fault gate not readable",
            Box::new(|c| c.sregs.idt.limit = 14 * 16),
        ),
        (
            "pf gate not present",
            "page-fault gate not readable",
            Box::new(|c| c.poke(IDT_BASE + 14 * 16 + 5, &[0x0e])),
        ),
        (
            "stack unmapped",
            "exception frame not readable",
            Box::new(move |c| c.unmap(frame)),
        ),
        (
            "stack misaligned",
            "misaligned kernel stack",
            Box::new(|c| c.regs.rsp += 4),
        ),
        (
            "syscall disabled",
            "syscall disabled in efer",
            Box::new(|c| c.sregs.efer &= !EFER_SCE),
        ),
        (
            "fmask without IF",
            "frame rflags not masked by syscall",
            Box::new(move |c| {
                c.msrs.insert(MSR_SYSCALL_MASK, 0x100);
                c.poke_u64s(frame + 24, &[USER_RFLAGS & !0x100]);
            }),
        ),
        (
            "compat entry without CSTAR",
            "cr2 is not a syscall entry point",
            Box::new(move |c| {
                c.msrs.insert(MSR_CSTAR, 0);
                c.sregs.cr2 = 0;
                c.poke_u64s(frame + 8, &[0]);
            }),
        ),
        (
            "32-bit code segment",
            "not 64-bit kernel mode",
            Box::new(|c| {
                c.sregs.cs.l = 0;
                c.sregs.cs.db = 1;
                c.regs.rip &= 0xffff_ffff;
            }),
        ),
    ];
    for (name, reason, mutate) in cases {
        let fixups = active();
        let mut cpu = half_done_syscall();
        mutate(&mut cpu);
        let before = cpu.clone();
        let check = syscall::recognise(&cpu, &cpu.regs, &cpu.sregs).unwrap();
        assert_eq!(check.err(), Some(reason), "{name}");
        let a = fixups
            .handle(&mut cpu, &[0x0f, 0x01, 0xca])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(a.fixup, Fixup::Clac, "{name}");
        assert_eq!(cpu.sregs, before.sregs, "{name}");
        let mut expect = before.regs;
        expect.rip = before.regs.rip.wrapping_add(3)
            & if before.sregs.cs.l == 1 {
                u64::MAX
            } else {
                0xffff_ffff
            };
        expect.rflags &= !(rflags::AC | rflags::RF);
        assert_eq!(cpu.regs, expect, "{name}");
        assert_eq!(cpu.pages, before.pages, "{name}");
        assert_eq!(fixups.hits(Fixup::Syscall), 0, "{name}");
    }
}

#[test]
fn unreadable_syscall_msrs_fail_cleanly() {
    let fixups = active();
    let mut cpu = half_done_syscall();
    cpu.msrs.remove(&MSR_LSTAR);
    let e = fixups.handle(&mut cpu, &[0x0f, 0x01, 0xca]).unwrap_err();
    assert!(matches!(e, FixupError::Apply { .. }), "{e}");
    assert_eq!(cpu.writes, 0);
}

/// Kernel data used by the cmpxchg16b tests: a 16-byte slot at rbp + 0x20.
const SLOT: u64 = 0xffff_8880_0456_7020;
const OLD: u128 = 0x1111_2222_3333_4444_5555_6666_7777_8888;
const NEW: u128 = 0x9999_aaaa_bbbb_cccc_dddd_eeee_ffff_0000;
/// lock cmpxchg16b 0x20(%rbp), as Debian's kernel executes it.
const CX16_RBP: [u8; 6] = [0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20];

fn cx16_cpu(expected: u128) -> FakeVcpu {
    let mut cpu = kernel_cpu();
    cpu.sregs.cr0 |= vcpu::CR0_WP;
    cpu.sregs.cr4 |= vcpu::CR4_SMAP;
    cpu.regs.rbp = SLOT - 0x20;
    cpu.regs.rax = expected as u64;
    cpu.regs.rdx = (expected >> 64) as u64;
    cpu.regs.rbx = NEW as u64;
    cpu.regs.rcx = (NEW >> 64) as u64;
    cpu.regs.rflags = 0x2 | rflags::CF | rflags::RF;
    cpu.poke(SLOT, &OLD.to_le_bytes());
    cpu
}

fn slot(cpu: &FakeVcpu, at: u64) -> u128 {
    let mut b = [0u8; 16];
    cpu.read_virt(at, &mut b).unwrap();
    u128::from_le_bytes(b)
}

#[test]
fn cmpxchg16b_success_stores_and_sets_zf() {
    let fixups = active();
    let mut cpu = cx16_cpu(OLD);
    let before = cpu.regs;
    let applied = fixups.handle(&mut cpu, &[0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20, 0x74, 0x66]);
    assert_eq!(
        applied.unwrap(),
        Applied {
            fixup: Fixup::Cmpxchg16b,
            rip: KERNEL_RIP,
            outcome: Outcome::Completed
        }
    );
    assert_eq!(slot(&cpu, SLOT), NEW);
    assert_eq!(cpu.regs.rip, KERNEL_RIP + 6);
    // ZF set, other flags kept, RF cleared.
    assert_eq!(cpu.regs.rflags, 0x2 | rflags::CF | rflags::ZF);
    // RDX:RAX unchanged on success.
    assert_eq!((cpu.regs.rax, cpu.regs.rdx), (before.rax, before.rdx));
    assert_eq!(fixups.hits(Fixup::Cmpxchg16b), 1);
    // A kernel write with CR0.WP and SMAP (AC clear) checked.
    assert_eq!(
        cpu.last_write_access,
        Some(DataAccess {
            user: false,
            write_protect: true,
            smap: true
        })
    );
}

#[test]
fn cmpxchg16b_failure_loads_rdx_rax_and_clears_zf() {
    let fixups = active();
    // Differs in the high half only.
    let mut cpu = cx16_cpu(OLD ^ (1 << 100));
    cpu.regs.rflags |= rflags::ZF;
    fixups.handle(&mut cpu, &CX16_RBP).unwrap();
    assert_eq!(slot(&cpu, SLOT), OLD);
    assert_eq!(cpu.regs.rax, OLD as u64);
    assert_eq!(cpu.regs.rdx, (OLD >> 64) as u64);
    assert_eq!(cpu.regs.rflags, 0x2 | rflags::CF);
    assert_eq!(cpu.regs.rip, KERNEL_RIP + 6);
    // RCX:RBX untouched.
    assert_eq!(cpu.regs.rbx, NEW as u64);
    assert_eq!(cpu.regs.rcx, (NEW >> 64) as u64);
}

#[test]
fn cmpxchg16b_without_lock_and_with_gs_and_rip_relative() {
    let fixups = active();
    // cmpxchg16b %gs:0x10(%rdi,%rsi,2), no lock prefix.
    let mut cpu = cx16_cpu(OLD);
    cpu.sregs.gs.base = SLOT - 0x1000;
    cpu.regs.rsi = 0x7f8;
    cpu.regs.rdi = 0x1000 - 0x10 - 2 * 0x7f8;
    fixups
        .handle(&mut cpu, &[0x65, 0x48, 0x0f, 0xc7, 0x4c, 0x77, 0x10])
        .unwrap();
    assert_eq!(slot(&cpu, SLOT), NEW);
    assert_eq!(cpu.regs.rip, KERNEL_RIP + 7);
    // lock cmpxchg16b -0x30(%rip): relative to the next instruction.
    let mut cpu = cx16_cpu(OLD);
    cpu.regs.rip = SLOT + 0x30 - 9;
    cpu.poke(
        cpu.regs.rip,
        &[0xf0, 0x48, 0x0f, 0xc7, 0x0d, 0xd0, 0xff, 0xff, 0xff],
    );
    // Bytes fetched at RIP (none reported).
    fixups.handle(&mut cpu, &[]).unwrap();
    assert_eq!(slot(&cpu, SLOT), NEW);
    assert_eq!(cpu.regs.rip, SLOT + 0x30);
}

#[test]
fn cmpxchg16b_misaligned_raises_gp0() {
    let fixups = active();
    let mut cpu = cx16_cpu(OLD);
    cpu.regs.rbp += 8;
    let before = cpu.regs;
    let applied = fixups.handle(&mut cpu, &CX16_RBP).unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::GP });
    assert_eq!(cpu.injected, [(vector::GP, Some(0))]);
    // Faulting: nothing changed, RIP at the instruction.
    assert_eq!(cpu.regs, before);
    assert_eq!(slot(&cpu, SLOT), OLD);
}

#[test]
fn cmpxchg16b_non_canonical_raises_ss_or_gp() {
    let fixups = active();
    // Base rbp: the stack segment, #SS(0).
    let mut cpu = cx16_cpu(OLD);
    cpu.regs.rbp = 0x0000_8000_0000_0000;
    let applied = fixups.handle(&mut cpu, &CX16_RBP).unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::SS });
    assert_eq!(cpu.injected, [(vector::SS, Some(0))]);
    // Base rdi: #GP(0).
    let mut cpu = cx16_cpu(OLD);
    cpu.regs.rdi = 0x0000_8000_0000_0000;
    let applied = fixups
        .handle(&mut cpu, &[0xf0, 0x48, 0x0f, 0xc7, 0x0f])
        .unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::GP });
    // With LA57 the same address is canonical (and here unmapped: #PF).
    let mut cpu = cx16_cpu(OLD);
    cpu.sregs.cr4 |= vcpu::CR4_LA57;
    cpu.regs.rdi = 0x0000_8000_0000_0000;
    let applied = fixups
        .handle(&mut cpu, &[0xf0, 0x48, 0x0f, 0xc7, 0x0f])
        .unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::PF });
}

#[test]
fn cmpxchg16b_unmapped_or_read_only_raises_pf_with_cr2() {
    let fixups = active();
    let mut cpu = cx16_cpu(OLD);
    cpu.unmap(SLOT);
    let before = cpu.regs;
    let applied = fixups.handle(&mut cpu, &CX16_RBP).unwrap();
    assert_eq!(applied.outcome, Outcome::Raised { vector: vector::PF });
    assert_eq!(cpu.injected, [(vector::PF, Some(0b010))]);
    assert_eq!(cpu.sregs.cr2, SLOT);
    assert_eq!(cpu.regs, before);
    // Read-only page written from user mode: P|W|U.
    let mut cpu = cx16_cpu(OLD);
    let user = FakeVcpu::long_mode(3);
    cpu.sregs.cs = user.sregs.cs;
    cpu.read_only.insert(SLOT / 0x1000);
    fixups.handle(&mut cpu, &CX16_RBP).unwrap();
    assert_eq!(cpu.injected, [(vector::PF, Some(0b111))]);
    assert_eq!(slot(&cpu, SLOT), OLD);
    assert_eq!(
        cpu.last_write_access,
        Some(DataAccess {
            user: true,
            write_protect: true,
            smap: false
        })
    );
    // Kernel with AC set: SMAP does not apply.
    let mut cpu = cx16_cpu(OLD);
    cpu.regs.rflags |= rflags::AC;
    fixups.handle(&mut cpu, &CX16_RBP).unwrap();
    assert!(!cpu.last_write_access.unwrap().smap);
}

#[test]
fn cmpxchg16b_with_an_exception_pending_fails_cleanly() {
    let fixups = active();
    let mut cpu = cx16_cpu(OLD);
    cpu.unmap(SLOT);
    cpu.exception_pending = true;
    let before = cpu.clone();
    let err = fixups.handle(&mut cpu, &CX16_RBP).unwrap_err();
    assert!(
        matches!(
            err,
            FixupError::Apply {
                fixup: Fixup::Cmpxchg16b,
                source: VcpuError::ExceptionPending { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(cpu.regs, before.regs);
    assert_eq!(cpu.sregs.cr2, before.sregs.cr2);
    assert_eq!(fixups.unhandled(), 1);
}

#[test]
fn cmpxchg8b_and_register_forms_stay_unhandled() {
    let fixups = active();
    for bytes in [
        &[0xf0, 0x0f, 0xc7, 0x4d, 0x20][..],
        &[0xf0, 0x48, 0x0f, 0xc7, 0xc9],
        &[0x48, 0x0f, 0xc7, 0x65, 0x20],
    ] {
        let mut cpu = cx16_cpu(OLD);
        let before = cpu.clone();
        let err = fixups.handle(&mut cpu, bytes).unwrap_err();
        assert!(matches!(err, FixupError::Unrecognised { .. }), "{err}");
        assert_eq!(cpu.regs, before.regs);
        assert_eq!(slot(&cpu, SLOT), OLD);
    }
}
