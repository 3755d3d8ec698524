//! Error type of the test kit.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while playing the guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `memfd_create` failed.
    #[error("cannot create guest memory")]
    Memfd(#[source] hype_base::memfd::CreateError),
    /// The requested guest memory size is unusable.
    #[error("invalid guest memory size {0}: must be a non-zero multiple of 4096")]
    BadMemorySize(u64),
    /// Mapping the memfd failed.
    #[error("cannot map guest memory")]
    MemoryMap(#[source] vm_memory::mmap::FromRangesError),
    /// A guest memory access failed (out of range address, ...).
    #[error("guest memory access at {addr:#x} (len {len}) failed")]
    MemoryAccess {
        /// Guest physical address.
        addr: u64,
        /// Access length.
        len: usize,
        /// Underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A guest memory region could not be described to the backend.
    #[error("cannot describe guest memory region to the backend")]
    MemoryRegion(#[source] vhost::Error),
    /// The buffer allocator has no free range large enough.
    #[error("out of guest buffer memory: need {len} bytes aligned to {align}")]
    OutOfBufferMemory {
        /// Requested length.
        len: u64,
        /// Requested alignment.
        align: u64,
    },
    /// Alignment must be a non-zero power of two.
    #[error("invalid alignment {0}: must be a power of two")]
    BadAlignment(u64),
    /// A buffer handed back to the allocator was never allocated from it.
    #[error("buffer at {addr:#x} (len {len}) was not allocated")]
    NotAllocated {
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Queue size must be a power of two in 1..=32768.
    #[error("invalid queue size {0}: must be a power of two in 1..=32768")]
    BadQueueSize(u16),
    /// Connecting to the backend socket did not succeed in time.
    #[error("cannot connect to {path} within {timeout:?}: {last}")]
    ConnectTimeout {
        /// Socket path.
        path: PathBuf,
        /// Timeout that expired.
        timeout: Duration,
        /// Last error seen.
        last: String,
    },
    /// The shared vhost-user frontend failed (handshake, a request, a refusal).
    #[error("vhost-user frontend")]
    Frontend(#[from] hype_frontend::FrontendError),
    /// The backend offers fewer queues than requested.
    #[error("backend offers {offered} queues, {wanted} requested")]
    NotEnoughQueues {
        /// Queues the backend offers.
        offered: u64,
        /// Queues requested.
        wanted: usize,
    },
    /// Queue index out of range.
    #[error("no queue {index} (have {count})")]
    NoSuchQueue {
        /// Requested index.
        index: usize,
        /// Number of queues.
        count: usize,
    },
    /// An eventfd operation failed.
    #[error("eventfd {op} failed")]
    EventFd {
        /// Operation.
        op: &'static str,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Not enough free descriptors for a chain.
    #[error("queue {queue}: chain needs {needed} descriptors, {free} free")]
    NoFreeDescriptors {
        /// Queue index.
        queue: u16,
        /// Descriptors needed.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// A chain must have at least one segment.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// A segment is longer than a descriptor can describe.
    #[error("segment of {0} bytes is too large for a descriptor")]
    SegmentTooLarge(usize),
    /// Indirect descriptors were requested but not negotiated.
    #[error("indirect descriptors not negotiated")]
    IndirectNotNegotiated,
    /// A descriptor index is outside the descriptor table.
    #[error("queue {queue}: descriptor index {index} out of range (size {size})")]
    BadDescriptorIndex {
        /// Queue index.
        queue: u16,
        /// Descriptor index.
        index: u16,
        /// Queue size.
        size: u16,
    },
    /// A descriptor is not reserved for raw use (or is already reserved).
    #[error("queue {queue}: descriptor {index} is not free for this operation")]
    DescriptorBusy {
        /// Queue index.
        queue: u16,
        /// Descriptor index.
        index: u16,
    },
    /// Waiting for completions timed out.
    #[error(
        "queue {queue}: timed out after {timeout:?} waiting for completions ({got} of {wanted})"
    )]
    Timeout {
        /// Queue index.
        queue: u16,
        /// Timeout that expired.
        timeout: Duration,
        /// Completions collected so far (kept for the next wait).
        got: usize,
        /// Completions wanted.
        wanted: usize,
    },
    /// poll(2) on a call eventfd failed.
    #[error("queue {queue}: poll on call eventfd failed")]
    Poll {
        /// Queue index.
        queue: u16,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The device returned a used id that is not in flight.
    #[error("queue {queue}: device returned used id {id} that is not in flight")]
    UnknownUsedId {
        /// Queue index.
        queue: u16,
        /// Used element id.
        id: u32,
    },
    /// The device moved the used index further than the queue size allows.
    #[error(
        "queue {queue}: device advanced used idx by {delta}, more than in flight ({in_flight})"
    )]
    UsedIdxOverrun {
        /// Queue index.
        queue: u16,
        /// Advance seen.
        delta: u16,
        /// Requests in flight.
        in_flight: usize,
    },
    /// The operation needs a live connection.
    #[error("not connected to a backend")]
    NotConnected,
    /// The operation needs the rings to be set up.
    #[error("queues are not active")]
    NotActive,
    /// A block request completed with a non-OK status.
    #[error("block request {request} at sector {sector} failed with status {status}")]
    BlkStatus {
        /// Request type name.
        request: &'static str,
        /// Sector.
        sector: u64,
        /// Status byte (0 ok, 1 ioerr, 2 unsupp).
        status: u8,
    },
    /// The device did not write the status byte.
    #[error("block request completed without a status byte (used len {used_len})")]
    BlkNoStatus {
        /// Used length reported by the device.
        used_len: u32,
    },
    /// A block request argument is invalid.
    #[error("invalid block request: {0}")]
    BlkInvalid(&'static str),
}

/// Result alias of the test kit.
pub type Result<T> = std::result::Result<T, Error>;
