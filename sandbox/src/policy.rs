//! System-call policies as data: which calls a process may make, under which argument
//! conditions, grouped by the code that needs them.
//!
//! A [`Policy`] is a list of [`Group`]s; a group is a list of [`Rule`]s with a line saying what
//! needs them. Groups for what every hype process needs live here ([`RUNTIME`]); the daemon,
//! block and backend crates keep their own groups beside the code that makes the calls, and
//! each backend names its policy as the groups it is made of.

/// How an argument is compared with a [`Cond`]'s value (the low 32 bits of the argument: every
/// argument hype's policies look at is a C `int` or `unsigned int`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `arg == value`.
    Eq,
    /// `arg & mask == value`.
    MaskedEq(u64),
}

/// One condition on one argument of a system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cond {
    /// Argument index, 0 to 5.
    pub arg: u8,
    /// The comparison.
    pub op: Op,
    /// The value compared with.
    pub value: u64,
}

impl Cond {
    /// `arg == value`.
    pub const fn eq(arg: u8, value: u64) -> Self {
        Cond {
            arg,
            op: Op::Eq,
            value,
        }
    }

    /// `arg & mask == value`.
    pub const fn masked(arg: u8, mask: u64, value: u64) -> Self {
        Cond {
            arg,
            op: Op::MaskedEq(mask),
            value,
        }
    }
}

/// One system call a policy allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The call's name (as in `man 2`), for the dump and messages.
    pub name: &'static str,
    /// The x86_64 system call number.
    pub nr: i64,
    /// Alternatives: the call is allowed when every condition of one alternative holds. Empty:
    /// always allowed.
    pub when: &'static [&'static [Cond]],
}

impl Rule {
    /// A call allowed with any arguments.
    pub const fn always(name: &'static str, nr: i64) -> Self {
        Rule {
            name,
            nr,
            when: &[],
        }
    }

    /// A call allowed when one of the alternatives `when` holds.
    pub const fn when(name: &'static str, nr: i64, when: &'static [&'static [Cond]]) -> Self {
        Rule { name, nr, when }
    }
}

/// Calls the process makes that must fail with an errno instead of killing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The call, and the argument conditions under which it is refused.
    pub rule: Rule,
    /// The errno it fails with.
    pub errno: i32,
    /// Why it is refused rather than allowed or fatal.
    pub why: &'static str,
}

/// Rules needed by one piece of code, with a line saying which and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    /// Short name (`runtime`, `vhost-user`, `block-file`, ...).
    pub name: &'static str,
    /// What makes these calls.
    pub why: &'static str,
    /// The calls.
    pub rules: &'static [Rule],
}

/// The system-call policy of one process kind: the union of its groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Process kind (`block-file`, `console`, ...), shown in logs and messages.
    pub name: &'static str,
    /// The groups it is made of.
    pub groups: &'static [&'static Group],
    /// Calls that fail with an errno (checked before the allow-list).
    pub refusals: &'static [Refusal],
}

impl Policy {
    /// Every rule of every group, in order.
    pub fn rules(&self) -> impl Iterator<Item = &'static Rule> + '_ {
        self.groups.iter().flat_map(|g| g.rules.iter())
    }

    /// The distinct system call numbers allowed (in some circumstances).
    pub fn syscall_count(&self) -> usize {
        let mut nrs: Vec<i64> = self.rules().map(|r| r.nr).collect();
        nrs.sort_unstable();
        nrs.dedup();
        nrs.len()
    }

    /// Whether system call `nr` is allowed with some arguments.
    pub fn mentions(&self, nr: i64) -> bool {
        self.rules().any(|r| r.nr == nr)
    }

    /// The policy as text: one line per group and call, conditions spelled out.
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "seccomp policy {}: {} system calls; any other call kills the process (SIGSYS)",
            self.name,
            self.syscall_count()
        );
        for g in self.groups {
            let _ = writeln!(s, "  [{}] {}", g.name, g.why);
            for r in g.rules {
                let _ = write!(s, "    {}", r.name);
                for (i, alt) in r.when.iter().enumerate() {
                    let _ = write!(s, "{}", if i == 0 { " if " } else { " or " });
                    for (j, c) in alt.iter().enumerate() {
                        if j > 0 {
                            let _ = write!(s, " and ");
                        }
                        let _ = write!(s, "{}", cond_text(c));
                    }
                }
                let _ = writeln!(s);
            }
        }
        for r in self.refusals {
            let _ = write!(s, "  {}", r.rule.name);
            for (i, alt) in r.rule.when.iter().enumerate() {
                let _ = write!(s, "{}", if i == 0 { " if " } else { " or " });
                for (j, c) in alt.iter().enumerate() {
                    let _ = write!(s, "{}{}", if j > 0 { " and " } else { "" }, cond_text(c));
                }
            }
            let _ = writeln!(s, " fails with errno {} ({})", r.errno, r.why);
        }
        s
    }
}

fn cond_text(c: &Cond) -> String {
    match c.op {
        Op::Eq => format!("arg{} == {:#x}", c.arg, c.value),
        Op::MaskedEq(m) => format!("arg{} & {:#x} == {:#x}", c.arg, m, c.value),
    }
}

const CLONE_THREAD: u64 = libc::CLONE_THREAD as u64;
const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
/// The real-time signal glibc reserves for set*id broadcasts (`SIGRTMIN - 1`).
const GLIBC_SIGSETXID: u64 = 33;

/// What the Rust standard library and glibc need in every hype process once it is set up:
/// memory, threads, futexes, signals returning, time, randomness, stderr logging, closing fds.
pub static RUNTIME: Group = Group {
    name: "runtime",
    why: "Rust std and glibc: memory, threads, futexes, signal return, clocks, logging",
    rules: &[
        Rule::always("read", libc::SYS_read),
        Rule::always("write", libc::SYS_write),
        Rule::always("writev", libc::SYS_writev),
        Rule::always("close", libc::SYS_close),
        Rule::always("brk", libc::SYS_brk),
        // No new executable memory: mappings and protection changes without PROT_EXEC.
        Rule::when("mmap", libc::SYS_mmap, &[&[Cond::masked(2, PROT_EXEC, 0)]]),
        Rule::when(
            "mprotect",
            libc::SYS_mprotect,
            &[&[Cond::masked(2, PROT_EXEC, 0)]],
        ),
        Rule::always("munmap", libc::SYS_munmap),
        Rule::always("mremap", libc::SYS_mremap),
        Rule::always("madvise", libc::SYS_madvise),
        Rule::always("futex", libc::SYS_futex),
        Rule::always("set_robust_list", libc::SYS_set_robust_list),
        Rule::always("rseq", libc::SYS_rseq),
        // Threads only: clone without CLONE_THREAD would be fork.
        Rule::when(
            "clone",
            libc::SYS_clone,
            &[&[Cond::masked(0, CLONE_THREAD, CLONE_THREAD)]],
        ),
        Rule::when(
            "prctl",
            libc::SYS_prctl,
            &[
                &[Cond::eq(0, libc::PR_SET_NAME as u64)],
                &[Cond::eq(0, libc::PR_GET_NAME as u64)],
            ],
        ),
        // glibc installs its SIGSETXID handler (signal 33) at the first pthread_create.
        Rule::when(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[&[Cond::eq(0, GLIBC_SIGSETXID)]],
        ),
        Rule::always("rt_sigreturn", libc::SYS_rt_sigreturn),
        Rule::always("rt_sigprocmask", libc::SYS_rt_sigprocmask),
        Rule::always("sigaltstack", libc::SYS_sigaltstack),
        Rule::always("restart_syscall", libc::SYS_restart_syscall),
        Rule::always("sched_yield", libc::SYS_sched_yield),
        Rule::always("sched_getaffinity", libc::SYS_sched_getaffinity),
        Rule::always("getrandom", libc::SYS_getrandom),
        Rule::always("gettid", libc::SYS_gettid),
        Rule::always("getpid", libc::SYS_getpid),
        Rule::always("clock_gettime", libc::SYS_clock_gettime),
        Rule::always("clock_nanosleep", libc::SYS_clock_nanosleep),
        Rule::always("nanosleep", libc::SYS_nanosleep),
        Rule::always("exit", libc::SYS_exit),
        Rule::always("exit_group", libc::SYS_exit_group),
    ],
};

/// glibc's `pthread_create` tries clone3 first and falls back to clone on ENOSYS; clone3's
/// flags are in memory a filter cannot read, so it is refused and clone (flags checked) used.
pub static CLONE3_REFUSED: Refusal = Refusal {
    rule: Rule::always("clone3", libc::SYS_clone3),
    errno: libc::ENOSYS,
    why: "its flags cannot be checked; glibc falls back to clone",
};

/// For processes that open no path once confined: glibc still opens a few `/proc` and `/sys`
/// files lazily (malloc reads `/proc/sys/vm/overcommit_memory` the first time it shrinks a
/// thread arena) and copes with failure, so opening fails with EACCES, as Landlock would
/// make it, instead of killing the process.
pub static OPEN_REFUSED: Refusal = Refusal {
    rule: Rule::always("openat", libc::SYS_openat),
    errno: libc::EACCES,
    why: "no path is reachable; glibc opens /proc files lazily and copes with failure",
};
