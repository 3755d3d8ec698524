//! The hot-plug slot registers: which virtio-mmio slots hold a device, which were just filled,
//! which the host wants back, and where the guest says it let one go.
//!
//! Four 32-bit I/O registers from [`HOTPLUG_PORT_BASE`], one bit (or index) per slot (slot n
//! is virtio-mmio window n):
//!
//! | port | register | guest access |
//! |---|---|---|
//! | 0x610 | PRESENT  | read: slots holding a device (the slots' `_STA` in ACPI) |
//! | 0x614 | INSERTED | read: slots filled since the last read; the read clears them |
//! | 0x618 | REMOVE   | read: slots the host asks the guest to release; the read clears them |
//! | 0x61c | EJECT    | write a slot index: the guest no longer uses it (ACPI `_EJ0`) |
//!
//! Accesses of any width and offset inside the block are served byte by byte; bytes outside a
//! register read as zero, writes other than to EJECT are ignored. The host side sets and
//! clears slots and waits for ejects; [`HotplugSlots::set_notifier`] names what tells the
//! guest to look (the ACPI GED interrupt).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::IrqLine;

/// First port of the block.
pub const HOTPLUG_PORT_BASE: u16 = 0x610;
/// Number of ports.
pub const HOTPLUG_PORTS: u16 = 16;
/// Offset of PRESENT.
pub const PRESENT: u16 = 0;
/// Offset of INSERTED.
pub const INSERTED: u16 = 4;
/// Offset of REMOVE.
pub const REMOVE: u16 = 8;
/// Offset of EJECT.
pub const EJECT: u16 = 12;
/// Most slots the registers describe.
pub const MAX_SLOTS: usize = 32;

#[derive(Debug, Default)]
struct Regs {
    present: u32,
    inserted: u32,
    remove: u32,
    /// Slots the guest ejected since the host last looked.
    ejected: u32,
}

/// The slot registers of one VM.
#[derive(Default)]
pub struct HotplugSlots {
    regs: Mutex<Regs>,
    ejects: Condvar,
    notifier: Mutex<Option<Box<dyn IrqLine>>>,
}

impl std::fmt::Debug for HotplugSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotplugSlots")
            .field("regs", &*self.lock())
            .finish()
    }
}

fn bit(slot: usize) -> u32 {
    if slot < MAX_SLOTS {
        1 << slot
    } else {
        0
    }
}

impl HotplugSlots {
    /// Registers with no slot present and nothing to notify.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What tells the guest to look at the registers (the GED interrupt).
    pub fn set_notifier(&self, irq: Box<dyn IrqLine>) {
        *self.notifier.lock().unwrap_or_else(|p| p.into_inner()) = Some(irq);
    }

    fn notify(&self) {
        if let Some(irq) = self
            .notifier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            irq.trigger();
        }
    }

    /// Marks `slot` present from the start (a boot device): no insertion event.
    pub fn set_boot_present(&self, slot: usize) {
        self.lock().present |= bit(slot);
    }

    /// Marks `slot` present and tells the guest it was inserted.
    pub fn insert(&self, slot: usize) {
        {
            let mut r = self.lock();
            r.present |= bit(slot);
            r.inserted |= bit(slot);
            r.remove &= !bit(slot);
            r.ejected &= !bit(slot);
        }
        self.notify();
    }

    /// Asks the guest to release `slot`.
    pub fn request_removal(&self, slot: usize) {
        {
            let mut r = self.lock();
            r.remove |= bit(slot);
            r.ejected &= !bit(slot);
        }
        self.notify();
    }

    /// Waits up to `timeout` for the guest to eject `slot`; on success the slot is no longer
    /// present. Returns whether it was ejected.
    pub fn wait_ejected(&self, slot: usize, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut r = self.lock();
        loop {
            if r.ejected & bit(slot) != 0 {
                r.ejected &= !bit(slot);
                r.present &= !bit(slot);
                r.inserted &= !bit(slot);
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Withdrawn: a late eject of this slot is ignored.
                r.remove &= !bit(slot);
                return false;
            }
            r = match self.ejects.wait_timeout(r, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Waits up to `timeout` until the guest ejected `slot` or `released()` says it let the
    /// slot's device go (checked every `poll`); on success the slot is no longer present. On
    /// timeout the removal request is withdrawn. Returns whether it was released.
    pub fn wait_released(
        &self,
        slot: usize,
        timeout: Duration,
        poll: Duration,
        released: impl Fn() -> bool,
    ) -> bool {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if self.wait_ejected_keeping(slot, left.min(poll)) {
                return true;
            }
            if released() {
                let mut r = self.lock();
                r.present &= !bit(slot);
                r.inserted &= !bit(slot);
                r.remove &= !bit(slot);
                return true;
            }
            if left.is_zero() {
                self.lock().remove &= !bit(slot);
                return false;
            }
        }
    }

    /// [`wait_ejected`](Self::wait_ejected) without withdrawing the request on timeout.
    fn wait_ejected_keeping(&self, slot: usize, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut r = self.lock();
        loop {
            if r.ejected & bit(slot) != 0 {
                r.ejected &= !bit(slot);
                r.present &= !bit(slot);
                r.inserted &= !bit(slot);
                r.remove &= !bit(slot);
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            r = match self.ejects.wait_timeout(r, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// The INSERTED register: insertions the guest has not read yet (for a snapshot).
    pub fn pending_inserted(&self) -> u32 {
        self.lock().inserted
    }

    /// Sets insertions a snapshot recorded as unread, for slots that are present, without
    /// notifying the guest again (the restored interrupt controllers hold where the
    /// notification stood).
    pub fn restore_inserted(&self, inserted: u32) {
        let mut r = self.lock();
        r.inserted |= inserted & r.present;
    }

    /// The PRESENT register.
    pub fn present(&self) -> u32 {
        self.lock().present
    }

    /// Guest read at `offset` into the block.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        let mut r = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset.saturating_add(i as u16);
            let (reg, shift) = (off / 4 * 4, u32::from(off % 4) * 8);
            let mask = 0xffu32 << shift;
            let value = match reg {
                PRESENT => r.present,
                INSERTED => {
                    let v = r.inserted;
                    r.inserted &= !mask;
                    v
                }
                REMOVE => {
                    let v = r.remove;
                    r.remove &= !mask;
                    v
                }
                _ => 0,
            };
            *b = ((value & mask) >> shift) as u8;
        }
    }

    /// Guest write at `offset` into the block.
    pub fn write(&self, offset: u16, data: &[u8]) {
        if offset != EJECT {
            return;
        }
        let Some(&slot) = data.first() else {
            return;
        };
        let slot = usize::from(slot);
        let mut r = self.lock();
        // Only a present slot can be ejected; the host acts only on ejects it asked for.
        if r.present & bit(slot) != 0 {
            r.ejected |= bit(slot);
            self.ejects.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    struct Count(Arc<AtomicU32>);
    impl IrqLine for Count {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn read32(s: &HotplugSlots, off: u16) -> u32 {
        let mut b = [0u8; 4];
        s.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn unread_insertions_survive_a_snapshot_without_a_second_notification() {
        let s = HotplugSlots::new();
        s.set_boot_present(0);
        s.insert(1);
        let saved = s.pending_inserted();
        assert_eq!(saved, 0b10);
        // The restored VM: both slots attached as boot devices, then the saved register.
        let r = HotplugSlots::new();
        let n = Arc::new(AtomicU32::new(0));
        r.set_notifier(Box::new(Count(n.clone())));
        r.set_boot_present(0);
        r.set_boot_present(1);
        r.restore_inserted(saved | 0b100); // slot 2 is not present: dropped
        assert_eq!(n.load(Ordering::SeqCst), 0);
        assert_eq!(read32(&r, INSERTED), 0b10);
        assert_eq!(read32(&r, INSERTED), 0);
    }

    #[test]
    fn insert_remove_eject() {
        let s = HotplugSlots::new();
        let n = Arc::new(AtomicU32::new(0));
        s.set_notifier(Box::new(Count(n.clone())));
        s.set_boot_present(0);
        assert_eq!(read32(&s, INSERTED), 0);
        s.insert(3);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert_eq!(read32(&s, PRESENT), 0b1001);
        assert_eq!(read32(&s, INSERTED), 0b1000);
        assert_eq!(read32(&s, INSERTED), 0, "cleared by the read");
        // No eject asked for and none done: the wait times out and withdraws the request.
        s.request_removal(3);
        assert_eq!(n.load(Ordering::SeqCst), 2);
        assert!(!s.wait_ejected(3, Duration::from_millis(10)));
        assert_eq!(read32(&s, REMOVE), 0);
        s.request_removal(3);
        assert_eq!(read32(&s, REMOVE), 0b1000);
        // Ejecting an empty slot does nothing; the requested one completes the wait.
        s.write(EJECT, &[5, 0, 0, 0]);
        s.write(EJECT, &[3, 0, 0, 0]);
        assert!(s.wait_ejected(3, Duration::from_millis(10)));
        assert_eq!(read32(&s, PRESENT), 0b0001);
    }

    #[test]
    fn released_by_eject_or_by_the_driver() {
        let s = HotplugSlots::new();
        let poll = Duration::from_millis(1);
        s.insert(2);
        s.request_removal(2);
        assert!(!s.wait_released(2, Duration::from_millis(5), poll, || false));
        assert_eq!(read32(&s, REMOVE), 0, "withdrawn");
        assert_eq!(read32(&s, PRESENT), 0b100, "still there");
        s.request_removal(2);
        s.write(EJECT, &[2]);
        assert!(s.wait_released(2, Duration::from_millis(5), poll, || false));
        assert_eq!(read32(&s, PRESENT), 0);
        s.insert(4);
        s.request_removal(4);
        assert!(s.wait_released(4, Duration::from_secs(5), poll, || true));
        assert_eq!(read32(&s, PRESENT), 0);
        assert_eq!(read32(&s, REMOVE), 0);
    }

    #[test]
    fn odd_accesses() {
        let s = HotplugSlots::new();
        s.insert(9);
        let mut b = [0u8; 2];
        s.read(INSERTED + 1, &mut b);
        assert_eq!(b, [0x02, 0]);
        // Only the byte read was cleared.
        assert_eq!(read32(&s, INSERTED), 0);
        s.insert(1);
        let mut one = [0u8; 1];
        s.read(INSERTED + 1, &mut one);
        assert_eq!(read32(&s, INSERTED), 0b10, "byte 0 untouched");
        let mut wide = [0u8; 8];
        s.read(14, &mut wide);
        assert_eq!(wide, [0; 8]);
        s.write(PRESENT, &[0xff; 4]);
        s.write(EJECT, &[]);
        s.write(EJECT, &[200]);
        assert_eq!(s.present(), 0b10_0000_0010);
    }
}
