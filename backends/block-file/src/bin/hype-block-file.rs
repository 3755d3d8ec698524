use std::process::ExitCode;

use clap::Parser;

/// A raw image file or block device served as a vhost-user-blk backend.
#[derive(Parser)]
#[command(name = "hype-block-file", version)]
struct Cli {
    #[command(flatten)]
    args: hype_block_file::Args,
}

fn main() -> ExitCode {
    hype_daemon::init_logging();
    match hype_block_file::run(Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hype-block-file: {}", hype_daemon::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
