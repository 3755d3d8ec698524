//! Confinement of hype's processes: a seccomp-bpf allow-list per process kind, Landlock rules
//! for the files it may still reach, and no_new_privs.
//!
//! A process builds a [`Sandbox`] from its [`SandboxArgs`] (`--sandbox on|off`,
//! `--print-sandbox`) and its [`Policy`], adds the paths it still needs to [`FsRules`], and
//! calls [`Sandbox::confine`] once its sockets are bound and its files are open. From then on:
//!
//! * any system call outside the policy raises SIGSYS: a handler prints
//!   `hype sandbox: policy NAME forbids system call CALL (NR); killing the process` and the
//!   process dies of signal 31. The filter covers every thread (installed with TSYNC, and
//!   inherited by threads created later);
//! * paths outside the rules cannot be opened, created or removed (`EACCES`), and TCP
//!   connections go only to the ports allowed, where the kernel has Landlock (one log line
//!   says when it has not). Landlock applies to the calling thread and the threads it creates
//!   later: processes that start threads during setup call [`Sandbox::restrict_files`] first;
//! * no_new_privs: executing a set-uid program cannot gain privileges (and `execve` is not in
//!   any policy anyway).
//!
//! Policies are data ([`policy`]): groups of calls, each group beside the code that needs it.
//!
//! A process whose threads do different jobs (the VMM) gives each kind of thread its own
//! policy instead ([`thread`]): each thread installs its filter itself once set up.
//!
//! May depend on: `seccompiler`, `landlock`, `libc`, `clap`, `log`, `thiserror`. Nothing of
//! hype's: every hype process kind (backends, later the VMM) can use it.

mod args;
mod error;
mod fds;
mod fs;
mod hook;
mod names;
pub mod policy;
pub mod privileges;
mod seccomp;
pub mod thread;

pub use args::{SandboxArgs, SandboxMode};
pub use error::Error;
pub use fds::close_inherited_fds;
pub use fs::{FsAccess, FsRules, LandlockStatus};
pub use hook::{run_test_hook, run_test_hook_as, HOOK_VAR};
pub use policy::{Cond, Group, Op, Policy, Refusal, Rule, CLONE3_REFUSED, OPEN_REFUSED, RUNTIME};
pub use privileges::{Credentials, PrivilegeArgs, PrivilegeError};
pub use seccomp::syscall_name;

/// How one process confines itself; see the [crate documentation](crate).
#[derive(Debug, Clone)]
pub struct Sandbox {
    args: SandboxArgs,
    policy: &'static Policy,
    files: FsRules,
    landlock: Option<LandlockStatus>,
    seccomp: bool,
    dropped: bool,
}

impl Sandbox {
    /// A sandbox for a process of kind `policy`, with no file rules yet.
    pub fn new(args: SandboxArgs, policy: &'static Policy) -> Self {
        Sandbox {
            args,
            policy,
            files: FsRules::new(),
            landlock: None,
            seccomp: false,
            dropped: false,
        }
    }

    /// Whether the process will be confined (`--sandbox on`).
    pub fn is_on(&self) -> bool {
        self.args.sandbox == SandboxMode::On
    }

    /// The user `--user`/`--group` drop to, if given.
    pub fn credentials(&self) -> Option<Credentials> {
        self.args.privileges.credentials()
    }

    /// With `--user`: gives the socket `path` this process bound (as root) to that user, so
    /// the dropped process and peers running as it can still connect. Call before
    /// confining.
    pub fn give_socket(&self, path: &std::path::Path) -> Result<(), Error> {
        let Some(to) = self.credentials() else {
            return Ok(());
        };
        privileges::give_to(path, to).map_err(|source| Error::GiveSocket {
            path: path.to_path_buf(),
            source,
        })
    }

    /// With `--user`: drops root now ([`privileges::drop_to`]), whether or not the sandbox is
    /// on; once. [`restrict_files`](Self::restrict_files) and [`confine`](Self::confine)
    /// call it first, so a process drops while it still has one thread, before Landlock and
    /// seccomp.
    pub fn drop_privileges(&mut self) -> Result<(), Error> {
        if self.dropped {
            return Ok(());
        }
        if let Some(to) = self.credentials() {
            privileges::drop_to(to).map_err(Error::Privileges)?;
        }
        self.dropped = true;
        Ok(())
    }

    /// The system-call policy.
    pub fn policy(&self) -> &'static Policy {
        self.policy
    }

    /// The file rules, to add to before confining.
    pub fn files(&mut self) -> &mut FsRules {
        &mut self.files
    }

    /// The whole sandbox as text: system calls, then Landlock rules.
    pub fn describe(&self) -> String {
        let mut s = self.policy.describe();
        s.push_str(&self.files.describe());
        s.push_str("no_new_privs: set\n");
        if let Some(c) = self.credentials() {
            s.push_str(&format!(
                "runs as: uid {} gid {}, no supplementary groups, no capabilities\n",
                c.uid, c.gid
            ));
        }
        s
    }

    /// With `--print-sandbox`, prints [`describe`](Self::describe) to stdout and returns true
    /// (the caller then exits without serving).
    pub fn print_if_asked(&self) -> bool {
        if self.args.print_sandbox {
            print!("{}", self.describe());
        }
        self.args.print_sandbox
    }

    /// Applies the Landlock rules now, to this thread and the threads it creates from now on
    /// (for processes that start threads before they are fully set up). Does nothing with
    /// `--sandbox off` or when already applied.
    pub fn restrict_files(&mut self) -> Result<(), Error> {
        self.drop_privileges()?;
        if !self.is_on() || self.landlock.is_some() {
            return Ok(());
        }
        let status = self.files.apply()?;
        if status != LandlockStatus::Full {
            log::warn!("sandbox: Landlock {status}: file access is not restricted by it");
        }
        self.landlock = Some(status);
        Ok(())
    }

    /// Confines the process: Landlock (unless [`restrict_files`](Self::restrict_files) did
    /// already), then the seccomp filter on every thread; logs the effective sandbox in one
    /// line. With `--sandbox off` it only logs a warning.
    pub fn confine(&mut self) -> Result<(), Error> {
        self.drop_privileges()?;
        if !self.is_on() {
            log::warn!(
                "sandbox: off (--sandbox off): this {} process is not confined",
                self.policy.name
            );
            return Ok(());
        }
        if self.seccomp {
            return Ok(());
        }
        self.restrict_files()?;
        let log_only = hook::log_only();
        if log_only {
            log::warn!("sandbox test hook: forbidden system calls are only logged");
        }
        let compiled = seccomp::compile(self.policy, log_only)?;
        fix_malloc_arena_limit();
        seccomp::install(self.policy.name, &compiled)?;
        self.seccomp = true;
        log::info!(
            "sandbox: {} confined: seccomp allows {} system calls (any other kills the \
             process), Landlock {}, no_new_privs (--print-sandbox shows the rules)",
            self.policy.name,
            self.policy.syscall_count(),
            self.landlock.unwrap_or(LandlockStatus::Unavailable),
        );
        hook::run_test_hook();
        Ok(())
    }
}

/// Confines a process that must go on starting arbitrary hype processes (the supervisor,
/// whose children inherit its filter): every call `denied` lists raises SIGSYS (the handler
/// names it, the process dies), everything else stays allowed; no_new_privs. With
/// `on == false` it only logs a warning.
pub fn confine_denylist(denied: &'static Policy, on: bool) -> Result<(), Error> {
    if !on {
        log::warn!("sandbox: off: this {} process is not confined", denied.name);
        return Ok(());
    }
    let log_only = hook::log_only();
    let prog = seccomp::compile_denylist(denied, log_only)?;
    seccomp::install_denylist(denied.name, &prog)?;
    log::info!(
        "sandbox: {} confined: seccomp forbids {} system calls (they kill the process; its \
         children inherit the filter), no_new_privs",
        denied.name,
        denied.syscall_count()
    );
    Ok(())
}

/// glibc computes how many malloc arenas it may create the first time a thread needs a new
/// one, by opening `/sys/devices/system/cpu/online` (or `/proc/stat`): a call no policy allows.
/// Setting the limit now, to glibc's own default (8 per CPU), means it never looks.
pub(crate) fn fix_malloc_arena_limit() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let limit = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes a malloc tunable; no pointers are involved.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, limit) } != 1 {
        log::warn!("sandbox: cannot set the malloc arena limit; a new arena may trip the filter");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static TEST_GROUP: Group = Group {
        name: "test",
        why: "a test",
        rules: &[
            Rule::always("read", libc::SYS_read),
            Rule::when(
                "socket",
                libc::SYS_socket,
                &[&[Cond::eq(0, libc::AF_UNIX as u64)]],
            ),
        ],
    };
    static TEST_POLICY: Policy = Policy {
        name: "test",
        groups: &[&RUNTIME, &TEST_GROUP],
        refusals: &[CLONE3_REFUSED],
    };

    #[test]
    fn policies_compile_and_describe() {
        assert!(seccomp::compile(&TEST_POLICY, false).is_ok());
        let d = TEST_POLICY.describe();
        assert!(d.contains("socket if arg0 == 0x1"), "{d}");
        assert!(d.contains("clone3 fails with errno 38"), "{d}");
        // read appears in both groups but counts once.
        let n = TEST_POLICY.syscall_count();
        assert_eq!(n, RUNTIME.rules.len() + 1);
    }

    #[test]
    fn names_match_numbers() {
        assert_eq!(syscall_name(libc::SYS_read), "read");
        assert_eq!(syscall_name(libc::SYS_execve), "execve");
        assert_eq!(
            syscall_name(libc::SYS_landlock_restrict_self),
            "landlock_restrict_self"
        );
        assert_eq!(syscall_name(100_000), "100000");
        for g in TEST_POLICY.groups {
            for r in g.rules {
                assert_eq!(syscall_name(r.nr), r.name, "rule name of {}", r.nr);
            }
        }
    }

    #[test]
    fn off_does_nothing() {
        let mut s = Sandbox::new(SandboxArgs::off(), &TEST_POLICY);
        assert!(!s.is_on());
        s.confine().unwrap();
        // Still unconfined: a call outside the policy works.
        // SAFETY: getppid takes no arguments.
        assert!(unsafe { libc::getppid() } > 0);
    }
}
