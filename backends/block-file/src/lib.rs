#![warn(missing_docs)]
//! `hype block-file`: a raw image file or a block device served as a vhost-user-blk backend.
//!
//! * `--readonly` opens the file read-only and presents a read-only disk.
//! * FLUSH is `fdatasync`.
//! * DISCARD punches holes (`fallocate(PUNCH_HOLE)`, or `BLKDISCARD` on block devices);
//!   WRITE_ZEROES uses `fallocate` (punching holes when the guest allows unmapping, so sparse
//!   files stay sparse) and falls back to writing zeroes.
//! * `--direct` opens with `O_DIRECT` (bypassing the host page cache).
//! * The file is locked (`flock`): exclusively when writable, shared when read-only, so the
//!   same image is never opened twice for writing.
//! * Once serving, the process is confined ([`sandbox::POLICY`]): the calls above, vhost-user
//!   serving, and no path at all (the image is open already).
//!
//! May depend on: `hype-block`, `hype-daemon`.

mod file;
pub mod sandbox;

use std::path::PathBuf;

use hype_block::{io_threads_help, parse_size, BlockDevice, CommandError, DeviceArgs};
use hype_daemon::sandbox::Sandbox;

pub use file::{FileOptions, FileStorage};

/// I/O threads when `--io-threads` is not given: a local file answers in microseconds, so each
/// request runs on its queue's thread.
pub const DEFAULT_IO_THREADS: usize = 0;

/// Command-line options of `hype block-file`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
#[command(mut_arg("io_threads", |a| a.help(io_threads_help(DEFAULT_IO_THREADS))))]
pub struct Args {
    /// Raw image file or block device.
    #[arg(long, value_name = "PATH")]
    pub path: PathBuf,
    /// Open read-only and present a read-only disk.
    #[arg(long)]
    pub readonly: bool,
    /// Use O_DIRECT (no host page cache). The default block size becomes 4096 for files.
    #[arg(long)]
    pub direct: bool,
    /// Logical block size presented to the guest (512..64K, power of two).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Shared block device options.
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Errors of the file backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened.
    #[error("cannot open {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the file open for writing (or reading, when we want to write).
    #[error("{0} is already in use by another process (locked)")]
    Locked(PathBuf),
    /// flock(2) failed for another reason.
    #[error("cannot lock {path}")]
    Lock {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Neither a regular file nor a block device.
    #[error("{0} is neither a regular file nor a block device")]
    UnsupportedFileType(PathBuf),
    /// The size could not be determined.
    #[error("cannot get the size of {path}")]
    Size {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The block size is not usable.
    #[error("invalid block size {0} (power of two from 512 to 65536, at least the device's)")]
    InvalidBlockSize(u64),
    /// Serving failed.
    #[error(transparent)]
    Block(#[from] hype_block::Error),
}

impl CommandError for Error {
    /// The image named by `--path` missing, of the wrong kind, locked by another process or
    /// with a block size it cannot take is the command line's fault; a failing flock(2) is not.
    fn is_usage(&self) -> bool {
        match self {
            Error::Open { .. }
            | Error::Locked(_)
            | Error::UnsupportedFileType(_)
            | Error::Size { .. }
            | Error::InvalidBlockSize(_) => true,
            Error::Lock { .. } => false,
            Error::Block(e) => e.is_usage(),
        }
    }
}

/// Runs the file backend until SIGINT/SIGTERM.
pub fn run(args: Args) -> Result<(), Error> {
    let sandbox = Sandbox::new(args.device.sandbox, &sandbox::POLICY);
    if hype_daemon::sandbox::print_if_asked(&sandbox, &args.device.listen) {
        return Ok(());
    }
    let store = FileStorage::open(
        &args.path,
        FileOptions {
            read_only: args.readonly,
            direct: args.direct,
            block_size: args.block_size,
        },
    )?;
    BlockDevice::new(store)
        .name("hype-block-file")
        .io_threads(DEFAULT_IO_THREADS)
        .sandbox(sandbox)
        .run(&args.device)?;
    Ok(())
}
