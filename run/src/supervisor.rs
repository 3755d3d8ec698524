//! The supervisor: starts the backends, waits for their sockets, starts the VMM, restarts
//! backends that die while the VM runs (exponential back-off, limited per minute), and stops
//! everything in order: the VMM first, then the backends (SIGTERM, SIGKILL after a grace
//! period).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::plan::Plan;
use super::problem::RunError;
use super::signals::{send, BlockedSignals, Wake};

/// The window the restart limit counts crashes in.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// How long backends get to create their sockets at start.
const SOCKET_WAIT: Duration = Duration::from_secs(20);
/// First restart delay; doubles with each crash in the window.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long the VMM gets to stop after a forwarded signal before SIGKILL.
const VMM_GRACE: Duration = Duration::from_secs(10);
/// How long backends get to exit after SIGTERM before SIGKILL.
const BACKEND_GRACE: Duration = Duration::from_secs(5);
/// Longest sleep between checks.
const TICK: Duration = Duration::from_millis(500);

/// One supervised process.
struct Proc {
    name: String,
    args: Vec<OsString>,
    /// Environment variables set for it besides ours (values that must not be in argv).
    env: Vec<(OsString, OsString)>,
    socket: Option<PathBuf>,
    /// Gets this process's stdin (and is left in our process group, which owns the terminal).
    stdio: bool,
    child: Option<Child>,
    crashes: VecDeque<Instant>,
    restart_at: Option<Instant>,
}

impl Proc {
    fn spawn(&mut self, exe: &Path) -> Result<(), RunError> {
        let mut cmd = Command::new(exe);
        cmd.args(&self.args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(if self.stdio {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
        let parent = std::process::id();
        let own_group = self.socket.is_some() && !self.stdio;
        if own_group {
            // Ctrl-C on the terminal goes to the foreground process group; backends are out
            // of it so that the VMM stops first and they are stopped after it.
            cmd.process_group(0);
        }
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // calls (sigemptyset, pthread_sigmask, prctl, getppid) on its own stack, without
        // allocating.
        unsafe {
            cmd.pre_exec(move || {
                // The supervisor blocks the signals it waits for; the child must not inherit
                // that mask (std does not reset it here).
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                let r = libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                if r != 0 {
                    return Err(std::io::Error::from_raw_os_error(r));
                }
                // If hype run dies without cleaning up, its children get SIGTERM.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| RunError::Spawn {
            name: self.name.clone(),
            source,
        })?;
        log::info!("{} started (pid {})", self.name, child.id());
        self.child = Some(child);
        Ok(())
    }

    /// Reaps the process if it exited.
    fn reap(&mut self) -> Result<Option<ExitStatus>, RunError> {
        let Some(c) = self.child.as_mut() else {
            return Ok(None);
        };
        match c.try_wait() {
            Ok(Some(st)) => {
                self.child = None;
                Ok(Some(st))
            }
            Ok(None) => Ok(None),
            Err(source) => Err(RunError::Wait {
                name: self.name.clone(),
                source,
            }),
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            send(c.id(), sig);
        }
    }
}

/// How a process ended, for messages.
fn describe(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

/// The exit code a shell would report for `st`.
fn exit_code(st: ExitStatus) -> u8 {
    match (st.code(), st.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(1),
        (None, Some(s)) => u8::try_from((128 + s) & 0xff).unwrap_or(1),
        _ => 1,
    }
}

/// The restart delay after the `n`-th crash within the window (n >= 1): 100 ms doubling,
/// at most [`BACKOFF_MAX`].
fn backoff(n: usize) -> Duration {
    let shift = u32::try_from(n.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(16);
    BACKOFF_FIRST.saturating_mul(1 << shift).min(BACKOFF_MAX)
}

/// Runs the VM of `plan` to its end; returns the VMM's exit code.
pub fn supervise(plan: &Plan) -> Result<u8, RunError> {
    let signals = BlockedSignals::block().map_err(RunError::Signals)?;
    let mut backends: Vec<Proc> = plan
        .backends
        .iter()
        .map(|b| Proc {
            name: b.name.clone(),
            args: b.args.clone(),
            env: b.env.clone(),
            socket: Some(b.socket.clone()),
            stdio: b.stdio,
            child: None,
            crashes: VecDeque::new(),
            restart_at: None,
        })
        .collect();
    let result = run_all(plan, &signals, &mut backends);
    stop_backends(&signals, &mut backends);
    result
}

fn run_all(plan: &Plan, signals: &BlockedSignals, backends: &mut [Proc]) -> Result<u8, RunError> {
    for b in backends.iter_mut() {
        b.spawn(&plan.exe)?;
    }
    if let Some(code) = wait_for_sockets(signals, backends)? {
        return Ok(code);
    }
    let mut vmm = Proc {
        name: "vmm".into(),
        args: plan.vmm.clone(),
        env: Vec::new(),
        socket: None,
        stdio: plan.vmm_stdin,
        child: None,
        crashes: VecDeque::new(),
        restart_at: None,
    };
    vmm.spawn(&plan.exe)?;
    // Everything is started: from now on only restarts (docs/sandbox.md).
    crate::sandbox::confine().map_err(RunError::Sandbox)?;

    let mut kill_at: Option<Instant> = None;
    let mut failure: Option<RunError> = None;
    loop {
        if let Some(st) = vmm.reap()? {
            log::info!("vmm exited ({})", describe(st));
            return match failure {
                Some(e) => Err(e),
                None => Ok(exit_code(st)),
            };
        }
        let now = Instant::now();
        for b in backends.iter_mut() {
            if let Some(st) = b.reap()? {
                if failure.is_some() || kill_at.is_some() {
                    continue;
                }
                b.crashes.push_back(now);
                while b
                    .crashes
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
                {
                    b.crashes.pop_front();
                }
                let n = b.crashes.len();
                if n > plan.max_restarts as usize {
                    log::error!(
                        "{} exited ({}); {n} crashes within {RESTART_WINDOW:?}, giving up",
                        b.name,
                        describe(st)
                    );
                    failure = Some(RunError::RestartLimit {
                        name: b.name.clone(),
                        crashes: n,
                        window: RESTART_WINDOW,
                    });
                    vmm.signal(libc::SIGTERM);
                    kill_at = Some(now + VMM_GRACE);
                    continue;
                }
                let delay = backoff(n);
                log::warn!(
                    "{} exited ({}); restarting in {delay:?} (crash {n}, limit {} within {RESTART_WINDOW:?})",
                    b.name,
                    describe(st),
                    plan.max_restarts
                );
                b.restart_at = Some(now + delay);
            }
            if b.restart_at.is_some_and(|t| t <= now) && kill_at.is_none() {
                b.restart_at = None;
                b.spawn(&plan.exe)?;
            }
        }
        if kill_at.is_some_and(|t| t <= now) {
            log::warn!("vmm did not stop within {VMM_GRACE:?}; killing it");
            vmm.signal(libc::SIGKILL);
            kill_at = None;
        }
        let mut next = now + TICK;
        for t in backends.iter().filter_map(|b| b.restart_at).chain(kill_at) {
            next = next.min(t);
        }
        match signals
            .wait(next.saturating_duration_since(Instant::now()))
            .map_err(RunError::Signals)?
        {
            Wake::Stop(sig) => {
                if kill_at.is_none() {
                    log::info!("signal {sig}: stopping the VM");
                    vmm.signal(sig);
                    kill_at = Some(Instant::now() + VMM_GRACE);
                } else {
                    log::warn!("signal {sig} again: killing the VM");
                    vmm.signal(libc::SIGKILL);
                }
            }
            Wake::Child | Wake::Timeout => {}
        }
    }
}

/// Waits until every backend's socket exists. Returns an exit code if a stop signal came.
fn wait_for_sockets(
    signals: &BlockedSignals,
    backends: &mut [Proc],
) -> Result<Option<u8>, RunError> {
    let deadline = Instant::now() + SOCKET_WAIT;
    loop {
        let mut ready = true;
        for b in backends.iter_mut() {
            let Some(socket) = b.socket.clone() else {
                continue;
            };
            if let Some(st) = b.reap()? {
                return Err(RunError::BackendStart {
                    name: b.name.clone(),
                    status: describe(st),
                    socket,
                });
            }
            if !socket.exists() {
                ready = false;
                if Instant::now() >= deadline {
                    return Err(RunError::SocketTimeout {
                        name: b.name.clone(),
                        socket,
                        after: SOCKET_WAIT,
                    });
                }
            }
        }
        if ready {
            return Ok(None);
        }
        if let Wake::Stop(sig) = signals
            .wait(Duration::from_millis(10))
            .map_err(RunError::Signals)?
        {
            log::info!("signal {sig} before the VM started: stopping");
            return Ok(Some(u8::try_from(128 + sig).unwrap_or(1)));
        }
    }
}

/// SIGTERM to every backend, SIGKILL to those still there after the grace period; reaps all
/// and removes sockets a killed backend left behind.
fn stop_backends(signals: &BlockedSignals, backends: &mut [Proc]) {
    for b in backends.iter_mut() {
        b.restart_at = None;
        b.signal(libc::SIGTERM);
    }
    let deadline = Instant::now() + BACKEND_GRACE;
    let mut killed = false;
    loop {
        let mut alive = false;
        for b in backends.iter_mut() {
            match b.reap() {
                Ok(Some(st)) => log::info!("{} stopped ({})", b.name, describe(st)),
                Ok(None) => alive |= b.child.is_some(),
                Err(e) => {
                    log::warn!("{}", hype_base::error_chain(&e));
                    b.child = None;
                }
            }
        }
        if !alive {
            break;
        }
        if Instant::now() >= deadline && !killed {
            for b in backends.iter().filter(|b| b.child.is_some()) {
                log::warn!(
                    "{} did not stop within {BACKEND_GRACE:?}; killing it",
                    b.name
                );
                b.signal(libc::SIGKILL);
            }
            killed = true;
        }
        let _ = signals.wait(Duration::from_millis(50));
    }
    for b in backends.iter() {
        if let Some(s) = &b.socket {
            remove_socket(s);
        }
    }
}

/// Removes `path` if it is a socket (a backend that was killed could not).
fn remove_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let ms: Vec<u128> = (1..=8).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(backoff(usize::MAX), BACKOFF_MAX);
        assert_eq!(backoff(0), BACKOFF_FIRST);
    }

    #[test]
    fn exit_codes_like_a_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
        assert_eq!(describe(ExitStatus::from_raw(libc::SIGKILL)), "signal 9");
        assert_eq!(describe(ExitStatus::from_raw(0)), "exit code 0");
    }
}
