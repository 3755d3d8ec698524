#![warn(missing_docs)]
//! `hype net-tap`: a virtio-net device on a TAP interface, served as a vhost-user backend.
//!
//! * The tap is opened with `IFF_VNET_HDR` (12-byte headers): checksum and segmentation
//!   offloads pass through between guest and host kernel instead of being done in software.
//!   The guest's acked GUEST_* features set the tap's `TUNSETOFFLOAD`.
//! * Queue pairs: queue `2i` is RX, `2i + 1` TX, each pair served by its own thread with its
//!   own tap queue (`IFF_MULTI_QUEUE` when more than one); queue `2 * pairs` is the control
//!   queue, which implements `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` (tap queues of inactive pairs
//!   are detached, so the kernel never steers packets to them).
//! * MRG_RXBUF, EVENT_IDX, INDIRECT_DESC; config space: MAC, link up, max pairs, MTU.
//! * RX never busy-loops: when the guest has no buffers the tap queue is taken out of the
//!   thread's epoll until the next RX kick; the frame already read waits.
//! * Malformed chains are dropped and counted ([`Stats`]); counters are logged when a
//!   frontend disconnects and on exit.
//! * Once the tap is set up the process is confined ([`sandbox::POLICY`]): frames on the open
//!   tap queues, three tap ioctls, vhost-user serving, no path.
//!
//! May depend on: `hype-daemon`, `hype-base`, the vhost-user/virtio crates.

mod backend;
mod chain;
mod config;
mod ctrl;
#[doc(hidden)]
pub mod fuzzing;
mod rx;
pub mod sandbox;
mod serve;
mod stats;
mod tap;
mod tx;

use std::sync::Arc;

use hype_daemon::sandbox::{Sandbox, SandboxArgs};
use hype_daemon::{CommandError, ListenArgs, Shutdown, SocketListener};

pub use backend::{GuestMemory, NetBackend};
pub use config::{tap_offloads_for, MacAddr, NetSpec, CONFIG_SIZE, MAX_QUEUE_PAIRS};
pub use stats::{Stats, StatsSnapshot};
pub use tap::{check_tap_name, offload, Tap, TapError};

/// Size of the virtio-net header with VERSION_1 or MRG_RXBUF (`num_buffers` present).
pub const VNET_HDR_LEN: usize = 12;

/// Size of the legacy virtio-net header (neither VERSION_1 nor MRG_RXBUF acked).
pub const LEGACY_VNET_HDR_LEN: usize = 10;

/// Command-line options of `hype net-tap`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Where to listen.
    #[command(flatten)]
    pub listen: ListenArgs,
    /// TAP interface to attach to; created if it does not exist.
    #[arg(long, value_name = "NAME")]
    pub tap: String,
    /// The guest's MAC address (random locally administered if not given).
    #[arg(long, value_name = "MAC")]
    pub mac: Option<MacAddr>,
    /// MTU: set on the tap and offered to the guest (VIRTIO_NET_F_MTU).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(68..=65535))]
    pub mtu: Option<u16>,
    /// Queue pairs (one tap queue and one thread each).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUE_PAIRS)))]
    pub queue_pairs: u16,
    /// Largest virtqueue size the frontend may use (power of two).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// Confinement of the process (`--sandbox`, `--print-sandbox`).
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if n >= 2 && n.is_power_of_two() => Ok(n),
        _ => Err(format!(
            "invalid queue size {s:?} (power of two, 2 to 32768)"
        )),
    }
}

/// Errors of the net-tap backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tap could not be opened or configured.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Listening, signal setup or serving failed.
    #[error(transparent)]
    Setup(#[from] hype_daemon::Error),
}

impl CommandError for Error {
    fn is_usage(&self) -> bool {
        match self {
            Error::Tap(e) => e.is_usage(),
            Error::Setup(e) => e.is_usage(),
        }
    }
}

/// Runs the backend until SIGINT/SIGTERM.
pub fn run(args: Args) -> Result<(), Error> {
    let mut sandbox = Sandbox::new(args.sandbox, &sandbox::POLICY);
    if hype_daemon::sandbox::print_if_asked(&sandbox, &args.listen) {
        return Ok(());
    }
    // Handlers before the socket: a SIGTERM once the socket exists ends the process cleanly.
    let shutdown = Shutdown::new()?;
    shutdown.install_signal_handlers()?;
    // Listen first: a bad --socket must not leave a tap behind.
    let mut listener = SocketListener::open(&args.listen)?;
    let tap = Arc::new(Tap::open(&args.tap, usize::from(args.queue_pairs))?);
    if let Some(mtu) = args.mtu {
        tap.set_mtu(mtu)?;
    }
    if tap.created() {
        tap.set_up()?;
    }
    let spec = Arc::new(NetSpec {
        mac: args.mac.unwrap_or_else(MacAddr::random),
        mtu: args.mtu,
        queue_pairs: args.queue_pairs,
        queue_size: args.queue_size,
        tap_offloads: tap.supported_offloads(),
    });
    log::info!(
        "hype-net-tap: tap {} ({}), guest mac {}, {} queue pair(s), mtu {}, tap offloads {:#x}",
        tap.name(),
        if tap.created() { "created" } else { "existing" },
        spec.mac,
        spec.queue_pairs,
        spec.mtu.map_or("default".to_string(), |m| m.to_string()),
        spec.tap_offloads
    );
    // Everything is open and the tap configured: nothing after this needs CAP_NET_ADMIN.
    hype_daemon::sandbox::confine(&mut sandbox, &listener)?;
    let stats = Arc::new(Stats::default());
    let result = serve::serve(
        &mut listener,
        "hype-net-tap",
        &shutdown,
        stats.clone(),
        |mem| NetBackend::new(spec.clone(), tap.clone(), mem.clone(), stats.clone()),
    );
    log::info!("stats: {}", stats.snapshot());
    Ok(result?)
}
