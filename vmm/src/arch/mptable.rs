//! Intel MultiProcessor Specification 1.4 tables: how the guest learns its CPUs, IOAPIC and
//! interrupt routing without ACPI.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR, MPTABLE_MAX_SIZE};
use crate::memory::GuestMemoryMmap;

/// Most vCPUs an MP table can describe here (APIC IDs 0..=253, IOAPIC gets the next ID).
pub const MAX_CPUS: u8 = 254;
/// Number of legacy ISA IRQs routed through the IOAPIC.
pub const ISA_IRQS: u8 = 16;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const ISA_BUS_ID: u8 = 0;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Too many vCPUs for the table.
    #[error("{0} vCPUs do not fit in an MP table (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    /// Writing into guest memory failed.
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer and configuration table as they are laid out at `base`.
pub fn build(
    num_cpus: u8,
    cpu_signature: u32,
    cpu_features: u32,
    base: u64,
) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let config_addr = base + 16;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..num_cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&cpu_signature.to_le_bytes());
        entries.extend_from_slice(&cpu_features.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic_id = num_cpus;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n is wired to IOAPIC pin n, as KVM's default GSI routing does.
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            ISA_BUS_ID,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // LINT0 of every local APIC is ExtINT (the 8259), LINT1 is NMI.
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        ISA_BUS_ID,
        0,
        0xff,
        0,
    ]);
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        ISA_BUS_ID,
        0,
        0xff,
        1,
    ]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"HYPE    ");
    header.extend_from_slice(b"HYPE VM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0);
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut fp = Vec::with_capacity(16 + table_len);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(config_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp[..16]);
    fp.extend_from_slice(&header);
    Ok(fp)
}

/// Writes the MP table at [`MPTABLE_ADDR`].
pub fn write(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    cpu_signature: u32,
    cpu_features: u32,
) -> Result<(), MpTableError> {
    let table = build(num_cpus, cpu_signature, cpu_features, MPTABLE_ADDR)?;
    debug_assert!(table.len() as u64 <= MPTABLE_MAX_SIZE);
    mem.write_slice(&table, GuestAddress(MPTABLE_ADDR))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_are_zero() {
        for cpus in [1u8, 2, 8, 254] {
            let t = build(cpus, 0x806f8, 0x178bfbff, MPTABLE_ADDR).unwrap();
            assert_eq!(sum(&t[..16]), 0, "floating pointer, {cpus} cpus");
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(len, t.len() - 16);
            assert_eq!(sum(&t[16..]), 0, "config table, {cpus} cpus");
            assert!(t.len() as u64 <= MPTABLE_MAX_SIZE);
        }
    }

    #[test]
    fn contents_describe_cpus_ioapic_and_irqs() {
        let t = build(4, 0x806f8, 0x1234, MPTABLE_ADDR).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64,
            MPTABLE_ADDR + 16
        );
        let cfg = &t[16..];
        assert_eq!(&cfg[..4], b"PCMP");
        let count = u16::from_le_bytes([cfg[34], cfg[35]]);
        assert_eq!(count, 4 + 1 + 1 + 16 + 2);
        assert_eq!(
            u32::from_le_bytes(cfg[36..40].try_into().unwrap()) as u64,
            LAPIC_ADDR
        );
        let mut off = 44;
        let mut cpus = vec![];
        let mut irqs = vec![];
        let mut ioapic = None;
        let mut lints = vec![];
        for _ in 0..count {
            match cfg[off] {
                ENTRY_PROCESSOR => {
                    cpus.push((cfg[off + 1], cfg[off + 3]));
                    off += 20;
                }
                ENTRY_BUS => {
                    assert_eq!(&cfg[off + 2..off + 8], b"ISA   ");
                    off += 8;
                }
                ENTRY_IOAPIC => {
                    ioapic = Some((
                        cfg[off + 1],
                        u32::from_le_bytes(cfg[off + 4..off + 8].try_into().unwrap()),
                    ));
                    off += 8;
                }
                ENTRY_IO_INTERRUPT => {
                    irqs.push((cfg[off + 5], cfg[off + 6], cfg[off + 7]));
                    off += 8;
                }
                ENTRY_LOCAL_INTERRUPT => {
                    lints.push((cfg[off + 1], cfg[off + 7]));
                    off += 8;
                }
                t => panic!("unexpected entry type {t}"),
            }
        }
        assert_eq!(off, cfg.len());
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(ioapic, Some((4, IOAPIC_ADDR as u32)));
        assert_eq!(irqs.len(), 16);
        assert!(irqs.iter().all(|(src, apic, pin)| src == pin && *apic == 4));
        assert_eq!(lints, vec![(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)]);
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert!(build(0, 0, 0, MPTABLE_ADDR).is_err());
        assert!(build(255, 0, 0, MPTABLE_ADDR).is_err());
    }
}
