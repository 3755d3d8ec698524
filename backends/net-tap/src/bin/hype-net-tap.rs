use std::process::ExitCode;

use clap::Parser;

/// A virtio-net device on a TAP interface, served as a vhost-user backend.
#[derive(Parser)]
#[command(name = "hype-net-tap", version)]
struct Cli {
    #[command(flatten)]
    args: hype_net_tap::Args,
}

fn main() -> ExitCode {
    hype_daemon::init_logging();
    match hype_net_tap::run(Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hype-net-tap: {}", hype_daemon::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
