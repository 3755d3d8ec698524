#![warn(missing_docs)]
//! `hype console`: a virtio-console device (one port, `hvc0` in the guest) served as a
//! vhost-user backend, whose other end the user chooses:
//!
//! * `--output stdio` (default): this process's terminal, in raw mode (restored on every exit,
//!   SIGINT/SIGTERM/SIGHUP included); `Ctrl-a x` quits, `Ctrl-a Ctrl-a` sends `Ctrl-a`. The
//!   console size (`VIRTIO_CONSOLE_F_SIZE`) comes from the terminal and follows resizes.
//! * `--output socket:PATH`: a Unix socket that one client at a time attaches to and detaches
//!   from while the guest runs ([`attach`], `hype console attach PATH`, or `socat`).
//! * `--output pty`: a pty whose slave path is printed on stdout.
//! * `--output file:PATH`: an append-only log file, no input.
//!
//! `--log FILE` appends everything the guest writes to a file as well, whatever the output.
//!
//! Flow control: guest output waits in a bounded buffer (`--buffer`) for the reader. A live
//! reader that is slow holds the guest back for at most `--stall-timeout-ms`; after that, or
//! while no reader is attached, the oldest buffered bytes are dropped, counted in the log, and
//! the reader gets a `[hype-console: N bytes of guest output dropped]` notice where the gap
//! is. Input waits in a bounded buffer until the guest posts receive buffers; the source is
//! not read while it is full, so input is never dropped. Every receive buffer is filled with
//! as many bytes as are waiting and returned with one used entry; interrupts are batched.
//!
//! Limitation: the guest learns of a resize only when it re-reads the config space; vhost
//! 0.18's `Backend` cannot send `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, so no config-change
//! notification is sent.
//!
//! May depend on: `hype-daemon`, `hype-base`, the vhost-user/virtio crates.

mod attach;
mod backend;
mod buffer;
mod endpoint;
#[doc(hidden)]
pub mod fuzzing;
pub mod sandbox;
mod shared;

/// Raw mode and the escape filter: hype's one copy, in `hype-base`.
pub(crate) use hype_base::terminal;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hype_daemon::sandbox::{Sandbox, SandboxArgs};
use hype_daemon::{ListenArgs, Shutdown, SocketListener};

pub use attach::{attach, Detach};
pub use backend::{
    CONFIG_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_CONSOLE_F_EMERG_WRITE, VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_F_SIZE,
};
pub use buffer::{drop_notice, InputBuffer, OutputBuffer};
pub use terminal::{EscapeAction, EscapeFilter, RawModeGuard, ESCAPE_PREFIX};

use backend::ConsoleBackend;
use endpoint::{ClientSocket, Endpoint, Pty, Stdio};
use shared::{GuestMemory, Shared};

/// Bytes of input held for the guest before the source is no longer read.
const INPUT_BUFFER: usize = 64 << 10;

/// Where the console's other end is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// This process's stdin/stdout.
    Stdio,
    /// A Unix socket at this path for clients to attach to.
    Socket(PathBuf),
    /// A newly allocated pty; its path is printed.
    Pty,
    /// An append-only file; no input.
    File(PathBuf),
}

impl FromStr for Output {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let path = |p: &str| {
            if p.is_empty() {
                Err(format!("{s:?}: missing path"))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        match s.split_once(':') {
            None if s == "stdio" => Ok(Output::Stdio),
            None if s == "pty" => Ok(Output::Pty),
            Some(("socket", p)) => path(p).map(Output::Socket),
            Some(("file", p)) => path(p).map(Output::File),
            _ => Err(format!(
                "invalid output {s:?} (expected stdio, pty, socket:PATH or file:PATH)"
            )),
        }
    }
}

impl std::fmt::Display for Output {
    /// The spelling [`Output::from_str`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Output::Stdio => f.write_str("stdio"),
            Output::Pty => f.write_str("pty"),
            Output::Socket(p) => write!(f, "socket:{}", p.display()),
            Output::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// Parses `COLSxROWS`, e.g. `80x25`.
pub fn parse_console_size(s: &str) -> Result<(u16, u16), String> {
    let err = || format!("invalid console size {s:?} (expected COLSxROWS, e.g. 80x25)");
    let (c, r) = s.split_once(['x', 'X']).ok_or_else(err)?;
    let cols: u16 = c.trim().parse().map_err(|_| err())?;
    let rows: u16 = r.trim().parse().map_err(|_| err())?;
    if cols == 0 || rows == 0 {
        return Err(err());
    }
    Ok((cols, rows))
}

/// Command-line options of `hype console`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Where the vhost-user socket is.
    #[command(flatten)]
    pub listen: ListenArgs,
    /// The console's other end: stdio, pty, socket:PATH or file:PATH.
    #[arg(long, value_name = "OUTPUT", default_value = "stdio")]
    pub output: Output,
    /// Also append all guest output to this file.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Console size presented to the guest, COLSxROWS (default: the terminal's, with stdio).
    #[arg(long, value_name = "COLSxROWS", value_parser = parse_console_size)]
    pub size: Option<(u16, u16)>,
    /// Bytes of guest output kept for a slow or absent reader before the oldest are dropped.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u64).range(1..=(1u64 << 30)))]
    pub buffer: u64,
    /// How long guest output waits for a live reader that does not read, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub stall_timeout_ms: u64,
    /// Permission bits of the client socket (socket:PATH), in octal.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = hype_daemon::parse_mode)]
    pub client_socket_mode: u32,
    /// Confinement of the process (`--sandbox`, `--print-sandbox`).
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// `hype console`: serve a console (the options of [`Args`]), or `attach PATH` to one.
///
/// The VMM's command line embeds this as its `console` subcommand and calls [`dispatch`].
#[derive(clap::Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Command {
    /// `attach PATH`; without it, serve.
    #[command(subcommand)]
    pub action: Option<Action>,
    /// Options for serving.
    #[command(flatten)]
    pub serve: Args,
}

/// What `hype console` does besides serving.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Action {
    /// Join this terminal to a console's client socket (--output socket:PATH) until Ctrl-a x.
    Attach {
        /// The console's client socket.
        #[arg(value_name = "PATH")]
        path: PathBuf,
    },
}

/// Runs a parsed [`Command`]: serves, or attaches until the user detaches.
pub fn dispatch(cmd: Command) -> Result<(), Error> {
    match cmd.action {
        Some(Action::Attach { path }) => attach(&path).map(|_| ()),
        None => run(cmd.serve),
    }
}

/// Errors of the console backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Listening, serving or signal setup failed.
    #[error(transparent)]
    Daemon(#[from] hype_daemon::Error),
    /// The client socket could not be created.
    #[error("cannot listen for console clients")]
    ClientSocket(#[source] hype_daemon::Error),
    /// A log or output file could not be opened.
    #[error("cannot open {path}")]
    OpenFile {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The terminal could not be set up (raw mode, non-blocking I/O).
    #[error("cannot set up the terminal")]
    Terminal(#[source] std::io::Error),
    /// No pty could be allocated.
    #[error("cannot allocate a pty")]
    Pty(#[source] std::io::Error),
    /// Shared state (eventfd) could not be created.
    #[error("cannot create the console state")]
    State(#[source] std::io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The console I/O thread could not be started.
    #[error("cannot start the console I/O thread")]
    Thread(#[source] std::io::Error),
    /// Attaching to a console socket failed.
    #[error("console socket {path}")]
    Attach {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl hype_daemon::CommandError for Error {
    /// Usage errors: what the command line named is unusable (a socket path in use, a log or
    /// output file that cannot be opened, a console socket to attach to that is not there).
    fn is_usage(&self) -> bool {
        match self {
            Error::Daemon(e) | Error::ClientSocket(e) => e.is_usage(),
            Error::OpenFile { .. } | Error::Attach { .. } => true,
            Error::Terminal(_)
            | Error::Pty(_)
            | Error::State(_)
            | Error::Signals(_)
            | Error::Thread(_) => false,
        }
    }
}

fn open_append(path: &std::path::Path) -> Result<std::fs::File, Error> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)
        .map_err(|source| Error::OpenFile {
            path: path.to_path_buf(),
            source,
        })
}

/// Runs the console backend until SIGINT/SIGTERM/SIGHUP (or `Ctrl-a x` on its terminal).
pub fn run(args: Args) -> Result<(), Error> {
    let mut sandbox = Sandbox::new(args.sandbox, &sandbox::POLICY);
    if let Output::Socket(p) = &args.output {
        hype_daemon::sandbox::allow_socket_removal(&mut sandbox, p);
    }
    if hype_daemon::sandbox::print_if_asked(&sandbox, &args.listen) {
        return Ok(());
    }
    // Open everything that can fail on user input before touching the terminal.
    let log = args.log.as_deref().map(open_append).transpose()?;
    let file_out = match &args.output {
        Output::File(p) => Some(open_append(p)?),
        _ => None,
    };
    // Signals first, so no signal can leave the terminal raw.
    let shutdown = Shutdown::new()?;
    shutdown.install_signal_handlers()?;
    endpoint::hangup_shuts_down(&shutdown).map_err(Error::Signals)?;
    let endpoint = match &args.output {
        Output::Stdio => Endpoint::Stdio(Stdio::open().map_err(Error::Terminal)?),
        Output::Pty => {
            let pty = Pty::open().map_err(Error::Pty)?;
            println!("hype-console: guest console on {}", pty.path.display());
            log::info!("guest console on {}", pty.path.display());
            Endpoint::Pty(pty)
        }
        Output::Socket(p) => Endpoint::Socket(
            ClientSocket::bind(p, args.client_socket_mode).map_err(Error::ClientSocket)?,
        ),
        Output::File(_) => Endpoint::None,
    };
    // Watch resizes before reading the size, so none is missed.
    let (winch, size) = match (&endpoint, args.size) {
        (_, Some(size)) => (None, Some(size)),
        (Endpoint::Stdio(s), None) => match s.size() {
            Some(_) => match endpoint::watch_resizes() {
                Ok(w) => (Some(w), s.size()),
                Err(e) => {
                    log::warn!("cannot watch terminal resizes: {e}");
                    (None, s.size())
                }
            },
            None => (None, None),
        },
        _ => (None, None),
    };
    // The vhost-user socket last: once it exists, the client socket and resize watch are ready too.
    let mut listener = SocketListener::open(&args.listen)?;
    // Everything is open: confine before the I/O thread starts (Landlock covers the threads
    // created after it).
    if let Output::Socket(p) = &args.output {
        hype_daemon::sandbox::give_socket(&sandbox, p)?;
    }
    hype_daemon::sandbox::confine(&mut sandbox, &listener)?;
    let logs: Vec<_> = file_out.into_iter().chain(log).collect();
    let buffered = !matches!(endpoint, Endpoint::None);
    let shared = Arc::new(
        Shared::new(
            args.buffer as usize,
            INPUT_BUFFER,
            logs,
            buffered,
            size,
            Duration::from_millis(args.stall_timeout_ms),
        )
        .map_err(Error::State)?,
    );
    let io_shared = shared.clone();
    let io_shutdown = shutdown.clone();
    let io = std::thread::Builder::new()
        .name("console-io".into())
        .spawn(move || endpoint::run_io(endpoint, io_shared, io_shutdown, winch))
        .map_err(Error::Thread)?;
    let served = hype_daemon::serve(
        &mut listener,
        "hype-console",
        &shutdown,
        |mem: &GuestMemory| -> Result<_, std::io::Error> {
            Ok(Arc::new(ConsoleBackend::new(shared.clone(), mem.clone())))
        },
    );
    shutdown.trigger();
    // The I/O thread owns the terminal guards: joining it restores the terminal.
    let _ = io.join();
    served?;
    Ok(())
}
