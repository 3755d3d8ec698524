//! A 16550A UART: the registers Linux's 8250 driver uses, an input FIFO fed from the host, and an
//! output sink. Interrupts are edge-triggered through an [`IrqLine`] (an irqfd in the VMM).

use std::collections::VecDeque;
use std::io::Write;

use super::IrqLine;

/// COM1 base port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1 interrupt.
pub const COM1_IRQ: u32 = 4;
/// Bytes of host input buffered before the host side has to wait.
pub const INPUT_CAPACITY: usize = 64 * 1024;

const DATA: u8 = 0;
const IER: u8 = 1;
const IIR_FCR: u8 = 2;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LSR: u8 = 5;
const MSR: u8 = 6;
const SCR: u8 = 7;

const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_FIFO_ENABLED: u8 = 0xc0;
const FCR_FIFO_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;
const LCR_DLAB: u8 = 0x80;
const MCR_LOOP: u8 = 0x10;
const LSR_DR: u8 = 0x01;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// The UART state.
pub struct Serial {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifo_enabled: bool,
    thre_pending: bool,
    rx: VecDeque<u8>,
    out: Box<dyn Write + Send>,
    irq: Box<dyn IrqLine>,
}

impl Serial {
    /// A UART writing guest output to `out` and raising `irq`.
    pub fn new(out: Box<dyn Write + Send>, irq: Box<dyn IrqLine>) -> Self {
        Serial {
            ier: 0,
            lcr: 0x03,
            mcr: 0x08,
            scr: 0,
            dll: 0x0c,
            dlm: 0,
            fifo_enabled: false,
            thre_pending: false,
            rx: VecDeque::new(),
            out,
            irq,
        }
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    /// Queues host input for the guest; returns how many bytes were accepted.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = INPUT_CAPACITY.saturating_sub(self.rx.len());
        let n = room.min(bytes.len());
        if n == 0 {
            return 0;
        }
        self.rx.extend(&bytes[..n]);
        if self.ier & IER_RDA != 0 {
            self.irq.trigger();
        }
        n
    }

    /// Bytes waiting for the guest.
    pub fn pending_input(&self) -> usize {
        self.rx.len()
    }

    /// Guest read of register `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        match offset {
            DATA if self.dlab() => self.dll,
            DATA => {
                let b = self.rx.pop_front().unwrap_or(0);
                if !self.rx.is_empty() && self.ier & IER_RDA != 0 {
                    self.irq.trigger();
                }
                b
            }
            IER if self.dlab() => self.dlm,
            IER => self.ier,
            IIR_FCR => {
                let fifo = if self.fifo_enabled {
                    IIR_FIFO_ENABLED
                } else {
                    0
                };
                if self.ier & IER_RDA != 0 && !self.rx.is_empty() {
                    IIR_RDA | fifo
                } else if self.ier & IER_THRE != 0 && self.thre_pending {
                    self.thre_pending = false;
                    IIR_THRE | fifo
                } else {
                    IIR_NONE | fifo
                }
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let dr = if self.rx.is_empty() { 0 } else { LSR_DR };
                dr | LSR_THRE | LSR_TEMT
            }
            MSR => {
                if self.loopback() {
                    let m = self.mcr;
                    (if m & 0x02 != 0 { MSR_CTS } else { 0 })
                        | (if m & 0x01 != 0 { MSR_DSR } else { 0 })
                        | (if m & 0x04 != 0 { MSR_RI } else { 0 })
                        | (if m & 0x08 != 0 { MSR_DCD } else { 0 })
                } else {
                    MSR_CTS | MSR_DSR | MSR_DCD
                }
            }
            SCR => self.scr,
            _ => 0xff,
        }
    }

    /// Guest write of `value` to register `offset` (0..8).
    pub fn write(&mut self, offset: u8, value: u8) {
        match offset {
            DATA if self.dlab() => self.dll = value,
            DATA => {
                if self.loopback() {
                    if self.rx.len() < INPUT_CAPACITY {
                        self.rx.push_back(value);
                    }
                    if self.ier & IER_RDA != 0 {
                        self.irq.trigger();
                    }
                } else {
                    // Output errors (a closed pipe, a full disk) must not stop the guest.
                    let _ = self.out.write_all(&[value]);
                    if value == b'\n' {
                        let _ = self.out.flush();
                    }
                }
                self.thre_pending = true;
                if self.ier & IER_THRE != 0 {
                    self.irq.trigger();
                }
            }
            IER if self.dlab() => self.dlm = value,
            IER => {
                let enabling_thre = value & IER_THRE != 0 && self.ier & IER_THRE == 0;
                self.ier = value & 0x0f;
                if enabling_thre {
                    self.thre_pending = true;
                }
                if (enabling_thre) || (self.ier & IER_RDA != 0 && !self.rx.is_empty()) {
                    self.irq.trigger();
                }
            }
            IIR_FCR => {
                self.fifo_enabled = value & FCR_FIFO_ENABLE != 0;
                if value & FCR_CLEAR_RX != 0 {
                    self.rx.clear();
                }
            }
            LCR => self.lcr = value,
            MCR => self.mcr = value & 0x1f,
            SCR => self.scr = value,
            _ => {}
        }
    }

    /// Flushes the output sink.
    pub fn flush(&mut self) {
        let _ = self.out.flush();
    }

    /// The registers and pending input, for a snapshot.
    pub fn save_state(&self) -> SerialState {
        SerialState {
            ier: self.ier,
            lcr: self.lcr,
            mcr: self.mcr,
            scr: self.scr,
            dll: self.dll,
            dlm: self.dlm,
            fifo_enabled: self.fifo_enabled,
            thre_pending: self.thre_pending,
            rx: self.rx.iter().copied().collect(),
        }
    }

    /// Puts saved registers back (input beyond the queue's capacity is dropped); raises the
    /// interrupt the restored state has pending.
    pub fn restore_state(&mut self, s: &SerialState) {
        self.ier = s.ier & 0x0f;
        self.lcr = s.lcr;
        self.mcr = s.mcr & 0x1f;
        self.scr = s.scr;
        self.dll = s.dll;
        self.dlm = s.dlm;
        self.fifo_enabled = s.fifo_enabled;
        self.thre_pending = s.thre_pending;
        self.rx = s.rx.iter().take(INPUT_CAPACITY).copied().collect();
        let rda = !self.rx.is_empty() && self.ier & IER_RDA != 0;
        if rda || (self.thre_pending && self.ier & IER_THRE != 0) {
            self.irq.trigger();
        }
    }
}

/// A UART's state in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    /// Interrupt enable.
    pub ier: u8,
    /// Line control.
    pub lcr: u8,
    /// Modem control.
    pub mcr: u8,
    /// Scratch.
    pub scr: u8,
    /// Divisor latch, low.
    pub dll: u8,
    /// Divisor latch, high.
    pub dlm: u8,
    /// FIFOs enabled.
    pub fifo_enabled: bool,
    /// A THR-empty interrupt is pending.
    pub thre_pending: bool,
    /// Input the guest has not read yet.
    pub rx: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Counter(Arc<AtomicUsize>);
    impl IrqLine for Counter {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (Serial, Counter, Sink) {
        let c = Counter::default();
        let s = Sink::default();
        (Serial::new(Box::new(s.clone()), Box::new(c.clone())), c, s)
    }

    #[test]
    fn output_reaches_sink() {
        let (mut u, _, s) = uart();
        for b in b"hi\n" {
            u.write(DATA, *b);
        }
        assert_eq!(&*s.0.lock().unwrap(), b"hi\n");
        assert_eq!(u.read(LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
    }

    #[test]
    fn thre_interrupt_and_iir() {
        let (mut u, c, _) = uart();
        assert_eq!(u.read(IIR_FCR), IIR_NONE);
        u.write(IER, IER_THRE);
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        assert_eq!(u.read(IIR_FCR), IIR_THRE);
        assert_eq!(u.read(IIR_FCR), IIR_NONE, "reading IIR clears THRE");
        u.write(DATA, b'x');
        assert_eq!(c.0.load(Ordering::SeqCst), 2);
        assert_eq!(u.read(IIR_FCR), IIR_THRE);
    }

    #[test]
    fn input_sets_data_ready_and_interrupts() {
        let (mut u, c, _) = uart();
        u.write(IER, IER_RDA);
        assert_eq!(u.enqueue_input(b"ab"), 2);
        assert!(c.0.load(Ordering::SeqCst) >= 1);
        assert_eq!(u.read(LSR) & LSR_DR, LSR_DR);
        assert_eq!(u.read(IIR_FCR) & 0x0f, IIR_RDA);
        assert_eq!(u.read(DATA), b'a');
        assert_eq!(u.read(DATA), b'b');
        assert_eq!(u.read(LSR) & LSR_DR, 0);
        assert_eq!(u.read(IIR_FCR) & 0x0f, IIR_NONE);
    }

    #[test]
    fn input_is_bounded() {
        let (mut u, _, _) = uart();
        let big = vec![7u8; INPUT_CAPACITY + 10];
        assert_eq!(u.enqueue_input(&big), INPUT_CAPACITY);
        assert_eq!(u.enqueue_input(b"x"), 0);
    }

    #[test]
    fn divisor_latch_and_scratch() {
        let (mut u, _, s) = uart();
        u.write(LCR, LCR_DLAB | 0x03);
        u.write(DATA, 0x01);
        u.write(IER, 0x02);
        assert_eq!((u.read(DATA), u.read(IER)), (0x01, 0x02));
        u.write(LCR, 0x03);
        assert_eq!(u.read(IER), 0, "IER untouched by DLAB writes");
        assert!(s.0.lock().unwrap().is_empty(), "DLL write is not output");
        u.write(SCR, 0x5a);
        assert_eq!(u.read(SCR), 0x5a);
    }

    #[test]
    fn loopback_mode() {
        let (mut u, _, s) = uart();
        u.write(MCR, MCR_LOOP | 0x0a);
        assert_eq!(u.read(MSR) & 0xf0, MSR_CTS | MSR_DCD);
        u.write(DATA, 0x55);
        assert_eq!(u.read(DATA), 0x55);
        assert!(s.0.lock().unwrap().is_empty());
    }

    #[test]
    fn fifo_control() {
        let (mut u, _, _) = uart();
        u.enqueue_input(b"zz");
        u.write(IIR_FCR, FCR_FIFO_ENABLE | FCR_CLEAR_RX);
        assert_eq!(u.pending_input(), 0);
        assert_eq!(u.read(IIR_FCR) & IIR_FIFO_ENABLED, IIR_FIFO_ENABLED);
    }
}
