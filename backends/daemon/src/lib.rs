#![warn(missing_docs)]
//! Plumbing shared by every hype vhost-user backend process.
//!
//! A backend binary needs the same few things whatever device it implements:
//!
//! * a listening Unix socket, either bound to `--socket PATH` (mode 0600 unless told otherwise)
//!   or handed over by systemd socket activation (`LISTEN_FDS`/`LISTEN_PID`): [`SocketListener`];
//! * an accept loop that serves one frontend at a time and keeps serving after it disconnects,
//!   building a fresh backend and `VhostUserDaemon` for every connection (a daemon object cannot
//!   serve a second connection): [`serve`], or [`serve_with`] for backends that register
//!   their own fds with the worker threads ([`ConnectionHooks`]);
//! * a clean exit on SIGINT/SIGTERM, removing the socket it created: [`Shutdown`];
//! * one logging setup (`HYPE_LOG`, falling back to `RUST_LOG`): [`init_logging`];
//! * one way to end `main`: the error chain on one line, exit code 2 for usage errors and 1 for
//!   runtime errors ([`CommandError`], [`report_exit`], [`parse_command_line`]);
//! * one EVENT_IDX-aware loop that drains a virtqueue and signals the guest: [`vring::Drain`],
//!   with rate-limited logging of guest mistakes: [`guest_error`];
//! * the sandbox every backend process confines itself in once its socket is bound and its
//!   files are open (seccomp allow-list, Landlock, no_new_privs): [`sandbox`], with the
//!   system calls the accept loop and vhost-user serving need ([`sandbox::VHOST_USER`]);
//! * the answers every backend gives alike (protocol features, exit events, a read-only config
//!   space): [`backend_defaults`].
//!
//! Everything is generic over any [`vhost_user_backend::VhostUserBackend`], so the block, net and
//! console backends share it.
//!
//! May depend on: `hype-base`, `hype-sandbox`, vhost, vhost-user-backend, virtio-queue,
//! vm-memory. Nothing device-specific: a device's knowledge lives in its backend crate.

pub mod backend_defaults;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod guest_error;
pub mod guest_memory;
mod listener;
mod relay;
pub mod sandbox;
mod serve;
mod shutdown;
pub mod vring;

pub use error::Error;
pub use guest_error::guest_error;
pub use guest_memory::accept_guest_memory;
pub use hype_base::{
    error_chain, error_line, exit_code, exit_code_number, init_logging, parse_args_from,
    parse_command_line, report_exit, usage_error_line, CommandError, EXIT_RUNTIME, EXIT_USAGE,
};
pub use listener::{parse_mode, ListenArgs, SocketListener, DEFAULT_SOCKET_MODE};
pub use serve::{serve, serve_with, ConnectionHooks, ServedBackend};
pub use shutdown::Shutdown;
