//! Legacy devices the VMM emulates itself (UART, i8042 reset, the ACPI power device), and the
//! port-I/O dispatch for them.

pub mod i8042;
pub mod pio;
pub mod power;
pub mod serial;

/// An interrupt line a device can raise (edge).
pub trait IrqLine: Send + Sync {
    /// Raises the interrupt.
    fn trigger(&self);
}

impl IrqLine for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) {
        // An eventfd write only fails if the counter would overflow, which means the interrupt is
        // already pending: nothing is lost.
        let _ = self.write(1);
    }
}
