//! `hype-block-mem`: the backend as its own binary (the same as `hype block-mem`).

use std::process::ExitCode;

/// A RAM disk served as a vhost-user-blk backend.
#[derive(clap::Parser)]
#[command(name = "hype-block-mem", version)]
struct Cli {
    #[command(flatten)]
    args: hype_block_mem::Args,
}

fn main() -> ExitCode {
    hype_daemon::sandbox::close_inherited_fds();
    let cli: Cli = match hype_daemon::parse_command_line("hype-block-mem") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    hype_daemon::init_logging();
    hype_daemon::report_exit("hype-block-mem", hype_block_mem::run(cli.args))
}
