use std::process::ExitCode;

use clap::Parser;

/// A disk image at an http(s) URL, read with Range requests and served as a vhost-user-blk
/// backend.
#[derive(Parser)]
#[command(name = "hype-block-http", version)]
struct Cli {
    #[command(flatten)]
    args: hype_block_http::Args,
}

fn main() -> ExitCode {
    hype_daemon::init_logging();
    match hype_block_http::run(Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hype-block-http: {}", hype_daemon::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
