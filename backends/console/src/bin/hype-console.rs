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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("hype-console: {first} (see --help)");
            return ExitCode::from(2);
        }
    };
    hype_daemon::init_logging();
    match hype_console::dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hype-console: {}", hype_daemon::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
