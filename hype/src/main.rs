//! `hype`: one multi-call binary for the VMM, `hype run`, `hype demo` and the backends that ship with it.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hype",
    version,
    about = "A KVM virtual machine monitor whose virtio devices are vhost-user backend processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a Linux kernel in a VM.
    Vmm(hype_vmm::cli::VmmArgs),
    /// Start the backends and the VMM together and supervise them (docs/run.md).
    Run(hype_run::RunArgs),
    /// Serve a RAM disk as a vhost-user-blk backend.
    BlockMem(hype_block_mem::Args),
    /// Serve a raw image file or block device as a vhost-user-blk backend.
    BlockFile(hype_block_file::Args),
    /// Serve a disk image from an http(s) URL (Range requests) as a vhost-user-blk backend.
    BlockHttp(hype_block_http::Args),
    /// Serve a TAP interface as a vhost-user virtio-net backend.
    NetTap(hype_net_tap::Args),
    /// Serve a virtio-console (terminal, socket, pty or log file) as a vhost-user backend, or
    /// `attach PATH` to a console's client socket.
    Console(hype_console::Command),
    /// Talk to a running VMM's control API (`hype vmm --api-socket PATH`).
    Ctl(hype_ctl::ctl::CtlArgs),
    /// Boot a small built-in guest on a RAM disk and a console backend: the architecture at
    /// work in a few seconds.
    Demo(hype_run::demo::DemoArgs),
}

/// Runs a backend subcommand: the error chain on one line, exit 2 for usage errors, 1 for
/// runtime errors.
fn run_backend<E: hype_daemon::CommandError>(name: &str, r: Result<(), E>) -> ExitCode {
    hype_daemon::report_exit(&format!("hype {name}"), r)
}

/// Parses the command line; usage errors become one line on stderr and exit code 2.
fn parse_cli() -> Result<Cli, ExitCode> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            // One line, with the missing arguments clap lists (e.g. --group without --user).
            eprintln!("{}", hype_daemon::usage_error_line("hype", &e));
            Err(ExitCode::from(2))
        }
    }
}

fn main() -> ExitCode {
    // Nothing a parent left open by accident stays reachable (stdio and systemd's LISTEN_FDS
    // are kept): docs/sandbox.md.
    hype_sandbox::close_inherited_fds();
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    hype_daemon::init_logging();
    match cli.command {
        Command::Vmm(a) => hype_vmm::cli::run(a),
        Command::Run(a) => hype_run::run(a),
        Command::BlockMem(a) => run_backend("block-mem", hype_block_mem::run(a)),
        Command::BlockFile(a) => run_backend("block-file", hype_block_file::run(a)),
        Command::BlockHttp(a) => run_backend("block-http", hype_block_http::run(a)),
        Command::NetTap(a) => run_backend("net-tap", hype_net_tap::run(a)),
        Command::Console(a) => run_backend("console", hype_console::dispatch(a)),
        Command::Ctl(a) => hype_ctl::ctl::run(a),
        Command::Demo(a) => hype_run::demo::demo(a),
    }
}
