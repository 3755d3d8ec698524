//! hype's VMM library: KVM, guest memory, vCPUs, Linux boot, legacy devices.
pub mod fixups;
