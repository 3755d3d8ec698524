//! The DSDT: the devices a hardware-reduced ACPI guest cannot discover on its own.
//!
//! ```text
//! \_S5_                 Package { 5, 0 }: SLP_TYP 5 for soft-off (the power device's value)
//! \_SB_.COM1            PNP0501: I/O 0x3f8-0x3ff, IRQ 4
//! \_SB_.VRnn            LNRO0005 (virtio-mmio), _UID nn: 4 KiB window, its GSI (edge, high)
//! \_SB_.VRnn            hot-plug slot n (after the boot devices): LNRO0005 with _CID PRP0001
//!                       and a _DSD `compatible = "virtio,mmio"`, its window and GSI in _CRS,
//!                       _STA from the slot's bit in PRES, _EJ0 writes n to EJCT
//! \_SB_.HPRG            SystemIO OperationRegion on the hot-plug slot registers
//!                       (devices::hotplug): fields PRES, INSR, REMV, EJCT
//! \_SB_.PWRB            PNP0C0C: the power button
//! \_SB_.GED0            ACPI0013 (Generic Event Device): GSI power::GED_GSI; _EVT reads the
//!                       event port; power-button bit: Notify(PWRB, 0x80); hot-plug bit: reads
//!                       INSR and REMV and, per slot, Notify(VRnn, 1) (DEVICE_CHECK) for one
//!                       just filled and Notify(VRnn, 3) (EJECT_REQUEST) for one to release
//! ```
//! Every boot device has `_STA` 0x0F (present, enabled, shown, functioning).
//!
//! Why a hot-plug slot carries `_CID "PRP0001"`: Linux 6.1 acts on DEVICE_CHECK and
//! EJECT_REQUEST only for device objects that a scan handler claims (`acpi_scan_init_hotplug`
//! sets `hotplug_notify` only then); no handler claims LNRO0005, the generic PRP0001 handler is
//! always there, and with the `compatible` property it creates the platform device that
//! virtio-mmio binds. That handler has ejection disabled, so a 6.1 guest releases a slot by
//! unbinding its driver (the VMM notices the driver let go, see `crate::hotplug`).

use acpi_tables::aml::{
    And, Device, EISAName, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If,
    Interrupt, Local, Memory32Fixed, Method, Name, Notify, OpRegion, OpRegionSpace, Package, Path,
    ResourceTemplate, Return, Scope, Store, Uuid, Zero, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{AcpiError, MmioDevice, OEM_ID, OEM_REVISION};
use crate::devices::hotplug::{HOTPLUG_PORTS, HOTPLUG_PORT_BASE};
use crate::devices::power;
use crate::devices::serial::{COM1_BASE, COM1_IRQ};
use crate::layout::VIRTIO_MMIO_SIZE;

/// Most virtio-mmio devices the DSDT can name (`VR00`..`VRFF`).
pub const MAX_DEVICES: usize = 256;
/// IOAPIC pins: every GSI must be below this.
pub const IOAPIC_PINS: u32 = 24;
/// `_STA` of a present, working device.
pub const STA_PRESENT: u8 = 0x0f;
/// DSDT revision 2: integers are 64-bit.
const DSDT_REVISION: u8 = 2;

/// The ACPI name of virtio-mmio device `index` (`VR00`, `VR01`, ...).
pub fn device_name(index: usize) -> String {
    format!("VR{index:02X}")
}

fn com1() -> Vec<u8> {
    let io = IO::new(COM1_BASE, COM1_BASE, 1, 8);
    let irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    let hid = EISAName::new("PNP0501");
    let mut v = Vec::new();
    Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_STA".into(), &STA_PRESENT),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(&mut v);
    v
}

fn virtio(index: usize, d: &MmioDevice) -> Result<Vec<u8>, AcpiError> {
    let base = check_window(d)?;
    let mem = Memory32Fixed::new(true, base, VIRTIO_MMIO_SIZE as u32);
    let irq = Interrupt::new(true, true, false, false, d.gsi);
    let crs = ResourceTemplate::new(vec![&mem, &irq]);
    let uid = index as u32;
    let name = device_name(index);
    let mut v = Vec::new();
    Device::new(
        name.as_str().into(),
        vec![
            &Name::new("_HID".into(), &"LNRO0005"),
            &Name::new("_UID".into(), &uid),
            &Name::new("_STA".into(), &STA_PRESENT),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(&mut v);
    Ok(v)
}

/// The UUID of device properties in `_DSD` (ACPI's "Device Properties UUID").
const DSD_PROPERTIES_UUID: &str = "daffd814-6eba-4d8c-8a91-bc9bbf4aa301";

fn check_window(d: &MmioDevice) -> Result<u32, AcpiError> {
    let base = u32::try_from(d.base).map_err(|_| AcpiError::DeviceAddress(d.base))?;
    if base.checked_add(VIRTIO_MMIO_SIZE as u32 - 1).is_none() {
        return Err(AcpiError::DeviceAddress(d.base));
    }
    if d.gsi >= IOAPIC_PINS {
        return Err(AcpiError::DeviceGsi(d.gsi));
    }
    Ok(base)
}

/// The OperationRegion on the hot-plug slot registers and its four fields.
fn hotplug_registers() -> Vec<u8> {
    let port = u32::from(HOTPLUG_PORT_BASE);
    let len = u32::from(HOTPLUG_PORTS);
    let region = OpRegion::new("HPRG".into(), OpRegionSpace::SystemIO, &port, &len);
    let field = Field::new(
        "HPRG".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PRES", 32),
            FieldEntry::Named(*b"INSR", 32),
            FieldEntry::Named(*b"REMV", 32),
            FieldEntry::Named(*b"EJCT", 32),
        ],
    );
    let mut v = Vec::new();
    region.to_aml_bytes(&mut v);
    field.to_aml_bytes(&mut v);
    v
}

/// Hot-plug slot `index` (`VRnn`, the name a boot device in that window would have).
fn slot(index: usize, d: &MmioDevice) -> Result<Vec<u8>, AcpiError> {
    let base = check_window(d)?;
    let mem = Memory32Fixed::new(true, base, VIRTIO_MMIO_SIZE as u32);
    let irq = Interrupt::new(true, true, false, false, d.gsi);
    let crs = ResourceTemplate::new(vec![&mem, &irq]);
    let uid = index as u32;
    let bit = 1u32 << index;
    let name = device_name(index);
    // _DSD: Package { ToUUID(properties), Package { Package { "compatible", "virtio,mmio" } } }
    let uuid = Uuid::new(DSD_PROPERTIES_UUID);
    let compatible = Package::new(vec![&"compatible", &"virtio,mmio"]);
    let props = Package::new(vec![&compatible]);
    let dsd = Package::new(vec![&uuid, &props]);
    // _STA: If (PRES & bit) { Return (0x0F) } Return (0)
    let pres = Path::new("\\_SB_.PRES");
    let present = And::new(&Zero {}, &pres, &bit);
    let ret_present = Return::new(&STA_PRESENT);
    let if_present = If::new(&present, vec![&ret_present]);
    let ret_absent = Return::new(&Zero {});
    let sta = Method::new("_STA".into(), 0, false, vec![&if_present, &ret_absent]);
    // _EJ0 (Arg0): EJCT = index
    let ejct = Path::new("\\_SB_.EJCT");
    let eject = Store::new(&ejct, &uid);
    let ej0 = Method::new("_EJ0".into(), 1, true, vec![&eject]);
    let mut v = Vec::new();
    Device::new(
        name.as_str().into(),
        vec![
            &Name::new("_HID".into(), &"LNRO0005"),
            &Name::new("_CID".into(), &"PRP0001"),
            &Name::new("_UID".into(), &uid),
            &Name::new("_DSD".into(), &dsd),
            &Name::new("_CRS".into(), &crs),
            &sta,
            &ej0,
        ],
    )
    .to_aml_bytes(&mut v);
    Ok(v)
}

fn power_button() -> Vec<u8> {
    let hid = EISAName::new("PNP0C0C");
    let mut v = Vec::new();
    Device::new(
        "PWRB".into(),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_STA".into(), &STA_PRESENT),
        ],
    )
    .to_aml_bytes(&mut v);
    v
}

fn ged(first_slot: usize, slots: usize) -> Vec<u8> {
    let irq = Interrupt::new(true, true, false, false, power::GED_GSI);
    let crs = ResourceTemplate::new(vec![&irq]);
    let port = u32::from(power::GED_EVENT_PORT);
    let region = OpRegion::new("GDST".into(), OpRegionSpace::SystemIO, &port, &1u8);
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 8)],
    );
    // Local0 = GDAT (reading it clears the pending events); if Local0 & 1: Notify(PWRB, 0x80).
    let gdat = Path::new("GDAT");
    let read = Store::new(&Local(0), &gdat);
    let bit = And::new(&Zero {}, &Local(0), &power::GED_EVENT_POWER_BUTTON);
    let pwrb = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&pwrb, &0x80u8);
    let on_button = If::new(&bit, vec![&notify]);
    // If Local0 & 2: Local1 = INSR; Local2 = REMV (both reads clear them); then per slot n:
    // If (Local1 & (1 << n)) Notify(VRnn, 1); If (Local2 & (1 << n)) Notify(VRnn, 3).
    let hp_bit = And::new(&Zero {}, &Local(0), &power::GED_EVENT_HOTPLUG);
    let insr = Path::new("\\_SB_.INSR");
    let remv = Path::new("\\_SB_.REMV");
    let read_insr = Store::new(&Local(1), &insr);
    let read_remv = Store::new(&Local(2), &remv);
    let indices: Vec<usize> = (first_slot..first_slot + slots).collect();
    let bits: Vec<u32> = indices.iter().map(|i| 1u32 << i).collect();
    let paths: Vec<Path> = indices
        .iter()
        .map(|i| Path::new(&format!("\\_SB_.{}", device_name(*i))))
        .collect();
    let inserted: Vec<And> = bits
        .iter()
        .map(|b| And::new(&Zero {}, &Local(1), b))
        .collect();
    let removing: Vec<And> = bits
        .iter()
        .map(|b| And::new(&Zero {}, &Local(2), b))
        .collect();
    let device_check: Vec<Notify> = paths.iter().map(|p| Notify::new(p, &1u8)).collect();
    let eject_request: Vec<Notify> = paths.iter().map(|p| Notify::new(p, &3u8)).collect();
    let mut per_slot: Vec<If> = Vec::new();
    for j in 0..indices.len() {
        per_slot.push(If::new(&inserted[j], vec![&device_check[j]]));
        per_slot.push(If::new(&removing[j], vec![&eject_request[j]]));
    }
    let mut hp_body: Vec<&dyn Aml> = vec![&read_insr, &read_remv];
    hp_body.extend(per_slot.iter().map(|i| i as &dyn Aml));
    let on_hotplug = If::new(&hp_bit, hp_body);
    let mut evt_body: Vec<&dyn Aml> = vec![&read, &on_button];
    if slots > 0 {
        evt_body.push(&on_hotplug);
    }
    let evt = Method::new("_EVT".into(), 1, true, evt_body);
    let mut v = Vec::new();
    Device::new(
        "GED0".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_STA".into(), &STA_PRESENT),
            &Name::new("_CRS".into(), &crs),
            &region,
            &field,
            &evt,
        ],
    )
    .to_aml_bytes(&mut v);
    v
}

/// The DSDT for a machine with the boot `devices` (slots 0, 1, ...) and the empty hot-plug
/// slots `hotplug` (numbered on from the boot devices).
pub fn build(devices: &[MmioDevice], hotplug: &[MmioDevice]) -> Result<Vec<u8>, AcpiError> {
    if devices.len() > MAX_DEVICES {
        return Err(AcpiError::Devices(devices.len()));
    }
    let first_slot = devices.len();
    if !hotplug.is_empty() && first_slot + hotplug.len() > crate::devices::hotplug::MAX_SLOTS {
        return Err(AcpiError::Slots(first_slot + hotplug.len()));
    }
    let mut sb = com1();
    for (i, d) in devices.iter().enumerate() {
        sb.extend(virtio(i, d)?);
    }
    if !hotplug.is_empty() {
        sb.extend(hotplug_registers());
    }
    for (j, d) in hotplug.iter().enumerate() {
        sb.extend(slot(first_slot + j, d)?);
    }
    sb.extend(power_button());
    sb.extend(ged(first_slot, hotplug.len()));
    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        *b"HYPEDSDT",
        OEM_REVISION,
    );
    let slp_typ = power::S5_SLP_TYP;
    let s5 = Name::new("_S5_".into(), &Package::new(vec![&slp_typ, &0u8]));
    let mut body = Vec::new();
    s5.to_aml_bytes(&mut body);
    body.extend(Scope::raw("\\_SB_".into(), sb));
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    fn check(n: usize) {
        let m = super::super::Machine::for_vm(1, n);
        let devices = if n > crate::virtio::MAX_DEVICES {
            (0..n)
                .map(|i| MmioDevice {
                    base: crate::virtio::device_base(i),
                    gsi: 5,
                })
                .collect()
        } else {
            m.devices
        };
        let b = build(&devices, &[]).unwrap();
        assert_eq!(&b[..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        assert_eq!(b[8], DSDT_REVISION);
        assert_eq!(contains(&b, b"LNRO0005\0"), n);
        assert_eq!(contains(&b, b"ACPI0013\0"), 1);
        assert_eq!(contains(&b, b"_S5_"), 1);
        for (i, d) in devices.iter().enumerate() {
            assert_eq!(contains(&b, device_name(i).as_bytes()), 1, "{i}");
            // Memory32Fixed(ReadWrite, base, 4 KiB)
            let mut m32 = vec![0x86, 9, 0, 1];
            m32.extend_from_slice(&(d.base as u32).to_le_bytes());
            m32.extend_from_slice(&(VIRTIO_MMIO_SIZE as u32).to_le_bytes());
            assert_eq!(contains(&b, &m32), 1, "window of device {i}");
        }
    }

    #[test]
    fn dsdt_for_0_1_and_max_devices() {
        check(0);
        check(1);
        check(crate::virtio::MAX_DEVICES);
        check(MAX_DEVICES);
    }

    #[test]
    fn device_limits() {
        let d = MmioDevice {
            base: crate::virtio::device_base(0),
            gsi: 5,
        };
        assert!(matches!(
            build(&vec![d; MAX_DEVICES + 1], &[]),
            Err(AcpiError::Devices(n)) if n == MAX_DEVICES + 1
        ));
        let bad_gsi = MmioDevice { gsi: 24, ..d };
        assert!(matches!(
            build(&[bad_gsi], &[]),
            Err(AcpiError::DeviceGsi(24))
        ));
        let wraps = MmioDevice {
            base: 0xffff_f800,
            ..d
        };
        assert!(matches!(
            build(&[wraps], &[]),
            Err(AcpiError::DeviceAddress(_))
        ));
    }

    #[test]
    fn names() {
        assert_eq!(device_name(0), "VR00");
        assert_eq!(device_name(255), "VRFF");
    }
}
