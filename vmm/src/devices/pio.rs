//! Port I/O dispatch for the VMM's own devices: COM1, the i8042 reset, the boot-time marker,
//! the hot-plug slot registers and (platform acpi) the ACPI power device.
//! Unclaimed ports read as all ones (no device) and ignore writes.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use hype_base::log_limit::LogCounter;

use super::hotplug::{HotplugSlots, HOTPLUG_PORTS, HOTPLUG_PORT_BASE};
use super::i8042::{self, I8042Action};
use super::power::{PowerAction, PowerDevice};
use super::serial::{Serial, COM1_BASE};

/// Port of the boot-time marker: a guest write here is logged with the time since `hype vmm`
/// started (the value written is logged too, so a guest can mark several points).
pub const BOOT_MARKER_PORT: u16 = 0x0440;

/// Boot markers logged one by one; after these, only markers numbered by a power of two are
/// (a guest writing the port in a loop would otherwise flood the log).
const MARKERS_LOGGED: u64 = 16;

/// Boot markers kept for [`PioBus::markers`]; later ones are counted in the log only.
const MAX_MARKERS: usize = 256;

/// What the vCPU should do after a port access.
#[derive(Debug, PartialEq, Eq)]
pub enum PioOutcome {
    /// Keep running.
    Continue,
    /// The guest asked for a reset: the VM ends.
    Reset,
    /// The guest switched itself off (ACPI S5): the VM ends.
    PowerOff,
}

/// The legacy device set shared by all vCPUs.
pub struct PioBus {
    serial: Arc<Mutex<Serial>>,
    started: Instant,
    markers: Mutex<Vec<(u32, std::time::Duration)>>,
    marker_log: LogCounter,
    hotplug: Option<Arc<HotplugSlots>>,
    power: Option<PowerDevice>,
}

impl PioBus {
    /// A bus with COM1 and the i8042; `started` is the VMM's start time.
    pub fn new(serial: Arc<Mutex<Serial>>, started: Instant) -> Self {
        PioBus {
            serial,
            started,
            markers: Mutex::new(Vec::new()),
            marker_log: LogCounter::new(MARKERS_LOGGED),
            hotplug: None,
            power: None,
        }
    }

    /// Adds the hot-plug slot registers.
    pub fn with_hotplug(mut self, slots: Arc<HotplugSlots>) -> Self {
        self.hotplug = Some(slots);
        self
    }

    fn hotplug_at(&self, port: u16) -> Option<(&HotplugSlots, u16)> {
        let off = port.checked_sub(HOTPLUG_PORT_BASE)?;
        (off < HOTPLUG_PORTS)
            .then_some(self.hotplug.as_deref())
            .flatten()
            .map(|h| (h, off))
    }

    /// Adds the ACPI power device (its ports read as all ones without it).
    pub fn with_power(mut self, power: PowerDevice) -> Self {
        self.power = Some(power);
        self
    }

    /// The UART (for host input).
    pub fn serial(&self) -> &Arc<Mutex<Serial>> {
        &self.serial
    }

    /// Boot markers seen so far: (value, time since start).
    pub fn markers(&self) -> Vec<(u32, std::time::Duration)> {
        self.markers.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Guest `in`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if let Some((h, off)) = self.hotplug_at(port) {
            h.read(off, data);
            return;
        }
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                if let (Some(b), Ok(mut s)) = (data.first_mut(), self.serial.lock()) {
                    *b = s.read((p - COM1_BASE) as u8);
                }
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT => {
                if let Some(b) = data.first_mut() {
                    *b = i8042::read(port);
                }
            }
            p if PowerDevice::claims(p) => {
                if let Some(power) = &self.power {
                    power.read(p, data);
                }
            }
            _ => {}
        }
    }

    /// Guest `out`.
    pub fn write(&self, port: u16, data: &[u8]) -> PioOutcome {
        if let Some((h, off)) = self.hotplug_at(port) {
            h.write(off, data);
            return PioOutcome::Continue;
        }
        let Some(&value) = data.first() else {
            return PioOutcome::Continue;
        };
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                if let Ok(mut s) = self.serial.lock() {
                    s.write((p - COM1_BASE) as u8, value);
                }
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT
                if i8042::write(port, value) == I8042Action::Reset =>
            {
                return PioOutcome::Reset;
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT => {}
            p if PowerDevice::claims(p) => match self.power.as_ref().map(|d| d.write(p, data)) {
                Some(PowerAction::PowerOff) => return PioOutcome::PowerOff,
                Some(PowerAction::Reset) => return PioOutcome::Reset,
                Some(PowerAction::None) | None => {}
            },
            BOOT_MARKER_PORT => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                let value = u32::from_le_bytes(v);
                let t = self.started.elapsed();
                // A guest can write the port in a loop: the log is rate-limited and only the
                // first MAX_MARKERS markers are kept.
                match self.marker_log.hit() {
                    Some(n) if n <= MARKERS_LOGGED => {
                        log::info!("boot marker {value} at {:.3} ms", t.as_secs_f64() * 1e3);
                    }
                    Some(n) => log::info!(
                        "boot marker {value} at {:.3} ms (marker #{n}; only some are logged)",
                        t.as_secs_f64() * 1e3
                    ),
                    None => {}
                }
                if let Ok(mut m) = self.markers.lock() {
                    if m.len() < MAX_MARKERS {
                        m.push((value, t));
                    }
                }
            }
            _ => {}
        }
        PioOutcome::Continue
    }
}
