//! The fix-ups on a real KVM vCPU: a tiny 64-bit guest executes every instruction the fix-ups
//! handle, in kernel and in user mode, including SYSCALL from user mode, and reports what it
//! observed through `out` to port 0x80.
//!
//! The guest's results are architectural, so they must be the same on any KVM host; on a PVM
//! host (where the emulator fails on these instructions) the fix-up counters must show that
//! every fix-up was exercised. Skipped (with a message) where `/dev/kvm` cannot be opened.

use kvm_bindings::{
    kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::*;

const KERNEL_BASE: u64 = 0x10000;
const PF_HANDLER: u64 = KERNEL_BASE + 0x100;
const BP_HANDLER: u64 = KERNEL_BASE + 0x140;
const SYSCALL_ENTRY: u64 = KERNEL_BASE + 0x180;
const USER_BASE: u64 = 0x20_0000;
const USER_STACK: u64 = 0x28_0000;
/// Where FX_PROBE runs.
const FX_CODE: u64 = KERNEL_BASE + 0x200;
/// The FXSAVE areas FX_PROBE uses (0x7000 and 0x7400) and its MXCSR slots (0x7200, 0x7204).
const FX_AREA: u64 = 0x7000;
/// Stubs for the other exception vectors, 16 bytes each: ebx = vector, report 0x90, hlt.
const STUBS: u64 = KERNEL_BASE + 0x400;
/// The 16 bytes the kernel's cmpxchg16b works on (zero at start).
const CX16_SLOT: u64 = 0x6000;
const PML4: u64 = 0x1000;
const IDT: u64 = 0x4000;
const GDT: u64 = 0x5000;
const TSS: u64 = 0x5100;
const KERNEL_STACK: u64 = 0x9000;
const ENTRY_STACK: u64 = 0xa000;
/// Linux 6.1's MSR_SYSCALL_MASK (includes RF, which every fault sets in its frame).
const LINUX_FMASK: u64 = 0x257fd5;
const STAR: u64 = (0x23 << 48) | (0x10 << 32);

/// Kernel code at KERNEL_BASE.
#[rustfmt::skip]
const KERNEL_CODE: &[u8] = &[
    0x0f, 0x01, 0xcb,                               // stac
    0x9c, 0x5b,                                     // pushf; pop %rbx
    0xb0, 0x01, 0xe6, 0x80,                         // report 1
    0x0f, 0x01, 0xca,                               // clac
    0x9c, 0x5b,                                     // pushf; pop %rbx
    0xb0, 0x02, 0xe6, 0x80,                         // report 2
    0x48, 0xbf, 0xff, 0, 0xff, 0, 0xff, 0, 0xff, 0, // movabs $0x00ff00ff00ff00ff, %rdi
    0xf3, 0x48, 0x0f, 0xb8, 0xc7,                   // popcnt %rdi, %rax
    0x48, 0x89, 0xc3,                               // mov %rax, %rbx
    0x48, 0xb9, 7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, // movabs $0xffffffff00000007, %rcx
    0x49, 0xba, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, // movabs $0x11..11, %r10
    0xf3, 0x44, 0x0f, 0xb8, 0xd1,                   // popcnt %ecx, %r10d
    0x66, 0xba, 0x34, 0x12,                         // mov $0x1234, %dx
    0x66, 0xf3, 0x0f, 0xb8, 0xd2,                   // popcnt %dx, %dx
    0xb0, 0x03, 0xe6, 0x80,                         // report 3
    0x9b,                                           // fwait
    0xb0, 0x04, 0xe6, 0x80,                         // report 4
    0xcc,                                           // int3
    0x48, 0x8d, 0x0d, 0xf9, 0xff, 0xff, 0xff,       // after: lea after(%rip), %rcx
    0xb0, 0x05, 0xe6, 0x80,                         // report 5
    0xbf, 0x00, 0x60, 0x00, 0x00,                   // mov $CX16_SLOT, %edi
    0x31, 0xc0,                                     // xor %eax, %eax
    0x31, 0xd2,                                     // xor %edx, %edx
    0x45, 0x31, 0xc0,                               // xor %r8d, %r8d
    0x45, 0x31, 0xc9,                               // xor %r9d, %r9d
    0x48, 0xbb, 0x44, 0x44, 0x33, 0x33, 0x22, 0x22, 0x11, 0x11, // movabs $0x1111222233334444, %rbx
    0x48, 0xb9, 0x88, 0x88, 0x77, 0x77, 0x66, 0x66, 0x55, 0x55, // movabs $0x5555666677778888, %rcx
    0xf0, 0x48, 0x0f, 0xc7, 0x0f,                   // lock cmpxchg16b (%rdi): 0 == 0, stores
    0x41, 0x0f, 0x94, 0xc0,                         // sete %r8b
    0x48, 0x0f, 0xc7, 0x4f, 0x00,                   // cmpxchg16b 0(%rdi): 0 != new, loads
    0x41, 0x0f, 0x94, 0xc1,                         // sete %r9b
    0x4c, 0x8b, 0x17,                               // mov (%rdi), %r10
    0x4c, 0x8b, 0x5f, 0x08,                         // mov 8(%rdi), %r11
    0x49, 0x89, 0xc4,                               // mov %rax, %r12
    0x49, 0x89, 0xd5,                               // mov %rdx, %r13
    0xb0, 0x06, 0xe6, 0x80,                         // report 6
    // (write_image appends a jmp to FX_CODE)
];

/// The x87/SSE state instructions, at FX_CODE: MXCSR through ldmxcsr/stmxcsr, then an XMM0
/// and MXCSR change through fxsave64/fxrstor64, read back with a second fxsave64; then on to
/// user mode.
#[rustfmt::skip]
const FX_PROBE: &[u8] = &[
    0xbf, 0x00, 0x70, 0x00, 0x00,                   // mov $FX_AREA, %edi
    0xc7, 0x87, 0x00, 0x02, 0x00, 0x00, 0xa0, 0x1f, 0x00, 0x00, // movl $0x1fa0, 0x200(%rdi)
    0x0f, 0xae, 0x97, 0x00, 0x02, 0x00, 0x00,       // ldmxcsr 0x200(%rdi)
    0x0f, 0xae, 0x9f, 0x04, 0x02, 0x00, 0x00,       // stmxcsr 0x204(%rdi)
    0x44, 0x8b, 0x87, 0x04, 0x02, 0x00, 0x00,       // mov 0x204(%rdi), %r8d
    0x48, 0x0f, 0xae, 0x07,                         // fxsaveq (%rdi)
    0x44, 0x8b, 0x4f, 0x18,                         // mov 0x18(%rdi), %r9d (saved MXCSR)
    0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // movabs $0x1122334455667788, %rax
    0x48, 0x89, 0x87, 0xa0, 0x00, 0x00, 0x00,       // mov %rax, 0xa0(%rdi) (XMM0 low)
    0xc7, 0x47, 0x18, 0x80, 0x1f, 0x00, 0x00,       // movl $0x1f80, 0x18(%rdi) (MXCSR)
    0x48, 0x0f, 0xae, 0x0f,                         // fxrstorq (%rdi)
    0x48, 0x0f, 0xae, 0x87, 0x00, 0x04, 0x00, 0x00, // fxsaveq 0x400(%rdi)
    0x4c, 0x8b, 0x97, 0xa0, 0x04, 0x00, 0x00,       // mov 0x4a0(%rdi), %r10 (XMM0 low)
    0x44, 0x8b, 0x9f, 0x18, 0x04, 0x00, 0x00,       // mov 0x418(%rdi), %r11d (MXCSR)
    0xb0, 0x07, 0xe6, 0x80,                         // report 7
    0x6a, 0x2b,                                     // push $0x2b (user ss)
    0x68, 0x00, 0x00, 0x28, 0x00,                   // push $USER_STACK
    0x68, 0x02, 0x02, 0x00, 0x00,                   // push $0x202 (rflags)
    0x6a, 0x33,                                     // push $0x33 (user cs)
    0x68, 0x00, 0x00, 0x20, 0x00,                   // push $USER_BASE
    0x48, 0xcf,                                     // iretq
];
/// Offset of the instruction after the kernel's int3.
const KERNEL_AFTER_INT3: u64 = 0x50;

/// #PF handler: starts with clac like Linux's; reports frame rip (rbx) and error code (rdx).
#[rustfmt::skip]
const PF_CODE: &[u8] = &[
    0x0f, 0x01, 0xca,                               // clac
    0x48, 0x8b, 0x5c, 0x24, 0x08,                   // mov 8(%rsp), %rbx
    0x48, 0x8b, 0x14, 0x24,                         // mov (%rsp), %rdx
    0xb0, 0x8e, 0xe6, 0x80,                         // report 0x8e
    0xf4,                                           // hlt
];

/// #BP handler: reports the pushed rip (rbx) and returns.
#[rustfmt::skip]
const BP_CODE: &[u8] = &[
    0x0f, 0x01, 0xca,                               // clac
    0x48, 0x8b, 0x1c, 0x24,                         // mov (%rsp), %rbx
    0xb0, 0x83, 0xe6, 0x80,                         // report 0x83
    0x48, 0xcf,                                     // iretq
];

/// SYSCALL entry (LSTAR): reports cs (r12) and ss (r13) and returns to user mode.
#[rustfmt::skip]
const SYSCALL_CODE: &[u8] = &[
    0x41, 0x8c, 0xcc,                               // mov %cs, %r12d
    0x41, 0x8c, 0xd5,                               // mov %ss, %r13d
    0xb0, 0x10, 0xe6, 0x80,                         // report 0x10
    0x48, 0x0f, 0x07,                               // sysretq
];

/// User code at USER_BASE.
#[rustfmt::skip]
const USER_CODE: &[u8] = &[
    0xbf, 0x01, 0x00, 0x00, 0x00,                   // mov $1, %edi
    0x0f, 0x05,                                     // syscall
    0xba, 0xf0, 0xf0, 0x00, 0x00,                   // mov $0xf0f0, %edx
    0xf3, 0x48, 0x0f, 0xb8, 0xf2,                   // popcnt %rdx, %rsi
    0xbf, 0x02, 0x00, 0x00, 0x00,                   // mov $2, %edi
    0x0f, 0x05,                                     // syscall
    0xcc,                                           // int3
    0x9b,                                           // fwait
    0xbf, 0x03, 0x00, 0x00, 0x00,                   // mov $3, %edi
    0x0f, 0x05,                                     // syscall
    0x0f, 0x01, 0xca,                               // clac (#UD in user mode)
    0xf4,                                           // hlt
];

/// One `out` of the guest: its code and the registers at that point.
struct Event {
    code: u8,
    regs: kvm_regs,
    sregs: kvm_sregs,
}

/// Paging/protection features of the guest (like Linux's, or bare), and how the fix-ups reach
/// the registers.
#[derive(Clone, Copy, Debug)]
struct GuestFeatures {
    nx_smep_smap: bool,
    sync_regs: bool,
}

fn open_kvm() -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            eprintln!("skipped: /dev/kvm not usable: {e}");
            None
        }
    }
}

fn write_image(mem: &GuestMemoryMmap<()>) {
    let put = |code: &[u8], at: u64| mem.write_slice(code, GuestAddress(at)).unwrap();
    put(KERNEL_CODE, KERNEL_BASE);
    put(PF_CODE, PF_HANDLER);
    put(BP_CODE, BP_HANDLER);
    put(SYSCALL_CODE, SYSCALL_ENTRY);
    put(USER_CODE, USER_BASE);
    // jmp FX_CODE after the kernel code.
    let jmp_at = KERNEL_BASE + KERNEL_CODE.len() as u64;
    let rel = (FX_CODE as i64 - (jmp_at as i64 + 5)) as i32;
    let mut jmp = vec![0xe9];
    jmp.extend_from_slice(&rel.to_le_bytes());
    put(&jmp, jmp_at);
    put(FX_PROBE, FX_CODE);
    put(&[0; 0x600], FX_AREA);
    assert!(KERNEL_CODE.len() + 5 <= (PF_HANDLER - KERNEL_BASE) as usize);
    assert!(SYSCALL_ENTRY + (SYSCALL_CODE.len() as u64) <= FX_CODE);
    assert!(FX_CODE + (FX_PROBE.len() as u64) <= STUBS);
    // The kernel's cmpxchg16b expects zero there.
    put(&[0; 16], CX16_SLOT);
    for v in 0..32u64 {
        let mut stub = vec![0xbb];
        stub.extend_from_slice(&(v as u32).to_le_bytes());
        stub.extend_from_slice(&[0xb0, 0x90, 0xe6, 0x80, 0xf4]);
        put(&stub, STUBS + v * 16);
    }
    // Identity map: first 2 MiB supervisor, second 2 MiB user (2 MiB pages).
    mem.write_obj((PML4 + 0x1000) | 7, GuestAddress(PML4))
        .unwrap();
    mem.write_obj((PML4 + 0x2000) | 7, GuestAddress(PML4 + 0x1000))
        .unwrap();
    mem.write_obj(0x83u64, GuestAddress(PML4 + 0x2000)).unwrap();
    mem.write_obj(USER_BASE | 0x87, GuestAddress(PML4 + 0x2008))
        .unwrap();
    // GDT: 0x10 kernel code64, 0x18 kernel data, 0x23 user code32, 0x2b user data,
    // 0x33 user code64, 0x38 TSS.
    let tss_low = 103 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xff) << 56);
    let gdt: [u64; 9] = [
        0,
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_fb00_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
        tss_low,
        TSS >> 32,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64)).unwrap();
    }
    mem.write_obj(ENTRY_STACK, GuestAddress(TSS + 4)).unwrap();
    // IDT: #PF and #BP (user-callable) handlers, stubs for the rest.
    for v in 0..32u64 {
        let (handler, gate_type) = match v {
            14 => (PF_HANDLER, 0x8eu64),
            3 => (BP_HANDLER, 0xee),
            _ => (STUBS + v * 16, 0x8e),
        };
        let low = (handler & 0xffff)
            | (0x10 << 16)
            | (gate_type << 40)
            | (((handler >> 16) & 0xffff) << 48);
        mem.write_obj(low, GuestAddress(IDT + v * 16)).unwrap();
        mem.write_obj(handler >> 32, GuestAddress(IDT + v * 16 + 8))
            .unwrap();
    }
}

fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, features: GuestFeatures) {
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x10,
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
    };
    let data = kvm_segment {
        selector: 0x18,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS,
        limit: 103,
        selector: 0x38,
        type_: 0xb,
        s: 0,
        l: 0,
        g: 0,
        db: 0,
        ..code
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 9 * 8 - 1;
    sregs.idt.base = IDT;
    sregs.idt.limit = 32 * 16 - 1;
    // PE MP ET NE WP PG; PAE OSFXSR OSXMMEXCPT; LME LMA SCE.
    sregs.cr0 = 0x8005_0033;
    sregs.cr3 = PML4;
    sregs.cr4 = 0x620;
    sregs.efer = 0x501 | (1 << 10);
    if features.nx_smep_smap {
        sregs.cr4 |= (1 << 20) | (1 << 21);
        sregs.efer |= 1 << 11;
    }
    vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_regs {
        rip: KERNEL_BASE,
        rsp: KERNEL_STACK,
        rflags: 2,
        rdx: 0xabcd_0000_0000_0000,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let msrs = Msrs::from_entries(&[
        msr(MSR_STAR, STAR),
        msr(MSR_LSTAR, SYSCALL_ENTRY),
        msr(MSR_CSTAR, 0),
        msr(MSR_SYSCALL_MASK, LINUX_FMASK),
    ])
    .unwrap();
    assert_eq!(vcpu.set_msrs(&msrs).unwrap(), 4);
}

/// Runs the probe guest to its final `hlt`; returns its events, or the fix-up error that
/// stopped it.
/// Whether the guest gets the CPU features the probe needs: SMAP (stac/clac) always, and
/// SMEP and NX for the Linux-like configuration. PVM does not list leaf 7 in
/// KVM_GET_SUPPORTED_CPUID but passes the host's through (pvm-kvm note), so there the host's
/// CPUID counts.
fn cpu_supports(kvm: &Kvm, features: GuestFeatures) -> bool {
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let find = |function: u32| {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == 0)
            .copied()
    };
    let mut leaf7 = find(7).map_or(0, |e| e.ebx);
    if host_needs_fixups() {
        // SAFETY: CPUID exists on every x86_64 CPU and never faults; an absent leaf reads as
        // another leaf's values at worst. (The intrinsic is safe on newer Rust, unsafe on the
        // declared minimum 1.85, hence the allow.)
        #[allow(unused_unsafe)]
        let host = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
        leaf7 |= host.ebx;
    }
    let ext = find(0x8000_0001).map_or(0, |e| e.edx);
    let smap = leaf7 & (1 << 20) != 0;
    let smep = leaf7 & (1 << 7) != 0;
    let nx = ext & (1 << 20) != 0;
    let ok = smap && (!features.nx_smep_smap || (smep && nx));
    if !ok {
        eprintln!("skipped {features:?}: KVM offers smap={smap} smep={smep} nx={nx}");
    }
    ok
}

fn run_probe(fixups: &Fixups, features: GuestFeatures) -> Option<Result<Vec<Event>, FixupError>> {
    let kvm = open_kvm()?;
    if !cpu_supports(&kvm, features) {
        return None;
    }
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    // No in-kernel irqchip: the guest's final hlt must exit to userspace.
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    for (slot, r) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
        };
        // SAFETY: `mem` is a live mapping that outlives the VM (dropped after `vm` and the vCPU
        // at the end of this function).
        unsafe { vm.set_user_memory_region(region).unwrap() };
    }
    write_image(&mem);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    setup_vcpu(&kvm, &vcpu, features);

    if features.sync_regs {
        vcpu.set_sync_valid_reg(SyncReg::Register);
        vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
    }

    let mut events = Vec::new();
    for _ in 0..500 {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(0x80, data) => {
                let code = data[0];
                events.push(Event {
                    code,
                    regs: vcpu.get_regs().unwrap(),
                    sregs: vcpu.get_sregs().unwrap(),
                });
            }
            VcpuExit::Hlt => return Some(Ok(events)),
            VcpuExit::InternalError => {
                let failure = emulation_failure(vcpu.get_kvm_run())
                    .expect("internal error other than an emulation failure");
                let bytes = failure.insn_bytes().to_vec();
                let mut cpu = if features.sync_regs {
                    KvmVcpuAccess::with_sync_regs(&mut vcpu, &mem)
                } else {
                    KvmVcpuAccess::new(&vcpu, &mem)
                };
                if let Err(e) = fixups.handle(&mut cpu, &bytes) {
                    return Some(Err(e));
                }
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("guest did not finish");
}

fn check_events(events: &[Event]) {
    let codes: Vec<u8> = events.iter().map(|e| e.code).collect();
    assert_eq!(
        codes,
        [1, 2, 3, 4, 0x83, 5, 6, 7, 0x10, 0x10, 0x83, 0x10, 0x90],
        "event sequence"
    );
    let ac = 1 << 18;
    // stac / clac
    assert_eq!(events[0].regs.rbx & ac, ac);
    assert_eq!(events[1].regs.rbx & ac, 0);
    // popcnt: 64-bit, 32-bit zero-extending, 16-bit preserving the upper bits
    let e = &events[2].regs;
    assert_eq!(e.rbx, 32);
    assert_eq!(e.r10, 3);
    assert_eq!(e.rdx, 0xabcd_0000_0000_0005);
    // int3 in the kernel: #BP pushed the address after int3, and execution resumed there.
    assert_eq!(events[4].regs.rbx, KERNEL_BASE + KERNEL_AFTER_INT3);
    assert_eq!(events[5].regs.rcx, KERNEL_BASE + KERNEL_AFTER_INT3);
    // cmpxchg16b: the first stored RCX:RBX (ZF=1), the second found it and loaded RDX:RAX
    // (ZF=0).
    let e = &events[6].regs;
    let (new_lo, new_hi) = (0x1111_2222_3333_4444, 0x5555_6666_7777_8888);
    assert_eq!((e.r8, e.r9), (1, 0), "ZF after the two cmpxchg16b");
    assert_eq!((e.r10, e.r11), (new_lo, new_hi), "memory after cmpxchg16b");
    assert_eq!(
        (e.r12, e.r13),
        (new_lo, new_hi),
        "RDX:RAX after the failed one"
    );
    // ldmxcsr then stmxcsr; fxsave saw that MXCSR; fxrstor loaded XMM0 and MXCSR from memory.
    let e = &events[7].regs;
    assert_eq!(e.r8, 0x1fa0, "stmxcsr after ldmxcsr");
    assert_eq!(e.r9, 0x1fa0, "MXCSR in the fxsave image");
    assert_eq!(e.r10, 0x1122_3344_5566_7788, "XMM0 after fxrstor");
    assert_eq!(e.r11, 0x1f80, "MXCSR after fxrstor");
    // Three system calls from user mode, each entering at CPL 0 with SYSCALL's state.
    for (i, (n, after)) in [(8, 7u64), (9, 24), (11, 33)].into_iter().enumerate() {
        let e = &events[n];
        assert_eq!(e.regs.rdi, i as u64 + 1, "syscall {i}");
        assert_eq!(e.regs.rip, SYSCALL_ENTRY + 10, "syscall {i}");
        assert_eq!(e.regs.rcx, USER_BASE + after, "syscall {i}");
        assert_eq!(e.regs.r11 & !(1 << 16), 0x202, "syscall {i}");
        assert_eq!(e.regs.rsp, USER_STACK, "syscall {i}");
        assert_eq!(e.regs.rflags & (LINUX_FMASK | (1 << 16)), 0, "syscall {i}");
        assert_eq!((e.regs.r12, e.regs.r13), (0x10, 0x18), "syscall {i}");
        assert_eq!(
            (e.sregs.cs.selector, e.sregs.cs.dpl),
            (0x10, 0),
            "syscall {i}"
        );
        assert_eq!(
            (e.sregs.ss.selector, e.sregs.ss.dpl),
            (0x18, 0),
            "syscall {i}"
        );
    }
    // popcnt in user mode
    assert_eq!(events[9].regs.rsi, 8);
    // int3 in user mode: #BP with the user address after it
    assert_eq!(events[10].regs.rbx, USER_BASE + 25);
    // clac in user mode: #UD
    assert_eq!(events[12].regs.rbx, u64::from(vcpu::vector::UD));
}

#[test]
fn probe_guest_runs_with_fixups() {
    for (nx_smep_smap, sync_regs) in [(false, false), (true, false), (true, true)] {
        let fixups = Fixups::with_host(FixupMode::On, host_needs_fixups());
        let features = GuestFeatures {
            nx_smep_smap,
            sync_regs,
        };
        let Some(result) = run_probe(&fixups, features) else {
            continue;
        };
        let events = result.unwrap_or_else(|e| panic!("{features:?}: {e}"));
        check_events(&events);
        eprintln!("{features:?}: {}", fixups.summary());
        if host_needs_fixups() {
            assert_eq!(fixups.hits(Fixup::Syscall), 3, "{}", fixups.summary());
            // PVM's emulator runs fxsave/fxrstor itself (KVM's emulator has them): those two
            // fix-ups are not reached here; the probe still checks their results, and
            // kvm_access_fx_state_and_checked_data_access the state access they use.
            for fixup in Fixup::ALL {
                if matches!(fixup, Fixup::Fxsave | Fixup::Fxrstor) {
                    continue;
                }
                assert!(fixups.hits(fixup) > 0, "{fixup}: {}", fixups.summary());
            }
        }
        assert_eq!(fixups.unhandled(), 0);
    }
}

#[test]
fn probe_guest_stops_cleanly_with_fixups_off() {
    let fixups = Fixups::with_host(FixupMode::Off, host_needs_fixups());
    let features = GuestFeatures {
        nx_smep_smap: false,
        sync_regs: false,
    };
    let Some(result) = run_probe(&fixups, features) else {
        return;
    };
    if host_needs_fixups() {
        let Err(e) = result else {
            panic!("guest finished on PVM without fix-ups");
        };
        assert!(
            matches!(
                e,
                FixupError::Disabled {
                    rip: KERNEL_BASE,
                    recognised: Some(Fixup::Stac),
                    ..
                }
            ),
            "{e}"
        );
    } else {
        check_events(&result.unwrap());
    }
}

/// `KvmVcpuAccess::cmpxchg16b` on a real vCPU's page tables (the vCPU never runs): a permitted
/// write sets the accessed/dirty bits, refused writes are page faults, memory the VMM does not
/// have is a clean error.
#[test]
fn kvm_access_cmpxchg16b_walks_the_guest_page_tables() {
    let Some(kvm) = open_kvm() else {
        return;
    };
    let vm = kvm.create_vm().unwrap();
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    for (slot, r) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
        };
        // SAFETY: `mem` is a live mapping that outlives the VM (dropped after it).
        unsafe { vm.set_user_memory_region(region).unwrap() };
    }
    write_image(&mem);
    let pd = PML4 + 0x2000;
    // 0x40_0000 -> 1 GiB (outside guest memory); 0x60_0000 -> 0, read-only.
    mem.write_obj(0x4000_0000u64 | 0x83, GuestAddress(pd + 16))
        .unwrap();
    mem.write_obj(0x81u64, GuestAddress(pd + 24)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let features = GuestFeatures {
        nx_smep_smap: false,
        sync_regs: false,
    };
    setup_vcpu(&kvm, &vcpu, features);
    let kernel = DataAccess {
        user: false,
        write_protect: true,
        smap: false,
    };
    let mut cpu = KvmVcpuAccess::new(&vcpu, &mem);
    let old = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210_u128;
    mem.write_obj(old, GuestAddress(CX16_SLOT + 0x10)).unwrap();
    assert_eq!(mem.read_obj::<u64>(GuestAddress(pd)).unwrap(), 0x83);
    // Mismatch: nothing stored, but the entries are marked as a locked write marks them.
    assert_eq!(cpu.cmpxchg16b(CX16_SLOT + 0x10, kernel, 5, 6).unwrap(), old);
    assert_eq!(
        mem.read_obj::<u128>(GuestAddress(CX16_SLOT + 0x10))
            .unwrap(),
        old
    );
    assert_eq!(mem.read_obj::<u64>(GuestAddress(pd)).unwrap(), 0x83 | 0x60);
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(PML4)).unwrap() & 0x20,
        0x20
    );
    // Match: stored.
    assert_eq!(
        cpu.cmpxchg16b(CX16_SLOT + 0x10, kernel, old, 6).unwrap(),
        old
    );
    assert_eq!(
        mem.read_obj::<u128>(GuestAddress(CX16_SLOT + 0x10))
            .unwrap(),
        6
    );
    // Read-only with CR0.WP, not present, outside guest memory, misaligned.
    assert!(matches!(
        cpu.cmpxchg16b(0x60_0000, kernel, 0, 1),
        Err(VcpuError::PageFault {
            gva: 0x60_0000,
            error_code: 3
        })
    ));
    assert!(matches!(
        cpu.cmpxchg16b(0x8000_0000, kernel, 0, 1),
        Err(VcpuError::PageFault { error_code: 2, .. })
    ));
    assert!(matches!(
        cpu.cmpxchg16b(0x40_0010, kernel, 0, 1),
        Err(VcpuError::WriteMemory {
            gva: 0x40_0010,
            gpa: 0x4000_0010
        })
    ));
    assert!(matches!(
        cpu.cmpxchg16b(CX16_SLOT + 8, kernel, 0, 1),
        Err(VcpuError::Misaligned { .. })
    ));
    assert_eq!(mem.read_obj::<u128>(GuestAddress(0)).unwrap() & 0xff, 0);
}

/// `KvmVcpuAccess`'s x87/SSE state (KVM_GET/SET_XSAVE, checked against KVM_GET_FPU) and its
/// checked data reads and writes through a real vCPU's page tables (the vCPU never runs).
#[test]
fn kvm_access_fx_state_and_checked_data_access() {
    let Some(kvm) = open_kvm() else {
        return;
    };
    let vm = kvm.create_vm().unwrap();
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    for (slot, r) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
        };
        // SAFETY: `mem` is a live mapping that outlives the VM (dropped after it).
        unsafe { vm.set_user_memory_region(region).unwrap() };
    }
    write_image(&mem);
    let vcpu = vm.create_vcpu(0).unwrap();
    let features = GuestFeatures {
        nx_smep_smap: false,
        sync_regs: false,
    };
    setup_vcpu(&kvm, &vcpu, features);
    let mut cpu = KvmVcpuAccess::new(&vcpu, &mem);

    // A fresh vCPU: the reset values (components in their initial state, which KVM_GET_XSAVE
    // reports as such; KVM_GET_FPU shows the raw buffer then, MXCSR 0 on this PVM host).
    let before = cpu.fx_state().unwrap();
    let u32_at =
        |image: &FxImage, at: usize| u32::from_le_bytes(image[at..at + 4].try_into().unwrap());
    assert_eq!(u32_at(&before, 24), 0x1f80);
    assert_eq!(u16::from_le_bytes([before[0], before[1]]), 0x037f);
    let mask = u32_at(&before, 28);
    assert_ne!(mask & 0xffbf, 0, "MXCSR_MASK {mask:#x}");
    // Loading changes MXCSR, FCW, ST0 and XMM3; MXCSR_MASK stays.
    let mut image = before;
    image[24..28].copy_from_slice(&0x1fa0u32.to_le_bytes());
    image[0..2].copy_from_slice(&0x037eu16.to_le_bytes());
    image[28..32].copy_from_slice(&0u32.to_le_bytes());
    let xmm3: [u8; 16] = core::array::from_fn(|i| 0x30 + i as u8);
    image[160 + 48..160 + 64].copy_from_slice(&xmm3);
    let st0: [u8; 10] = core::array::from_fn(|i| 0x90 + i as u8);
    image[32..42].copy_from_slice(&st0);
    cpu.set_fx_state(&image).unwrap();
    // KVM_GET_FPU shows the x87 and XMM registers (not MXCSR: KVM's KVM_GET_FPU/KVM_SET_FPU
    // never copy it, which is why the fix-ups use the XSAVE ioctls).
    let fpu = vcpu.get_fpu().unwrap();
    assert_eq!(fpu.fcw, 0x037e);
    assert_eq!(fpu.xmm[3], xmm3);
    assert_eq!(fpu.fpr[0][..10], st0);
    let after = cpu.fx_state().unwrap();
    assert_eq!(u32_at(&after, 24), 0x1fa0);
    assert_eq!(u32_at(&after, 28), mask);
    assert_eq!(after[160 + 48..160 + 64], xmm3);

    // Checked data accesses: the first 2 MiB are supervisor pages, the next 2 MiB user pages.
    let kernel = DataAccess {
        user: false,
        write_protect: true,
        smap: true,
    };
    let user = DataAccess {
        user: true,
        ..kernel
    };
    let pd = PML4 + 0x2000;
    let pde = |i: u64| mem.read_obj::<u64>(GuestAddress(pd + 8 * i)).unwrap();
    assert_eq!(pde(0) & 0x60, 0);
    // A kernel write into its own page: written, accessed and dirty set.
    cpu.write_data(0x7800, kernel, &[1, 2, 3, 4]).unwrap();
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x7800)).unwrap(),
        0x0403_0201
    );
    assert_eq!(pde(0) & 0x60, 0x60);
    // A write straddling into the user half under SMAP faults there and writes nothing.
    mem.write_slice(&[0xee; 16], GuestAddress(0x1f_fff8))
        .unwrap();
    assert!(matches!(
        cpu.write_data(0x1f_fff8, kernel, &[0; 16]),
        Err(VcpuError::PageFault {
            gva: 0x20_0000,
            error_code: 3
        })
    ));
    assert_eq!(
        mem.read_obj::<u128>(GuestAddress(0x1f_fff8)).unwrap(),
        u128::from_le_bytes([0xee; 16])
    );
    assert_eq!(pde(1) & 0x60, 0);
    // Without SMAP (RFLAGS.AC) it goes through, marking both pages.
    let no_smap = DataAccess {
        smap: false,
        ..kernel
    };
    cpu.write_data(0x1f_fff8, no_smap, &[0x11; 16]).unwrap();
    assert_eq!(
        mem.read_obj::<u128>(GuestAddress(0x1f_fff8)).unwrap(),
        u128::from_le_bytes([0x11; 16])
    );
    assert_eq!(pde(1) & 0x60, 0x60);
    // Reads: user from a user page; user from a supervisor page (P|U); not present (0).
    let mut b = [0u8; 8];
    cpu.read_data(0x20_0000, user, &mut b).unwrap();
    assert_eq!(b, [0x11; 8]);
    assert!(matches!(
        cpu.read_data(0x7800, user, &mut b),
        Err(VcpuError::PageFault {
            gva: 0x7800,
            error_code: 5
        })
    ));
    assert!(matches!(
        cpu.read_data(0x8000_0000, kernel, &mut b),
        Err(VcpuError::PageFault {
            gva: 0x8000_0000,
            error_code: 0
        })
    ));
    // Memory the VMM does not have is a clean error, not a fault.
    mem.write_obj(0x4000_0000u64 | 0x83, GuestAddress(pd + 16))
        .unwrap();
    assert!(matches!(
        cpu.write_data(0x40_0010, kernel, &[0; 4]),
        Err(VcpuError::WriteMemory {
            gva: 0x40_0010,
            gpa: 0x4000_0010
        })
    ));
}
