//! Legacy devices the VMM emulates itself (UART, i8042 reset, the ACPI power device), and the
//! port-I/O dispatch for them.

pub mod hotplug;
pub mod i8042;
pub mod pio;
pub mod power;
pub mod serial;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// An interrupt line a device can raise (edge).
pub trait IrqLine: Send + Sync {
    /// Raises the interrupt.
    fn trigger(&self);
}

/// An [`IrqLine`] that counts its interrupts (for the control API's counters).
pub struct CountedIrq<L> {
    line: L,
    count: Arc<AtomicU64>,
}

impl<L> CountedIrq<L> {
    /// `line`, counting into `count`.
    pub fn new(line: L, count: Arc<AtomicU64>) -> Self {
        CountedIrq { line, count }
    }
}

impl<L: IrqLine> IrqLine for CountedIrq<L> {
    fn trigger(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.line.trigger();
    }
}

impl IrqLine for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) {
        // An eventfd write only fails if the counter would overflow, which means the interrupt is
        // already pending: nothing is lost.
        let _ = self.write(1);
    }
}
