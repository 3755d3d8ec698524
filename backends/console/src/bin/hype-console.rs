//! `hype-console`: the backend as its own binary (the same as `hype console`).

use std::process::ExitCode;

use clap::Parser;

/// A virtio-console device served as a vhost-user backend (or `attach PATH` to one).
#[derive(Parser)]
#[command(name = "hype-console", version)]
struct Cli {
    #[command(flatten)]
    command: hype_console::Command,
}

fn main() -> ExitCode {
    hype_daemon::sandbox::close_inherited_fds();
    let cli = match hype_daemon::parse_command_line::<Cli>("hype-console") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    hype_daemon::init_logging();
    hype_daemon::report_exit("hype-console", hype_console::dispatch(cli.command))
}
