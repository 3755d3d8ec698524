//! `hype-net-tap`: the backend as its own binary (the same as `hype net-tap`).

use std::process::ExitCode;

/// A virtio-net device on a TAP interface, served as a vhost-user backend.
#[derive(clap::Parser)]
#[command(name = "hype-net-tap", version)]
struct Cli {
    #[command(flatten)]
    args: hype_net_tap::Args,
}

fn main() -> ExitCode {
    hype_daemon::sandbox::close_inherited_fds();
    let cli: Cli = match hype_daemon::parse_command_line("hype-net-tap") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    hype_daemon::init_logging();
    hype_daemon::report_exit("hype-net-tap", hype_net_tap::run(cli.args))
}
