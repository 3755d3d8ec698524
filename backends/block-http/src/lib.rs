//! `hype block-http`: a disk image at an http(s) URL, served as a vhost-user-blk backend.
//!
//! * **Opening.** `HEAD` gives the size (Content-Length) and the image's validators (ETag,
//!   Last-Modified); a one-byte `Range` request must then come back as `206 Partial Content`
//!   with a matching Content-Range. A server that ignores Range (answers 200), says
//!   `Accept-Ranges: none`, or gives no size is refused with an error naming the reason.
//!   Servers that refuse HEAD are accepted when the probe's Content-Range carries the size.
//! * **Reads.** The image is read in fixed-size blocks (`--cache-block`, 256 KiB) kept in a
//!   bounded LRU cache (`--cache-size`, 64 MiB). A read touching several blocks requests them
//!   all at once; `--connections` fetcher threads (8) keep that many range requests in flight.
//!   Guest reads go before read-ahead. `--io-threads` (16, [`DEFAULT_IO_THREADS`]) guest
//!   requests are handled at once, so one queue's requests do not wait in line. When a read
//!   starts right after a block the guest read, the next `--readahead` blocks (4) are fetched
//!   in the background.
//! * **Failures.** Connection errors, timeouts, short bodies and 408/425/429/500/502/503/504
//!   are retried `--retries` times (5) with exponential back-off from `--retry-delay-ms` (100
//!   ms, doubling, at most 5 s); then that request fails with IOERR and the backend keeps
//!   serving. Other statuses, a 200 to a range request, or a wrong Content-Range fail at once.
//! * **Changed image.** Every response's ETag (or, without one, Last-Modified) and
//!   Content-Range total are compared with what the image had when opened. On a difference the
//!   request fails with IOERR, an error is logged, and the remote is marked stale: from then on
//!   every read that needs the server fails with IOERR without a request, while blocks already
//!   in the cache and overlay granules (all from the original version) are still served. The
//!   backend keeps running so the guest can be shut down cleanly; restart it to use the new
//!   image (an overlay made for the old version is then refused).
//! * **Writes.** Read-only unless `--overlay PATH` is given: guest writes then go to a local
//!   sparse file (copy on write, 4 KiB granules, see [`overlay`] for the format) whose bitmap
//!   persists, so restarting with the same overlay keeps the writes. FLUSH is `fdatasync` of
//!   the overlay. `--readonly` with an overlay presents the overlaid image read-only.
//! * **https** needs the default `https` cargo feature (rustls, system roots through the
//!   platform verifier); `--ca-cert PEM` adds private CAs.
//!
//! May depend on: `hype-block`, `hype-daemon` and reqwest (HTTP/TLS).

mod cache;
#[doc(hidden)]
pub mod fuzzing;
pub mod overlay;
mod reader;
pub mod remote;
pub mod retry;
pub mod sandbox;
mod storage;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hype_block::{io_threads_help, parse_size, BlockDevice, CommandError, DeviceArgs, SECTOR_SIZE};
use hype_daemon::sandbox::Sandbox;

pub use overlay::{Overlay, OverlayError, DEFAULT_GRANULE};
pub use reader::{ReaderOptions, RemoteReader};
pub use remote::{Credentials, FetchError, OpenError, Remote, RemoteOptions, Validator};
pub use retry::RetryPolicy;
pub use storage::HttpStorage;

/// I/O threads when `--io-threads` is not given: a guest request waits for the network for
/// milliseconds, so up to this many are in flight at once (on all queues together) instead of
/// each queue's requests waiting in line.
pub const DEFAULT_IO_THREADS: usize = 16;

/// Command-line options of `hype block-http`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
#[command(mut_arg("io_threads", |a| a.help(io_threads_help(DEFAULT_IO_THREADS))))]
pub struct Args {
    /// URL of the raw disk image (http:// or https://). Also read from the environment
    /// variable HYPE_HTTP_URL, which keeps a URL with secrets (a token in the query) out of
    /// the process list.
    #[arg(long, value_name = "URL", env = URL_ENV, hide_env_values = true)]
    pub url: String,
    /// Keep guest writes in this local sparse file (created if missing) so the disk is
    /// writable; without it the disk is read-only.
    #[arg(long, value_name = "PATH")]
    pub overlay: Option<PathBuf>,
    /// Present the disk read-only even with an overlay.
    #[arg(long)]
    pub readonly: bool,
    /// Memory for cached image blocks (K/M/G suffix).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64M")]
    pub cache_size: u64,
    /// Size of a cached block, and of each range request (power of two, 4K..16M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "256K")]
    pub cache_block: u64,
    /// Blocks read ahead of a sequential stream (0 disables read-ahead).
    #[arg(long, value_name = "BLOCKS", default_value_t = 4)]
    pub readahead: u64,
    /// Range requests in flight at most (fetcher threads).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub connections: usize,
    /// Retries of a request after a transient failure, before IOERR.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub retries: u32,
    /// Wait before the first retry, in milliseconds; it doubles on each retry (at most 5 s).
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub retry_delay_ms: u64,
    /// File whose first line is `user:password`, sent as HTTP basic credentials with every
    /// request (keeps them out of the URL and the process list). Without it the environment
    /// variable HYPE_HTTP_CREDENTIALS (same form) is used, if set.
    #[arg(long, value_name = "PATH")]
    pub credentials_file: Option<PathBuf>,
    /// PEM file of extra CA certificates to trust for https (besides the system's).
    #[arg(long, value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
    /// Timeout of one HTTP request, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// Logical block size presented to the guest (512..64K, power of two).
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "512")]
    pub block_size: u64,
    /// Shared block device options.
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Errors of the HTTP backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cache block size is unusable.
    #[error("invalid --cache-block {0} (power of two from 4K to 16M)")]
    InvalidCacheBlock(u64),
    /// The logical block size is unusable.
    #[error("invalid --block-size {0} (power of two from 512 to 65536)")]
    InvalidBlockSize(u64),
    /// `--connections` is 0 or absurd.
    #[error("invalid --connections {0} (1..=256)")]
    InvalidConnections(usize),
    /// `--timeout` is 0.
    #[error("invalid --timeout 0")]
    InvalidTimeout,
    /// The credentials file cannot be read.
    #[error("cannot read credentials file {path}")]
    CredentialsRead {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The credentials file is not a small regular file.
    #[error("credentials file {path} is not a regular file of at most {CREDENTIALS_MAX} bytes")]
    CredentialsFile {
        /// The file.
        path: PathBuf,
    },
    /// The credentials are not `user:password`.
    #[error("{0}: expected user:password on the first line")]
    CredentialsFormat(String),
    /// The image could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The overlay could not be opened.
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    /// The fetcher threads could not be started.
    #[error("cannot start fetcher threads")]
    Threads(#[source] std::io::Error),
    /// The empty overlay file could not be created before the sandbox was set up.
    #[error("cannot create {path}")]
    OverlayCreate {
        /// The overlay path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The process could not confine itself.
    #[error(transparent)]
    Sandbox(#[from] hype_daemon::Error),
    /// Serving failed.
    #[error(transparent)]
    Block(#[from] hype_block::Error),
}

impl CommandError for Error {
    /// Option checks, and the image or overlay the options name, are the command line's
    /// business (see the `OpenError` and `OverlayError` implementations); threads are not.
    fn is_usage(&self) -> bool {
        match self {
            Error::InvalidCacheBlock(_)
            | Error::InvalidBlockSize(_)
            | Error::InvalidConnections(_)
            | Error::InvalidTimeout
            | Error::CredentialsRead { .. }
            | Error::CredentialsFile { .. }
            | Error::CredentialsFormat(_) => true,
            Error::Open(e) => e.is_usage(),
            Error::Overlay(e) => e.is_usage(),
            Error::OverlayCreate { .. } => true,
            Error::Threads(_) => false,
            Error::Sandbox(e) => e.is_usage(),
            Error::Block(e) => e.is_usage(),
        }
    }
}

/// Largest credentials file read.
pub const CREDENTIALS_MAX: u64 = 4096;

/// Environment variable with the image URL when no `--url` is given.
pub const URL_ENV: &str = "HYPE_HTTP_URL";

/// Environment variable with `user:password` when no `--credentials-file` is given.
pub const CREDENTIALS_ENV: &str = "HYPE_HTTP_CREDENTIALS";

/// The credentials `args` (or the environment) give, if any.
pub fn credentials(args: &Args) -> Result<Option<Credentials>, Error> {
    if let Some(path) = &args.credentials_file {
        use std::io::Read;
        let read_err = |source| Error::CredentialsRead {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() || meta.len() > CREDENTIALS_MAX {
            return Err(Error::CredentialsFile { path: path.clone() });
        }
        let mut text = String::new();
        file.take(CREDENTIALS_MAX)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        return Credentials::parse(&text).map(Some).ok_or_else(|| {
            Error::CredentialsFormat(format!("--credentials-file {}", path.display()))
        });
    }
    match std::env::var(CREDENTIALS_ENV) {
        Ok(v) => Credentials::parse(&v)
            .map(Some)
            .ok_or_else(|| Error::CredentialsFormat(CREDENTIALS_ENV.into())),
        Err(_) => Ok(None),
    }
}

/// Opens the image (and overlay) `args` describes.
pub fn storage(args: &Args) -> Result<HttpStorage, Error> {
    if !args.cache_block.is_power_of_two() || !(4096..=16 << 20).contains(&args.cache_block) {
        return Err(Error::InvalidCacheBlock(args.cache_block));
    }
    if !args.block_size.is_power_of_two() || !(512..=65536).contains(&args.block_size) {
        return Err(Error::InvalidBlockSize(args.block_size));
    }
    if !(1..=256).contains(&args.connections) {
        return Err(Error::InvalidConnections(args.connections));
    }
    if args.timeout == 0 {
        return Err(Error::InvalidTimeout);
    }
    let opts = RemoteOptions {
        timeout: Duration::from_secs(args.timeout),
        retry: RetryPolicy {
            retries: args.retries,
            first_delay: Duration::from_millis(args.retry_delay_ms),
            max_delay: Duration::from_secs(5).max(Duration::from_millis(args.retry_delay_ms)),
        },
        connections: args.connections,
        ca_cert: args.ca_cert.clone(),
        credentials: credentials(args)?,
    };
    // A URL from the environment is private to its user; one in argv is not.
    let url_in_argv = std::env::var_os(URL_ENV).is_none_or(|v| v != args.url.as_str());
    if url_in_argv && hype_base::redact_url(&args.url) != args.url {
        log::warn!(
            "{}: credentials or query values in --url are visible to every local user in the \
             process list; give the URL in {URL_ENV} and credentials with --credentials-file or \
             {CREDENTIALS_ENV} instead",
            hype_base::redact_url(&args.url)
        );
    }
    let remote = Remote::open(&args.url, &opts)?;
    // The guest sees whole sectors; a ragged tail reads as zeroes.
    let size = remote.size().div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    log::info!(
        "{}: {} bytes ({})",
        remote.shown_url(),
        remote.size(),
        remote.validator()
    );
    let overlay = match &args.overlay {
        Some(p) => Some(Overlay::open(
            p,
            size,
            &remote.validator().identity(),
            DEFAULT_GRANULE,
        )?),
        None => None,
    };
    let reader = RemoteReader::new(
        Arc::new(remote),
        &ReaderOptions {
            block_size: args.cache_block,
            cache_blocks: (args.cache_size / args.cache_block) as usize,
            readahead: args.readahead,
            fetchers: args.connections,
        },
    )
    .map_err(Error::Threads)?;
    Ok(HttpStorage::new(
        reader,
        overlay,
        size,
        args.block_size as u32,
        args.readonly,
        args.cache_block.min(u64::from(u32::MAX)) as u32,
    ))
}

/// Runs the HTTP backend until SIGINT/SIGTERM.
pub fn run(args: Args) -> Result<(), Error> {
    let mut sandbox = Sandbox::new(args.device.sandbox, &sandbox::POLICY);
    sandbox::add_rules(&mut sandbox, &args);
    if sandbox.print_if_asked() {
        return Ok(());
    }
    // Landlock before the HTTP client and fetcher threads start, so they are covered too.
    sandbox::restrict_files(&mut sandbox, &args)?;
    let store = storage(&args)?;
    BlockDevice::new(store)
        .name("hype-block-http")
        .io_threads(DEFAULT_IO_THREADS)
        .sandbox(sandbox)
        .run(&args.device)?;
    Ok(())
}
