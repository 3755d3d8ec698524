//! `hype-vmm`: the VMM alone (the same arguments as `hype vmm`), without the backends, the
//! supervisor or their dependencies linked in: the smallest process that can run a VM.

use std::process::ExitCode;

use clap::Parser;
use hype_vmm::cli::VmmArgs;

/// The command line of `hype-vmm`.
#[derive(Parser)]
#[command(
    name = "hype-vmm",
    version,
    about = "A KVM virtual machine monitor whose virtio devices are vhost-user backend processes"
)]
struct Cli {
    #[command(flatten)]
    vmm: VmmArgs,
}

fn main() -> ExitCode {
    hype_sandbox::close_inherited_fds();
    let cli = match hype_base::parse_command_line::<Cli>("hype-vmm") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    hype_base::init_logging();
    hype_vmm::cli::run(cli.vmm)
}
