//! How the guest learns its CPUs and devices: ACPI tables (default) or, for kernels without
//! ACPI, an MP table plus `virtio_mmio.device=` entries on the kernel command line.
//!
//! Each device is described exactly once: with `acpi` the command line gets no device entries
//! (a kernel with both would probe every device twice), with `mptable` no ACPI table is written.

use std::fmt;
use std::str::FromStr;

/// The platform description a VM gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Platform {
    /// RSDP/XSDT/FADT/MADT/DSDT (see [`crate::acpi`]); poweroff and the power button work.
    #[default]
    Acpi,
    /// MP table for the CPUs and `virtio_mmio.device=` on the command line for the devices
    /// (needs a kernel with `CONFIG_X86_MPPARSE` and `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
    Mptable,
}

impl Platform {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Platform::Acpi => "acpi",
            Platform::Mptable => "mptable",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "acpi" => Ok(Platform::Acpi),
            "mptable" => Ok(Platform::Mptable),
            _ => Err(format!("'{s}' is not a platform (acpi, mptable)")),
        }
    }
}

/// Whether a kernel command line already describes virtio-mmio devices itself.
pub fn cmdline_has_devices(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .any(|w| w.starts_with("virtio_mmio.device="))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        assert_eq!("acpi".parse::<Platform>(), Ok(Platform::Acpi));
        assert_eq!("mptable".parse::<Platform>(), Ok(Platform::Mptable));
        assert!("ACPI".parse::<Platform>().is_err());
        assert_eq!(Platform::default(), Platform::Acpi);
        assert_eq!(Platform::Mptable.to_string(), "mptable");
    }

    #[test]
    fn device_entries_on_the_command_line() {
        assert!(cmdline_has_devices(
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        ));
        assert!(!cmdline_has_devices("console=ttyS0 virtio_mmio.foo=1"));
    }
}
