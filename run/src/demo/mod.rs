//! `hype demo`: the architecture at work in a few seconds, with nothing to download.
//!
//! A small guest program built into the binary ([`guest::GUEST_ELF`], from `guest.S`) boots
//! in a VM with two devices, each served by its own backend process: a RAM disk
//! (`hype block-mem`) and a console (`hype console`, on this terminal). The guest finds both
//! virtio-mmio devices, writes 8 sectors and reads them back, prints a report through the
//! virtio console and resets the machine. Everything is started, supervised and cleaned up by
//! `hype run`'s machinery ([`crate`]): a private runtime directory for the sockets and the
//! guest image, backends first, the VMM last, an ordered stop.
//!
//! The guest also logs its progress on the UART (COM1), written to a file in the runtime
//! directory: its last line decides whether the demo passed, and it is shown when it did not
//! (or with `--show-uart`), so a broken console can be diagnosed.

pub mod guest;

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::{plan, supervisor, Plan, RunConfig, RunError, RuntimeDir};

pub use guest::{console_report, verdict, Verdict, GUEST_ELF};

/// Guest RAM for the demo: the VMM's minimum (the program and its buffers need under 1 MiB).
pub const DEMO_MEMORY: &str = "64M";
/// Default size of the demo's RAM disk.
pub const DEFAULT_DISK_SIZE: &str = "16M";
/// Name of the VM (runtime directory `hype-demo.PID.RANDOM`).
pub const DEMO_NAME: &str = "demo";

/// Command-line options of `hype demo`.
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Starts a block-mem backend (a RAM disk), a console backend on this \
terminal and the VMM, each its own process, and boots a small guest built into hype: it finds \
both virtio devices, writes and reads back 8 sectors and reports through the virtio console. \
The exit code is 0 when the guest passed."
)]
pub struct DemoArgs {
    /// Size of the RAM disk the guest writes to (at least 8 sectors; K/M/G suffixes).
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_DISK_SIZE)]
    pub disk_size: String,
    /// Where the virtio console goes: stdio, or any `hype run --console` output such as
    /// file:PATH.
    #[arg(long, value_name = "OUTPUT", default_value = "stdio")]
    pub console: String,
    /// Also print the guest's UART (COM1) progress log when it passed (it is always printed
    /// when it did not).
    #[arg(long)]
    pub show_uart: bool,
}

/// Everything a demo run needs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The `hype` binary that has the backend and `vmm` subcommands.
    pub exe: PathBuf,
    /// RAM disk size, as given (e.g. `16M`).
    pub disk_size: String,
    /// Console output: `stdio`, `file:PATH`, ...
    pub console: String,
    /// Print the processes (as commands) on stderr before starting them.
    pub show_processes: bool,
}

/// How a demo run ended.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    /// The VMM's exit code (0 after the guest's reset).
    pub vmm_exit: u8,
    /// Everything the guest wrote to its UART.
    pub uart_log: String,
    /// The verdict read from the UART log.
    pub verdict: Verdict,
    /// The runtime directory the run used (removed by now).
    pub runtime_dir: PathBuf,
    /// Wall time from start to the end of cleanup.
    pub elapsed: Duration,
}

impl DemoOutcome {
    /// Whether the guest passed and the VMM ended cleanly.
    pub fn passed(&self) -> bool {
        self.vmm_exit == 0 && self.verdict == Verdict::Pass
    }
}

/// Errors that stop a demo before the guest could report.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The path of the running binary is unknown.
    #[error("cannot find the hype binary")]
    CurrentExe(#[source] std::io::Error),
    /// The guest image could not be written to the runtime directory.
    #[error("cannot write the demo guest to {path}")]
    WriteGuest {
        /// Where it was to go.
        path: PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// Checking, starting or supervising the processes failed.
    #[error(transparent)]
    Run(#[from] RunError),
}

impl DemoError {
    /// Whether the options were at fault (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, DemoError::Run(e) if e.is_usage())
    }
}

/// The `hype run` description of the demo VM: `kernel` is the guest image, `uart` the file
/// the UART goes to.
pub fn demo_config(opts: &DemoOptions, kernel: &Path, uart: &Path) -> RunConfig {
    RunConfig {
        kernel: Some(kernel.to_owned()),
        memory: Some(DEMO_MEMORY.into()),
        cpus: Some(1),
        serial: Some(format!("file:{}", uart.display())),
        console: Some(opts.console.clone()),
        disks: vec![format!("mem:{}", opts.disk_size)],
        name: Some(DEMO_NAME.into()),
        ..RunConfig::default()
    }
}

/// Runs the demo VM to its end and cleans up; the outcome says whether the guest passed.
pub fn run_demo(opts: &DemoOptions) -> Result<DemoOutcome, DemoError> {
    let start = Instant::now();
    let dir = RuntimeDir::create(DEMO_NAME)?;
    let runtime_dir = dir.path().to_owned();
    let kernel = runtime_dir.join("demo-guest.elf");
    write_private(&kernel, GUEST_ELF).map_err(|source| DemoError::WriteGuest {
        path: kernel.clone(),
        source,
    })?;
    let uart = runtime_dir.join("uart.log");
    let cfg = demo_config(opts, &kernel, &uart);
    let checked = plan::check(&cfg, opts.exe.clone()).map_err(RunError::Invalid)?;
    let plan = checked.plan(&runtime_dir);
    log::info!(
        "demo: {} backend(s) and the VMM, runtime directory {}",
        plan.backends.len(),
        runtime_dir.display()
    );
    if opts.show_processes {
        eprint!("{}", describe_processes(&plan, &runtime_dir));
    }
    let vmm_exit = supervisor::supervise(&plan)?;
    let uart_log = std::fs::read_to_string(&uart).unwrap_or_default();
    drop(dir);
    Ok(DemoOutcome {
        vmm_exit,
        verdict: verdict(&uart_log),
        uart_log,
        runtime_dir,
        elapsed: start.elapsed(),
    })
}

/// The processes of `plan`, one command per line, as `hype SUBCOMMAND ...`.
pub fn describe_processes(plan: &Plan, runtime_dir: &Path) -> String {
    let line = |args: &[OsString]| {
        let mut s = String::from("  hype");
        for a in args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s.push('\n');
        s
    };
    let mut out = format!(
        "hype demo: a guest built into hype, its devices served by backend processes; \
         {} processes, sockets in {}:\n",
        plan.backends.len() + 1,
        runtime_dir.display()
    );
    for b in &plan.backends {
        out.push_str(&line(&b.args));
    }
    out.push_str(&line(&plan.vmm));
    out
}

/// Writes `bytes` to a new file only this user can read.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// `hype demo` for the command line: the guest's report appears on the console output
/// (this terminal by default), hype's own lines on stderr. Exit code 0 when the guest passed,
/// 1 when it did not or something failed, 2 for bad options.
pub fn demo(args: DemoArgs) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return report_error(&DemoError::CurrentExe(e)),
    };
    quiet_logs_by_default();
    let opts = DemoOptions {
        exe,
        disk_size: args.disk_size,
        console: args.console,
        show_processes: true,
    };
    match run_demo(&opts) {
        Ok(o) if o.passed() => {
            if args.show_uart {
                print_uart(&o.uart_log);
            }
            eprintln!(
                "hype demo: guest passed in {:.1} s; backends stopped, runtime directory removed",
                o.elapsed.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Ok(o) => {
            let why = match &o.verdict {
                Verdict::Fail(Some(r)) => format!("the guest failed: {r}"),
                Verdict::Fail(None) => "the guest failed".to_string(),
                Verdict::Pass => "the guest passed but the VMM did not end cleanly".to_string(),
                Verdict::Unfinished => "the guest did not finish".to_string(),
            };
            eprintln!("hype demo: {why} (VMM exit code {})", o.vmm_exit);
            print_uart(&o.uart_log);
            ExitCode::from(1)
        }
        Err(e) => report_error(&e),
    }
}

/// Unless the user chose a log level (HYPE_LOG, RUST_LOG), only warnings and errors are
/// logged, by this process and the ones it starts: the demo's own lines tell the story.
fn quiet_logs_by_default() {
    if std::env::var_os("HYPE_LOG").is_some() || std::env::var_os("RUST_LOG").is_some() {
        return;
    }
    log::set_max_level(log::LevelFilter::Warn);
    // Called from `hype demo`'s main thread before any other thread exists, so nothing
    // reads the environment concurrently; the children inherit it.
    std::env::set_var("HYPE_LOG", "warn");
}

fn report_error(e: &DemoError) -> ExitCode {
    eprintln!("hype demo: {}", hype_daemon::error_chain(e));
    ExitCode::from(if e.is_usage() { 2 } else { 1 })
}

/// Prints the guest's UART log on stderr, indented.
fn print_uart(log: &str) {
    if log.is_empty() {
        eprintln!("hype demo: the guest wrote nothing to its UART");
        return;
    }
    eprintln!("hype demo: guest UART (COM1) log:");
    for line in log.lines() {
        eprintln!("  | {line}");
    }
}
