//! hype-testkit: a vhost-user frontend that plays the guest, for testing and benchmarking
//! vhost-user backends without a VM.
//!
//! # API overview
//! - [`driver::Driver`]: connects to a backend socket (waiting for it to appear), negotiates
//!   through the shared frontend `hype-frontend` (the one the VMM uses: SET_OWNER, features,
//!   protocol features MQ/REPLY_ACK/CONFIG/INFLIGHT_SHMFD/BACKEND_REQ, GET_QUEUE_NUM, GET_CONFIG),
//!   activates the rings ([`driver::DriverOptions`]: queues, queue size, memory size, feature
//!   mask, always-kick), stops them ([`driver::Driver::stop_queues`]), disconnects and
//!   reconnects with ring replay ([`driver::Driver::reconnect`], [`driver::ReplayBase`]).
//! - [`virtqueue::Virtqueue`]: a split ring in guest memory. `submit(&[Segment])` returns a head
//!   (or `add` several chains, then `notify` once); `wait`/`wait_for`/`poll` return
//!   [`virtqueue::Completion`]s with device-written data read back. Waits are always bounded
//!   ([`error::Error::Timeout`]). EVENT_IDX is used when negotiated (`used_event` written,
//!   `avail_event` respected; `always_kick` overrides). INDIRECT descriptors are optional and
//!   opt-in per chain (`submit_indirect`, only if VIRTIO_RING_F_INDIRECT_DESC was acked).
//!   A raw mode (`reserve_descriptors`, `write_descriptor`, `submit_raw`, `set_avail_idx`,
//!   `collect_raw`) writes arbitrary descriptors and heads for hostile tests.
//! - [`memory::GuestRam`]: memfd-backed guest memory and a buffer allocator.
//! - [`blk`]: virtio-blk requests, status, config decoding, [`blk::BlkDriver`] with
//!   `read`/`write`/`flush`/`get_id`/`discard`/`write_zeroes` and `run_batch`.
//! - [`http_server::HttpServer`]: a tiny HTTP/1.1 server on 127.0.0.1 serving one image with
//!   HEAD and ranged GET, with switchable misbehaviour ([`http_server::Behaviour`]) and a
//!   request log, for tests of HTTP-backed disks; TLS is left to the caller's connection wrapper.
//! - [`process::BackendProcess`]: a backend as a child process: start, wait for its socket,
//!   signal, bounded wait for its exit, killed on drop.
//! - [`sandbox`]: what a test of a confined process checks: every thread's seccomp mode, and
//!   that a forbidden call (a test hook) kills it with SIGSYS.
//! - [`loadgen::closed_loop`]: keep N requests in flight on a queue and report IOPS and latency
//!   percentiles (for benchmarks).
//!
//! ```no_run
//! use hype_testkit::blk::{BlkDriver, BlkRequest};
//! use hype_testkit::driver::DriverOptions;
//! # fn main() -> hype_testkit::error::Result<()> {
//! let opts = DriverOptions { num_queues: 2, queue_size: 256, ..DriverOptions::default() };
//! let mut disk = BlkDriver::connect("/tmp/blk.sock", opts)?;
//! disk.write(0, &[7u8; 4096])?;
//! let reqs: Vec<_> = (0..64).map(|i| BlkRequest::read(i * 8, 4096)).collect();
//! for r in disk.run_batch(&reqs)? {
//!     assert_eq!(r.status, hype_testkit::blk::BlkStatus::Ok);
//! }
//! # Ok(()) }
//! ```
//!
//! A dev-dependency only: no production crate may depend on it.

pub mod blk;
pub mod driver;
pub mod error;
pub mod guest;
pub mod http_server;
pub mod loadgen;
pub mod memory;
pub mod process;
pub mod sandbox;
pub mod virtqueue;
