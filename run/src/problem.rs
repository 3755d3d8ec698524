//! What can go wrong in `hype run`: problems found while checking the VM description (nothing
//! has been started yet), and failures of the running supervisor.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::spec::SpecError;

/// One problem with the VM description, found before anything is started.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not a regular file of at most [`crate::args::CONFIG_MAX_BYTES`].
    #[error(
        "config file {path} is not a regular file of at most {} bytes",
        crate::args::CONFIG_MAX_BYTES
    )]
    ConfigNotSmallFile {
        /// The file.
        path: PathBuf,
    },
    /// The config file is not valid TOML or has unknown keys or wrong types.
    #[error("{path}: {message}")]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// No kernel was given.
    #[error("no kernel: pass --kernel PATH or set kernel in the config file")]
    NoKernel,
    /// A spec string did not parse.
    #[error("{what}")]
    Spec {
        /// Which option, e.g. `--disk #2`.
        what: String,
        /// The parse error.
        #[source]
        source: SpecError,
    },
    /// The kernel is neither an ELF file nor a bzImage.
    #[error("--kernel: {path} is neither an ELF file nor a bzImage")]
    NotAKernel {
        /// The file.
        path: PathBuf,
    },
    /// A value (memory, cpus, serial, device) is malformed.
    #[error("{what}: {reason}")]
    BadValue {
        /// Which option.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A file that must exist cannot be opened.
    #[error("{what}: cannot open {path}")]
    File {
        /// Which option.
        what: String,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A path that must be a file or block device is something else.
    #[error("{what}: {path} is not a regular file or block device")]
    NotAFile {
        /// Which option.
        what: String,
        /// The path.
        path: PathBuf,
    },
    /// The directory a socket or overlay is to be created in does not exist.
    #[error("{what}: directory {path} does not exist")]
    NoDirectory {
        /// Which option.
        what: String,
        /// The directory.
        path: PathBuf,
    },
    /// Two devices would use the same socket.
    #[error("{second}: socket {path} is already used by {first}")]
    DuplicateSocket {
        /// The socket.
        path: PathBuf,
        /// The first user.
        first: String,
        /// The second user.
        second: String,
    },
    /// The same image file is given twice and at least one of them is writable.
    #[error("{second}: {path} is already a disk ({first}); two writers would corrupt it")]
    DuplicateDisk {
        /// The image (canonical path).
        path: PathBuf,
        /// The first disk.
        first: String,
        /// The second disk.
        second: String,
    },
    /// Two TAP specs name the same interface.
    #[error("{second}: TAP {name} is already used by {first}")]
    DuplicateTap {
        /// The interface.
        name: String,
        /// The first net.
        first: String,
        /// The second net.
        second: String,
    },
    /// `/dev/net/tun` cannot be opened.
    #[error("{what}: cannot open /dev/net/tun")]
    TunDevice {
        /// Which option.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The TAP cannot be created or attached to for lack of privilege.
    #[error(
        "{what}: no permission to create or attach to TAP {name} (needs CAP_NET_ADMIN, or a \
         persistent TAP you own: ip tuntap add {name} mode tap user $USER)"
    )]
    TapPermission {
        /// Which option.
        what: String,
        /// The interface.
        name: String,
    },
    /// The TAP is attached to by another process.
    #[error("{what}: TAP {name} is busy (another process has it open)")]
    TapBusy {
        /// Which option.
        what: String,
        /// The interface.
        name: String,
    },
    /// TUNSETIFF failed for another reason.
    #[error("{what}: cannot attach to TAP {name}")]
    Tap {
        /// Which option.
        what: String,
        /// The interface.
        name: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The `hype` binary has no such backend subcommand.
    #[error(
        "{what}: this hype binary has no `{subcommand}` backend ({exe} {subcommand} --help failed)"
    )]
    MissingBackend {
        /// Which option.
        what: String,
        /// The subcommand.
        subcommand: String,
        /// The binary.
        exe: PathBuf,
    },
    /// Two consoles want this terminal.
    #[error("--serial stdio and --console stdio both want the terminal; pick one")]
    TerminalTwice,
    /// The path of the running binary is unknown.
    #[error("cannot find the hype binary")]
    CurrentExe(#[source] std::io::Error),
}

/// All problems found with a VM description.
#[derive(Debug)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => f.write_str(&hype_base::error_chain(one)),
            many => {
                write!(f, "{} problems, nothing started:", many.len())?;
                for p in many {
                    write!(f, "\n  {}", hype_base::error_chain(p))?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Problems {}

/// Why `hype run` failed (apart from the VMM's own exit code).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The VM description has problems; nothing was started.
    #[error("{0}")]
    Invalid(Problems),
    /// The private runtime directory could not be created.
    #[error("cannot create runtime directory {path}")]
    RuntimeDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The runtime directory could not be given to `--user`.
    #[error("cannot give runtime directory {path} to the --user")]
    RuntimeDirOwner {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Blocking or waiting for signals failed.
    #[error("signal setup failed")]
    Signals(#[source] std::io::Error),
    /// The supervisor could not confine itself.
    #[error("cannot confine the supervisor")]
    Sandbox(#[source] hype_sandbox::Error),
    /// A process could not be started.
    #[error("cannot start {name}")]
    Spawn {
        /// Backend or VMM name.
        name: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A backend exited before its socket appeared.
    #[error(
        "{name} exited ({status}) before its socket {socket} appeared; nothing else was started"
    )]
    BackendStart {
        /// Backend name.
        name: String,
        /// How it ended.
        status: String,
        /// Its socket.
        socket: PathBuf,
    },
    /// A backend's socket did not appear in time.
    #[error("{name}: socket {socket} did not appear within {after:?}")]
    SocketTimeout {
        /// Backend name.
        name: String,
        /// Its socket.
        socket: PathBuf,
        /// How long we waited.
        after: Duration,
    },
    /// A backend crashed more often than allowed; the VM was stopped.
    #[error("{name} crashed {crashes} times within {window:?}; stopped the VM")]
    RestartLimit {
        /// Backend name.
        name: String,
        /// Crashes counted.
        crashes: usize,
        /// The window.
        window: Duration,
    },
    /// Waiting for a child failed.
    #[error("waiting for {name} failed")]
    Wait {
        /// Backend or VMM name.
        name: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl RunError {
    /// Whether this is a problem with what the user asked for (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, RunError::Invalid(_))
    }
}
