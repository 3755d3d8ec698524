use std::process::ExitCode;

use clap::Parser;

/// A virtio-console device served as a vhost-user backend.
#[derive(Parser)]
#[command(name = "hype-console", version)]
struct Cli {
    #[command(flatten)]
    args: hype_console::Args,
}

fn main() -> ExitCode {
    hype_daemon::init_logging();
    match hype_console::run(Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hype-console: {}", hype_daemon::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
