//! ACPI tables for one VM, built with the rust-vmm `acpi_tables` crate: RSDP -> XSDT -> FADT
//! (hardware-reduced, reset and sleep registers) -> DSDT, and the MADT.
//!
//! What the guest learns from them:
//! - [`madt`]: its CPUs (one local APIC per vCPU), the IOAPIC and the ISA interrupt routing;
//! - [`dsdt`]: COM1, one `LNRO0005` (virtio-mmio) device per attached device and one hot-plug
//!   slot per free window ([`crate::devices::hotplug`]), `_S5_`, and the Generic Event Device
//!   whose power button the host presses and that announces hot-plug events
//!   ([`crate::devices::power`]);
//! - the FADT: where the reset and sleep registers are (ports of [`crate::devices::power`]).
//!
//! The tables live at [`ACPI_TABLES_ADDR`] (reserved in the e820 map); the RSDP comes first, so
//! the kernel finds it through `boot_params.acpi_rsdp_addr` / `hvm_start_info.rsdp_paddr` or, as
//! a fallback, by scanning the BIOS area. See `docs/platform.md`.

pub mod dsdt;
pub mod madt;

use std::path::{Path, PathBuf};

use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::power;
use crate::memory::GuestMemoryMmap;

pub use crate::layout::{ACPI_TABLES_ADDR, ACPI_TABLES_SIZE};

/// OEM ID in every table header.
pub const OEM_ID: [u8; 6] = *b"HYPEVM";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;

/// A virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Base of its 4 KiB register window.
    pub base: u64,
    /// Its interrupt (GSI, edge-triggered, active high).
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// Number of vCPUs (APIC IDs 0..cpus).
    pub cpus: u8,
    /// virtio-mmio devices in attach order (slots 0, 1, ...).
    pub devices: Vec<MmioDevice>,
    /// The empty hot-plug slots after them.
    pub hotplug: Vec<MmioDevice>,
}

impl Machine {
    /// The machine `hype vmm` builds for `cpus` vCPUs and `devices` virtio devices: device `i`
    /// at [`crate::virtio::device_base`]`(i)` with GSI [`crate::virtio::DEVICE_GSIS`]`[i]`
    /// (devices past [`crate::virtio::MAX_DEVICES`] are dropped: the VM refuses them anyway);
    /// every other window is an empty hot-plug slot.
    pub fn for_vm(cpus: u8, devices: usize) -> Self {
        let mut all: Vec<MmioDevice> = crate::virtio::DEVICE_GSIS
            .iter()
            .enumerate()
            .map(|(i, &gsi)| MmioDevice {
                base: crate::virtio::device_base(i),
                gsi,
            })
            .collect();
        let hotplug = all.split_off(devices.min(all.len()));
        Machine {
            cpus,
            devices: all,
            hotplug,
        }
    }
}

/// Errors building or writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// Zero or too many vCPUs for the MADT.
    #[error("{0} vCPUs cannot be described in the MADT (1 to {max})", max = madt::MAX_CPUS)]
    Cpus(u8),
    /// More devices than the DSDT generator names.
    #[error("{0} devices cannot be described in the DSDT (at most {max})", max = dsdt::MAX_DEVICES)]
    Devices(usize),
    /// More devices and hot-plug slots than the slot registers have bits for.
    #[error("{0} device slots cannot be described (at most {max})", max = crate::devices::hotplug::MAX_SLOTS)]
    Slots(usize),
    /// A device interrupt the IOAPIC does not have.
    #[error("device interrupt {0} is not an IOAPIC pin (0 to {max})", max = dsdt::IOAPIC_PINS - 1)]
    DeviceGsi(u32),
    /// A device window outside the 32-bit address space.
    #[error("device window {0:#x} is above 4 GiB")]
    DeviceAddress(u64),
    /// The tables outgrew their area (a bug: the limits above keep them small).
    #[error("the ACPI tables need {0} bytes, more than the {ACPI_TABLES_SIZE} reserved")]
    TooBig(usize),
    /// Writing into guest memory failed.
    #[error("cannot write the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
    /// Creating the dump directory failed.
    #[error("cannot create {}", .0.display())]
    DumpDir(PathBuf, #[source] std::io::Error),
    /// Writing a dumped table failed.
    #[error("cannot write {}", .0.display())]
    DumpFile(PathBuf, #[source] std::io::Error),
}

/// One table and where it lives in guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// Its signature: `RSDP` (8 bytes `RSD PTR ` in the table), `XSDT`, `FACP`, `APIC`, `DSDT`.
    pub signature: &'static str,
    /// Guest physical address.
    pub addr: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// The complete set for one VM, laid out from [`ACPI_TABLES_ADDR`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    tables: Vec<Table>,
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// Rounds up to 16 bytes (RSDP alignment; plenty for the others).
fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The FADT: hardware-reduced ACPI (no PM timer, no SCI, no legacy PM blocks), the reset
/// register and the sleep control/status registers on the power device's ports.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, *b"HYPEFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton) // no fixed-feature power button: it is a GED device
        .flag(Flags::SlpButton) // no sleep button
        .preferred_pm_profile(PmProfile::EnterpriseServer);
    b.reset_reg = io_gas(power::RESET_PORT);
    b.reset_value = power::RESET_VALUE;
    b.sleep_control_reg = io_gas(power::SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io_gas(power::SLEEP_STATUS_PORT);
    // "KVMKVMKVM" would claim KVM's identity; leave the hypervisor vendor identity zero.
    aml_bytes(&b.finalize())
}

impl AcpiTables {
    /// Builds every table for `m`.
    pub fn build(m: &Machine) -> Result<Self, AcpiError> {
        let madt = madt::build(m.cpus)?;
        let dsdt = dsdt::build(&m.devices, &m.hotplug)?;
        let rsdp_addr = ACPI_TABLES_ADDR;
        let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
        // XSDT: header + 2 entries (FADT, MADT).
        let fadt_addr = align16(xsdt_addr + 36 + 2 * 8);
        let madt_addr = align16(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
        let dsdt_addr = align16(madt_addr + madt.len() as u64);
        let end = dsdt_addr + dsdt.len() as u64;
        let used = (end - ACPI_TABLES_ADDR) as usize;
        if used as u64 > ACPI_TABLES_SIZE {
            return Err(AcpiError::TooBig(used));
        }
        let fadt = fadt(dsdt_addr);
        let mut xsdt = XSDT::new(OEM_ID, *b"HYPEXSDT", OEM_REVISION);
        xsdt.add_entry(fadt_addr);
        xsdt.add_entry(madt_addr);
        let xsdt = aml_bytes(&xsdt);
        debug_assert_eq!(xsdt.len(), 36 + 16);
        let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
        let t = |signature, addr, bytes| Table {
            signature,
            addr,
            bytes,
        };
        Ok(AcpiTables {
            tables: vec![
                t("RSDP", rsdp_addr, rsdp),
                t("XSDT", xsdt_addr, xsdt),
                t("FACP", fadt_addr, fadt),
                t("APIC", madt_addr, madt),
                t("DSDT", dsdt_addr, dsdt),
            ],
        })
    }

    /// The RSDP's guest physical address (what the boot protocols hand to the kernel).
    pub fn rsdp_addr(&self) -> u64 {
        ACPI_TABLES_ADDR
    }

    /// The tables, RSDP first.
    pub fn tables(&self) -> &[Table] {
        &self.tables
    }

    /// The table with `signature`, if any.
    pub fn get(&self, signature: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.signature == signature)
    }

    /// Writes every table into guest memory.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<(), AcpiError> {
        for t in &self.tables {
            mem.write_slice(&t.bytes, GuestAddress(t.addr))
                .map_err(AcpiError::Write)?;
        }
        Ok(())
    }

    /// Writes every table to `dir` as `<signature>.dat` (lower case, the names `acpixtract`
    /// gives them: `iasl -d dsdt.dat`, `acpiexec *.dat`).
    pub fn dump(&self, dir: &Path) -> Result<(), AcpiError> {
        std::fs::create_dir_all(dir).map_err(|e| AcpiError::DumpDir(dir.to_owned(), e))?;
        for t in &self.tables {
            let path = dir.join(format!("{}.dat", t.signature.to_ascii_lowercase()));
            std::fs::write(&path, &t.bytes).map_err(|e| AcpiError::DumpFile(path.clone(), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// Checks every table's checksum, length field and the pointers between them.
    pub(crate) fn check_consistent(t: &AcpiTables) {
        let rsdp = &t.get("RSDP").unwrap().bytes;
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp.len(), 36);
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(rsdp, 20) as usize, rsdp.len());
        let xsdt = t.get("XSDT").unwrap();
        assert_eq!(u64_at(rsdp, 24), xsdt.addr);
        for table in &t.tables()[1..] {
            let b = &table.bytes;
            assert_eq!(&b[..4], table.signature.as_bytes());
            assert_eq!(u32_at(b, 4) as usize, b.len(), "{} length", table.signature);
            assert_eq!(sum(b), 0, "{} checksum", table.signature);
            assert_eq!(&b[10..16], &OEM_ID);
            assert_eq!(table.addr % 8, 0);
        }
        let x = &xsdt.bytes;
        let entries: Vec<u64> = (36..x.len()).step_by(8).map(|o| u64_at(x, o)).collect();
        assert_eq!(
            entries,
            vec![t.get("FACP").unwrap().addr, t.get("APIC").unwrap().addr]
        );
        let f = &t.get("FACP").unwrap().bytes;
        assert_eq!(u64_at(f, 140), t.get("DSDT").unwrap().addr, "X_DSDT");
        // tables do not overlap and stay in their area
        let mut spans: Vec<(u64, u64)> = t
            .tables()
            .iter()
            .map(|t| (t.addr, t.addr + t.bytes.len() as u64))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0);
        }
        assert!(spans[0].0 >= ACPI_TABLES_ADDR);
        assert!(spans[spans.len() - 1].1 <= ACPI_TABLES_ADDR + ACPI_TABLES_SIZE);
    }

    #[test]
    fn tables_are_consistent_for_all_sizes() {
        for cpus in [1u8, 2, 8, 254] {
            for devices in [0usize, 1, crate::virtio::MAX_DEVICES] {
                let t = AcpiTables::build(&Machine::for_vm(cpus, devices)).unwrap();
                check_consistent(&t);
            }
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_power_registers() {
        let t = AcpiTables::build(&Machine::for_vm(1, 0)).unwrap();
        let f = &t.get("FACP").unwrap().bytes;
        assert_eq!(f.len(), 276, "ACPI 6.x FADT");
        assert_eq!(f[8], 6, "major revision");
        let flags = u32_at(f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // RESET_REG: system I/O, 8 bits, at the power device's reset port; RESET_VALUE.
        assert_eq!(&f[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(f, 120), u64::from(power::RESET_PORT));
        assert_eq!(f[128], power::RESET_VALUE);
        // SLEEP_CONTROL_REG and SLEEP_STATUS_REG.
        assert_eq!(&f[244..248], &[1, 8, 0, 1]);
        assert_eq!(u64_at(f, 248), u64::from(power::SLEEP_CONTROL_PORT));
        assert_eq!(&f[256..260], &[1, 8, 0, 1]);
        assert_eq!(u64_at(f, 260), u64::from(power::SLEEP_STATUS_PORT));
        // no SCI, no PM1 blocks, no PM timer: hardware-reduced
        assert_eq!(u16::from_le_bytes([f[46], f[47]]), 0, "SCI_INT");
        assert_eq!(u32_at(f, 56), 0, "PM1a_EVT_BLK");
        assert_eq!(u32_at(f, 76), 0, "PM_TMR_BLK");
    }

    #[test]
    fn machine_for_vm_uses_the_transport_layout() {
        let m = Machine::for_vm(2, 3);
        assert_eq!(m.devices.len(), 3);
        assert_eq!(
            m.devices[2],
            MmioDevice {
                base: crate::virtio::device_base(2),
                gsi: crate::virtio::DEVICE_GSIS[2]
            }
        );
        assert_eq!(
            Machine::for_vm(1, 99).devices.len(),
            crate::virtio::MAX_DEVICES
        );
    }

    #[test]
    fn bad_machines_are_errors() {
        assert!(matches!(
            AcpiTables::build(&Machine::for_vm(0, 0)),
            Err(AcpiError::Cpus(0))
        ));
        assert!(matches!(
            AcpiTables::build(&Machine::for_vm(255, 0)),
            Err(AcpiError::Cpus(255))
        ));
        let high = Machine {
            cpus: 1,
            devices: vec![MmioDevice {
                base: 1 << 32,
                gsi: 5,
            }],
            hotplug: vec![],
        };
        assert!(matches!(
            AcpiTables::build(&high),
            Err(AcpiError::DeviceAddress(_))
        ));
    }

    #[test]
    fn dump_writes_one_file_per_table() {
        let dir = std::env::temp_dir().join(format!("hype-acpi-dump-{}", std::process::id()));
        let t = AcpiTables::build(&Machine::for_vm(2, 2)).unwrap();
        t.dump(&dir).unwrap();
        for name in ["rsdp", "xsdt", "facp", "apic", "dsdt"] {
            let b = std::fs::read(dir.join(format!("{name}.dat"))).unwrap();
            let sig = if name == "rsdp" {
                "RSDP"
            } else {
                &name.to_ascii_uppercase()
            };
            assert_eq!(b, t.get(sig).unwrap().bytes);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
