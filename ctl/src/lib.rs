//! `hype ctl`: the client of the VMM's control API ([`client`], reqwest over the Unix socket)
//! and the command line over it ([`ctl`]). Kept out of `hype-api` so that the VMM, which only
//! serves the API, does not link an HTTP client and its async runtime.

pub mod client;
pub mod ctl;
