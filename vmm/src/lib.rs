//! hype's VMM library: KVM, guest memory, vCPUs, Linux boot, legacy devices, the virtio-mmio
//! transport and the vhost-user frontends.
//!
//! [`cli`] is `hype vmm`'s command line over [`vm::run`], used by the multi-call `hype` binary and
//! by the VMM-only `hype-vmm` binary (`src/bin/hype-vmm.rs`).
//!
//! May depend on: `hype-frontend` (the vhost-user frontend), `hype-fixups`, `hype-base`,
//! `hype-sandbox` (seccomp and Landlock, [`sandbox`]), the
//! rust-vmm crates. Never on a backend, an HTTP
//! or TLS crate, or the supervisor: the VMM process carries only what running a VM needs.

pub mod acpi;
pub mod arch;
pub mod boot;
pub mod cli;
pub mod config;
pub mod control;
pub mod devices;
#[doc(hidden)]
pub mod fuzzing;
pub mod hotplug;
pub mod layout;
pub mod memory;
pub mod platform;
pub mod sandbox;
pub mod snapshot;
pub mod vcpu;
pub mod virtio;
pub mod vm;
