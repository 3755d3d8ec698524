//! hype's control API, server side: an HTTP/1.1 + JSON server on a Unix socket that the VMM
//! serves ([`server`], framing in [`http`]) and the documents it speaks ([`model`], described
//! by `docs/api.yaml`). The client behind `hype ctl` is the `hype-ctl` crate.
//!
//! The server is synchronous (std threads, `httparse` for the request head): no async runtime
//! runs in the VMM. The VMM plugs in through the [`model::VmApi`] trait.

pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod model;
pub mod server;

pub use model::VmApi;
pub use server::ApiServer;
