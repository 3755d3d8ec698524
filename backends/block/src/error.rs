//! Errors of the block library.

use hype_daemon::CommandError;

/// Why a block device could not be built or served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The logical or physical block size is not a supported power of two.
    #[error("invalid block size {logical}/{physical} (logical: power of two 512..=65536, physical: power-of-two multiple of it)")]
    InvalidBlockSize {
        /// Logical block size in bytes.
        logical: u32,
        /// Physical block size in bytes.
        physical: u32,
    },
    /// The storage is smaller than one logical block.
    #[error("storage of {size} bytes is smaller than one {block_size}-byte block")]
    TooSmall {
        /// Storage size in bytes.
        size: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// Queue count out of range.
    #[error("invalid queue count {0} (1..=64)")]
    InvalidQueueCount(u16),
    /// Queue size out of range.
    #[error("invalid queue size {0} (power of two, 2..=32768)")]
    InvalidQueueSize(u16),
    /// Too many I/O threads requested.
    #[error("invalid io thread count {0} (0..=1024)")]
    InvalidIoThreads(usize),
    /// The serial does not fit GET_ID.
    #[error("invalid serial {0:?} (at most 20 printable ASCII characters)")]
    InvalidSerial(String),
    /// The backend for a connection could not be created.
    #[error("cannot start block backend threads")]
    Backend(#[source] std::io::Error),
    /// Listening, accepting or signal handling failed.
    #[error(transparent)]
    Daemon(#[from] hype_daemon::Error),
}

impl CommandError for Error {
    /// Device options (block size, queues, threads, serial) and a storage too small to be a
    /// disk are the command line's fault; failing to start threads is not.
    fn is_usage(&self) -> bool {
        match self {
            Error::InvalidBlockSize { .. }
            | Error::TooSmall { .. }
            | Error::InvalidQueueCount(_)
            | Error::InvalidQueueSize(_)
            | Error::InvalidIoThreads(_)
            | Error::InvalidSerial(_) => true,
            Error::Backend(_) => false,
            Error::Daemon(e) => e.is_usage(),
        }
    }
}
