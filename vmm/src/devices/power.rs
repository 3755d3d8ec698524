//! The ACPI power device: the FADT's sleep control/status and reset registers, and the event
//! port of the Generic Event Device (GED) that carries the power button.
//!
//! Four byte-wide I/O ports from [`POWER_PORT_BASE`]:
//!
//! | port | register | guest access |
//! |---|---|---|
//! | 0x600 | sleep control | write `SLP_TYP << 2 \| SLP_EN`: SLP_TYP 5 ([`S5_SLP_TYP`]) powers off |
//! | 0x601 | sleep status  | reads 0; writes (clearing WAK_STS) are ignored |
//! | 0x602 | reset         | write [`RESET_VALUE`]: reset |
//! | 0x603 | GED events    | read: pending event bits, cleared by the read |
//!
//! Everything the guest writes is checked: other values, other sleep types and accesses wider
//! than a byte are handled byte by byte and never do more than the table above says.
//!
//! The host side is [`PowerButton`]: a cheap, cloneable handle whose [`PowerButton::press`]
//! sets the power-button event and raises the GED interrupt ([`GED_GSI`]). The guest's ACPI
//! then runs `_EVT`, reads the event port and notifies its power-button device (Linux: the
//! ACPI button driver, or the tiny power button driver that signals init).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use super::IrqLine;

/// First port of the device.
pub const POWER_PORT_BASE: u16 = 0x600;
/// Number of ports.
pub const POWER_PORTS: u16 = 4;
/// FADT SLEEP_CONTROL_REG.
pub const SLEEP_CONTROL_PORT: u16 = POWER_PORT_BASE;
/// FADT SLEEP_STATUS_REG.
pub const SLEEP_STATUS_PORT: u16 = POWER_PORT_BASE + 1;
/// FADT RESET_REG.
pub const RESET_PORT: u16 = POWER_PORT_BASE + 2;
/// The GED's event register (an I/O OperationRegion in the DSDT).
pub const GED_EVENT_PORT: u16 = POWER_PORT_BASE + 3;
/// FADT RESET_VALUE.
pub const RESET_VALUE: u8 = 0x01;
/// SLP_TYP of S5 (soft off), as `_S5_` in the DSDT says.
pub const S5_SLP_TYP: u8 = 5;
/// SLP_EN bit of the sleep control register.
pub const SLP_EN: u8 = 1 << 5;
/// Interrupt of the GED (an IOAPIC pin no ISA device uses; edge, active high).
pub const GED_GSI: u32 = 16;
/// GED event bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;
/// GED event bit: a hot-plug slot changed (the DSDT's `_EVT` then reads the slot registers).
pub const GED_EVENT_HOTPLUG: u8 = 1 << 1;

/// What a guest write asks the VMM to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerAction {
    /// Nothing.
    None,
    /// S5: the guest switched itself off.
    PowerOff,
    /// The guest wrote the reset value to the reset register.
    Reset,
}

/// [`PowerButton::press`] failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PowerButtonError {
    /// No running VM has an ACPI power device for this button (the VM has not started yet,
    /// has ended, or uses the `mptable` platform).
    #[error("no running ACPI guest is attached to this power button")]
    NotAttached,
}

#[derive(Default)]
struct ButtonState {
    pending: AtomicU8,
    presses: AtomicU64,
    irq: Mutex<Option<Box<dyn IrqLine>>>,
}

/// The host's power button of one VM. Clone it freely; every clone presses the same button.
///
/// ```
/// use hype_vmm::devices::power::PowerButton;
/// let button = PowerButton::new();
/// // Give `button.clone()` to the VM (`vm::run_with`), keep `button` for the control API:
/// assert!(button.press().is_err()); // no VM attached yet
/// ```
#[derive(Clone, Default)]
pub struct PowerButton {
    state: Arc<ButtonState>,
}

impl std::fmt::Debug for PowerButton {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerButton")
            .field("attached", &self.is_attached())
            .field("presses", &self.presses())
            .finish()
    }
}

impl PowerButton {
    /// A button not yet attached to a VM.
    pub fn new() -> Self {
        Self::default()
    }

    /// Presses the button: sets the power-button event and raises the GED interrupt. Whether
    /// the guest reacts (and how fast) is up to the guest; a guest that ignores it keeps
    /// running. Pressing again before the guest has read the event raises the interrupt again.
    pub fn press(&self) -> Result<(), PowerButtonError> {
        let irq = self
            .state
            .irq
            .lock()
            .map_err(|_| PowerButtonError::NotAttached)?;
        let Some(irq) = irq.as_ref() else {
            return Err(PowerButtonError::NotAttached);
        };
        self.state
            .pending
            .fetch_or(GED_EVENT_POWER_BUTTON, Ordering::SeqCst);
        self.state.presses.fetch_add(1, Ordering::Relaxed);
        irq.trigger();
        Ok(())
    }

    /// Sets `events` in the GED's event register and raises its interrupt (nothing when no VM
    /// is attached).
    fn raise(&self, events: u8) {
        let Ok(irq) = self.state.irq.lock() else {
            return;
        };
        if let Some(irq) = irq.as_ref() {
            self.state.pending.fetch_or(events, Ordering::SeqCst);
            irq.trigger();
        }
    }

    /// The line the hot-plug slot registers raise: it sets [`GED_EVENT_HOTPLUG`] and raises
    /// the GED interrupt ([`crate::devices::hotplug::HotplugSlots::set_notifier`]).
    pub fn hotplug_line(&self) -> GedHotplugLine {
        GedHotplugLine(self.clone())
    }

    /// Whether a running VM's power device is attached.
    pub fn is_attached(&self) -> bool {
        self.state.irq.lock().map(|i| i.is_some()).unwrap_or(false)
    }

    /// How often [`press`](Self::press) raised the interrupt.
    pub fn presses(&self) -> u64 {
        self.state.presses.load(Ordering::Relaxed)
    }

    /// The GED events set and not yet read by the guest (for a snapshot).
    pub fn pending_events(&self) -> u8 {
        self.state.pending.load(Ordering::SeqCst)
    }

    /// Sets GED events a snapshot recorded as not yet read by the guest, without raising the
    /// interrupt again (the restored interrupt controllers hold where it stood). Unknown bits
    /// are ignored.
    pub fn restore_events(&self, events: u8) {
        self.state.pending.fetch_or(
            events & (GED_EVENT_POWER_BUTTON | GED_EVENT_HOTPLUG),
            Ordering::SeqCst,
        );
    }

    fn attach(&self, irq: Box<dyn IrqLine>) {
        if let Ok(mut slot) = self.state.irq.lock() {
            *slot = Some(irq);
        }
        self.state.pending.store(0, Ordering::SeqCst);
    }

    fn detach(&self) {
        if let Ok(mut slot) = self.state.irq.lock() {
            *slot = None;
        }
    }

    fn take_events(&self) -> u8 {
        self.state.pending.swap(0, Ordering::SeqCst)
    }
}

/// The GED's hot-plug event, as an interrupt line for the slot registers.
pub struct GedHotplugLine(PowerButton);

impl IrqLine for GedHotplugLine {
    fn trigger(&self) {
        self.0.raise(GED_EVENT_HOTPLUG);
    }
}

/// The guest's side: the registers. Attaches its interrupt to the button while it lives.
pub struct PowerDevice {
    button: PowerButton,
    ignored_writes: AtomicU64,
}

impl PowerDevice {
    /// A device raising `irq` (the GED's GSI) when `button` is pressed.
    pub fn new(button: PowerButton, irq: Box<dyn IrqLine>) -> Self {
        button.attach(irq);
        PowerDevice {
            button,
            ignored_writes: AtomicU64::new(0),
        }
    }

    /// Whether `port` is one of this device's.
    pub fn claims(port: u16) -> bool {
        (POWER_PORT_BASE..POWER_PORT_BASE + POWER_PORTS).contains(&port)
    }

    /// Guest writes that did nothing (unknown values, unsupported sleep states).
    pub fn ignored_writes(&self) -> u64 {
        self.ignored_writes.load(Ordering::Relaxed)
    }

    fn read_byte(&self, port: u16) -> u8 {
        match port {
            GED_EVENT_PORT => self.button.take_events(),
            SLEEP_CONTROL_PORT | SLEEP_STATUS_PORT | RESET_PORT => 0,
            _ => 0xff,
        }
    }

    fn write_byte(&self, port: u16, value: u8) -> PowerAction {
        let action = match port {
            SLEEP_CONTROL_PORT if value & SLP_EN != 0 && (value >> 2) & 7 == S5_SLP_TYP => {
                PowerAction::PowerOff
            }
            RESET_PORT if value == RESET_VALUE => PowerAction::Reset,
            // Clearing WAK_STS, or SLP_TYP without SLP_EN (written first by some OSes).
            SLEEP_STATUS_PORT => return PowerAction::None,
            SLEEP_CONTROL_PORT if value & SLP_EN == 0 => return PowerAction::None,
            _ => PowerAction::None,
        };
        if action == PowerAction::None {
            let n = self
                .ignored_writes
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            // A guest can loop on these: rate-limited like every guest-triggered line.
            if hype_base::log_limit::should_log(n, 10) {
                log::debug!("power device: ignored write #{n}: {value:#x} to port {port:#x}");
            }
        }
        action
    }

    /// Guest `in` at `port` (each byte of a wider access reads the port it covers).
    pub fn read(&self, port: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match port.checked_add(i as u16) {
                Some(p) if Self::claims(p) => self.read_byte(p),
                _ => 0xff,
            };
        }
    }

    /// Guest `out` at `port`; returns the first action any byte asked for.
    pub fn write(&self, port: u16, data: &[u8]) -> PowerAction {
        let mut action = PowerAction::None;
        for (i, &v) in data.iter().enumerate() {
            let Some(p) = port.checked_add(i as u16).filter(|p| Self::claims(*p)) else {
                break;
            };
            let a = self.write_byte(p, v);
            if action == PowerAction::None {
                action = a;
            }
        }
        action
    }
}

impl Drop for PowerDevice {
    fn drop(&mut self) {
        self.button.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct CountingIrq(Arc<AtomicUsize>);
    impl IrqLine for CountingIrq {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn device() -> (PowerDevice, PowerButton, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let button = PowerButton::new();
        let dev = PowerDevice::new(button.clone(), Box::new(CountingIrq(count.clone())));
        (dev, button, count)
    }

    #[test]
    fn pending_events_survive_a_snapshot_without_a_second_interrupt() {
        let (d, button, count) = device();
        button.press().unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let saved = button.pending_events();
        assert_eq!(saved, GED_EVENT_POWER_BUTTON);
        drop(d);
        // The restored VM: a new device (attaching clears the events), then the saved ones.
        let (d2, button2, count2) = device();
        button2.restore_events(saved | GED_EVENT_HOTPLUG | 0x80);
        assert_eq!(count2.load(Ordering::SeqCst), 0);
        let mut b = [0u8; 1];
        d2.read(GED_EVENT_PORT, &mut b);
        assert_eq!(b, [GED_EVENT_POWER_BUTTON | GED_EVENT_HOTPLUG]);
        d2.read(GED_EVENT_PORT, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let (d, _, _) = device();
        assert_eq!(
            d.write(SLEEP_CONTROL_PORT, &[(S5_SLP_TYP << 2) | SLP_EN]),
            PowerAction::PowerOff
        );
        assert_eq!(d.write(RESET_PORT, &[RESET_VALUE]), PowerAction::Reset);
        assert_eq!(d.ignored_writes(), 0);
    }

    #[test]
    fn other_writes_do_nothing() {
        let (d, _, _) = device();
        // SLP_TYP 5 without SLP_EN, other sleep types, clearing WAK_STS, other reset values
        assert_eq!(
            d.write(SLEEP_CONTROL_PORT, &[S5_SLP_TYP << 2]),
            PowerAction::None
        );
        for typ in [0u8, 1, 2, 3, 4, 6, 7] {
            assert_eq!(
                d.write(SLEEP_CONTROL_PORT, &[(typ << 2) | SLP_EN]),
                PowerAction::None
            );
        }
        assert_eq!(d.write(SLEEP_STATUS_PORT, &[0x80]), PowerAction::None);
        for v in (0..=255u8).filter(|v| *v != RESET_VALUE) {
            assert_eq!(d.write(RESET_PORT, &[v]), PowerAction::None);
        }
        assert_eq!(d.write(GED_EVENT_PORT, &[0xff]), PowerAction::None);
        assert_eq!(d.write(SLEEP_CONTROL_PORT, &[]), PowerAction::None);
        assert!(d.ignored_writes() > 250);
    }

    #[test]
    fn wide_and_odd_accesses_are_bounded() {
        let (d, button, _) = device();
        // A 4-byte write at the base covers all four registers: byte 2 is the reset register.
        assert_eq!(
            d.write(POWER_PORT_BASE, &[0, 0, RESET_VALUE, 0]),
            PowerAction::Reset
        );
        // Bytes past the device are dropped, not wrapped around.
        assert_eq!(
            d.write(GED_EVENT_PORT, &[0, RESET_VALUE]),
            PowerAction::None
        );
        assert_eq!(d.write(u16::MAX, &[RESET_VALUE; 4]), PowerAction::None);
        button.press().unwrap();
        let mut b = [0u8; 4];
        d.read(POWER_PORT_BASE, &mut b);
        assert_eq!(b, [0, 0, 0, GED_EVENT_POWER_BUTTON]);
        let mut b = [0u8; 4];
        d.read(GED_EVENT_PORT, &mut b);
        assert_eq!(b, [0, 0xff, 0xff, 0xff]);
        let mut b = [0u8; 2];
        d.read(u16::MAX, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn button_raises_the_interrupt_and_the_event_reads_once() {
        let (d, button, count) = device();
        assert!(button.is_attached());
        button.press().unwrap();
        button.clone().press().unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 2);
        assert_eq!(button.presses(), 2);
        let mut b = [0u8];
        d.read(GED_EVENT_PORT, &mut b);
        assert_eq!(b[0], GED_EVENT_POWER_BUTTON);
        d.read(GED_EVENT_PORT, &mut b);
        assert_eq!(b[0], 0, "reading clears the event");
    }

    #[test]
    fn button_without_a_vm_is_an_error() {
        let button = PowerButton::new();
        assert_eq!(button.press(), Err(PowerButtonError::NotAttached));
        let (d, button, _) = device();
        drop(d);
        assert!(!button.is_attached());
        assert_eq!(button.press(), Err(PowerButtonError::NotAttached));
    }
}
