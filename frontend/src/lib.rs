//! hype-frontend: the one vhost-user frontend of hype, used by the VMM's devices and by the
//! test kit, so every backend test drives the backends through the code production uses.
//!
//! # What is here
//! - [`connect`]: connecting to a backend socket, once or waiting for it to appear.
//! - [`peer`]: who listens on a backend socket (SO_PEERCRED), checked before the handshake
//!   so guest memory only goes to this user, root or a user allowed for the device.
//! - [`Connection`]: one connection: the handshake (SET_OWNER, features, protocol features,
//!   BACKEND_REQ channel, GET_QUEUE_NUM, GET_CONFIG), config reads and writes, the inflight
//!   area, starting and stopping the rings. Every request is bounded by a [`watchdog`].
//! - [`BackendLink`]: what a device model needs from a connection, as a trait, so a device
//!   can be tested against a mock instead of a backend process.
//! - [`types`]: what hype knows about each device type it attaches (blk, net, console):
//!   how to recognise it from its features, its config layout, the writable config fields.
//! - [`features`]: the feature bits the frontend speaks of, by their `virtio-bindings` names.
//!
//! # What it may depend on
//! `vhost` (the protocol), `vmm-sys-util` (eventfds), `virtio-bindings` (names), `libc`,
//! `thiserror`, `log`, `hype-sandbox` (the watchdog thread confines itself). Not on guest memory types, KVM, or any backend: callers describe
//! memory as `vhost` memory regions and rings by host addresses.

pub mod connect;
pub mod connection;
pub mod error;
pub mod features;
#[doc(hidden)]
pub mod fuzzing;
pub mod link;
pub mod peer;
pub mod types;
pub mod watchdog;

pub use connect::{connect_waiting, connect_waiting_until, try_connect};
pub use connection::{BackendInfo, Connection, Detected, HandshakeOptions, InflightArea, Ring};
pub use error::FrontendError;
pub use link::BackendLink;
pub use types::{DetectError, DeviceType};
