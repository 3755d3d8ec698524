//! Compiling a [`Policy`] to seccomp-bpf and installing it on every thread of the process, and
//! the SIGSYS handler that names a forbidden call before the process dies of it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::names::NAMES;
use crate::policy::{Op, Policy, Rule};
use crate::Error;

/// The compiled filters of a policy: one per refusal errno, then the allow-list.
pub struct Compiled {
    refusals: Vec<BpfProgram>,
    allow: BpfProgram,
}

type RuleMap = BTreeMap<i64, Vec<SeccompRule>>;

/// Adds `rule` to `map`: conditions as alternatives; `None` in `always` marks calls allowed
/// with any arguments (they need no conditions from another group).
fn add_rule(
    policy: &Policy,
    map: &mut RuleMap,
    always: &mut Vec<i64>,
    rule: &Rule,
) -> Result<(), Error> {
    if rule.when.is_empty() {
        always.push(rule.nr);
        return Ok(());
    }
    let entry = map.entry(rule.nr).or_default();
    for alt in rule.when {
        let conds = alt
            .iter()
            .map(|c| {
                let op = match c.op {
                    Op::Eq => SeccompCmpOp::Eq,
                    Op::MaskedEq(m) => SeccompCmpOp::MaskedEq(m),
                };
                SeccompCondition::new(c.arg, SeccompCmpArgLen::Dword, op, c.value)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Compile(policy.name, e))?;
        entry.push(SeccompRule::new(conds).map_err(|e| Error::Compile(policy.name, e))?);
    }
    Ok(())
}

fn finish(mut map: RuleMap, always: Vec<i64>) -> RuleMap {
    for nr in always {
        map.insert(nr, Vec::new());
    }
    map
}

fn build(
    policy: &Policy,
    map: RuleMap,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, Error> {
    let filter = SeccompFilter::new(map, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| Error::Compile(policy.name, e))?;
    filter
        .try_into()
        .map_err(|e| Error::Compile(policy.name, e))
}

/// Compiles `policy`: allowed calls return normally; refused calls fail with their errno; any
/// other call raises SIGSYS (the handler installed by [`install`] reports it and the process
/// dies of the signal), or with `log_only` is allowed and logged by the kernel's audit (the
/// test hook for tracing).
pub fn compile(policy: &Policy, log_only: bool) -> Result<Compiled, Error> {
    let mut map = RuleMap::new();
    let mut always = Vec::new();
    for r in policy.rules() {
        add_rule(policy, &mut map, &mut always, r)?;
    }
    // Refused calls are "allowed" by the allow-list: the kernel takes the strictest answer of
    // all filters, and ERRNO (from a refusal filter) beats only ALLOW, not TRAP.
    for r in policy.refusals {
        add_rule(policy, &mut map, &mut always, &r.rule)?;
    }
    let mismatch = if log_only {
        SeccompAction::Log
    } else {
        SeccompAction::Trap
    };
    let allow = build(policy, finish(map, always), mismatch, SeccompAction::Allow)?;
    let mut errnos: Vec<i32> = policy.refusals.iter().map(|r| r.errno).collect();
    errnos.sort_unstable();
    errnos.dedup();
    let mut refusals = Vec::new();
    for errno in errnos {
        let mut map = RuleMap::new();
        let mut always = Vec::new();
        for r in policy.refusals.iter().filter(|r| r.errno == errno) {
            add_rule(policy, &mut map, &mut always, &r.rule)?;
        }
        let errno = u32::try_from(errno).map_err(|_| Error::BadErrno(policy.name))?;
        refusals.push(build(
            policy,
            finish(map, always),
            SeccompAction::Allow,
            SeccompAction::Errno(errno),
        )?);
    }
    Ok(Compiled { refusals, allow })
}

/// Compiles a deny-list (for the supervisor, whose children inherit its filter and need
/// everything they need): the calls `policy` names (with their conditions) raise SIGSYS, or are
/// only logged with `log_only`; every other call is allowed.
pub fn compile_denylist(policy: &Policy, log_only: bool) -> Result<BpfProgram, Error> {
    let mut map = RuleMap::new();
    let mut always = Vec::new();
    for r in policy.rules() {
        add_rule(policy, &mut map, &mut always, r)?;
    }
    let matched = if log_only {
        SeccompAction::Log
    } else {
        SeccompAction::Trap
    };
    build(policy, finish(map, always), SeccompAction::Allow, matched)
}

/// Installs the SIGSYS reporter and the deny-list `prog` on every thread (TSYNC); sets
/// no_new_privs.
pub fn install_denylist(name: &'static str, prog: &BpfProgram) -> Result<(), Error> {
    POLICY_NAME_LEN.store(name.len(), Ordering::Release);
    POLICY_NAME.store(name.as_ptr().cast_mut(), Ordering::Release);
    install_sigsys_handler()?;
    seccompiler::apply_filter_all_threads(prog).map_err(Error::Install)
}

/// The policy name the SIGSYS handler prints (a leaked, never freed `&'static str`).
static POLICY_NAME: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static POLICY_NAME_LEN: AtomicUsize = AtomicUsize::new(0);

/// Installs the SIGSYS reporter, then `compiled` on every thread (TSYNC); sets no_new_privs.
pub fn install(name: &'static str, compiled: &Compiled) -> Result<(), Error> {
    POLICY_NAME_LEN.store(name.len(), Ordering::Release);
    POLICY_NAME.store(name.as_ptr().cast_mut(), Ordering::Release);
    install_sigsys_handler()?;
    // The refusal filter goes first: the kernel runs every filter and takes the strictest
    // answer, so ERRNO from it beats ALLOW from the allow-list and loses to its TRAP.
    for r in &compiled.refusals {
        seccompiler::apply_filter_all_threads(r).map_err(Error::Install)?;
    }
    seccompiler::apply_filter_all_threads(&compiled.allow).map_err(Error::Install)
}

/// Installs the SIGSYS reporter (for per-thread policies: the message names the policy the
/// trapped thread installed).
pub fn install_reporter() -> Result<(), Error> {
    install_sigsys_handler()
}

/// Installs `compiled` on the calling thread only (and the threads it creates from now on);
/// sets no_new_privs.
pub fn install_this_thread(compiled: &Compiled) -> Result<(), Error> {
    for r in &compiled.refusals {
        seccompiler::apply_filter(r).map_err(Error::Install)?;
    }
    seccompiler::apply_filter(&compiled.allow).map_err(Error::Install)
}

fn install_sigsys_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is a valid start; we set a handler that only makes
    // async-signal-safe system calls (write, the trapped call itself, exit_group). SA_RESETHAND
    // makes the second SIGSYS (raised by re-issuing the call) take the default action.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(Error::SigsysHandler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A fixed buffer to format the message in, without allocating (we are in a signal handler).
struct Msg {
    buf: [u8; 256],
    len: usize,
}

impl Msg {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// `si_syscall` of a SIGSYS siginfo (the libc crate does not expose the union member).
#[repr(C)]
struct SigsysInfo {
    si_signo: libc::c_int,
    si_errno: libc::c_int,
    si_code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for a seccomp SIGSYS
    // it has the SigsysInfo layout (asm-generic siginfo, `_sigsys` member).
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let mut m = Msg {
        buf: [0; 256],
        len: 0,
    };
    m.push(b"hype sandbox: policy ");
    let p = POLICY_NAME.load(Ordering::Acquire);
    let thread_policy = crate::thread::current_name();
    if !thread_policy.is_empty() {
        m.push(thread_policy.as_bytes());
    } else if !p.is_null() {
        // SAFETY: POLICY_NAME/POLICY_NAME_LEN describe a `&'static str` stored by install().
        let name =
            unsafe { std::slice::from_raw_parts(p, POLICY_NAME_LEN.load(Ordering::Acquire)) };
        m.push(name);
    }
    m.push(b" forbids system call ");
    match usize::try_from(nr).ok().and_then(|i| NAMES.get(i)) {
        Some(n) if !n.is_empty() => m.push(n.as_bytes()),
        _ => m.push(b"?"),
    }
    m.push(b" (");
    m.push_num(u64::try_from(nr).unwrap_or(0));
    m.push(b"); killing the process\n");
    // SAFETY: write(2) on stderr with a valid buffer; async-signal-safe.
    unsafe { libc::write(2, m.buf.as_ptr().cast(), m.len) };
    // SAFETY: `ctx` is the ucontext the kernel passed; the registers hold the trapped call's
    // arguments. Re-issuing the identical call is trapped again, and with the handler reset
    // (SA_RESETHAND) the SIGSYS now takes its default action: the process dies of signal 31.
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        let g = &(*uc).uc_mcontext.gregs;
        libc::syscall(
            libc::c_long::from(nr),
            g[libc::REG_RDI as usize],
            g[libc::REG_RSI as usize],
            g[libc::REG_RDX as usize],
            g[libc::REG_R10 as usize],
            g[libc::REG_R8 as usize],
            g[libc::REG_R9 as usize],
        );
        libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS);
    }
}

/// The name of system call `nr`, or its number.
pub fn syscall_name(nr: i64) -> String {
    match usize::try_from(nr).ok().and_then(|i| NAMES.get(i)) {
        Some(n) if !n.is_empty() => (*n).to_string(),
        _ => nr.to_string(),
    }
}
