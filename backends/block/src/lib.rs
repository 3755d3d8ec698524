#![warn(missing_docs)]
//! virtio-blk over vhost-user: implement [`Storage`], get a complete backend.
//!
//! ```text
//!  guest driver ──virtqueues──▶ BlockBackend (a thread per queue, or --queue-threads)
//!                                 │ parse + validate (request.rs)
//!                                 ├─▶ execute inline            ─┐
//!                                 └─▶ I/O pool (out of order)   ─┴─▶ Storage::read_at / write_at / ...
//! ```
//!
//! The library handles everything virtio-blk: feature negotiation, the config space, request
//! parsing (hostile descriptors included), multi-queue, EVENT_IDX, GET_ID, DISCARD,
//! WRITE_ZEROES, read-only disks. [`BlockDevice`] wires a storage to the shared daemon
//! plumbing of [`hype_daemon`] (socket, socket activation, reconnects, signals).
//!
//! See `docs/custom-storage-backend.md` and `examples/checksummed.rs`.
//!
//! May depend on: `hype-daemon`, `hype-base`, the vhost-user/virtio crates. Storage-specific
//! code (files, HTTP) lives in the backends built on it, never here.

mod args;
mod backend;
mod chain;
mod config;
mod device;
mod direct_io;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod io_pool;
mod iobuf;
mod ordered;
mod request;
mod storage;

pub use args::{io_threads_help, parse_size, DeviceArgs};
pub use backend::{BlockBackend, GuestMemory};
pub use chain::DropReason;
pub use config::CONFIG_SPACE_LEN;
pub use device::BlockDevice;
pub use direct_io::DirectIo;
pub use error::Error;
pub use request::RequestError;
pub use storage::{write_zero_buffers, Storage, StorageInfo, SECTOR_SIZE};

/// Re-exported so backends need not depend on the daemon crate for the common items.
pub use hype_daemon::{
    error_chain, init_logging, report_exit, CommandError, ListenArgs, Shutdown, SocketListener,
};
