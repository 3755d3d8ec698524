use std::process::ExitCode;

use clap::Parser;

/// A RAM disk served as a vhost-user-blk backend.
#[derive(Parser)]
#[command(name = "hype-block-mem", version)]
struct Cli {
    #[command(flatten)]
    args: hype_block_mem::Args,
}

fn main() -> ExitCode {
    hype_daemon::init_logging();
    match hype_block_mem::run(Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hype-block-mem: {}", hype_daemon::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
