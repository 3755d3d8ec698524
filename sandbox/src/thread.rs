//! Per-thread confinement, for processes whose threads do different jobs (the VMM): each kind
//! of thread gets its own [`Policy`], installed by the thread itself once its setup is done.
//!
//! The process compiles every thread kind's policy once ([`ThreadPolicies::compile`]) and
//! registers them ([`ThreadPolicies::register`]); each thread then calls [`enter`] with its
//! kind at the start of its loop. Code in crates that know nothing about the sandbox (the
//! vhost-user frontend's watchdog, the API server) calls [`enter`] too: without a registered
//! set (tests running a VM in-process, `--sandbox off`) it does nothing.
//!
//! A filter is installed on the calling thread only (no TSYNC) and is inherited by the
//! threads it creates later, which add their own on top: a thread that starts threads of
//! another kind must allow what they need (the VMM's tests check that).

use std::cell::Cell;
use std::sync::OnceLock;

use crate::policy::Policy;
use crate::seccomp::{self, Compiled};
use crate::Error;

/// The thread kind of the vhost-user frontend's watchdog (crate `hype-frontend`).
pub const VHOST_WATCHDOG: &str = "vmm-watchdog";
/// The thread kind of the control API server's threads (crate `hype-api`).
pub const API_SERVER: &str = "vmm-api";

/// The compiled policies of every thread kind of a process.
pub struct ThreadPolicies {
    kinds: Vec<(&'static Policy, Compiled)>,
}

static REGISTERED: OnceLock<ThreadPolicies> = OnceLock::new();

thread_local! {
    /// The policy this thread installed, for the SIGSYS message.
    static THREAD_POLICY: Cell<&'static str> = const { Cell::new("") };
}

/// The policy name the calling thread installed ("" when none), read by the SIGSYS handler.
pub(crate) fn current_name() -> &'static str {
    THREAD_POLICY.with(Cell::get)
}

impl ThreadPolicies {
    /// Compiles `policies` (forbidden calls only logged with the `log-only` test hook).
    pub fn compile(policies: &[&'static Policy]) -> Result<Self, Error> {
        let log_only = crate::hook::log_only();
        let mut kinds = Vec::with_capacity(policies.len());
        for p in policies {
            kinds.push((*p, seccomp::compile(p, log_only)?));
        }
        Ok(ThreadPolicies { kinds })
    }

    /// Makes these the process's thread policies and installs the SIGSYS reporter; from now on
    /// [`enter`] confines the calling thread. Only the first registration counts.
    pub fn register(self) -> Result<(), Error> {
        seccomp::install_reporter()?;
        crate::fix_malloc_arena_limit();
        if crate::hook::log_only() {
            log::warn!("sandbox test hook: forbidden system calls are only logged");
        }
        let _ = REGISTERED.set(self);
        Ok(())
    }
}

/// Whether thread policies are registered (the process confines its threads).
pub fn active() -> bool {
    REGISTERED.get().is_some()
}

/// Confines the calling thread with the policy named `kind`, if the process registered thread
/// policies; does nothing otherwise. A thread that cannot be confined ends the process (exit
/// code 1, one log line): a VMM asked to be sandboxed never runs a thread unconfined.
pub fn enter(kind: &'static str) {
    let Some(set) = REGISTERED.get() else {
        return;
    };
    let Some((policy, compiled)) = set.kinds.iter().find(|(p, _)| p.name == kind) else {
        log::error!("sandbox: no policy for thread kind {kind}; ending the process");
        std::process::exit(1);
    };
    THREAD_POLICY.with(|c| c.set(policy.name));
    if let Err(e) = seccomp::install_this_thread(compiled) {
        let mut text = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            text.push_str(": ");
            text.push_str(&s.to_string());
            src = s.source();
        }
        log::error!("sandbox: thread kind {kind}: {text}; ending the process");
        std::process::exit(1);
    }
    log::debug!(
        "sandbox: thread {} confined by policy {kind} ({} system calls)",
        std::thread::current().name().unwrap_or("?"),
        policy.syscall_count()
    );
}
