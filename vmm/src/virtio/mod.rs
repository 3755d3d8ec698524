//! virtio devices for the guest: the virtio-mmio transport in front of vhost-user backends.
//!
//! - [`mmio`]: the virtio-mmio version 2 register file (virtio 1.2, 4.2.2).
//! - [`frontend`]: the VMM's side of the shared vhost-user frontend (`hype-frontend`).
//! - [`detect`]: the device types and learning them from the backend (`hype-frontend`'s
//!   [`hype_frontend::types`], one module per type).
//! - [`device`]: one device: the register file, driven by vCPUs, and its worker.
//! - [`worker`]: the device thread that owns the backend link, watches it and reconnects
//!   with a full replay; its state ([`worker::BackendState`]) is readable from outside.
//! - [`bus`]: MMIO dispatch and exit counters.
//!
//! Each device gets a 4 KiB window at [`crate::layout::VIRTIO_MMIO_BASE`] + 4 KiB * index and
//! one GSI from [`DEVICE_GSIS`]; the guest learns both from `virtio_mmio.device=4K@ADDR:IRQ`
//! on its command line ([`cmdline_entry`]). See `docs/devices.md`.

pub mod bus;
pub mod device;
pub mod frontend;
pub mod mmio;
pub mod worker;

pub use device::{DeviceEvents, DeviceOptions, VhostUserDevice, WaitLimit};
pub use hype_frontend::types as detect;
pub use hype_frontend::types::DeviceType;
pub use worker::{BackendState, BackendStatus, ConfigRefresh, DeviceCommandError};

use crate::layout::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};

/// GSIs (= ISA IRQs, edge-triggered) given to virtio devices in order: 4 (COM1), 8 (RTC),
/// 0-2 and 13 are taken or special.
pub const DEVICE_GSIS: [u32; 10] = [5, 6, 7, 9, 10, 11, 12, 14, 15, 3];

/// Most virtio devices a VM can have.
pub const MAX_DEVICES: usize = DEVICE_GSIS.len();

/// Window base of device `index`.
pub fn device_base(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE * index as u64
}

/// The kernel command-line entry describing a device.
pub fn cmdline_entry(base: u64, gsi: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{gsi}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_cmdline() {
        assert_eq!(device_base(0), 0xd000_0000);
        assert_eq!(device_base(2), 0xd000_2000);
        assert_eq!(
            cmdline_entry(device_base(1), DEVICE_GSIS[1]),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
        assert!(!DEVICE_GSIS.contains(&4) && !DEVICE_GSIS.contains(&8));
    }
}
