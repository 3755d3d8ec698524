//! `hype run`: one command from a VM description to a running VM. Each backend still runs
//! as its own `hype` process with its socket in a private runtime directory; the VMM is a
//! child process too; this module checks the description, starts them, supervises them and
//! cleans up.
//!
//! * [`args`]: the command line and the TOML description file, merged (flags win).
//! * [`spec`]: `--disk`, `--net`, `--console` spec strings.
//! * [`plan`]: checks against the host (all before anything starts) and the process plan,
//!   also printable as separate commands (`--print-commands`).
//! * [`supervisor`]: start, restart with back-off, ordered shutdown.
//!
//! `hype demo` ([`demo`]) is built on the same machinery.
//!
//! May depend on: `hype-vmm` and the backends' argument types (to build each child's command
//! line), `hype-base`. It talks to its children only through their command lines and exit codes.

pub mod args;
pub mod argv;
pub mod demo;
pub mod plan;
pub mod problem;
pub mod runtime_dir;
pub mod sandbox;
mod signals;
pub mod spec;
pub mod supervisor;
mod tap_probe;

use std::process::ExitCode;

pub use args::{RunArgs, RunConfig};
pub use plan::{BackendPlan, Checked, Plan};
pub use problem::{Problem, Problems, RunError};
pub use runtime_dir::RuntimeDir;

/// Loads and checks the VM description of `args` (config file and flags).
pub fn prepare(args: &RunArgs) -> Result<Checked, RunError> {
    let cfg = args::load(args).map_err(|p| RunError::Invalid(Problems(vec![p])))?;
    let exe = std::env::current_exe()
        .map_err(|e| RunError::Invalid(Problems(vec![Problem::CurrentExe(e)])))?;
    plan::check(&cfg, exe).map_err(RunError::Invalid)
}

/// The shell commands equivalent to `checked`, sockets in `$DIR`.
pub fn print_commands(checked: &Checked) -> String {
    let p = checked.plan(std::path::Path::new("$DIR"));
    // mktemp -d makes a fresh directory (mode 0700) with a random part and fails rather than
    // reuse one: another local user cannot plant sockets in it ahead of the VMM.
    let mut setup = format!(
        "DIR=\"$(mktemp -d \"${{XDG_RUNTIME_DIR:-/tmp}}/hype-{}.XXXXXXXXXX\")\" || exit 1\n",
        checked.name
    );
    if let Some(c) = checked.privileges.credentials() {
        // --user: the backends and the VMM bind and remove their sockets there as that user.
        setup.push_str(&format!("chown {}:{} \"$DIR\" || exit 1\n", c.uid, c.gid));
    }
    p.commands(&setup)
}

/// Runs `hype run`: returns the VMM's exit code, or the error that stopped the run.
pub fn run_vm(args: &RunArgs) -> Result<u8, RunError> {
    let mut checked = prepare(args)?;
    checked.run_as(args.privileges);
    if args.print_commands {
        print!("{}", print_commands(&checked));
        return Ok(0);
    }
    let dir = RuntimeDir::create(&checked.name)?;
    if let Some(to) = args.privileges.credentials() {
        // The backends and the VMM bind and remove their sockets here as that user.
        hype_sandbox::privileges::give_to(dir.path(), to).map_err(|source| {
            RunError::RuntimeDirOwner {
                path: dir.path().to_path_buf(),
                source,
            }
        })?;
    }
    let plan = checked.plan(dir.path());
    log::info!(
        "runtime directory {}, {} backend(s)",
        dir.path().display(),
        plan.backends.len()
    );
    supervisor::supervise(&plan)
}

/// `hype run` for the command line: errors are printed on stderr; the exit code is the
/// VMM's, 2 for a bad VM description, 1 for other failures.
pub fn run(args: RunArgs) -> ExitCode {
    match run_vm(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("hype run: {}", hype_base::error_chain(&e));
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}
