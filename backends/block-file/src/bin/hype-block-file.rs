//! `hype-block-file`: the backend as its own binary (the same as `hype block-file`).

use std::process::ExitCode;

/// A raw image file or block device served as a vhost-user-blk backend.
#[derive(clap::Parser)]
#[command(name = "hype-block-file", version)]
struct Cli {
    #[command(flatten)]
    args: hype_block_file::Args,
}

fn main() -> ExitCode {
    hype_daemon::sandbox::close_inherited_fds();
    let cli: Cli = match hype_daemon::parse_command_line("hype-block-file") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    hype_daemon::init_logging();
    hype_daemon::report_exit("hype-block-file", hype_block_file::run(cli.args))
}
