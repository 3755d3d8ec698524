//! Devices that come and go while the guest runs: wiring a vhost-user device's eventfds to
//! KVM and its window onto the MMIO bus, and taking them off again once the guest let go.
//!
//! Slot n is virtio-mmio window n with GSI [`DEVICE_GSIS`]`[n]`; the boot devices take the
//! first slots, a hot-plugged device the first free one. Adding marks the slot present in the
//! [`HotplugSlots`] registers and tells the guest (INSERTED); removing asks the guest to
//! release the slot (REMOVE) and waits for it to write EJECT (ACPI `_EJ0`) before the device is
//! taken away, so a guest never loses a device it still drives.

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
    /// Serialises adds and removals.
    ops: Mutex<()>,
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
        let slot = {
            let used = lock(&self.used);
            (0..virtio::MAX_DEVICES)
                .find(|i| !used.contains_key(i))
                .ok_or(HotplugError::NoFreeSlot(virtio::MAX_DEVICES))?
        };
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
        self.slots.request_removal(slot);
        if !self.slots.wait_ejected(slot, timeout) {
            return Err(HotplugError::NotReleased {
                name: name.to_owned(),
                timeout,
            });
        }
        let base = virtio::device_base(slot);
        let Some(dev) = bus.remove(base) else {
            lock(&self.used).remove(&slot);
            return Ok(());
        };
        let unwired = unwire(&self.vm, &dev, base, DEVICE_GSIS[slot]);
        lock(&self.used).remove(&slot);
        // The device thread ends and the backend sees the connection close.
        drop(dev);
        log::info!("{name}: removed (the guest ejected it)");
        unwired.map_err(|(what, source)| HotplugError::Kvm { what, slot, source })
    }
}
