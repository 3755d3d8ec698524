//! The VMM's sandbox: Landlock, applied by the main thread once the VM's files are open and
//! before the vCPU, stdin and API threads start ([`restrict_files`]), and a seccomp filter per
//! kind of thread ([`policy`]), which each thread installs itself once its setup is done
//! ([`enter`]).
//!
//! | thread | confines itself |
//! |---|---|
//! | main | once the VM runs (vCPUs started, API served), before waiting for its end |
//! | vCPU | first thing in its thread (the vCPU was set up by the main thread) |
//! | device worker (`vu-*`) | first thing in its thread (connected by its starter) |
//! | watchdog (`vu-watchdog`) | first thing in its thread |
//! | serial stdin | first thing in its thread |
//! | API (`api`, `api-conn`) | the accept thread first thing; connection threads inherit |
//!
//! Without [`prepare`] (tests that run a VM in-process, `--sandbox off`) [`enter`] does
//! nothing.

pub mod policy;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hype_sandbox::thread::ThreadPolicies;
use hype_sandbox::{FsAccess, FsRules, SandboxArgs, SandboxMode};

use crate::vm::VmConfig;

/// The VMM's sandbox options: `--sandbox`, `--print-sandbox`, `--sandbox-allow`.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct VmmSandboxArgs {
    /// `--sandbox on|off` and `--print-sandbox`.
    #[command(flatten)]
    pub common: SandboxArgs,
    /// A directory the VMM may still create, write, rename and remove files beneath once
    /// confined (where the control API writes snapshots). Repeatable.
    #[arg(long = "sandbox-allow", value_name = "DIR")]
    pub allow: Vec<PathBuf>,
}

/// A kind of VMM thread, each with its own policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thread {
    /// The main (control) thread once the VM runs.
    Main,
    /// A vCPU thread.
    Vcpu,
    /// A device worker (one per virtio device).
    Device,
    /// The serial console's stdin reader.
    Stdin,
}

impl Thread {
    fn kind(self) -> &'static str {
        match self {
            Thread::Main => policy::MAIN.name,
            Thread::Vcpu => policy::VCPU.name,
            Thread::Device => policy::DEVICE.name,
            Thread::Stdin => policy::SERIAL_STDIN.name,
        }
    }
}

/// Why the VMM could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Landlock or the seccomp policies could not be set up.
    #[error("cannot confine the VMM")]
    Setup(#[source] hype_sandbox::Error),
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The Landlock rules of a VMM running `cfg`, applied once its files are open (kernel, initrd,
/// serial output, KVM: none of them needs a rule): creating and removing the API socket in its
/// directory, and everything beneath the `--sandbox-allow` directories and `dump`. Device
/// sockets need no rule: Landlock does not restrict connect(2) to a pathname Unix socket.
fn fs_rules(args: &VmmSandboxArgs, cfg: &VmConfig, dump: Option<&Path>) -> FsRules {
    let mut rules = FsRules::new();
    if let Some(api) = &cfg.api_socket {
        rules.allow_if_exists(parent_dir(api), FsAccess::Sockets);
    }
    for dir in args.allow.iter().map(PathBuf::as_path).chain(dump) {
        rules.allow_if_exists(dir.to_path_buf(), FsAccess::Tree);
    }
    rules
}

/// The sandbox `cfg` would get, as text (`--print-sandbox`): every thread kind's policy, then
/// the Landlock rules.
pub fn describe(args: &VmmSandboxArgs, cfg: &VmConfig, dump: Option<&Path>) -> String {
    let mut s = String::new();
    for p in policy::ALL {
        s.push_str(&p.describe());
    }
    s.push_str(&fs_rules(args, cfg, dump).describe());
    s.push_str("no_new_privs: set\n");
    if let Some(c) = args.common.privileges.credentials() {
        s.push_str(&format!(
            "runs as: uid {} gid {} from before the boot devices connect, no supplementary \
             groups, no capabilities\n",
            c.uid, c.gid
        ));
    }
    s
}

/// Whether the VMM confines itself.
pub fn is_on(args: &VmmSandboxArgs) -> bool {
    args.common.sandbox == SandboxMode::On
}

/// The Landlock rules [`restrict_files`] applies.
static FILES: OnceLock<FsRules> = OnceLock::new();

/// The user `--user`/`--group` ask [`drop_privileges`] to drop to.
static DROP_TO: OnceLock<hype_sandbox::Credentials> = OnceLock::new();

/// With `--user` (kept by [`prepare`], whether or not the sandbox is on): drops root now, for
/// good (`hype_sandbox::privileges`). Call on the main thread while it is the only one: once
/// `/dev/kvm` is open and the VM and its memory exist, before the boot devices' workers start.
/// What is opened later (device sockets, kernel, initrd, serial file, API socket directory)
/// must be reachable by that user. Nothing without `--user` or [`prepare`].
pub fn drop_privileges() -> Result<(), SandboxError> {
    let Some(to) = DROP_TO.get() else {
        return Ok(());
    };
    hype_sandbox::privileges::drop_to(*to)
        .map_err(|e| SandboxError::Setup(hype_sandbox::Error::Privileges(e)))
}

/// Registers every thread kind's seccomp policy, so each thread's [`enter`] confines it, and
/// keeps the Landlock rules for [`restrict_files`]. Call on the main thread before it starts
/// any thread. With `--dump-acpi` (`dump`: its directory, created here so the rule can name
/// it) the rules apply at once: nothing else happens in that process. With `--sandbox off` it
/// only logs a warning.
pub fn prepare(
    args: &VmmSandboxArgs,
    cfg: &VmConfig,
    dump: Option<&Path>,
) -> Result<(), SandboxError> {
    if let Some(to) = args.common.privileges.credentials() {
        let _ = DROP_TO.set(to);
    }
    if !is_on(args) {
        log::warn!("sandbox: off (--sandbox off): the VMM is not confined");
        return Ok(());
    }
    if let Some(dir) = dump {
        // Its own error (if any) is reported by the dump.
        let _ = std::fs::create_dir_all(dir);
        let rules = fs_rules(args, cfg, dump);
        let status = rules.apply().map_err(SandboxError::Setup)?;
        log::info!("sandbox: --dump-acpi: Landlock {status}");
        return Ok(());
    }
    // Fix-ups would otherwise open the KVM device from a vCPU thread, lazily.
    hype_fixups::prepare_for_sandbox();
    ThreadPolicies::compile(&policy::ALL)
        .and_then(ThreadPolicies::register)
        .map_err(SandboxError::Setup)?;
    let _ = FILES.set(fs_rules(args, cfg, None));
    Ok(())
}

/// Applies the Landlock rules [`prepare`] kept to the calling (main) thread and the threads it
/// starts from now on: call once the kernel, initrd, serial output and KVM are open, before the
/// vCPU, stdin and API threads start. Device workers started earlier (boot devices) do not
/// get it; their seccomp policy has no call that opens a path. Nothing without [`prepare`].
pub fn restrict_files() -> Result<(), SandboxError> {
    let Some(rules) = FILES.get() else {
        return Ok(());
    };
    let status = rules.apply().map_err(SandboxError::Setup)?;
    if status != hype_sandbox::LandlockStatus::Full {
        log::warn!("sandbox: Landlock {status}: file access is not restricted by it");
    }
    log::info!(
        "sandbox: VMM confined per thread ({} policies, any call outside a thread's policy \
         kills the process), Landlock {status}, no_new_privs (--print-sandbox shows the rules)",
        policy::ALL.len()
    );
    Ok(())
}

/// Confines the calling thread as a `thread` (nothing unless [`prepare`] ran). The main
/// thread's entry also runs the sandbox test hook (builds with `hype-sandbox/test-hooks`).
pub fn enter(thread: Thread) {
    let confined = hype_sandbox::thread::active();
    hype_sandbox::thread::enter(thread.kind());
    if confined && thread == Thread::Main {
        hype_sandbox::run_test_hook();
    }
}
