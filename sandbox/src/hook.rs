//! Test-only hooks: make a confined process do what its policy forbids, to prove the policy
//! holds. Compiled only with the `test-hooks` feature (the backends enable it for their own
//! tests through a dev-dependency); release builds have no hook.

/// The variable naming the hook: `execve`, `socket-inet`, `ptrace`, `open:PATH`, or
/// `log-only` (forbidden calls are allowed and only logged, so `scripts/sandbox-strace` can
/// see every call a test makes the process do).
pub const HOOK_VAR: &str = "HYPE_SANDBOX_TEST_HOOK";

/// Runs the hook `HYPE_SANDBOX_TEST_HOOK` names, once the process is confined. A hook
/// written `HOOK@TARGET` runs only in the process that calls [`run_test_hook_as`] with
/// `TARGET` (the supervisor, whose children see the same variable).
#[cfg(feature = "test-hooks")]
pub fn run_test_hook() {
    run_test_hook_as("");
}

/// [`run_test_hook`] for a process that `HOOK@target` names.
#[cfg(feature = "test-hooks")]
pub fn run_test_hook_as(target: &str) {
    let Ok(var) = std::env::var(HOOK_VAR) else {
        return;
    };
    let (hook, wanted) = var.rsplit_once('@').unwrap_or((var.as_str(), ""));
    if wanted != target {
        return;
    }
    let hook = hook.to_owned();
    log::warn!("sandbox test hook: {hook}");
    match hook.as_str() {
        "execve" => {
            let prog = c"/bin/true";
            let argv = [prog.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: valid NUL-terminated program path and NULL-terminated argv/envp arrays.
            unsafe { libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        }
        "socket-inet" => {
            // SAFETY: socket(2) takes no pointers.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        }
        "ptrace" => {
            // SAFETY: PTRACE_TRACEME takes no pointers.
            unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
        }
        "log-only" => return,
        other => {
            if let Some(path) = other.strip_prefix("open:") {
                match std::fs::File::open(path) {
                    Ok(_) => log::warn!("sandbox test hook: open {path}: opened"),
                    Err(e) => log::warn!("sandbox test hook: open {path}: {e}"),
                }
                return;
            }
            log::warn!("sandbox test hook: unknown hook {other:?}");
            return;
        }
    }
    log::warn!("sandbox test hook: {hook} returned: the policy did not stop it");
}

/// Whether the `log-only` hook is set.
#[cfg(feature = "test-hooks")]
pub fn log_only() -> bool {
    std::env::var(HOOK_VAR).is_ok_and(|v| v == "log-only")
}

/// Without the `test-hooks` feature forbidden calls are never only logged.
#[cfg(not(feature = "test-hooks"))]
pub fn log_only() -> bool {
    false
}

/// Without the `test-hooks` feature there is no hook.
#[cfg(not(feature = "test-hooks"))]
pub fn run_test_hook() {}

/// Without the `test-hooks` feature there is no hook.
#[cfg(not(feature = "test-hooks"))]
pub fn run_test_hook_as(_target: &str) {}
