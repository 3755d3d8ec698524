#![warn(missing_docs)]
//! `hype block-mem`: a RAM disk served as a vhost-user-blk backend.
//!
//! Memory is allocated in 1 MiB chunks on first write, so an untouched disk costs nothing and
//! discarded ranges give their memory back. The disk can start as a copy of an image file.
//!
//! May depend on: `hype-block`, `hype-daemon`.

pub mod sandbox;
mod store;

use std::path::PathBuf;

use hype_block::{io_threads_help, parse_size, BlockDevice, CommandError, DeviceArgs};
use hype_daemon::sandbox::Sandbox;

pub use store::{MemStorage, MAX_SIZE, STATE_MAGIC};

/// I/O threads when `--io-threads` is not given: memory answers in microseconds, so each
/// request runs on its queue's thread.
pub const DEFAULT_IO_THREADS: usize = 0;

/// Command-line options of `hype block-mem`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
#[command(mut_arg("io_threads", |a| a.help(io_threads_help(DEFAULT_IO_THREADS))))]
pub struct Args {
    /// Disk size, with an optional K/M/G/T suffix (e.g. 256M). Defaults to the image size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Image file whose contents initialise the disk.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Present the disk read-only.
    #[arg(long)]
    pub readonly: bool,
    /// Shared block device options.
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Errors of the RAM disk backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither a size nor an image was given.
    #[error("give --size or --image")]
    NoSize,
    /// The size is not a whole number of 512-byte sectors.
    #[error("size {0} is not a multiple of 512")]
    UnalignedSize(u64),
    /// The size is above what a RAM disk serves ([`MAX_SIZE`]).
    #[error("size {size} is larger than the maximum {max} (1 EiB)")]
    TooLarge {
        /// Requested disk size.
        size: u64,
        /// The maximum.
        max: u64,
    },
    /// The image does not fit the requested size.
    #[error("image {path} ({image_size} bytes) is larger than --size {size}")]
    ImageTooLarge {
        /// Image path.
        path: PathBuf,
        /// Image size in bytes.
        image_size: u64,
        /// Requested disk size.
        size: u64,
    },
    /// The image could not be read.
    #[error("cannot read image {path}")]
    Image {
        /// Image path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error(transparent)]
    Block(#[from] hype_block::Error),
}

impl CommandError for Error {
    /// Everything decided before serving (size, image) comes from the command line.
    fn is_usage(&self) -> bool {
        match self {
            Error::NoSize
            | Error::UnalignedSize(_)
            | Error::TooLarge { .. }
            | Error::ImageTooLarge { .. }
            | Error::Image { .. } => true,
            Error::Block(e) => e.is_usage(),
        }
    }
}

/// Checks that `size` is a usable disk size: a non-zero whole number of 512-byte sectors,
/// at most [`MAX_SIZE`].
/// `hype run --disk mem:SIZE` checks with it too.
pub fn check_size(size: u64) -> Result<(), Error> {
    if size == 0 || size % 512 != 0 {
        return Err(Error::UnalignedSize(size));
    }
    if size > store::MAX_SIZE {
        return Err(Error::TooLarge {
            size,
            max: store::MAX_SIZE,
        });
    }
    Ok(())
}

/// Builds the RAM disk `args` describes.
pub fn storage(args: &Args) -> Result<MemStorage, Error> {
    let image_size = match &args.image {
        Some(path) => Some(
            std::fs::metadata(path)
                .map_err(|source| Error::Image {
                    path: path.clone(),
                    source,
                })?
                .len(),
        ),
        None => None,
    };
    let size = match (args.size, image_size) {
        (Some(s), _) => s,
        // Round the image up to whole sectors.
        (None, Some(i)) => i.div_ceil(512) * 512,
        (None, None) => return Err(Error::NoSize),
    };
    check_size(size)?;
    let store = MemStorage::new(size, args.readonly);
    if let (Some(path), Some(image_size)) = (&args.image, image_size) {
        if image_size > size {
            return Err(Error::ImageTooLarge {
                path: path.clone(),
                image_size,
                size,
            });
        }
        let file = std::fs::File::open(path).map_err(|source| Error::Image {
            path: path.clone(),
            source,
        })?;
        store.load(file).map_err(|source| Error::Image {
            path: path.clone(),
            source,
        })?;
    }
    Ok(store)
}

/// Runs the RAM disk backend until SIGINT/SIGTERM.
pub fn run(args: Args) -> Result<(), Error> {
    let sandbox = Sandbox::new(args.device.sandbox, &sandbox::POLICY);
    if hype_daemon::sandbox::print_if_asked(&sandbox, &args.device.listen) {
        return Ok(());
    }
    let store = storage(&args)?;
    BlockDevice::new(store)
        .name("hype-block-mem")
        .io_threads(DEFAULT_IO_THREADS)
        .sandbox(sandbox)
        .run(&args.device)?;
    Ok(())
}
