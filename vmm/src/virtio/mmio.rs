//! The virtio-mmio (version 2) register file of one device, per virtio 1.2 section 4.2.2.
//!
//! This is pure state: it knows nothing of KVM or vhost-user. A register write may ask the owner
//! to do something ([`TransportEvent`]); the owner (the vhost-user device) carries it out.
//! Everything the guest writes is checked; nonsense is ignored, counted and never panics.

/// `MagicValue`: "virt" little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// `Version`: 2 (virtio 1.x, no legacy interface).
pub const VERSION: u32 = 2;
/// `VendorID`: "HYPE" little-endian.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"HYPE");

use hype_frontend::features;

/// Register offsets.
pub mod reg {
    use virtio_bindings::virtio_mmio;

    /// Magic value ("virt").
    pub const MAGIC_VALUE: u64 = virtio_mmio::VIRTIO_MMIO_MAGIC_VALUE as u64;
    /// Device version (2).
    pub const VERSION: u64 = virtio_mmio::VIRTIO_MMIO_VERSION as u64;
    /// Virtio device ID (0: no device).
    pub const DEVICE_ID: u64 = virtio_mmio::VIRTIO_MMIO_DEVICE_ID as u64;
    /// Vendor ID.
    pub const VENDOR_ID: u64 = virtio_mmio::VIRTIO_MMIO_VENDOR_ID as u64;
    /// Device features, 32 bits selected by `DEVICE_FEATURES_SEL`.
    pub const DEVICE_FEATURES: u64 = virtio_mmio::VIRTIO_MMIO_DEVICE_FEATURES as u64;
    /// Device features word selector.
    pub const DEVICE_FEATURES_SEL: u64 = virtio_mmio::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
    /// Driver (acked) features, 32 bits selected by `DRIVER_FEATURES_SEL`.
    pub const DRIVER_FEATURES: u64 = virtio_mmio::VIRTIO_MMIO_DRIVER_FEATURES as u64;
    /// Driver features word selector.
    pub const DRIVER_FEATURES_SEL: u64 = virtio_mmio::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
    /// Queue selector.
    pub const QUEUE_SEL: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_SEL as u64;
    /// Largest queue size the device takes for the selected queue (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
    /// Queue size the driver chose.
    pub const QUEUE_NUM: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_NUM as u64;
    /// Queue ready bit.
    pub const QUEUE_READY: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_READY as u64;
    /// Queue notification (the value written is the queue index).
    pub const QUEUE_NOTIFY: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
    /// Interrupt status.
    pub const INTERRUPT_STATUS: u64 = virtio_mmio::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
    /// Interrupt acknowledge.
    pub const INTERRUPT_ACK: u64 = virtio_mmio::VIRTIO_MMIO_INTERRUPT_ACK as u64;
    /// Device status.
    pub const STATUS: u64 = virtio_mmio::VIRTIO_MMIO_STATUS as u64;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
    /// Driver (avail) ring address, low 32 bits.
    pub const QUEUE_DRIVER_LOW: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
    /// Driver (avail) ring address, high 32 bits.
    pub const QUEUE_DRIVER_HIGH: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
    /// Device (used) ring address, low 32 bits.
    pub const QUEUE_DEVICE_LOW: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
    /// Device (used) ring address, high 32 bits.
    pub const QUEUE_DEVICE_HIGH: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
    /// Shared memory region selector.
    pub const SHM_SEL: u64 = virtio_mmio::VIRTIO_MMIO_SHM_SEL as u64;
    /// Shared memory region length, low 32 bits.
    pub const SHM_LEN_LOW: u64 = virtio_mmio::VIRTIO_MMIO_SHM_LEN_LOW as u64;
    /// Shared memory region length, high 32 bits.
    pub const SHM_LEN_HIGH: u64 = virtio_mmio::VIRTIO_MMIO_SHM_LEN_HIGH as u64;
    /// Shared memory region base, low 32 bits.
    pub const SHM_BASE_LOW: u64 = virtio_mmio::VIRTIO_MMIO_SHM_BASE_LOW as u64;
    /// Shared memory region base, high 32 bits.
    pub const SHM_BASE_HIGH: u64 = virtio_mmio::VIRTIO_MMIO_SHM_BASE_HIGH as u64;
    /// Queue reset (VIRTIO_F_RING_RESET, not offered; not in `virtio-bindings`).
    pub const QUEUE_RESET: u64 = 0x0c0;
    /// Configuration atomicity value.
    pub const CONFIG_GENERATION: u64 = virtio_mmio::VIRTIO_MMIO_CONFIG_GENERATION as u64;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = virtio_mmio::VIRTIO_MMIO_CONFIG as u64;
}

/// Device status bits.
pub mod status {
    use virtio_bindings::virtio_config;

    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = virtio_config::VIRTIO_CONFIG_S_FAILED;
}

/// `InterruptStatus` bit: a used buffer notification.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// `InterruptStatus` bit: a configuration change.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = features::VERSION_1;

/// Feature bits the transport can honour for a vhost-user device: the device-specific bits,
/// INDIRECT_DESC, EVENT_IDX, VERSION_1, IN_ORDER and ORDER_PLATFORM. Notably absent:
/// NOTIFICATION_DATA (the ioeventfd datamatch is the queue index), ACCESS_PLATFORM (no IOMMU),
/// RING_PACKED, RING_RESET and the vhost-user bit 30.
pub const TRANSPORT_FEATURES: u64 = features::DEVICE_BITS
    | features::RING_INDIRECT_DESC
    | features::RING_EVENT_IDX
    | F_VERSION_1
    | features::IN_ORDER
    | features::ORDER_PLATFORM;

/// The guest's view of one virtqueue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Size chosen by the driver.
    pub size: u16,
    /// Whether the driver marked it ready.
    pub ready: bool,
    /// Descriptor table (guest physical).
    pub desc: u64,
    /// Driver area: the avail ring (guest physical).
    pub driver: u64,
    /// Device area: the used ring (guest physical).
    pub device: u64,
}

/// A ready queue handed to the device at DRIVER_OK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveQueue {
    /// Queue index.
    pub index: u16,
    /// Its configuration.
    pub config: QueueConfig,
}

/// What the guest asked for when it set DRIVER_OK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activation {
    /// Features the driver acked.
    pub acked_features: u64,
    /// Every queue the driver made ready, in index order.
    pub queues: Vec<ActiveQueue>,
}

/// Something a register write asks the device to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransportEvent {
    /// DRIVER_OK was set with valid queues: start the device.
    Activate(Activation),
    /// The driver wrote 0 to Status: stop the rings and forget the setup.
    Reset,
    /// The driver wrote to the configuration space (offset from its start).
    ConfigWrite {
        /// Offset in the config space.
        offset: u32,
        /// Bytes written.
        data: Vec<u8>,
    },
    /// A QueueNotify write reached the VMM (no ioeventfd took it).
    Notify(u16),
}

pub use hype_frontend::types::ConfigField;

/// What is fixed about the device when the transport is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceModel {
    /// Virtio device ID (2 = block, 1 = net, 3 = console).
    pub device_id: u32,
    /// Features offered to the guest (already limited to [`TRANSPORT_FEATURES`]).
    pub features: u64,
    /// Number of queues.
    pub num_queues: u16,
    /// Largest queue size per queue.
    pub queue_max: u16,
    /// Initial configuration space contents.
    pub config: Vec<u8>,
    /// Fields the driver may write; every other config write is refused (and never reaches
    /// the backend).
    pub writable_config: Vec<ConfigField>,
    /// Report a used-buffer interrupt in InterruptStatus whenever the guest looks: true for
    /// vhost-user devices, whose backends signal the irqfd without telling the VMM.
    pub vring_interrupt_always: bool,
}

/// The register file of one virtio-mmio device.
#[derive(Debug)]
pub struct MmioTransport {
    model: DeviceModel,
    queues: Vec<QueueConfig>,
    config: Vec<u8>,
    config_generation: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    shm_sel: u32,
    status: u32,
    config_interrupt: bool,
    activated: bool,
    /// A driver activated the device at some point (survives resets).
    ever_activated: bool,
    guest_errors: u64,
}

impl MmioTransport {
    /// A device in its reset state.
    pub fn new(model: DeviceModel) -> Self {
        let queues = vec![QueueConfig::default(); usize::from(model.num_queues)];
        let config = model.config.clone();
        MmioTransport {
            model,
            queues,
            config,
            config_generation: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            shm_sel: 0,
            status: 0,
            config_interrupt: false,
            activated: false,
            ever_activated: false,
            guest_errors: 0,
        }
    }

    /// The device description.
    pub fn model(&self) -> &DeviceModel {
        &self.model
    }

    /// Current device status.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device has been activated (DRIVER_OK accepted) since the last reset.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Whether a driver let the device go: it activated it once, and no driver holds it now
    /// (the DRIVER status bit is clear: reset, or only ACKNOWLEDGE left after a driver's
    /// removal).
    pub fn driver_released(&self) -> bool {
        self.ever_activated && self.status & status::DRIVER == 0
    }

    /// The driver's view of queue `index`.
    pub fn queue(&self, index: u16) -> Option<QueueConfig> {
        self.queues.get(usize::from(index)).copied()
    }

    /// Features acked by the driver so far.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Register accesses that made no sense (bad width, offset or value), since creation.
    pub fn guest_errors(&self) -> u64 {
        self.guest_errors
    }

    /// The cached configuration space.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// Replaces the configuration space (e.g. the backend reported a change) and bumps the
    /// generation; returns whether anything changed. The caller raises the interrupt.
    pub fn update_config(&mut self, config: &[u8]) -> bool {
        if config == self.config.as_slice() {
            return false;
        }
        self.config = config.to_vec();
        self.config_generation = self.config_generation.wrapping_add(1);
        true
    }

    /// Marks a configuration change interrupt pending (InterruptStatus bit 1).
    pub fn set_config_interrupt(&mut self) {
        self.config_interrupt = true;
    }

    /// The device failed in a way the driver must reset to recover from: sets
    /// DEVICE_NEEDS_RESET (if the driver has started) and a config interrupt. Returns whether
    /// an interrupt should be sent.
    pub fn set_needs_reset(&mut self) -> bool {
        if self.status & status::DRIVER == 0 {
            return false;
        }
        self.status |= status::DEVICE_NEEDS_RESET;
        self.config_interrupt = true;
        true
    }

    fn guest_error(&mut self, what: String) {
        self.guest_errors = self.guest_errors.saturating_add(1);
        if hype_base::log_limit::should_log(self.guest_errors, 10) {
            log::warn!(
                "virtio-mmio (device id {}): guest error #{}: {what}",
                self.model.device_id,
                self.guest_errors
            );
        }
    }

    fn selected_queue(&self) -> Option<usize> {
        let q = self.queue_sel as usize;
        (q < self.queues.len()).then_some(q)
    }

    fn interrupt_status(&self) -> u32 {
        let mut s = 0;
        if self.model.vring_interrupt_always {
            // The backend signals used buffers through the irqfd without the VMM: whenever the
            // guest asks, say the rings may have news (the driver then checks each ring).
            s |= INT_VRING;
        }
        if self.config_interrupt {
            s |= INT_CONFIG;
        }
        s
    }

    /// Guest read of `data.len()` bytes at `offset` in the device window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            let start = offset - reg::CONFIG;
            for (i, b) in data.iter_mut().enumerate() {
                let at = start.saturating_add(i as u64);
                if let Some(v) = usize::try_from(at).ok().and_then(|a| self.config.get(a)) {
                    *b = *v;
                }
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            self.guest_error(format!(
                "{}-byte read at register offset {offset:#x} (registers are 32-bit aligned)",
                data.len()
            ));
            return;
        }
        let q = self.selected_queue().map(|i| self.queues[i]);
        let v: u32 = match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.model.device_id,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.model.features as u32,
                1 => (self.model.features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |_| u32::from(self.model.queue_max)),
            reg::QUEUE_NUM => q.map_or(0, |q| u32::from(q.size)),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt_status(),
            reg::STATUS => self.status,
            reg::QUEUE_DESC_LOW => q.map_or(0, |q| q.desc as u32),
            reg::QUEUE_DESC_HIGH => q.map_or(0, |q| (q.desc >> 32) as u32),
            reg::QUEUE_DRIVER_LOW => q.map_or(0, |q| q.driver as u32),
            reg::QUEUE_DRIVER_HIGH => q.map_or(0, |q| (q.driver >> 32) as u32),
            reg::QUEUE_DEVICE_LOW => q.map_or(0, |q| q.device as u32),
            reg::QUEUE_DEVICE_HIGH => q.map_or(0, |q| (q.device >> 32) as u32),
            // No shared memory regions: length all ones means "no such region".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::SHM_SEL | reg::QUEUE_RESET => 0,
            reg::CONFIG_GENERATION => self.config_generation,
            reg::DEVICE_FEATURES_SEL
            | reg::DRIVER_FEATURES
            | reg::DRIVER_FEATURES_SEL
            | reg::QUEUE_SEL
            | reg::QUEUE_NOTIFY
            | reg::INTERRUPT_ACK => {
                self.guest_error(format!("read of write-only register {offset:#x}"));
                0
            }
            _ => {
                self.guest_error(format!("read of unknown register {offset:#x}"));
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Guest write of `data` at `offset` in the device window; returns what the device must do.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<TransportEvent> {
        if offset >= reg::CONFIG {
            return self.write_config(offset - reg::CONFIG, data);
        }
        if data.len() != 4 || offset % 4 != 0 {
            self.guest_error(format!(
                "{}-byte write at register offset {offset:#x} (registers are 32-bit aligned)",
                data.len()
            ));
            return None;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => self.with_setup_queue("QueueNum", |q| match u16::try_from(v) {
                Ok(n) => {
                    q.size = n;
                    Ok(())
                }
                Err(_) => Err(format!("queue size {v} does not fit 16 bits")),
            }),
            reg::QUEUE_READY => self.with_setup_queue("QueueReady", |q| match v {
                0 | 1 => {
                    q.ready = v == 1;
                    Ok(())
                }
                _ => Err(format!("QueueReady value {v}")),
            }),
            reg::QUEUE_DESC_LOW => self.with_setup_queue("QueueDescLow", |q| {
                q.desc = set_low(q.desc, v);
                Ok(())
            }),
            reg::QUEUE_DESC_HIGH => self.with_setup_queue("QueueDescHigh", |q| {
                q.desc = set_high(q.desc, v);
                Ok(())
            }),
            reg::QUEUE_DRIVER_LOW => self.with_setup_queue("QueueDriverLow", |q| {
                q.driver = set_low(q.driver, v);
                Ok(())
            }),
            reg::QUEUE_DRIVER_HIGH => self.with_setup_queue("QueueDriverHigh", |q| {
                q.driver = set_high(q.driver, v);
                Ok(())
            }),
            reg::QUEUE_DEVICE_LOW => self.with_setup_queue("QueueDeviceLow", |q| {
                q.device = set_low(q.device, v);
                Ok(())
            }),
            reg::QUEUE_DEVICE_HIGH => self.with_setup_queue("QueueDeviceHigh", |q| {
                q.device = set_high(q.device, v);
                Ok(())
            }),
            reg::QUEUE_NOTIFY => {
                if !self.activated {
                    self.guest_error(format!("notify of queue {v} before DRIVER_OK"));
                } else if (v as usize) < self.queues.len() {
                    return Some(TransportEvent::Notify(v as u16));
                } else {
                    self.guest_error(format!("notify of queue {v}, which does not exist"));
                }
            }
            reg::INTERRUPT_ACK => {
                if v & INT_CONFIG != 0 {
                    self.config_interrupt = false;
                }
            }
            reg::STATUS => return self.write_status(v),
            reg::SHM_SEL => self.shm_sel = v,
            reg::QUEUE_RESET => self.guest_error("QueueReset without VIRTIO_F_RING_RESET".into()),
            _ => self.guest_error(format!(
                "write of {v:#x} to read-only or unknown register {offset:#x}"
            )),
        }
        None
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & status::FEATURES_OK != 0 || self.status & status::DRIVER == 0 {
            self.guest_error(format!(
                "DriverFeatures write with status {:#x} (allowed after DRIVER, before FEATURES_OK)",
                self.status
            ));
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = set_high(self.driver_features, v),
            sel => {
                if v != 0 {
                    self.guest_error(format!("DriverFeatures word {sel} = {v:#x}"));
                }
            }
        }
    }

    fn with_setup_queue(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut QueueConfig) -> Result<(), String>,
    ) {
        if self.status & status::DRIVER_OK != 0 {
            self.guest_error(format!("{what} write after DRIVER_OK"));
            return;
        }
        let Some(i) = self.selected_queue() else {
            let sel = self.queue_sel;
            self.guest_error(format!(
                "{what} write for queue {sel}, which does not exist"
            ));
            return;
        };
        if self.queues[i].ready && what != "QueueReady" {
            self.guest_error(format!("{what} write for queue {i} while it is ready"));
            return;
        }
        if let Err(e) = f(&mut self.queues[i]) {
            self.guest_error(format!("{what}: {e}"));
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> Option<TransportEvent> {
        let end = offset.checked_add(data.len() as u64);
        let fits = end.is_some_and(|e| e <= self.config.len() as u64);
        if !fits || data.is_empty() || data.len() > 8 {
            self.guest_error(format!(
                "{}-byte config write at {offset:#x} outside the {}-byte config space",
                data.len(),
                self.config.len()
            ));
            return None;
        }
        let len = data.len() as u64;
        let acked = self.driver_features;
        let negotiated = self.status & status::FEATURES_OK != 0;
        let allowed = negotiated
            && self.model.writable_config.iter().any(|f| {
                acked & f.feature != 0
                    && offset >= u64::from(f.offset)
                    && offset + len <= u64::from(f.offset) + u64::from(f.len)
            });
        if !allowed {
            self.guest_error(format!(
                "{}-byte config write at {offset:#x}: not a field the negotiated features make writable",
                data.len()
            ));
            return None;
        }
        let start = offset as usize;
        self.config[start..start + data.len()].copy_from_slice(data);
        Some(TransportEvent::ConfigWrite {
            offset: offset as u32,
            data: data.to_vec(),
        })
    }

    /// Back to the reset state (registers only; the caller stops the backend).
    pub fn reset(&mut self) {
        for q in &mut self.queues {
            *q = QueueConfig::default();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
        self.status = 0;
        self.config_interrupt = false;
        self.activated = false;
    }

    fn write_status(&mut self, v: u32) -> Option<TransportEvent> {
        if v == 0 {
            let was_active = self.activated;
            self.reset();
            return was_active.then_some(TransportEvent::Reset);
        }
        if v & !0xff != 0 {
            self.guest_error(format!("status {v:#x} has bits above 7"));
            return None;
        }
        let old = self.status;
        if v & old != old & !status::DEVICE_NEEDS_RESET {
            self.guest_error(format!(
                "status {v:#x} clears bits of {old:#x} (only a reset may)"
            ));
            return None;
        }
        let new_bits = v & !old;
        let mut accept = v & !status::DEVICE_NEEDS_RESET | old & status::DEVICE_NEEDS_RESET;
        if new_bits & status::FEATURES_OK != 0 {
            let extra = self.driver_features & !self.model.features;
            if extra != 0 || self.driver_features & F_VERSION_1 == 0 {
                self.guest_error(format!(
                    "FEATURES_OK with features {:#x} (offered {:#x}; VERSION_1 is required)",
                    self.driver_features, self.model.features
                ));
                accept &= !status::FEATURES_OK;
            }
        }
        if new_bits & status::DRIVER_OK != 0 {
            if accept & status::FEATURES_OK == 0 {
                self.guest_error("DRIVER_OK without FEATURES_OK".into());
                self.status = accept & !status::DRIVER_OK;
                self.set_needs_reset();
                return None;
            }
            match self.activation() {
                Ok(a) => {
                    self.status = accept;
                    self.activated = true;
                    self.ever_activated = true;
                    return Some(TransportEvent::Activate(a));
                }
                Err(e) => {
                    self.guest_error(format!("DRIVER_OK refused: {e}"));
                    self.status = accept & !status::DRIVER_OK;
                    self.set_needs_reset();
                    return None;
                }
            }
        }
        self.status = accept;
        None
    }

    fn activation(&self) -> Result<Activation, String> {
        let mut queues = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready {
                continue;
            }
            if q.size == 0 || !q.size.is_power_of_two() || q.size > self.model.queue_max {
                return Err(format!(
                    "queue {i}: size {} (a power of two up to {})",
                    q.size, self.model.queue_max
                ));
            }
            if q.desc % 16 != 0 || q.driver % 2 != 0 || q.device % 4 != 0 {
                return Err(format!(
                    "queue {i}: misaligned rings (desc {:#x}, driver {:#x}, device {:#x})",
                    q.desc, q.driver, q.device
                ));
            }
            queues.push(ActiveQueue {
                index: i as u16,
                config: *q,
            });
        }
        if queues.is_empty() {
            return Err("no queue is ready".into());
        }
        Ok(Activation {
            acked_features: self.driver_features,
            queues,
        })
    }
}

/// One queue's registers in a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc.
    pub desc: u64,
    /// QueueDriver.
    pub driver: u64,
    /// QueueDevice.
    pub device: u64,
}

/// Everything the guest set in a device's register file, for snapshots (`docs/snapshot.md`),
/// with the model values a restored device must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// The model's device ID.
    pub device_id: u32,
    /// The model's offered features.
    pub device_features: u64,
    /// The model's queue count.
    pub num_queues: u16,
    /// The model's largest queue size.
    pub queue_max: u16,
    /// Each queue.
    pub queues: Vec<QueueState>,
    /// The config space the guest sees.
    pub config: Vec<u8>,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// DriverFeatures.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// SHMSel.
    pub shm_sel: u32,
    /// Status.
    pub status: u32,
    /// A config interrupt is pending.
    pub config_interrupt: bool,
    /// DRIVER_OK was accepted.
    pub activated: bool,
}

impl MmioTransport {
    /// The register file as a snapshot keeps it.
    pub fn save_state(&self) -> TransportState {
        TransportState {
            device_id: self.model.device_id,
            device_features: self.model.features,
            num_queues: self.model.num_queues,
            queue_max: self.model.queue_max,
            queues: self
                .queues
                .iter()
                .map(|q| QueueState {
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                })
                .collect(),
            config: self.config.clone(),
            config_generation: self.config_generation,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            shm_sel: self.shm_sel,
            status: self.status,
            config_interrupt: self.config_interrupt,
            activated: self.activated,
        }
    }

    /// Puts a saved register file into a fresh transport of a matching model; returns the
    /// activation to start the rings with when the device was active. Refuses (with the
    /// reason) a state whose model does not match this device or whose rings are invalid.
    pub fn restore_state(&mut self, s: &TransportState) -> Result<Option<Activation>, String> {
        let m = &self.model;
        if s.device_id != m.device_id {
            return Err(format!(
                "device ID {} in the snapshot, {} now",
                s.device_id, m.device_id
            ));
        }
        if s.num_queues != m.num_queues || s.queues.len() != usize::from(m.num_queues) {
            return Err(format!(
                "{} queue(s) in the snapshot, {} now",
                s.num_queues, m.num_queues
            ));
        }
        if s.queue_max != m.queue_max {
            return Err(format!(
                "queue size limit {} in the snapshot, {} now",
                s.queue_max, m.queue_max
            ));
        }
        let missing = s.driver_features & !m.features;
        if missing != 0 {
            return Err(format!(
                "the guest uses features {missing:#x} the backend no longer offers"
            ));
        }
        if s.config.len() != self.config.len() {
            return Err(format!(
                "a config space of {} bytes in the snapshot, {} now",
                s.config.len(),
                self.config.len()
            ));
        }
        self.queues = s
            .queues
            .iter()
            .map(|q| QueueConfig {
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
            })
            .collect();
        self.config = s.config.clone();
        self.config_generation = s.config_generation;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.shm_sel = s.shm_sel;
        self.status = s.status;
        self.config_interrupt = s.config_interrupt;
        self.activated = s.activated;
        if !s.activated {
            return Ok(None);
        }
        self.activation().map(Some)
    }

    /// The activation of a restored, active device (`None` when it was not active).
    pub fn restored_activation(&self) -> Option<Activation> {
        if !self.activated {
            return None;
        }
        self.activation().ok()
    }
}

fn set_low(v: u64, low: u32) -> u64 {
    (v & !0xffff_ffff) | u64::from(low)
}

fn set_high(v: u64, high: u32) -> u64 {
    (v & 0xffff_ffff) | u64::from(high) << 32
}

/// Sizes of a split ring's three parts for `size` entries: (descriptor table, avail, used),
/// including the event-index fields.
pub fn split_ring_sizes(size: u16) -> (u64, u64, u64) {
    let n = u64::from(size);
    (16 * n, 6 + 2 * n, 6 + 8 * n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> DeviceModel {
        DeviceModel {
            device_id: 2,
            features: F_VERSION_1 | 1 << 9 | 1 << 29,
            num_queues: 2,
            queue_max: 256,
            config: (0u8..60).collect(),
            writable_config: vec![ConfigField {
                offset: 32,
                len: 1,
                feature: 1 << 9,
                sticky: true,
            }],
            vring_interrupt_always: true,
        }
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) -> Option<TransportEvent> {
        t.write(off, &v.to_le_bytes())
    }

    /// The standard driver sequence up to FEATURES_OK.
    fn negotiate(t: &mut MmioTransport, features: u64) {
        assert_eq!(w(t, reg::STATUS, 0), None);
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, features as u32);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, q: u32, size: u32, base: u64) {
        w(t, reg::QUEUE_SEL, q);
        w(t, reg::QUEUE_NUM, size);
        w(t, reg::QUEUE_DESC_LOW, base as u32);
        w(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
        w(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, reg::QUEUE_DRIVER_HIGH, 0);
        w(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, reg::QUEUE_DEVICE_HIGH, 0);
        w(t, reg::QUEUE_READY, 1);
    }

    const RUNNING: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn register_names_are_the_spec_offsets() {
        assert_eq!(
            [
                reg::MAGIC_VALUE,
                reg::QUEUE_NUM_MAX,
                reg::QUEUE_READY,
                reg::QUEUE_NOTIFY
            ],
            [0x000, 0x034, 0x044, 0x050]
        );
        assert_eq!(
            [
                reg::QUEUE_DRIVER_LOW,
                reg::QUEUE_DEVICE_HIGH,
                reg::SHM_BASE_HIGH
            ],
            [0x090, 0x0a4, 0x0bc]
        );
        assert_eq!([reg::CONFIG_GENERATION, reg::CONFIG], [0x0fc, 0x100]);
        assert_eq!(
            [
                status::FEATURES_OK,
                status::DEVICE_NEEDS_RESET,
                status::FAILED
            ],
            [8, 64, 128]
        );
        assert_eq!(
            TRANSPORT_FEATURES,
            ((1 << 24) - 1) | 1 << 28 | 1 << 29 | 1 << 32 | 1 << 35 | 1 << 36
        );
    }

    #[test]
    fn identification_registers() {
        let mut t = MmioTransport::new(model());
        assert_eq!(r(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 2);
        assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1 << 9 | 1 << 29);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 256);
        w(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(t.guest_errors(), 0);
    }

    #[test]
    fn full_initialisation_activates_with_acked_features_and_queues() {
        let mut t = MmioTransport::new(model());
        negotiate(&mut t, F_VERSION_1 | 1 << 29);
        assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        setup_queue(&mut t, 0, 128, 0x10_0000);
        let ev = w(&mut t, reg::STATUS, RUNNING);
        let Some(TransportEvent::Activate(a)) = ev else {
            panic!("{ev:?}")
        };
        assert_eq!(a.acked_features, F_VERSION_1 | 1 << 29);
        assert_eq!(a.queues.len(), 1);
        assert_eq!(
            a.queues[0].config,
            QueueConfig {
                size: 128,
                ready: true,
                desc: 0x10_0000,
                driver: 0x10_1000,
                device: 0x10_2000
            }
        );
        assert_eq!(r(&mut t, reg::STATUS), RUNNING);
        assert!(t.is_activated());
        // Registers read back; queue setup is frozen after DRIVER_OK.
        w(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::QUEUE_NUM), 128);
        assert_eq!(r(&mut t, reg::QUEUE_DEVICE_LOW), 0x10_2000);
        w(&mut t, reg::QUEUE_NUM, 8);
        assert_eq!(r(&mut t, reg::QUEUE_NUM), 128);
        assert_eq!(
            w(&mut t, reg::QUEUE_NOTIFY, 0),
            Some(TransportEvent::Notify(0))
        );
        assert_eq!(w(&mut t, reg::QUEUE_NOTIFY, 9), None);
        // Reset gives the Reset event once and clears everything.
        assert_eq!(w(&mut t, reg::STATUS, 0), Some(TransportEvent::Reset));
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(r(&mut t, reg::QUEUE_NUM), 0);
        assert!(!t.is_activated());
        assert_eq!(w(&mut t, reg::STATUS, 0), None);
    }

    #[test]
    fn features_not_offered_or_without_version_1_are_refused() {
        let mut t = MmioTransport::new(model());
        negotiate(&mut t, F_VERSION_1 | 1 << 5);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        let mut t = MmioTransport::new(model());
        negotiate(&mut t, 1 << 9);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK: refused, NEEDS_RESET and a config interrupt.
        setup_queue(&mut t, 0, 128, 0x10_0000);
        assert_eq!(w(&mut t, reg::STATUS, RUNNING & !status::FEATURES_OK), None);
        let s = r(&mut t, reg::STATUS);
        assert_eq!(s & status::DRIVER_OK, 0);
        assert_ne!(s & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
        w(&mut t, reg::INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
    }

    #[test]
    fn bad_queues_refuse_driver_ok() {
        for (size, base) in [(100u32, 0x10_0000u64), (512, 0x10_0000), (128, 0x10_0008)] {
            let mut t = MmioTransport::new(model());
            negotiate(&mut t, F_VERSION_1);
            setup_queue(&mut t, 0, size, base);
            assert_eq!(w(&mut t, reg::STATUS, RUNNING), None, "size {size}");
            assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        }
        // No ready queue at all.
        let mut t = MmioTransport::new(model());
        negotiate(&mut t, F_VERSION_1);
        assert_eq!(w(&mut t, reg::STATUS, RUNNING), None);
        // After a reset the device works again.
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 1, 64, 0x20_0000);
        assert!(matches!(
            w(&mut t, reg::STATUS, RUNNING),
            Some(TransportEvent::Activate(a)) if a.queues[0].index == 1
        ));
    }

    #[test]
    fn config_space_reads_writes_and_generation() {
        let mut t = MmioTransport::new(model());
        let mut b = [0u8; 8];
        t.read(reg::CONFIG, &mut b);
        assert_eq!(b, [0, 1, 2, 3, 4, 5, 6, 7]);
        let mut b = [0u8; 2];
        t.read(reg::CONFIG + 59, &mut b);
        assert_eq!(b, [59, 0], "bytes past the config space read as zero");
        t.read(u64::MAX - 1, &mut b);
        assert_eq!(b, [0, 0]);
        // Writable only once the feature that makes it so is negotiated.
        assert_eq!(t.write(reg::CONFIG + 32, &[1]), None);
        negotiate(&mut t, F_VERSION_1);
        assert_eq!(t.write(reg::CONFIG + 32, &[1]), None);
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t, F_VERSION_1 | 1 << 9);
        assert_eq!(t.write(reg::CONFIG + 32, &[1, 1]), None, "past the field");
        assert_eq!(t.write(reg::CONFIG, &[1]), None, "read-only field");
        assert_eq!(
            t.write(reg::CONFIG + 32, &[1]),
            Some(TransportEvent::ConfigWrite {
                offset: 32,
                data: vec![1]
            })
        );
        assert_eq!(t.config()[32], 1);
        assert_eq!(t.write(reg::CONFIG + 58, &[1, 2, 3, 4]), None);
        assert_eq!(t.write(u64::MAX - 2, &[1, 2, 3, 4]), None);
        let g = r(&mut t, reg::CONFIG_GENERATION);
        let mut new = t.config().to_vec();
        assert!(!t.update_config(&new));
        new[0] = 0xff;
        assert!(t.update_config(&new));
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), g.wrapping_add(1));
    }

    #[test]
    fn saved_state_restores_into_a_fresh_transport_and_refuses_another_model() {
        let mut t = MmioTransport::new(model());
        negotiate(&mut t, F_VERSION_1 | 1 << 29);
        setup_queue(&mut t, 0, 128, 0x10_0000);
        let Some(TransportEvent::Activate(a)) = w(&mut t, reg::STATUS, RUNNING) else {
            panic!("not activated")
        };
        t.set_config_interrupt();
        let saved = t.save_state();
        // Through JSON, as the manifest keeps it.
        let saved: TransportState =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        let mut fresh = MmioTransport::new(model());
        assert_eq!(fresh.restore_state(&saved), Ok(Some(a.clone())));
        assert_eq!(fresh.save_state(), t.save_state());
        assert_eq!(r(&mut fresh, reg::STATUS), RUNNING);
        assert_eq!(r(&mut fresh, reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        assert_eq!(fresh.restored_activation(), Some(a));
        // A model that cannot carry the guest's setup is refused, and left untouched.
        let mut fewer = model();
        fewer.features &= !(1 << 29);
        let mut other = MmioTransport::new(fewer);
        let e = other.restore_state(&saved).unwrap_err();
        assert!(e.contains("no longer offers"), "{e}");
        assert_eq!(other.status(), 0);
        let mut more_queues = model();
        more_queues.num_queues += 1;
        let e = MmioTransport::new(more_queues)
            .restore_state(&saved)
            .unwrap_err();
        assert!(e.contains("queue(s) in the snapshot"), "{e}");
        let mut net = model();
        net.device_id = 1;
        let e = MmioTransport::new(net).restore_state(&saved).unwrap_err();
        assert!(e.contains("device ID 2 in the snapshot, 1 now"), "{e}");
        // A saved ring that is not valid is refused, not started.
        let mut bad = saved.clone();
        bad.queues[0].desc = 0x10_0008;
        let e = MmioTransport::new(model()).restore_state(&bad).unwrap_err();
        assert!(e.contains("misaligned"), "{e}");
    }

    #[test]
    fn interrupt_status_reports_vring_for_vhost_user() {
        let mut t = MmioTransport::new(model());
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
        t.set_config_interrupt();
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        w(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        w(&mut t, reg::INTERRUPT_ACK, INT_CONFIG | INT_VRING);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
    }

    #[test]
    fn nonsense_is_counted_and_ignored() {
        let mut t = MmioTransport::new(model());
        let before = t.guest_errors();
        let mut one = [0xaau8; 1];
        t.read(reg::STATUS, &mut one);
        assert_eq!(one, [0]);
        let mut four = [0xaau8; 4];
        t.read(reg::STATUS + 2, &mut four);
        assert_eq!(four, [0; 4]);
        assert_eq!(t.write(reg::STATUS, &[1]), None);
        assert_eq!(w(&mut t, 0x0f8, 7), None);
        assert_eq!(w(&mut t, reg::MAGIC_VALUE, 7), None);
        assert_eq!(r(&mut t, reg::MAGIC_VALUE), MAGIC);
        w(&mut t, reg::QUEUE_SEL, 0xffff_ffff);
        w(&mut t, reg::QUEUE_NUM, 8);
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_NUM, 0x1_0000);
        assert_eq!(r(&mut t, reg::QUEUE_NUM), 0);
        w(&mut t, reg::QUEUE_READY, 5);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(
            w(&mut t, reg::QUEUE_NOTIFY, 0),
            None,
            "notify before DRIVER_OK"
        );
        w(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.driver_features(), 0, "features before DRIVER are ignored");
        w(&mut t, reg::STATUS, 0x1_0000);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(r(&mut t, reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
        for off in (0..0x100).step_by(4) {
            w(&mut t, off, 0xdead_beef);
            r(&mut t, off);
        }
        assert!(t.guest_errors() > before + 10);
    }
}
