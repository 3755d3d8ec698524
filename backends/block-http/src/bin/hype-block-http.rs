//! `hype-block-http`: the backend as its own binary (the same as `hype block-http`).

use std::process::ExitCode;

/// A disk image at an http(s) URL, read with Range requests and served as a vhost-user-blk
/// backend.
#[derive(clap::Parser)]
#[command(name = "hype-block-http", version)]
struct Cli {
    #[command(flatten)]
    args: hype_block_http::Args,
}

fn main() -> ExitCode {
    hype_daemon::sandbox::close_inherited_fds();
    let cli: Cli = match hype_daemon::parse_command_line("hype-block-http") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    hype_daemon::init_logging();
    hype_daemon::report_exit("hype-block-http", hype_block_http::run(cli.args))
}
