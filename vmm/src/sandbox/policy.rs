//! The VMM's system-call policies, as data: one [`Policy`] per kind of thread, each made of
//! groups named after the code that makes the calls. Built from `scripts/sandbox-strace
//! --by-thread` over the hype test suite, plus the paths no test exercises (noted per group).
//!
//! Beyond the runtime, a vCPU only writes (serial output, kick and interrupt eventfds, commands
//! to its devices' workers) and waits on futexes (pause gate, device locks): nothing but its
//! KVM ioctls. The serial stdin thread needs nothing beyond the runtime.
//!
//! A filter is inherited by the threads its thread creates later, and a thread's own filter
//! only narrows it: a thread that starts threads of another kind must allow what they need.
//! The API threads start device workers and watchdogs (hot-plug); a device worker starts a
//! watchdog on every reconnect. The tests below check those inclusions.

use std::mem::size_of;

use hype_sandbox::{Cond, Group, Policy, Rule, CLONE3_REFUSED, OPEN_REFUSED, RUNTIME};
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_ioeventfd, kvm_irqchip, kvm_irqfd,
    kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_translation,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

const KVMIO: u64 = 0xAE;
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// An ioctl request number, as `_IOC(dir, KVMIO, nr, size)` builds it.
const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

/// `KVM_RUN`.
pub const KVM_RUN: u64 = kvm_ioc(IOC_NONE, 0x80, 0);
const KVM_GET_REGS: u64 = kvm_ioc(IOC_READ, 0x81, size_of::<kvm_regs>());
const KVM_SET_REGS: u64 = kvm_ioc(IOC_WRITE, 0x82, size_of::<kvm_regs>());
const KVM_GET_SREGS: u64 = kvm_ioc(IOC_READ, 0x83, size_of::<kvm_sregs>());
const KVM_SET_SREGS: u64 = kvm_ioc(IOC_WRITE, 0x84, size_of::<kvm_sregs>());
const KVM_TRANSLATE: u64 = kvm_ioc(IOC_READ | IOC_WRITE, 0x85, size_of::<kvm_translation>());
const KVM_GET_MSRS: u64 = kvm_ioc(IOC_READ | IOC_WRITE, 0x88, size_of::<kvm_msrs>());
const KVM_SET_MSRS: u64 = kvm_ioc(IOC_WRITE, 0x89, size_of::<kvm_msrs>());
const KVM_GET_FPU: u64 = kvm_ioc(IOC_READ, 0x8c, size_of::<kvm_fpu>());
const KVM_SET_FPU: u64 = kvm_ioc(IOC_WRITE, 0x8d, size_of::<kvm_fpu>());
const KVM_GET_LAPIC: u64 = kvm_ioc(IOC_READ, 0x8e, size_of::<kvm_lapic_state>());
const KVM_SET_LAPIC: u64 = kvm_ioc(IOC_WRITE, 0x8f, size_of::<kvm_lapic_state>());
const KVM_GET_CPUID2: u64 = kvm_ioc(IOC_READ | IOC_WRITE, 0x91, size_of::<kvm_cpuid2>());
const KVM_GET_MP_STATE: u64 = kvm_ioc(IOC_READ, 0x98, size_of::<kvm_mp_state>());
const KVM_SET_MP_STATE: u64 = kvm_ioc(IOC_WRITE, 0x99, size_of::<kvm_mp_state>());
const KVM_GET_VCPU_EVENTS: u64 = kvm_ioc(IOC_READ, 0x9f, size_of::<kvm_vcpu_events>());
const KVM_SET_VCPU_EVENTS: u64 = kvm_ioc(IOC_WRITE, 0xa0, size_of::<kvm_vcpu_events>());
const KVM_GET_DEBUGREGS: u64 = kvm_ioc(IOC_READ, 0xa1, size_of::<kvm_debugregs>());
const KVM_SET_DEBUGREGS: u64 = kvm_ioc(IOC_WRITE, 0xa2, size_of::<kvm_debugregs>());
const KVM_GET_XSAVE: u64 = kvm_ioc(IOC_READ, 0xa4, size_of::<kvm_xsave>());
const KVM_SET_XSAVE: u64 = kvm_ioc(IOC_WRITE, 0xa5, size_of::<kvm_xsave>());
const KVM_GET_XCRS: u64 = kvm_ioc(IOC_READ, 0xa6, size_of::<kvm_xcrs>());
const KVM_SET_XCRS: u64 = kvm_ioc(IOC_WRITE, 0xa7, size_of::<kvm_xcrs>());
const KVM_KVMCLOCK_CTRL: u64 = kvm_ioc(IOC_NONE, 0xad, 0);
const KVM_GET_XSAVE2: u64 = kvm_ioc(IOC_READ, 0xcf, size_of::<kvm_xsave>());
/// `KVM_IRQFD`.
pub const KVM_IRQFD: u64 = kvm_ioc(IOC_WRITE, 0x76, size_of::<kvm_irqfd>());
/// `KVM_IOEVENTFD`.
pub const KVM_IOEVENTFD: u64 = kvm_ioc(IOC_WRITE, 0x79, size_of::<kvm_ioeventfd>());
const KVM_SET_USER_MEMORY_REGION: u64 =
    kvm_ioc(IOC_WRITE, 0x46, size_of::<kvm_userspace_memory_region>());
const KVM_GET_IRQCHIP: u64 = kvm_ioc(IOC_READ | IOC_WRITE, 0x62, size_of::<kvm_irqchip>());
const KVM_SET_IRQCHIP: u64 = kvm_ioc(IOC_READ, 0x63, size_of::<kvm_irqchip>());
const KVM_SET_CLOCK: u64 = kvm_ioc(IOC_WRITE, 0x7b, size_of::<kvm_clock_data>());
const KVM_GET_CLOCK: u64 = kvm_ioc(IOC_READ, 0x7c, size_of::<kvm_clock_data>());
const KVM_GET_PIT2: u64 = kvm_ioc(IOC_READ, 0x9f, size_of::<kvm_pit_state2>());
const KVM_SET_PIT2: u64 = kvm_ioc(IOC_WRITE, 0xa0, size_of::<kvm_pit_state2>());

const TCGETS: u64 = libc::TCGETS;
const TCSETS: u64 = libc::TCSETS;
const TCSETSW: u64 = libc::TCSETSW;
const TCSETSF: u64 = libc::TCSETSF;

const F_GETFD: u64 = libc::F_GETFD as u64;
const F_SETFD: u64 = libc::F_SETFD as u64;
const F_GETFL: u64 = libc::F_GETFL as u64;
const F_SETFL: u64 = libc::F_SETFL as u64;
const F_DUPFD_CLOEXEC: u64 = libc::F_DUPFD_CLOEXEC as u64;
const AF_UNIX: u64 = libc::AF_UNIX as u64;
const PR_SET_NO_NEW_PRIVS: u64 = libc::PR_SET_NO_NEW_PRIVS as u64;
const SECCOMP_SET_MODE_FILTER: u64 = 1;

/// The vCPU's run loop and the register work of PVM fix-ups (and, for snapshots, reading and
/// restoring a vCPU's whole state) on the vCPU's own fd.
pub static VCPU_KVM: Group = Group {
    name: "vcpu-kvm",
    why: "KVM_RUN; PVM fix-ups (registers, special registers, events, FPU/XSAVE, address \
          translation); a vCPU's state for snapshots",
    rules: &[Rule::when(
        "ioctl",
        libc::SYS_ioctl,
        &[
            &[Cond::eq(1, KVM_RUN)],
            &[Cond::eq(1, KVM_GET_REGS)],
            &[Cond::eq(1, KVM_SET_REGS)],
            &[Cond::eq(1, KVM_GET_SREGS)],
            &[Cond::eq(1, KVM_SET_SREGS)],
            &[Cond::eq(1, KVM_GET_VCPU_EVENTS)],
            &[Cond::eq(1, KVM_SET_VCPU_EVENTS)],
            &[Cond::eq(1, KVM_TRANSLATE)],
            &[Cond::eq(1, KVM_GET_FPU)],
            &[Cond::eq(1, KVM_SET_FPU)],
            &[Cond::eq(1, KVM_GET_XSAVE)],
            &[Cond::eq(1, KVM_GET_XSAVE2)],
            &[Cond::eq(1, KVM_SET_XSAVE)],
            &[Cond::eq(1, KVM_GET_MSRS)],
            &[Cond::eq(1, KVM_SET_MSRS)],
            &[Cond::eq(1, KVM_GET_LAPIC)],
            &[Cond::eq(1, KVM_SET_LAPIC)],
            &[Cond::eq(1, KVM_GET_XCRS)],
            &[Cond::eq(1, KVM_SET_XCRS)],
            &[Cond::eq(1, KVM_GET_MP_STATE)],
            &[Cond::eq(1, KVM_SET_MP_STATE)],
            &[Cond::eq(1, KVM_GET_DEBUGREGS)],
            &[Cond::eq(1, KVM_SET_DEBUGREGS)],
            &[Cond::eq(1, KVM_GET_CPUID2)],
            &[Cond::eq(1, KVM_KVMCLOCK_CTRL)],
        ],
    )],
};

/// Rust's standard library, in debug builds, checks that a descriptor is open before it closes
/// it (`fcntl(F_GETFD)`); every thread closes some.
pub static FD_CHECK: Group = Group {
    name: "fd-check",
    why: "Rust std (debug builds) checks a descriptor with F_GETFD before closing it",
    rules: &[Rule::when(
        "fcntl",
        libc::SYS_fcntl,
        &[&[Cond::eq(1, F_GETFD)]],
    )],
};

/// A thread that starts threads which confine themselves: their seccomp(2) call (which can
/// only narrow what is allowed) and the no_new_privs prctl before it.
pub static NESTED_SANDBOX: Group = Group {
    name: "nested-sandbox",
    why: "threads started from here install their own (narrower) filter",
    rules: &[
        Rule::when(
            "prctl",
            libc::SYS_prctl,
            &[&[Cond::eq(0, PR_SET_NO_NEW_PRIVS)]],
        ),
        Rule::when(
            "seccomp",
            libc::SYS_seccomp,
            &[&[Cond::eq(0, SECCOMP_SET_MODE_FILTER), Cond::eq(1, 0)]],
        ),
    ],
};

/// The vhost-user link of a device: (re)connecting to the backend's socket, messages with fds,
/// waiting on the socket and the worker's wake eventfd, the inflight area (a shared mapping of
/// the backend's memfd), eventfds for a replayed setup, registering them with KVM (backend
/// switch), the watchdog that cuts a hung link.
pub static VHOST_FRONTEND: Group = Group {
    name: "vhost-user-frontend",
    why: "connect to the backend's Unix socket (reconnects), messages with fds, poll, eventfds, \
          KVM_IOEVENTFD/KVM_IRQFD (backend switch)",
    rules: &[
        Rule::when("socket", libc::SYS_socket, &[&[Cond::eq(0, AF_UNIX)]]),
        Rule::always("connect", libc::SYS_connect),
        // The listener's credentials, checked before the handshake (hype_frontend::peer).
        Rule::when(
            "getsockopt",
            libc::SYS_getsockopt,
            &[&[
                Cond::eq(1, libc::SOL_SOCKET as u64),
                Cond::eq(2, libc::SO_PEERCRED as u64),
            ]],
        ),
        // ...against this process's own user.
        Rule::always("geteuid", libc::SYS_geteuid),
        Rule::always("sendmsg", libc::SYS_sendmsg),
        Rule::always("recvmsg", libc::SYS_recvmsg),
        Rule::always("shutdown", libc::SYS_shutdown),
        Rule::always("poll", libc::SYS_poll),
        Rule::always("eventfd2", libc::SYS_eventfd2),
        Rule::always("dup", libc::SYS_dup),
        Rule::when(
            "fcntl",
            libc::SYS_fcntl,
            &[
                &[Cond::eq(1, F_GETFD)],
                &[Cond::eq(1, F_SETFD)],
                &[Cond::eq(1, F_GETFL)],
                &[Cond::eq(1, F_SETFL)],
                &[Cond::eq(1, F_DUPFD_CLOEXEC)],
            ],
        ),
        // The socket is checked to be one before connecting (statx; newfstatat on older glibc).
        Rule::always("newfstatat", libc::SYS_newfstatat),
        Rule::always("statx", libc::SYS_statx),
        // Not made by today's worker (the eventfds outlive reconnects); the backend switch
        // re-registers a device's eventfds.
        Rule::when(
            "ioctl",
            libc::SYS_ioctl,
            &[&[Cond::eq(1, KVM_IOEVENTFD)], &[Cond::eq(1, KVM_IRQFD)]],
        ),
    ],
};

/// The API server: accepting clients, reading requests and writing answers with timeouts,
/// one thread per connection; pause kicks vCPU threads with the kick signal.
pub static API_SERVER: Group = Group {
    name: "api-server",
    why: "accept on the API socket, requests and answers (send/receive timeouts), vCPU kicks \
          for pause",
    rules: &[
        Rule::always("accept4", libc::SYS_accept4),
        Rule::always("recvfrom", libc::SYS_recvfrom),
        Rule::always("sendto", libc::SYS_sendto),
        Rule::always("setsockopt", libc::SYS_setsockopt),
        Rule::always("tgkill", libc::SYS_tgkill),
    ],
};

/// Snapshots (`PUT /vm/snapshot`, exercised confined by `hype/tests/snapshot.rs`):
/// writing the state files into a `--sandbox-allow` directory, the VM's interrupt controller,
/// PIT and clock, a pipe or socket pair for a backend's DEVICE_STATE; memory slots for restore.
pub static SNAPSHOT: Group = Group {
    name: "snapshot",
    why: "state files in --sandbox-allow directories (Landlock limits them), VM-wide KVM \
          state, DEVICE_STATE pipes",
    rules: &[
        Rule::always("openat", libc::SYS_openat),
        Rule::always("mkdir", libc::SYS_mkdir),
        Rule::always("mkdirat", libc::SYS_mkdirat),
        Rule::always("pwrite64", libc::SYS_pwrite64),
        Rule::always("pread64", libc::SYS_pread64),
        Rule::always("lseek", libc::SYS_lseek),
        Rule::always("fsync", libc::SYS_fsync),
        Rule::always("fdatasync", libc::SYS_fdatasync),
        Rule::always("ftruncate", libc::SYS_ftruncate),
        Rule::always("rename", libc::SYS_rename),
        Rule::always("renameat", libc::SYS_renameat),
        Rule::always("renameat2", libc::SYS_renameat2),
        Rule::always("unlinkat", libc::SYS_unlinkat),
        Rule::always("getdents64", libc::SYS_getdents64),
        Rule::when(
            "socketpair",
            libc::SYS_socketpair,
            &[&[Cond::eq(0, AF_UNIX)]],
        ),
        Rule::always("pipe2", libc::SYS_pipe2),
        Rule::when(
            "ioctl",
            libc::SYS_ioctl,
            &[
                &[Cond::eq(1, KVM_GET_IRQCHIP)],
                &[Cond::eq(1, KVM_SET_IRQCHIP)],
                &[Cond::eq(1, KVM_GET_CLOCK)],
                &[Cond::eq(1, KVM_SET_CLOCK)],
                &[Cond::eq(1, KVM_GET_PIT2)],
                &[Cond::eq(1, KVM_SET_PIT2)],
                &[Cond::eq(1, KVM_SET_USER_MEMORY_REGION)],
            ],
        ),
    ],
};

/// The main thread once the VM runs: its wait loop (channel timeouts), kicking vCPU threads
/// out of KVM_RUN to stop them, removing the API socket, restoring the terminal, and the
/// teardown (cutting device links, joining threads, unmapping memory).
pub static MAIN_LOOP: Group = Group {
    name: "main",
    why: "wait for the VM's end, stop and join the vCPUs, remove the API socket, restore the \
          terminal, tear down",
    rules: &[
        Rule::always("tgkill", libc::SYS_tgkill),
        // A device going away cuts its link (a worker may wait on a hung backend).
        Rule::always("shutdown", libc::SYS_shutdown),
        // The API socket, removed when the VM ends.
        Rule::always("unlink", libc::SYS_unlink),
        // The terminal back to its mode (--serial stdio on a terminal).
        Rule::when(
            "ioctl",
            libc::SYS_ioctl,
            &[
                &[Cond::eq(1, TCGETS)],
                &[Cond::eq(1, TCSETS)],
                &[Cond::eq(1, TCSETSW)],
                &[Cond::eq(1, TCSETSF)],
            ],
        ),
    ],
};

/// The serial console's input thread: reads stdin into the UART (runtime calls only).
pub static STDIN: Group = Group {
    name: "serial-stdin",
    why: "read stdin into the UART (nothing beyond the runtime)",
    rules: &[],
};

/// The vhost-user watchdog: cuts a link whose backend does not answer in time.
pub static WATCHDOG: Group = Group {
    name: "watchdog",
    why: "shutdown(2) of a hung backend's socket",
    rules: &[Rule::always("shutdown", libc::SYS_shutdown)],
};

/// Policy of the main thread once the VM runs.
pub static MAIN: Policy = Policy {
    name: "vmm-main",
    groups: &[&RUNTIME, &FD_CHECK, &MAIN_LOOP],
    refusals: &[CLONE3_REFUSED, OPEN_REFUSED],
};

/// Policy of each vCPU thread.
pub static VCPU: Policy = Policy {
    name: "vmm-vcpu",
    groups: &[&RUNTIME, &FD_CHECK, &VCPU_KVM],
    refusals: &[CLONE3_REFUSED, OPEN_REFUSED],
};

/// A device worker moving a backend's state for a snapshot or a restore (vhost-user
/// DEVICE_STATE): the pipe it hands the backend (read, write, poll and fcntl are already
/// allowed).
pub static DEVICE_STATE_PIPE: Group = Group {
    name: "device-state",
    why: "the pipe of a vhost-user DEVICE_STATE transfer",
    rules: &[Rule::always("pipe2", libc::SYS_pipe2)],
};

/// Policy of each device worker (and so of the watchdogs it starts).
pub static DEVICE: Policy = Policy {
    name: "vmm-device",
    groups: &[
        &RUNTIME,
        &FD_CHECK,
        &VHOST_FRONTEND,
        &NESTED_SANDBOX,
        &DEVICE_STATE_PIPE,
    ],
    refusals: &[CLONE3_REFUSED, OPEN_REFUSED],
};

/// Policy of the vhost-user watchdog threads.
pub static VHOST_WATCHDOG: Policy = Policy {
    name: "vmm-watchdog",
    groups: &[&RUNTIME, &FD_CHECK, &WATCHDOG],
    refusals: &[CLONE3_REFUSED, OPEN_REFUSED],
};

/// Policy of the serial console's stdin thread.
pub static SERIAL_STDIN: Policy = Policy {
    name: "vmm-stdin",
    groups: &[&RUNTIME, &FD_CHECK, &STDIN],
    refusals: &[CLONE3_REFUSED, OPEN_REFUSED],
};

/// Policy of the API server's threads (accept and one per connection): the requests run there,
/// hot-plug (a new device's link, its eventfds registered with KVM, its worker and watchdog
/// threads) and snapshots included.
pub static API: Policy = Policy {
    name: "vmm-api",
    groups: &[
        &RUNTIME,
        &FD_CHECK,
        &API_SERVER,
        &VHOST_FRONTEND,
        &NESTED_SANDBOX,
        &WATCHDOG,
        &SNAPSHOT,
    ],
    refusals: &[CLONE3_REFUSED],
};

/// Every thread kind of the VMM.
pub static ALL: [&Policy; 6] = [&MAIN, &VCPU, &DEVICE, &VHOST_WATCHDOG, &SERIAL_STDIN, &API];

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether every call `child` allows (with its conditions) `parent` allows too.
    fn includes(parent: &Policy, child: &Policy) -> Result<(), String> {
        for r in child.rules() {
            let prules: Vec<&Rule> = parent.rules().filter(|p| p.nr == r.nr).collect();
            if prules.is_empty() {
                return Err(format!("{} lacks {}", parent.name, r.name));
            }
            if prules.iter().any(|p| p.when.is_empty()) {
                continue;
            }
            if r.when.is_empty() {
                return Err(format!(
                    "{} limits {} that {} allows",
                    parent.name, r.name, child.name
                ));
            }
            for alt in r.when {
                if !prules.iter().any(|p| p.when.contains(alt)) {
                    return Err(format!("{} lacks {} {alt:?}", parent.name, r.name));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn threads_started_by_a_confined_thread_keep_what_they_need() {
        includes(&API, &DEVICE).unwrap();
        includes(&API, &VHOST_WATCHDOG).unwrap();
        includes(&DEVICE, &VHOST_WATCHDOG).unwrap();
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_SET_SREGS, 0x4138_ae84);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
    }

    #[test]
    fn policies_compile() {
        for p in ALL {
            hype_sandbox::thread::ThreadPolicies::compile(&[p]).unwrap();
            assert!(!p.describe().is_empty());
        }
    }
}
