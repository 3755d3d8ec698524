//! The MADT ("APIC" table): one enabled local APIC per vCPU, the IOAPIC, interrupt source
//! overrides for the ISA interrupts hype uses, and LINT1 as NMI on every CPU.
//!
//! The routing matches KVM's default GSI routing (ISA IRQ n = IOAPIC pin n) and the MP table
//! of the `mptable` platform, so both platforms wire every interrupt the same way.

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::{aml_as_bytes, Aml, AmlSink};
use zerocopy::{Immutable, IntoBytes};

use super::{aml_bytes, AcpiError, OEM_ID, OEM_REVISION};
use crate::devices::serial::COM1_IRQ;
use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR};

/// Most vCPUs the MADT describes: APIC IDs 0..=253 (8-bit local APIC entries; the IOAPIC takes
/// the next ID, 255 is the broadcast ID).
pub const MAX_CPUS: u8 = 254;

/// MPS INTI flags: polarity active high (01), trigger mode edge (01 << 2).
pub const INTI_EDGE_ACTIVE_HIGH: u16 = 0b0101;

/// Interrupt Source Override (MADT structure type 2, 10 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, Immutable)]
pub struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl InterruptSourceOverride {
    /// ISA IRQ `source` arrives on `gsi` with `flags` (MPS INTI flags).
    pub fn new(source: u8, gsi: u32, flags: u16) -> Self {
        InterruptSourceOverride {
            r#type: 2,
            length: 10,
            bus: 0, // ISA
            source,
            gsi,
            flags,
        }
    }
}

aml_as_bytes!(InterruptSourceOverride);

/// Local APIC NMI (MADT structure type 4, 6 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, Immutable)]
pub struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: u16,
    lint: u8,
}

impl LocalApicNmi {
    /// NMI on `lint` (0 or 1) of every processor (UID 0xff).
    pub fn all_processors(lint: u8) -> Self {
        LocalApicNmi {
            r#type: 4,
            length: 6,
            processor_uid: 0xff,
            flags: 0, // conforms to the bus: edge, active high
            lint,
        }
    }
}

aml_as_bytes!(LocalApicNmi);

/// ISA IRQs that get an explicit identity override (edge, active high): the PIT (0), COM1, and
/// every ISA IRQ a virtio device may use. An explicit entry leaves the guest nothing to guess.
pub fn overridden_irqs() -> Vec<u8> {
    let mut irqs = vec![0u8, COM1_IRQ as u8];
    irqs.extend(
        crate::virtio::DEVICE_GSIS
            .iter()
            .filter(|&&g| g < 16)
            .map(|&g| g as u8),
    );
    irqs.sort_unstable();
    irqs.dedup();
    irqs
}

/// Builds the MADT for `cpus` vCPUs.
pub fn build(cpus: u8) -> Result<Vec<u8>, AcpiError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(AcpiError::Cpus(cpus));
    }
    let mut madt = MADT::new(
        OEM_ID,
        *b"HYPEAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(cpus, IOAPIC_ADDR as u32, 0));
    for irq in overridden_irqs() {
        madt.add_structure(InterruptSourceOverride::new(
            irq,
            u32::from(irq),
            INTI_EDGE_ACTIVE_HIGH,
        ));
    }
    madt.add_structure(LocalApicNmi::all_processors(1));
    Ok(aml_bytes(&madt))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (type, bytes) of every structure after the 44-byte header.
    fn structures(b: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut o = 44;
        while o < b.len() {
            let len = b[o + 1] as usize;
            assert!(len >= 2 && o + len <= b.len(), "structure at {o} overruns");
            out.push((b[o], b[o + 2..o + len].to_vec()));
            o += len;
        }
        out
    }

    fn check(cpus: u8) {
        let b = build(cpus).unwrap();
        assert_eq!(&b[..4], b"APIC");
        assert_eq!(
            u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        assert_eq!(
            u32::from_le_bytes(b[36..40].try_into().unwrap()),
            LAPIC_ADDR as u32
        );
        let s = structures(&b);
        let lapics: Vec<&Vec<u8>> = s.iter().filter(|(t, _)| *t == 0).map(|(_, d)| d).collect();
        assert_eq!(lapics.len(), usize::from(cpus));
        for (i, d) in lapics.iter().enumerate() {
            // processor UID, APIC ID, flags = enabled
            assert_eq!(d.as_slice(), &[i as u8, i as u8, 1, 0, 0, 0]);
        }
        let ioapics: Vec<&Vec<u8>> = s.iter().filter(|(t, _)| *t == 1).map(|(_, d)| d).collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0][0], cpus, "IOAPIC ID follows the APIC IDs");
        assert_eq!(
            u32::from_le_bytes(ioapics[0][2..6].try_into().unwrap()),
            IOAPIC_ADDR as u32
        );
        assert_eq!(u32::from_le_bytes(ioapics[0][6..10].try_into().unwrap()), 0);
        let isos: Vec<&Vec<u8>> = s.iter().filter(|(t, _)| *t == 2).map(|(_, d)| d).collect();
        assert_eq!(isos.len(), overridden_irqs().len());
        for d in &isos {
            let src = d[1];
            assert_eq!(d[0], 0, "ISA bus");
            assert_eq!(
                u32::from_le_bytes(d[2..6].try_into().unwrap()),
                u32::from(src)
            );
            assert_eq!(u16::from_le_bytes([d[6], d[7]]), INTI_EDGE_ACTIVE_HIGH);
        }
        let nmis: Vec<&Vec<u8>> = s.iter().filter(|(t, _)| *t == 4).map(|(_, d)| d).collect();
        assert_eq!(nmis, vec![&vec![0xff, 0, 0, 1]]);
        assert_eq!(s.len(), usize::from(cpus) + 1 + isos.len() + 1);
    }

    #[test]
    fn madt_for_1_2_8_and_254_cpus() {
        for cpus in [1, 2, 8, 254] {
            check(cpus);
        }
    }

    #[test]
    fn overrides_cover_com1_and_every_virtio_isa_irq() {
        let irqs = overridden_irqs();
        assert!(irqs.contains(&0) && irqs.contains(&4));
        for g in crate::virtio::DEVICE_GSIS {
            assert!(irqs.contains(&(g as u8)));
        }
        assert!(!irqs.contains(&2), "IRQ 2 is the cascade");
    }

    #[test]
    fn cpu_count_bounds() {
        assert!(matches!(build(0), Err(AcpiError::Cpus(0))));
        assert!(matches!(build(255), Err(AcpiError::Cpus(255))));
    }
}
