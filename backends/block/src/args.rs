//! Command-line options shared by block backends, and size parsing.

use hype_daemon::sandbox::SandboxArgs;
use hype_daemon::ListenArgs;

/// Default of `--poll-us`: see [`DeviceArgs::poll_us`] and docs/benchmarks.md for the choice.
pub const DEFAULT_POLL_US: u32 = 200;

/// Default of `--large-io-threads` where the process may use four CPUs or more (on fewer, only
/// those beyond two: none on a one- or two-CPU process).
pub const DEFAULT_LARGE_IO_THREADS: usize = 2;

/// Options every block backend binary takes. Flatten it into the backend's own `Args`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct DeviceArgs {
    /// Where to listen.
    #[command(flatten)]
    pub listen: ListenArgs,
    /// Number of virtqueues (served by --queue-threads threads).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_queues: u16,
    /// Largest virtqueue size the frontend may use.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    // `None` keeps what the backend set with `BlockDevice::io_threads` (0 unless it chose
    // otherwise); a single doc paragraph, since it is also the `--help` text.
    /// I/O threads shared by all queues, letting slow stores have many requests in flight;
    /// 0 runs each request on its queue's thread [default: the backend's, 0 for local stores]
    #[arg(long, value_name = "N")]
    pub io_threads: Option<usize>,
    /// Serial number the guest reads with GET_ID (at most 20 ASCII characters).
    #[arg(long, value_name = "SERIAL")]
    pub serial: Option<String>,
    /// Longest time (microseconds) a queue's thread keeps watching its ring for the guest's
    /// next request after a busy round, before it sleeps until a kick; adaptive, shorter when
    /// it finds nothing; 0 turns polling off; not used with --io-threads above 0
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_US)]
    pub poll_us: u32,
    /// Threads that run reads and writes of 128 KiB and more, so that several large
    /// transfers copy at once while small requests stay on the queue's thread; 0 keeps every
    /// request on its queue's thread; not used with --io-threads above 0 [default: 2, but only
    /// on CPUs beyond two this process may run on: 0 with one or two CPUs]
    #[arg(long, value_name = "N")]
    pub large_io_threads: Option<usize>,
    /// Threads that serve the virtqueues, each thread several queues (in turn) when fewer
    /// than the queues; 0: one per queue
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub queue_threads: usize,
    /// With --io-threads above 0, return each request to the guest as soon as it finished
    /// instead of in the order the guest made them available: no waiting behind a slow
    /// request, but after a crash of this process a request may complete twice (see
    /// docs/devices.md, "What happens to requests in flight")
    #[arg(long)]
    pub out_of_order: bool,
    /// Confinement of the process (`--sandbox`, `--print-sandbox`).
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// The `--help` text of `--io-threads` for a backend whose default is `default` threads.
/// A backend that flattens [`DeviceArgs`] shows its own default with
/// `#[command(mut_arg("io_threads", |a| a.help(hype_block::io_threads_help(N))))]` on its
/// `Args`, and passes the same `N` to [`BlockDevice::io_threads`](crate::BlockDevice::io_threads).
pub fn io_threads_help(default: usize) -> String {
    format!(
        "I/O threads shared by all queues, letting slow stores have many requests in flight; \
         0 runs each request on its queue's thread [default: {default}]"
    )
}

/// Parses a size with an optional binary suffix: `4096`, `512K`, `256M`, `1G`, `2T`, also
/// `KiB`/`MiB`/`GiB`/`TiB` and `B`. Case-insensitive; a bare number is bytes
/// ([`hype_base::parse_bytes`], the one size parser of hype).
pub fn parse_size(s: &str) -> Result<u64, String> {
    hype_base::parse_bytes(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("7B"), Ok(7));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        device: DeviceArgs,
    }

    #[test]
    fn io_threads_is_unset_unless_given() {
        use clap::Parser;
        let cli = Cli::try_parse_from(["b", "--socket", "/s"]).unwrap();
        assert_eq!(cli.device.io_threads, None);
        let cli = Cli::try_parse_from(["b", "--socket", "/s", "--io-threads", "0"]).unwrap();
        assert_eq!(cli.device.io_threads, Some(0));
        let cli = Cli::try_parse_from(["b", "--socket", "/s", "--io-threads", "4"]).unwrap();
        assert_eq!(cli.device.io_threads, Some(4));
    }
}
