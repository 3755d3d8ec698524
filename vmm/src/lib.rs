//! hype's VMM library: KVM, guest memory, vCPUs, Linux boot, legacy devices.
//!
//! The `hype` binary (`src/main.rs`) is a thin command line over [`vm::run`].

pub mod arch;
pub mod boot;
pub mod cli;
pub mod config;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod terminal;
pub mod vcpu;
pub mod virtio;
pub mod vm;
