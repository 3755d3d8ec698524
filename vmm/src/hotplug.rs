//! Devices that come and go while the guest runs: wiring a vhost-user device's eventfds to
//! KVM and its window onto the MMIO bus, and taking them off again once the guest let go.
//!
//! Slot n is virtio-mmio window n with GSI [`DEVICE_GSIS`]`[n]`; the boot devices take the
//! first slots, a hot-plugged device the first free one. Adding marks the slot present in the
//! [`HotplugSlots`] registers and tells the guest (INSERTED); removing asks the guest to
//! release the slot (REMOVE) and waits until it did, by writing EJECT (ACPI `_EJ0`) or by
//! letting its driver go (the device's DRIVER status bit clear: a Linux 6.1 guest cannot eject
//! a virtio-mmio node and unbinds the driver instead, see `crate::acpi::dsdt`), before the
//! device is taken away, so a guest never loses a device it still drives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, VmFd};

use crate::devices::hotplug::HotplugSlots;
use crate::memory::GuestMemoryMmap;
use crate::virtio::bus::MmioBus;
use crate::virtio::device::DeviceError;
use crate::virtio::mmio::reg;
use crate::virtio::{self, DeviceOptions, DeviceType, VhostUserDevice, WaitLimit, DEVICE_GSIS};

/// How long a hot-plug waits for the backend's socket.
pub const ATTACH_WAIT: Duration = Duration::from_secs(2);
/// How long a removal waits for the guest to eject the device.
pub const EJECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a hot-plug or removal did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// Every slot holds a device.
    #[error("no free device slot (hype has {0})")]
    NoFreeSlot(usize),
    /// The backend could not be attached.
    #[error("cannot attach {path}")]
    Attach {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: DeviceError,
    },
    /// Registering or unregistering an eventfd with KVM failed.
    #[error("{what} for device slot {slot}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Slot.
        slot: usize,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// No device by that name.
    #[error("no device {0}")]
    NoSuchDevice(String),
    /// A boot device (its slot is not a hot-plug slot).
    #[error("{0} was attached at boot and cannot be removed")]
    BootDevice(String),
    /// The guest did not eject the device in time.
    #[error("the guest did not release {name} within {timeout:?}; it stays")]
    NotReleased {
        /// Device.
        name: String,
        /// How long hype waited.
        timeout: Duration,
    },
}

/// What hype knows about the device in one slot.
#[derive(Clone, Debug)]
pub struct SlotInfo {
    /// Backend socket.
    pub socket: PathBuf,
    /// Whether it came by hot-plug.
    pub hotplugged: bool,
}

/// The hot-plug machinery of one VM.
pub struct Hotplug {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    slots: Arc<HotplugSlots>,
    used: Mutex<BTreeMap<usize, SlotInfo>>,
    /// Slots that held a hot-plugged device at some point (bit n: slot n).
    ever_used: Mutex<u64>,
    /// Serialises adds and removals.
    ops: Mutex<()>,
}

/// How often a removal looks whether the guest's driver let go.
const RELEASE_POLL: Duration = Duration::from_millis(20);

/// The slot an add takes: the first one never used in this VM's life, else the first free one
/// (a guest keeps what it knew of a slot it released: Linux 6.1 keeps the slot's platform
/// device, so a fresh slot is what it enumerates on its own).
pub fn pick_slot(used: &BTreeMap<usize, SlotInfo>, ever_used: u64, slots: usize) -> Option<usize> {
    let free = |i: &usize| !used.contains_key(i);
    (0..slots)
        .filter(free)
        .find(|i| ever_used & (1 << i) == 0)
        .or_else(|| (0..slots).find(free))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The device name of slot `index`.
pub fn device_name(index: usize) -> String {
    format!("virtio{index}")
}

/// Registers `dev`'s kicks (ioeventfds on QueueNotify) and calls and config interrupt (irqfds
/// on `gsi`) with KVM.
pub fn wire(
    vm: &VmFd,
    dev: &VhostUserDevice,
    base: u64,
    gsi: u32,
) -> Result<(), (&'static str, kvm_ioctls::Error)> {
    let ev = dev.events();
    for (q, kick) in ev.kicks.iter().enumerate() {
        vm.register_ioevent(
            kick,
            &IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY),
            q as u32,
        )
        .map_err(|e| ("KVM_IOEVENTFD", e))?;
    }
    for call in &ev.calls {
        vm.register_irqfd(call, gsi).map_err(|e| ("KVM_IRQFD", e))?;
    }
    vm.register_irqfd(&ev.config, gsi)
        .map_err(|e| ("KVM_IRQFD", e))
}

/// Undoes [`wire`] (every registration that exists; the first failure is reported).
pub fn unwire(
    vm: &VmFd,
    dev: &VhostUserDevice,
    base: u64,
    gsi: u32,
) -> Result<(), (&'static str, kvm_ioctls::Error)> {
    let ev = dev.events();
    let mut first = Ok(());
    for (q, kick) in ev.kicks.iter().enumerate() {
        let r = vm.unregister_ioevent(
            kick,
            &IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY),
            q as u32,
        );
        if let (Err(e), Ok(())) = (r, &first) {
            first = Err(("KVM_IOEVENTFD deassign", e));
        }
    }
    for call in ev.calls.iter().chain(std::iter::once(&ev.config)) {
        if let (Err(e), Ok(())) = (vm.unregister_irqfd(call, gsi), &first) {
            first = Err(("KVM_IRQFD deassign", e));
        }
    }
    first
}

impl Hotplug {
    /// The machinery for the VM `vm` with guest memory `mem` and slot registers `slots`.
    pub fn new(vm: Arc<VmFd>, mem: GuestMemoryMmap, slots: Arc<HotplugSlots>) -> Self {
        Hotplug {
            vm,
            mem,
            slots,
            used: Mutex::new(BTreeMap::new()),
            ever_used: Mutex::new(0),
            ops: Mutex::new(()),
        }
    }

    /// Records a boot device in `slot`.
    pub fn boot_device(&self, slot: usize, socket: &Path) {
        self.slots.set_boot_present(slot);
        lock(&self.used).insert(
            slot,
            SlotInfo {
                socket: socket.to_owned(),
                hotplugged: false,
            },
        );
    }

    /// Records that the device in `slot` now talks to the backend at `socket`.
    pub fn set_socket(&self, slot: usize, socket: &Path) {
        if let Some(info) = lock(&self.used).get_mut(&slot) {
            info.socket = socket.to_owned();
        }
    }

    /// What is in `slot`.
    pub fn slot(&self, slot: usize) -> Option<SlotInfo> {
        lock(&self.used).get(&slot).cloned()
    }

    /// Attaches the backend at `socket` (type `kind`, or learned) in the first free slot,
    /// wires it and tells the guest. Returns the slot.
    pub fn add(
        &self,
        bus: &MmioBus,
        socket: &Path,
        kind: Option<DeviceType>,
    ) -> Result<usize, HotplugError> {
        let _op = lock(&self.ops);
        let slot = pick_slot(
            &lock(&self.used),
            *lock(&self.ever_used),
            virtio::MAX_DEVICES,
        )
        .ok_or(HotplugError::NoFreeSlot(virtio::MAX_DEVICES))?;
        let name = device_name(slot);
        let mut opts = DeviceOptions::new(socket);
        opts.kind = kind;
        opts.wait = WaitLimit::For(ATTACH_WAIT);
        let dev =
            VhostUserDevice::attach(&name, &opts, self.mem.clone(), None).map_err(|source| {
                HotplugError::Attach {
                    path: socket.to_owned(),
                    source,
                }
            })?;
        let base = virtio::device_base(slot);
        let gsi = DEVICE_GSIS[slot];
        if let Err((what, source)) = wire(&self.vm, &dev, base, gsi) {
            let _ = unwire(&self.vm, &dev, base, gsi);
            return Err(HotplugError::Kvm { what, slot, source });
        }
        bus.add(base, Arc::new(dev));
        lock(&self.used).insert(
            slot,
            SlotInfo {
                socket: socket.to_owned(),
                hotplugged: true,
            },
        );
        *lock(&self.ever_used) |= 1 << slot;
        self.slots.insert(slot);
        log::info!(
            "{name}: hot-plugged ({}), window {base:#x}, GSI {gsi}",
            socket.display()
        );
        Ok(slot)
    }

    /// Asks the guest to release the device `name`, waits up to `timeout` for its eject, then
    /// takes the device away.
    pub fn remove(&self, bus: &MmioBus, name: &str, timeout: Duration) -> Result<(), HotplugError> {
        let _op = lock(&self.ops);
        let slot = (0..virtio::MAX_DEVICES)
            .find(|i| device_name(*i) == name)
            .filter(|i| lock(&self.used).contains_key(i))
            .ok_or_else(|| HotplugError::NoSuchDevice(name.to_owned()))?;
        if self.slot(slot).is_some_and(|s| !s.hotplugged) {
            return Err(HotplugError::BootDevice(name.to_owned()));
        }
        let base = virtio::device_base(slot);
        let let_go = || {
            bus.devices()
                .iter()
                .find(|(b, _)| *b == base)
                .is_none_or(|(_, d)| d.driver_released())
        };
        self.slots.request_removal(slot);
        // Released: the guest ejected the slot (ACPI _EJ0), or the driver that once started
        // the device let it go (what a Linux 6.1 guest does: it unbinds virtio-mmio).
        if !self
            .slots
            .wait_released(slot, timeout, RELEASE_POLL, let_go)
        {
            return Err(HotplugError::NotReleased {
                name: name.to_owned(),
                timeout,
            });
        }
        let Some(dev) = bus.remove(base) else {
            lock(&self.used).remove(&slot);
            return Ok(());
        };
        let unwired = unwire(&self.vm, &dev, base, DEVICE_GSIS[slot]);
        lock(&self.used).remove(&slot);
        // The device thread ends and the backend sees the connection close.
        drop(dev);
        log::info!("{name}: removed (the guest released it)");
        unwired.map_err(|(what, source)| HotplugError::Kvm { what, slot, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(slots: &[usize]) -> BTreeMap<usize, SlotInfo> {
        slots
            .iter()
            .map(|&i| {
                let info = SlotInfo {
                    socket: PathBuf::from("/s"),
                    hotplugged: true,
                };
                (i, info)
            })
            .collect()
    }

    #[test]
    fn fresh_slots_first_then_freed_ones() {
        assert_eq!(pick_slot(&used(&[0]), 0, 4), Some(1));
        // Slot 1 was used and freed: slot 2 is fresh.
        assert_eq!(pick_slot(&used(&[0]), 0b11, 4), Some(2));
        // Every free slot was used once: the first free one.
        assert_eq!(pick_slot(&used(&[0, 3]), 0b1111, 4), Some(1));
        assert_eq!(pick_slot(&used(&[0, 1, 2, 3]), 0, 4), None);
    }
}
