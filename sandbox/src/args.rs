//! The command-line options every sandboxed hype process takes.

use crate::privileges::PrivilegeArgs;

/// Whether the process confines itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// seccomp allow-list, Landlock file rules and no_new_privs (the default).
    On,
    /// No confinement, for debugging: logs a warning.
    Off,
}

/// `--sandbox on|off`, `--print-sandbox`, `--user` and `--group`. Flatten it into a process's options.
#[derive(clap::Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxArgs {
    /// Confine this process once it is set up (seccomp allow-list, Landlock, no_new_privs);
    /// `off` only for debugging. Also set by HYPE_SANDBOX.
    #[arg(
        long,
        value_name = "on|off",
        value_enum,
        default_value = "on",
        env = "HYPE_SANDBOX"
    )]
    pub sandbox: SandboxMode,
    /// Print the sandbox this command would apply (system calls, paths) and exit.
    #[arg(long)]
    pub print_sandbox: bool,
    /// `--user`/`--group`: drop root once set up (independent of `--sandbox`).
    #[command(flatten)]
    pub privileges: PrivilegeArgs,
}

impl Default for SandboxArgs {
    fn default() -> Self {
        SandboxArgs {
            sandbox: SandboxMode::On,
            print_sandbox: false,
            privileges: PrivilegeArgs::default(),
        }
    }
}

impl SandboxArgs {
    /// Confinement switched off: for tests that run a backend in-process, and debugging.
    pub fn off() -> Self {
        SandboxArgs {
            sandbox: SandboxMode::Off,
            print_sandbox: false,
            privileges: PrivilegeArgs::default(),
        }
    }
}
